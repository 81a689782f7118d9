//! The real [`PodCheckpointIndex`]: the sidecar's listing of a store (filesystem or S3), read for the
//! newest pod checkpoint of the pods an identity continues.

use checkpoint_core::pod::PodEntry;
use kybernate_sidecar::store::{S3Options, StoreLocation};

use crate::identity::{PodCheckpointIndex, PodIdentity, PodMatch};

/// A store index over the sidecar's stores, reached with `s3` for S3 stores.
#[derive(Debug, Clone, Default)]
pub struct StoreIndex {
    /// How S3 stores are reached (endpoint, credentials from the environment when `None`).
    pub s3: S3Options,
}

impl StoreIndex {
    /// The listing of `store` under `prefix`, on a runtime of its own (in a thread of its own, so an
    /// async caller is never blocked from inside its runtime).
    fn list(&self, store: &str, prefix: &str) -> Result<Vec<String>, String> {
        let location = StoreLocation::parse(store).map_err(|e| e.to_string())?;
        let (s3, prefix) = (self.s3.clone(), prefix.to_string());
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("starting a runtime: {e}"))?;
                    runtime.block_on(async {
                        let store = location.open(&s3).await.map_err(|e| e.to_string())?;
                        let objects = store.list(&prefix).await.map_err(|e| e.to_string())?;
                        Ok(objects.into_iter().map(|o| o.key).collect())
                    })
                })
                .join()
                .unwrap_or_else(|_| Err("listing the store panicked".into()))
        })
    }
}

impl PodCheckpointIndex for StoreIndex {
    fn newest(&self, store: &str, identity: &PodIdentity) -> Result<Option<String>, String> {
        let namespace = format!("{}/", identity.namespace);
        let prefix = match &identity.pods {
            PodMatch::Named(name) => format!("{namespace}{name}/"),
            PodMatch::Prefixed(start) => format!("{namespace}{start}"),
        };
        // <namespace>/<pod>/<container>/<time>.tar…: the newest time of any container of a matching pod
        let newest = self
            .list(store, &prefix)?
            .iter()
            .filter_map(|key| {
                let (pod, rel) = key.strip_prefix(&namespace)?.split_once('/')?;
                let entry = PodEntry::parse(rel)?;
                let matches = match &identity.pods {
                    PodMatch::Named(name) => pod == name,
                    PodMatch::Prefixed(start) => pod.starts_with(start.as_str()),
                };
                matches.then(|| (entry.time, pod.to_string()))
            })
            .max();
        Ok(newest.map(|(time, pod)| format!("{}/{namespace}{pod}#{time}", store.trim_end_matches('/'))))
    }
}
