//! Encryption at rest: round trip through a real S3 server (s3s-fs), wrong and missing keys,
//! tampered and truncated ciphertext, key rotation through the configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kybernate_sidecar::archive::{archive_bundle, ArchiveOptions, Compression};
use kybernate_sidecar::config::{FileConfig, Overrides, Settings};
use kybernate_sidecar::crypt::{
    write_new_key, DecryptReader, EncryptionInfo, Key, Keyring, Sealing, CHUNK_SIZE, HEADER_LEN, MAGIC, SCHEME, TAG_LEN,
};
use kybernate_sidecar::fetch::{fetch_bundle, fetch_object, FetchOptions};
use kybernate_sidecar::ship::{ship_bundle, ShipOutcome};
use kybernate_sidecar::store::{FsStore, ObjectInfo, ObjectMeta, S3Store, Store};
use kybernate_sidecar::Error;
use sha2::{Digest, Sha256};

use crate::common::*;

const REL: &str = "secure/trainer-0/worker/2024-08-01T09:00:00Z";

fn new_key() -> Arc<Key> {
    Arc::new(Key::generate().unwrap())
}

fn encrypting(key: &Arc<Key>) -> Keyring {
    Keyring::new(Some(key.clone()), vec![], false)
}

/// A sealed bundle holding `marker.bin`, 64 KiB of random bytes (so even zstd stores them as they
/// are) that must never appear in the store.
fn bundle_with_marker(root: &Path, image_bytes: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let dir = make_bundle(root, REL, image_bytes, seed, false);
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let marker: Vec<u8> = (0..64 << 10).map(|_| rng.u8(..)).collect();
    std::fs::write(dir.join("marker.bin"), &marker).unwrap();
    mark_complete(&dir);
    (dir, marker)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Rewrites an object in a filesystem store together with its record, as someone holding the
/// store (but not the key) could: the transport checksum then matches what is stored.
fn rewrite_consistently(store: &FsStore, info: &ObjectInfo, data: &[u8]) -> ObjectInfo {
    let path = store.object_path(&info.key).unwrap();
    std::fs::write(&path, data).unwrap();
    let mut meta = info.meta.clone();
    meta.size = data.len() as u64;
    meta.sha256 = sha256(data);
    std::fs::write(format!("{}.meta.json", path.display()), meta.to_json()).unwrap();
    ObjectInfo { key: info.key.clone(), meta: ObjectMeta::from_json(&info.key, &meta.to_json()).unwrap() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_round_trip_through_s3s_fs() {
    let server = S3Server::start();
    let s3 = S3Store::connect(BUCKET.into(), String::new(), server.options(SECRET_KEY)).await.unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let (bundle, marker) = bundle_with_marker(ckpt.path(), 12 * MIB, 31);
    let before = tree(&bundle);
    let key = new_key();

    // Control: unencrypted, the marker is in the stored archive as it is.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = FsStore::new(plain_dir.path().to_path_buf());
    let mut opts = ship_opts(ckpt.path(), Compression::None);
    ship_bundle(&plain, &bundle, REL, &opts).await.unwrap();
    assert!(contains(&std::fs::read(plain.object_path(&format!("{REL}.tar")).unwrap()).unwrap(), &marker[..64]));

    opts.keys = encrypting(&key);
    opts.force = true;
    let outcome = ship_bundle(&s3, &bundle, REL, &opts).await.unwrap();
    let ShipOutcome::Shipped { object, .. } = outcome else { panic!("{outcome:?}") };
    assert_eq!(object.key, format!("{REL}.tar.kenc"));
    assert_eq!(object.meta.compression, Compression::None);
    assert_eq!(object.meta.encryption, Some(EncryptionInfo { scheme: SCHEME.into(), key_id: key.id() }));

    let stored = std::fs::read(server.object_file(&object.key)).unwrap();
    assert_eq!(stored[..8], MAGIC);
    assert_eq!(hex::encode(&stored[8..16]), key.id().to_string());
    assert!(!contains(&stored, &marker[..64]), "the marker's bytes are in the stored object");
    // The transport checksum, in the record and the shipped record, is of the stored bytes.
    assert_eq!(object.meta.size, stored.len() as u64);
    assert_eq!(object.meta.sha256, sha256(&stored));
    let record = opts.state.shipped(REL).unwrap().unwrap();
    assert_eq!(
        (record.key.as_str(), record.size, &record.sha256),
        (object.key.as_str(), object.meta.size, &object.meta.sha256)
    );
    assert!(!opts.state.sealing_path(REL).exists(), "the upload's nonce is forgotten once shipped");
    assert_eq!(s3.list("secure/").await.unwrap(), vec![object.clone()]);

    let dest = tempfile::tempdir().unwrap();
    let fetch = FetchOptions { s3: server.options(SECRET_KEY), keys: encrypting(&key), ..FetchOptions::default() };
    let got = fetch_bundle(&bundle_ref(&format!("s3://{BUCKET}/{}", object.key)), dest.path(), &fetch).await.unwrap();
    assert_eq!(got, dest.path().join(REL));
    assert_eq!(tree(&got), before, "pulled bundle differs from the original");
    assert_eq!(std::fs::read(got.join("marker.bin")).unwrap(), marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_key_is_named_and_nothing_is_written() {
    let server = S3Server::start();
    let s3 = S3Store::connect(BUCKET.into(), String::new(), server.options(SECRET_KEY)).await.unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let (bundle, _) = bundle_with_marker(ckpt.path(), 2 * MIB, 32);
    let (key, other, third) = (new_key(), new_key(), new_key());
    let mut opts = ship_opts(ckpt.path(), Compression::Zstd);
    opts.keys = encrypting(&key);
    ship_bundle(&s3, &bundle, REL, &opts).await.unwrap();
    let reference = bundle_ref(&format!("s3://{BUCKET}/{REL}.tar.zst.kenc"));
    let fetch = |keys| FetchOptions { s3: server.options(SECRET_KEY), keys, ..FetchOptions::default() };

    let dest = tempfile::tempdir().unwrap();
    let wrong = Keyring::new(Some(other.clone()), vec![third.clone()], false);
    let err = fetch_bundle(&reference, dest.path(), &fetch(wrong)).await.unwrap_err();
    match &err {
        Error::WrongKey { key: k, expected, available } => {
            assert_eq!(k, &format!("{REL}.tar.zst.kenc"));
            assert_eq!(*expected, key.id());
            assert_eq!(*available, vec![other.id(), third.id()]);
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("encrypted with key id {}", key.id()))
            && msg.contains(&format!("({}, {})", other.id(), third.id()))
            && msg.contains("decryption_key_files"),
        "{msg}"
    );
    assert_eq!(listing(dest.path()), Vec::<String>::new(), "nothing written");

    let err = fetch_bundle(&reference, dest.path(), &fetch(Keyring::default())).await.unwrap_err();
    assert!(matches!(err, Error::NoDecryptionKey { key_id, .. } if key_id == key.id()), "{err:?}");
    assert!(err.to_string().contains("encryption_key_file"), "{err}");
    assert_eq!(listing(dest.path()), Vec::<String>::new(), "nothing written");

    // Unencrypted objects pull as before, unless encryption is required.
    let plain = ship_opts(ckpt.path(), Compression::Zstd);
    let plain = kybernate_sidecar::ship::ShipOptions { force: true, ..plain };
    ship_bundle(&s3, &bundle, REL, &plain).await.unwrap();
    let plain_ref = bundle_ref(&format!("s3://{BUCKET}/{REL}.tar.zst"));
    let strict = Keyring::new(Some(key.clone()), vec![], true);
    let err = fetch_bundle(&plain_ref, dest.path(), &fetch(strict)).await.unwrap_err();
    assert!(matches!(err, Error::NotEncrypted { .. }), "{err:?}");
    assert!(err.to_string().contains("require_encryption"), "{err}");
    assert_eq!(listing(dest.path()), Vec::<String>::new(), "nothing written");
    let got = fetch_bundle(&plain_ref, dest.path(), &fetch(encrypting(&key))).await.unwrap();
    assert_eq!(tree(&got), tree(&bundle));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_truncated_ciphertext_is_refused_and_leaves_nothing() {
    let store_dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FsStore::new(store_dir.path().to_path_buf()));
    let ckpt = tempfile::tempdir().unwrap();
    let (bundle, _) = bundle_with_marker(ckpt.path(), 5 * MIB, 33);
    let key = new_key();
    let mut opts = ship_opts(ckpt.path(), Compression::None);
    opts.keys = encrypting(&key);
    let ShipOutcome::Shipped { object, .. } = ship_bundle(fs.as_ref(), &bundle, REL, &opts).await.unwrap() else {
        panic!("not shipped")
    };
    let original = std::fs::read(fs.object_path(&object.key).unwrap()).unwrap();
    let sealed = CHUNK_SIZE + TAG_LEN;
    assert!(original.len() > HEADER_LEN + 5 * sealed, "at least 6 chunks: {}", original.len());
    let fetch = FetchOptions { keys: encrypting(&key), ..FetchOptions::default() };
    let pull = |info: ObjectInfo| {
        let (fs, fetch) = (fs.clone(), fetch.clone());
        async move {
            let dest = tempfile::tempdir().unwrap();
            let err = fetch_object(fs, &info, &dest.path().join("restored"), &fetch).await.unwrap_err();
            assert_eq!(listing(dest.path()), Vec::<String>::new(), "nothing left behind after {err}");
            err
        }
    };

    // One flipped byte, the record untouched: the transport checksum says so.
    let mut flipped = original.clone();
    flipped[HEADER_LEN + 2 * sealed + 100] ^= 0x01;
    std::fs::write(fs.object_path(&object.key).unwrap(), &flipped).unwrap();
    let err = pull(object.clone()).await;
    assert!(matches!(err, Error::Integrity { what: "sha256", .. }), "{err:?}");

    // The same byte, the record made to match: authentication says so.
    let info = rewrite_consistently(&fs, &object, &flipped);
    let err = pull(info).await;
    assert!(matches!(&err, Error::Decrypt { reason, .. } if reason.contains("chunk 2 ")), "{err:?}");
    assert!(err.to_string().contains("does not authenticate"), "{err}");

    // Cut at a chunk boundary (every chunk left is genuine), two chunks swapped, a chunk dropped.
    let cut = original[..HEADER_LEN + 3 * sealed].to_vec();
    let mut swapped = original.clone();
    swapped[HEADER_LEN + sealed..HEADER_LEN + 3 * sealed].rotate_left(sealed);
    let mut dropped = original[..HEADER_LEN + sealed].to_vec();
    dropped.extend_from_slice(&original[HEADER_LEN + 2 * sealed..]);
    for (what, data, expect) in
        [("cut", cut, "the last chunk 2 "), ("swapped", swapped, "chunk 1 "), ("dropped", dropped, "chunk 1 ")]
    {
        let info = rewrite_consistently(&fs, &object, &data);
        let err = pull(info).await;
        assert!(matches!(&err, Error::Decrypt { reason, .. } if reason.contains(expect)), "{what}: {err:?}");
    }

    // The genuine object still pulls.
    let info = rewrite_consistently(&fs, &object, &original);
    let dest = tempfile::tempdir().unwrap();
    let got = fetch_object(fs.clone(), &info, &dest.path().join("restored"), &fetch).await.unwrap();
    assert_eq!(tree(&got), tree(&bundle));
}

/// Settings from a sidecar.toml text (as the binary resolves them), with no flags.
fn settings(toml: &str) -> Settings {
    let file: FileConfig = toml::from_str(toml).unwrap();
    Settings::resolve(file, &Overrides::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_old_archives_readable_and_encrypts_new_ones_with_the_new_key() {
    let keys = tempfile::tempdir().unwrap();
    let (old_file, new_file) = (keys.path().join("old.key"), keys.path().join("new.key"));
    let old_id = write_new_key(&old_file).unwrap();
    let new_id = write_new_key(&new_file).unwrap();
    let before_rotation = settings(&format!("encryption_key_file = {old_file:?}"));
    let after_rotation =
        settings(&format!("encryption_key_file = {new_file:?}\ndecryption_key_files = [{old_file:?}]"));

    let store_dir = tempfile::tempdir().unwrap();
    let fs = FsStore::new(store_dir.path().to_path_buf());
    let ckpt = tempfile::tempdir().unwrap();
    let (bundle, _) = bundle_with_marker(ckpt.path(), 2 * MIB, 34);
    let ship = |s: &Settings| kybernate_sidecar::ship::ShipOptions {
        keys: s.keys.clone(),
        ..ship_opts(ckpt.path(), Compression::Zstd)
    };
    let pull = |s: &Settings| FetchOptions { keys: s.keys.clone(), ..FetchOptions::default() };

    let ShipOutcome::Shipped { object, .. } = ship_bundle(&fs, &bundle, REL, &ship(&before_rotation)).await.unwrap()
    else {
        panic!("not shipped")
    };
    assert_eq!(object.meta.encryption.unwrap().key_id, old_id);
    // (A path names an archive once the file exists.)
    let reference = bundle_ref(&format!("file://{}/{REL}.tar.zst.kenc", store_dir.path().display()));

    // After the rotation: the old archive still pulls, with the old key among the decryption keys.
    let dest = tempfile::tempdir().unwrap();
    let got = fetch_bundle(&reference, dest.path(), &pull(&after_rotation)).await.unwrap();
    assert_eq!(tree(&got), tree(&bundle));

    // The object in the store is under the old key, so it is not taken as shipped by the new one:
    // it is encrypted again with the new key.
    let shipped = ship(&after_rotation).state.shipped_path(REL);
    std::fs::remove_file(&shipped).unwrap();
    let outcome = ship_bundle(&fs, &bundle, REL, &ship(&after_rotation)).await.unwrap();
    let ShipOutcome::Shipped { object, .. } = outcome else { panic!("{outcome:?}") };
    assert_eq!(object.meta.encryption.unwrap().key_id, new_id);
    std::fs::remove_file(&shipped).unwrap();
    let outcome = ship_bundle(&fs, &bundle, REL, &ship(&after_rotation)).await.unwrap();
    assert!(matches!(outcome, ShipOutcome::AlreadyInStore(_)), "same bundle, same key: {outcome:?}");

    // A node that has only the old key cannot read it, and is told which key it needs.
    let dest = tempfile::tempdir().unwrap();
    let err = fetch_bundle(&reference, dest.path(), &pull(&before_rotation)).await.unwrap_err();
    assert!(
        matches!(&err, Error::WrongKey { expected, available, .. } if *expected == new_id && *available == vec![old_id]),
        "{err:?}"
    );
    assert_eq!(listing(dest.path()), Vec::<String>::new());
    let dest = tempfile::tempdir().unwrap();
    let got = fetch_bundle(&reference, dest.path(), &pull(&after_rotation)).await.unwrap();
    assert_eq!(tree(&got), tree(&bundle));
}

/// When the archive writer fails part-way (here: a file shrinks while it is archived), the stream
/// ends in the writer's error, and what was sent never decrypts as a whole archive: the last
/// chunk is sealed only after the writer finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_archive_writer_never_yields_a_complete_encrypted_archive() {
    let ckpt = tempfile::tempdir().unwrap();
    let (bundle, _) = bundle_with_marker(ckpt.path(), 8 * MIB, 35);
    let key = new_key();
    let gate = Gate::new((2 * MIB) as u64);
    let opts = ArchiveOptions { compression: Compression::None, ..ArchiveOptions::default() };
    let mut stream = archive_bundle(&bundle, &opts, Some(Sealing::fresh(key.clone()).unwrap()), Some(gate.progress()));
    let mut sent = Vec::new();
    let reader = tokio::spawn(async move {
        loop {
            match stream.next().await {
                Ok(Some(chunk)) => sent.extend_from_slice(&chunk),
                Ok(None) => return Err(sent),
                Err(e) => return Ok((e, sent)),
            }
        }
    });
    wait_for_async("the writer to reach the gate", Duration::from_secs(60), || gate.is_stalled()).await;
    std::fs::write(bundle.join("checkpoint/pages-2.img"), b"shorter now").unwrap();
    gate.release();
    let (err, sent) = reader.await.unwrap().expect("the stream must end in an error");
    assert!(matches!(err, Error::Archive { .. }), "{err:?}");
    assert!(err.to_string().contains("changed size"), "{err}");
    let mut plain = DecryptReader::new(&sent[..], &key).unwrap();
    let read = std::io::copy(&mut plain, &mut std::io::sink());
    assert!(read.is_err(), "the partial archive decrypted as a whole");
    assert!(plain.failure().unwrap().contains("the last chunk"), "{:?}", plain.failure());
}
