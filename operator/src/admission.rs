//! The mutating admission webhook's answer for a pod CREATE: which policy selects the pod, and the
//! JSON patch that puts it on Kybernate and, when its store holds a pod checkpoint of the same pod
//! identity, resumes it from there. The webhook is registered with `failurePolicy: Ignore`, and this
//! answer itself always admits the pod: a store that cannot be asked only drops the restore (with a
//! warning), never the pod.

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::DynamicObject;
use kybernate_api::CheckpointPolicy;
use serde_json::{json, Value};

use crate::identity::{identity, PodCheckpointIndex};
use crate::selector;

/// The RuntimeClass (and CRI handler) of Kybernate.
pub const RUNTIME_CLASS: &str = "kybernate";
/// The pod annotations the webhook sets (the shim's names).
pub const CHECKPOINT_ON_STOP: &str = "kybernate.io/checkpoint-on-stop";
/// See [`CHECKPOINT_ON_STOP`].
pub const RESTORE_FROM: &str = "kybernate.io/restore-from";
/// See [`CHECKPOINT_ON_STOP`].
pub const RESTORE_POLICY: &str = "kybernate.io/restore-policy";

/// What the webhook does to one pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// The policy that selects it (the first by name when several do).
    pub policy: Option<String>,
    /// JSON patch operations (RFC 6902); empty: the pod is admitted as it is.
    pub patch: Vec<Value>,
    /// The pod checkpoint it resumes from, if any.
    pub restore_from: Option<String>,
    /// Said back to whoever created the pod.
    pub warnings: Vec<String>,
}

/// A JSON pointer token (`~` and `/` escaped).
fn token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The decision for `pod`, created in `namespace`, given the namespace's policies and the store
/// index.
pub fn decide(pod: &Pod, namespace: &str, policies: &[CheckpointPolicy], index: &dyn PodCheckpointIndex) -> Decision {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut matching: Vec<&CheckpointPolicy> =
        policies.iter().filter(|p| selector::matches(&p.spec.selector, &labels)).collect();
    matching.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let Some(policy) = matching.first() else { return Decision::default() };
    let name = policy.metadata.name.clone().unwrap_or_default();
    let mut decision = Decision { policy: Some(name.clone()), ..Decision::default() };
    if matching.len() > 1 {
        decision.warnings.push(format!(
            "kybernate: the pod is selected by several CheckpointPolicies; {name} (the first by name) applies"
        ));
    }
    let spec = pod.spec.as_ref();
    match spec.and_then(|s| s.runtime_class_name.as_deref()) {
        Some(RUNTIME_CLASS) => {}
        Some(other) => {
            decision.warnings.push(format!(
                "kybernate: CheckpointPolicy {name} selects this pod, but it asks for runtimeClassName {other}; it is \
                 left as it is and will not be checkpointed"
            ));
            return decision;
        }
        None => decision.patch.push(json!({"op": "add", "path": "/spec/runtimeClassName", "value": RUNTIME_CLASS})),
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let mut add = Vec::new();
    if policy.spec.checkpoint_on_stop && !annotations.contains_key(CHECKPOINT_ON_STOP) {
        add.push((CHECKPOINT_ON_STOP, "true".to_string()));
    }
    if policy.spec.resume_on_recreate && !annotations.contains_key(RESTORE_FROM) {
        match (&policy.spec.store, identity(pod, namespace)) {
            (None, _) => decision.warnings.push(format!(
                "kybernate: CheckpointPolicy {name} names no store, so a re-created pod cannot resume; set spec.store"
            )),
            (Some(_), None) => {}
            (Some(store), Some(identity)) => match index.newest(store, &identity) {
                Ok(Some(reference)) => {
                    add.push((RESTORE_FROM, reference.clone()));
                    add.push((RESTORE_POLICY, "fallback-fresh".to_string()));
                    decision.restore_from = Some(reference);
                }
                Ok(None) => {}
                Err(e) => decision.warnings.push(format!(
                    "kybernate: the store {store} could not be asked for this pod's checkpoints ({e}); it starts fresh"
                )),
            },
        }
    }
    if !add.is_empty() && pod.metadata.annotations.is_none() {
        decision.patch.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    for (key, value) in add {
        decision
            .patch
            .push(json!({"op": "add", "path": format!("/metadata/annotations/{}", token(key)), "value": value}));
    }
    decision
}

/// The webhook's answer to an AdmissionReview of a pod: always allowed, patched as [`decide`] says.
pub fn review(
    request: &AdmissionRequest<Pod>,
    policies: &[CheckpointPolicy],
    index: &dyn PodCheckpointIndex,
) -> AdmissionReview<DynamicObject> {
    let response = AdmissionResponse::from(request);
    let Some(pod) = request.object.as_ref() else { return response.into_review() };
    let namespace = request.namespace.clone().or_else(|| pod.metadata.namespace.clone()).unwrap_or_default();
    let decision = decide(pod, &namespace, policies, index);
    let mut response = match serde_json::from_value::<json_patch::Patch>(Value::Array(decision.patch)) {
        Ok(patch) if !patch.0.is_empty() => response.clone().with_patch(patch).unwrap_or(response),
        _ => response,
    };
    if !decision.warnings.is_empty() {
        response.warnings = Some(decision.warnings);
    }
    response.into_review()
}
