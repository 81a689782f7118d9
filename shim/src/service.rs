//! The shim's two faces: [`KybernateShim`] handles containerd's shim lifecycle (`start`, `delete`,
//! serve), and [`TaskService`] implements the task API (v2) for the containers this shim serves.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse,
    ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse,
    StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message as _, MessageField};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, ExitSignal, Flags, Shim, StartOpts, Task, TtrpcContext, TtrpcResult};

use crate::config::{RuntimeOptions, ShimConfig, DEFAULT_CONFIG_PATH};
use crate::container::Container;
use crate::create::{create, prepare, CreateContext};
use crate::error::{Result, ShimError};
use crate::events::Publisher;
use crate::process::KILLED_STATUS;
use crate::reaper::Reaper;
use crate::settings::SavedSettings;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.kybernate.v1";
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
}

impl Shim for KybernateShim {
    type T = TaskService;

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
            if let Err(e) = file {
                tracing::warn!(error = %e, "using the default configuration");
            }
        }
        KybernateShim { id: args.id.clone(), namespace: args.namespace.clone(), exit: Arc::new(ExitSignal::default()) }
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
        let grouping = crate::container::SpecInfo::load(Path::new("."))
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
        let settings = match SavedSettings::load(&bundle) {
            Ok(Some(s)) => s,
            _ => SavedSettings::from_config(
                &ShimConfig::load(Path::new(DEFAULT_CONFIG_PATH), false).unwrap_or_default(),
                &self.namespace,
            ),
        };
        settings.force_delete(&self.id).map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
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

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        match TaskService::new(&self.namespace, Arc::clone(&self.exit), publisher) {
            Ok(service) => service,
            Err(e) => {
                tracing::error!(error = %e, "the shim cannot serve");
                std::process::exit(1);
            }
        }
    }
}

type Containers = Arc<Mutex<HashMap<String, Arc<Container>>>>;

fn lock(containers: &Containers) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
    containers.lock().unwrap_or_else(|p| p.into_inner())
}

/// The task service: every method of containerd's task API v2.
pub struct TaskService {
    namespace: String,
    containers: Containers,
    reaper: Arc<Reaper>,
    events: Publisher,
    exit: Arc<ExitSignal>,
    shutdown: Once,
}

impl TaskService {
    /// Starts the reaper and the event forwarder of a serving shim.
    pub fn new(namespace: &str, exit: Arc<ExitSignal>, publisher: RemotePublisher) -> Result<Self> {
        let events = Publisher::start(publisher, namespace.to_string())
            .map_err(|e| ShimError::io("starting the event forwarder", e))?;
        let containers: Containers = Arc::default();
        let table = Arc::clone(&containers);
        let reaper = Reaper::start(Box::new(move |pid, status| {
            let all: Vec<Arc<Container>> = lock(&table).values().cloned().collect();
            let Some((container, io)) = all.into_iter().find_map(|c| c.claim_exit(pid).map(|io| (c, io))) else {
                tracing::debug!(pid, status, "exit of a process no container claims");
                return;
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
            if let Err(e) = std::thread::Builder::new().name(format!("exit-{pid}")).stack_size(64 * 1024).spawn(record)
            {
                tracing::warn!(pid, error = %e, "no thread to drain the output; recording the exit now");
                container.record_exit(pid, status);
            }
        }))?;
        Ok(TaskService { namespace: namespace.to_string(), containers, reaper, events, exit, shutdown: Once::new() })
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("container {id} is not served by this shim")))
    }
}

/// Logs a failed request and turns the error into a ttrpc status.
fn reply<T>(method: &str, id: &str, result: Result<T>) -> TtrpcResult<T> {
    result.map_err(|e| {
        tracing::warn!(method, id, code = ?e.code(), error = %e, "request failed");
        e.into()
    })
}

impl Task for TaskService {
    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        reply("state", &req.id, self.container(&req.id).and_then(|c| c.state(&req.exec_id)))
    }

    fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, checkpoint = %req.checkpoint, terminal = req.terminal, "create");
        let result = (|| {
            let exists = || ShimError::AlreadyExists(format!("container {} already exists", req.id));
            if lock(&self.containers).contains_key(&req.id) {
                return Err(exists());
            }
            let ctx = CreateContext { namespace: &self.namespace, reaper: &self.reaper, events: &self.events };
            let prepared = prepare(&ctx, &req)?;
            // Held across the create so that an exit right after `runc create` finds its container.
            let mut containers = lock(&self.containers);
            if containers.contains_key(&req.id) {
                return Err(exists());
            }
            let container = create(&ctx, &req, prepared)?;
            let pid = container.pid();
            containers.insert(req.id.clone(), container);
            Ok(CreateTaskResponse { pid, ..Default::default() })
        })();
        reply("create", &req.id, result)
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "start");
        let result = self.container(&req.id).and_then(|c| {
            let pid = if req.exec_id.is_empty() { c.start_init()? } else { c.start_exec(&req.exec_id)? };
            Ok(StartResponse { pid, ..Default::default() })
        });
        reply("start", &req.id, result)
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "delete");
        let result = self.container(&req.id).and_then(|c| {
            let deleted = if req.exec_id.is_empty() {
                let deleted = c.delete_init()?;
                lock(&self.containers).remove(&req.id);
                deleted
            } else {
                c.delete_exec(&req.exec_id)?
            };
            Ok(DeleteResponse {
                pid: deleted.pid,
                exit_status: deleted.exit.status,
                exited_at: MessageField::some(deleted.exit.timestamp()),
                ..Default::default()
            })
        });
        reply("delete", &req.id, result)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        reply("pids", &req.id, self.container(&req.id).and_then(|c| c.pids()))
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, "pause");
        reply("pause", &req.id, self.container(&req.id).and_then(|c| c.pause()).map(|()| Empty::new()))
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, "resume");
        reply("resume", &req.id, self.container(&req.id).and_then(|c| c.resume()).map(|()| Empty::new()))
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, req: CheckpointTaskRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, path = %req.path, "checkpoint");
        reply("checkpoint", &req.id, self.container(&req.id).and_then(|c| c.checkpoint(&req)).map(|_| Empty::new()))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "kill");
        let result = self.container(&req.id).and_then(|c| c.kill(&req.exec_id, req.signal, req.all));
        reply("kill", &req.id, result.map(|()| Empty::new()))
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, terminal = req.terminal, "exec");
        reply("exec", &req.id, self.container(&req.id).and_then(|c| c.add_exec(&req)).map(|()| Empty::new()))
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let result = self.container(&req.id).and_then(|c| c.resize_pty(&req.exec_id, req.width, req.height));
        reply("resize_pty", &req.id, result.map(|()| Empty::new()))
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let result = self.container(&req.id).and_then(|c| c.close_io(&req.exec_id, req.stdin));
        reply("close_io", &req.id, result.map(|()| Empty::new()))
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, "update");
        let result = self.container(&req.id).and_then(|c| {
            let resources = req
                .resources
                .as_ref()
                .ok_or_else(|| ShimError::InvalidArgument("update carries no resources".into()))?;
            c.update(&resources.value)
        });
        reply("update", &req.id, result.map(|()| Empty::new()))
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let result = self.container(&req.id).and_then(|c| c.wait(&req.exec_id)).map(|exit| WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        });
        reply("wait", &req.id, result)
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let result = self
            .container(&req.id)
            .and_then(|c| c.stats())
            .map(|stats| StatsResponse { stats: MessageField::some(stats), ..Default::default() });
        reply("stats", &req.id, result)
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let result = self.container(&req.id).map(|c| ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: c.pid(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        });
        reply("connect", &req.id, result)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        if !lock(&self.containers).is_empty() {
            tracing::debug!(id = %req.id, "shutdown ignored: containers remain");
            return Ok(Empty::new());
        }
        tracing::info!("shutting down");
        self.shutdown.call_once(|| self.exit.signal());
        Ok(Empty::new())
    }
}
