//! The `kybernate.agent.v1.Agent` service: Checkpoint (through the shim, one per container at a
//! time, pushed by the sidecar when a store is given), List and Delete over the node checkpoint
//! directory, Status, and the stream of checkpoint events.

use std::collections::HashSet;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kybernate_proto::kybernate::agent::v1 as api;
use kybernate_proto::kybernate::agent::v1::agent_server::Agent;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::bundles::{self, Filter};
use crate::error::{AgentError, Result};
use crate::metrics::{Metrics, Outcome};
use crate::push::Sidecar;
use crate::resolve::{self, Target};

/// What the agent needs to know about its node.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's name (Status).
    pub node_name: String,
    /// containerd's state directory (the shims' addresses are in its task bundle directories).
    pub containerd_state: PathBuf,
    /// The node checkpoint directory (the shim config's `checkpoint_dir`).
    pub checkpoint_dir: PathBuf,
    /// The CRIU binary (the shim config's `criu_binary`), for Status.
    pub criu_binary: PathBuf,
    /// How the sidecar is run for a push.
    pub sidecar: Sidecar,
    /// The store checkpoints are pushed to when a request names none.
    pub store: Option<String>,
    /// How long one checkpoint through the shim may take.
    pub checkpoint_timeout: Duration,
}

/// How many checkpoint events a slow Events client may fall behind before it misses some.
const EVENT_BACKLOG: usize = 256;

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct AgentService {
    config: Arc<AgentConfig>,
    containerd: Channel,
    busy: Arc<Mutex<HashSet<(String, String)>>>,
    events: tokio::sync::broadcast::Sender<api::CheckpointEvent>,
    metrics: Metrics,
}

/// A container's checkpoint slot, released when dropped.
struct Slot {
    busy: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

impl AgentService {
    /// A service over containerd's `containerd` channel, counting into `metrics`.
    pub fn new(config: AgentConfig, containerd: Channel, metrics: Metrics) -> Self {
        let (events, _) = tokio::sync::broadcast::channel(EVENT_BACKLOG);
        AgentService { config: Arc::new(config), containerd, busy: Arc::default(), events, metrics }
    }

    fn slot(&self, namespace: &str, id: &str) -> Result<Slot> {
        let key = (namespace.to_string(), id.to_string());
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(key.clone()) {
            return Err(AgentError::Busy { namespace: key.0, id: key.1 });
        }
        Ok(Slot { busy: self.busy.clone(), key })
    }

    fn event(&self, namespace: &str, id: &str, phase: api::Phase, bundle: &str, bytes: u64, message: String) {
        // No subscriber is no error: events are for whoever listens now.
        let _ = self.events.send(api::CheckpointEvent {
            namespace: namespace.into(),
            id: id.into(),
            phase: phase.into(),
            bundle: bundle.into(),
            bytes,
            message,
        });
    }

    /// Checkpoints the container `target` names into a new node bundle; see the service docs.
    pub async fn checkpoint(&self, req: api::CheckpointRequest) -> Result<api::CheckpointResponse> {
        let target = match req.target {
            Some(api::checkpoint_request::Target::Pod(p)) => {
                Target::Pod { namespace: p.namespace, name: p.name, container: p.container }
            }
            Some(api::checkpoint_request::Target::Task(t)) => Target::Task { namespace: t.namespace, id: t.id },
            None => return Err(AgentError::InvalidArgument("the request names no target: set pod or task".into())),
        };
        let (namespace, id) = resolve::locate(&self.containerd, &target).await?;
        let _slot = self.slot(&namespace, &id)?;
        let _in_flight = self.metrics.in_flight();
        let result = self.checkpoint_held(&namespace, &id, !req.leave_running.unwrap_or(true), req.store).await;
        if let Err(e) = &result {
            if outcome(&result) == Outcome::Failed {
                self.event(&namespace, &id, api::Phase::Failed, "", 0, e.chain());
            }
        }
        result
    }

    /// The checkpoint of container `id`, its slot held.
    async fn checkpoint_held(
        &self,
        namespace: &str,
        id: &str,
        exit: bool,
        store: String,
    ) -> Result<api::CheckpointResponse> {
        let (namespace, id) = (namespace.to_string(), id.to_string());
        let resolved = resolve::check(&self.containerd, &namespace, &id).await?;
        let names = &resolved.names;
        let dir = checkpoint_core::bundle::bundle_dir(
            &self.config.checkpoint_dir,
            &names.namespace,
            &names.pod,
            &names.container,
            SystemTime::now(),
        )
        .map_err(|source| AgentError::InvalidArgument(source.to_string()))?;
        let shown = dir.display().to_string();
        self.event(&namespace, &id, api::Phase::Started, "", 0, String::new());
        let address =
            crate::shim::shim_address(&crate::shim::task_bundle(&self.config.containerd_state, &namespace, &id))?;
        self.event(&namespace, &id, api::Phase::Dumping, &shown, 0, String::new());
        let timeout = self.config.checkpoint_timeout;
        let (shim_id, shim_dir) = (id.clone(), dir.clone());
        tokio::task::spawn_blocking(move || crate::shim::checkpoint(&address, &shim_id, &shim_dir, exit, timeout))
            .await
            .map_err(|e| AgentError::io("the checkpoint thread", std::io::Error::other(e.to_string())))??;
        let manifest = bundles::manifest(&dir);
        let bytes = manifest.as_ref().map(bundles::bytes).unwrap_or_default();
        self.event(&namespace, &id, api::Phase::Sealed, &shown, bytes, String::new());
        tracing::info!(namespace = %namespace, id = %id, bundle = %shown, bytes, exit, "checkpoint sealed");
        let store = Some(store).filter(|s| !s.is_empty()).or_else(|| self.config.store.clone());
        let stored_reference = match store {
            Some(store) => {
                let reference = self.config.sidecar.push(&self.config.checkpoint_dir, &dir, &store).await?;
                self.event(&namespace, &id, api::Phase::Pushed, &shown, bytes, reference.clone());
                tracing::info!(bundle = %shown, reference = %reference, "bundle pushed");
                reference
            }
            None => String::new(),
        };
        let time = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(api::CheckpointResponse {
            bundle: Some(api::Bundle {
                path: shown,
                namespace: names.namespace.clone(),
                pod: names.pod.clone(),
                container: names.container.clone(),
                time,
                container_id: id,
                bytes,
            }),
            stored_reference,
        })
    }

    /// What this node is and has.
    pub async fn status(&self) -> api::StatusResponse {
        let criu = checkpoint_core::Criu::new(self.config.criu_binary.clone());
        let criu_version = match tokio::task::spawn_blocking(move || criu.version()).await {
            Ok(Ok(version)) => version.to_string(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Status: no CRIU version");
                String::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "Status: no CRIU version");
                String::new()
            }
        };
        api::StatusResponse {
            node_name: self.config.node_name.clone(),
            criu_version,
            gpus: nvidia_devices("/dev".as_ref()),
            checkpoint_dir: self.config.checkpoint_dir.display().to_string(),
            store: self.config.store.clone().unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The NVIDIA GPUs in `dev`: its `nvidiaN` device files (no NVML needed).
pub fn nvidia_devices(dev: &std::path::Path) -> u32 {
    let gpus = std::fs::read_dir(dev)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("nvidia"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count();
    u32::try_from(gpus).unwrap_or(u32::MAX)
}

/// The outcome label of a checkpoint result.
fn outcome(result: &Result<api::CheckpointResponse>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(AgentError::Busy { .. }) => Outcome::Busy,
        Err(AgentError::NotFound(_) | AgentError::FailedPrecondition(_) | AgentError::InvalidArgument(_)) => {
            Outcome::Refused
        }
        Err(_) => Outcome::Failed,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<api::CheckpointEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn checkpoint(
        &self,
        request: Request<api::CheckpointRequest>,
    ) -> Result<Response<api::CheckpointResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let target = format!("{:?}", req.target);
        let result = AgentService::checkpoint(self, req).await;
        let outcome = outcome(&result);
        self.metrics.record(outcome, started.elapsed().as_secs_f64());
        match result {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => {
                let message = e.chain();
                tracing::warn!(target = %target, code = ?e.code(), error = %message, "checkpoint refused or failed");
                Err(e.into())
            }
        }
    }

    async fn list(&self, request: Request<api::ListRequest>) -> Result<Response<api::ListResponse>, Status> {
        let r = request.into_inner();
        let filter = Filter { namespace: r.namespace, pod: r.pod, container: r.container };
        let root = self.config.checkpoint_dir.clone();
        let bundles = tokio::task::spawn_blocking(move || bundles::list(&root, &filter))
            .await
            .map_err(|e| Status::internal(format!("listing bundles: {e}")))?;
        Ok(Response::new(api::ListResponse { bundles }))
    }

    async fn delete(&self, request: Request<api::DeleteRequest>) -> Result<Response<api::DeleteResponse>, Status> {
        let path = request.into_inner().path;
        let root = self.config.checkpoint_dir.clone();
        let removed = tokio::task::spawn_blocking(move || bundles::delete(&root, &path))
            .await
            .map_err(|e| Status::internal(format!("deleting a bundle: {e}")))?
            .map_err(|e| {
                tracing::warn!(code = ?e.code(), error = %e.chain(), "delete refused or failed");
                Status::from(e)
            })?;
        tracing::info!(bundle = %removed.display(), "bundle deleted");
        Ok(Response::new(api::DeleteResponse { path: removed.display().to_string() }))
    }

    async fn status(&self, _request: Request<api::StatusRequest>) -> Result<Response<api::StatusResponse>, Status> {
        Ok(Response::new(AgentService::status(self).await))
    }

    type EventsStream = EventStream;

    async fn events(&self, _request: Request<api::EventsRequest>) -> Result<Response<Self::EventsStream>, Status> {
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(self.events.subscribe()).filter_map(|event| match event {
                Ok(event) => Some(Ok(event)),
                // A client that fell behind misses the oldest events and goes on with the rest.
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "an Events client fell behind");
                    None
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_counted_by_their_device_files() {
        let dev = tempfile::tempdir().unwrap();
        for name in ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-caps", "null"] {
            std::fs::write(dev.path().join(name), "").unwrap();
        }
        assert_eq!(nvidia_devices(dev.path()), 2);
        assert_eq!(nvidia_devices(&dev.path().join("missing")), 0);
    }
}
