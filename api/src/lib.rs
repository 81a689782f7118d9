//! # kybernate-api
//!
//! Kybernate's Kubernetes API, group `kybernate.io`, version `v1alpha1`: the custom resources the
//! operator reconciles (see `docs/kubernetes.md`).
//!
//! - [`Checkpoint`]: a one-off request to checkpoint a pod's containers now.
//! - [`CheckpointPolicy`]: which pods are checkpointed on stop (and periodically), how many bundles
//!   are kept, where they go, and whether a re-created pod resumes from its newest one.
//! - [`Restore`]: a new pod from a template, restored from a bundle or pod checkpoint.
//!
//! The CRD manifests in `deploy/crds/` are generated from these types (`kybernate-crdgen`); a test
//! fails when they are stale.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Kybernate resource.
pub const GROUP: &str = "kybernate.io";
/// The API version of this crate's resources.
pub const VERSION: &str = "v1alpha1";

/// Where a request stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted, not started yet.
    #[default]
    Pending,
    /// Being carried out.
    Running,
    /// Done; the status says where the result is.
    Succeeded,
    /// Given up; `message` and the conditions say why.
    Failed,
}

/// One-off: checkpoint the containers of a pod now, leaving them running, into the node checkpoint
/// directory and then the store.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kybernate.io",
    version = "v1alpha1",
    kind = "Checkpoint",
    namespaced,
    status = "CheckpointStatus",
    shortname = "kcp",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.podName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// The pod to checkpoint, in the Checkpoint's namespace.
    pub pod_name: String,
    /// Only this container; every container of the pod when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The store the bundles go to (`s3://bucket/prefix`, `file:///…`); the node sidecar's when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// What became of a [`Checkpoint`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default)]
    pub phase: Phase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The node the pod ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// One sealed bundle per container checkpointed, with the reference a restore names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bundles: Vec<BundleStatus>,
    /// Why it failed, in words, with the fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the checkpoint started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// Standard conditions (`Ready`, `Uploaded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One container's bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BundleStatus {
    /// The container name.
    pub container: String,
    /// The bundle's reference (`kybernate.io/restore-from` value): in the store once uploaded.
    pub reference: String,
}

/// Which pods are checkpointed, when, where to, how many bundles are kept, and whether a pod that
/// is re-created (by its controller, on any node) resumes from its newest pod checkpoint.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kybernate.io",
    version = "v1alpha1",
    kind = "CheckpointPolicy",
    namespaced,
    status = "CheckpointPolicyStatus",
    shortname = "kcpp",
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.matchedPods"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointPolicySpec {
    /// The pods (in the policy's namespace) it applies to.
    pub selector: LabelSelector,
    /// Checkpoint every container when it is stopped (eviction, preemption, drain, deletion).
    #[serde(default = "yes")]
    pub checkpoint_on_stop: bool,
    /// Also checkpoint the running pods this often (a duration such as `30m`); never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// How many pod checkpoints to keep per pod identity in the store (older ones are deleted).
    #[serde(default = "three")]
    pub retention: u32,
    /// The store the bundles go to; the node sidecar's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// A pod re-created with the same identity (StatefulSet ordinal, or owner and pod-template hash)
    /// is restored from its newest pod checkpoint, or starts fresh when there is none.
    #[serde(default = "yes")]
    pub resume_on_recreate: bool,
}

fn yes() -> bool {
    true
}

fn three() -> u32 {
    3
}

/// What a [`CheckpointPolicy`] currently covers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many pods it selects now.
    #[serde(default)]
    pub matched_pods: u32,
    /// The newest pod checkpoint taken under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<Time>,
    /// Standard conditions (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A new pod, from a template, restored from a bundle or pod checkpoint.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kybernate.io",
    version = "v1alpha1",
    kind = "Restore",
    namespaced,
    status = "RestoreStatus",
    shortname = "krs",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".status.podName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// What to restore: a bundle or a pod checkpoint, as `kybernate.io/restore-from` names it.
    pub from: String,
    /// `fail` (default), `fallback-fresh` or `allow-partial` (`kybernate.io/restore-policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_policy: Option<String>,
    /// The pod to create (a PodTemplateSpec); the operator adds the runtime class and annotations.
    #[schemars(schema_with = "any_object")]
    pub template: k8s_openapi::api::core::v1::PodTemplateSpec,
}

/// An object whose fields the API server keeps as they are (an embedded pod template is validated
/// when the pod is created, not twice).
fn any_object(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
    serde_json::from_value(serde_json::json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    }))
    .expect("a static schema")
}

/// What became of a [`Restore`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default)]
    pub phase: Phase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The pod created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Why it failed, in words, with the fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Standard conditions (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Every CRD of this API, with the file name each has in `deploy/crds/`.
pub fn crds() -> Vec<(String, CustomResourceDefinition)> {
    [Checkpoint::crd(), CheckpointPolicy::crd(), Restore::crd()]
        .into_iter()
        .map(|crd| (format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default()), crd))
        .collect()
}

/// A CRD as the YAML file in `deploy/crds/` holds it.
pub fn render(crd: &CustomResourceDefinition) -> String {
    format!(
        "# Generated by `cargo run -p kybernate-api --bin kybernate-crdgen -- deploy/crds`: do not edit.\n{}",
        serde_yaml::to_string(crd).expect("a CRD serializes")
    )
}

/// The `kustomization.yaml` of `deploy/crds/`, listing the CRD files.
pub fn kustomization(crds: &[(String, CustomResourceDefinition)]) -> String {
    let mut out = String::from(
        "# Generated by `cargo run -p kybernate-api --bin kybernate-crdgen -- deploy/crds`: do not edit.\n\
         apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n",
    );
    for (file, _) in crds {
        out.push_str(&format!("  - {file}\n"));
    }
    out
}
