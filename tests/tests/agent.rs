//! kybernate-agent against a real, private containerd with the Kybernate shim, over its real Unix
//! socket with a tonic client: a running container checkpointed into a node bundle (it runs on, the
//! bundle is sealed, signed, pushed by the sidecar, and restores with its counter), List, Delete
//! (and its refusals), Status, the event stream, and the errors a client acts on: unknown container,
//! another runtime's container, a stopped task, and a second checkpoint of a busy container.
//!
//! Fails — never skips — when containerd, runc or CRIU are missing.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use checkpoint_core::bundle::{COMPLETE_MARKER, ROOTFS_DIFF};
use common::*;
use hyper_util::rt::TokioIo;
use kybernate_proto::kybernate::agent::v1 as api;
use kybernate_proto::kybernate::agent::v1::agent_client::AgentClient;
use kybernate_tests::{read_counter, wait_for, Containerd, COUNTER_SCRIPT};
use tonic::transport::{Channel, Endpoint};

mod common;

/// A running `kybernate-agent` for one containerd instance, killed on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
    client: AgentClient<Channel>,
}

impl Agent {
    fn start(c: &Containerd) -> Agent {
        let socket = c.dir.path().join("run/kybernate/agent.sock");
        let log = fs::File::create(c.dir.path().join("agent.log")).unwrap();
        let child = Command::new(kybernate_tests::tools::kybernate_agent_binary().unwrap())
            .arg("--socket")
            .arg(&socket)
            .arg("--containerd-socket")
            .arg(&c.socket)
            .arg("--containerd-state")
            .arg(c.dir.path().join("state"))
            .arg("--shim-config")
            .arg(&c.shim_config)
            .arg("--sidecar-binary")
            .arg(kybernate_tests::kybernate_sidecar_binary().unwrap())
            .args(["--node-name", "node-a", "--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        wait_for("the agent's socket", TIMEOUT, || std::os::unix::net::UnixStream::connect(&socket).ok()).unwrap();
        let path = socket.clone();
        let channel = rt
            .block_on(Endpoint::try_from("http://[::]").unwrap().connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            })))
            .unwrap();
        Agent { child, socket, rt, client: AgentClient::new(channel) }
    }

    fn checkpoint(&self, request: api::CheckpointRequest) -> Result<api::CheckpointResponse, Box<tonic::Status>> {
        let mut client = self.client.clone();
        self.rt.block_on(client.checkpoint(request)).map(tonic::Response::into_inner).map_err(Box::new)
    }

    fn list(&self, request: api::ListRequest) -> Vec<api::Bundle> {
        let mut client = self.client.clone();
        self.rt.block_on(client.list(request)).unwrap().into_inner().bundles
    }

    fn delete(&self, path: &str) -> Result<api::DeleteResponse, Box<tonic::Status>> {
        let mut client = self.client.clone();
        self.rt
            .block_on(client.delete(api::DeleteRequest { path: path.into() }))
            .map(tonic::Response::into_inner)
            .map_err(Box::new)
    }

    fn events(&self) -> tonic::Streaming<api::CheckpointEvent> {
        let mut client = self.client.clone();
        self.rt.block_on(client.events(api::EventsRequest {})).unwrap().into_inner()
    }

    /// The next event of `stream`, waiting at most [`TIMEOUT`].
    fn next_event(&self, stream: &mut tonic::Streaming<api::CheckpointEvent>) -> api::CheckpointEvent {
        self.rt.block_on(async { tokio::time::timeout(TIMEOUT, stream.message()).await }).unwrap().unwrap().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn task(c: &Containerd, id: &str) -> api::CheckpointRequest {
    task_request(&c.namespace, id)
}

fn task_request(namespace: &str, id: &str) -> api::CheckpointRequest {
    api::CheckpointRequest {
        target: Some(api::checkpoint_request::Target::Task(api::TaskTarget {
            namespace: namespace.into(),
            id: id.into(),
        })),
        ..Default::default()
    }
}

fn phase(event: &api::CheckpointEvent) -> api::Phase {
    api::Phase::try_from(event.phase).unwrap()
}

fn node_trust(c: &Containerd) -> checkpoint_core::trust::TrustedKeys {
    checkpoint_core::trust::TrustedKeys::load(&[c.dir.path().join("keys/signing.pub")], false).unwrap()
}

#[test]
fn a_running_container_is_checkpointed_pushed_listed_restored_and_deleted() {
    let (c, image) = setup_with(CHECKPOINTS);
    let agent = Agent::start(&c);
    assert_eq!(fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777, 0o600, "the socket is root's only");

    let mut client = agent.client.clone();
    let status = agent.rt.block_on(client.status(api::StatusRequest {})).unwrap().into_inner();
    assert_eq!(status.node_name, "node-a");
    assert_eq!(status.checkpoint_dir, checkpoint_root(&c).display().to_string());
    assert_eq!(status.store, "");
    assert!(status.criu_version.starts_with(|ch: char| ch.is_ascii_digit()), "{status:?}");

    start_counter(&c, image, "agent-ck", 3);
    let mut events = agent.events();
    let store = c.dir.path().join("store");
    let before = read_counter(&c.bundle("agent-ck")).unwrap();
    let response = agent
        .checkpoint(api::CheckpointRequest { store: format!("file://{}", store.display()), ..task(&c, "agent-ck") })
        .unwrap();
    let after = read_counter(&c.bundle("agent-ck")).unwrap();

    // The container runs on and keeps counting.
    assert_eq!(c.task_status("agent-ck").as_deref(), Some("RUNNING"), "leave_running is the default");
    counter_past(&c, "agent-ck", after + 2);

    // A node bundle, named as a checkpoint on stop names it, sealed and signed by this node.
    let bundle = response.bundle.clone().unwrap();
    let dir = PathBuf::from(&bundle.path);
    assert_eq!(dir.parent().unwrap(), checkpoint_root(&c).join(&c.namespace).join("agent-ck/agent-ck"));
    assert_eq!(dir.file_name().unwrap().to_str().unwrap(), bundle.time);
    assert_eq!(
        (bundle.namespace.as_str(), bundle.pod.as_str(), bundle.container.as_str(), bundle.container_id.as_str()),
        (c.namespace.as_str(), "agent-ck", "agent-ck", "agent-ck")
    );
    for file in
        [COMPLETE_MARKER, "kybernate.json.sig", ROOTFS_DIFF, "spec.dump", "config.dump", "checkpoint/inventory.img"]
    {
        assert!(dir.join(file).is_file(), "{file} missing in {}", dir.display());
    }
    let (manifest, signed) = checkpoint_core::bundle::verify_trusted(&dir, &node_trust(&c)).unwrap();
    assert!(matches!(signed, checkpoint_core::trust::Provenance::Signed { .. }));
    assert_eq!(manifest.container.id, "agent-ck");
    assert_eq!(bundle.bytes, manifest.files.values().map(|f| f.size).sum::<u64>());
    assert!(manifest.checkpoint.unwrap().pages_written > 0);

    // Pushed by the sidecar into the filesystem store, under the bundle's key.
    let key = format!("{}/agent-ck/agent-ck/{}", c.namespace, bundle.time);
    assert!(
        response.stored_reference.starts_with(&format!("file://{}/{key}.tar", store.display())),
        "{}",
        response.stored_reference
    );
    let archive = Path::new(response.stored_reference.trim_start_matches("file://"));
    assert!(archive.is_file(), "{} missing", archive.display());

    // The event stream told it as it went.
    let seen: Vec<(api::Phase, String, u64)> =
        (0..4).map(|_| agent.next_event(&mut events)).map(|e| (phase(&e), e.bundle.clone(), e.bytes)).collect();
    assert_eq!(
        seen,
        [
            (api::Phase::Started, String::new(), 0),
            (api::Phase::Dumping, bundle.path.clone(), 0),
            (api::Phase::Sealed, bundle.path.clone(), bundle.bytes),
            (api::Phase::Pushed, bundle.path.clone(), bundle.bytes),
        ]
    );

    // List shows it, with or without matching filters; a filter that matches nothing shows none.
    assert_eq!(agent.list(api::ListRequest::default()), std::slice::from_ref(&bundle));
    let mine =
        api::ListRequest { namespace: c.namespace.clone(), pod: "agent-ck".into(), container: "agent-ck".into() };
    assert_eq!(agent.list(mine), std::slice::from_ref(&bundle));
    assert_eq!(agent.list(api::ListRequest { container: "other".into(), ..Default::default() }), []);

    // restore-from the node bundle: the counter goes on from where it was checkpointed.
    remove_task(&c, "agent-ck");
    let restore = format!("kybernate.io/restore-from={}", dir.display());
    ctr_run(&c, &["-d", "--annotation", &restore], image, "agent-restored", &["sh", "-c", COUNTER_SCRIPT])
        .unwrap()
        .ok("ctr run restoring the agent's bundle")
        .unwrap();
    let first = wait_for("the restored counter", TIMEOUT, || read_counter(&c.bundle("agent-restored"))).unwrap();
    assert!(first >= before && first < after + 50, "resumed from {first}, checkpointed between {before} and {after}");
    counter_past(&c, "agent-restored", first);
    remove_task(&c, "agent-restored");

    // Delete refuses anything outside the checkpoint directory, and removes the bundle.
    let outside = c.dir.path().join("keys").display().to_string();
    for path in [outside.as_str(), "../keys", "/etc", &format!("{}/agent-ck", c.namespace)] {
        let err = agent.delete(path).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{path}: {err:?}");
        assert!(err.message().contains("checkpoint directory"), "{err:?}");
    }
    assert!(c.dir.path().join("keys/signing.key").is_file());
    let deleted = agent.delete(&bundle.path).unwrap();
    assert_eq!(deleted.path, bundle.path);
    assert!(!dir.exists());
    assert_eq!(agent.list(api::ListRequest::default()), []);
    assert_eq!(agent.delete(&bundle.path).unwrap_err().code(), tonic::Code::NotFound);
}

#[test]
fn unknown_foreign_stopped_and_busy_containers_are_refused() {
    let (c, image) = setup_with(CHECKPOINTS);
    let agent = Agent::start(&c);

    let err = agent.checkpoint(task(&c, "no-such-container")).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("no container no-such-container"), "{err:?}");
    let pod = api::CheckpointRequest {
        target: Some(api::checkpoint_request::Target::Pod(api::PodTarget {
            namespace: "shop".into(),
            name: "web-0".into(),
            container: "app".into(),
        })),
        ..Default::default()
    };
    let err = agent.checkpoint(pod).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("no container app of pod shop/web-0"), "{err:?}");
    let err = agent.checkpoint(api::CheckpointRequest::default()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // A container of runc's own runtime is not Kybernate's to checkpoint.
    c.ctr_ok(&["run", "-d", "--runtime", "io.containerd.runc.v2", image, "runc-ctr", "sh", "-c", COUNTER_SCRIPT])
        .unwrap();
    counter_past(&c, "runc-ctr", 1);
    let err = agent.checkpoint(task(&c, "runc-ctr")).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("is run by runtime \"io.containerd.runc.v2\""), "{err:?}");
    remove_task(&c, "runc-ctr");

    // A Kybernate container whose task has exited.
    ctr_run(&c, &["-d"], image, "done", &["sh", "-c", "true"]).unwrap().ok("ctr run -d").unwrap();
    c.wait_task_status("done", "STOPPED", TIMEOUT).unwrap();
    let err = agent.checkpoint(task(&c, "done")).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("the task of container") && err.message().contains("is stopped"), "{err:?}");

    // A second checkpoint of a container whose first is running is refused as busy; the first seals.
    start_counter(&c, image, "busy", 3);
    let mut events = agent.events();
    let mut client = agent.client.clone();
    let request = task(&c, "busy");
    let first = agent.rt.spawn(async move { client.checkpoint(request).await });
    let dumping = loop {
        let event = agent.next_event(&mut events);
        if phase(&event) == api::Phase::Dumping {
            break event;
        }
    };
    assert_eq!(dumping.id, "busy");
    let err = agent.checkpoint(task(&c, "busy")).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(err.message().contains(&format!("container {}/busy is busy", c.namespace)), "{err:?}");
    let sealed = agent.rt.block_on(first).unwrap().unwrap().into_inner();
    assert!(Path::new(&sealed.bundle.unwrap().path).join(COMPLETE_MARKER).is_file());
    assert_eq!(bundles(&c).len(), 1, "the refused checkpoint wrote nothing");
    // The slot is free again once the first has finished.
    agent.checkpoint(task(&c, "busy")).unwrap();
    assert_eq!(bundles(&c).len(), 2);
}
