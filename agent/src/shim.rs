//! The checkpoint itself, through the container's Kybernate shim: its ttrpc address from the task's
//! bundle directory, and a task-API Checkpoint with Kybernate's node-bundle options
//! (`kybernate_shim::convert::node_checkpoint_request`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim_protos::ttrpc;

use crate::error::{AgentError, Result};

/// The task bundle directory containerd gives container `id` of `namespace` under its state dir.
pub fn task_bundle(state_dir: &Path, namespace: &str, id: &str) -> PathBuf {
    state_dir.join("io.containerd.runtime.v2.task").join(namespace).join(id)
}

/// The shim's ttrpc address: containerd 1.6/1.7 write it to `address` in the task bundle directory,
/// containerd 2.x to `bootstrap.json` (its `address` field).
pub fn shim_address(bundle: &Path) -> Result<String> {
    let address_file = bundle.join("address");
    match std::fs::read_to_string(&address_file) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(format!("reading {}", address_file.display()), e)),
    }
    let bootstrap = bundle.join("bootstrap.json");
    let text = std::fs::read_to_string(&bootstrap).map_err(|e| {
        AgentError::io(
            format!(
                "the shim's address is in neither {} nor {}; is --containerd-state containerd's state directory?",
                address_file.display(),
                bootstrap.display()
            ),
            e,
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| AgentError::FailedPrecondition(format!("{} is not JSON: {e}", bootstrap.display())))?;
    match value["address"].as_str() {
        Some(address) if !address.is_empty() => Ok(address.to_string()),
        _ => Err(AgentError::FailedPrecondition(format!("{} has no \"address\"", bootstrap.display()))),
    }
}

/// Asks the shim at `address` for a node bundle of task `id` in `dir` (blocking; run it off the async
/// runtime). Returns once the bundle is sealed.
pub fn checkpoint(address: &str, id: &str, dir: &Path, exit: bool, timeout: Duration) -> Result<()> {
    let shim_error = |source| AgentError::Shim { id: id.to_string(), address: address.to_string(), source };
    let client = ttrpc::Client::connect(address).map_err(shim_error)?;
    let tasks = containerd_shim_protos::TaskClient::new(client);
    let request = kybernate_shim::convert::node_checkpoint_request(id, dir, exit);
    let context = ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX));
    tasks.checkpoint(context, &request).map(drop).map_err(shim_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_containerd_1_and_2() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = task_bundle(tmp.path(), "k8s.io", "c1");
        assert_eq!(bundle, tmp.path().join("io.containerd.runtime.v2.task/k8s.io/c1"));
        std::fs::create_dir_all(&bundle).unwrap();
        let err = shim_address(&bundle).unwrap_err().chain();
        assert!(err.contains("neither") && err.contains("--containerd-state"), "{err}");
        std::fs::write(
            bundle.join("bootstrap.json"),
            r#"{"version":3,"address":"unix:///run/containerd/s/2x","protocol":"ttrpc"}"#,
        )
        .unwrap();
        assert_eq!(shim_address(&bundle).unwrap(), "unix:///run/containerd/s/2x");
        std::fs::write(bundle.join("address"), "unix:///run/containerd/s/1x\n").unwrap();
        assert_eq!(shim_address(&bundle).unwrap(), "unix:///run/containerd/s/1x");
        std::fs::remove_file(bundle.join("address")).unwrap();
        std::fs::write(bundle.join("bootstrap.json"), r#"{"version":3}"#).unwrap();
        assert!(shim_address(&bundle).unwrap_err().chain().contains("has no \"address\""));
    }
}
