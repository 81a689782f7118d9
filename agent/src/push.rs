//! Handing a bundle to a store: `kybernate-sidecar push`, run as a separate process (the sidecar owns
//! stores and their credentials), and the reference it reports.

use std::path::{Path, PathBuf};

use crate::error::{AgentError, Result};

/// How the agent runs the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// The `kybernate-sidecar` binary (a bare name is looked up on PATH).
    pub binary: PathBuf,
    /// The sidecar's config file, if not its default.
    pub config: Option<PathBuf>,
}

impl Sidecar {
    /// Pushes `bundle` (under `checkpoint_dir`, which gives its store key) to `store`; returns the
    /// stored reference (`file:///…` or `s3://…`), usable as `kybernate.io/restore-from`.
    pub async fn push(&self, checkpoint_dir: &Path, bundle: &Path, store: &str) -> Result<String> {
        let mut cmd = tokio::process::Command::new(&self.binary);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.arg("--checkpoint-dir").arg(checkpoint_dir).arg("--store").arg(store).arg("push").arg(bundle);
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        let failed = |reason: String| AgentError::Push {
            bundle: bundle.to_path_buf(),
            store: store.to_string(),
            sidecar: self.binary.clone(),
            reason,
        };
        let out = cmd.output().await.map_err(|e| failed(format!("it could not be run: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(failed(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
        }
        stored_reference(&stdout).ok_or_else(|| failed(format!("it reported no stored reference: {}", stdout.trim())))
    }
}

/// The store reference in `kybernate-sidecar push`'s report (`shipped B to REF (…)`, `already shipped
/// to REF at …`, `already in REF (same bundle)…`).
pub fn stored_reference(report: &str) -> Option<String> {
    report.split_whitespace().find(|w| w.starts_with("file://") || w.starts_with("s3://")).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_from_push_reports() {
        let shipped = "shipped /c/ns/p/c/T to file:///store/ns/p/c/T.tar.zst (1.2 MiB, 0.1s, 0 B resumed, sha256 ab)\n";
        assert_eq!(stored_reference(shipped).as_deref(), Some("file:///store/ns/p/c/T.tar.zst"));
        let again =
            "already shipped to s3://b/pre/ns/p/c/T.tar.zst at 2026-01-01T00:00:00Z (use --force to upload again)";
        assert_eq!(stored_reference(again).as_deref(), Some("s3://b/pre/ns/p/c/T.tar.zst"));
        assert_eq!(stored_reference("nothing here"), None);
    }
}
