//! The agent's errors, each mapped to the gRPC code a client acts on; the message keeps the whole
//! source chain.

use std::path::PathBuf;

/// What can go wrong serving the agent's API.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed or names something the agent refuses to touch.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such container or bundle.
    #[error("{0}")]
    NotFound(String),
    /// The container exists but cannot be checkpointed by Kybernate now (wrong runtime, no running task).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A checkpoint of the same container is already running.
    #[error(
        "container {namespace}/{id} is busy: a checkpoint of it is already running on this node; retry once it has \
         finished"
    )]
    Busy {
        /// containerd namespace.
        namespace: String,
        /// containerd container id.
        id: String,
    },
    /// containerd could not be reached.
    #[error("cannot connect to containerd at {}; is containerd running, and is --containerd-socket right?", .path.display())]
    Connect {
        /// containerd's socket.
        path: PathBuf,
        /// What tonic said.
        #[source]
        source: tonic::transport::Error,
    },
    /// containerd answered a request with an error.
    #[error("containerd {what}")]
    Containerd {
        /// The request.
        what: String,
        /// containerd's answer.
        #[source]
        source: Box<tonic::Status>,
    },
    /// The container's shim could not be reached or refused the checkpoint.
    #[error("the Kybernate shim of {id} ({address}) did not checkpoint it")]
    Shim {
        /// containerd container id.
        id: String,
        /// The shim's ttrpc address.
        address: String,
        /// What ttrpc said (the shim's code and message).
        #[source]
        source: containerd_shim_protos::ttrpc::Error,
    },
    /// A file or directory could not be read or changed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `kybernate-sidecar push` failed.
    #[error("pushing {} to {store} with {} failed: {reason}", .bundle.display(), .sidecar.display())]
    Push {
        /// The bundle directory.
        bundle: PathBuf,
        /// The store.
        store: String,
        /// The sidecar binary.
        sidecar: PathBuf,
        /// Its exit status and output.
        reason: String,
    },
}

impl AgentError {
    /// An [`AgentError::Io`] for `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io { what: what.into(), source }
    }

    /// The gRPC code a client sees.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            AgentError::InvalidArgument(_) => Code::InvalidArgument,
            AgentError::NotFound(_) => Code::NotFound,
            AgentError::FailedPrecondition(_) => Code::FailedPrecondition,
            AgentError::Busy { .. } => Code::Aborted,
            AgentError::Connect { .. } => Code::Unavailable,
            AgentError::Containerd { source, .. } => source.code(),
            AgentError::Shim { source: containerd_shim_protos::ttrpc::Error::RpcStatus(status), .. } => {
                Code::from(status.code() as i32)
            }
            AgentError::Shim { .. } => Code::Unavailable,
            AgentError::Io { .. } | AgentError::Push { .. } => Code::Internal,
        }
    }

    /// The error and each of its sources, joined with `: `.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            let shown = match e.downcast_ref::<Box<tonic::Status>>() {
                Some(status) => status.message().to_string(),
                None => match e.downcast_ref::<containerd_shim_protos::ttrpc::Error>() {
                    Some(containerd_shim_protos::ttrpc::Error::RpcStatus(status)) => status.message.clone(),
                    _ => e.to_string(),
                },
            };
            text.push_str(": ");
            text.push_str(&shown);
            source = e.source();
        }
        text
    }
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        tonic::Status::new(e.code(), e.chain())
    }
}

/// The agent's results.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_chains() {
        let busy = AgentError::Busy { namespace: "k8s.io".into(), id: "c1".into() };
        let status = tonic::Status::from(busy);
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert!(status.message().starts_with("container k8s.io/c1 is busy"), "{}", status.message());
        let io = AgentError::io("reading x", std::io::Error::other("disk on fire"));
        assert_eq!(io.code(), tonic::Code::Internal);
        assert_eq!(io.chain(), "reading x: disk on fire");
        let from_containerd = AgentError::Containerd {
            what: "get c1".into(),
            source: Box::new(tonic::Status::not_found("container c1 not found")),
        };
        assert_eq!(from_containerd.code(), tonic::Code::NotFound);
        assert_eq!(from_containerd.chain(), "containerd get c1: container c1 not found");
        let mut ttrpc_status = containerd_shim_protos::ttrpc::proto::Status::new();
        ttrpc_status.set_code(containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT);
        ttrpc_status.set_message("not under checkpoint_dir".into());
        let shim = AgentError::Shim {
            id: "c1".into(),
            address: "unix:///s".into(),
            source: containerd_shim_protos::ttrpc::Error::RpcStatus(ttrpc_status),
        };
        assert_eq!(shim.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            shim.chain(),
            "the Kybernate shim of c1 (unix:///s) did not checkpoint it: not under checkpoint_dir"
        );
    }
}
