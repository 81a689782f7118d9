//! The CheckpointPolicy controller against a mocked API server (`tower-test`) and fake agents and
//! stores: pods annotated, pods off Kybernate named, periodic Checkpoints created when due (once),
//! retention applied to the policy's Checkpoints, its store and the nodes, unreachable stores and
//! agents reported, and the exact requests, Events, status and Action of each reconcile.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{api_error, list, merge, serve, served, Expect, NOW};
use http::StatusCode;
use kube::runtime::controller::Action;
use kybernate_api::CheckpointPolicy;
use kybernate_operator::agents::{AgentError, Bundle, CheckpointDone, CheckpointRequest, ListRequest, NodeAgents};
use kybernate_operator::identity::{PodIdentity, PodMatch};
use kybernate_operator::policy_controller::{error_policy, reconcile, Context};
use kybernate_operator::retention::{BundleStores, StoredPodCheckpoint};
use serde_json::{json, Value};

const PODS_PATH: &str = "/api/v1/namespaces/ml/pods";
const CHECKPOINTS_PATH: &str = "/apis/kybernate.io/v1alpha1/namespaces/ml/checkpoints";
const STATUS_PATH: &str = "/apis/kybernate.io/v1alpha1/namespaces/ml/checkpointpolicies/nightly/status";
/// Forty and 28 minutes before [`NOW`].
const FORTY_AGO: &str = "2025-01-02T02:24:05Z";
const ALMOST_DUE: &str = "2025-01-02T02:36:05Z";
const STORE: &str = "s3://ckpt/ml";

/// Agents answering listings per `(node, pod)`, recording what they deleted.
#[derive(Default)]
struct FakeAgents {
    bundles: HashMap<(String, String), Vec<Bundle>>,
    unreachable: Vec<String>,
    deleted: Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl NodeAgents for FakeAgents {
    async fn checkpoint(&self, node: &str, _: CheckpointRequest) -> Result<CheckpointDone, AgentError> {
        panic!("the policy controller checkpointed on node {node} itself, not through a Checkpoint")
    }

    async fn list(&self, node: &str, request: ListRequest) -> Result<Vec<Bundle>, AgentError> {
        assert_eq!((request.namespace.as_str(), request.container.as_str()), ("ml", ""), "{request:?}");
        if self.unreachable.iter().any(|n| n == node) {
            return Err(AgentError::Unreachable {
                node: node.into(),
                address: format!("http://{node}:7443"),
                source: Box::new(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused")),
            });
        }
        Ok(self.bundles.get(&(node.to_string(), request.pod)).cloned().unwrap_or_default())
    }

    async fn delete(&self, node: &str, path: &str) -> Result<(), AgentError> {
        self.deleted.lock().unwrap().push((node.into(), path.into()));
        Ok(())
    }
}

/// Stores answering per pod name, recording the keys deleted.
#[derive(Default)]
struct FakeStores {
    checkpoints: HashMap<String, Result<Vec<StoredPodCheckpoint>, String>>,
    deleted: Mutex<Vec<(String, Vec<String>)>>,
}

#[async_trait]
impl BundleStores for FakeStores {
    async fn pod_checkpoints(&self, store: &str, identity: &PodIdentity) -> Result<Vec<StoredPodCheckpoint>, String> {
        assert_eq!((store, identity.namespace.as_str()), (STORE, "ml"));
        let PodMatch::Named(pod) = &identity.pods else { panic!("{identity:?} is a StatefulSet pod's identity") };
        self.checkpoints.get(pod).cloned().unwrap_or(Ok(Vec::new()))
    }

    async fn delete(&self, store: &str, keys: &[String]) -> Result<(), String> {
        self.deleted.lock().unwrap().push((store.into(), keys.to_vec()));
        Ok(())
    }
}

/// Policy `ml/nightly` selecting `app=web`, keeping 2, with `spec` and `status` merged in.
fn policy(spec: Value, status: Option<Value>) -> CheckpointPolicy {
    let mut object = json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "CheckpointPolicy",
        "metadata": {"name": "nightly", "namespace": "ml", "uid": "p-1", "generation": 3,
                     "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "retention": 2},
    });
    merge(&mut object["spec"], spec);
    if let Some(status) = status {
        object["status"] = status;
    }
    serde_json::from_value(object).unwrap()
}

/// Pod `name` of StatefulSet `web` labelled `app`, in `phase`, on `node`; on Kybernate and annotated
/// with the policy when asked.
fn pod(name: &str, app: &str, phase: &str, node: &str, kybernate: bool, annotated: bool) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}"), "labels": {"app": app},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web",
                                          "uid": "sts-1", "controller": true}]},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "web:1"}]},
        "status": {"phase": phase},
    });
    if kybernate {
        pod["spec"]["runtimeClassName"] = json!("kybernate");
    }
    if annotated {
        pod["metadata"]["annotations"] = json!({"kybernate.io/checkpoint-policy": "nightly"});
    }
    pod
}

/// web-0 (on Kybernate, annotated) and web-1 (not on Kybernate, not annotated), running; web-2
/// (ended) and db-0 (another app), which the policy does not count.
fn pods() -> Value {
    list(
        "v1",
        "PodList",
        vec![
            pod("web-0", "web", "Running", "gpu-1", true, true),
            pod("web-1", "web", "Running", "gpu-2", false, false),
            pod("web-2", "web", "Succeeded", "gpu-1", true, false),
            pod("db-0", "db", "Running", "gpu-1", true, false),
        ],
    )
}

fn bundle(node_pod: &str, time: &str) -> Bundle {
    Bundle {
        path: format!("/var/lib/kybernate/checkpoints/ml/{node_pod}/app/{time}"),
        namespace: "ml".into(),
        pod: node_pod.into(),
        container: "app".into(),
        time: time.into(),
        ..Bundle::default()
    }
}

fn stored(pod: &str, time: &str) -> StoredPodCheckpoint {
    StoredPodCheckpoint { pod: pod.into(), time: time.into(), keys: vec![format!("ml/{pod}/app/{time}.tar")] }
}

/// A Checkpoint of `pod` created at `created`, in `phase`, owned by `owner_uid`.
fn owned_checkpoint(name: &str, pod: &str, created: &str, phase: &str, owner_uid: &str) -> Value {
    json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "Checkpoint",
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": created,
                     "ownerReferences": [{"apiVersion": "kybernate.io/v1alpha1", "kind": "CheckpointPolicy",
                                          "name": "nightly", "uid": owner_uid, "controller": true}]},
        "spec": {"podName": pod},
        "status": {"phase": phase},
    })
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": NOW, "observedGeneration": 3})
}

const NOT_COVERED: &str = "pods web-1 do not run on Kybernate (runtimeClassName kybernate) and are neither \
                           checkpointed on stop nor periodically: re-create them so that the webhook puts them on it";
const KEPT: &str = "at most 2 pod checkpoints of each pod are kept";

fn applied(status: Value) -> Value {
    json!({"apiVersion": "kybernate.io/v1alpha1", "kind": "CheckpointPolicy", "status": status})
}

/// The annotation patch of web-1.
fn annotate_web_1() -> Expect {
    Expect::merge_patch(format!("{PODS_PATH}/web-1"), &pod("web-1", "web", "Running", "gpu-2", false, true))
}

/// Reconciles `object` with `agents` and `stores` while the API server serves `expected`.
async fn run(
    object: CheckpointPolicy,
    agents: Arc<FakeAgents>,
    stores: Arc<FakeStores>,
    expected: Vec<Expect>,
) -> (Action, Vec<Value>) {
    let (client, handle) = common::mock_client();
    let ctx = Arc::new(Context::new(client, agents, stores).with_clock(common::now));
    let server = serve(handle, expected);
    let action = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(object), ctx))
        .await
        .expect("the reconcile finishes")
        .expect("the reconcile succeeds");
    (action, served(server).await)
}

/// Asserts an Event body: its type, reason and note, and that it regards the policy `ml/nightly`.
fn assert_event(event: &Value, type_: &str, reason: &str, note: &str) {
    assert_eq!(event["type"], type_, "{event}");
    assert_eq!(event["reason"], reason, "{event}");
    assert_eq!(event["note"], note, "{event}");
    assert_eq!(event["action"], "Reconcile", "{event}");
    assert_eq!(event["reportingController"], "kybernate-operator", "{event}");
    let regarding = &event["regarding"];
    assert_eq!(regarding["kind"], "CheckpointPolicy", "{event}");
    assert_eq!(regarding["apiVersion"], "kybernate.io/v1alpha1", "{event}");
    assert_eq!(
        (&regarding["namespace"], &regarding["name"], &regarding["uid"]),
        (&json!("ml"), &json!("nightly"), &json!("p-1")),
        "{event}"
    );
}

#[tokio::test]
async fn pods_are_annotated_and_old_node_bundles_pruned() {
    let mut agents = FakeAgents::default();
    let times = ["2025-01-01T10:00:00.000Z", "2025-01-01T12:00:00.000Z", "2025-01-01T11:00:00.000Z"];
    agents.bundles.insert(("gpu-1".into(), "web-0".into()), times.iter().map(|t| bundle("web-0", t)).collect());
    let agents = Arc::new(agents);
    let object = policy(json!({}), None);
    let expected = vec![
        Expect::get(PODS_PATH, StatusCode::OK, pods()),
        annotate_web_1(),
        Expect::get(CHECKPOINTS_PATH, StatusCode::OK, list("kybernate.io/v1alpha1", "CheckpointList", vec![])),
        Expect::event(),
        Expect::apply_status(STATUS_PATH, &object),
    ];
    let (action, bodies) = run(object, agents.clone(), Arc::default(), expected).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(bodies[1], json!({"metadata": {"annotations": {"kybernate.io/checkpoint-policy": "nightly"}}}));
    assert_event(&bodies[3], "Normal", "Pruned", "deleted 1 pod checkpoint(s) beyond the newest 2");
    assert_eq!(
        bodies[4],
        applied(json!({
            "observedGeneration": 3, "matchedPods": 2,
            "conditions": [
                condition("Ready", "True", "Reconciled", "no periodic checkpoints"),
                condition("PodsCovered", "False", "NotOnKybernate", NOT_COVERED),
                condition("Retained", "True", "Pruned", KEPT),
            ],
        }))
    );
    assert_eq!(
        *agents.deleted.lock().unwrap(),
        [("gpu-1".to_string(), "/var/lib/kybernate/checkpoints/ml/web-0/app/2025-01-01T10:00:00.000Z".to_string())],
        "the oldest of three pod checkpoints goes, on the node that runs the pod"
    );
}

#[tokio::test]
async fn a_due_interval_creates_checkpoints_and_retention_reaches_checkpoints_and_the_store() {
    let agents = Arc::new(FakeAgents { unreachable: vec!["gpu-2".into()], ..FakeAgents::default() });
    let mut stores = FakeStores::default();
    let times = ["2025-01-01T09:00:00.000Z", "2025-01-01T08:00:00.000Z", "2025-01-01T10:00:00.000Z"];
    stores.checkpoints.insert("web-0".into(), Ok(times.iter().map(|t| stored("web-0", t)).collect()));
    stores.checkpoints.insert("web-1".into(), Err(format!("listing {STORE}: connection refused")));
    let stores = Arc::new(stores);
    let object = policy(json!({"interval": "30m", "store": STORE}), Some(json!({"lastCheckpoint": FORTY_AGO})));
    let checkpoints = list(
        "kybernate.io/v1alpha1",
        "CheckpointList",
        vec![
            owned_checkpoint("c0", "web-0", "2025-01-01T00:00:00Z", "Running", "p-1"),
            owned_checkpoint("c1", "web-0", "2025-01-01T01:00:00Z", "Succeeded", "p-1"),
            owned_checkpoint("c2", "web-0", "2025-01-01T02:00:00Z", "Failed", "p-1"),
            owned_checkpoint("c3", "web-0", "2025-01-01T03:00:00Z", "Succeeded", "p-1"),
            owned_checkpoint("theirs", "web-0", "2024-12-01T00:00:00Z", "Succeeded", "someone-else"),
        ],
    );
    let expected = vec![
        Expect::get(PODS_PATH, StatusCode::OK, pods()),
        annotate_web_1(),
        Expect::create(CHECKPOINTS_PATH, StatusCode::CREATED, Value::Null),
        Expect::event(),
        Expect::get(CHECKPOINTS_PATH, StatusCode::OK, checkpoints),
        Expect::delete(format!("{CHECKPOINTS_PATH}/c1")),
        Expect::event(),
        Expect::apply_status(STATUS_PATH, &object),
    ];
    let (action, bodies) = run(object, agents, stores.clone(), expected).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)), "the next one is due in 30 minutes: rescan first");
    assert_eq!(
        bodies[2],
        json!({
            "apiVersion": "kybernate.io/v1alpha1", "kind": "Checkpoint",
            "metadata": {
                "name": "nightly-web-0-1735786445", "namespace": "ml",
                "ownerReferences": [{"apiVersion": "kybernate.io/v1alpha1", "kind": "CheckpointPolicy",
                                     "name": "nightly", "uid": "p-1", "controller": true,
                                     "blockOwnerDeletion": true}],
            },
            "spec": {"podName": "web-0", "store": STORE},
        }),
        "only web-0 runs on Kybernate; the name carries the time it was due (30 min after the last)"
    );
    assert_event(&bodies[3], "Normal", "Scheduled", "created 1 Checkpoint(s), due at 2025-01-02T02:54:05+00:00");
    assert_event(&bodies[6], "Normal", "Pruned", "deleted 2 pod checkpoint(s) beyond the newest 2");
    let unreachable = format!(
        "listing {STORE}: connection refused; the agent of node gpu-2 at http://gpu-2:7443 is unreachable: connection refused"
    );
    assert_eq!(
        bodies[7],
        applied(json!({
            "observedGeneration": 3, "matchedPods": 2, "lastCheckpoint": NOW,
            "conditions": [
                condition("Ready", "True", "Reconciled", "checkpoints every 30m"),
                condition("PodsCovered", "False", "NotOnKybernate", NOT_COVERED),
                condition("Retained", "False", "Unreachable", &unreachable),
            ],
        }))
    );
    assert_eq!(
        *stores.deleted.lock().unwrap(),
        [(STORE.to_string(), vec!["ml/web-0/app/2025-01-01T08:00:00.000Z.tar".to_string()])],
        "the oldest of web-0's three pod checkpoints in the store"
    );
}

#[tokio::test]
async fn nothing_is_written_before_the_next_checkpoint_is_due() {
    let status = json!({
        "observedGeneration": 3, "matchedPods": 1, "lastCheckpoint": ALMOST_DUE,
        "conditions": [
            condition("Ready", "True", "Reconciled", "checkpoints every 30m"),
            condition("PodsCovered", "True", "OnKybernate", "every pod of the policy runs on Kybernate"),
            condition("Retained", "True", "Pruned", KEPT),
        ],
    });
    let object = policy(json!({"interval": "30m"}), Some(status));
    let only_web_0 = list("v1", "PodList", vec![pod("web-0", "web", "Running", "gpu-1", true, true)]);
    let expected = vec![
        Expect::get(PODS_PATH, StatusCode::OK, only_web_0),
        Expect::get(CHECKPOINTS_PATH, StatusCode::OK, list("kybernate.io/v1alpha1", "CheckpointList", vec![])),
    ];
    let (action, _) = run(object, Arc::default(), Arc::default(), expected).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(120)), "due 30 minutes after the last, 2 from now");
}

#[tokio::test]
async fn a_checkpoint_created_before_is_not_created_twice() {
    let object = policy(json!({"interval": "30m"}), Some(json!({"lastCheckpoint": FORTY_AGO})));
    let only_web_0 = list("v1", "PodList", vec![pod("web-0", "web", "Running", "gpu-1", true, true)]);
    let exists =
        api_error(409, "AlreadyExists", "checkpoints.kybernate.io \"nightly-web-0-1735786445\" already exists");
    let expected = vec![
        Expect::get(PODS_PATH, StatusCode::OK, only_web_0),
        Expect::create(CHECKPOINTS_PATH, StatusCode::CONFLICT, exists),
        Expect::get(CHECKPOINTS_PATH, StatusCode::OK, list("kybernate.io/v1alpha1", "CheckpointList", vec![])),
        Expect::apply_status(STATUS_PATH, &object),
    ];
    let (action, bodies) = run(object, Arc::default(), Arc::default(), expected).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(bodies[3]["status"]["lastCheckpoint"], NOW, "no Event, and the schedule moves on");
}

#[tokio::test]
async fn an_invalid_interval_is_reported_and_nothing_is_scheduled() {
    let object = policy(json!({"interval": "30"}), None);
    let only_web_0 = list("v1", "PodList", vec![pod("web-0", "web", "Running", "gpu-1", true, true)]);
    let expected = vec![
        Expect::get(PODS_PATH, StatusCode::OK, only_web_0),
        Expect::get(CHECKPOINTS_PATH, StatusCode::OK, list("kybernate.io/v1alpha1", "CheckpointList", vec![])),
        Expect::apply_status(STATUS_PATH, &object),
    ];
    let (action, bodies) = run(object, Arc::default(), Arc::default(), expected).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let why = "interval \"30\" ends in a number without a unit: write it like 30m, 1h30m or 1d (at least 1m)";
    assert_eq!(bodies[2]["status"]["conditions"][0], condition("Ready", "False", "InvalidInterval", why));
    assert_eq!(bodies[2]["status"].get("lastCheckpoint"), None);
}

#[tokio::test]
async fn an_api_error_is_retried_with_backoff() {
    let (client, handle) = common::mock_client();
    let ctx = Arc::new(
        Context::new(client, Arc::new(FakeAgents::default()), Arc::new(FakeStores::default())).with_clock(common::now),
    );
    let failure = api_error(500, "InternalError", "etcd is down");
    let server = serve(handle, vec![Expect::get(PODS_PATH, StatusCode::INTERNAL_SERVER_ERROR, failure)]);
    let object = Arc::new(policy(json!({}), None));
    let err = reconcile(object.clone(), ctx.clone()).await.expect_err("the pods cannot be listed");
    server.await.unwrap();
    assert!(err.to_string().starts_with("listing pods for CheckpointPolicy ml/nightly: "), "{err}");
    assert!(err.to_string().contains("etcd is down"), "{err}");
    assert_eq!(error_policy(object.clone(), &err, ctx.clone()), Action::requeue(Duration::from_secs(5)));
    assert_eq!(error_policy(object, &err, ctx), Action::requeue(Duration::from_secs(10)));
}
