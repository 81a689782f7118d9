//! Which pod checkpoints a new pod may resume from: its identity across re-creation, and the index
//! of the store's pod checkpoints that the webhook asks.

use k8s_openapi::api::core::v1::Pod;

/// Which pods' checkpoints a new pod takes as its own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PodMatch {
    /// The pod with exactly this name (the name is stable across re-creation).
    Named(String),
    /// Any pod whose name starts with this (`<owner>-`, for names the owner generates).
    Prefixed(String),
}

/// A pod's identity across re-creation, in its namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodIdentity {
    /// The Kubernetes namespace.
    pub namespace: String,
    /// Which earlier pods it continues.
    pub pods: PodMatch,
}

/// The identity of `pod` (created in `namespace`):
/// - a StatefulSet's pod, or a pod without a controller: its name (`web-0` stays `web-0`);
/// - a ReplicaSet's or a Job's pod, whose name is generated: any pod of the same owner. A
///   ReplicaSet's name carries its pod-template hash, so a Deployment with a changed template does
///   not resume pods of the old one.
///
/// `None` when it has no name and no controller (nothing to match on).
pub fn identity(pod: &Pod, namespace: &str) -> Option<PodIdentity> {
    let controller = pod.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    let pods = match controller {
        Some(owner) if matches!(owner.kind.as_str(), "ReplicaSet" | "Job") => {
            PodMatch::Prefixed(format!("{}-", owner.name))
        }
        _ => PodMatch::Named(pod.metadata.name.clone().filter(|n| !n.is_empty())?),
    };
    Some(PodIdentity { namespace: namespace.to_string(), pods })
}

/// The pod checkpoints a store holds, as the webhook needs them.
pub trait PodCheckpointIndex {
    /// The newest sealed pod checkpoint in `store` of a pod `identity` continues, as the reference
    /// `kybernate.io/restore-from` takes (`<store>/<namespace>/<pod>#<time>`); `None` when there is
    /// none; an error (in words) when the store cannot be asked.
    fn newest(&self, store: &str, identity: &PodIdentity) -> Result<Option<String>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn pod(name: Option<&str>, owner: Option<&str>) -> Pod {
        let owner_references = owner.map(|kind| {
            vec![OwnerReference {
                kind: kind.into(),
                name: "trainer-7d9f8b6c5".into(),
                controller: Some(true),
                ..Default::default()
            }]
        });
        Pod {
            metadata: ObjectMeta { name: name.map(Into::into), owner_references, ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn identities_follow_the_controller() {
        let named = |n: &str| Some(PodIdentity { namespace: "ml".into(), pods: PodMatch::Named(n.into()) });
        assert_eq!(identity(&pod(Some("web-0"), Some("StatefulSet")), "ml"), named("web-0"));
        assert_eq!(identity(&pod(Some("solo"), None), "ml"), named("solo"));
        let owned = PodIdentity { namespace: "ml".into(), pods: PodMatch::Prefixed("trainer-7d9f8b6c5-".into()) };
        assert_eq!(identity(&pod(None, Some("ReplicaSet")), "ml").as_ref(), Some(&owned));
        assert_eq!(identity(&pod(None, Some("Job")), "ml").map(|i| i.pods), Some(owned.pods));
        assert_eq!(identity(&pod(None, None), "ml"), None);
    }
}
