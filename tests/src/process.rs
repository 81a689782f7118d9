//! Processes the tests start and watch: this process as subreaper, polling, killing and reaping by
//! pid, the `kybernate-test-workload` and its state file, and `/proc` scans.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
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

/// Pids of live processes whose command line contains `needle`.
pub fn pids_with_arg(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else { return pids };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) {
            let args = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if args.contains(needle) && alive(pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Children of `parent` that exited but were not waited for (zombies).
pub fn zombie_children(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
            let Some((_, rest)) = stat.rsplit_once(')') else { return false };
            let mut fields = rest.split_whitespace();
            fields.next() == Some("Z") && fields.next().and_then(|p| p.parse::<i32>().ok()) == Some(parent)
        })
        .collect()
}
