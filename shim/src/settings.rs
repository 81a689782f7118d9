//! The runc settings of a container, saved in its bundle at Create so that `shim delete` (run by
//! containerd after a shim died, in a fresh process) can clean up with the same runc and root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::config::ShimConfig;
use crate::error::{Result, ShimError};

/// File name in the bundle.
pub const SETTINGS_FILE: &str = "kybernate-shim.json";

/// What `shim delete` needs to remove a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSettings {
    /// The runc binary.
    pub runc_binary: PathBuf,
    /// runc's state root, namespace included.
    pub runc_root: PathBuf,
    /// Whether runc used systemd cgroups.
    pub systemd_cgroup: bool,
}

impl SavedSettings {
    /// The settings a configuration gives in `namespace`.
    pub fn from_config(config: &ShimConfig, namespace: &str) -> Self {
        SavedSettings {
            runc_binary: config.runc_binary.clone(),
            runc_root: config.runc_root.join(namespace),
            systemd_cgroup: config.systemd_cgroup,
        }
    }

    /// Writes them into `bundle`.
    pub fn save(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(SETTINGS_FILE);
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| ShimError::Internal(format!("encoding settings: {e}")))?;
        std::fs::write(&path, json).map_err(|e| ShimError::io(format!("writing {}", path.display()), e))
    }

    /// Reads them from `bundle`; `None` when Create never got that far.
    pub fn load(bundle: &Path) -> Result<Option<Self>> {
        let path = bundle.join(SETTINGS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ShimError::Internal(format!("{} does not parse: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ShimError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// `runc delete --force <id>`; a container runc does not know is fine.
    pub fn force_delete(&self, id: &str) -> Result<()> {
        let mut cmd = Command::new(&self.runc_binary);
        cmd.arg("--root").arg(&self.runc_root);
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        let out = cmd
            .args(["delete", "--force", id])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ShimError::Unavailable(format!("cannot run {}: {e}", self.runc_binary.display())))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || stderr.contains("does not exist") {
            return Ok(());
        }
        Err(ShimError::Runc {
            action: "delete",
            id: id.into(),
            status: out.status.to_string(),
            message: stderr.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SavedSettings::load(dir.path()).unwrap(), None);
        let s = SavedSettings::from_config(&ShimConfig::default(), "k8s.io");
        assert_eq!(s.runc_root, Path::new("/run/containerd/runc/k8s.io"));
        s.save(dir.path()).unwrap();
        assert_eq!(SavedSettings::load(dir.path()).unwrap(), Some(s));
    }
}
