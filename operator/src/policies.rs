//! Where the webhook gets the CheckpointPolicies from: in the cluster, a reflector of the API server's
//! (`list` + `watch` of `checkpointpolicies.kybernate.io` in every namespace, kept in memory, so an
//! admission never waits on the API server); in tests, a fixed set.

use std::future::Future;

use futures_util::StreamExt as _;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client};
use kybernate_api::CheckpointPolicy;

/// The CheckpointPolicies the webhook decides with.
pub trait PolicySource: Send + Sync {
    /// The policies of `namespace` (a policy selects pods of its own namespace only).
    fn policies(&self, namespace: &str) -> Vec<CheckpointPolicy>;
}

/// The policies of `namespace` among `all`.
fn in_namespace<'a>(all: impl Iterator<Item = &'a CheckpointPolicy>, namespace: &str) -> Vec<CheckpointPolicy> {
    all.filter(|p| p.metadata.namespace.as_deref() == Some(namespace)).cloned().collect()
}

/// A fixed set of policies (tests, or a webhook run outside a cluster).
#[derive(Debug, Clone, Default)]
pub struct StaticPolicies(pub Vec<CheckpointPolicy>);

impl PolicySource for StaticPolicies {
    fn policies(&self, namespace: &str) -> Vec<CheckpointPolicy> {
        in_namespace(self.0.iter(), namespace)
    }
}

/// The API server's policies as a reflector keeps them: the store a [`watch`] fills.
#[derive(Clone)]
pub struct ReflectedPolicies {
    store: Store<CheckpointPolicy>,
}

/// The reflector stopped before it listed the policies once.
#[derive(Debug, thiserror::Error)]
#[error("the CheckpointPolicy reflector stopped before its first list")]
pub struct NeverListed;

impl ReflectedPolicies {
    /// The policies in `store`, filled by a reflector's writer.
    pub fn new(store: Store<CheckpointPolicy>) -> Self {
        ReflectedPolicies { store }
    }

    /// Resolves once the first list of the policies is in the store.
    pub async fn ready(&self) -> Result<(), NeverListed> {
        self.store.wait_until_ready().await.map_err(|_| NeverListed)
    }
}

impl PolicySource for ReflectedPolicies {
    fn policies(&self, namespace: &str) -> Vec<CheckpointPolicy> {
        let all = self.store.state();
        in_namespace(all.iter().map(|p| p.as_ref()), namespace)
    }
}

/// A reflector of every namespace's CheckpointPolicies through `client`: the policies it keeps, and
/// the future that keeps them (run it for as long as the webhook serves). Watch errors are logged
/// and retried with kube's default backoff; they never end the future.
pub fn watch(client: Client) -> (ReflectedPolicies, impl Future<Output = ()> + Send + 'static) {
    let (store, writer) = reflector::store();
    let api: Api<CheckpointPolicy> = Api::all(client);
    let stream = watcher(api, watcher::Config::default()).default_backoff().reflect(writer).touched_objects();
    let run = async move {
        stream
            .for_each(|event| async move {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watching CheckpointPolicies failed; retrying");
                }
            })
            .await;
    };
    (ReflectedPolicies::new(store), run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(namespace: &str, name: &str) -> CheckpointPolicy {
        serde_json::from_value(json!({
            "apiVersion": "kybernate.io/v1alpha1", "kind": "CheckpointPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {}}
        }))
        .unwrap()
    }

    fn names(mut policies: Vec<CheckpointPolicy>) -> Vec<String> {
        policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        policies.into_iter().filter_map(|p| p.metadata.name).collect()
    }

    #[test]
    fn a_namespace_gets_its_own_policies_only() {
        let all = vec![policy("ml", "b"), policy("web", "c"), policy("ml", "a")];
        let fixed = StaticPolicies(all.clone());
        assert_eq!(names(fixed.policies("ml")), ["a", "b"]);
        assert_eq!(names(fixed.policies("other")), Vec::<String>::new());

        // the reflector's store as its watcher fills it: a list, then a deletion
        let (store, mut writer) = reflector::store();
        let reflected = ReflectedPolicies::new(store);
        writer.apply_watcher_event(&watcher::Event::Init);
        for p in &all {
            writer.apply_watcher_event(&watcher::Event::InitApply(p.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(names(reflected.policies("ml")), ["a", "b"]);
        assert_eq!(names(reflected.policies("web")), ["c"]);
        writer.apply_watcher_event(&watcher::Event::Delete(policy("ml", "a")));
        assert_eq!(names(reflected.policies("ml")), ["b"]);
    }

    #[tokio::test]
    async fn the_reflected_policies_are_ready_after_the_first_list() {
        let (store, mut writer) = reflector::store();
        let reflected = ReflectedPolicies::new(store);
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        reflected.ready().await.unwrap();

        let (store, writer) = reflector::store::<CheckpointPolicy>();
        drop(writer);
        assert!(ReflectedPolicies::new(store).ready().await.is_err(), "a writer gone before its first list");
    }
}
