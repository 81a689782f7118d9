//! Test harness: a fake kubelet (a real `Registration` gRPC server on a Unix socket that, like the
//! kubelet, connects back to the plugin and follows its ListAndWatch stream) and a plugin running
//! in-process on a fake GPU inventory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kybernate_device_plugin::config::Config;
use kybernate_device_plugin::inventory::{FakeInventory, GpuInfo};
use kybernate_device_plugin::metrics::Metrics;
use kybernate_device_plugin::registration::uds_channel;
use kybernate_device_plugin::{Daemon, DaemonError};
use kybernate_proto::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use kybernate_proto::deviceplugin::v1beta1::registration_server::{Registration, RegistrationServer};
use kybernate_proto::deviceplugin::v1beta1::{Device, Empty, RegisterRequest};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Upper bound for every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(15);
/// Interval of the bounded retry loops below.
const POLL: Duration = Duration::from_millis(20);
pub const GIB: u64 = 1 << 30;
pub const GPU_A: &str = "GPU-0a1b2c3d-0000-4000-8000-00000000000a";
pub const GPU_B: &str = "GPU-0a1b2c3d-0000-4000-8000-00000000000b";

/// Two GPUs: index 0 with 16 GiB, index 1 with 8 GiB.
pub fn two_gpus() -> Vec<GpuInfo> {
    vec![GpuInfo::healthy(0, GPU_A, "Fake GPU 16G", 16 * GIB), GpuInfo::healthy(1, GPU_B, "Fake GPU 8G", 8 * GIB)]
}

/// A validated config for `dir` with `seats` seats per GPU and a fast kubelet check.
pub fn test_config(dir: &Path, seats: u32) -> Config {
    let mut config = Config { device_plugin_dir: dir.to_owned(), kubelet_poll_interval_secs: 0.2, ..Config::default() };
    config.seats.default_per_gpu = seats;
    config.metrics.enabled = false;
    config.validate().expect("test config is valid");
    config
}

/// Awaits `fut` for at most [`WAIT`], failing the test with `what` otherwise.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

struct RegistrationService {
    dir: PathBuf,
    registrations: mpsc::UnboundedSender<RegisterRequest>,
    lists: mpsc::UnboundedSender<Vec<Device>>,
    watchers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let request = request.into_inner();
        let endpoint = self.dir.join(&request.endpoint);
        let _ = self.registrations.send(request);
        // Like the kubelet: connect back to the plugin's endpoint and follow its device list.
        let lists = self.lists.clone();
        let watcher = tokio::spawn(async move {
            let Ok(channel) = uds_channel(&endpoint).await else {
                return;
            };
            let Ok(response) = DevicePluginClient::new(channel).list_and_watch(Empty {}).await else {
                return;
            };
            let mut stream = response.into_inner();
            while let Ok(Some(message)) = stream.message().await {
                if lists.send(message.devices).is_err() {
                    break;
                }
            }
        });
        self.watchers.lock().unwrap().push(watcher);
        Ok(Response::new(Empty {}))
    }
}

/// A kubelet stand-in serving `Registration` on `<dir>/kubelet.sock`.
pub struct FakeKubelet {
    socket: PathBuf,
    registrations: mpsc::UnboundedReceiver<RegisterRequest>,
    lists: mpsc::UnboundedReceiver<Vec<Device>>,
    watchers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

impl FakeKubelet {
    /// Binds `<dir>/kubelet.sock` and serves.
    pub fn start(dir: &Path) -> FakeKubelet {
        let socket = dir.join("kubelet.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake kubelet socket");
        let (reg_tx, registrations) = mpsc::unbounded_channel();
        let (list_tx, lists) = mpsc::unbounded_channel();
        let watchers = Arc::new(Mutex::new(Vec::new()));
        let service = RegistrationService {
            dir: dir.to_owned(),
            registrations: reg_tx,
            lists: list_tx,
            watchers: Arc::clone(&watchers),
        };
        let (stop, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("fake kubelet server");
        });
        FakeKubelet { socket, registrations, lists, watchers, stop, server }
    }

    /// The next `Register` call the plugin made.
    pub async fn next_registration(&mut self) -> RegisterRequest {
        within("a registration at the fake kubelet", self.registrations.recv())
            .await
            .expect("fake kubelet registration channel open")
    }

    /// The next device list the plugin sent on the ListAndWatch stream opened after registration.
    pub async fn next_list(&mut self) -> Vec<Device> {
        within("a ListAndWatch update at the fake kubelet", self.lists.recv())
            .await
            .expect("fake kubelet list channel open")
    }

    /// Stops serving and removes the socket, as a stopping kubelet does.
    pub async fn stop(self) {
        for watcher in self.watchers.lock().unwrap().drain(..) {
            watcher.abort();
        }
        let _ = self.stop.send(());
        within("the fake kubelet to stop", self.server).await.expect("fake kubelet task");
        std::fs::remove_file(&self.socket).expect("remove fake kubelet socket");
    }
}

/// The plugin running in-process on a [`FakeInventory`].
pub struct Plugin {
    pub inventory: Arc<FakeInventory>,
    pub metrics: Metrics,
    pub socket: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), DaemonError>>,
}

impl Plugin {
    /// Starts the plugin with `config` on `gpus`.
    pub fn start(config: Config, gpus: Vec<GpuInfo>) -> Plugin {
        let inventory = Arc::new(FakeInventory::new(gpus));
        let metrics = Metrics::new().expect("metrics");
        let socket = config.plugin_socket_path();
        let (stop, mut stop_rx) = watch::channel(false);
        let daemon = Daemon::new(config, inventory.clone(), metrics.clone());
        let task = tokio::spawn(daemon.run(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
        Plugin { inventory, metrics, socket, stop, task }
    }

    /// A client on the plugin's socket, as the kubelet would open one (retried until the plugin
    /// serves, at most [`WAIT`]).
    pub async fn client(&self) -> DevicePluginClient<Channel> {
        let channel = within("a connection to the plugin", async {
            loop {
                match uds_channel(&self.socket).await {
                    Ok(channel) => break channel,
                    Err(_) => tokio::time::sleep(POLL).await,
                }
            }
        })
        .await;
        DevicePluginClient::new(channel)
    }

    /// Waits until the rendered metrics contain `needle`.
    pub async fn metrics_contain(&self, needle: &str) {
        let found = tokio::time::timeout(WAIT, async {
            while !self.metrics.render().contains(needle) {
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        assert!(found.is_ok(), "metrics never contained {needle}:\n{}", self.metrics.render());
    }

    /// Asks the plugin to shut down and returns what `run` returned.
    pub async fn stop(self) -> Result<(), DaemonError> {
        self.stop.send_replace(true);
        within("the plugin to stop", self.task).await.expect("plugin task")
    }
}

/// `<uuid>::seat-<k>` for the given seats.
pub fn seat_ids(uuid: &str, seats: impl IntoIterator<Item = u32>) -> Vec<String> {
    seats.into_iter().map(|k| format!("{uuid}::seat-{k}")).collect()
}

/// Builds the fake NVML library (`tests/fake-nvml/fake_nvml.c`) into `dir`, steered by control
/// files in `dir`; returns the library's path. Needs a C compiler (`cc`).
pub fn build_fake_nvml(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-nvml/fake_nvml.c");
    let library = dir.join("libnvidia-ml.so.1");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-Wall", "-Werror", "-o"])
        .arg(&library)
        .arg(format!("-DCONTROL_DIR=\"{}\"", dir.display()))
        .arg(&source)
        .status()
        .expect("run cc (a C compiler is needed to build the fake NVML library)");
    assert!(status.success(), "building the fake NVML library failed");
    library
}

/// Writes a control file of the fake NVML library atomically (it may be read at any moment).
pub fn write_control(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}
