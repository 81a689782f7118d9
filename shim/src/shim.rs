//! containerd's shim lifecycle for `containerd-shim-kybernate-v1` ([`KybernateShim`]): `start`
//! spawns the serving shim (one per pod, or per container outside Kubernetes), `delete` cleans up
//! after a shim that died, and the serving shim wires the reaper, the event publisher and the runc
//! runtime into the [`TaskService`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use checkpoint_core::Runc;
use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message as _, MessageField};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::read_options;
use containerd_shim::{Config, ExitSignal, Flags, Shim, StartOpts};

use crate::config::{RuntimeOptions, ShimConfig, DEFAULT_CONFIG_PATH};
use crate::container::{Container, RuncRuntime};
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::publisher::Publisher;
use crate::reaper::Reaper;
use crate::service::{lock, ContainerTable, TaskService};
use crate::spec::SpecInfo;
use crate::task::KILLED_STATUS;

/// Environment variable through which `start` passes the config file named by the runtime options
/// to the serving shim (read before any Create arrives, for the log level).
pub const CONFIG_ENV: &str = "KYBERNATE_SHIM_CONFIG";
/// How long the exit of a process waits for its output to reach containerd.
const EXIT_DRAIN: Duration = Duration::from_secs(2);
/// Spec annotations that make containers share one shim (all containers of a Kubernetes pod).
const GROUP_LABELS: [&str; 2] = ["io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id"];

/// containerd's shim lifecycle for `containerd-shim-kybernate-v1`.
pub struct KybernateShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
    /// The configuration the serving shim started with (the defaults where it could not be read).
    config: ShimConfig,
}

impl Shim for KybernateShim {
    type T = TaskService<RuncRuntime>;

    fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // The shim reaps (see reaper.rs) and logs (see logging.rs) itself.
        config.no_reaper = true;
        config.no_setup_logger = true;
        if args.action.is_empty() {
            let path = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
            let file = match &path {
                Some(p) => ShimConfig::load(p, true),
                None => ShimConfig::load(Path::new(DEFAULT_CONFIG_PATH), false),
            };
            let level = match (&file, args.debug) {
                (_, true) => "debug".to_string(),
                (Ok(c), false) => c.log_level.clone(),
                (Err(_), false) => "info".to_string(),
            };
            crate::logging::init(&level);
            let config = file.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "using the default configuration");
                ShimConfig::default()
            });
            return KybernateShim {
                id: args.id.clone(),
                namespace: args.namespace.clone(),
                exit: Arc::new(ExitSignal::default()),
                config,
            };
        }
        KybernateShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
            config: ShimConfig::default(),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd passes the runtime options on stdin.
        let mut data = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut data);
        let options = if data.is_empty() {
            RuntimeOptions::default()
        } else {
            let any = Any::parse_from_bytes(&data)?;
            RuntimeOptions::decode(Some(&any)).map_err(|e| containerd_shim::Error::InvalidArgument(e.to_string()))?
        };
        let grouping = SpecInfo::load(Path::new("."))
            .ok()
            .and_then(|spec| GROUP_LABELS.iter().find_map(|l| spec.annotation(l).map(str::to_string)))
            .unwrap_or_else(|| opts.id.clone());
        let config_path = options.config_path.as_ref().map(|p| p.display().to_string());
        let vars: Vec<(&str, &str)> = config_path.iter().map(|p| (CONFIG_ENV, p.as_str())).collect();
        let (pid, address) = containerd_shim::spawn(opts, &grouping, vars)?;
        if let Some(cgroup) = options.runc.as_ref().map(|r| r.shim_cgroup.as_str()).filter(|c| !c.is_empty()) {
            containerd_shim::cgroup::add_task_to_cgroup(cgroup, pid)?;
        }
        // Best effort, as it needs CAP_SYS_RESOURCE where containerd's score is negative; the shim
        // then keeps the score it inherited, which is containerd's own.
        let _ = containerd_shim::cgroup::adjust_oom_score(pid);
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = std::env::current_dir()
            .map_err(|e| containerd_shim::Error::IoError { context: "finding the bundle directory".into(), err: e })?;
        // The runc settings Create saved in the bundle; the configured ones if Create never got there.
        let runc = match read_options(&bundle) {
            Ok(saved) => Runc::new(saved.binary_name, Some(Path::new(&saved.root).join(&self.namespace)))
                .with_systemd_cgroup(saved.systemd_cgroup),
            Err(_) => {
                let config = ShimConfig::load(Path::new(DEFAULT_CONFIG_PATH), false).unwrap_or_default();
                Runc::new(config.runc_binary, Some(config.runc_root.join(&self.namespace)))
                    .with_systemd_cgroup(config.systemd_cgroup)
            }
        };
        release_interrupted_restore(&runc, &self.id);
        runc.delete(&self.id, true).map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        crate::mount::unmount_all(&bundle.join("rootfs")).map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        Ok(DeleteResponse {
            exit_status: KILLED_STATUS,
            exited_at: MessageField::some(Timestamp::now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        // Checkpoints on stop whose shim died mid-way are marked FAILED ("interrupted"), images kept.
        for dir in checkpoint_core::bundle::sweep_interrupted(&self.config.checkpoint_dir, 4) {
            tracing::warn!(bundle = %dir.display(), "marked an interrupted checkpoint FAILED");
        }
        match serve(&self.namespace, Arc::clone(&self.exit), publisher) {
            Ok(service) => service,
            Err(e) => {
                tracing::error!(error = %e, "the shim cannot serve");
                std::process::exit(1);
            }
        }
    }
}

/// The serving shim: the event publisher, the reaper (whose exits go to the container that claims
/// them) and the runc runtime, behind the task service.
fn serve(namespace: &str, exit: Arc<ExitSignal>, publisher: RemotePublisher) -> Result<TaskService<RuncRuntime>> {
    let events: Events = Arc::new(
        Publisher::start(publisher, namespace.to_string())
            .map_err(|e| ShimError::io("starting the event forwarder", e))?,
    );
    let containers: ContainerTable<Container> = Arc::default();
    let table = Arc::clone(&containers);
    let reaper = Reaper::start(Box::new(move |pid, status| {
        let all: Vec<Arc<Container>> = lock(&table).values().cloned().collect();
        let Some((container, io)) = all.into_iter().find_map(|c| c.claim_exit(pid).map(|io| (c, io))) else {
            return false;
        };
        // Output still in the pipes or the pty reaches containerd before the exit is reported
        // (clients close their FIFOs once Wait returns). Drained off the reaper thread.
        let drained = Arc::clone(&container);
        let record = move || {
            if let Some(io) = io {
                io.drain_output(EXIT_DRAIN);
            }
            drained.record_exit(pid, status);
        };
        if let Err(e) = std::thread::Builder::new().name(format!("exit-{pid}")).stack_size(64 * 1024).spawn(record) {
            tracing::warn!(pid, error = %e, "no thread to drain the output; recording the exit now");
            container.record_exit(pid, status);
        }
        true
    }))?;
    let runtime = RuncRuntime { namespace: namespace.to_string(), reaper, events, pod_checkpoints: Arc::default() };
    Ok(TaskService::new(runtime, containers, exit))
}

/// What a `runc restore` killed with its shim leaves in runc's state directory: the bind mount of the
/// rootfs it gave CRIU (`criu-root`), which keeps `runc delete` from removing the directory, and so the
/// container id from being used again. (CRIU itself gives up once runc is gone, with the tasks it
/// restored so far.)
fn release_interrupted_restore(runc: &Runc, id: &str) {
    let Some(criu_root) = runc.root().map(|root| root.join(id).join("criu-root")) else { return };
    if !criu_root.exists() {
        return;
    }
    tracing::warn!(id, criu_root = %criu_root.display(), "releasing what an interrupted restore left mounted");
    if let Err(e) = crate::mount::unmount_all(&criu_root) {
        tracing::warn!(id, error = %e, "unmounting the interrupted restore's criu-root");
    }
}
