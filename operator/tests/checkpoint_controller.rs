//! The Checkpoint controller against a mocked API server (`tower-test`, as kube-rs documents it) and
//! fake node agents: for each step (finalizer, Pending → Running, Running → Succeeded, deletion) and
//! each failure (pod missing, not scheduled, unknown container, agent error, agent unreachable), the
//! exact requests sent (method, path, query, content type, body) and the Action returned.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use http::StatusCode;
use kube::runtime::controller::Action;
use kybernate_api::Checkpoint;
use kybernate_operator::agents::{AgentError, Bundle, CheckpointDone, CheckpointRequest, ListRequest, NodeAgents};
use kybernate_operator::checkpoint_controller::{error_policy, reconcile, Context, Error};
use kybernate_proto::kybernate::agent::v1::{checkpoint_request::Target, PodTarget};
use serde_json::{json, Value};

mod common;

use common::{api_error, merge, mock_client, now, pod_not_found, serve, served, Expect, Handle, EARLIER, NOW};

const CHECKPOINT_PATH: &str = "/apis/kybernate.io/v1alpha1/namespaces/ml/checkpoints/cp";
const STATUS_PATH: &str = "/apis/kybernate.io/v1alpha1/namespaces/ml/checkpoints/cp/status";
const POD_PATH: &str = "/api/v1/namespaces/ml/pods/trainer-0";

/// Agents answering what a test queued, recording what they were asked.
#[derive(Default)]
struct FakeAgents {
    answers: Mutex<VecDeque<Result<CheckpointDone, AgentError>>>,
    asked: Mutex<Vec<(String, CheckpointRequest)>>,
}

impl FakeAgents {
    fn answering(answers: impl IntoIterator<Item = Result<CheckpointDone, AgentError>>) -> Arc<Self> {
        Arc::new(FakeAgents { answers: Mutex::new(answers.into_iter().collect()), asked: Mutex::default() })
    }

    fn asked(&self) -> Vec<(String, CheckpointRequest)> {
        self.asked.lock().unwrap().clone()
    }
}

#[async_trait]
impl NodeAgents for FakeAgents {
    async fn checkpoint(&self, node: &str, request: CheckpointRequest) -> Result<CheckpointDone, AgentError> {
        self.asked.lock().unwrap().push((node.to_string(), request));
        self.answers.lock().unwrap().pop_front().expect("an answer queued for every checkpoint")
    }

    async fn list(&self, node: &str, _: ListRequest) -> Result<Vec<Bundle>, AgentError> {
        panic!("the Checkpoint controller listed the bundles of node {node}")
    }

    async fn delete(&self, node: &str, path: &str) -> Result<(), AgentError> {
        panic!("the Checkpoint controller deleted {path} on node {node}")
    }
}

fn unreachable() -> AgentError {
    AgentError::Unreachable {
        node: "gpu-1".into(),
        address: "http://gpu-1:7443".into(),
        source: Box::new(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused")),
    }
}

/// The Checkpoint `ml/cp` of pod `trainer-0`, generation 2, with `metadata` and `rest` (spec, status)
/// merged in.
fn checkpoint(metadata: Value, rest: Value) -> Checkpoint {
    let mut object = json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "Checkpoint",
        "metadata": {"name": "cp", "namespace": "ml", "uid": "u-1", "generation": 2, "resourceVersion": "7"},
        "spec": {"podName": "trainer-0"},
    });
    merge(&mut object["metadata"], metadata);
    merge(&mut object, rest);
    serde_json::from_value(object).unwrap()
}

/// With our finalizer, in `phase` (from `EARLIER`) unless `None`.
fn started(spec: Value, status: Option<Value>) -> Checkpoint {
    let mut rest = json!({"spec": spec});
    if let Some(status) = status {
        rest["status"] = status;
    }
    checkpoint(json!({"finalizers": ["kybernate.io/checkpoint"]}), rest)
}

/// A Running status as the Pending step writes it.
fn running_status() -> Value {
    json!({
        "phase": "Running", "observedGeneration": 2, "nodeName": "gpu-1", "startedAt": EARLIER,
        "conditions": [{
            "type": "Ready", "status": "False", "reason": "Checkpointing",
            "message": "checkpointing container app of pod ml/trainer-0 on node gpu-1",
            "lastTransitionTime": EARLIER, "observedGeneration": 2,
        }],
    })
}

/// Pod `ml/trainer-0` on `node` (unscheduled when `None`) with `containers`.
fn pod(node: Option<&str>, containers: &[&str]) -> Value {
    let containers: Vec<Value> = containers.iter().map(|c| json!({"name": c, "image": "trainer:1"})).collect();
    let mut spec = json!({"containers": containers});
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainer-0", "namespace": "ml"}, "spec": spec})
}

/// A controller context on a mocked API server, with `agents`.
fn context(agents: Arc<FakeAgents>) -> (Arc<Context>, Handle) {
    let (client, handle) = mock_client();
    (Arc::new(Context::new(client, agents).with_clock(now)), handle)
}

/// Reconciles `object` while the API server serves `expected`: the Action and each request's body.
async fn run(object: Checkpoint, agents: Arc<FakeAgents>, expected: Vec<Expect>) -> (Action, Vec<Value>) {
    let (ctx, handle) = context(agents);
    let server = serve(handle, expected);
    let action = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(object), ctx))
        .await
        .expect("the reconcile finishes")
        .expect("the reconcile succeeds");
    (action, served(server).await)
}

/// The body of a server-side apply of `status`.
fn applied(status: Value) -> Value {
    json!({"apiVersion": "kybernate.io/v1alpha1", "kind": "Checkpoint", "status": status})
}

/// Asserts an Event body: its type, reason, note, and that it regards `ml/cp`.
fn assert_event(event: &Value, type_: &str, reason: &str, note: &str) {
    assert_eq!(event["type"], type_, "{event}");
    assert_eq!(event["reason"], reason, "{event}");
    assert_eq!(event["note"], note, "{event}");
    assert_eq!(event["action"], "Checkpoint", "{event}");
    assert_eq!(event["reportingController"], "kybernate-operator", "{event}");
    assert_eq!(event["regarding"]["kind"], "Checkpoint", "{event}");
    assert_eq!(event["regarding"]["apiVersion"], "kybernate.io/v1alpha1", "{event}");
    assert_eq!(event["regarding"]["namespace"], "ml", "{event}");
    assert_eq!(event["regarding"]["name"], "cp", "{event}");
    assert_eq!(event["regarding"]["uid"], "u-1", "{event}");
}

/// A Failed status from Pending, for `reason`.
fn failed_from_pending(reason: &str, message: &str) -> Value {
    applied(json!({
        "phase": "Failed", "observedGeneration": 2, "message": message, "completedAt": NOW,
        "conditions": [{
            "type": "Ready", "status": "False", "reason": reason, "message": message,
            "lastTransitionTime": NOW, "observedGeneration": 2,
        }],
    }))
}

#[tokio::test]
async fn the_finalizer_is_added_first() {
    let object = checkpoint(json!({}), json!({}));
    let (action, bodies) =
        run(object.clone(), FakeAgents::answering([]), vec![Expect::json_patch(CHECKPOINT_PATH, &object)]).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        bodies,
        [json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["kybernate.io/checkpoint"]},
        ])]
    );
}

#[tokio::test]
async fn the_finalizer_joins_others() {
    let object = checkpoint(json!({"finalizers": ["example.com/keep"]}), json!({}));
    let (action, bodies) =
        run(object.clone(), FakeAgents::answering([]), vec![Expect::json_patch(CHECKPOINT_PATH, &object)]).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        bodies,
        [json!([
            {"op": "test", "path": "/metadata/finalizers", "value": ["example.com/keep"]},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "kybernate.io/checkpoint"},
        ])]
    );
}

#[tokio::test]
async fn pending_becomes_running_on_the_pods_node() {
    let agents = FakeAgents::answering([]);
    let object = started(json!({"podName": "trainer-0"}), None);
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::OK, pod(Some("gpu-1"), &["app"])),
        Expect::apply_status(STATUS_PATH, &object),
    ];
    let (action, bodies) = run(object, agents.clone(), expected).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(bodies[0], Value::Null);
    assert_eq!(
        bodies[1],
        applied(json!({
            "phase": "Running", "observedGeneration": 2, "nodeName": "gpu-1", "startedAt": NOW,
            "conditions": [{
                "type": "Ready", "status": "False", "reason": "Checkpointing",
                "message": "checkpointing container app of pod ml/trainer-0 on node gpu-1",
                "lastTransitionTime": NOW, "observedGeneration": 2,
            }],
        }))
    );
    assert!(agents.asked().is_empty(), "the agent is called in the next step");
}

#[tokio::test]
async fn a_missing_pod_fails() {
    let object = started(json!({"podName": "trainer-0"}), None);
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::NOT_FOUND, pod_not_found("trainer-0")),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, FakeAgents::answering([]), expected).await;
    assert_eq!(action, Action::await_change());
    let message = "pod ml/trainer-0 does not exist";
    assert_eq!(bodies[1], failed_from_pending("PodNotFound", message));
    assert_event(&bodies[2], "Warning", "PodNotFound", message);
}

#[tokio::test]
async fn an_unscheduled_pod_fails() {
    let object = started(json!({"podName": "trainer-0"}), None);
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::OK, pod(None, &["app"])),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, FakeAgents::answering([]), expected).await;
    assert_eq!(action, Action::await_change());
    let message = "pod ml/trainer-0 is not scheduled to a node";
    assert_eq!(bodies[1], failed_from_pending("PodNotScheduled", message));
    assert_event(&bodies[2], "Warning", "PodNotScheduled", message);
}

#[tokio::test]
async fn an_unknown_container_fails() {
    let object = started(json!({"podName": "trainer-0", "container": "sidecar"}), None);
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::OK, pod(Some("gpu-1"), &["app", "metrics"])),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, FakeAgents::answering([]), expected).await;
    assert_eq!(action, Action::await_change());
    let message = "pod ml/trainer-0 has no container sidecar (it has: app, metrics)";
    assert_eq!(bodies[1], failed_from_pending("ContainerNotFound", message));
    assert_event(&bodies[2], "Warning", "ContainerNotFound", message);
}

#[tokio::test]
async fn running_succeeds_with_the_stored_bundle() {
    let agents = FakeAgents::answering([Ok(CheckpointDone {
        bundle_path: "/var/lib/kybernate/checkpoints/ml/trainer-0/app/2025-01-02T03:04:00Z".into(),
        stored_reference: Some("s3://checkpoints/ml/trainer-0/app/2025-01-02T03:04:00Z".into()),
        bytes: 4096,
    })]);
    let object = started(json!({"podName": "trainer-0", "store": "s3://checkpoints"}), Some(running_status()));
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::OK, pod(Some("gpu-1"), &["app"])),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, agents.clone(), expected).await;
    assert_eq!(action, Action::await_change());
    let message = "checkpointed container app of pod ml/trainer-0";
    assert_eq!(
        bodies[1],
        applied(json!({
            "phase": "Succeeded", "observedGeneration": 2, "nodeName": "gpu-1",
            "bundles": [{"container": "app", "reference": "s3://checkpoints/ml/trainer-0/app/2025-01-02T03:04:00Z"}],
            "startedAt": EARLIER, "completedAt": NOW,
            "conditions": [
                {
                    "type": "Ready", "status": "True", "reason": "Checkpointed", "message": message,
                    "lastTransitionTime": NOW, "observedGeneration": 2,
                },
                {
                    "type": "Uploaded", "status": "True", "reason": "Stored", "message": "every bundle is in the store",
                    "lastTransitionTime": NOW, "observedGeneration": 2,
                },
            ],
        }))
    );
    assert_event(&bodies[2], "Normal", "Checkpointed", message);
    let request = CheckpointRequest {
        target: Some(Target::Pod(PodTarget {
            namespace: "ml".into(),
            name: "trainer-0".into(),
            container: "app".into(),
        })),
        leave_running: Some(true),
        store: "s3://checkpoints".into(),
    };
    assert_eq!(agents.asked(), [("gpu-1".to_string(), request)]);
}

#[tokio::test]
async fn running_checkpoints_only_the_containers_not_done_yet() {
    let agents = FakeAgents::answering([Ok(CheckpointDone {
        bundle_path: "/var/lib/kybernate/checkpoints/ml/trainer-0/metrics/t".into(),
        stored_reference: None,
        bytes: 1,
    })]);
    let mut status = running_status();
    status["bundles"] = json!([{"container": "app", "reference": "s3://checkpoints/ml/trainer-0/app/t"}]);
    let object = started(json!({"podName": "trainer-0"}), Some(status));
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::OK, pod(Some("gpu-1"), &["app", "metrics"])),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, agents.clone(), expected).await;
    assert_eq!(action, Action::await_change());
    let status = &bodies[1]["status"];
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(
        status["bundles"],
        json!([
            {"container": "app", "reference": "s3://checkpoints/ml/trainer-0/app/t"},
            {"container": "metrics", "reference": "/var/lib/kybernate/checkpoints/ml/trainer-0/metrics/t"},
        ])
    );
    assert_eq!(
        status["conditions"][1],
        json!({
            "type": "Uploaded", "status": "False", "reason": "NotStored",
            "message": "a bundle is on the node only (no store)", "lastTransitionTime": NOW, "observedGeneration": 2,
        })
    );
    assert_eq!(bodies[2]["note"], "checkpointed containers app, metrics of pod ml/trainer-0");
    let asked = agents.asked();
    assert_eq!(asked.len(), 1);
    assert!(matches!(&asked[0].1.target, Some(Target::Pod(p)) if p.container == "metrics"), "{asked:?}");
    assert_eq!(asked[0].1.store, "", "no store named: the agent's own");
}

#[tokio::test]
async fn an_agent_error_fails() {
    let agents = FakeAgents::answering([Err(AgentError::Failed {
        node: "gpu-1".into(),
        code: tonic::Code::Internal,
        message: "criu dump failed: task not found".into(),
    })]);
    let object = started(json!({"podName": "trainer-0"}), Some(running_status()));
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::OK, pod(Some("gpu-1"), &["app"])),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, agents, expected).await;
    assert_eq!(action, Action::await_change());
    let message = "checkpointing container app: the agent of node gpu-1 failed the request (Internal): \
                   criu dump failed: task not found";
    assert_eq!(
        bodies[1],
        applied(json!({
            "phase": "Failed", "observedGeneration": 2, "nodeName": "gpu-1", "message": message,
            "startedAt": EARLIER, "completedAt": NOW,
            "conditions": [{
                "type": "Ready", "status": "False", "reason": "AgentFailed", "message": message,
                // Still False: the transition was when it went Running.
                "lastTransitionTime": EARLIER, "observedGeneration": 2,
            }],
        }))
    );
    assert_event(&bodies[2], "Warning", "AgentFailed", message);
}

#[tokio::test]
async fn an_unreachable_agent_keeps_it_running_and_requeues_with_backoff() {
    let agents = FakeAgents::answering([Err(unreachable()), Err(unreachable())]);
    let object = started(json!({"podName": "trainer-0"}), Some(running_status()));
    let (ctx, handle) = context(agents.clone());
    let step = || {
        vec![
            Expect::get(POD_PATH, StatusCode::OK, pod(Some("gpu-1"), &["app"])),
            Expect::apply_status(STATUS_PATH, &object),
        ]
    };
    let server = serve(handle, step().into_iter().chain(step()).collect());
    let first = reconcile(Arc::new(object.clone()), ctx.clone()).await.unwrap();
    let second = reconcile(Arc::new(object.clone()), ctx.clone()).await.unwrap();
    let bodies = served(server).await;

    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(Duration::from_secs(10)), "the backoff doubles");
    let reason = "the agent of node gpu-1 at http://gpu-1:7443 is unreachable: connection refused";
    let expected = applied(json!({
        "phase": "Running", "observedGeneration": 2, "nodeName": "gpu-1", "message": format!("{reason}; retrying"),
        "startedAt": EARLIER,
        "conditions": [{
            "type": "Ready", "status": "False", "reason": "AgentUnreachable", "message": reason,
            "lastTransitionTime": EARLIER, "observedGeneration": 2,
        }],
    }));
    assert_eq!(bodies[1], expected);
    assert_eq!(bodies[3], expected);
    assert_eq!(agents.asked().len(), 2);
}

#[tokio::test]
async fn an_api_error_is_retried_by_the_error_policy() {
    let object = started(json!({"podName": "trainer-0"}), None);
    let (ctx, handle) = context(FakeAgents::answering([]));
    let server = serve(
        handle,
        vec![Expect::get(POD_PATH, StatusCode::INTERNAL_SERVER_ERROR, api_error(500, "InternalError", "etcd timeout"))],
    );
    let object = Arc::new(object);
    let err = reconcile(object.clone(), ctx.clone()).await.expect_err("the pod cannot be read");
    assert!(matches!(err, Error::GetPod { .. }), "{err:?}");
    assert!(err.to_string().starts_with("reading pod ml/trainer-0: "), "{err}");
    assert_eq!(error_policy(object.clone(), &err, ctx.clone()), Action::requeue(Duration::from_secs(5)));
    assert_eq!(error_policy(object, &err, ctx), Action::requeue(Duration::from_secs(10)));
    server.await.unwrap();
}

#[tokio::test]
async fn deletion_removes_the_finalizer_only() {
    let agents = FakeAgents::answering([]);
    let object = checkpoint(
        json!({"finalizers": ["example.com/keep", "kybernate.io/checkpoint"], "deletionTimestamp": NOW}),
        json!({"status": running_status()}),
    );
    let (action, bodies) =
        run(object.clone(), agents.clone(), vec![Expect::json_patch(CHECKPOINT_PATH, &object)]).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        bodies,
        [json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": "kybernate.io/checkpoint"},
            {"op": "remove", "path": "/metadata/finalizers/1"},
        ])]
    );
    assert!(agents.asked().is_empty());
}

#[tokio::test]
async fn finished_checkpoints_are_left_alone() {
    for phase in ["Succeeded", "Failed"] {
        let object = started(json!({"podName": "trainer-0"}), Some(json!({"phase": phase})));
        let (action, bodies) = run(object, FakeAgents::answering([]), vec![]).await;
        assert_eq!(action, Action::await_change(), "{phase}");
        assert!(bodies.is_empty(), "{phase}: no request");
    }
}
