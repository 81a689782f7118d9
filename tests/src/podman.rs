//! Podman (Debian's 4.3, with runc) as the peer that writes foreign checkpoint archives: a private
//! storage root and run root per instance, so the tests never touch the host's containers, and the
//! settings this machine needs (no CNI: `--network none`; no CAP_SYS_RESOURCE: explicit ulimits).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{busybox_oci_image, require_tools, run_with_timeout, CmdOutput};

/// How long one podman command may take.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);

/// Podman with its own storage under a directory; its containers are removed when it is dropped.
pub struct Podman {
    root: PathBuf,
    runroot: PathBuf,
}

impl Podman {
    /// A podman whose storage lives under `dir` (created); fails, naming `make deps`, without podman.
    pub fn new(dir: &Path) -> Result<Self> {
        require_tools(&["podman"])?;
        let (root, runroot) = (dir.join("root"), dir.join("run"));
        fs::create_dir_all(&root)?;
        fs::create_dir_all(&runroot)?;
        Ok(Podman { root, runroot })
    }

    /// `podman` with this instance's storage, runc as the OCI runtime and cgroupfs (no systemd).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root").arg(&self.root).arg("--runroot").arg(&self.runroot).args([
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]);
        cmd
    }

    /// Runs podman with `args`, bounded by a timeout.
    pub fn run(&self, args: &[&str]) -> Result<CmdOutput> {
        let mut cmd = self.command();
        cmd.args(args);
        run_with_timeout(cmd, PODMAN_TIMEOUT)
    }

    /// Runs podman with `args` and returns its stdout; fails with both outputs unless it exited 0.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        self.run(args)?.ok(&format!("podman {}", args.join(" ")))
    }

    /// Loads the busybox image the containerd tests use, under the same `name`, so a container
    /// checkpointed here is restored onto the same image there.
    pub fn load_busybox(&self, name: &str, scratch: &Path) -> Result<()> {
        let tar = scratch.join("podman-busybox-oci.tar");
        fs::write(&tar, busybox_oci_image(name)?)?;
        self.ok(&["load", "--input", tar.to_str().context("temp path")?])?;
        Ok(())
    }

    /// Starts `sh -c script` detached as container `name` of `image`, without a network.
    pub fn run_detached(&self, name: &str, image: &str, script: &str) -> Result<()> {
        self.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            image,
            "sh",
            "-c",
            script,
        ])?;
        Ok(())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--force", "--all"]);
        let _ = self.run(&["system", "reset", "--force"]);
    }
}
