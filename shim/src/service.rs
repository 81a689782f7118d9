//! The task API (v2) edge: [`TaskService`] implements containerd's `Task` service over any
//! [`Runtime`]. Each method decodes its protobuf request (`convert.rs`), calls one operation of the
//! container it names, and encodes the answer; errors become ttrpc status codes. It holds the
//! container table; what the containers are (runc in the shim, a fake in the tests below) is the
//! runtime's business.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Once};

use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse,
    ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse,
    StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};

use crate::convert;
use crate::error::{Result, ShimError};
use crate::task::{Instance, Runtime};

/// The containers a shim serves, by id; shared with whoever reports their exits.
pub type ContainerTable<I> = Arc<Mutex<HashMap<String, Arc<I>>>>;

/// Locks a container table (a poisoned lock is still usable: the table itself stays consistent).
pub fn lock<I>(table: &ContainerTable<I>) -> MutexGuard<'_, HashMap<String, Arc<I>>> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every method of containerd's task API v2, over the containers of `R`.
pub struct TaskService<R: Runtime> {
    runtime: R,
    containers: ContainerTable<R::Instance>,
    /// Ids of Creates in progress, so one id is never created twice at once.
    creating: Mutex<HashSet<String>>,
    exit: Arc<ExitSignal>,
    shutdown: Once,
}

impl<R: Runtime> TaskService<R> {
    /// Serves the containers `runtime` creates, kept in `containers`; Shutdown with no container left
    /// signals `exit`.
    pub fn new(runtime: R, containers: ContainerTable<R::Instance>, exit: Arc<ExitSignal>) -> Self {
        TaskService { runtime, containers, creating: Mutex::default(), exit, shutdown: Once::new() }
    }

    fn container(&self, id: &str) -> Result<Arc<R::Instance>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("container {id} is not served by this shim")))
    }

    fn do_create(&self, req: &CreateTaskRequest) -> Result<CreateTaskResponse> {
        let request = convert::create_request(req)?;
        {
            let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
            if lock(&self.containers).contains_key(&req.id) || !creating.insert(req.id.clone()) {
                return Err(ShimError::AlreadyExists(format!("container {} already exists", req.id)));
            }
        }
        // The table is not locked while the container is created, so the pod's other containers are
        // served meanwhile; an exit that comes before the container is in the table is kept and
        // reported once it is (`Runtime::added`).
        let created = self.runtime.prepare(&request).and_then(|prepared| self.runtime.create(&request, prepared));
        self.creating.lock().unwrap_or_else(|p| p.into_inner()).remove(&req.id);
        let container = created?;
        let pid = container.pid();
        lock(&self.containers).insert(req.id.clone(), Arc::clone(&container));
        self.runtime.added(&container);
        Ok(CreateTaskResponse { pid, ..Default::default() })
    }

    fn do_delete(&self, req: &DeleteRequest) -> Result<DeleteResponse> {
        let container = self.container(&req.id)?;
        let deleted = container.delete(&req.exec_id)?;
        if req.exec_id.is_empty() {
            lock(&self.containers).remove(&req.id);
        }
        Ok(DeleteResponse {
            pid: deleted.pid,
            exit_status: deleted.exit.status,
            exited_at: MessageField::some(Timestamp::from(deleted.exit.at)),
            ..Default::default()
        })
    }
}

/// Logs a failed request and turns the error into a ttrpc status.
fn reply<T>(method: &str, id: &str, result: Result<T>) -> TtrpcResult<T> {
    result.map_err(|e| {
        tracing::warn!(method, id, code = ?e.code(), error = %e, "request failed");
        e.into()
    })
}

impl<R: Runtime> Task for TaskService<R> {
    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let result = self.container(&req.id).and_then(|c| c.state(&req.exec_id)).map(convert::state_response);
        reply("state", &req.id, result)
    }

    fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, checkpoint = %req.checkpoint, terminal = req.terminal, "create");
        reply("create", &req.id, self.do_create(&req))
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "start");
        let result = self.container(&req.id).and_then(|c| c.start(&req.exec_id));
        reply("start", &req.id, result.map(|pid| StartResponse { pid, ..Default::default() }))
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "delete");
        reply("delete", &req.id, self.do_delete(&req))
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        reply("pids", &req.id, self.container(&req.id).and_then(|c| c.pids()).and_then(convert::pids_response))
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
        let result = self.container(&req.id).and_then(|c| c.checkpoint(&convert::checkpoint_request(&req)?));
        reply("checkpoint", &req.id, result.map(|()| Empty::new()))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "kill");
        let result = self.container(&req.id).and_then(|c| c.kill(&req.exec_id, req.signal, req.all));
        reply("kill", &req.id, result.map(|()| Empty::new()))
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, terminal = req.terminal, "exec");
        let result = self.container(&req.id).and_then(|c| c.exec(convert::exec_request(&req)?));
        reply("exec", &req.id, result.map(|()| Empty::new()))
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
            exited_at: MessageField::some(Timestamp::from(exit.at)),
            ..Default::default()
        });
        reply("wait", &req.id, result)
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let result = self
            .container(&req.id)
            .and_then(|c| c.stats())
            .and_then(crate::stats::metrics)
            .and_then(convert::any)
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

#[cfg(test)]
mod tests {
    //! The task service over a real ttrpc socket, with a fake runtime: what containerd sends is decoded,
    //! reaches the container it names, and the answer (or the error code) comes back.

    use std::sync::Condvar;
    use std::time::SystemTime;

    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    use containerd_shim::protos::protobuf::Message as _;
    use containerd_shim::protos::shim::oci::{CheckpointOptions, ProcessDetails};
    use containerd_shim::protos::ttrpc::{self, context, Code};
    use containerd_shim::protos::{create_task, TaskClient};

    use super::*;
    use crate::task::{
        CheckpointRequest, CreateRequest, Deleted, ExecRequest, Exit, PidInfo, ProcessState, TaskStatus,
    };

    /// A container that only keeps its state: started at pid 42, exits on any signal.
    struct FakeContainer {
        req: CreateRequest,
        state: Mutex<(TaskStatus, Option<Exit>)>,
        changed: Condvar,
        checkpoints: Mutex<Vec<CheckpointRequest>>,
        execs: Mutex<Vec<ExecRequest>>,
    }

    impl FakeContainer {
        fn status(&self) -> MutexGuard<'_, (TaskStatus, Option<Exit>)> {
            self.state.lock().unwrap()
        }
    }

    impl Instance for FakeContainer {
        fn pid(&self) -> u32 {
            if self.status().0 == TaskStatus::Created {
                0
            } else {
                42
            }
        }
        fn state(&self, exec_id: &str) -> Result<ProcessState> {
            if !exec_id.is_empty() {
                return Err(ShimError::NotFound(format!("exec {exec_id} does not exist")));
            }
            let (status, exit) = *self.status();
            Ok(ProcessState {
                id: self.req.id.clone(),
                exec_id: String::new(),
                bundle: self.req.bundle.display().to_string(),
                pid: self.pid(),
                status,
                stdio: self.req.stdio.clone(),
                exit,
            })
        }
        fn start(&self, _exec_id: &str) -> Result<u32> {
            self.status().0 = TaskStatus::Running;
            Ok(42)
        }
        fn kill(&self, _exec_id: &str, signal: u32, _all: bool) -> Result<()> {
            *self.status() = (TaskStatus::Stopped, Some(Exit { status: 128 + signal, at: SystemTime::now() }));
            self.changed.notify_all();
            Ok(())
        }
        fn exec(&self, req: ExecRequest) -> Result<()> {
            self.execs.lock().unwrap().push(req);
            Ok(())
        }
        fn wait(&self, _exec_id: &str) -> Result<Exit> {
            let mut state = self.status();
            loop {
                if let Some(exit) = state.1 {
                    return Ok(exit);
                }
                state = self.changed.wait(state).unwrap();
            }
        }
        fn delete(&self, _exec_id: &str) -> Result<Deleted> {
            match *self.status() {
                (TaskStatus::Stopped, Some(exit)) => Ok(Deleted { pid: 42, exit }),
                _ => Err(ShimError::FailedPrecondition(format!("task {} is running: kill it first", self.req.id))),
            }
        }
        fn pids(&self) -> Result<Vec<PidInfo>> {
            Ok(vec![PidInfo { pid: 42, exec_id: None }, PidInfo { pid: 43, exec_id: Some("sh".into()) }])
        }
        fn pause(&self) -> Result<()> {
            Err(ShimError::FailedPrecondition("the fake cannot pause".into()))
        }
        fn resume(&self) -> Result<()> {
            Ok(())
        }
        fn checkpoint(&self, req: &CheckpointRequest) -> Result<()> {
            self.checkpoints.lock().unwrap().push(req.clone());
            Ok(())
        }
        fn update(&self, _resources: &[u8]) -> Result<()> {
            Ok(())
        }
        fn stats(&self) -> Result<serde_json::Value> {
            Ok(serde_json::json!({"pids": {"current": 2}}))
        }
        fn resize_pty(&self, _exec_id: &str, _width: u32, _height: u32) -> Result<()> {
            Ok(())
        }
        fn close_io(&self, _exec_id: &str, _stdin: bool) -> Result<()> {
            Ok(())
        }
    }

    /// Creates fake containers; refuses bundles named `/refused`.
    struct FakeRuntime;

    impl Runtime for FakeRuntime {
        type Instance = FakeContainer;
        type Prepared = ();

        fn prepare(&self, req: &CreateRequest) -> Result<()> {
            if req.bundle == std::path::Path::new("/refused") {
                return Err(ShimError::InvalidArgument("/refused is not an OCI bundle".into()));
            }
            Ok(())
        }

        fn create(&self, req: &CreateRequest, (): ()) -> Result<Arc<FakeContainer>> {
            Ok(Arc::new(FakeContainer {
                req: req.clone(),
                state: Mutex::new((TaskStatus::Created, None)),
                changed: Condvar::new(),
                checkpoints: Mutex::default(),
                execs: Mutex::default(),
            }))
        }
    }

    struct Served {
        client: TaskClient,
        table: ContainerTable<FakeContainer>,
        exit: Arc<ExitSignal>,
        _server: ttrpc::Server,
        _dir: tempfile::TempDir,
    }

    fn serve() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix://{}", dir.path().join("shim.sock").display());
        let table = ContainerTable::default();
        let exit = Arc::new(ExitSignal::default());
        let service = TaskService::new(FakeRuntime, Arc::clone(&table), Arc::clone(&exit));
        let mut server = ttrpc::Server::new().bind(&address).unwrap().register_service(create_task(Arc::new(service)));
        server.start().unwrap();
        let client = TaskClient::new(ttrpc::Client::connect(&address).unwrap());
        Served { client, table, exit, _server: server, _dir: dir }
    }

    fn ctx() -> context::Context {
        context::with_timeout(10_000_000_000)
    }

    fn code<T: std::fmt::Debug>(result: ttrpc::Result<T>) -> Code {
        match result {
            Err(ttrpc::Error::RpcStatus(status)) => status.code(),
            other => panic!("expected an error status, got {other:?}"),
        }
    }

    fn create(s: &Served, id: &str, bundle: &str) -> ttrpc::Result<CreateTaskResponse> {
        let req = CreateTaskRequest {
            id: id.into(),
            bundle: bundle.into(),
            stdout: "/fifo/out".into(),
            ..Default::default()
        };
        s.client.create(ctx(), &req)
    }

    #[test]
    fn a_task_lives_through_create_start_kill_wait_and_delete() {
        let s = serve();
        assert_eq!(create(&s, "c1", "/b").unwrap().pid, 0);
        assert_eq!(code(create(&s, "c1", "/b")), Code::ALREADY_EXISTS);
        assert_eq!(code(create(&s, "c2", "/refused")), Code::INVALID_ARGUMENT);
        assert!(!lock(&s.table).contains_key("c2"), "a refused create leaves nothing in the table");

        let state = s.client.state(ctx(), &StateRequest { id: "c1".into(), ..Default::default() }).unwrap();
        assert_eq!((state.id.as_str(), state.bundle.as_str(), state.stdout.as_str()), ("c1", "/b", "/fifo/out"));
        assert_eq!(state.status.enum_value(), Ok(containerd_shim::api::Status::CREATED));
        let started = s.client.start(ctx(), &StartRequest { id: "c1".into(), ..Default::default() }).unwrap();
        assert_eq!(started.pid, 42);

        let waiter = {
            let client = s.client.clone();
            std::thread::spawn(move || client.wait(ctx(), &WaitRequest { id: "c1".into(), ..Default::default() }))
        };
        let kill = KillRequest { id: "c1".into(), signal: 15, ..Default::default() };
        s.client.kill(ctx(), &kill).unwrap();
        let waited = waiter.join().unwrap().unwrap();
        assert_eq!(waited.exit_status, 143);
        assert!(waited.exited_at.is_some());

        let deleted = s.client.delete(ctx(), &DeleteRequest { id: "c1".into(), ..Default::default() }).unwrap();
        assert_eq!((deleted.pid, deleted.exit_status), (42, 143));
        assert!(lock(&s.table).is_empty());
        assert_eq!(
            code(s.client.state(ctx(), &StateRequest { id: "c1".into(), ..Default::default() })),
            Code::NOT_FOUND
        );
    }

    #[test]
    fn requests_are_decoded_before_they_reach_the_container() {
        let s = serve();
        create(&s, "c1", "/b").unwrap();
        let opts = CheckpointOptions { exit: true, file_locks: true, work_path: "/w".into(), ..Default::default() };
        let options = Any {
            type_url: "type.googleapis.com/containerd.runc.v1.CheckpointOptions".into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let req = CheckpointTaskRequest {
            id: "c1".into(),
            path: "/images".into(),
            options: Some(options).into(),
            ..Default::default()
        };
        s.client.checkpoint(ctx(), &req).unwrap();
        let bad = CheckpointTaskRequest { id: "c1".into(), ..Default::default() };
        assert_eq!(code(s.client.checkpoint(ctx(), &bad)), Code::INVALID_ARGUMENT, "no image directory");
        let container = lock(&s.table)["c1"].clone();
        let seen = container.checkpoints.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].image_dir, std::path::Path::new("/images"));
        assert_eq!(seen[0].work_dir.as_deref(), Some(std::path::Path::new("/w")));
        assert!(seen[0].exit && seen[0].flags.file_locks);

        let spec = Any { value: br#"{"args":["sh"]}"#.to_vec(), ..Default::default() };
        let exec =
            ExecProcessRequest { id: "c1".into(), exec_id: "sh".into(), spec: Some(spec).into(), ..Default::default() };
        s.client.exec(ctx(), &exec).unwrap();
        assert_eq!(container.execs.lock().unwrap()[0].spec["args"][0], "sh");
        let not_json = ExecProcessRequest {
            id: "c1".into(),
            exec_id: "x".into(),
            spec: Some(Any { value: b"{".to_vec(), ..Default::default() }).into(),
            ..Default::default()
        };
        assert_eq!(code(s.client.exec(ctx(), &not_json)), Code::INVALID_ARGUMENT);

        let pids = s.client.pids(ctx(), &PidsRequest { id: "c1".into(), ..Default::default() }).unwrap();
        assert_eq!(pids.processes.iter().map(|p| p.pid).collect::<Vec<_>>(), [42, 43]);
        assert!(pids.processes[0].info.is_none());
        let details = ProcessDetails::parse_from_bytes(&pids.processes[1].info.value).unwrap();
        assert_eq!(details.exec_id, "sh");
        assert_eq!(
            code(s.client.pause(ctx(), &PauseRequest { id: "c1".into(), ..Default::default() })),
            Code::FAILED_PRECONDITION
        );
        let stats = s.client.stats(ctx(), &StatsRequest { id: "c1".into(), ..Default::default() }).unwrap();
        assert!(stats.stats.type_url.ends_with("io.containerd.cgroups.v1.Metrics"), "{}", stats.stats.type_url);
    }

    #[test]
    fn shutdown_waits_for_the_last_container() {
        let s = serve();
        create(&s, "c1", "/b").unwrap();
        s.client.shutdown(ctx(), &ShutdownRequest::default()).unwrap();
        assert_eq!(
            code(s.client.delete(ctx(), &DeleteRequest { id: "c1".into(), ..Default::default() })),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(lock(&s.table).len(), 1, "shutdown with a container left does nothing");
        s.client.kill(ctx(), &KillRequest { id: "c1".into(), signal: 9, ..Default::default() }).unwrap();
        s.client.delete(ctx(), &DeleteRequest { id: "c1".into(), ..Default::default() }).unwrap();
        s.client.shutdown(ctx(), &ShutdownRequest::default()).unwrap();
        s.exit.wait();
    }
}
