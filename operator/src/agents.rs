//! The node agents as the controllers see them: [`NodeAgents`] checkpoints a container on the node
//! that runs it, and lists and deletes the bundles kept there. [`GrpcAgents`] dials that node's `kybernate-agent` (`kybernate.agent.v1.Agent`,
//! `proto/kybernate/agent/v1/agent.proto`) at an address made from a template (`{node}:7443`) or
//! given per node; tests put a fake in its place.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use kybernate_proto::kybernate::agent::v1::agent_client::AgentClient;
use kybernate_proto::kybernate::agent::v1::DeleteRequest;
pub use kybernate_proto::kybernate::agent::v1::{Bundle, CheckpointRequest, ListRequest};
use tonic::transport::{Channel, Endpoint};

/// Where the agent of every node listens unless told otherwise: `{node}` is the node's name.
pub const DEFAULT_ADDRESS_TEMPLATE: &str = "{node}:7443";

/// What a finished checkpoint left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointDone {
    /// The sealed bundle's directory on the node.
    pub bundle_path: String,
    /// Where the agent stored it (a `kybernate.io/restore-from` reference); `None` when it stayed on
    /// the node only.
    pub stored_reference: Option<String>,
    /// The size of the bundle's files.
    pub bytes: u64,
}

impl CheckpointDone {
    /// The reference a restore names: the stored one, or the bundle on the node when not stored.
    pub fn reference(&self) -> &str {
        self.stored_reference.as_deref().unwrap_or(&self.bundle_path)
    }
}

/// Why a node agent did not checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The node's agent address is not a URI.
    #[error("the agent address {address:?} of node {node} is not a valid URI: {reason}")]
    Address {
        /// The node.
        node: String,
        /// The address made for it.
        address: String,
        /// Why it is not valid.
        reason: String,
    },
    /// The agent could not be reached (connection refused, timeout, lost connection): worth retrying.
    #[error("the agent of node {node} at {address} is unreachable: {source}")]
    Unreachable {
        /// The node.
        node: String,
        /// The address dialed.
        address: String,
        /// What the transport said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The agent answered with an error: the request (a checkpoint, a listing, a deletion) failed.
    #[error("the agent of node {node} failed the request ({code:?}): {message}")]
    Failed {
        /// The node.
        node: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The agent's message.
        message: String,
    },
    /// The agent answered success without a bundle.
    #[error("the agent of node {node} answered without a bundle")]
    NoBundle {
        /// The node.
        node: String,
    },
}

impl AgentError {
    /// Whether trying again later may succeed (the agent was not reached), rather than the checkpoint
    /// having failed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AgentError::Unreachable { .. })
    }
}

/// The node agents of the cluster.
#[async_trait]
pub trait NodeAgents: Send + Sync {
    /// Checkpoints one container through the agent of `node`.
    async fn checkpoint(&self, node: &str, request: CheckpointRequest) -> Result<CheckpointDone, AgentError>;

    /// The sealed bundles the agent of `node` keeps that `request` selects.
    async fn list(&self, node: &str, request: ListRequest) -> Result<Vec<Bundle>, AgentError>;

    /// Deletes the bundle directory `path` on `node`.
    async fn delete(&self, node: &str, path: &str) -> Result<(), AgentError>;
}

/// Where each node's agent listens: a template for every node, with exceptions per node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAddresses {
    template: String,
    per_node: HashMap<String, String>,
}

impl Default for AgentAddresses {
    fn default() -> Self {
        AgentAddresses::new(DEFAULT_ADDRESS_TEMPLATE)
    }
}

impl AgentAddresses {
    /// Every node's agent at `template` (`host:port` or a URI), `{node}` replaced by the node name.
    pub fn new(template: impl Into<String>) -> Self {
        AgentAddresses { template: template.into(), per_node: HashMap::new() }
    }

    /// The agent of `node` at `address` instead of the template's.
    pub fn with_node(mut self, node: impl Into<String>, address: impl Into<String>) -> Self {
        self.per_node.insert(node.into(), address.into());
        self
    }

    /// The URI of `node`'s agent (`http://` unless the address names a scheme).
    pub fn uri(&self, node: &str) -> String {
        let address = match self.per_node.get(node) {
            Some(address) => address.clone(),
            None => self.template.replace("{node}", node),
        };
        if address.contains("://") {
            address
        } else {
            format!("http://{address}")
        }
    }
}

/// The files of the operator's side of mutual TLS with the agents (`kybernate_agent::tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTls {
    /// The CA bundle (PEM) the agents' certificates chain to.
    pub ca: PathBuf,
    /// The operator's client certificate chain (PEM, leaf first), of a CA the agents trust.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// The real agents, over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcAgents {
    addresses: AgentAddresses,
    connect_timeout: Duration,
    request_timeout: Duration,
    tls: Option<AgentTls>,
}

impl GrpcAgents {
    /// Agents at `addresses`, over plain HTTP/2; dialing one gives up after `connect_timeout`, a
    /// checkpoint after `request_timeout` (a GPU container's dump and upload take minutes).
    pub fn new(addresses: AgentAddresses, connect_timeout: Duration, request_timeout: Duration) -> Self {
        GrpcAgents { addresses, connect_timeout, request_timeout, tls: None }
    }

    /// The same over mutual TLS: each agent's certificate must name the host of its address.
    pub fn with_tls(mut self, tls: AgentTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Dials the agent of `node`: the one place the transport is set up.
    async fn connect(&self, node: &str) -> Result<(AgentClient<Channel>, String), AgentError> {
        let address = self.addresses.uri(node);
        let unreachable = |source: Box<dyn std::error::Error + Send + Sync>| AgentError::Unreachable {
            node: node.to_string(),
            address: address.clone(),
            source,
        };
        if let Some(tls) = &self.tls {
            let host_port = address.split_once("://").map_or(address.as_str(), |(_, rest)| rest);
            let host = host_port.rsplit_once(':').map_or(host_port, |(host, _)| host);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let dial = kybernate_agent::tls::connect(host_port, &tls.ca, &tls.cert, &tls.key, host);
            let client = match tokio::time::timeout(self.connect_timeout, dial).await {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => return Err(unreachable(Box::new(e))),
                Err(elapsed) => return Err(unreachable(Box::new(elapsed))),
            };
            return Ok((client, address.clone()));
        }
        let endpoint = Endpoint::from_shared(address.clone())
            .map_err(|e| AgentError::Address {
                node: node.to_string(),
                address: address.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(self.connect_timeout);
        let channel = endpoint.connect().await.map_err(|e| unreachable(Box::new(e)))?;
        Ok((AgentClient::new(channel), address.clone()))
    }
}

#[async_trait]
impl NodeAgents for GrpcAgents {
    async fn checkpoint(&self, node: &str, request: CheckpointRequest) -> Result<CheckpointDone, AgentError> {
        let (mut client, address) = self.connect(node).await?;
        let answer = tokio::time::timeout(self.request_timeout, client.checkpoint(request)).await.map_err(|_| {
            AgentError::Failed {
                node: node.to_string(),
                code: tonic::Code::DeadlineExceeded,
                message: format!("no answer within {:?}", self.request_timeout),
            }
        })?;
        let response = answer.map_err(|status| answer_error(node, &address, status))?.into_inner();
        let bundle = response.bundle.ok_or_else(|| AgentError::NoBundle { node: node.to_string() })?;
        Ok(CheckpointDone {
            bundle_path: bundle.path,
            stored_reference: Some(response.stored_reference).filter(|r| !r.is_empty()),
            bytes: bundle.bytes,
        })
    }

    async fn list(&self, node: &str, request: ListRequest) -> Result<Vec<Bundle>, AgentError> {
        let (mut client, address) = self.connect(node).await?;
        let answer = client.list(request).await.map_err(|status| answer_error(node, &address, status))?;
        Ok(answer.into_inner().bundles)
    }

    async fn delete(&self, node: &str, path: &str) -> Result<(), AgentError> {
        let (mut client, address) = self.connect(node).await?;
        let request = DeleteRequest { path: path.to_string() };
        client.delete(request).await.map_err(|status| answer_error(node, &address, status))?;
        Ok(())
    }
}

/// The error of an agent's answer `status`: `UNAVAILABLE` (the connection went away before an
/// answer) is the transport's failure, not the agent's.
fn answer_error(node: &str, address: &str, status: tonic::Status) -> AgentError {
    match status.code() {
        tonic::Code::Unavailable => {
            AgentError::Unreachable { node: node.to_string(), address: address.to_string(), source: Box::new(status) }
        }
        code => AgentError::Failed { node: node.to_string(), code, message: status.message().to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_come_from_the_template_or_the_node() {
        let addresses = AgentAddresses::default().with_node("gpu-1", "10.0.0.7:9000");
        assert_eq!(addresses.uri("worker-a"), "http://worker-a:7443");
        assert_eq!(addresses.uri("gpu-1"), "http://10.0.0.7:9000");
        assert_eq!(AgentAddresses::new("https://{node}.agents:443").uri("n"), "https://n.agents:443");
    }

    #[tokio::test]
    async fn an_agent_that_does_not_listen_is_unreachable() {
        // A port nothing listens on: bind one, then free it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let agents = GrpcAgents::new(
            AgentAddresses::new(format!("127.0.0.1:{port}")),
            Duration::from_secs(2),
            Duration::from_secs(2),
        );
        let err = agents.checkpoint("n", CheckpointRequest::default()).await.expect_err("nothing listens");
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("unreachable"), "{err}");
    }

    #[tokio::test]
    async fn an_invalid_address_is_not_retried() {
        let agents =
            GrpcAgents::new(AgentAddresses::new("bad address {node}"), Duration::from_secs(1), Duration::from_secs(1));
        let err = agents.checkpoint("n", CheckpointRequest::default()).await.expect_err("not a URI");
        assert!(!err.is_retryable(), "{err}");
    }
}
