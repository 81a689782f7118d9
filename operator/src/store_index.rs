//! The real [`PodCheckpointIndex`] and [`BundleStores`]: the sidecar's stores (filesystem or S3),
//! listed for the pod checkpoints of the pods an identity continues (the webhook takes the newest,
//! the policy controller deletes those beyond the retention).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use checkpoint_core::pod::PodEntry;
use kybernate_sidecar::store::{S3Options, Store, StoreLocation};

use crate::identity::{PodCheckpointIndex, PodIdentity, PodMatch};
use crate::retention::{BundleStores, StoredPodCheckpoint};

/// A store index over the sidecar's stores, reached with `s3` for S3 stores.
#[derive(Debug, Clone, Default)]
pub struct StoreIndex {
    /// How S3 stores are reached (endpoint, credentials from the environment when `None`).
    pub s3: S3Options,
}

impl StoreIndex {
    /// Opens `store`.
    async fn open(&self, store: &str) -> Result<Arc<dyn Store>, String> {
        let location = StoreLocation::parse(store).map_err(|e| e.to_string())?;
        location.open(&self.s3).await.map_err(|e| e.to_string())
    }

    /// Runs `work` on a runtime of its own, in a thread of its own, so a caller inside an async
    /// runtime (the webhook's sync decision) is never blocked from inside it.
    fn blocking<T: Send>(
        &self,
        work: impl std::future::Future<Output = Result<T, String>> + Send,
    ) -> Result<T, String> {
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("starting a runtime: {e}"))?;
                    runtime.block_on(work)
                })
                .join()
                .unwrap_or_else(|_| Err("listing the store panicked".into()))
        })
    }
}

/// The pod checkpoints in `store` of the pods `identity` continues: keys
/// `<namespace>/<pod>/<container>/<time>.tar…`, one pod checkpoint per pod and time.
async fn pod_checkpoints(store: &dyn Store, identity: &PodIdentity) -> Result<Vec<StoredPodCheckpoint>, String> {
    let namespace = format!("{}/", identity.namespace);
    let prefix = match &identity.pods {
        PodMatch::Named(name) => format!("{namespace}{name}/"),
        PodMatch::Prefixed(start) => format!("{namespace}{start}"),
    };
    let objects = store.list(&prefix).await.map_err(|e| e.to_string())?;
    let mut checkpoints: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for object in objects {
        let Some((pod, rel)) = object.key.strip_prefix(&namespace).and_then(|rest| rest.split_once('/')) else {
            continue;
        };
        let matches = match &identity.pods {
            PodMatch::Named(name) => pod == name,
            PodMatch::Prefixed(start) => pod.starts_with(start.as_str()),
        };
        if let (true, Some(entry)) = (matches, PodEntry::parse(rel)) {
            checkpoints.entry((pod.to_string(), entry.time)).or_default().push(object.key.clone());
        }
    }
    Ok(checkpoints.into_iter().map(|((pod, time), keys)| StoredPodCheckpoint { pod, time, keys }).collect())
}

#[async_trait]
impl BundleStores for StoreIndex {
    async fn pod_checkpoints(&self, store: &str, identity: &PodIdentity) -> Result<Vec<StoredPodCheckpoint>, String> {
        let opened = self.open(store).await?;
        pod_checkpoints(opened.as_ref(), identity).await.map_err(|e| format!("listing {store}: {e}"))
    }

    async fn delete(&self, store: &str, keys: &[String]) -> Result<(), String> {
        let opened = self.open(store).await?;
        for key in keys {
            opened.delete(key).await.map_err(|e| format!("deleting {key} from {store}: {e}"))?;
        }
        Ok(())
    }
}

impl PodCheckpointIndex for StoreIndex {
    fn newest(&self, store: &str, identity: &PodIdentity) -> Result<Option<String>, String> {
        let checkpoints = self.blocking(async {
            let opened = self.open(store).await?;
            pod_checkpoints(opened.as_ref(), identity).await
        })?;
        let newest = checkpoints.into_iter().map(|c| (c.time, c.pod)).max();
        let namespace = &identity.namespace;
        Ok(newest.map(|(time, pod)| format!("{}/{namespace}/{pod}#{time}", store.trim_end_matches('/'))))
    }
}
