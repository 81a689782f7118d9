//! Daemon mode: inotify pickup, never shipping incomplete bundles, restart safety, metrics.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kybernate_sidecar::archive::{ArchiveStream, Compression};
use kybernate_sidecar::daemon::{Daemon, DaemonConfig};
use kybernate_sidecar::fetch::{fetch_bundle, FetchOptions};
use kybernate_sidecar::metrics::Metrics;
use kybernate_sidecar::retry::RetryPolicy;
use kybernate_sidecar::ship::{ship_bundle, ShipOptions};
use kybernate_sidecar::store::{Committed, FsStore, ObjectInfo, ObjectReader, PutRequest, Store, LABEL_FINGERPRINT};
use kybernate_sidecar::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::common::*;

/// A filesystem store that remembers every key it was asked to `put`.
struct CountingStore {
    inner: FsStore,
    puts: Mutex<Vec<String>>,
}

impl CountingStore {
    fn new(dir: &Path) -> Arc<Self> {
        Arc::new(CountingStore { inner: FsStore::new(dir.to_path_buf()), puts: Mutex::default() })
    }
    fn puts(&self) -> Vec<String> {
        self.puts.lock().unwrap().clone()
    }
}

#[async_trait]
impl Store for CountingStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(&self, req: &PutRequest, body: ArchiveStream) -> Result<Committed> {
        self.puts.lock().unwrap().push(req.key.clone());
        self.inner.put(req, body).await
    }
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ObjectReader> {
        self.inner.get(key, range).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
    metrics: Arc<Metrics>,
    addr: std::net::SocketAddr,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().expect("daemon stops cleanly");
    }
}

async fn start(ckpt: &Path, store: Arc<dyn Store>, ship: ShipOptions, drain_timeout: Duration) -> Running {
    let config = DaemonConfig {
        checkpoint_dir: ckpt.to_path_buf(),
        ship,
        rescan_interval: Duration::from_secs(3600),
        backoff: RetryPolicy {
            max_attempts: u32::MAX,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
        },
        max_depth: 6,
        drain_timeout,
    };
    let daemon = Daemon::new(config, store);
    let metrics = daemon.metrics();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel();
    let task = tokio::spawn(daemon.run(Some(listener), async {
        let _ = rx.await;
    }));
    Running { stop, task, metrics, addr }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    out
}

fn rel(i: usize) -> String {
    format!("ns/pod-{i}/ctr/2024-03-0{}T00:00:00Z", i + 1)
}

async fn assert_store_matches(store_dir: &Path, ckpt: &Path, rels: &[String]) {
    for r in rels {
        let dest = tempfile::tempdir().unwrap();
        let reference = format!("file://{}/{r}.tar.zst", store_dir.display());
        let got = fetch_bundle(&bundle_ref(&reference), dest.path(), &FetchOptions::default()).await.unwrap();
        assert_eq!(tree(&got), tree(&ckpt.join(r)), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ships_on_complete_never_before_and_serves_metrics() {
    let ckpt = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = CountingStore::new(store_dir.path());
    let opts = ship_opts(ckpt.path(), Compression::Zstd);

    // One bundle finished before the daemon starts, one still being written.
    make_bundle(ckpt.path(), &rel(0), MIB, 100, true);
    let pending = make_bundle(ckpt.path(), &rel(1), MIB, 101, false);
    let running = start(ckpt.path(), store.clone(), opts.clone(), Duration::ZERO).await;

    wait_for_async("the pre-existing bundle to ship", Duration::from_secs(30), || {
        opts.state.shipped(&rel(0)).unwrap().is_some()
    })
    .await;

    // A bundle that appears while the daemon runs.
    make_bundle(ckpt.path(), &rel(2), MIB, 102, true);
    wait_for_async("the new bundle to ship", Duration::from_secs(30), || {
        opts.state.shipped(&rel(2)).unwrap().is_some()
    })
    .await;

    // Without COMPLETE, nothing happens: with nothing queued or in flight, the daemon has done all it
    // will do until the directory changes.
    let idle = || running.metrics.queue_length() == 0 && running.metrics.in_flight() == 0;
    wait_for_async("the daemon to be idle", Duration::from_secs(30), idle).await;
    assert!(opts.state.shipped(&rel(1)).unwrap().is_none());
    assert!(!store.puts().contains(&format!("{}.tar.zst", rel(1))));
    assert_eq!(store.list("").await.unwrap().len(), 2);

    // COMPLETE appears in an existing directory: only inotify can tell the daemon.
    mark_complete(&pending);
    wait_for_async("the finished bundle to ship", Duration::from_secs(30), || {
        opts.state.shipped(&rel(1)).unwrap().is_some()
    })
    .await;

    // Records are written just before the daemon counts the shipment.
    wait_for_async("the shipments to be counted", Duration::from_secs(10), || running.metrics.bundles_shipped() == 3)
        .await;
    assert_eq!(running.metrics.failures(), 0);
    let metrics = http_get(running.addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("kybernate_sidecar_bundles_shipped_total 3\n"), "{metrics}");
    assert!(metrics.contains("kybernate_sidecar_queue_length 0\n"), "{metrics}");
    assert!(metrics.contains("kybernate_sidecar_ship_duration_seconds_count 3\n"), "{metrics}");
    let health = http_get(running.addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");
    assert!(http_get(running.addr, "/nope").await.starts_with("HTTP/1.1 404"));
    running.stop().await;

    let mut puts = store.puts();
    puts.sort();
    assert_eq!(puts, (0..3).map(|i| format!("{}.tar.zst", rel(i))).collect::<Vec<_>>(), "each shipped once");
    assert_store_matches(store_dir.path(), ckpt.path(), &(0..3).map(rel).collect::<Vec<_>>()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_queue_loses_nothing_and_duplicates_nothing() {
    const N: usize = 5;
    let ckpt = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let rels: Vec<String> = (0..N).map(rel).collect();
    for (i, r) in rels.iter().enumerate() {
        make_bundle(ckpt.path(), r, 2 * MIB, 200 + i as u64, true);
    }

    // Run 1: the archive writer stalls half-way through the third bundle; then the daemon is
    // stopped, abandoning that upload (as a crash or a pod eviction would).
    let first = CountingStore::new(store_dir.path());
    let mut opts = ship_opts(ckpt.path(), Compression::Zstd);
    let gate = Gate::new((5 * MIB) as u64);
    opts.progress = Some(gate.progress());
    let running = start(ckpt.path(), first.clone(), opts.clone(), Duration::ZERO).await;
    wait_for_async("the writer to stall in the third bundle", Duration::from_secs(60), || {
        first.puts().len() == 3 && shipped_count(&opts, &rels) == 2
    })
    .await;
    running.stop().await;
    gate.release();
    let shipped_first: Vec<String> =
        rels.iter().filter(|r| opts.state.shipped(r).unwrap().is_some()).cloned().collect();
    assert_eq!(shipped_first.len(), 2, "two bundles shipped before the stop");
    assert_eq!(first.list("").await.unwrap().len(), 2, "the abandoned upload is not committed");
    // The thread that owned the abandoned temp file removes it once it sees the upload dropped.
    wait_for_async("the abandoned temp file to be removed", Duration::from_secs(10), || {
        hidden_files(store_dir.path()).is_empty()
    })
    .await;

    // Run 2: a fresh daemon ships exactly the rest.
    let second = CountingStore::new(store_dir.path());
    opts.progress = None;
    let running = start(ckpt.path(), second.clone(), opts.clone(), Duration::ZERO).await;
    wait_for_async("all bundles to be shipped", Duration::from_secs(60), || {
        rels.iter().all(|r| opts.state.shipped(r).unwrap().is_some())
    })
    .await;
    wait_for_async("the shipments to be counted", Duration::from_secs(10), || {
        running.metrics.bundles_shipped() == (N - 2) as u64
    })
    .await;
    running.stop().await;

    let mut second_puts = second.puts();
    second_puts.sort();
    let expected: Vec<String> =
        rels.iter().filter(|r| !shipped_first.contains(r)).map(|r| format!("{r}.tar.zst")).collect();
    assert_eq!(second_puts, expected, "only the unshipped bundles are uploaded again");
    let objects = second.list("").await.unwrap();
    assert_eq!(objects.len(), N);
    assert_no_hidden_files(store_dir.path());
    assert_store_matches(store_dir.path(), ckpt.path(), &rels).await;
}

/// How many of `rels` have a shipped record.
fn shipped_count(opts: &ShipOptions, rels: &[String]) -> usize {
    rels.iter().filter(|r| opts.state.shipped(r).unwrap().is_some()).count()
}

fn hidden_files(dir: &Path) -> Vec<String> {
    listing(dir).into_iter().filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with('.'))).collect()
}

fn assert_no_hidden_files(dir: &Path) {
    let hidden = hidden_files(dir);
    assert!(hidden.is_empty(), "partial files left in the store: {hidden:?}");
}

/// A crash after the store committed an object but before the shipped record was written must
/// not upload the bundle twice: the daemon recognises it by its fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_but_unrecorded_bundle_is_not_uploaded_again() {
    let ckpt = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let opts = ship_opts(ckpt.path(), Compression::Zstd);
    let r = rel(0);
    let bundle: PathBuf = make_bundle(ckpt.path(), &r, MIB, 300, true);
    let fs = FsStore::new(store_dir.path().to_path_buf());
    ship_bundle(&fs, &bundle, &r, &opts).await.unwrap();
    let object = fs.head(&format!("{r}.tar.zst")).await.unwrap().unwrap();
    std::fs::remove_file(opts.state.shipped_path(&r)).unwrap();

    let store = CountingStore::new(store_dir.path());
    let running = start(ckpt.path(), store.clone(), opts.clone(), Duration::ZERO).await;
    wait_for_async("the record to be rewritten", Duration::from_secs(30), || opts.state.shipped(&r).unwrap().is_some())
        .await;
    wait_for_async("the bundle to be counted", Duration::from_secs(10), || {
        running.metrics.bundles_already_in_store() == 1
    })
    .await;
    assert_eq!(running.metrics.bundles_shipped(), 0);
    running.stop().await;
    assert!(store.puts().is_empty(), "no second upload: {:?}", store.puts());
    let after = fs.head(&format!("{r}.tar.zst")).await.unwrap().unwrap();
    assert_eq!(after, object, "the stored object is untouched");
    assert_eq!(after.meta.labels[LABEL_FINGERPRINT].len(), 64);
}

/// With a drain timeout, a shutdown signal lets the daemon finish the queue first (the pod-sidecar
/// case, where the checkpoint directory is an emptyDir that disappears with the pod).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_drain_timeout_ships_the_queue_first() {
    let ckpt = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let rels: Vec<String> = (0..3).map(rel).collect();
    for (i, r) in rels.iter().enumerate() {
        make_bundle(ckpt.path(), r, MIB, 700 + i as u64, true);
    }
    let store = CountingStore::new(store_dir.path());
    let mut opts = ship_opts(ckpt.path(), Compression::Zstd);
    let gate = Gate::new((MIB / 2) as u64);
    opts.progress = Some(gate.progress());
    let running = start(ckpt.path(), store.clone(), opts.clone(), Duration::from_secs(60)).await;
    wait_for_async("the first upload to start", Duration::from_secs(30), || gate.is_stalled()).await;
    let _ = running.stop.send(());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!running.task.is_finished(), "the daemon keeps going while it drains");
    gate.release();
    running.task.await.unwrap().unwrap();
    assert_eq!(shipped_count(&opts, &rels), 3, "everything queued was shipped before stopping");
    assert_eq!(store.puts().len(), 3);
    assert_store_matches(store_dir.path(), ckpt.path(), &rels).await;
}
