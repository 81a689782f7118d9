//! The agent's errors, each mapped to the gRPC code a client acts on; the message keeps the whole
//! source chain. [`TlsError`] is the TCP listener's and its client's mutual TLS set-up.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{pem, InvalidDnsNameError};

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

/// What can go wrong setting up mutual TLS, for the agent's TCP listener ([`crate::tls::acceptor`])
/// or for a client of it ([`crate::tls::connect`]). Each message names the file or flag, what is
/// wrong, and the fix; the cause is its source.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `--listen-tcp` was given without one of the three files mutual TLS needs.
    #[error(
        "--listen-tcp {addr} needs {flag} (or ${env}): mutual TLS needs the agent's certificate chain (--tls-cert), \
         its key (--tls-key) and the CA bundle its clients' certificates chain to (--tls-client-ca); give all \
         three, or drop --listen-tcp"
    )]
    MissingFlag {
        /// The `--listen-tcp` address.
        addr: SocketAddr,
        /// The missing flag.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
    },
    /// A PEM file could not be read.
    #[error("cannot read the {what} {}; check the path and that this process may read it", .path.display())]
    Read {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds nothing of the kind needed, or is malformed.
    #[error("the {what} {} is not usable PEM; it must hold {expected}", .path.display())]
    Pem {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What it must hold.
        expected: &'static str,
        /// What the PEM parser said.
        #[source]
        source: pem::Error,
    },
    /// A certificate of a CA bundle is no usable trust anchor.
    #[error("a certificate in the {what} {} is not a usable CA certificate; give the CA's own PEM certificate(s)", .path.display())]
    Ca {
        /// What the bundle is for.
        what: &'static str,
        /// The bundle.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: Box<rustls::Error>,
    },
    /// The client CA bundle makes no verifier of client certificates.
    #[error(
        "the client CA bundle {} makes no client-certificate verifier; give the PEM certificate(s) of the CA that \
         signs the clients' certificates",
        .path.display()
    )]
    ClientVerifier {
        /// The bundle.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused a certificate chain and its key.
    #[error(
        "the certificate chain {} and key {} make no TLS {side}; check that the chain is leaf first and the key is \
         the leaf certificate's own",
        .cert.display(),
        .key.display()
    )]
    Identity {
        /// `server` or `client`.
        side: &'static str,
        /// The certificate chain.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: Box<rustls::Error>,
    },
    /// The name to verify the agent's certificate against is neither a DNS name nor an IP address.
    #[error(
        "{name:?} is not a DNS name or IP address to verify the agent's certificate against; give one of the \
         names in its subjectAltName"
    )]
    ServerName {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: InvalidDnsNameError,
    },
    /// The agent's endpoint is not `host:port`.
    #[error("{endpoint:?} is not an agent endpoint; give host:port, e.g. 10.0.0.5:7443")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What tonic said.
        #[source]
        source: tonic::transport::Error,
    },
    /// The agent could not be reached, or the TLS handshake with it failed.
    #[error(
        "cannot connect to the agent at {endpoint} over mutual TLS; is it listening there (--listen-tcp), and do \
         its certificate and the client's chain to the CAs each side trusts?"
    )]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// What tonic said (the TCP or TLS error is its source).
        #[source]
        source: tonic::transport::Error,
    },
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
