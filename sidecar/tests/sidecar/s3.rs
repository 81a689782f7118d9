//! S3 failure handling against a real s3s-fs: outages, resume, credentials, corruption.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kybernate_sidecar::archive::Compression;
use kybernate_sidecar::crypt::{Key, Keyring};
use kybernate_sidecar::fetch::{fetch_bundle, FetchOptions};
use kybernate_sidecar::retry::RetryPolicy;
use kybernate_sidecar::ship::{ship_bundle, ShipOutcome};
use kybernate_sidecar::store::{FsStore, S3Store, Store};
use kybernate_sidecar::Error;

use crate::common::*;

const REL: &str = "prod/trainer-0/worker/2024-06-01T12:00:00Z";
/// 40 MiB of images → 9 parts of 5 MiB.
const IMAGE_BYTES: usize = 40 * MIB;

async fn s3_store(server: &S3Server, retry: RetryPolicy, concurrency: usize) -> S3Store {
    let mut opts = server.options(SECRET_KEY);
    opts.retry = retry;
    opts.concurrency = concurrency;
    S3Store::connect(BUCKET.into(), String::new(), opts).await.unwrap()
}

fn parts_in_resume_file(path: &std::path::Path) -> usize {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["parts"].as_object().map(|m| m.len()))
        .unwrap_or(0)
}

/// Lets the archive writer advance 1 MiB at a time until the resume file records `min_parts`
/// finished parts, then leaves it stalled. (How much output a given input yields depends on the
/// compressor's buffering, so the gate moves until the parts are there.)
async fn advance_until_parts(gate: &Gate, resume: &std::path::Path, min_parts: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        wait_for_async("the writer to reach the gate", Duration::from_secs(60), || gate.is_stalled()).await;
        // Give finished uploads a moment to be recorded before moving on.
        for _ in 0..50 {
            if parts_in_resume_file(resume) >= min_parts {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(Instant::now() < deadline, "no {min_parts} parts recorded in time");
        gate.raise(MIB as u64);
    }
}

async fn assert_pulls_identical(server: &S3Server, key: &str, original: &std::path::Path, keys: Keyring) {
    let dest = tempfile::tempdir().unwrap();
    let fetch = FetchOptions { s3: server.options(SECRET_KEY), keys, ..FetchOptions::default() };
    let got = fetch_bundle(&bundle_ref(&format!("s3://{BUCKET}/{key}")), dest.path(), &fetch).await.unwrap();
    assert_eq!(tree(&got), tree(original));
}

/// The server dies mid-upload and comes back while the upload is retrying: the same call
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_rides_through_a_server_restart() {
    let mut server = S3Server::start();
    let patient =
        RetryPolicy { max_attempts: 30, base_delay: Duration::from_millis(100), max_delay: Duration::from_millis(400) };
    let store = s3_store(&server, patient, 2).await;
    let ckpt = tempfile::tempdir().unwrap();
    let bundle = make_bundle(ckpt.path(), REL, IMAGE_BYTES, 11, true);
    let mut opts = ship_opts(ckpt.path(), Compression::None);
    let gate = Gate::new((8 * MIB) as u64);
    opts.progress = Some(gate.progress());
    let resume = opts.state.resume_path(REL);

    let task = {
        let (bundle, opts) = (bundle.clone(), opts.clone());
        tokio::spawn(async move { ship_bundle(&store, &bundle, REL, &opts).await })
    };
    advance_until_parts(&gate, &resume, 2).await;
    // The writer goes on only once the server is down, so every later part is sent after the restart.
    server.stop();
    gate.release();
    server.restart();

    let outcome = task.await.unwrap().expect("upload completes after the server is back");
    let ShipOutcome::Shipped { object, .. } = outcome else { panic!("{outcome:?}") };
    assert!(object.meta.part_sha256.len() >= 8, "several parts: {}", object.meta.part_sha256.len());
    assert!(!resume.exists(), "resume file removed after commit");
    assert!(opts.state.shipped(REL).unwrap().is_some());
    assert_pulls_identical(&server, &object.key, &bundle, Keyring::default()).await;
}

/// The server dies mid-upload and stays down: the push fails, the bundle and the resume file are
/// kept, and the next push after the server is back resumes, sending only the missing parts. An
/// encrypted upload resumes too: the retry re-encrypts under the nonce of the first attempt.
async fn resume_after_failed_push(compression: Compression, keys: Keyring) {
    const MIN_PARTS: usize = 3;
    let mut server = S3Server::start();
    let impatient =
        RetryPolicy { max_attempts: 2, base_delay: Duration::from_millis(20), max_delay: Duration::from_millis(50) };
    let ckpt = tempfile::tempdir().unwrap();
    let bundle = make_bundle(ckpt.path(), REL, IMAGE_BYTES, 12, true);
    let before = tree(&bundle);
    let mut opts = ship_opts(ckpt.path(), compression);
    opts.keys = keys.clone();
    let gate = Gate::new((8 * MIB) as u64);
    opts.progress = Some(gate.progress());
    let resume = opts.state.resume_path(REL);

    let task = {
        let store = s3_store(&server, impatient, 1).await;
        let (bundle, opts) = (bundle.clone(), opts.clone());
        tokio::spawn(async move { ship_bundle(&store, &bundle, REL, &opts).await })
    };
    advance_until_parts(&gate, &resume, MIN_PARTS).await;
    server.stop();
    gate.release();
    let err = task.await.unwrap().expect_err("push must fail while the server is down");
    assert!(err.is_transient(), "a connection failure is transient: {err}");
    assert_eq!(tree(&bundle), before, "the local bundle is kept");
    assert!(opts.state.shipped(REL).unwrap().is_none(), "not recorded as shipped");
    let done = parts_in_resume_file(&resume);
    assert!(done >= MIN_PARTS, "resume file keeps the finished parts ({done})");

    server.restart();
    opts.progress = None;
    let store = s3_store(&server, impatient, 2).await;
    let started = Instant::now();
    let outcome = ship_bundle(&store, &bundle, REL, &opts).await.unwrap();
    let ShipOutcome::Shipped { object, reused_bytes, .. } = outcome else { panic!("{outcome:?}") };
    assert!(
        reused_bytes >= (done * 5 * MIB) as u64,
        "the {done} finished parts were not sent again (reused {reused_bytes} bytes, {:?})",
        started.elapsed()
    );
    assert!(!resume.exists());
    assert!(!opts.state.sealing_path(REL).exists());
    assert_eq!(object.meta.encryption.map(|e| e.key_id), keys.encryption_key().map(|k| k.id()));
    assert_pulls_identical(&server, &object.key, &bundle, keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_push_resumes_plain_tar() {
    resume_after_failed_push(Compression::None, Keyring::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_push_resumes_zstd() {
    resume_after_failed_push(Compression::Zstd, Keyring::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_push_resumes_encrypted_zstd() {
    let key = Arc::new(Key::generate().unwrap());
    resume_after_failed_push(Compression::Zstd, Keyring::new(Some(key), vec![], false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_fail_clearly_and_keep_the_bundle() {
    let server = S3Server::start();
    let store = S3Store::connect(BUCKET.into(), String::new(), server.options("not-the-secret")).await.unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let bundle = make_bundle(ckpt.path(), REL, MIB, 13, true);
    let before = tree(&bundle);
    let opts = ship_opts(ckpt.path(), Compression::Zstd);
    let started = Instant::now();
    let err = ship_bundle(&store, &bundle, REL, &opts).await.unwrap_err();
    assert!(matches!(err, Error::Credentials { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("rejected the credentials"), "{msg}");
    assert!(msg.contains("AWS_ACCESS_KEY_ID"), "says what to do: {msg}");
    assert!(msg.contains("local bundle was kept"), "{msg}");
    assert!(!msg.contains("not-the-secret"), "never prints the secret: {msg}");
    assert!(!err.is_transient(), "credential errors are not retried");
    assert!(started.elapsed() < Duration::from_secs(10), "fails fast: {:?}", started.elapsed());
    assert_eq!(tree(&bundle), before);
    assert!(opts.state.shipped(REL).unwrap().is_none());
    assert!(!opts.state.resume_path(REL).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_object_is_rejected_fs_and_s3() {
    let server = S3Server::start();
    let s3: Arc<dyn Store> =
        Arc::new(S3Store::connect(BUCKET.into(), String::new(), server.options(SECRET_KEY)).await.unwrap());
    let store_dir = tempfile::tempdir().unwrap();
    let fs_store = FsStore::new(store_dir.path().to_path_buf());
    let ckpt = tempfile::tempdir().unwrap();
    let bundle = make_bundle(ckpt.path(), REL, 6 * MIB, 14, true);

    let fs_opts = ship_opts(ckpt.path(), Compression::None);
    ship_bundle(&fs_store, &bundle, REL, &fs_opts).await.unwrap();
    let mut s3_opts = ship_opts(ckpt.path(), Compression::Zstd);
    s3_opts.force = true;
    ship_bundle(s3.as_ref(), &bundle, REL, &s3_opts).await.unwrap();

    // Flip one byte in the middle of each stored archive (inside file data, so tar still parses).
    let fs_file = fs_store.object_path(&format!("{REL}.tar")).unwrap();
    let s3_file = server.object_file(&format!("{REL}.tar.zst"));
    for file in [&fs_file, &s3_file] {
        let mut data = std::fs::read(file).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0x40;
        std::fs::write(file, data).unwrap();
    }

    let cases = [
        (format!("file://{}", fs_file.display()), FetchOptions::default()),
        (
            format!("s3://{BUCKET}/{REL}.tar.zst"),
            FetchOptions { s3: server.options(SECRET_KEY), ..FetchOptions::default() },
        ),
    ];
    for (reference, fetch) in cases {
        let dest = tempfile::tempdir().unwrap();
        let err = fetch_bundle(&bundle_ref(&reference), dest.path(), &fetch).await.unwrap_err();
        assert!(matches!(err, Error::Integrity { what: "sha256", .. }), "{reference}: {err:?}");
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert!(listing(dest.path()).iter().all(|p| !p.contains("worker/")), "{:?}", listing(dest.path()));
        assert!(!dest.path().join(REL).exists(), "nothing published for {reference}");
        let leftovers: Vec<_> = std::fs::read_dir(dest.path().join("prod/trainer-0/worker"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "staging removed: {leftovers:?}");
    }

    // Truncation is caught as well (size).
    let data = std::fs::read(&fs_file).unwrap();
    std::fs::write(&fs_file, &data[..data.len() - 1000]).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let err =
        fetch_bundle(&bundle_ref(&format!("file://{}", fs_file.display())), dest.path(), &FetchOptions::default())
            .await
            .unwrap_err();
    assert!(matches!(err, Error::Integrity { .. } | Error::Transfer { .. }), "{err:?}");
    assert!(!dest.path().join(REL).exists());
}

/// The store behind a fault proxy: its options point at the proxy, with `retry` and a short attempt
/// timeout, so a stalled attempt is given up and retried.
async fn s3_store_via(server: &S3Server, proxy: &FaultProxy, retry: RetryPolicy) -> S3Store {
    let mut opts = server.options(SECRET_KEY);
    opts.endpoint = Some(proxy.endpoint());
    opts.retry = retry;
    opts.attempt_timeout = Duration::from_secs(2);
    S3Store::connect(BUCKET.into(), String::new(), opts).await.unwrap()
}

/// S3 answering 500 twice and then stalling a request: each is retried on a new connection, and the
/// push completes with an object that pulls back identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_errors_and_a_stall_are_retried_and_the_push_completes() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.port);
    let retry =
        RetryPolicy { max_attempts: 6, base_delay: Duration::from_millis(50), max_delay: Duration::from_millis(200) };
    let store = s3_store_via(&server, &proxy, retry).await;
    let ckpt = tempfile::tempdir().unwrap();
    let bundle = make_bundle(ckpt.path(), REL, 12 * MIB, 21, true);
    let opts = ship_opts(ckpt.path(), Compression::None);
    proxy.fail_next(&[Fault::InternalError, Fault::InternalError, Fault::Stall]);
    let outcome = ship_bundle(&store, &bundle, REL, &opts).await.expect("the push rides through the faults");
    let ShipOutcome::Shipped { object, .. } = outcome else { panic!("{outcome:?}") };
    let (faulted, passed) = proxy.counts();
    assert_eq!(faulted, 3, "every injected fault hit an attempt");
    assert!(passed >= 1);
    assert!(opts.state.shipped(REL).unwrap().is_some());
    assert_pulls_identical(&server, &object.key, &bundle, Keyring::default()).await;
}

/// S3 answering 500 to everything: the push fails naming the error once its attempts are spent, the
/// local bundle is kept as it was, and nothing is recorded as shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_s3_errors_fail_the_push_and_keep_the_local_bundle() {
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.port);
    proxy.always(Some(Fault::InternalError));
    let retry =
        RetryPolicy { max_attempts: 3, base_delay: Duration::from_millis(20), max_delay: Duration::from_millis(50) };
    let store = s3_store_via(&server, &proxy, retry).await;
    let ckpt = tempfile::tempdir().unwrap();
    let bundle = make_bundle(ckpt.path(), REL, 8 * MIB, 22, true);
    let before = tree(&bundle);
    let opts = ship_opts(ckpt.path(), Compression::None);
    let err = ship_bundle(&store, &bundle, REL, &opts).await.expect_err("every request fails");
    let text = format!("{err:#}");
    assert!(text.contains("InternalError") || text.contains("500"), "the error names what S3 said: {text}");
    assert_eq!(tree(&bundle), before, "the local bundle is kept");
    assert!(opts.state.shipped(REL).unwrap().is_none(), "not recorded as shipped");
    assert!(proxy.counts().0 >= 3, "it retried: {:?}", proxy.counts());
    checkpoint_core::bundle::verify(&bundle).expect("the bundle still verifies");
}
