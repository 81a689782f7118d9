//! Helpers shared by Kybernate's end-to-end tests: process supervision, workload state, and locally
//! built container bundles (no registry is needed).

use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Makes this test process the subreaper of everything it starts, so that re-parented container and
/// restored processes are ours to wait for (PID 1 on CI machines may not reap orphans).
pub fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills `pid` with SIGKILL and reaps it. Only named pids are ever reaped: a `waitpid(-1)` would steal
/// the exit status of a CRIU or runc run by a test on another thread.
pub fn kill_and_reap(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(pid), None);
}

/// Reaps `pid` if it has exited (it must be our child, or re-parented to us as subreaper).
pub fn reap_if_exited(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// What `kybernate-test-workload` last wrote to its state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadState {
    /// Iterations so far.
    pub counter: u64,
    /// Checksum of the pattern it filled its memory with.
    pub checksum: String,
    /// Whether its memory still matched that checksum.
    pub mem_ok: bool,
    /// Its pid.
    pub pid: i32,
}

impl WorkloadState {
    /// Reads the state file, `None` while it does not exist yet.
    pub fn read(path: &Path) -> Option<Self> {
        let text = fs::read_to_string(path).ok()?;
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')).map(str::to_string))
        };
        Some(WorkloadState {
            counter: field("counter")?.parse().ok()?,
            checksum: field("checksum")?,
            mem_ok: field("mem_ok")? == "1",
            pid: field("pid")?.parse().ok()?,
        })
    }

    /// Waits until the counter passes `min`.
    pub fn wait_past(path: &Path, min: u64) -> Result<Self> {
        wait_for(&format!("counter in {} to pass {min}", path.display()), Duration::from_secs(20), || {
            Self::read(path).filter(|s| s.counter > min)
        })
    }
}

/// Starts `binary state_file mem_mib` in a session of its own with stdio on /dev/null, as CRIU wants a
/// self-contained process tree. Returns its pid; it is a child of this process.
pub fn spawn_workload(binary: &Path, state: &Path, mem_mib: u32) -> Result<i32> {
    let child = unsafe {
        Command::new(binary)
            .arg(state)
            .arg(mem_mib.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from))
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?
    };
    Ok(child.id() as i32)
}

/// Where busybox-static lives on Debian (installed by `make deps`).
pub const BUSYBOX: &str = "/bin/busybox";

/// Builds an OCI bundle in `dir`: a busybox-static rootfs (no registry needed) and a `config.json`
/// from `runc spec`, running `args` without a terminal, with a writable rootfs.
pub fn busybox_bundle(dir: &Path, args: &[&str]) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    for sub in ["bin", "state", "tmp", "proc", "dev", "sys"] {
        fs::create_dir_all(rootfs.join(sub))?;
    }
    fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
        .with_context(|| format!("copying {BUSYBOX}: install busybox-static (make deps)"))?;
    for applet in ["sh", "sleep", "echo", "cat", "ls"] {
        symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    let status = Command::new("runc")
        .arg("spec")
        .current_dir(dir)
        .status()
        .context("running `runc spec`: is runc installed?")?;
    if !status.success() {
        bail!("runc spec failed in {}", dir.display());
    }
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = args.iter().map(|a| serde_json::Value::from(*a)).collect();
    spec["root"]["readonly"] = false.into();
    fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(dir.to_path_buf())
}

/// The shell loop our container tests run: a counter held in the shell's memory, written to
/// `/state/counter` ten times a second. If the restore lost memory, the counter would restart at 1.
pub const COUNTER_SCRIPT: &str = "i=0; while :; do i=$((i+1)); echo $i > /state/counter; sleep 0.1; done";

/// Reads the counter a [`COUNTER_SCRIPT`] container wrote into its rootfs.
pub fn read_counter(bundle: &Path) -> Option<u64> {
    fs::read_to_string(bundle.join("rootfs/state/counter")).ok()?.trim().parse().ok()
}

/// Waits until a [`COUNTER_SCRIPT`] container's counter passes `min`; returns the value seen.
pub fn wait_counter_past(bundle: &Path, min: u64) -> Result<u64> {
    wait_for(&format!("container counter to pass {min}"), Duration::from_secs(20), || {
        read_counter(bundle).filter(|c| *c > min)
    })
}

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
