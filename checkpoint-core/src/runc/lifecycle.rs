//! runc's lifecycle commands, with the flags containerd's runc shim uses: create, start, exec, kill,
//! delete, pause, resume, update, ps and a stats snapshot.

use std::path::Path;
use std::process::{Command, Stdio};

use super::{says_not_found, Runc};
use crate::error::{Error, Result};

/// The stdio a runc command passes on to the container process it creates or restores (runc hands its
/// own stdio through).
#[derive(Debug, Default)]
pub struct ChildStdio {
    /// Standard input (`/dev/null` when `None`).
    pub stdin: Option<Stdio>,
    /// Standard output (`/dev/null` when `None`).
    pub stdout: Option<Stdio>,
    /// Standard error (`/dev/null` when `None`).
    pub stderr: Option<Stdio>,
}

impl ChildStdio {
    /// Hands the three streams to `cmd`.
    pub(crate) fn apply(self, cmd: &mut Command) {
        cmd.stdin(self.stdin.unwrap_or_else(Stdio::null))
            .stdout(self.stdout.unwrap_or_else(Stdio::null))
            .stderr(self.stderr.unwrap_or_else(Stdio::null));
    }
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

impl Runc {
    /// `runc create`: the container's init process exists (waiting to exec) once this returns.
    pub fn create(&self, id: &str, bundle: &Path, opts: &SpawnOpts<'_>, stdio: ChildStdio) -> Result<()> {
        let mut cmd = self.command(None);
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
        self.simple(&["start"], "start", id)
    }

    /// `runc exec --detach` of the process described by the JSON file `process`.
    pub fn exec(&self, id: &str, process: &Path, opts: &SpawnOpts<'_>, stdio: ChildStdio) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.args(["exec", "--detach", "--process"]).arg(process).arg("--pid-file").arg(opts.pid_file);
        if let Some(socket) = opts.console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        cmd.arg(id);
        self.run_detached(cmd, "exec", id, stdio)
    }

    /// `runc kill [--all] <id> <signal>`.
    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.arg("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id).arg(signal.to_string());
        self.run_output(cmd, "kill", id).map(drop)
    }

    /// `runc delete [--force]`; a container runc does not know counts as deleted.
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let args: &[&str] = if force { &["delete", "--force"] } else { &["delete"] };
        match self.simple(args, "delete", id) {
            Err(Error::RuncCommand { message, .. }) if says_not_found(&message) => Ok(()),
            other => other,
        }
    }

    /// `runc pause`: freezes the container's cgroup.
    pub fn pause(&self, id: &str) -> Result<()> {
        self.simple(&["pause"], "pause", id)
    }

    /// `runc resume`: thaws it.
    pub fn resume(&self, id: &str) -> Result<()> {
        self.simple(&["resume"], "resume", id)
    }

    /// `runc update --resources <file>` with an OCI `LinuxResources` JSON document.
    pub fn update(&self, id: &str, resources: &Path) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.args(["update", "--resources"]).arg(resources).arg(id);
        self.run_output(cmd, "update", id).map(drop)
    }

    /// `runc ps --format json`: host pids of the container's processes (read from its cgroup).
    pub fn ps(&self, id: &str) -> Result<Vec<i32>> {
        let mut cmd = self.command(None);
        cmd.args(["ps", "--format", "json", id]);
        let out = self.run_output(cmd, "ps", id)?;
        // runc prints `null` for a container without processes.
        let pids: Option<Vec<i32>> = serde_json::from_slice(&out)
            .map_err(|e| Error::io(format!("parsing `runc ps {id}` output"), std::io::Error::other(e)))?;
        Ok(pids.unwrap_or_default())
    }

    /// `runc events --stats`: one snapshot of the container's cgroup statistics (runc reads cgroup v1
    /// or v2), as runc prints it: `{"type":"stats","data":{…}}`.
    pub fn stats(&self, id: &str) -> Result<serde_json::Value> {
        let mut cmd = self.command(None);
        cmd.args(["events", "--stats", id]);
        let out = self.run_output(cmd, "events", id)?;
        serde_json::from_slice(&out)
            .map_err(|e| Error::io(format!("parsing `runc events --stats {id}` output"), std::io::Error::other(e)))
    }

    /// `runc <args…> <id>`, whose output is not needed.
    fn simple(&self, args: &[&str], action: &'static str, id: &str) -> Result<()> {
        let mut cmd = self.command(None);
        cmd.args(args).arg(id);
        self.run_output(cmd, action, id).map(drop)
    }
}
