//! The `Checkpoint` controller: carries out each [`Checkpoint`] through the agent of the node that
//! runs its pod, one step per reconcile, each step ending in a status the next one starts from:
//!
//! 1. the finalizer `kybernate.io/checkpoint` is added (a JSON patch that tests the list it extends);
//! 2. `Pending`: the pod is resolved (its `spec.nodeName`, the container named or every container) and
//!    the status becomes `Running` (or `Failed` when the pod is missing, not scheduled or has no such
//!    container);
//! 3. `Running`: each container not yet in `status.bundles` is checkpointed by
//!    [`NodeAgents::checkpoint`]; the status becomes `Succeeded` with the bundles' references, or
//!    `Failed` with the agent's error. An unreachable agent keeps it `Running`, says so in the `Ready`
//!    condition and requeues with an exponential backoff;
//! 4. `Succeeded`/`Failed`: nothing more.
//!
//! On deletion the finalizer is removed (the spec has no field asking to delete the bundles, so they
//! stay where they are). Every status is written whole with server-side apply on the status
//! subresource (field manager `kybernate-operator`), with `observedGeneration`. The outcome is also a
//! Kubernetes Event on the Checkpoint (`Checkpointed`, or a warning with the failure's reason).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource as _, ResourceExt as _};
use kybernate_api::{BundleStatus, Checkpoint, CheckpointStatus, Phase};
use kybernate_proto::kybernate::agent::v1::{checkpoint_request, PodTarget};
use serde_json::json;

use crate::agents::{CheckpointRequest, NodeAgents};
use crate::backoff::key;
pub use crate::backoff::Backoff;
use crate::status;

/// The finalizer the controller puts on every Checkpoint.
pub const FINALIZER: &str = "kybernate.io/checkpoint";
/// The condition saying whether the checkpoint is done.
pub const READY: &str = "Ready";
/// The condition saying whether every bundle is in a store (not only on the node).
pub const UPLOADED: &str = "Uploaded";

/// Why a reconcile did not finish; the controller retries it (see [`error_policy`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Checkpoint without a namespace (the resource is namespaced, so the API server never sends one).
    #[error("Checkpoint {0} has no namespace")]
    NoNamespace(String),
    /// Reading the target pod failed (other than it not existing).
    #[error("reading pod {namespace}/{pod}: {source}")]
    GetPod {
        /// The namespace.
        namespace: String,
        /// The pod.
        pod: String,
        /// The API server's error.
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("writing the status of Checkpoint {namespace}/{name}: {source}")]
    PatchStatus {
        /// The namespace.
        namespace: String,
        /// The Checkpoint.
        name: String,
        /// The API server's error.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("updating the finalizer of Checkpoint {namespace}/{name}: {source}")]
    Finalizer {
        /// The namespace.
        namespace: String,
        /// The Checkpoint.
        name: String,
        /// The API server's error.
        #[source]
        source: kube::Error,
    },
    /// A status or patch could not be serialized (not expected: the types are plain data).
    #[error("serializing a patch of Checkpoint {name}: {source}")]
    Serialize {
        /// The Checkpoint.
        name: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
}

/// What every reconcile shares.
pub struct Context {
    base: status::Base,
    agents: Arc<dyn NodeAgents>,
}

impl std::ops::Deref for Context {
    type Target = status::Base;

    fn deref(&self) -> &status::Base {
        &self.base
    }
}

impl Context {
    /// A context talking to the API server through `client` and to the nodes through `agents`, its
    /// Events reported as `kybernate-operator` (instance: `$POD_NAME` when set).
    pub fn new(client: Client, agents: Arc<dyn NodeAgents>) -> Self {
        Context { base: status::Base::new(client), agents }
    }

    /// The same with another clock (the timestamps of the status: tests fix them).
    pub fn with_clock(mut self, now: fn() -> Time) -> Self {
        self.base.now = now;
        self
    }

    /// The same with another backoff for retryable failures.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.base.backoff = backoff;
        self
    }
}

/// Runs the controller over every namespace's Checkpoints until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let checkpoints: Api<Checkpoint> = Api::all(ctx.client.clone());
    let results = Controller::new(checkpoints, watcher::Config::default()).graceful_shutdown_on(shutdown).run(
        reconcile,
        error_policy,
        ctx,
    );
    crate::backoff::drive(results, "Checkpoint").await;
}

/// What the controller does after a failed reconcile: try again after the object's backoff.
pub fn error_policy(checkpoint: Arc<Checkpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.backoff.retry(&key(checkpoint.as_ref()), error)
}

/// One step of a Checkpoint (see the module's documentation).
pub async fn reconcile(checkpoint: Arc<Checkpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = checkpoint.name_any();
    let namespace = checkpoint.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let api: Api<Checkpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    let finalizers = checkpoint.finalizers();
    let ours = finalizers.iter().position(|f| f == FINALIZER);

    if checkpoint.metadata.deletion_timestamp.is_some() {
        if let Some(index) = ours {
            // The spec has no field asking for the bundles to go: they stay, the finalizer goes.
            let ops = json!([
                {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
                {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
            ]);
            patch_finalizers(&api, &namespace, &name, ops).await?;
            ctx.backoff.reset(&key(checkpoint.as_ref()));
        }
        return Ok(Action::await_change());
    }

    if ours.is_none() {
        let ops = if finalizers.is_empty() {
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        } else {
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
                {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
            ])
        };
        patch_finalizers(&api, &namespace, &name, ops).await?;
        // The patch's watch event starts the next step.
        return Ok(Action::await_change());
    }

    let step = Step { checkpoint: &checkpoint, ctx: &ctx, api: &api, namespace: &namespace, name: &name };
    match checkpoint.status.as_ref().map(|s| s.phase).unwrap_or_default() {
        Phase::Pending => step.start().await,
        Phase::Running => step.run().await,
        Phase::Succeeded | Phase::Failed => Ok(Action::await_change()),
    }
}

/// Applies the JSON patch `ops` to the finalizers of Checkpoint `namespace/name`.
async fn patch_finalizers(
    api: &Api<Checkpoint>,
    namespace: &str,
    name: &str,
    ops: serde_json::Value,
) -> Result<(), Error> {
    let patch: json_patch::Patch =
        serde_json::from_value(ops).map_err(|source| Error::Serialize { name: name.to_string(), source })?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch)).await.map_err(|source| Error::Finalizer {
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    })?;
    Ok(())
}

/// What the pod resolves to.
enum Resolved {
    /// The node and the containers to checkpoint there.
    Found { node: String, containers: Vec<String> },
    /// The Checkpoint cannot be carried out: the condition's reason, and why in words.
    Unusable { reason: &'static str, message: String },
}

/// One reconcile of one Checkpoint past its finalizer.
struct Step<'a> {
    checkpoint: &'a Checkpoint,
    ctx: &'a Context,
    api: &'a Api<Checkpoint>,
    namespace: &'a str,
    name: &'a str,
}

impl Step<'_> {
    /// `Pending`: resolve the pod; `Running` or `Failed`.
    async fn start(&self) -> Result<Action, Error> {
        let (node, containers) = match self.target().await? {
            Resolved::Found { node, containers } => (node, containers),
            Resolved::Unusable { reason, message } => return self.fail(reason, message, Vec::new()).await,
        };
        let now = (self.ctx.now)();
        let message = format!(
            "checkpointing {} of pod {}/{} on node {node}",
            describe(&containers),
            self.namespace,
            self.checkpoint.spec.pod_name
        );
        let status = CheckpointStatus {
            phase: Phase::Running,
            observed_generation: self.checkpoint.metadata.generation,
            node_name: Some(node),
            started_at: Some(now.clone()),
            conditions: vec![self.condition(READY, false, "Checkpointing", message, &now)],
            ..CheckpointStatus::default()
        };
        self.write(&status).await?;
        // Its watch event starts the checkpoint.
        Ok(Action::await_change())
    }

    /// `Running`: checkpoint every container not done yet; `Succeeded`, `Failed`, or still `Running`
    /// after an unreachable agent.
    async fn run(&self) -> Result<Action, Error> {
        let previous = self.checkpoint.status.clone().unwrap_or_default();
        let mut bundles = previous.bundles.clone();
        let (node, containers) = match self.target().await? {
            Resolved::Found { node, containers } => (node, containers),
            Resolved::Unusable { reason, message } => return self.fail(reason, message, bundles).await,
        };
        for container in containers {
            if bundles.iter().any(|b| b.container == container) {
                continue;
            }
            let request = CheckpointRequest {
                target: Some(pod_target(self.namespace, &self.checkpoint.spec.pod_name, &container)),
                leave_running: Some(true),
                store: self.checkpoint.spec.store.clone().unwrap_or_default(),
            };
            tracing::info!(checkpoint = %key(self.checkpoint), %node, %container, "checkpointing");
            match self.ctx.agents.checkpoint(&node, request).await {
                Ok(done) => bundles.push(BundleStatus { container, reference: done.reference().to_string() }),
                Err(e) if e.is_retryable() => {
                    let now = (self.ctx.now)();
                    let status = CheckpointStatus {
                        phase: Phase::Running,
                        observed_generation: self.checkpoint.metadata.generation,
                        node_name: Some(node),
                        bundles,
                        message: Some(format!("{e}; retrying")),
                        started_at: previous.started_at.clone(),
                        conditions: vec![self.condition(READY, false, "AgentUnreachable", e.to_string(), &now)],
                        ..CheckpointStatus::default()
                    };
                    self.write(&status).await?;
                    return Ok(Action::requeue(self.ctx.backoff.next(&key(self.checkpoint))));
                }
                Err(e) => {
                    let message = format!("checkpointing container {container}: {e}");
                    return self.fail("AgentFailed", message, bundles).await;
                }
            }
        }
        let now = (self.ctx.now)();
        let message = format!(
            "checkpointed {} of pod {}/{}",
            describe_bundles(&bundles),
            self.namespace,
            self.checkpoint.spec.pod_name
        );
        let uploaded = if bundles.iter().all(|b| is_stored(&b.reference)) {
            self.condition(UPLOADED, true, "Stored", "every bundle is in the store".to_string(), &now)
        } else {
            self.condition(UPLOADED, false, "NotStored", "a bundle is on the node only (no store)".to_string(), &now)
        };
        let status = CheckpointStatus {
            phase: Phase::Succeeded,
            observed_generation: self.checkpoint.metadata.generation,
            node_name: Some(node),
            bundles,
            started_at: previous.started_at.clone(),
            completed_at: Some(now.clone()),
            conditions: vec![self.condition(READY, true, "Checkpointed", message.clone(), &now), uploaded],
            ..CheckpointStatus::default()
        };
        self.write(&status).await?;
        self.ctx.backoff.reset(&key(self.checkpoint));
        self.event(EventType::Normal, "Checkpointed", message).await;
        Ok(Action::await_change())
    }

    /// Resolves the pod: its node, and the container named or every container.
    async fn target(&self) -> Result<Resolved, Error> {
        let pod_name = &self.checkpoint.spec.pod_name;
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        let pod = pods.get_opt(pod_name).await.map_err(|source| Error::GetPod {
            namespace: self.namespace.to_string(),
            pod: pod_name.clone(),
            source,
        })?;
        let Some(pod) = pod else {
            return Ok(Resolved::Unusable {
                reason: "PodNotFound",
                message: format!("pod {}/{pod_name} does not exist", self.namespace),
            });
        };
        let spec = pod.spec.unwrap_or_default();
        let Some(node) = spec.node_name.filter(|n| !n.is_empty()) else {
            return Ok(Resolved::Unusable {
                reason: "PodNotScheduled",
                message: format!("pod {}/{pod_name} is not scheduled to a node", self.namespace),
            });
        };
        let all: Vec<String> = spec.containers.into_iter().map(|c| c.name).collect();
        let containers = match &self.checkpoint.spec.container {
            Some(wanted) if all.contains(wanted) => vec![wanted.clone()],
            Some(wanted) => {
                return Ok(Resolved::Unusable {
                    reason: "ContainerNotFound",
                    message: format!(
                        "pod {}/{pod_name} has no container {wanted} (it has: {})",
                        self.namespace,
                        all.join(", ")
                    ),
                })
            }
            None if all.is_empty() => {
                return Ok(Resolved::Unusable {
                    reason: "ContainerNotFound",
                    message: format!("pod {}/{pod_name} has no containers", self.namespace),
                })
            }
            None => all,
        };
        Ok(Resolved::Found { node, containers })
    }

    /// The status `Failed`, for `reason`, and its Event.
    async fn fail(&self, reason: &'static str, message: String, bundles: Vec<BundleStatus>) -> Result<Action, Error> {
        let previous = self.checkpoint.status.clone().unwrap_or_default();
        let now = (self.ctx.now)();
        let status = CheckpointStatus {
            phase: Phase::Failed,
            observed_generation: self.checkpoint.metadata.generation,
            node_name: previous.node_name,
            bundles,
            message: Some(message.clone()),
            started_at: previous.started_at,
            completed_at: Some(now.clone()),
            conditions: vec![self.condition(READY, false, reason, message.clone(), &now)],
        };
        self.write(&status).await?;
        self.ctx.backoff.reset(&key(self.checkpoint));
        self.event(EventType::Warning, reason, message).await;
        Ok(Action::await_change())
    }

    /// A condition of this generation, keeping its transition time when its status did not change.
    fn condition(&self, type_: &str, status: bool, reason: &str, message: String, now: &Time) -> Condition {
        let previous = self.checkpoint.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
        status::condition(previous, self.checkpoint.metadata.generation, type_, status, reason, message, now)
    }

    /// Writes the whole status (server-side apply on the status subresource).
    async fn write(&self, checkpoint_status: &CheckpointStatus) -> Result<(), Error> {
        let value = serde_json::to_value(checkpoint_status)
            .map_err(|source| Error::Serialize { name: self.name.to_string(), source })?;
        status::apply(self.api, self.name, value).await.map_err(|source| Error::PatchStatus {
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            source,
        })
    }

    /// Publishes an Event on the Checkpoint; a failure to is only logged.
    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let object = self.checkpoint.object_ref(&());
        status::publish(&self.ctx.recorder, &object, type_, "Checkpoint", reason, note).await;
    }
}

/// The agent's target: `container` of pod `namespace/pod`.
fn pod_target(namespace: &str, pod: &str, container: &str) -> checkpoint_request::Target {
    checkpoint_request::Target::Pod(PodTarget {
        namespace: namespace.to_string(),
        name: pod.to_string(),
        container: container.to_string(),
    })
}

/// Whether a bundle reference is a store's (`s3://…`, `file:///…`) rather than a directory on the node.
fn is_stored(reference: &str) -> bool {
    reference.contains("://")
}

/// "container a" or "containers a, b".
fn describe(containers: &[String]) -> String {
    match containers {
        [one] => format!("container {one}"),
        many => format!("containers {}", many.join(", ")),
    }
}

/// The containers of `bundles`, as [`describe`] says them.
fn describe_bundles(bundles: &[BundleStatus]) -> String {
    describe(&bundles.iter().map(|b| b.container.clone()).collect::<Vec<_>>())
}
