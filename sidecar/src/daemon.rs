//! Daemon mode: watch the node checkpoint directory and ship every bundle whose `COMPLETE` marker
//! appears, one at a time, retrying failures with backoff.
//!
//! Restart safety: a bundle counts as shipped only once its shipped record exists (written after
//! the store committed the object). On start, and every `rescan_interval`, the whole directory is
//! scanned for complete bundles without a record, so nothing queued before a crash or restart is
//! lost; a bundle whose object was committed just before a crash is recognised by its fingerprint
//! and not uploaded twice; an S3 upload interrupted mid-way resumes from its resume file.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use checkpoint_core::bundle::{is_complete, COMPLETE_MARKER};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::metrics::{self, Metrics};
use crate::retry::RetryPolicy;
use crate::ship::{find_complete_bundles, ship_bundle, ShipOptions, ShipOutcome, STATE_DIR_NAME};
use crate::store::Store;

/// Settings of the daemon.
#[derive(Clone)]
pub struct DaemonConfig {
    /// The node checkpoint directory to watch.
    pub checkpoint_dir: PathBuf,
    /// How bundles are archived and where state is kept.
    pub ship: ShipOptions,
    /// Full rescans happen this often (a safety net under inotify).
    pub rescan_interval: Duration,
    /// Backoff between attempts for a bundle whose shipping failed (`max_attempts` is ignored:
    /// a bundle is retried until it ships).
    pub backoff: RetryPolicy,
    /// How deep below the checkpoint directory bundles are looked for.
    pub max_depth: usize,
    /// After the shutdown signal, keep shipping what is queued (and what a last scan finds) for up
    /// to this long before stopping. Zero stops at once. Use it where the checkpoint directory
    /// does not outlive the daemon (an `emptyDir` shared with the workload).
    pub drain_timeout: Duration,
}

/// The shipping daemon.
pub struct Daemon {
    config: DaemonConfig,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

struct Pending {
    path: PathBuf,
    rel: String,
    failures: u32,
}

impl Daemon {
    /// A daemon shipping to `store`.
    pub fn new(config: DaemonConfig, store: Arc<dyn Store>) -> Self {
        Daemon { config, store, metrics: Arc::new(Metrics::default()) }
    }

    /// The daemon's metrics (shared with its HTTP endpoint).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs until `shutdown` completes (then drains for up to `drain_timeout`). Serves metrics on
    /// `listener` when given. An upload still in progress when it stops is abandoned: its bundle is
    /// kept and shipped, or resumed, next time.
    pub async fn run(self, listener: Option<TcpListener>, shutdown: impl Future<Output = ()>) -> Result<()> {
        let root = std::path::absolute(&self.config.checkpoint_dir)
            .map_err(|e| Error::io("resolve", &self.config.checkpoint_dir, e))?;
        std::fs::create_dir_all(&root).map_err(|e| Error::io("create directory", &root, e))?;
        let state_root = root.join(STATE_DIR_NAME);

        let (ev_tx, mut events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |ev| {
            let _ = ev_tx.send(ev);
        })
        .map_err(|source| Error::Watch { path: root.clone(), source })?;
        watcher.watch(&root, RecursiveMode::Recursive).map_err(|source| Error::Watch { path: root.clone(), source })?;

        let mut background = JoinSet::new();
        if let Some(listener) = listener {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /metrics and /healthz");
            }
            background.spawn(metrics::serve(listener, self.metrics.clone()));
        }

        let mut queue: VecDeque<Pending> = VecDeque::new();
        let mut waiting: Vec<(Instant, Pending)> = Vec::new();
        let mut known: HashSet<String> = HashSet::new();
        let mut jobs: JoinSet<(Pending, Result<ShipOutcome>)> = JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_scan = Instant::now();
        let mut rescan = true;
        let mut draining: Option<Instant> = None;
        tracing::info!(
            dir = %root.display(), store = %self.store.location(),
            "watching for complete bundles"
        );
        tokio::pin!(shutdown);

        loop {
            if rescan {
                rescan = false;
                last_scan = Instant::now();
                for (path, rel) in find_complete_bundles(&root, self.config.max_depth) {
                    self.enqueue(&mut queue, &mut known, path, rel);
                }
            }
            if jobs.is_empty() {
                if let Some(item) = queue.pop_front() {
                    let store = self.store.clone();
                    let opts = self.config.ship.clone();
                    jobs.spawn(async move {
                        let result = ship_bundle(store.as_ref(), &item.path, &item.rel, &opts).await;
                        (item, result)
                    });
                }
            }
            self.metrics.set_queue_length(queue.len() + waiting.len());
            self.metrics.set_in_flight(jobs.len());
            if let Some(deadline) = draining {
                let idle = queue.is_empty() && waiting.is_empty() && jobs.is_empty();
                if idle || Instant::now() >= deadline {
                    if !idle {
                        tracing::warn!(
                            left = queue.len() + waiting.len() + jobs.len(),
                            "drain timeout reached; remaining bundles stay on disk"
                        );
                    }
                    break;
                }
            }

            tokio::select! {
                _ = &mut shutdown, if draining.is_none() => {
                    if self.config.drain_timeout.is_zero() {
                        break;
                    }
                    tracing::info!(timeout_s = self.config.drain_timeout.as_secs(), "draining the queue before stopping");
                    draining = Some(Instant::now() + self.config.drain_timeout);
                    rescan = true;
                }
                Some(event) = events.recv() => {
                    match event {
                        Ok(event) => {
                            if event.need_rescan() {
                                rescan = true;
                            }
                            if matches!(event.kind, EventKind::Create(notify::event::CreateKind::Folder)) {
                                // A new directory may already hold a bundle finished before the
                                // watch on it was set up.
                                rescan = true;
                            }
                            for path in &event.paths {
                                if path.starts_with(&state_root)
                                    || path.file_name().is_none_or(|n| n != COMPLETE_MARKER)
                                {
                                    continue;
                                }
                                let Some(bundle) = path.parent() else { continue };
                                if let Some(rel) = relative(&root, bundle) {
                                    self.enqueue(&mut queue, &mut known, bundle.to_path_buf(), rel);
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watcher error; rescanning");
                            rescan = true;
                        }
                    }
                }
                Some(joined) = jobs.join_next(), if !jobs.is_empty() => {
                    let Ok((mut item, result)) = joined else {
                        tracing::error!("shipping task panicked; rescanning");
                        known.clear();
                        rescan = true;
                        continue;
                    };
                    match result {
                        Ok(ShipOutcome::Shipped { object, seconds, reused_bytes }) => {
                            self.metrics.shipped(object.meta.size, seconds);
                            self.metrics.reused(reused_bytes);
                            known.remove(&item.rel);
                        }
                        Ok(ShipOutcome::AlreadyInStore(_)) => {
                            self.metrics.already_in_store();
                            known.remove(&item.rel);
                        }
                        Ok(ShipOutcome::AlreadyShipped(_)) => {
                            known.remove(&item.rel);
                        }
                        Err(Error::NotComplete { bundle }) => {
                            tracing::warn!(bundle = %bundle.display(), "bundle vanished or lost COMPLETE; dropped from the queue");
                            known.remove(&item.rel);
                        }
                        Err(e) => {
                            self.metrics.failed();
                            item.failures += 1;
                            let delay = self.config.backoff.delay(item.failures);
                            tracing::error!(
                                bundle = %item.path.display(), error = %e, attempt = item.failures,
                                retry_in_s = delay.as_secs(),
                                "shipping failed; the bundle is kept and will be retried"
                            );
                            waiting.push((Instant::now() + delay, item));
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let (due, later): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(at, _)| *at <= now);
                    waiting = later;
                    queue.extend(due.into_iter().map(|(_, item)| item));
                    if now.duration_since(last_scan) >= self.config.rescan_interval {
                        rescan = true;
                    }
                }
            }
        }
        drop(watcher);
        jobs.shutdown().await;
        background.shutdown().await;
        tracing::info!("daemon stopped");
        Ok(())
    }

    fn enqueue(&self, queue: &mut VecDeque<Pending>, known: &mut HashSet<String>, path: PathBuf, rel: String) {
        if known.contains(&rel) || !is_complete(&path) {
            return;
        }
        match self.config.ship.state.shipped(&rel) {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(e) => tracing::warn!(bundle = %path.display(), error = %e, "unreadable shipped record; shipping again"),
        }
        tracing::info!(bundle = %path.display(), "queued complete bundle");
        known.insert(rel.clone());
        queue.push_back(Pending { path, rel, failures: 0 });
    }
}

/// The bundle path of `dir` relative to `root`, unless it is not a valid key or lies inside another
/// bundle (a stray `COMPLETE` file in a bundle's subdirectory does not make that a bundle).
fn relative(root: &Path, dir: &Path) -> Option<String> {
    let rel = dir.strip_prefix(root).ok()?.to_str()?.to_string();
    crate::store::validate_key(&rel).ok()?;
    let inside_bundle = dir.ancestors().skip(1).take_while(|a| *a != root).any(is_complete);
    (!inside_bundle).then_some(rel)
}
