//! Serving the agent on its Unix socket: the parent directory created, a stale socket replaced (a
//! live one is left alone), the socket made mode 0600 (root only) before the first request.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use kybernate_proto::kybernate::agent::v1::agent_server::AgentServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::error::{AgentError, Result};
use crate::service::AgentService;

/// The agent's default socket.
pub const DEFAULT_SOCKET: &str = "/run/kybernate/agent.sock";

/// Binds `path`: creates its parent directory, replaces a stale socket (one nobody answers on), and
/// sets mode 0600. Refuses a path that is a live socket (another agent) or not a socket at all.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| AgentError::io(format!("creating {}", parent.display()), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(AgentError::FailedPrecondition(format!(
                    "{} is served by a running agent; stop it first or pick another --socket",
                    path.display()
                )));
            }
            std::fs::remove_file(path)
                .map_err(|e| AgentError::io(format!("removing the stale socket {}", path.display()), e))?;
        }
        Ok(_) => {
            return Err(AgentError::FailedPrecondition(format!(
                "{} exists and is not a socket; remove it or pick another --socket",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(format!("inspecting {}", path.display()), e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| AgentError::io(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| AgentError::io(format!("making {} mode 0600", path.display()), e))?;
    Ok(listener)
}

/// Serves `service` on `listener` (bound at `path`) until `shutdown` completes, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    service: AgentService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tracing::info!(socket = %path.display(), "serving kybernate.agent.v1.Agent");
    let result = tonic::transport::Server::builder()
        .add_service(AgentServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_are_private_and_stale_ones_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run/kybernate/agent.sock");
        let live = bind(&path).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let err = bind(&path).await.unwrap_err().chain();
        assert!(err.contains("served by a running agent"), "{err}");
        drop(live); // the socket file stays behind, as after a crash
        assert!(path.exists());
        let _again = bind(&path).await.unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(bind(&file).await.unwrap_err().chain().contains("not a socket"));
    }
}
