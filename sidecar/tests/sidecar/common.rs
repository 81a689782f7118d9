//! Shared fixtures: bundle builders, tree comparison, and a real S3-compatible server (s3s-fs).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint_core::bundle;
use checkpoint_core::reference::BundleRef;
use kybernate_sidecar::archive::{ArchiveOptions, Compression, Progress};
use kybernate_sidecar::crypt::Keyring;
use kybernate_sidecar::parse_reference;
use kybernate_sidecar::retry::RetryPolicy;
use kybernate_sidecar::ship::{ShipOptions, StateDir};
use kybernate_sidecar::store::{S3Options, StaticCredentials};
use sha2::{Digest, Sha256};

pub use kybernate_tests::s3::{Fault, FaultProxy, S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
pub const MIB: usize = 1 << 20;

/// Writes a bundle at `root/rel` laid out like the shim's: CRIU images and dumps, sealed (manifest
/// with every file's sha256, then COMPLETE) if `complete`. `image_bytes` of pseudo-random (incompressible)
/// data is spread over the image files; `seed` makes bundles differ.
pub fn make_bundle(root: &Path, rel: &str, image_bytes: usize, seed: u64, complete: bool) -> PathBuf {
    let dir = root.join(rel);
    std::fs::create_dir_all(dir.join("checkpoint")).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut write = |name: &str, len: usize, compressible: bool| {
        let data: Vec<u8> = if compressible {
            (0..len).map(|i| b"criu image text "[i % 16]).collect()
        } else {
            (0..len).map(|_| rng.u8(..)).collect()
        };
        std::fs::write(dir.join(name), data).unwrap();
    };
    write("checkpoint/pages-1.img", image_bytes / 2, false);
    write("checkpoint/pages-2.img", image_bytes - image_bytes / 2, false);
    write("checkpoint/pagemap-1.img", 64 << 10, true);
    write("checkpoint/core-1.img", 3000, true);
    write("checkpoint/empty.img", 0, false);
    write("config.dump", 700, true);
    write("spec.dump", 4000, true);
    write("rootfs-diff.tar", 10 << 10, true);
    write("deleted.files", 0, false);
    write("stats-dump", 120, true);
    std::fs::set_permissions(dir.join("checkpoint/core-1.img"), std::fs::Permissions::from_mode(0o600)).unwrap();
    if complete {
        mark_complete(&dir);
    }
    dir
}

/// Seals the bundle the way the shim does: manifest with every file's size and sha256, then
/// COMPLETE renamed into place last.
pub fn mark_complete(dir: &Path) {
    let host = bundle::HostInfo::current("4.1.1".into(), Some("1.1.5".into()));
    let identity = bundle::ContainerIdentity { namespace: "k8s.io".into(), name: "app".into(), ..Default::default() };
    bundle::seal(dir, bundle::Manifest::new(host, identity)).unwrap();
}

/// A bundle reference that must parse.
pub fn bundle_ref(reference: &str) -> BundleRef {
    parse_reference(reference).unwrap_or_else(|e| panic!("{e}"))
}

/// Every entry of a tree: relative path → (kind, mode, content sha256 or link target).
pub fn tree(dir: &Path) -> BTreeMap<String, (char, u32, String)> {
    fn visit(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, u32, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let mode = md.mode() & 0o7777;
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, ('l', 0, t.to_string_lossy().into_owned()));
            } else if md.is_dir() {
                out.insert(rel, ('d', mode, String::new()));
                visit(root, &p, out);
            } else {
                let h = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
                out.insert(rel, ('f', mode, h));
            }
        }
    }
    let mut out = BTreeMap::new();
    visit(dir, dir, &mut out);
    out
}

/// Every path under `dir` (for "nothing was written here" checks).
pub fn listing(dir: &Path) -> Vec<String> {
    tree(dir).into_keys().collect()
}

/// Ship options writing state under `checkpoint_dir`.
pub fn ship_opts(checkpoint_dir: &Path, compression: Compression) -> ShipOptions {
    ShipOptions {
        archive: ArchiveOptions { compression, zstd_threads: 2, ..ArchiveOptions::default() },
        state: StateDir::for_checkpoint_dir(checkpoint_dir),
        force: false,
        progress: None,
        keys: Keyring::default(),
    }
}

/// A progress callback that blocks the archive writer once `at` bytes were read, until released
/// or until the test drops its `Gate` (so a failing test never leaves the writer stuck).
pub struct Gate {
    inner: Arc<GateInner>,
}

struct GateInner {
    at: AtomicU64,
    read: AtomicU64,
    stalled: AtomicBool,
    released: AtomicBool,
}

impl Gate {
    pub fn new(at: u64) -> Self {
        Gate {
            inner: Arc::new(GateInner {
                at: AtomicU64::new(at),
                read: AtomicU64::new(0),
                stalled: AtomicBool::new(false),
                released: AtomicBool::new(false),
            }),
        }
    }

    pub fn progress(&self) -> Progress {
        let weak = Arc::downgrade(&self.inner);
        Arc::new(move |n| {
            let Some(g) = weak.upgrade() else { return };
            let total = g.read.fetch_add(n, Ordering::SeqCst) + n;
            drop(g);
            while let Some(g) = weak.upgrade() {
                if g.released.load(Ordering::SeqCst) || total < g.at.load(Ordering::SeqCst) {
                    return;
                }
                g.stalled.store(true, Ordering::SeqCst);
                drop(g);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    }

    pub fn is_stalled(&self) -> bool {
        self.inner.stalled.load(Ordering::SeqCst)
    }

    /// Lets the writer go on until `more` further bytes were read.
    pub fn raise(&self, more: u64) {
        self.inner.stalled.store(false, Ordering::SeqCst);
        self.inner.at.fetch_add(more, Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.inner.released.store(true, Ordering::SeqCst);
    }
}

/// Polls `cond` every 10 ms; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Async variant of [`wait_for`].
pub async fn wait_for_async(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Options for a test S3 server.
pub trait S3ServerOptions {
    /// Options for this server with the right (or wrong) secret and fast retries.
    fn options(&self, secret: &str) -> S3Options;
}

impl S3ServerOptions for S3Server {
    /// Options for this server with the right (or wrong) secret and fast retries.
    fn options(&self, secret: &str) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            force_path_style: true,
            part_size: 5 * MIB as u64,
            concurrency: 2,
            retry: RetryPolicy {
                max_attempts: 3,
                base_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(200),
            },
            attempt_timeout: Duration::from_secs(60),
            credentials: Some(StaticCredentials { access_key_id: ACCESS_KEY.into(), secret_access_key: secret.into() }),
        }
    }
}
