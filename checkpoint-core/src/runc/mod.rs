//! Checkpoint and restore of runc containers, by container id, with the flags containerd's go-runc uses.

mod bundle;
mod checkpoint;
mod restore;

pub use bundle::{
    check_host, checkpoint_container_bundle, open_bundle, BundleReport, ConfigDump, ContainerCheckpoint, OpenedBundle,
};
pub use checkpoint::checkpoint_container;
pub(crate) use restore::cleanup_failed;
pub use restore::{restore_container, ContainerRestore, RestoreIo};

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::criu::{find_on_path, Criu};
use crate::error::{Error, Result};
use crate::options::CriuFlags;

/// The container states runc reports (`runc state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    /// Created but not started.
    Created,
    /// Its init process runs.
    Running,
    /// Frozen.
    Paused,
    /// Its init process exited.
    Stopped,
}

/// What `runc state` says about a container.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    /// Container id.
    pub id: String,
    /// Host pid of its init process (0 once stopped).
    pub pid: i32,
    /// Its status.
    pub status: ContainerStatus,
    /// Its OCI bundle directory.
    pub bundle: PathBuf,
}

/// Handle on a runc binary and its state root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runc {
    binary: PathBuf,
    root: Option<PathBuf>,
}

impl Default for Runc {
    fn default() -> Self {
        Runc::new(find_on_path("runc").unwrap_or_else(|| PathBuf::from("runc")), None)
    }
}

impl Runc {
    /// Uses the runc binary at `binary` with state under `root` (runc's default root when `None`).
    pub fn new(binary: impl Into<PathBuf>, root: Option<PathBuf>) -> Self {
        Runc { binary: binary.into(), root }
    }

    /// The binary this handle runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The state root (`--root`), if one was set.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// A runc command with `--root` set, whose `criu` is the given one (runc runs `criu` from PATH).
    pub(crate) fn command(&self, criu: Option<&Criu>) -> Command {
        let mut cmd = Command::new(&self.binary);
        if let Some(root) = &self.root {
            cmd.arg("--root").arg(root);
        }
        if let Some(dir) = criu.and_then(|c| c.binary().parent()).filter(|d| !d.as_os_str().is_empty()) {
            let mut path = OsString::from(dir);
            if let Some(old) = std::env::var_os("PATH") {
                path.push(":");
                path.push(old);
            }
            cmd.env("PATH", path);
        }
        cmd
    }

    /// `runc --version`'s version (e.g. `1.1.5+ds1`), for manifests; `None` if runc does not say.
    pub fn version(&self) -> Option<String> {
        let out = self.command(None).arg("--version").stdin(std::process::Stdio::null()).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().find_map(|l| l.strip_prefix("runc version ")).map(|v| v.trim().to_string())
    }

    /// The state of container `id`, or `None` when runc does not know it.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>> {
        let out = self
            .command(None)
            .args(["state", id])
            .output()
            .map_err(|source| Error::RuncMissing { path: self.binary.clone(), source })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("does not exist") || stderr.contains("not found") {
                return Ok(None);
            }
            return Err(Error::io(
                format!("runc state {id}: {}", stderr.trim()),
                std::io::Error::other("runc state failed"),
            ));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| Error::io(format!("parsing `runc state {id}` output"), std::io::Error::other(e)))
    }

    /// Host pids of the container's processes (`runc ps --format json`, read from its cgroup).
    pub fn ps(&self, id: &str) -> Result<Vec<i32>> {
        let out = self
            .command(None)
            .args(["ps", "--format", "json", id])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| Error::RuncMissing { path: self.binary.clone(), source })?;
        if !out.status.success() {
            return Err(Error::io(
                format!(
                    "runc ps {id}: {}; check that the container exists and is running",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                std::io::Error::other("runc ps failed"),
            ));
        }
        // runc prints `null` for a container without processes.
        let pids: Option<Vec<i32>> = serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::io(format!("parsing `runc ps {id}` output"), std::io::Error::other(e)))?;
        Ok(pids.unwrap_or_default())
    }

    /// Words for what became of a container, for error messages.
    pub(crate) fn describe(&self, id: &str) -> String {
        match self.state(id) {
            Ok(Some(s)) if s.status == ContainerStatus::Running => format!("is still running (pid {})", s.pid),
            Ok(Some(s)) => format!("is {:?}", s.status).to_lowercase(),
            Ok(None) => "no longer exists".into(),
            Err(e) => format!("is in an unknown state ({e})"),
        }
    }
}

/// Adds the tree-describing flags in runc's spelling.
pub(crate) fn add_runc_flags(cmd: &mut Command, flags: &CriuFlags) {
    cmd.args(flags.switches());
    if let Some(mode) = flags.manage_cgroups_mode {
        cmd.args(["--manage-cgroups-mode", mode.as_str()]);
    }
    for ns in &flags.empty_namespaces {
        cmd.args(["--empty-ns", ns.runc_name()]);
    }
}
