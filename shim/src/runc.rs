//! The runc command line as the shim drives it, with the global flags containerd's runc shim uses
//! (`--root <root>/<namespace> --log <bundle>/log.json --log-format json`). Every run happens under a
//! [`ChildGuard`](crate::reaper::ChildGuard) so the reaper never steals runc's exit status.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use crate::config::ShimConfig;
use crate::error::{Result, ShimError};
use crate::reaper::Reaper;

/// Name of runc's JSON log in the bundle.
pub const LOG_FILE: &str = "log.json";

/// The stdio a runc command passes on to the container process it creates.
#[derive(Debug, Default)]
pub struct ChildStdio {
    /// Standard input (`/dev/null` when `None`).
    pub stdin: Option<Stdio>,
    /// Standard output (`/dev/null` when `None`).
    pub stdout: Option<Stdio>,
    /// Standard error (`/dev/null` when `None`).
    pub stderr: Option<Stdio>,
}

/// Options of `runc create` and `runc exec` that concern the new process.
#[derive(Debug)]
pub struct SpawnOpts<'a> {
    /// Where runc writes the host pid of the new process.
    pub pid_file: &'a Path,
    /// Socket that receives the pty master (terminal processes).
    pub console_socket: Option<&'a Path>,
    /// `--no-pivot` (create only).
    pub no_pivot: bool,
    /// `--no-new-keyring` (create only).
    pub no_new_keyring: bool,
}

/// A runc binary with a state root, bound to one bundle's log and the shim's reaper.
#[derive(Clone)]
pub struct RuncCli {
    binary: PathBuf,
    root: PathBuf,
    systemd_cgroup: bool,
    log: PathBuf,
    reaper: Arc<Reaper>,
    version: Arc<OnceLock<Option<String>>>,
}

/// One entry of `runc events --stats`.
#[derive(Debug, Deserialize)]
pub(crate) struct RuncEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl RuncCli {
    /// runc as configured, with state under `<runc_root>/<namespace>` and its log in `bundle`.
    pub fn new(config: &ShimConfig, namespace: &str, bundle: &Path, reaper: Arc<Reaper>) -> Self {
        RuncCli {
            binary: config.runc_binary.clone(),
            root: config.runc_root.join(namespace),
            systemd_cgroup: config.systemd_cgroup,
            log: bundle.join(LOG_FILE),
            reaper,
            version: Arc::default(),
        }
    }

    /// The same runc for checkpoint-core, which runs checkpoint and restore.
    pub fn core(&self) -> checkpoint_core::Runc {
        checkpoint_core::Runc::new(&self.binary, Some(self.root.clone()))
    }

    /// The reaper this runc's children are guarded by.
    pub fn reaper(&self) -> &Arc<Reaper> {
        &self.reaper
    }

    /// `runc --version`'s version, e.g. `1.1.5+ds1`, for manifests (asked once).
    pub fn version(&self) -> Option<String> {
        self.version
            .get_or_init(|| {
                let _guard = self.reaper.guard();
                self.core().version()
            })
            .clone()
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root).arg("--log").arg(&self.log).args(["--log-format", "json"]);
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd
    }

    /// Runs a command whose stdio belongs to a container process: success or runc's logged error.
    fn run_detached(&self, mut cmd: Command, action: &'static str, id: &str, stdio: ChildStdio) -> Result<()> {
        cmd.stdin(stdio.stdin.unwrap_or_else(Stdio::null))
            .stdout(stdio.stdout.unwrap_or_else(Stdio::null))
            .stderr(stdio.stderr.unwrap_or_else(Stdio::null));
        let log_offset = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let status = {
            let _guard = self.reaper.guard();
            let mut child = cmd.spawn().map_err(|e| self.spawn_error(e))?;
            // Our copies of the container's stdio must be closed now, or pipes never see EOF.
            drop(cmd);
            child.wait().map_err(|e| ShimError::io(format!("waiting for runc {action} {id}"), e))?
        };
        if status.success() {
            return Ok(());
        }
        Err(self.failure(action, id, status, self.logged_error(log_offset)))
    }

    /// Runs a command whose output the shim reads.
    fn run_output(&self, mut cmd: Command, action: &'static str, id: &str) -> Result<Vec<u8>> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let log_offset = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let out = {
            let _guard = self.reaper.guard();
            cmd.output().map_err(|e| self.spawn_error(e))?
        };
        if out.status.success() {
            return Ok(out.stdout);
        }
        let mut message = self.logged_error(log_offset);
        if message.is_empty() {
            message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        }
        Err(self.failure(action, id, out.status, message))
    }

    fn spawn_error(&self, e: std::io::Error) -> ShimError {
        ShimError::Unavailable(format!(
            "cannot run runc at {}: {e}; install runc or set runc_binary in the shim config",
            self.binary.display()
        ))
    }

    fn failure(&self, action: &'static str, id: &str, status: ExitStatus, message: String) -> ShimError {
        let message = if message.is_empty() { format!("no error logged in {}", self.log.display()) } else { message };
        ShimError::Runc { action, id: id.to_string(), status: status.to_string(), message }
    }

    /// The last error runc logged after `offset` in its JSON log.
    fn logged_error(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = f.read_to_string(&mut text);
            }
        }
        last_logged_error(&text)
    }

    /// `runc create`: the container's init process exists (waiting to exec) once this returns.
    pub fn create(&self, id: &str, bundle: &Path, opts: &SpawnOpts<'_>, stdio: ChildStdio) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("create").arg("--bundle").arg(bundle).arg("--pid-file").arg(opts.pid_file);
        if let Some(socket) = opts.console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        if opts.no_pivot {
            cmd.arg("--no-pivot");
        }
        if opts.no_new_keyring {
            cmd.arg("--no-new-keyring");
        }
        cmd.arg(id);
        self.run_detached(cmd, "create", id, stdio)
    }

    /// `runc start`: the created init process execs the container's entrypoint.
    pub fn start(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["start", id]);
        self.run_output(cmd, "start", id).map(drop)
    }

    /// `runc exec --detach` of the process described by the JSON file `process`.
    pub fn exec(&self, id: &str, process: &Path, opts: &SpawnOpts<'_>, stdio: ChildStdio) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["exec", "--detach", "--process"]).arg(process).arg("--pid-file").arg(opts.pid_file);
        if let Some(socket) = opts.console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        cmd.arg(id);
        self.run_detached(cmd, "exec", id, stdio)
    }

    /// `runc kill [--all] <id> <signal>`.
    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id).arg(signal.to_string());
        self.run_output(cmd, "kill", id).map(drop)
    }

    /// `runc delete [--force]`; a container runc does not know counts as deleted.
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("delete");
        if force {
            cmd.arg("--force");
        }
        cmd.arg(id);
        match self.run_output(cmd, "delete", id) {
            Err(ShimError::Runc { message, .. }) if message.contains("does not exist") => Ok(()),
            other => other.map(drop),
        }
    }

    /// `runc pause`: freezes the container's cgroup.
    pub fn pause(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["pause", id]);
        self.run_output(cmd, "pause", id).map(drop)
    }

    /// `runc resume`: thaws it.
    pub fn resume(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["resume", id]);
        self.run_output(cmd, "resume", id).map(drop)
    }

    /// `runc update --resources <file>` with an OCI `LinuxResources` JSON document.
    pub fn update(&self, id: &str, resources: &Path) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["update", "--resources"]).arg(resources).arg(id);
        self.run_output(cmd, "update", id).map(drop)
    }

    /// `runc ps --format json`: host pids of the container's processes.
    pub fn ps(&self, id: &str) -> Result<Vec<u32>> {
        let mut cmd = self.command();
        cmd.args(["ps", "--format", "json", id]);
        let out = self.run_output(cmd, "ps", id)?;
        let pids: Option<Vec<u32>> = serde_json::from_slice(&out)
            .map_err(|e| ShimError::Internal(format!("runc ps {id} printed something that is not a pid list: {e}")))?;
        Ok(pids.unwrap_or_default())
    }

    /// `runc events --stats`: one snapshot of the container's cgroup statistics.
    pub(crate) fn stats(&self, id: &str) -> Result<RuncEvent> {
        let mut cmd = self.command();
        cmd.args(["events", "--stats", id]);
        let out = self.run_output(cmd, "events", id)?;
        serde_json::from_slice(&out)
            .map_err(|e| ShimError::Internal(format!("runc events --stats {id} printed unexpected JSON: {e}")))
    }
}

/// The message of the last `"level":"error"` line of a runc JSON log.
fn last_logged_error(text: &str) -> String {
    #[derive(Deserialize)]
    struct Line {
        level: String,
        msg: String,
    }
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .find(|l| l.level == "error")
        .map(|l| l.msg.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_is_taken_from_the_json_log() {
        let log = "{\"level\":\"info\",\"msg\":\"hello\",\"time\":\"t\"}\n\
                   {\"level\":\"error\",\"msg\":\"first\",\"time\":\"t\"}\n\
                   not json\n\
                   {\"level\":\"error\",\"msg\":\"container \\\"x\\\" does not exist\\n\",\"time\":\"t\"}\n";
        assert_eq!(last_logged_error(log), "container \"x\" does not exist");
        assert_eq!(last_logged_error(""), "");
    }
}
