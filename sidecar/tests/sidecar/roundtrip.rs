//! push → pull round trips through the filesystem store and a real S3 server, byte-identical.

use std::path::Path;
use std::sync::Arc;

use kybernate_sidecar::archive::{archive_bundle, ArchiveOptions, Compression};
use kybernate_sidecar::fetch::{fetch_bundle, fetch_bundle_blocking, FetchOptions};
use kybernate_sidecar::ship::{ship_bundle, ShipOutcome};
use kybernate_sidecar::store::{
    FsStore, PutRequest, S3Store, Store, LABEL_BUNDLE, LABEL_CHECKPOINT_TIME, LABEL_FINGERPRINT,
};
use kybernate_sidecar::Error;

use crate::common::*;

const REL: &str = "default/web-0/app/2024-05-01T10:00:00Z";

/// Ships a fresh bundle to `store`, pulls it back through `reference(key)` and compares trees.
async fn round_trip(
    store: Arc<dyn Store>,
    compression: Compression,
    fetch: FetchOptions,
    reference: impl Fn(&str) -> String,
) {
    let ckpt = tempfile::tempdir().unwrap();
    let bundle = make_bundle(ckpt.path(), REL, 12 * MIB, 7, true);
    let before = tree(&bundle);
    let opts = ship_opts(ckpt.path(), compression);

    let outcome = ship_bundle(store.as_ref(), &bundle, REL, &opts).await.unwrap();
    let ShipOutcome::Shipped { object, reused_bytes, .. } = outcome else {
        panic!("expected a fresh upload, got {outcome:?}");
    };
    assert_eq!(reused_bytes, 0);
    assert_eq!(object.key, format!("{REL}{}", compression.suffix()));
    assert_eq!(object.meta.compression, compression);
    assert_eq!(object.meta.labels[LABEL_BUNDLE], REL);
    assert_eq!(object.meta.labels[LABEL_CHECKPOINT_TIME], "2024-05-01T10:00:00Z");
    assert_eq!(object.meta.labels[LABEL_FINGERPRINT].len(), 64);
    if compression == Compression::None {
        assert!(object.meta.size > 12 * MIB as u64, "tar holds all image bytes");
    }
    let record = opts.state.shipped(REL).unwrap().expect("shipped record written");
    assert_eq!(record.sha256, object.meta.sha256);
    assert_eq!(record.size, object.meta.size);

    // Listed, and shipping again is a no-op.
    let listed = store.list("default/").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], object);
    let again = ship_bundle(store.as_ref(), &bundle, REL, &opts).await.unwrap();
    assert!(matches!(again, ShipOutcome::AlreadyShipped(_)), "{again:?}");

    // Pull back into a node checkpoint directory: same layout, same bytes, same modes.
    let dest_root = tempfile::tempdir().unwrap();
    let got = fetch_bundle(&bundle_ref(&reference(&object.key)), dest_root.path(), &fetch).await.unwrap();
    assert_eq!(got, dest_root.path().join(REL));
    assert_eq!(tree(&got), before, "pulled bundle differs from the original");
    assert_eq!(tree(&bundle), before, "the local bundle must be kept as it was");
    assert_no_temp_files(dest_root.path());
    // Fetching again reuses the complete bundle already there.
    let again = fetch_bundle(&bundle_ref(&reference(&object.key)), dest_root.path(), &fetch).await.unwrap();
    assert_eq!(again, got);

    // Delete: gone from the listing, and deleting twice says so.
    store.delete(&object.key).await.unwrap();
    assert!(store.list("").await.unwrap().is_empty());
    assert!(store.head(&object.key).await.unwrap().is_none());
    let err = store.delete(&object.key).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_store_round_trip_plain_tar() {
    let store_dir = tempfile::tempdir().unwrap();
    let root = store_dir.path().to_path_buf();
    round_trip(Arc::new(FsStore::new(root.clone())), Compression::None, FetchOptions::default(), |key| {
        format!("file://{}/{key}", root.display())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_store_round_trip_zstd() {
    let store_dir = tempfile::tempdir().unwrap();
    let root = store_dir.path().to_path_buf();
    round_trip(
        Arc::new(FsStore::new(root.clone())),
        Compression::Zstd,
        FetchOptions::default(),
        // A plain path to the archive works as well as a file:// URL.
        |key| root.join(key).display().to_string(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_round_trip_plain_tar_multipart() {
    let server = S3Server::start();
    let opts = server.options(SECRET_KEY);
    let store = S3Store::connect(BUCKET.into(), "cluster-a".into(), opts.clone()).await.unwrap();
    let fetch =
        FetchOptions { s3: opts.clone(), range_size: 3 * MIB as u64, concurrency: 3, ..FetchOptions::default() };
    round_trip(Arc::new(store), Compression::None, fetch, |key| format!("s3://{BUCKET}/cluster-a/{key}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_round_trip_zstd() {
    let server = S3Server::start();
    let opts = server.options(SECRET_KEY);
    let store = S3Store::connect(BUCKET.into(), String::new(), opts.clone()).await.unwrap();
    let fetch = FetchOptions { s3: opts.clone(), ..FetchOptions::default() };
    round_trip(Arc::new(store), Compression::Zstd, fetch, |key| format!("s3://{BUCKET}/{key}")).await;
}

#[test]
fn blocking_fetch_and_local_references() {
    let store_dir = tempfile::tempdir().unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let bundle = make_bundle(ckpt.path(), REL, MIB, 3, true);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = FsStore::new(store_dir.path().to_path_buf());
    let shipped = rt.block_on(ship_bundle(&store, &bundle, REL, &ship_opts(ckpt.path(), Compression::Zstd))).unwrap();
    let ShipOutcome::Shipped { object, .. } = shipped else { panic!("{shipped:?}") };
    drop(rt);

    let dest = tempfile::tempdir().unwrap();
    let reference = format!("file://{}/{}", store_dir.path().display(), object.key);
    let got = fetch_bundle_blocking(&bundle_ref(&reference), dest.path(), &FetchOptions::default()).unwrap();
    assert_eq!(tree(&got), tree(&bundle));

    // A local bundle directory is used in place; an incomplete one is refused.
    let local =
        fetch_bundle_blocking(&bundle_ref(bundle.to_str().unwrap()), dest.path(), &FetchOptions::default()).unwrap();
    assert_eq!(local, bundle);
    let partial = make_bundle(ckpt.path(), "ns/p/c/2024-01-01T00:00:00Z", 1000, 4, false);
    let err = fetch_bundle_blocking(&bundle_ref(partial.to_str().unwrap()), dest.path(), &FetchOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::NotComplete { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_bundle_is_never_shipped_nor_restored() {
    let store_dir = tempfile::tempdir().unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let store = FsStore::new(store_dir.path().to_path_buf());
    let rel = "ns/pod/ctr/2024-02-02T00:00:00Z";
    let bundle = make_bundle(ckpt.path(), rel, MIB, 5, false);
    let opts = ship_opts(ckpt.path(), Compression::Zstd);

    let err = ship_bundle(&store, &bundle, rel, &opts).await.unwrap_err();
    assert!(matches!(err, Error::NotComplete { .. }), "{err}");
    assert!(err.to_string().contains("COMPLETE"), "{err}");
    assert!(store.list("").await.unwrap().is_empty());
    assert!(opts.state.shipped(rel).unwrap().is_none());
    assert!(!store_dir.path().join("ns").exists(), "nothing written to the store");

    // An archive of an interrupted bundle (its writer's marker, no COMPLETE) that reached a store
    // anyway is refused at restore.
    std::fs::write(bundle.join(checkpoint_core::bundle::IN_PROGRESS_MARKER), "pid 1").unwrap();
    let key = "ns/pod/ctr/incomplete.tar";
    let body = archive_bundle(
        &bundle,
        &ArchiveOptions { compression: Compression::None, ..ArchiveOptions::default() },
        None,
        None,
    );
    store
        .put(
            &PutRequest {
                key: key.into(),
                compression: Compression::None,
                encryption: None,
                labels: Default::default(),
                resume_file: None,
            },
            body,
        )
        .await
        .unwrap();
    let dest = tempfile::tempdir().unwrap();
    let reference = format!("file://{}/{key}", store_dir.path().display());
    let err = fetch_bundle(&bundle_ref(&reference), dest.path(), &FetchOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::NotComplete { .. }), "{err}");
    assert!(listing(dest.path()).iter().all(|p| !p.contains("incomplete")), "{:?}", listing(dest.path()));
    assert!(!dest.path().join("ns/pod/ctr/incomplete").exists());
}

/// The manifest pass refuses a bundle altered after it was sealed; `skip_manifest_check` (the shim's
/// `pull --skip-manifest-check`, which verifies the manifest itself) publishes it without that pass,
/// the transport checksum still checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_pass_refuses_a_tampered_bundle_unless_skipped() {
    let store_dir = tempfile::tempdir().unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let store = FsStore::new(store_dir.path().to_path_buf());
    let bundle = make_bundle(ckpt.path(), REL, MIB, 11, true);
    std::fs::write(bundle.join("config.dump"), b"altered after the seal").unwrap();
    let ShipOutcome::Shipped { object, .. } =
        ship_bundle(&store, &bundle, REL, &ship_opts(ckpt.path(), Compression::Zstd)).await.unwrap()
    else {
        panic!("expected a fresh upload")
    };
    let reference = bundle_ref(&format!("file://{}/{}", store_dir.path().display(), object.key));

    let dest = tempfile::tempdir().unwrap();
    let err = fetch_bundle(&reference, dest.path(), &FetchOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::BundleInvalid { .. }), "{err:?}");
    assert!(err.to_string().contains("does not verify"), "{err}");
    assert!(!dest.path().join(REL).exists(), "nothing published");
    assert_no_temp_files(dest.path());

    let skip = FetchOptions { skip_manifest_check: true, ..FetchOptions::default() };
    let got = fetch_bundle(&reference, dest.path(), &skip).await.unwrap();
    assert_eq!(got, dest.path().join(REL));
    assert_eq!(tree(&got), tree(&bundle), "published as stored, without the manifest pass");
    assert!(checkpoint_core::bundle::verify(&got).is_err(), "left for the caller's own verification to refuse");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tar_is_readable_by_standard_tar() {
    let store_dir = tempfile::tempdir().unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let store = FsStore::new(store_dir.path().to_path_buf());
    let bundle = make_bundle(ckpt.path(), REL, MIB, 9, true);
    ship_bundle(&store, &bundle, REL, &ship_opts(ckpt.path(), Compression::None)).await.unwrap();
    let archive = store.object_path(&format!("{REL}.tar")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(out.path())
        .status()
        .expect("tar is installed");
    assert!(status.success());
    assert_eq!(tree(out.path()), tree(&bundle));
    assert_no_temp_files(store_dir.path());
}

fn assert_no_temp_files(dir: &Path) {
    let leftovers: Vec<_> =
        listing(dir).into_iter().filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with('.'))).collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

/// An archive file no sidecar stored (no record beside it: Podman's `checkpoint --export`, kubelet's
/// checkpoint tar) is read as it is: its compression sniffed, its size and sha256 taken from the file.
/// A Kybernate bundle in it is verified as usual; another runtime's archive is refused by the
/// manifest check and published as it is without it (the shim's trust rules judge it); gzip is
/// named with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_file_without_a_record_is_sniffed_and_fetched() {
    let ckpt = tempfile::tempdir().unwrap();
    let loose = tempfile::tempdir().unwrap();
    let ours = make_bundle(ckpt.path(), "ours", MIB, 11, true);
    let theirs = make_bundle(ckpt.path(), "theirs", MIB, 12, false);
    let write = |name: &str, bundle: &Path, compression: Compression| {
        let opts = ArchiveOptions { compression, ..ArchiveOptions::default() };
        let mut body = archive_bundle(bundle, &opts, None, None);
        let path = loose.path().join(name);
        let file = std::fs::File::create(&path).unwrap();
        async move {
            use std::io::Write;
            let mut file = file;
            while let Some(chunk) = body.next().await.unwrap() {
                file.write_all(&chunk).unwrap();
            }
            path
        }
    };
    // named as the user chose: Podman's own examples call a zstd export `.tar.gz`
    write("ours.tar.gz", &ours, Compression::Zstd).await;
    write("theirs.tar", &theirs, Compression::None).await;
    let dest = tempfile::tempdir().unwrap();
    let reference = |name: &str| bundle_ref(&format!("{}/{name}", loose.path().display()));

    let got = fetch_bundle(&reference("ours.tar.gz"), dest.path(), &FetchOptions::default()).await.unwrap();
    assert_eq!(got, dest.path().join("ours"));
    assert_eq!(tree(&got), tree(&ours));

    let err = fetch_bundle(&reference("theirs.tar"), dest.path(), &FetchOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::Foreign { .. }), "{err}");
    assert!(err.to_string().contains("--skip-manifest-check"), "{err}");
    assert!(!dest.path().join("theirs").exists(), "nothing published");
    let unverified = FetchOptions { skip_manifest_check: true, ..FetchOptions::default() };
    let got = fetch_bundle(&reference("theirs.tar"), dest.path(), &unverified).await.unwrap();
    assert_eq!(got, dest.path().join("theirs"));
    assert_eq!(tree(&got), tree(&theirs));

    // a gzip member header (magic, deflate, no flags), as `podman checkpoint --compress gzip` writes
    let gzip = [&[0x1f, 0x8b, 0x08, 0x00][..], &[0u8; 600]].concat();
    std::fs::write(loose.path().join("gz.tar.gz"), gzip).unwrap();
    let err = fetch_bundle(&reference("gz.tar.gz"), dest.path(), &unverified).await.unwrap_err();
    assert!(err.to_string().contains("gzip-compressed") && err.to_string().contains("gunzip"), "{err}");
    std::fs::write(loose.path().join("junk.tar"), b"not an archive").unwrap();
    let err = fetch_bundle(&reference("junk.tar"), dest.path(), &unverified).await.unwrap_err();
    assert!(err.to_string().contains("neither a tar nor a zstd-compressed tar"), "{err}");
}
