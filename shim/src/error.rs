//! The shim's error type and its mapping onto ttrpc status codes, which containerd turns back into its
//! own error kinds (`ctr` prints them, CRI turns them into gRPC codes).

use containerd_shim::protos::ttrpc::{self, Code};

/// Result alias used throughout the shim.
pub type Result<T, E = ShimError> = std::result::Result<T, E>;

/// What can go wrong while serving a task request. Every message names the object and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The container, process or exec id is not known to this shim.
    #[error("{0}")]
    NotFound(String),
    /// A container or exec with this id already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in a state that does not allow the request (e.g. checkpoint of a stopped task).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed (bad options, bad paths, corrupt checkpoint image).
    #[error("{0}")]
    InvalidArgument(String),
    /// A tool the shim needs (runc, CRIU) is missing or cannot be started.
    #[error("{0}")]
    Unavailable(String),
    /// The node's policy forbids it (an untrusted bundle, another tenant's, outside the restore roots).
    #[error("{0}")]
    PermissionDenied(String),
    /// runc ran and failed.
    #[error("runc {action} of {id} failed ({status}): {message}")]
    Runc {
        /// The runc sub-command (`create`, `start`, `kill`, ...).
        action: &'static str,
        /// The container id.
        id: String,
        /// How runc exited.
        status: String,
        /// runc's own error message.
        message: String,
    },
    /// An I/O error, with what the shim was doing.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// checkpoint-core refused or failed a checkpoint or restore.
    #[error(transparent)]
    Core(#[from] checkpoint_core::Error),
    /// Anything else that went wrong inside the shim.
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ShimError::Io { context: context.into(), source }
    }

    /// Whether the node's restore policy refused it (see [`ShimError::PermissionDenied`]).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ShimError::PermissionDenied(_) | ShimError::Core(checkpoint_core::Error::Refused { .. }))
    }

    /// The ttrpc status code containerd receives for this error.
    pub fn code(&self) -> Code {
        use checkpoint_core::Error as Core;
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ShimError::Unavailable(_) => Code::UNAVAILABLE,
            ShimError::PermissionDenied(_) => Code::PERMISSION_DENIED,
            ShimError::Runc { message, .. } => runc_code(message),
            ShimError::Io { .. } | ShimError::Internal(_) => Code::INTERNAL,
            ShimError::Core(core) => match core {
                Core::ContainerState { .. } | Core::CriuTooOld { .. } | Core::KernelFeature { .. } => {
                    Code::FAILED_PRECONDITION
                }
                Core::InvalidOptions(_) | Core::Directory { .. } | Core::BadImage { .. } | Core::Bundle { .. } => {
                    Code::INVALID_ARGUMENT
                }
                Core::NoSuchProcess { .. } => Code::NOT_FOUND,
                Core::Refused { .. } => Code::PERMISSION_DENIED,
                Core::Key { .. } => Code::FAILED_PRECONDITION,
                Core::CriuMissing { .. } | Core::RuncMissing { .. } => Code::UNAVAILABLE,
                _ => Code::INTERNAL,
            },
        }
    }
}

/// Classifies a runc error message the way containerd's runc shim does.
fn runc_code(message: &str) -> Code {
    let m = message.to_lowercase();
    if m.contains("does not exist")
        || m.contains("not found")
        || m.contains("no such process")
        || m.contains("process already finished")
        || m.contains("container not running")
    {
        Code::NOT_FOUND
    } else if m.contains("not paused")
        || m.contains("is paused")
        || m.contains("not running")
        || m.contains("cannot")
        || m.contains("already")
    {
        Code::FAILED_PRECONDITION
    } else {
        Code::INTERNAL
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_ttrpc_codes() {
        assert_eq!(ShimError::NotFound("x".into()).code(), Code::NOT_FOUND);
        assert_eq!(ShimError::Unavailable("x".into()).code(), Code::UNAVAILABLE);
        let state =
            checkpoint_core::Error::ContainerState { id: "c".into(), state: "stopped".into(), hint: "h".into() };
        assert_eq!(ShimError::from(state).code(), Code::FAILED_PRECONDITION);
        let bad = checkpoint_core::Error::BadImage { path: "/i".into(), reason: "r".into() };
        assert_eq!(ShimError::from(bad).code(), Code::INVALID_ARGUMENT);
        let runc = |message: &str| ShimError::Runc {
            action: "kill",
            id: "c".into(),
            status: "exit status: 1".into(),
            message: message.into(),
        };
        assert_eq!(runc("container \"c\" does not exist").code(), Code::NOT_FOUND);
        assert_eq!(runc("container not running").code(), Code::NOT_FOUND);
        assert_eq!(runc("container \"c\" is paused").code(), Code::FAILED_PRECONDITION);
        assert_eq!(runc("something broke").code(), Code::INTERNAL);
    }

    #[test]
    fn ttrpc_status_carries_code_and_message() {
        match ttrpc::Error::from(ShimError::InvalidArgument("bad option".into())) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::INVALID_ARGUMENT);
                assert_eq!(s.message(), "bad option");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
