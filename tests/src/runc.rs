//! Containers run directly with runc, without containerd.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::process::become_subreaper;

/// A container run directly with runc (`runc run --detach`) under a private state root, with its
/// stdout and stderr on a pipe as containerd would wire them. Killed and deleted on drop.
pub struct RuncContainer {
    /// runc's state root.
    pub root: PathBuf,
    /// Container id.
    pub id: String,
    /// The OCI bundle.
    pub bundle: PathBuf,
    /// Host pid of the init process.
    pub pid: i32,
    /// Read end of the container's stdout/stderr pipe, kept open so the container never gets SIGPIPE.
    _output: std::os::fd::OwnedFd,
}

impl RuncContainer {
    /// Runs the bundle as container `id` under runc state root `root`.
    pub fn run(root: &Path, id: &str, bundle: &Path) -> Result<Self> {
        Self::run_with_stdout(root, id, bundle, None)
    }

    /// Like [`RuncContainer::run`], with the container's stdout sent to `stdout` instead of the pipe.
    pub fn run_with_stdout(root: &Path, id: &str, bundle: &Path, stdout: Option<fs::File>) -> Result<Self> {
        become_subreaper();
        let (read, write) = nix::unistd::pipe()?;
        let stdout = match stdout {
            Some(file) => Stdio::from(file),
            None => Stdio::from(write.try_clone()?),
        };
        let pid_file = bundle.join(format!("{id}.pid"));
        let status = Command::new("runc")
            .arg("--root")
            .arg(root)
            .args(["run", "--detach", "--pid-file"])
            .arg(&pid_file)
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(write)
            .status()
            .context("running runc")?;
        if !status.success() {
            bail!("runc run {id} failed: {status}");
        }
        let pid = fs::read_to_string(&pid_file)?.trim().parse()?;
        Ok(RuncContainer { root: root.to_path_buf(), id: id.into(), bundle: bundle.to_path_buf(), pid, _output: read })
    }

    /// Adopts a container that was restored (rather than run) under `root`.
    pub fn adopt(root: &Path, id: &str, bundle: &Path, pid: i32) -> Self {
        let (read, _) = nix::unistd::pipe().expect("pipe");
        RuncContainer { root: root.to_path_buf(), id: id.into(), bundle: bundle.to_path_buf(), pid, _output: read }
    }

    /// `runc state`'s status word, or `None` when runc no longer knows the container.
    pub fn status(&self) -> Option<String> {
        let out = Command::new("runc").arg("--root").arg(&self.root).args(["state", &self.id]).output().ok()?;
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        state["status"].as_str().map(str::to_string)
    }

    /// `runc delete --force`, then reaps the init process.
    pub fn delete(&self) {
        let _ = Command::new("runc").arg("--root").arg(&self.root).args(["delete", "--force", &self.id]).status();
        let _ = waitpid(Pid::from_raw(self.pid), None);
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        self.delete();
    }
}
