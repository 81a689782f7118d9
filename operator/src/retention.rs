//! Which pod checkpoints a CheckpointPolicy keeps: the newest `retention` of each pod identity, in
//! its store and on the nodes; and the store side of that, [`BundleStores`], which the policy
//! controller prunes through (the real one is [`crate::store_index::StoreIndex`]).

use async_trait::async_trait;

use crate::identity::PodIdentity;

/// One pod checkpoint in a store: every container's archive of one pod at one time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPodCheckpoint {
    /// The pod it was taken of.
    pub pod: String,
    /// Its time (RFC 3339, UTC), the same for every container.
    pub time: String,
    /// The store keys of its archives.
    pub keys: Vec<String>,
}

/// The stores the policies name, as the policy controller prunes them.
#[async_trait]
pub trait BundleStores: Send + Sync {
    /// The pod checkpoints in `store` of the pods `identity` continues, in any order; an error (in
    /// words, naming the store) when it cannot be listed.
    async fn pod_checkpoints(&self, store: &str, identity: &PodIdentity) -> Result<Vec<StoredPodCheckpoint>, String>;

    /// Deletes the archives `keys` of `store`; an error (in words) at the first that cannot be.
    async fn delete(&self, store: &str, keys: &[String]) -> Result<(), String>;
}

/// The pod checkpoints beyond the newest `keep`, by time (RFC 3339 UTC times sort as text; a tie
/// goes by pod name), oldest last. Nothing when `keep` covers them all.
pub fn beyond<T>(mut checkpoints: Vec<T>, keep: usize, time_of: impl Fn(&T) -> (&str, &str)) -> Vec<T> {
    checkpoints.sort_by(|a, b| time_of(b).cmp(&time_of(a)));
    if checkpoints.len() <= keep {
        return Vec::new();
    }
    checkpoints.split_off(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(pod: &str, time: &str) -> StoredPodCheckpoint {
        StoredPodCheckpoint { pod: pod.into(), time: time.into(), keys: vec![format!("ml/{pod}/app/{time}.tar")] }
    }

    fn by_time(c: &StoredPodCheckpoint) -> (&str, &str) {
        (c.time.as_str(), c.pod.as_str())
    }

    #[test]
    fn only_the_newest_are_kept() {
        let all = vec![
            at("web-0", "2026-12-01T10:00:00.000Z"),
            at("web-0", "2026-12-01T12:00:00.000Z"),
            at("web-0", "2026-12-01T11:00:00.000Z"),
            at("web-0", "2026-12-01T09:00:00.000Z"),
        ];
        let dropped = beyond(all.clone(), 2, by_time);
        assert_eq!(dropped, vec![at("web-0", "2026-12-01T10:00:00.000Z"), at("web-0", "2026-12-01T09:00:00.000Z")]);
        assert_eq!(beyond(all.clone(), 4, by_time), Vec::new());
        assert_eq!(beyond(all, 0, by_time).len(), 4, "keep 0 drops every one");
    }
}
