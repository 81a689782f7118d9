//! The Restore controller against a mocked API server (`tower-test`, as kube-rs documents it): for
//! each step (Pending → Running with the pod created or adopted, Running → Succeeded, waiting) and each
//! failure (invalid policy, reference or template, another runtime class, someone else's pod, the
//! restore refused, the pod failed or deleted, an API error), the exact requests sent (method, path,
//! query, content type, body: the created pod's whole JSON), the Event, and the Action returned.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use kube::runtime::controller::Action;
use kybernate_api::Restore;
use kybernate_operator::restore_controller::{
    check_policy, check_reference, error_policy, reconcile, Context, Error, POLICIES,
};
use serde_json::{json, Value};

mod common;

use common::{api_error, merge, mock_client, now, pod_not_found, serve, served, Expect, Handle, EARLIER, NOW};

const STATUS_PATH: &str = "/apis/kybernate.io/v1alpha1/namespaces/ml/restores/rs/status";
const PODS_PATH: &str = "/api/v1/namespaces/ml/pods";
const POD_PATH: &str = "/api/v1/namespaces/ml/pods/rs";
/// The pod checkpoint the tests restore from.
const FROM: &str = "s3://checkpoints/ml/trainer-0#2025-01-01T00:00:00Z";

/// The Restore `ml/rs` (uid `u-1`, generation 2) of [`FROM`], its template's pod labelled
/// `app: trainer` with one container `app`; `spec` merged into its spec, with `status` unless `None`.
fn restore(spec: Value, status: Option<Value>) -> Restore {
    let mut object = json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "Restore",
        "metadata": {"name": "rs", "namespace": "ml", "uid": "u-1", "generation": 2, "resourceVersion": "7"},
        "spec": {
            "from": FROM,
            "template": {
                "metadata": {
                    "labels": {"app": "trainer"},
                    // The second is replaced by the Restore's own.
                    "annotations": {"example.com/team": "vision", "kybernate.io/restore-from": "/somewhere/else"},
                },
                "spec": {"containers": [{"name": "app", "image": "trainer:1"}]},
            },
        },
    });
    merge(&mut object["spec"], spec);
    if let Some(status) = status {
        object["status"] = status;
    }
    serde_json::from_value(object).unwrap()
}

/// A Running status as the Pending step writes it (at `EARLIER`).
fn running_status() -> Value {
    json!({
        "phase": "Running", "observedGeneration": 2, "podName": "rs",
        "conditions": [{
            "type": "Ready", "status": "False", "reason": "PodCreated",
            "message": format!("created pod ml/rs, restoring from {FROM}"),
            "lastTransitionTime": EARLIER, "observedGeneration": 2,
        }],
    })
}

/// The Restore in its Running step.
fn running() -> Restore {
    restore(json!({}), Some(running_status()))
}

/// The owner reference of a pod the Restore controls.
fn owner() -> Value {
    json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "Restore", "name": "rs", "uid": "u-1",
        "controller": true, "blockOwnerDeletion": true,
    })
}

/// Pod `ml/rs`, controlled by the Restore, with `containers` and `status`.
fn pod(containers: &[&str], status: Value) -> Value {
    let containers: Vec<Value> = containers.iter().map(|c| json!({"name": c, "image": "trainer:1"})).collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "rs", "namespace": "ml", "uid": "p-1", "ownerReferences": [owner()]},
        "spec": {"containers": containers, "runtimeClassName": "kybernate"},
        "status": status,
    })
}

/// A container's status in `state` (and `last`, its previous state, unless null).
fn container(name: &str, state: Value, last: Value) -> Value {
    let mut status = json!({
        "name": name, "image": "trainer:1", "imageID": "", "ready": state.get("running").is_some(),
        "restartCount": if last.is_null() { 0 } else { 1 }, "state": state,
    });
    if !last.is_null() {
        status["lastState"] = last;
    }
    status
}

fn running_state() -> Value {
    json!({"running": {"startedAt": NOW}})
}

fn waiting_state(reason: &str, message: &str) -> Value {
    json!({"waiting": {"reason": reason, "message": message}})
}

fn terminated_state(code: i32, reason: &str) -> Value {
    json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": NOW, "finishedAt": NOW}})
}

/// A controller context on a mocked API server.
fn context() -> (Arc<Context>, Handle) {
    let (client, handle) = mock_client();
    (Arc::new(Context::new(client).with_clock(now)), handle)
}

/// Reconciles `object` while the API server serves `expected`: the Action and each request's body.
async fn run(object: Restore, expected: Vec<Expect>) -> (Action, Vec<Value>) {
    let (ctx, handle) = context();
    let server = serve(handle, expected);
    let action = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(object), ctx))
        .await
        .expect("the reconcile finishes")
        .expect("the reconcile succeeds");
    (action, served(server).await)
}

/// Reconciles `object` while the API server serves `expected`, expecting an error: the error, and the
/// error policy's first two delays.
async fn run_failing(object: Restore, expected: Vec<Expect>) -> (Error, [Action; 2]) {
    let (ctx, handle) = context();
    let server = serve(handle, expected);
    let object = Arc::new(object);
    let err = reconcile(object.clone(), ctx.clone()).await.expect_err("the reconcile fails");
    let delays = [error_policy(object.clone(), &err, ctx.clone()), error_policy(object, &err, ctx)];
    served(server).await;
    (err, delays)
}

/// The body of a server-side apply of `status`.
fn applied(status: Value) -> Value {
    json!({"apiVersion": "kybernate.io/v1alpha1", "kind": "Restore", "status": status})
}

/// Asserts an Event body: its type, reason, note, and that it regards `ml/rs`.
fn assert_event(event: &Value, type_: &str, reason: &str, note: &str) {
    assert_eq!(event["type"], type_, "{event}");
    assert_eq!(event["reason"], reason, "{event}");
    assert_eq!(event["note"], note, "{event}");
    assert_eq!(event["action"], "Restore", "{event}");
    assert_eq!(event["reportingController"], "kybernate-operator", "{event}");
    assert_eq!(event["regarding"]["kind"], "Restore", "{event}");
    assert_eq!(event["regarding"]["apiVersion"], "kybernate.io/v1alpha1", "{event}");
    assert_eq!(event["regarding"]["namespace"], "ml", "{event}");
    assert_eq!(event["regarding"]["name"], "rs", "{event}");
    assert_eq!(event["regarding"]["uid"], "u-1", "{event}");
}

/// A Failed status from Pending (no pod), for `reason`.
fn failed_from_pending(reason: &str, message: &str) -> Value {
    applied(json!({
        "phase": "Failed", "observedGeneration": 2, "message": message,
        "conditions": [{
            "type": "Ready", "status": "False", "reason": reason, "message": message,
            "lastTransitionTime": NOW, "observedGeneration": 2,
        }],
    }))
}

/// A Failed status from Running (pod `rs`), for `reason`: `Ready` still False since `EARLIER`.
fn failed_from_running(reason: &str, message: &str) -> Value {
    applied(json!({
        "phase": "Failed", "observedGeneration": 2, "podName": "rs", "message": message,
        "conditions": [{
            "type": "Ready", "status": "False", "reason": reason, "message": message,
            "lastTransitionTime": EARLIER, "observedGeneration": 2,
        }],
    }))
}

/// A Succeeded status from Running, for `reason`: `Ready` True from `NOW`.
fn succeeded(reason: &str, message: &str) -> Value {
    applied(json!({
        "phase": "Succeeded", "observedGeneration": 2, "podName": "rs",
        "conditions": [{
            "type": "Ready", "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": NOW, "observedGeneration": 2,
        }],
    }))
}

/// Pending: the requests that fail it for `reason` (a status and an Event), and nothing else.
async fn assert_fails_pending(object: Restore, reason: &str, message: &str) {
    let expected = vec![Expect::apply_status(STATUS_PATH, &object), Expect::event()];
    let (action, bodies) = run(object, expected).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(bodies[0], failed_from_pending(reason, message));
    assert_event(&bodies[1], "Warning", reason, message);
}

/// Running: reads the pod (answered with `status` and `pod`), then fails it for `reason`.
async fn assert_fails_running(status: StatusCode, pod: Value, reason: &str, message: &str) {
    let object = running();
    let expected =
        vec![Expect::get(POD_PATH, status, pod), Expect::apply_status(STATUS_PATH, &object), Expect::event()];
    let (action, bodies) = run(object, expected).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(bodies[0], Value::Null);
    assert_eq!(bodies[1], failed_from_running(reason, message), "{reason}");
    assert_event(&bodies[2], "Warning", reason, message);
}

#[tokio::test]
async fn pending_creates_the_pod_and_goes_running() {
    let object = restore(json!({}), None);
    let expected = vec![
        Expect::create(PODS_PATH, StatusCode::CREATED, Value::Null),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, expected).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(
        bodies[0],
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "rs", "namespace": "ml",
                "labels": {"app": "trainer"},
                "annotations": {
                    "example.com/team": "vision",
                    "kybernate.io/restore-from": FROM,
                    "kybernate.io/restore-policy": "fail",
                },
                "ownerReferences": [owner()],
            },
            "spec": {"containers": [{"name": "app", "image": "trainer:1"}], "runtimeClassName": "kybernate"},
        })
    );
    let message = format!("created pod ml/rs, restoring from {FROM}");
    assert_eq!(
        bodies[1],
        applied(json!({
            "phase": "Running", "observedGeneration": 2, "podName": "rs",
            "conditions": [{
                "type": "Ready", "status": "False", "reason": "PodCreated", "message": message,
                "lastTransitionTime": NOW, "observedGeneration": 2,
            }],
        }))
    );
    assert_event(&bodies[2], "Normal", "PodCreated", &message);
}

#[tokio::test]
async fn the_template_names_the_pod_and_the_policy_is_passed_on() {
    let object = restore(
        json!({
            "restorePolicy": "allow-partial",
            "template": {"metadata": {"name": "trainer-restored"}, "spec": {"runtimeClassName": "kybernate"}},
        }),
        None,
    );
    let expected = vec![
        Expect::create(PODS_PATH, StatusCode::CREATED, Value::Null),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, expected).await;
    assert_eq!(action, Action::await_change());
    let created = &bodies[0];
    assert_eq!(created["metadata"]["name"], "trainer-restored");
    assert_eq!(created["metadata"]["annotations"]["kybernate.io/restore-policy"], "allow-partial");
    assert_eq!(created["spec"]["runtimeClassName"], "kybernate");
    assert_eq!(bodies[1]["status"]["podName"], "trainer-restored");
    assert_eq!(bodies[2]["note"], format!("created pod ml/trainer-restored, restoring from {FROM}"));
}

#[tokio::test]
async fn an_invalid_policy_fails() {
    let object = restore(json!({"restorePolicy": "retry"}), None);
    let message = "spec.restorePolicy \"retry\" is not a restore policy: use \"fail\" (the default), \
                   \"fallback-fresh\" or \"allow-partial\"";
    assert_fails_pending(object, "InvalidPolicy", message).await;
}

#[tokio::test]
async fn an_invalid_reference_fails() {
    let object = restore(json!({"from": "checkpoints/trainer-0"}), None);
    let message = "spec.from \"checkpoints/trainer-0\" is not a reference to restore from: use s3://bucket/key, \
                   file:///path or an absolute path";
    assert_fails_pending(object, "InvalidReference", message).await;

    let object = restore(json!({"from": ""}), None);
    let message = "spec.from is empty: name the bundle or pod checkpoint to restore, as s3://bucket/key, \
                   file:///path or an absolute path";
    assert_fails_pending(object, "InvalidReference", message).await;
}

#[test]
fn references_and_policies_are_checked_by_their_form() {
    for good in [
        "s3://checkpoints/ml/trainer-0",
        "s3://checkpoints/ml/trainer-0#2025-01-01T00:00:00Z",
        "s3://b/k",
        "file:///var/lib/kybernate/store/ml/trainer-0/app/t",
        "/var/lib/kybernate/checkpoints/ml/trainer-0/app/t",
    ] {
        assert_eq!(check_reference(good), Ok(()), "{good}");
    }
    for bad in ["", "/", "s3://", "s3://bucket", "s3://bucket/", "s3:///key", "file://", "file:///", "file://relative"]
    {
        assert!(check_reference(bad).is_err(), "{bad:?}");
    }
    for bad in ["relative/path", "http://example.com/bundle", "gs://bucket/key", " /leading-space"] {
        assert!(check_reference(bad).unwrap_err().contains(&format!("{bad:?}")), "{bad:?}");
    }
    assert_eq!(check_policy(None), Ok("fail"));
    for policy in POLICIES {
        assert_eq!(check_policy(Some(policy)), Ok(policy));
    }
    assert!(check_policy(Some("Fail")).is_err(), "policies are case-sensitive, as the shim reads them");
    assert!(check_policy(Some("")).is_err());
}

#[tokio::test]
async fn another_runtime_class_fails() {
    let object = restore(json!({"template": {"spec": {"runtimeClassName": "gvisor"}}}), None);
    let message = "spec.template asks for runtimeClassName gvisor, but a restored pod runs on kybernate: leave \
                   runtimeClassName out of the template or set it to kybernate";
    assert_fails_pending(object, "WrongRuntimeClass", message).await;
}

#[tokio::test]
async fn an_existing_pod_of_ours_is_adopted() {
    let object = restore(json!({}), None);
    let expected = vec![
        Expect::create(PODS_PATH, StatusCode::CONFLICT, api_error(409, "AlreadyExists", "pods \"rs\" already exists")),
        Expect::get(POD_PATH, StatusCode::OK, pod(&["app"], json!({"phase": "Pending"}))),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, expected).await;
    assert_eq!(action, Action::await_change());
    assert_eq!(bodies[0]["metadata"]["name"], "rs", "the same pod as a first try creates");
    let message = format!("adopted pod ml/rs, which this Restore created before; restoring from {FROM}");
    assert_eq!(
        bodies[2],
        applied(json!({
            "phase": "Running", "observedGeneration": 2, "podName": "rs",
            "conditions": [{
                "type": "Ready", "status": "False", "reason": "PodCreated", "message": message,
                "lastTransitionTime": NOW, "observedGeneration": 2,
            }],
        }))
    );
    assert_event(&bodies[3], "Normal", "PodCreated", &message);
}

#[tokio::test]
async fn an_existing_pod_of_someone_else_fails() {
    let object = restore(json!({}), None);
    let mut theirs = pod(&["app"], json!({"phase": "Running"}));
    theirs["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u-9", "controller": true,
    }]);
    let expected = vec![
        Expect::create(PODS_PATH, StatusCode::CONFLICT, api_error(409, "AlreadyExists", "pods \"rs\" already exists")),
        Expect::get(POD_PATH, StatusCode::OK, theirs),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, expected).await;
    assert_eq!(action, Action::await_change());
    let message = "pod ml/rs exists and this Restore does not control it: delete it, or name another pod in \
                   spec.template.metadata.name";
    assert_eq!(bodies[2], failed_from_pending("PodExists", message));
    assert_event(&bodies[3], "Warning", "PodExists", message);
}

#[tokio::test]
async fn a_pod_gone_between_create_and_read_is_retried() {
    let expected = vec![
        Expect::create(PODS_PATH, StatusCode::CONFLICT, api_error(409, "AlreadyExists", "pods \"rs\" already exists")),
        Expect::get(POD_PATH, StatusCode::NOT_FOUND, pod_not_found("rs")),
    ];
    let (err, delays) = run_failing(restore(json!({}), None), expected).await;
    assert!(matches!(err, Error::PodVanished { .. }), "{err:?}");
    assert_eq!(delays, [Action::requeue(Duration::from_secs(5)), Action::requeue(Duration::from_secs(10))]);
}

#[tokio::test]
async fn an_invalid_template_fails() {
    let object = restore(json!({}), None);
    let refusal = "Pod \"rs\" is invalid: spec.containers[0].image: Required value";
    let expected = vec![
        Expect::create(PODS_PATH, StatusCode::UNPROCESSABLE_ENTITY, api_error(422, "Invalid", refusal)),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, expected).await;
    assert_eq!(action, Action::await_change());
    let message = format!("the API server refused pod ml/rs: {refusal}");
    assert_eq!(bodies[1], failed_from_pending("InvalidTemplate", &message));
    assert_event(&bodies[2], "Warning", "InvalidTemplate", &message);
}

#[tokio::test]
async fn running_succeeds_once_every_container_runs() {
    let object = running();
    let status = json!({
        "phase": "Running",
        "containerStatuses": [
            container("app", running_state(), Value::Null),
            container("done", terminated_state(0, "Completed"), Value::Null),
        ],
    });
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::OK, pod(&["app", "done"], status)),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, expected).await;
    assert_eq!(action, Action::await_change());
    let message = format!("pod ml/rs is running, restored from {FROM}");
    assert_eq!(bodies[1], succeeded("Restored", &message));
    assert_event(&bodies[2], "Normal", "Restored", &message);
}

#[tokio::test]
async fn with_fallback_fresh_success_says_it_may_have_started_fresh() {
    let object = restore(json!({"restorePolicy": "fallback-fresh"}), Some(running_status()));
    let running = json!({"phase": "Running", "containerStatuses": [container("app", running_state(), Value::Null)]});
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::OK, pod(&["app"], running)),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (_, bodies) = run(object, expected).await;
    let message = format!(
        "pod ml/rs is running, restored from {FROM} (or started fresh, as fallback-fresh allows: the shim's log says \
         which)"
    );
    assert_eq!(bodies[1], succeeded("Restored", &message));
    assert_event(&bodies[2], "Normal", "Restored", &message);
}

#[tokio::test]
async fn a_completed_pod_succeeds() {
    let object = running();
    let status = json!({
        "phase": "Succeeded",
        "containerStatuses": [container("app", terminated_state(0, "Completed"), Value::Null)],
    });
    let expected = vec![
        Expect::get(POD_PATH, StatusCode::OK, pod(&["app"], status)),
        Expect::apply_status(STATUS_PATH, &object),
        Expect::event(),
    ];
    let (action, bodies) = run(object, expected).await;
    assert_eq!(action, Action::await_change());
    let message = format!("pod ml/rs ran to completion, restored from {FROM}");
    assert_eq!(bodies[1], succeeded("Completed", &message));
    assert_event(&bodies[2], "Normal", "Completed", &message);
}

#[tokio::test]
async fn a_pod_not_up_yet_is_read_again_without_a_write() {
    let cases = [
        ("scheduling", json!({"phase": "Pending"})),
        (
            "creating the container",
            json!({"phase": "Pending", "containerStatuses": [
                container("app", waiting_state("ContainerCreating", ""), Value::Null),
                container("metrics", waiting_state("ContainerCreating", ""), Value::Null),
            ]}),
        ),
        (
            "pulling an image",
            json!({"phase": "Pending", "containerStatuses": [
                container("app", running_state(), Value::Null),
                container("metrics", waiting_state("ImagePullBackOff", "Back-off pulling image"), Value::Null),
            ]}),
        ),
        (
            "one container of two running",
            json!({"phase": "Running", "containerStatuses": [
                container("app", running_state(), Value::Null),
                container("metrics", waiting_state("ContainerCreating", ""), Value::Null),
            ]}),
        ),
        (
            "one container of two reported",
            json!({"phase": "Running", "containerStatuses": [container("app", running_state(), Value::Null)]}),
        ),
    ];
    for (case, status) in cases {
        let expected = vec![Expect::get(POD_PATH, StatusCode::OK, pod(&["app", "metrics"], status))];
        let (action, bodies) = run(running(), expected).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(10)), "{case}");
        assert_eq!(bodies, [Value::Null], "{case}: only the pod is read");
    }
}

#[tokio::test]
async fn a_refused_restore_fails_with_the_shims_error() {
    let refusal = "failed to create containerd container: kybernate: restoring container app from \
                   s3://checkpoints/ml/trainer-0: the bundle is signed by node-x, which this node does not trust";
    let status = json!({
        "phase": "Pending",
        "containerStatuses": [container("app", waiting_state("CreateContainerError", refusal), Value::Null)],
    });
    let message = format!("container app of pod ml/rs could not be restored (CreateContainerError): {refusal}");
    assert_fails_running(StatusCode::OK, pod(&["app"], status), "RestoreRefused", &message).await;
}

#[tokio::test]
async fn a_failed_pod_fails() {
    let cases = [
        (
            json!({"phase": "Failed", "containerStatuses": [container("app", json!({"terminated": {
                "exitCode": 1, "reason": "Error", "message": "Traceback: CUDA error", "startedAt": NOW, "finishedAt": NOW,
            }}), Value::Null)]}),
            "container app of pod ml/rs terminated with exit code 1 (Error): Traceback: CUDA error",
        ),
        (
            json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}),
            "pod ml/rs failed (Evicted): The node was low on resource: memory.",
        ),
        (
            // Exited before the pod was ever up: the kubelet restarts it, the Restore has failed.
            json!({"phase": "Running", "containerStatuses": [container(
                "app",
                waiting_state("CrashLoopBackOff", "back-off 10s restarting failed container"),
                terminated_state(137, "OOMKilled"),
            )]}),
            "container app of pod ml/rs terminated with exit code 137 (OOMKilled)",
        ),
        (
            json!({"phase": "Running", "containerStatuses": [container("app", terminated_state(2, "Error"), Value::Null)]}),
            "container app of pod ml/rs terminated with exit code 2 (Error)",
        ),
    ];
    for (status, message) in cases {
        assert_fails_running(StatusCode::OK, pod(&["app"], status), "PodFailed", message).await;
    }
}

#[tokio::test]
async fn a_deleted_pod_fails() {
    let message = "pod ml/rs was deleted before its containers were running: delete and re-create this Restore to \
                   try again";
    assert_fails_running(StatusCode::NOT_FOUND, pod_not_found("rs"), "PodDeleted", message).await;

    let mut replaced = pod(&["app"], json!({"phase": "Running"}));
    replaced["metadata"]["ownerReferences"] = json!([]);
    let message = "pod ml/rs was deleted before its containers were running, and replaced by one this Restore does \
                   not control";
    assert_fails_running(StatusCode::OK, replaced, "PodDeleted", message).await;
}

#[tokio::test]
async fn finished_restores_are_left_alone() {
    for phase in ["Succeeded", "Failed"] {
        let object = restore(json!({}), Some(json!({"phase": phase, "podName": "rs"})));
        let (action, bodies) = run(object, vec![]).await;
        assert_eq!(action, Action::await_change(), "{phase}");
        assert!(bodies.is_empty(), "{phase}: no request");
    }
}

#[tokio::test]
async fn an_api_error_is_retried_by_the_error_policy() {
    let etcd = || api_error(500, "InternalError", "etcd timeout");
    let expected = vec![Expect::create(PODS_PATH, StatusCode::INTERNAL_SERVER_ERROR, etcd())];
    let (err, delays) = run_failing(restore(json!({}), None), expected).await;
    assert!(matches!(err, Error::CreatePod { .. }), "{err:?}");
    assert!(err.to_string().starts_with("creating pod ml/rs: "), "{err}");
    assert_eq!(delays, [Action::requeue(Duration::from_secs(5)), Action::requeue(Duration::from_secs(10))]);

    let expected = vec![Expect::get(POD_PATH, StatusCode::INTERNAL_SERVER_ERROR, etcd())];
    let (err, delays) = run_failing(running(), expected).await;
    assert!(matches!(err, Error::GetPod { .. }), "{err:?}");
    assert!(err.to_string().starts_with("reading pod ml/rs: "), "{err}");
    assert_eq!(delays, [Action::requeue(Duration::from_secs(5)), Action::requeue(Duration::from_secs(10))]);
}
