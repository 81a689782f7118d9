//! The `CheckpointPolicy` controller: keeps each [`CheckpointPolicy`]'s pods annotated with it,
//! checkpoints them on its `interval`, and keeps only its `retention` newest pod checkpoints of each
//! pod identity, in its store and on the nodes. One reconcile does all of it, in this order:
//!
//! 1. the policy's pods are listed (its namespace, its selector; pods that ended or are being
//!    deleted do not count). Each gets the annotation `kybernate.io/checkpoint-policy: <policy>`
//!    (a merge patch) when it lacks it. Pods that do not run on Kybernate (`runtimeClassName` other
//!    than `kybernate`: created before the policy, or while the webhook was down) are named in the
//!    `PodsCovered` condition: only re-creating them puts them on Kybernate;
//! 2. with an `interval`, once `lastCheckpoint` (or the policy's creation) is that long ago, every
//!    running pod of it on Kybernate gets a [`Checkpoint`] owned by the policy, named after the
//!    policy, the pod and the time it was due (so a reconcile repeated after a lost answer creates
//!    none twice), and `lastCheckpoint` becomes now;
//! 3. retention: of the Checkpoints the policy created, those beyond the newest `retention` per pod
//!    that are done (Succeeded or Failed) are deleted; in the policy's store, the pod checkpoints of
//!    each pod identity beyond the newest `retention` are deleted ([`BundleStores`]); on each node
//!    that runs one of the pods, the node agent's bundles of that pod beyond the newest `retention`
//!    pod checkpoints are deleted ([`NodeAgents`]). A store or agent that cannot be reached is
//!    named in the `Retained` condition and tried again at the next reconcile;
//! 4. the status (`matchedPods`, `lastCheckpoint`, conditions `Ready`, `PodsCovered`, `Retained`) is
//!    written whole with server-side apply, and the policy is looked at again when its next
//!    checkpoint is due, at the latest after [`RESCAN`].
//!
//! The policy is reconciled again when it changes and when one of its namespace's pods is created
//! or deleted or its labels change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::chrono::{DateTime, Utc};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource as _, ResourceExt as _};
use kybernate_api::{Checkpoint, CheckpointPolicy, CheckpointPolicyStatus, CheckpointSpec, Phase};
use serde_json::json;

use crate::admission::RUNTIME_CLASS;
use crate::agents::{AgentError, ListRequest, NodeAgents};
use crate::backoff::key;
pub use crate::backoff::Backoff;
use crate::identity::{identity, PodIdentity};
use crate::retention::{beyond, BundleStores};
use crate::selector;
use crate::status::{self, MANAGER};

/// The annotation naming the policy a pod is under.
pub const POLICY_ANNOTATION: &str = "kybernate.io/checkpoint-policy";
/// The condition saying whether the policy is carried out as written.
pub const READY: &str = "Ready";
/// The condition saying whether every pod of the policy runs on Kybernate.
pub const PODS_COVERED: &str = "PodsCovered";
/// The condition saying whether the retention was applied everywhere.
pub const RETAINED: &str = "Retained";
/// The longest a policy waits before it is reconciled again (retention, pods that changed only their
/// status).
pub const RESCAN: Duration = Duration::from_secs(300);
/// The longest name of a Kubernetes object.
const MAX_NAME: usize = 253;

/// Why a reconcile did not finish; the controller retries it (see [`error_policy`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A policy without a namespace (the resource is namespaced, so the API server never sends one).
    #[error("CheckpointPolicy {0} has no namespace")]
    NoNamespace(String),
    /// An API server request failed.
    #[error("{action} for CheckpointPolicy {namespace}/{name}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The namespace.
        namespace: String,
        /// The policy.
        name: String,
        /// The API server's error.
        #[source]
        source: kube::Error,
    },
    /// The status could not be serialized (not expected: the types are plain data).
    #[error("serializing the status of CheckpointPolicy {name}: {source}")]
    Serialize {
        /// The policy.
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
    stores: Arc<dyn BundleStores>,
}

impl std::ops::Deref for Context {
    type Target = status::Base;

    fn deref(&self) -> &status::Base {
        &self.base
    }
}

impl Context {
    /// A context talking to the API server through `client`, to the nodes through `agents` and to
    /// the stores through `stores`, its Events reported as `kybernate-operator`.
    pub fn new(client: Client, agents: Arc<dyn NodeAgents>, stores: Arc<dyn BundleStores>) -> Self {
        Context { base: status::Base::new(client), agents, stores }
    }

    /// The same with another clock (tests fix it).
    pub fn with_clock(mut self, now: fn() -> Time) -> Self {
        self.base.now = now;
        self
    }
}

/// Runs the controller over every namespace's policies until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let policies: Api<CheckpointPolicy> = Api::all(ctx.client.clone());
    let controller = Controller::new(policies, watcher::Config::default());
    let known = controller.store();
    // A pod matters when it appears, goes, or its labels change; not at every status update.
    let changes = PodChanges::default();
    let results = controller
        .watches(Api::<Pod>::all(ctx.client.clone()), watcher::Config::default(), move |pod: Pod| {
            if !changes.changed(&pod) {
                return Vec::new();
            }
            let (namespace, labels) = (pod.namespace(), pod.labels().clone());
            known
                .state()
                .into_iter()
                .filter(|p| p.namespace() == namespace && selector::matches(&p.spec.selector, &labels))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx);
    crate::backoff::drive(results, "CheckpointPolicy").await;
}

/// What the controller does after a failed reconcile: try again after the policy's backoff.
pub fn error_policy(policy: Arc<CheckpointPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.backoff.retry(&key(policy.as_ref()), error)
}

/// One reconcile of a policy (see the module's documentation).
pub async fn reconcile(policy: Arc<CheckpointPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = policy.name_any();
    let namespace = policy.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    if policy.metadata.deletion_timestamp.is_some() {
        // Its Checkpoints go with it (they are owned by it); its bundles stay.
        return Ok(Action::await_change());
    }
    let step = Step { policy: &policy, ctx: &ctx, namespace: &namespace, name: &name, now: (ctx.now)() };
    let action = step.reconcile().await?;
    ctx.backoff.reset(&key(policy.as_ref()));
    Ok(action)
}

/// One reconcile of one policy.
struct Step<'a> {
    policy: &'a CheckpointPolicy,
    ctx: &'a Context,
    namespace: &'a str,
    name: &'a str,
    now: Time,
}

impl Step<'_> {
    async fn reconcile(&self) -> Result<Action, Error> {
        let pods = self.pods().await?;
        self.annotate(&pods).await?;
        let outside: Vec<&str> =
            pods.iter().filter(|p| !on_kybernate(p)).map(|p| p.metadata.name.as_deref().unwrap_or_default()).collect();

        let previous = self.policy.status.clone().unwrap_or_default();
        let mut last_checkpoint = previous.last_checkpoint.clone();
        let mut conditions = Vec::new();
        let mut next = RESCAN;
        match self.policy.spec.interval.as_deref().map(parse_interval) {
            None => conditions.push(self.condition(READY, true, "Reconciled", "no periodic checkpoints".into())),
            Some(Err(why)) => conditions.push(self.condition(READY, false, "InvalidInterval", why)),
            Some(Ok(interval)) => {
                let since = last_checkpoint.clone().or_else(|| self.policy.metadata.creation_timestamp.clone());
                let due = since.map_or(self.now.0, |t| t.0 + interval);
                if due <= self.now.0 {
                    let created = self.schedule(&pods, due).await?;
                    last_checkpoint = Some(self.now.clone());
                    next = next.min(interval.to_std().unwrap_or(RESCAN));
                    if created > 0 {
                        let note = format!("created {created} Checkpoint(s), due at {}", due.to_rfc3339());
                        self.event(EventType::Normal, "Scheduled", note).await;
                    }
                } else {
                    next = next.min((due - self.now.0).to_std().unwrap_or(RESCAN));
                }
                let message = format!("checkpoints every {}", self.policy.spec.interval.as_deref().unwrap_or_default());
                conditions.push(self.condition(READY, true, "Reconciled", message));
            }
        }
        conditions.push(if outside.is_empty() {
            self.condition(PODS_COVERED, true, "OnKybernate", "every pod of the policy runs on Kybernate".into())
        } else {
            let message = format!(
                "pods {} do not run on Kybernate (runtimeClassName {RUNTIME_CLASS}) and are neither checkpointed on \
                 stop nor periodically: re-create them so that the webhook puts them on it",
                outside.join(", ")
            );
            self.condition(PODS_COVERED, false, "NotOnKybernate", message)
        });

        let (deleted, failures) = self.retain(&pods).await?;
        if deleted > 0 {
            let note = format!("deleted {deleted} pod checkpoint(s) beyond the newest {}", self.policy.spec.retention);
            self.event(EventType::Normal, "Pruned", note).await;
        }
        conditions.push(if failures.is_empty() {
            let message = format!("at most {} pod checkpoints of each pod are kept", self.policy.spec.retention);
            self.condition(RETAINED, true, "Pruned", message)
        } else {
            self.condition(RETAINED, false, "Unreachable", failures.join("; "))
        });

        let status = CheckpointPolicyStatus {
            observed_generation: self.policy.metadata.generation,
            matched_pods: u32::try_from(pods.len()).unwrap_or(u32::MAX),
            last_checkpoint,
            conditions,
        };
        if self.policy.status.as_ref() != Some(&status) {
            let value = serde_json::to_value(&status)
                .map_err(|source| Error::Serialize { name: self.name.to_string(), source })?;
            let api: Api<CheckpointPolicy> = Api::namespaced(self.ctx.client.clone(), self.namespace);
            status::apply(&api, self.name, value)
                .await
                .map_err(|source| self.api_error("writing the status", source))?;
        }
        Ok(Action::requeue(next))
    }

    /// The pods the policy selects that have not ended and are not being deleted.
    async fn pods(&self) -> Result<Vec<Pod>, Error> {
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        let list = api.list(&ListParams::default()).await.map_err(|source| self.api_error("listing pods", source))?;
        Ok(list
            .items
            .into_iter()
            .filter(|pod| {
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                pod.metadata.deletion_timestamp.is_none()
                    && !matches!(phase, Some("Succeeded" | "Failed"))
                    && selector::matches(&self.policy.spec.selector, pod.labels())
            })
            .collect())
    }

    /// Annotates the pods that do not name the policy yet.
    async fn annotate(&self, pods: &[Pod]) -> Result<(), Error> {
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        for pod in pods {
            if pod.annotations().get(POLICY_ANNOTATION).map(String::as_str) == Some(self.name) {
                continue;
            }
            let pod_name = pod.name_any();
            let patch = Patch::Merge(json!({"metadata": {"annotations": {POLICY_ANNOTATION: self.name}}}));
            api.patch(&pod_name, &PatchParams::default(), &patch)
                .await
                .map_err(|source| self.api_error(&format!("annotating pod {pod_name}"), source))?;
        }
        Ok(())
    }

    /// Creates the Checkpoints due at `due`: one per running, scheduled pod on Kybernate. Returns how
    /// many were created (one that exists already is not counted).
    async fn schedule(&self, pods: &[Pod], due: DateTime<Utc>) -> Result<usize, Error> {
        let api: Api<Checkpoint> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        let mut created = 0;
        for pod in pods.iter().filter(|p| on_kybernate(p) && is_running(p)) {
            let pod_name = pod.name_any();
            let checkpoint = Checkpoint {
                metadata: kube::api::ObjectMeta {
                    name: Some(checkpoint_name(self.name, &pod_name, due)),
                    namespace: Some(self.namespace.to_string()),
                    owner_references: Some(vec![self.owner()]),
                    ..Default::default()
                },
                spec: CheckpointSpec {
                    pod_name: pod_name.clone(),
                    container: None,
                    store: self.policy.spec.store.clone(),
                },
                status: None,
            };
            let params = PostParams { field_manager: Some(MANAGER.to_string()), ..PostParams::default() };
            match api.create(&params, &checkpoint).await {
                Ok(_) => created += 1,
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(source) => return Err(self.api_error(&format!("creating a Checkpoint of pod {pod_name}"), source)),
            }
        }
        Ok(created)
    }

    /// Applies the retention: returns how many pod checkpoints (and Checkpoints) were deleted, and
    /// the stores and agents that could not be reached.
    async fn retain(&self, pods: &[Pod]) -> Result<(usize, Vec<String>), Error> {
        let keep = usize::try_from(self.policy.spec.retention).unwrap_or(usize::MAX);
        let mut deleted = self.retain_checkpoints(keep).await?;
        let mut failures = Vec::new();

        if let Some(store) = &self.policy.spec.store {
            let identities: BTreeSet<PodIdentity> = pods.iter().filter_map(|p| identity(p, self.namespace)).collect();
            for identity in identities {
                match self.retain_in_store(store, &identity, keep).await {
                    Ok(n) => deleted += n,
                    Err(e) => failures.push(e),
                }
            }
        }

        let on_nodes: BTreeSet<(String, String)> = pods
            .iter()
            .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone().filter(|n| !n.is_empty())?, p.name_any())))
            .collect();
        for (node, pod) in on_nodes {
            match self.retain_on_node(&node, &pod, keep).await {
                Ok(n) => deleted += n,
                Err(e) => failures.push(e.to_string()),
            }
        }
        Ok((deleted, failures))
    }

    /// Deletes the done Checkpoints the policy created beyond the newest `keep` of each pod.
    async fn retain_checkpoints(&self, keep: usize) -> Result<usize, Error> {
        let api: Api<Checkpoint> = Api::namespaced(self.ctx.client.clone(), self.namespace);
        let list =
            api.list(&ListParams::default()).await.map_err(|source| self.api_error("listing Checkpoints", source))?;
        let uid = self.policy.metadata.uid.as_deref();
        let mut by_pod: BTreeMap<String, Vec<Checkpoint>> = BTreeMap::new();
        for checkpoint in list.items {
            if checkpoint.owner_references().iter().any(|o| Some(o.uid.as_str()) == uid) {
                by_pod.entry(checkpoint.spec.pod_name.clone()).or_default().push(checkpoint);
            }
        }
        let mut deleted = 0;
        for checkpoints in by_pod.into_values() {
            let stamped: Vec<(String, Checkpoint)> = checkpoints
                .into_iter()
                .map(|c| (c.metadata.creation_timestamp.as_ref().map(|t| t.0.to_rfc3339()).unwrap_or_default(), c))
                .collect();
            for (_, checkpoint) in
                beyond(stamped, keep, |(time, c)| (time.as_str(), c.metadata.name.as_deref().unwrap_or_default()))
            {
                let done =
                    matches!(checkpoint.status.as_ref().map(|s| s.phase), Some(Phase::Succeeded | Phase::Failed));
                if !done {
                    continue;
                }
                let checkpoint_name = checkpoint.name_any();
                match api.delete(&checkpoint_name, &DeleteParams::default()).await {
                    Ok(_) => deleted += 1,
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(source) => {
                        return Err(self.api_error(&format!("deleting Checkpoint {checkpoint_name}"), source))
                    }
                }
            }
        }
        Ok(deleted)
    }

    /// Deletes the pod checkpoints of `identity` in `store` beyond the newest `keep`.
    async fn retain_in_store(&self, store: &str, identity: &PodIdentity, keep: usize) -> Result<usize, String> {
        let all = self.ctx.stores.pod_checkpoints(store, identity).await?;
        let old = beyond(all, keep, |c| (c.time.as_str(), c.pod.as_str()));
        for checkpoint in &old {
            tracing::info!(policy = %key(self.policy), %store, pod = %checkpoint.pod, time = %checkpoint.time, "deleting an old pod checkpoint");
            self.ctx.stores.delete(store, &checkpoint.keys).await?;
        }
        Ok(old.len())
    }

    /// Deletes the bundles of `pod` on `node` beyond its newest `keep` pod checkpoints.
    async fn retain_on_node(&self, node: &str, pod: &str, keep: usize) -> Result<usize, AgentError> {
        let request =
            ListRequest { namespace: self.namespace.to_string(), pod: pod.to_string(), container: String::new() };
        let mut by_time: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for bundle in self.ctx.agents.list(node, request).await? {
            by_time.entry(bundle.time).or_default().push(bundle.path);
        }
        let old = beyond(by_time.into_iter().collect(), keep, |(time, _)| (time.as_str(), ""));
        for (time, paths) in &old {
            tracing::info!(policy = %key(self.policy), %node, %pod, %time, "deleting an old pod checkpoint on the node");
            for path in paths {
                self.ctx.agents.delete(node, path).await?;
            }
        }
        Ok(old.len())
    }

    /// The owner reference of what the policy creates.
    fn owner(&self) -> OwnerReference {
        OwnerReference {
            api_version: CheckpointPolicy::api_version(&()).to_string(),
            kind: CheckpointPolicy::kind(&()).to_string(),
            name: self.name.to_string(),
            uid: self.policy.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    /// A condition of this generation, keeping its transition time when its status did not change.
    fn condition(&self, type_: &str, value: bool, reason: &str, message: String) -> Condition {
        let previous = self.policy.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
        status::condition(previous, self.policy.metadata.generation, type_, value, reason, message, &self.now)
    }

    /// An API error of `action`.
    fn api_error(&self, action: &str, source: kube::Error) -> Error {
        Error::Api {
            action: action.to_string(),
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            source,
        }
    }

    /// Publishes an Event on the policy; a failure to is only logged.
    async fn event(&self, type_: EventType, reason: &str, note: String) {
        let object = self.policy.object_ref(&());
        status::publish(&self.ctx.recorder, &object, type_, "Reconcile", reason, note).await;
    }
}

/// The labels and generation last seen of each pod (by uid), so that only a pod that appears, changes
/// its labels or is being deleted (which bumps its generation) triggers its policies.
#[derive(Default)]
struct PodChanges(Mutex<HashMap<String, u64>>);

impl PodChanges {
    /// Whether `pod` differs from when it was last seen (or was never seen).
    fn changed(&self, pod: &Pod) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (pod.labels(), pod.metadata.generation).hash(&mut hasher);
        let seen = hasher.finish();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if pod.metadata.deletion_timestamp.is_some() {
            // It is going: forget it, and say so once.
            return last.remove(&uid) != Some(seen);
        }
        last.insert(uid, seen) != Some(seen)
    }
}

/// Whether `pod` runs on Kybernate's runtime class.
fn on_kybernate(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.runtime_class_name.as_deref()) == Some(RUNTIME_CLASS)
}

/// Whether `pod` is scheduled and running.
fn is_running(pod: &Pod) -> bool {
    let scheduled = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| !n.is_empty());
    scheduled && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// The name of the Checkpoint of `pod` due at `due` under `policy`: `<policy>-<pod>-<unix seconds>`,
/// its front cut so that it fits an object name.
pub fn checkpoint_name(policy: &str, pod: &str, due: DateTime<Utc>) -> String {
    let suffix = format!("-{}", due.timestamp());
    let mut front = format!("{policy}-{pod}");
    front.truncate(MAX_NAME - suffix.len());
    let front = front.trim_end_matches(['-', '.']);
    format!("{front}{suffix}")
}

/// A policy's `interval`: numbers with units `s`, `m`, `h` or `d` (`90s`, `30m`, `1h30m`, `1d`), at
/// least one minute.
pub fn parse_interval(text: &str) -> Result<k8s_openapi::chrono::Duration, String> {
    let bad = |why: &str| format!("interval {text:?} {why}: write it like 30m, 1h30m or 1d (at least 1m)");
    let mut total: i64 = 0;
    let mut digits = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad(&format!("has the unit {c:?}"))),
        };
        let n: i64 = digits.parse().map_err(|_| bad("has a unit without a number"))?;
        total = n.checked_mul(unit).and_then(|s| total.checked_add(s)).ok_or_else(|| bad("is too long"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(bad("ends in a number without a unit"));
    }
    if total < 60 {
        return Err(bad("is shorter than a minute"));
    }
    Ok(k8s_openapi::chrono::Duration::seconds(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::chrono::TimeZone as _;

    #[test]
    fn intervals_are_read_with_their_units() {
        let secs = |t: &str| parse_interval(t).map(|d| d.num_seconds());
        assert_eq!(secs("30m"), Ok(1800));
        assert_eq!(secs("1h30m"), Ok(5400));
        assert_eq!(secs("1d"), Ok(86_400));
        assert_eq!(secs("90s"), Ok(90));
        assert_eq!(
            secs("30"),
            Err("interval \"30\" ends in a number without a unit: write it like 30m, 1h30m or 1d (at least 1m)".into())
        );
        assert!(secs("10s").unwrap_err().contains("shorter than a minute"));
        assert!(secs("5w").unwrap_err().contains("has the unit 'w'"));
        assert!(secs("m").unwrap_err().contains("without a number"));
        assert!(secs("99999999999999999d").unwrap_err().contains("too long"));
    }

    #[test]
    fn checkpoint_names_fit_an_object_name() {
        let due = Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).single().unwrap();
        assert_eq!(checkpoint_name("nightly", "web-0", due), "nightly-web-0-1735787045");
        let long = checkpoint_name("p", &"a".repeat(300), due);
        assert_eq!(long.len(), MAX_NAME);
        assert!(long.ends_with("a-1735787045"), "{long}");
    }
}
