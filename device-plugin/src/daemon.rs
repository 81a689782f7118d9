//! The plugin's life cycle: serve the gRPC socket, register with the kubelet, register again when
//! the kubelet restarts (its socket is re-created), and remove the socket on shutdown.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kybernate_proto::deviceplugin::v1beta1::device_plugin_server::DevicePluginServer;
use notify::{EventKind, RecursiveMode, Watcher};
use thiserror::Error;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::inventory::GpuInventory;
use crate::metrics::Metrics;
use crate::registration::register;
use crate::seats::SeatLayout;
use crate::service::SeatService;

/// How long one registration attempt may take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping gRPC server may take to finish its requests before it is aborted.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Quiet period after a file-system event, so that a burst (kubelet restart) is handled once.
const EVENT_DEBOUNCE: Duration = Duration::from_millis(50);

/// Why the plugin could not run.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The device-plugin directory does not exist.
    #[error("device-plugin directory {0} does not exist; is the kubelet running with device plugins enabled, and is the directory mounted (hostPath) into this pod? (config key device_plugin_dir, flag --device-plugin-dir)")]
    DirMissing(PathBuf),
    /// The plugin's socket could not be created.
    #[error("cannot serve on {path}: {source}; check that the device-plugin directory is writable (the plugin must run as root)")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Some GPU's seat ids are too long for the kubelet.
    #[error("device ids longer than the kubelet's 63-character limit: {0:?}")]
    DeviceIdTooLong(Vec<String>),
}

/// The device plugin: everything needed to serve and register.
pub struct Daemon {
    config: Arc<Config>,
    inventory: Arc<dyn GpuInventory>,
    metrics: Metrics,
}

/// Identity of a file: device and inode numbers.
type FileId = (u64, u64);

struct RunningServer {
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    stop: watch::Sender<bool>,
    socket: FileId,
}

/// What the file-system watcher saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirEvent {
    /// The kubelet socket was created: a (re)started kubelet.
    KubeletCreated,
    /// Something else happened to one of the two sockets.
    Changed,
}

impl Daemon {
    /// A plugin serving seats of `inventory` under the validated `config`.
    pub fn new(config: Config, inventory: Arc<dyn GpuInventory>, metrics: Metrics) -> Self {
        Daemon { config: Arc::new(config), inventory, metrics }
    }

    /// Runs until `shutdown` completes, then stops serving and removes the plugin's socket.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let dir = self.config.device_plugin_dir.clone();
        if !dir.is_dir() {
            return Err(DaemonError::DirMissing(dir));
        }
        let layout = SeatLayout::new(&self.inventory.list(), &self.config.seats);
        let overlong = layout.overlong_ids();
        if !overlong.is_empty() {
            return Err(DaemonError::DeviceIdTooLong(overlong));
        }
        self.log_layout(&layout);
        self.update_gauges(&layout);

        let kubelet_socket = self.config.kubelet_socket_path();
        let plugin_socket = self.config.plugin_socket_path();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let _watcher = self.watch_dir(&dir, events_tx);
        let mut gpus = self.inventory.watch();
        let mut tick = tokio::time::interval(self.config.kubelet_poll_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);

        let mut server = Some(self.start_server(&plugin_socket)?);
        let mut registered: Option<FileId> = None;
        let mut kubelet_missing_logged = false;
        let mut kubelet_restarted = false;
        let mut inventory_alive = true;
        loop {
            // Serve: restart the server if it died or its socket was removed (kubelet start-up
            // clears the directory). A new socket needs a new registration.
            let healthy =
                server.as_ref().is_some_and(|s| !s.task.is_finished() && file_id(&plugin_socket) == Some(s.socket));
            if !healthy {
                if let Some(old) = server.take() {
                    warn!(socket = %plugin_socket.display(), "plugin socket gone or server stopped; serving again");
                    stop_server(old, &plugin_socket).await;
                }
                match self.start_server(&plugin_socket) {
                    Ok(s) => server = Some(s),
                    Err(e) => error!(error = %e, "cannot serve; retrying"),
                }
                registered = None;
            }
            // Register: once per kubelet socket (identified by inode), and again after the kubelet
            // socket was re-created.
            match file_id(&kubelet_socket).filter(|_| is_socket(&kubelet_socket)) {
                None => {
                    registered = None;
                    if !kubelet_missing_logged {
                        info!(socket = %kubelet_socket.display(), "waiting for the kubelet socket");
                        kubelet_missing_logged = true;
                    }
                }
                Some(id) if server.is_some() && (registered != Some(id) || kubelet_restarted) => {
                    kubelet_missing_logged = false;
                    match register(
                        &kubelet_socket,
                        &self.config.socket_name,
                        &self.config.resource_name,
                        REGISTER_TIMEOUT,
                    )
                    .await
                    {
                        Ok(()) => {
                            self.metrics.record_registration(true);
                            info!(
                                kubelet = %kubelet_socket.display(),
                                endpoint = %self.config.socket_name,
                                resource = %self.config.resource_name,
                                "registered with the kubelet"
                            );
                            registered = Some(id);
                        }
                        Err(e) => {
                            self.metrics.record_registration(false);
                            warn!(error = %e, "registration failed; retrying");
                        }
                    }
                }
                Some(_) => {}
            }
            kubelet_restarted = false;

            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {}
                Some(event) = events.recv() => {
                    kubelet_restarted = event == DirEvent::KubeletCreated;
                    tokio::time::sleep(EVENT_DEBOUNCE).await;
                    while let Ok(more) = events.try_recv() {
                        kubelet_restarted |= more == DirEvent::KubeletCreated;
                    }
                    if kubelet_restarted {
                        info!(socket = %kubelet_socket.display(), "kubelet socket created; registering");
                    }
                }
                changed = gpus.changed(), if inventory_alive => match changed {
                    Ok(()) => {
                        let layout = SeatLayout::new(&gpus.borrow_and_update(), &self.config.seats);
                        self.update_gauges(&layout);
                    }
                    // The inventory stopped publishing; the gauges keep its last values.
                    Err(_) => inventory_alive = false,
                },
            }
        }

        info!("shutting down");
        if let Some(server) = server {
            stop_server(server, &plugin_socket).await;
        }
        Ok(())
    }

    fn log_layout(&self, layout: &SeatLayout) {
        info!(
            resource = %self.config.resource_name,
            multi_seat = self.config.multi_seat.as_str(),
            cdi = self.config.cdi.enabled,
            seats = layout.total_seats(),
            "device plugin starting"
        );
        for g in layout.gpus() {
            info!(
                gpu = %g.gpu.uuid,
                name = %g.gpu.name,
                seats = g.seats,
                seat_vram_bytes = g.seat_vram_bytes(),
                "advertising GPU seats"
            );
        }
        let known: Vec<&str> = layout.gpus().iter().map(|g| g.gpu.uuid.as_str()).collect();
        for uuid in self.config.seats.per_gpu.keys() {
            if !known.contains(&uuid.as_str()) {
                warn!(gpu = %uuid, "seats.per_gpu names a GPU that is not on this node");
            }
        }
    }

    fn update_gauges(&self, layout: &SeatLayout) {
        let (total, healthy) = (layout.total_seats(), layout.healthy_seats());
        debug!(total, healthy, "seat counts");
        self.metrics.set_seats(total, healthy);
    }

    /// Watches the directory for the two sockets appearing or disappearing. Without a watcher
    /// (e.g. inotify limits reached) the periodic check still notices a restarted kubelet.
    fn watch_dir(&self, dir: &Path, events: mpsc::UnboundedSender<DirEvent>) -> Option<notify::RecommendedWatcher> {
        let kubelet_name = std::ffi::OsString::from(&self.config.kubelet_socket);
        let plugin_name = std::ffi::OsString::from(&self.config.socket_name);
        let handler = move |result: notify::Result<notify::Event>| {
            let Ok(event) = result else { return };
            let names = |name: &std::ffi::OsString| event.paths.iter().any(|p| p.file_name() == Some(name.as_os_str()));
            let kubelet = names(&kubelet_name);
            if !kubelet && !names(&plugin_name) {
                return;
            }
            let created = matches!(event.kind, EventKind::Create(_));
            // Nobody listening means the daemon is shutting down.
            let _ = events.send(if kubelet && created { DirEvent::KubeletCreated } else { DirEvent::Changed });
        };
        let watcher = notify::recommended_watcher(handler)
            .and_then(|mut w| w.watch(dir, RecursiveMode::NonRecursive).map(|()| w));
        match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch the device-plugin directory; relying on the periodic check (kubelet_poll_interval_secs)");
                None
            }
        }
    }

    fn start_server(&self, path: &Path) -> Result<RunningServer, DaemonError> {
        let bind_error = |source| DaemonError::Bind { path: path.to_owned(), source };
        match std::fs::remove_file(path) {
            Ok(()) => debug!(socket = %path.display(), "removed stale socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_error(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        let socket = std::fs::metadata(path).map(|m| (m.dev(), m.ino())).map_err(bind_error)?;
        let (stop, stop_rx) = watch::channel(false);
        let service = SeatService::new(
            Arc::clone(&self.config),
            Arc::clone(&self.inventory),
            self.metrics.clone(),
            stop_rx.clone(),
        );
        let mut server_stop = stop_rx;
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    // Err means the sender is gone, which also means stop.
                    let _ = server_stop.wait_for(|stopped| *stopped).await;
                }),
        );
        info!(socket = %path.display(), "serving the device-plugin API");
        Ok(RunningServer { task, stop, socket })
    }
}

/// Stops a server and removes its socket file if that is still the one it created.
async fn stop_server(server: RunningServer, path: &Path) {
    let RunningServer { mut task, stop, socket } = server;
    stop.send_replace(true);
    match tokio::time::timeout(SERVER_STOP_TIMEOUT, &mut task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "device-plugin server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "device-plugin server task failed"),
        Err(_) => {
            warn!("device-plugin server did not stop in time; aborting it");
            task.abort();
        }
    }
    if file_id(path) == Some(socket) {
        match std::fs::remove_file(path) {
            Ok(()) => info!(socket = %path.display(), "removed plugin socket"),
            Err(e) => warn!(socket = %path.display(), error = %e, "cannot remove plugin socket"),
        }
    }
}

fn file_id(path: &Path) -> Option<FileId> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
