//! The `Restore` controller: makes each [`Restore`] a new pod, from its template, that Kybernate's
//! shim restores from `spec.from`, one step per reconcile, each step ending in a status the next one
//! starts from (much as a Job makes its pods):
//!
//! 1. `Pending`: the spec is checked — `restorePolicy` absent or one of [`POLICIES`], `from` an
//!    `s3://bucket/key…`, `file:///…` or absolute-path reference (only its form: the operator runs
//!    elsewhere, the shim on the node checks the rest), the template's `runtimeClassName` absent or
//!    `kybernate` — and the pod is created (see [`pod`]): named as the template names it, else as the
//!    Restore (so a create retried after a lost answer finds its own pod, and adopts it), in the
//!    Restore's namespace, with the annotations `kybernate.io/restore-from` and
//!    `kybernate.io/restore-policy`, `runtimeClassName: kybernate`, and the Restore as its controlling
//!    owner (the pod is deleted with it). The status becomes `Running` with `podName`, or `Failed`
//!    (`InvalidPolicy`, `InvalidReference`, `WrongRuntimeClass`, `PodExists` when a pod of that name
//!    belongs to someone else, `InvalidTemplate` when the API server refuses the pod as invalid);
//! 2. `Running`: the pod is read. Every container running (or exited 0) in a `Running` pod makes it
//!    `Succeeded` (`Restored`), a pod that ran to completion `Succeeded` (`Completed`); the kubelet
//!    refusing a container (`CreateContainerError` and its kin: how the runtime's refusal of the
//!    restore shows) `Failed` (`RestoreRefused`, with the shim's error), a container that exited
//!    non-zero or a `Failed` pod `Failed` (`PodFailed`), the pod gone or replaced `Failed`
//!    (`PodDeleted`). Otherwise (scheduling, pulling the image, creating the containers) nothing is
//!    written and the pod is read again in [`POLL`] (or sooner, on its watch event);
//! 3. `Succeeded`/`Failed`: nothing more (the pod stays, for its logs, until the Restore is deleted).
//!
//! Every status is written whole with server-side apply on the status subresource (field manager
//! `kybernate-operator`), with `observedGeneration` and a `Ready` condition. The steps are also
//! Kubernetes Events on the Restore (`PodCreated`, `Restored`/`Completed`, or a warning with the
//! failure's reason).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource as _, ResourceExt as _};
use kybernate_api::{Phase, Restore, RestoreStatus};

use crate::admission::{RESTORE_FROM, RESTORE_POLICY, RUNTIME_CLASS};
use crate::backoff::key;
pub use crate::backoff::Backoff;
use crate::status::{self, MANAGER};

/// The condition saying whether the restored pod is up.
pub const READY: &str = "Ready";
/// The accepted `restorePolicy` values (the shim's), the first the default.
pub const POLICIES: [&str; 3] = ["fail", "fallback-fresh", "allow-partial"];
/// The container waiting reasons with which the kubelet reports that the runtime refused to create or
/// start a container: for a restored pod, the shim refusing the restore (its error is the message).
/// `CreateContainerConfigError` is not one: the kubelet's own (a missing ConfigMap or Secret), which it
/// retries, so the Restore waits.
pub const REFUSED: [&str; 3] = ["CreateContainerError", "RunContainerError", "StartError"];
/// How often a pod that is not up yet is read again (its watch events usually come first).
pub const POLL: Duration = Duration::from_secs(10);

/// Why a reconcile did not finish; the controller retries it (see [`error_policy`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Restore without a namespace (the resource is namespaced, so the API server never sends one).
    #[error("Restore {0} has no namespace")]
    NoNamespace(String),
    /// A Restore without a uid (the API server always sets one; the pod's owner reference needs it).
    #[error("Restore {0} has no uid")]
    NoUid(String),
    /// Creating the pod failed (other than it existing already or being invalid).
    #[error("creating pod {namespace}/{pod}: {source}")]
    CreatePod {
        /// The namespace.
        namespace: String,
        /// The pod.
        pod: String,
        /// The API server's error.
        #[source]
        source: kube::Error,
    },
    /// Reading the pod failed (other than it not existing).
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
    /// The pod existed when it was created, and was gone when read: the next try creates it.
    #[error("pod {namespace}/{pod} already existed, and was gone when read; trying again")]
    PodVanished {
        /// The namespace.
        namespace: String,
        /// The pod.
        pod: String,
    },
    /// Writing the status failed.
    #[error("writing the status of Restore {namespace}/{name}: {source}")]
    PatchStatus {
        /// The namespace.
        namespace: String,
        /// The Restore.
        name: String,
        /// The API server's error.
        #[source]
        source: kube::Error,
    },
    /// A status could not be serialized (not expected: the types are plain data).
    #[error("serializing the status of Restore {name}: {source}")]
    Serialize {
        /// The Restore.
        name: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
}

/// What every reconcile shares.
pub struct Context {
    base: status::Base,
}

impl std::ops::Deref for Context {
    type Target = status::Base;

    fn deref(&self) -> &status::Base {
        &self.base
    }
}

impl Context {
    /// A context talking to the API server through `client`, its Events reported as
    /// `kybernate-operator` (instance: `$POD_NAME` when set).
    pub fn new(client: Client) -> Self {
        Context { base: status::Base::new(client) }
    }

    /// The same with another clock (the timestamps of the status: tests fix them).
    pub fn with_clock(mut self, now: fn() -> Time) -> Self {
        self.base.now = now;
        self
    }

    /// The same with another backoff for failed reconciles.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.base.backoff = backoff;
        self
    }
}

/// Runs the controller over every namespace's Restores until `shutdown` resolves; a change of a pod
/// a Restore controls reconciles that Restore.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let restores: Api<Restore> = Api::all(ctx.client.clone());
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let results = Controller::new(restores, watcher::Config::default())
        .owns(pods, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx);
    crate::backoff::drive(results, "Restore").await;
}

/// What the controller does after a failed reconcile: try again after the object's backoff.
pub fn error_policy(restore: Arc<Restore>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.backoff.retry(&key(restore.as_ref()), error)
}

/// One step of a Restore (see the module's documentation). A step that finishes starts the object's
/// backoff over.
pub async fn reconcile(restore: Arc<Restore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = restore.name_any();
    let namespace = restore.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let api: Api<Restore> = Api::namespaced(ctx.client.clone(), &namespace);
    let step = Step { restore: &restore, ctx: &ctx, api: &api, namespace: &namespace, name: &name };
    let action = match restore.status.as_ref().map(|s| s.phase).unwrap_or_default() {
        Phase::Pending => step.start().await?,
        Phase::Running => step.watch().await?,
        Phase::Succeeded | Phase::Failed => return Ok(Action::await_change()),
    };
    ctx.backoff.reset(&key(restore.as_ref()));
    Ok(action)
}

/// The `restorePolicy` the pod is given: `policy`, `fail` when absent; or why it is not one.
pub fn check_policy(policy: Option<&str>) -> Result<&str, String> {
    match policy {
        None => Ok(POLICIES[0]),
        Some(policy) if POLICIES.contains(&policy) => Ok(policy),
        Some(other) => Err(format!(
            "spec.restorePolicy {other:?} is not a restore policy: use \"fail\" (the default), \"fallback-fresh\" or \
             \"allow-partial\""
        )),
    }
}

/// Whether `from` has the form of a reference the shim restores from: `s3://bucket/key…`,
/// `file:///path…` or an absolute path (`#<time>` may follow a pod checkpoint's); why not when it is
/// not. Whether it exists, and may be restored there, only the node can tell.
pub fn check_reference(from: &str) -> Result<(), String> {
    let usable = if let Some(rest) = from.strip_prefix("s3://") {
        rest.split_once('/').is_some_and(|(bucket, key)| !bucket.is_empty() && !key.is_empty())
    } else if let Some(path) = from.strip_prefix("file://") {
        path.len() > 1 && path.starts_with('/')
    } else {
        from.len() > 1 && from.starts_with('/')
    };
    if usable {
        Ok(())
    } else if from.is_empty() {
        Err("spec.from is empty: name the bundle or pod checkpoint to restore, as s3://bucket/key, file:///path or an \
             absolute path"
            .to_string())
    } else {
        Err(format!(
            "spec.from {from:?} is not a reference to restore from: use s3://bucket/key, file:///path or an absolute \
             path"
        ))
    }
}

/// The pod `restore` asks for, restored with `policy` (see the module's documentation); `None` without
/// the Restore's name or uid.
pub fn pod(restore: &Restore, policy: &str) -> Option<Pod> {
    let template = &restore.spec.template;
    let metadata = template.metadata.clone().unwrap_or_default();
    let mut annotations: BTreeMap<String, String> = metadata.annotations.unwrap_or_default();
    annotations.insert(RESTORE_FROM.to_string(), restore.spec.from.clone());
    annotations.insert(RESTORE_POLICY.to_string(), policy.to_string());
    let mut spec = template.spec.clone().unwrap_or_default();
    spec.runtime_class_name = Some(RUNTIME_CLASS.to_string());
    let owner = OwnerReference { block_owner_deletion: Some(true), ..restore.controller_owner_ref(&())? };
    Some(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(restore)),
            namespace: restore.namespace(),
            labels: metadata.labels,
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// The name of the pod of `restore`: the template's, else the Restore's.
fn pod_name(restore: &Restore) -> String {
    restore
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| restore.name_any())
}

/// Whether `restore` is the controlling owner of `pod`.
fn controls(restore: &Restore, pod: &Pod) -> bool {
    let uid = restore.metadata.uid.as_deref();
    uid.is_some() && pod.owner_references().iter().any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

/// Whether `error` is the API server's answer `code`.
fn is_code(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(response) if response.code == code)
}

/// What the pod's status says of the restore.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Not up yet.
    Waiting,
    /// Every container up: the condition's reason (`Restored` or `Completed`).
    Done(&'static str),
    /// Given up: the condition's reason, and why in words.
    Failed(&'static str, String),
}

/// Reads pod `pod_ref` (`namespace/name`, for the messages) as an [`Outcome`]; in order: a refused
/// container, a failed pod, a completed pod, a container that exited non-zero (now or before a
/// restart), every container up in a running pod, else not up yet.
fn assess(pod: &Pod, pod_ref: &str) -> Outcome {
    let status = pod.status.clone().unwrap_or_default();
    let PodStatus { phase, reason, message, init_container_statuses, container_statuses, .. } = status;
    let init = init_container_statuses.unwrap_or_default();
    let containers = container_statuses.unwrap_or_default();
    let every = || init.iter().chain(containers.iter());

    for container in every() {
        let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) else { continue };
        let why = waiting.reason.as_deref().unwrap_or_default();
        if REFUSED.contains(&why) {
            let message = format!("container {} of pod {pod_ref} could not be restored ({why})", container.name);
            return Outcome::Failed("RestoreRefused", with_details(message, waiting.message.as_deref()));
        }
    }
    match phase.as_deref() {
        Some("Failed") => {
            let exited = every()
                .find_map(|c| terminated(c).filter(|t| t.exit_code != 0).map(|t| (c, t)))
                .or_else(|| every().find_map(|c| terminated(c).map(|t| (c, t))));
            let message = match (exited, reason.as_deref().filter(|r| !r.is_empty())) {
                (Some((container, state)), _) => describe_exit(container, state, pod_ref),
                (None, Some(reason)) => with_details(format!("pod {pod_ref} failed ({reason})"), message.as_deref()),
                (None, None) => with_details(format!("pod {pod_ref} failed"), message.as_deref()),
            };
            return Outcome::Failed("PodFailed", message);
        }
        Some("Succeeded") => return Outcome::Done("Completed"),
        _ => {}
    }
    if let Some((container, state)) = every().find_map(|c| crashed(c).map(|t| (c, t))) {
        return Outcome::Failed("PodFailed", describe_exit(container, state, pod_ref));
    }
    let up = |name: &str| {
        let state = containers.iter().find(|c| c.name == name).and_then(|c| c.state.as_ref());
        state.is_some_and(|s| s.running.is_some() || s.terminated.as_ref().is_some_and(|t| t.exit_code == 0))
    };
    let specified: Vec<&str> = pod.spec.iter().flat_map(|s| s.containers.iter().map(|c| c.name.as_str())).collect();
    if phase.as_deref() == Some("Running") && !specified.is_empty() && specified.iter().all(|c| up(c)) {
        return Outcome::Done("Restored");
    }
    Outcome::Waiting
}

/// The container's current state if it is terminated.
fn terminated(container: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    container.state.as_ref().and_then(|s| s.terminated.as_ref())
}

/// How the container exited non-zero, if it did: its state now, or its last one while it waits to be
/// restarted.
fn crashed(container: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    let waiting = container.state.as_ref().is_some_and(|s| s.waiting.is_some());
    let last = container.last_state.as_ref().and_then(|s| s.terminated.as_ref()).filter(|_| waiting);
    terminated(container).or(last).filter(|t| t.exit_code != 0)
}

/// "container app of pod ml/p terminated with exit code 1 (Error): …".
fn describe_exit(container: &ContainerStatus, state: &ContainerStateTerminated, pod_ref: &str) -> String {
    let mut message =
        format!("container {} of pod {pod_ref} terminated with exit code {}", container.name, state.exit_code);
    if let Some(reason) = state.reason.as_deref().filter(|r| !r.is_empty()) {
        message.push_str(&format!(" ({reason})"));
    }
    with_details(message, state.message.as_deref())
}

/// `message`, then `: details` when there are any.
fn with_details(message: String, details: Option<&str>) -> String {
    match details.map(str::trim).filter(|d| !d.is_empty()) {
        Some(details) => format!("{message}: {details}"),
        None => message,
    }
}

/// One reconcile of one Restore.
struct Step<'a> {
    restore: &'a Restore,
    ctx: &'a Context,
    api: &'a Api<Restore>,
    namespace: &'a str,
    name: &'a str,
}

impl Step<'_> {
    /// `Pending`: check the spec and create the pod (or adopt the one a lost answer left); `Running` or
    /// `Failed`.
    async fn start(&self) -> Result<Action, Error> {
        let spec = &self.restore.spec;
        let policy = match check_policy(spec.restore_policy.as_deref()) {
            Ok(policy) => policy,
            Err(message) => return self.fail("InvalidPolicy", message, None).await,
        };
        if let Err(message) = check_reference(&spec.from) {
            return self.fail("InvalidReference", message, None).await;
        }
        if let Some(other) = spec.template.spec.as_ref().and_then(|s| s.runtime_class_name.as_deref()) {
            if other != RUNTIME_CLASS {
                let message = format!(
                    "spec.template asks for runtimeClassName {other}, but a restored pod runs on {RUNTIME_CLASS}: \
                     leave runtimeClassName out of the template or set it to {RUNTIME_CLASS}"
                );
                return self.fail("WrongRuntimeClass", message, None).await;
            }
        }
        let pod = pod(self.restore, policy).ok_or_else(|| Error::NoUid(self.name.to_string()))?;
        let pod_name = pod_name(self.restore);
        let pod_ref = format!("{}/{pod_name}", self.namespace);
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        let params = PostParams { field_manager: Some(MANAGER.to_string()), ..PostParams::default() };
        let message = match pods.create(&params, &pod).await {
            Ok(_) => format!("created pod {pod_ref}, restoring from {}", spec.from),
            Err(e) if is_code(&e, 409) => match self.get(&pods, &pod_name).await? {
                Some(existing) if controls(self.restore, &existing) => {
                    format!("adopted pod {pod_ref}, which this Restore created before; restoring from {}", spec.from)
                }
                Some(_) => {
                    let message = format!(
                        "pod {pod_ref} exists and this Restore does not control it: delete it, or name another pod \
                         in spec.template.metadata.name"
                    );
                    return self.fail("PodExists", message, None).await;
                }
                None => return Err(Error::PodVanished { namespace: self.namespace.to_string(), pod: pod_name }),
            },
            Err(kube::Error::Api(response)) if response.code == 422 => {
                let message = format!("the API server refused pod {pod_ref}: {}", response.message);
                return self.fail("InvalidTemplate", message, None).await;
            }
            Err(source) => {
                return Err(Error::CreatePod { namespace: self.namespace.to_string(), pod: pod_name, source })
            }
        };
        tracing::info!(restore = %key(self.restore), pod = %pod_ref, from = %spec.from, "restoring");
        let now = (self.ctx.now)();
        let status = RestoreStatus {
            phase: Phase::Running,
            observed_generation: self.restore.metadata.generation,
            pod_name: Some(pod_name),
            conditions: vec![self.condition(false, "PodCreated", message.clone(), &now)],
            ..RestoreStatus::default()
        };
        self.write(&status).await?;
        self.event(EventType::Normal, "PodCreated", message).await;
        // The status's (and the pod's) watch events start the next step.
        Ok(Action::await_change())
    }

    /// `Running`: read the pod; `Succeeded`, `Failed`, or (nothing written) still `Running`.
    async fn watch(&self) -> Result<Action, Error> {
        let pod_name =
            self.restore.status.as_ref().and_then(|s| s.pod_name.clone()).unwrap_or_else(|| pod_name(self.restore));
        let pod_ref = format!("{}/{pod_name}", self.namespace);
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        let outcome = match self.get(&pods, &pod_name).await? {
            None => Outcome::Failed(
                "PodDeleted",
                format!(
                    "pod {pod_ref} was deleted before its containers were running: delete and re-create this \
                     Restore to try again"
                ),
            ),
            Some(pod) if !controls(self.restore, &pod) => Outcome::Failed(
                "PodDeleted",
                format!(
                    "pod {pod_ref} was deleted before its containers were running, and replaced by one this Restore \
                     does not control"
                ),
            ),
            Some(pod) => assess(&pod, &pod_ref),
        };
        let from = &self.restore.spec.from;
        match outcome {
            Outcome::Waiting => Ok(Action::requeue(POLL)),
            Outcome::Failed(reason, message) => self.fail(reason, message, Some(pod_name)).await,
            Outcome::Done(reason) => {
                let mut message = match reason {
                    "Completed" => format!("pod {pod_ref} ran to completion, restored from {from}"),
                    _ => format!("pod {pod_ref} is running, restored from {from}"),
                };
                if self.restore.spec.restore_policy.as_deref() == Some("fallback-fresh") {
                    message.push_str(" (or started fresh, as fallback-fresh allows: the shim's log says which)");
                }
                let now = (self.ctx.now)();
                let status = RestoreStatus {
                    phase: Phase::Succeeded,
                    observed_generation: self.restore.metadata.generation,
                    pod_name: Some(pod_name),
                    conditions: vec![self.condition(true, reason, message.clone(), &now)],
                    ..RestoreStatus::default()
                };
                self.write(&status).await?;
                self.event(EventType::Normal, reason, message).await;
                Ok(Action::await_change())
            }
        }
    }

    /// Pod `name`, `None` when there is none.
    async fn get(&self, pods: &Api<Pod>, name: &str) -> Result<Option<Pod>, Error> {
        pods.get_opt(name).await.map_err(|source| Error::GetPod {
            namespace: self.namespace.to_string(),
            pod: name.to_string(),
            source,
        })
    }

    /// The status `Failed`, for `reason`, and its Event.
    async fn fail(&self, reason: &'static str, message: String, pod_name: Option<String>) -> Result<Action, Error> {
        tracing::info!(restore = %key(self.restore), %reason, %message, "restore failed");
        let now = (self.ctx.now)();
        let status = RestoreStatus {
            phase: Phase::Failed,
            observed_generation: self.restore.metadata.generation,
            pod_name,
            message: Some(message.clone()),
            conditions: vec![self.condition(false, reason, message.clone(), &now)],
        };
        self.write(&status).await?;
        self.event(EventType::Warning, reason, message).await;
        Ok(Action::await_change())
    }

    /// The `Ready` condition of this generation, keeping its transition time when its status did not
    /// change.
    fn condition(&self, ready: bool, reason: &str, message: String, now: &Time) -> Condition {
        let previous = self.restore.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
        status::condition(previous, self.restore.metadata.generation, READY, ready, reason, message, now)
    }

    /// Writes the whole status (server-side apply on the status subresource).
    async fn write(&self, restore_status: &RestoreStatus) -> Result<(), Error> {
        let value = serde_json::to_value(restore_status)
            .map_err(|source| Error::Serialize { name: self.name.to_string(), source })?;
        status::apply(self.api, self.name, value).await.map_err(|source| Error::PatchStatus {
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            source,
        })
    }

    /// Publishes an Event on the Restore; a failure to is only logged.
    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let object = self.restore.object_ref(&());
        status::publish(&self.ctx.recorder, &object, type_, "Restore", reason, note).await;
    }
}
