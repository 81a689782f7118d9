//! The admission webhook as the API server drives it: an AdmissionReview of a pod CREATE in, the
//! AdmissionReview with its JSON patch out, the patch applied to the pod, for each case: no policy,
//! a policy and no pod checkpoint, a pod checkpoint to resume from, a store that cannot be asked, a
//! pod asking for another runtime class, a pod that names its own restore.

use std::cell::RefCell;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::AdmissionReview;
use kybernate_api::CheckpointPolicy;
use kybernate_operator::admission::review;
use kybernate_operator::identity::{PodCheckpointIndex, PodIdentity, PodMatch};
use serde_json::{json, Value};

/// A store index with what a test puts in it, recording what it was asked.
#[derive(Default)]
struct Index {
    answer: Option<Result<Option<String>, String>>,
    asked: RefCell<Vec<(String, PodIdentity)>>,
}

impl PodCheckpointIndex for Index {
    fn newest(&self, store: &str, identity: &PodIdentity) -> Result<Option<String>, String> {
        self.asked.borrow_mut().push((store.to_string(), identity.clone()));
        self.answer.clone().unwrap_or(Ok(None))
    }
}

fn policy() -> CheckpointPolicy {
    serde_json::from_value(json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "CheckpointPolicy",
        "metadata": {"name": "trainers", "namespace": "ml"},
        "spec": {"selector": {"matchLabels": {"app": "trainer"}}, "store": "s3://checkpoints/cluster-a"}
    }))
    .unwrap()
}

/// A StatefulSet's pod `web-0` with `labels`, and `extra` merged into its spec and metadata.
fn pod(labels: Value, spec: Value, annotations: Option<Value>) -> Value {
    let mut metadata = json!({
        "name": "web-0", "namespace": "ml", "labels": labels,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "u1", "controller": true}]
    });
    if let Some(a) = annotations {
        metadata["annotations"] = a;
    }
    let mut spec_all = json!({"containers": [{"name": "trainer", "image": "python:3"}]});
    for (k, v) in spec.as_object().unwrap() {
        spec_all[k] = v.clone();
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec_all})
}

/// The AdmissionReview the API server sends for a CREATE of `pod`.
fn request(pod: &Value) -> AdmissionReview<Pod> {
    serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web-0", "namespace": "ml", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:statefulset-controller"},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    }))
    .unwrap()
}

/// The webhook's answer to a CREATE of `pod`: the response JSON and the pod with the patch applied.
fn admit(pod: &Value, index: &Index) -> (Value, Value) {
    let review_in = request(pod);
    let req = review_in.request.as_ref().unwrap();
    let out = serde_json::to_value(review(req, &[policy()], index)).unwrap();
    let response = out["response"].clone();
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true, "the webhook never blocks a pod: {response}");
    let mut patched = pod.clone();
    // the patch's bytes: kube-core 1.1 writes them as a JSON array of numbers, Go as base64
    let bytes: Option<Vec<u8>> = match &response["patch"] {
        Value::String(b64) => Some(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()),
        Value::Array(items) => Some(items.iter().map(|b| b.as_u64().unwrap() as u8).collect()),
        _ => None,
    };
    if let Some(bytes) = bytes {
        assert_eq!(response["patchType"], "JSONPatch");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut patched, &patch).unwrap();
    }
    (response, patched)
}

#[test]
fn a_pod_no_policy_selects_is_admitted_unchanged() {
    let index = Index::default();
    let pod = pod(json!({"app": "web"}), json!({}), None);
    let (response, patched) = admit(&pod, &index);
    assert!(response.get("patch").is_none_or(Value::is_null), "{response}");
    assert_eq!(patched, pod);
    assert!(index.asked.borrow().is_empty(), "the store is not asked for pods no policy selects");
}

#[test]
fn a_selected_pod_runs_on_kybernate_and_checkpoints_on_stop_and_starts_fresh_without_a_checkpoint() {
    let index = Index::default();
    let (_, patched) = admit(&pod(json!({"app": "trainer"}), json!({}), None), &index);
    assert_eq!(patched["spec"]["runtimeClassName"], "kybernate");
    assert_eq!(patched["metadata"]["annotations"], json!({"kybernate.io/checkpoint-on-stop": "true"}));
    let asked = index.asked.borrow();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].0, "s3://checkpoints/cluster-a");
    assert_eq!(asked[0].1, PodIdentity { namespace: "ml".into(), pods: PodMatch::Named("web-0".into()) });
}

#[test]
fn a_recreated_pod_resumes_from_its_newest_pod_checkpoint_with_fallback_fresh() {
    let reference = "s3://checkpoints/cluster-a/ml/web-0#2026-12-01T10:00:00.000Z";
    let index = Index { answer: Some(Ok(Some(reference.into()))), ..Default::default() };
    // annotations the user set stay
    let (_, patched) = admit(&pod(json!({"app": "trainer"}), json!({}), Some(json!({"team": "a"}))), &index);
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({
            "team": "a",
            "kybernate.io/checkpoint-on-stop": "true",
            "kybernate.io/restore-from": reference,
            "kybernate.io/restore-policy": "fallback-fresh"
        })
    );
}

#[test]
fn a_store_that_cannot_be_asked_drops_the_restore_not_the_pod() {
    let index = Index { answer: Some(Err("connection refused".into())), ..Default::default() };
    let (response, patched) = admit(&pod(json!({"app": "trainer"}), json!({}), None), &index);
    assert_eq!(patched["spec"]["runtimeClassName"], "kybernate");
    assert!(patched["metadata"]["annotations"].get("kybernate.io/restore-from").is_none());
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(warning.contains("could not be asked") && warning.contains("connection refused"), "{warning}");
}

#[test]
fn a_pod_asking_for_another_runtime_or_its_own_restore_keeps_its_choice() {
    let index = Index { answer: Some(Ok(Some("s3://checkpoints/cluster-a/ml/web-0".into()))), ..Default::default() };
    let (response, patched) =
        admit(&pod(json!({"app": "trainer"}), json!({"runtimeClassName": "gvisor"}), None), &index);
    assert_eq!(patched["spec"]["runtimeClassName"], "gvisor");
    assert!(response["warnings"][0].as_str().unwrap().contains("runtimeClassName gvisor"), "{response}");
    let own = json!({"kybernate.io/restore-from": "s3://checkpoints/cluster-a/ml/web-0#2026-11-30T00:00:00Z"});
    let (_, patched) = admit(&pod(json!({"app": "trainer"}), json!({}), Some(own.clone())), &index);
    assert_eq!(patched["metadata"]["annotations"]["kybernate.io/restore-from"], own["kybernate.io/restore-from"]);
    assert!(patched["metadata"]["annotations"].get("kybernate.io/restore-policy").is_none());
}
