//! From a request's target to a containerd container of Kybernate's runtime with a running task,
//! through containerd's gRPC API (`containerd-client`).
//!
//! A pod target names the CRI labels kubelet's containers carry in containerd namespace `k8s.io`;
//! a task target names a containerd namespace and container id directly.

use std::path::Path;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{Container, GetContainerRequest, GetRequest, ListContainersRequest};
use containerd_client::types::v1::Status as TaskStatus;
use tonic::transport::{Channel, Endpoint};

use crate::error::{AgentError, Result};

/// The containerd namespace of kubelet's containers.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// CRI's label with the pod's Kubernetes namespace.
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// CRI's label with the pod's name.
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
/// CRI's label with the container's name in its pod.
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";

/// What a checkpoint request points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Kubernetes container: pod namespace, pod name, container name.
    Pod {
        /// The pod's Kubernetes namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The container's name in the pod.
        container: String,
    },
    /// A containerd container.
    Task {
        /// containerd namespace.
        namespace: String,
        /// containerd container id.
        id: String,
    },
}

/// The names of a container's node bundle directory, `<namespace>/<pod>/<container>/<time>`, as a
/// checkpoint on stop names them: the CRI labels, else the containerd namespace and the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleNames {
    /// The Kubernetes namespace, or the containerd namespace.
    pub namespace: String,
    /// The pod name, or the container id.
    pub pod: String,
    /// The container name, or the container id.
    pub container: String,
}

impl BundleNames {
    /// The names of `container`'s bundles (containerd namespace `namespace`).
    pub fn of(namespace: &str, container: &Container) -> Self {
        let label = |key: &str, fallback: &str| container.labels.get(key).cloned().unwrap_or_else(|| fallback.into());
        BundleNames {
            namespace: label(POD_NAMESPACE_LABEL, namespace),
            pod: label(POD_NAME_LABEL, &container.id),
            container: label(CONTAINER_NAME_LABEL, &container.id),
        }
    }
}

/// The container of `containers` that a pod target names: the newest one with the pod's three CRI
/// labels (kubelet keeps the exited containers of earlier attempts beside the current one).
pub fn select_pod_container<'a>(
    containers: &'a [Container],
    namespace: &str,
    name: &str,
    container: &str,
) -> Option<&'a Container> {
    let wanted = [(POD_NAMESPACE_LABEL, namespace), (POD_NAME_LABEL, name), (CONTAINER_NAME_LABEL, container)];
    containers
        .iter()
        .filter(|c| wanted.iter().all(|(key, value)| c.labels.get(*key).map(String::as_str) == Some(*value)))
        .max_by_key(|c| c.created_at.as_ref().map(|t| (t.seconds, t.nanos)))
}

/// A lazily connecting channel to containerd's socket (it reconnects when containerd restarts).
pub fn containerd_channel(socket: &Path) -> Result<Channel> {
    let path = socket.to_path_buf();
    let endpoint = Endpoint::try_from("http://[::]")
        .map_err(|source| AgentError::Connect { path: socket.to_path_buf(), source })?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        })),
    )
}

fn namespaced<T>(namespace: &str, message: T) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let value = namespace
        .parse()
        .map_err(|_| AgentError::InvalidArgument(format!("containerd namespace {namespace:?} is not a valid name")))?;
    request.metadata_mut().insert("containerd-namespace", value);
    Ok(request)
}

/// A container checked to be Kybernate's, with a task that can be checkpointed.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// containerd namespace.
    pub namespace: String,
    /// containerd container id.
    pub id: String,
    /// The names of its bundle directory.
    pub names: BundleNames,
}

/// The containerd container (namespace, id) `target` names; NotFound when there is none.
pub async fn locate(channel: &Channel, target: &Target) -> Result<(String, String)> {
    match target {
        Target::Task { namespace, id } => Ok((namespace.clone(), id.clone())),
        Target::Pod { namespace, name, container } => {
            let filter = format!(
                "labels.\"{POD_NAMESPACE_LABEL}\"=={namespace},labels.\"{POD_NAME_LABEL}\"=={name},\
                 labels.\"{CONTAINER_NAME_LABEL}\"=={container}"
            );
            let request = namespaced(CRI_NAMESPACE, ListContainersRequest { filters: vec![filter] })?;
            let listed = ContainersClient::new(channel.clone())
                .list(request)
                .await
                .map_err(|source| AgentError::Containerd {
                    what: format!("listing the containers of pod {namespace}/{name}"),
                    source: Box::new(source),
                })?
                .into_inner();
            match select_pod_container(&listed.containers, namespace, name, container) {
                Some(c) => Ok((CRI_NAMESPACE.to_string(), c.id.clone())),
                None => Err(AgentError::NotFound(format!(
                    "no container {container} of pod {namespace}/{name} in containerd namespace {CRI_NAMESPACE} on this node"
                ))),
            }
        }
    }
}

/// Checks that container `id` of `namespace` exists (NotFound), is run by Kybernate's runtime and
/// has a running or paused task (FailedPrecondition, naming what it has).
pub async fn check(channel: &Channel, namespace: &str, id: &str) -> Result<Resolved> {
    let request = namespaced(namespace, GetContainerRequest { id: id.to_string() })?;
    let container = match ContainersClient::new(channel.clone()).get(request).await {
        Ok(response) => response.into_inner().container,
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(source) => {
            return Err(AgentError::Containerd {
                what: format!("getting container {namespace}/{id}"),
                source: Box::new(source),
            })
        }
    }
    .ok_or_else(|| AgentError::NotFound(format!("no container {id} in containerd namespace {namespace}")))?;
    let runtime = container.runtime.as_ref().map(|r| r.name.as_str()).unwrap_or_default();
    if runtime != kybernate_shim::RUNTIME_ID {
        return Err(AgentError::FailedPrecondition(format!(
            "container {namespace}/{id} is run by runtime {runtime:?}, not {}: only containers of Kybernate's runtime \
             (RuntimeClass kybernate) can be checkpointed",
            kybernate_shim::RUNTIME_ID
        )));
    }
    let request = namespaced(namespace, GetRequest { container_id: id.to_string(), exec_id: String::new() })?;
    let process = match TasksClient::new(channel.clone()).get(request).await {
        Ok(response) => response.into_inner().process,
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(source) => {
            return Err(AgentError::Containerd {
                what: format!("getting the task of {namespace}/{id}"),
                source: Box::new(source),
            })
        }
    };
    let status = process.map(|p| TaskStatus::try_from(p.status).unwrap_or(TaskStatus::Unknown));
    match status {
        Some(TaskStatus::Running | TaskStatus::Paused) => {}
        Some(other) => {
            return Err(AgentError::FailedPrecondition(format!(
                "the task of container {namespace}/{id} is {}: only a running (or paused) task can be checkpointed",
                other.as_str_name().to_lowercase()
            )))
        }
        None => {
            return Err(AgentError::FailedPrecondition(format!(
                "container {namespace}/{id} has no task: only a running task can be checkpointed"
            )))
        }
    }
    Ok(Resolved { namespace: namespace.to_string(), id: id.to_string(), names: BundleNames::of(namespace, &container) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str, labels: &[(&str, &str)], created: i64) -> Container {
        Container {
            id: id.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            created_at: Some(prost_types::Timestamp { seconds: created, nanos: 0 }),
            ..Default::default()
        }
    }

    const WEB: [(&str, &str); 3] =
        [(POD_NAMESPACE_LABEL, "shop"), (POD_NAME_LABEL, "web-0"), (CONTAINER_NAME_LABEL, "app")];

    #[test]
    fn pods_resolve_to_their_newest_container() {
        let sidecar = [(POD_NAMESPACE_LABEL, "shop"), (POD_NAME_LABEL, "web-0"), (CONTAINER_NAME_LABEL, "log")];
        let sandbox = [(POD_NAMESPACE_LABEL, "shop"), (POD_NAME_LABEL, "web-0")];
        let other_ns = [(POD_NAMESPACE_LABEL, "dev"), (POD_NAME_LABEL, "web-0"), (CONTAINER_NAME_LABEL, "app")];
        let all = [
            container("sandbox", &sandbox, 1),
            container("first-attempt", &WEB, 2),
            container("log", &sidecar, 3),
            container("restarted", &WEB, 4),
            container("dev", &other_ns, 5),
        ];
        assert_eq!(select_pod_container(&all, "shop", "web-0", "app").map(|c| c.id.as_str()), Some("restarted"));
        assert_eq!(select_pod_container(&all, "shop", "web-0", "log").map(|c| c.id.as_str()), Some("log"));
        assert_eq!(select_pod_container(&all, "dev", "web-0", "app").map(|c| c.id.as_str()), Some("dev"));
        assert_eq!(select_pod_container(&all, "shop", "web-1", "app"), None);
        assert_eq!(select_pod_container(&all, "shop", "web-0", ""), None, "the sandbox is no container of the pod");
    }

    #[test]
    fn bundle_names_follow_checkpoint_on_stop() {
        let pod = BundleNames::of(CRI_NAMESPACE, &container("abc123", &WEB, 1));
        assert_eq!(pod, BundleNames { namespace: "shop".into(), pod: "web-0".into(), container: "app".into() });
        let plain = BundleNames::of("default", &container("counter", &[], 1));
        assert_eq!(
            plain,
            BundleNames { namespace: "default".into(), pod: "counter".into(), container: "counter".into() }
        );
    }
}
