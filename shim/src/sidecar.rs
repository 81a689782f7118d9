//! Running `kybernate-sidecar` from the shim: fetching a remote bundle for a restore (`pull`) and
//! pushing a diskless checkpoint to the store (`push`). One place spawns it, under the reaper's
//! spawn hook, within a time limit, and words its failures with the fix.

use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use checkpoint_core::{SpawnHook, Spawner};

use crate::config::ShimConfig;
use crate::error::{Result, ShimError};
use crate::reaper::Reaper;

/// What a finished sidecar run said.
#[derive(Debug)]
pub struct SidecarRun {
    /// Its exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    /// Its exit status, in words.
    pub status: String,
    /// What it printed on stdout.
    pub stdout: String,
    /// The last lines of its stderr, joined with `; ` (its error, when it failed).
    pub said: String,
}

/// Runs the configured sidecar with `args`, killing it after `timeout`. `what` names the run in
/// errors (`fetching s3://…`); `timeout_fix` says what to do when it ran out of time. An error
/// means it could not run or ran out of time; a run that failed is a [`SidecarRun`] with its code.
pub fn run<S: AsRef<OsStr>>(
    config: &ShimConfig,
    reaper: &Arc<Reaper>,
    args: &[S],
    timeout: Duration,
    what: &str,
    timeout_fix: &str,
) -> Result<SidecarRun> {
    let mut cmd = Command::new(&config.sidecar_binary);
    cmd.args(args).stdin(Stdio::null());
    let output =
        Spawner::hooked(Arc::clone(reaper) as Arc<dyn SpawnHook>).output_within(&mut cmd, timeout).map_err(|e| {
            let fix = match e.kind() {
                std::io::ErrorKind::TimedOut => timeout_fix.to_string(),
                _ => format!(
                    "install kybernate-sidecar or set sidecar_binary in the shim config (now {})",
                    config.sidecar_binary.display()
                ),
            };
            ShimError::Unavailable(format!("{what} with kybernate-sidecar: {e}; {fix}"))
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let said = stderr.trim().lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ");
    Ok(SidecarRun {
        code: output.status.code(),
        status: output.status.to_string(),
        stdout: String::from_utf8_lossy(&output.stdout).trim().to_string(),
        said,
    })
}
