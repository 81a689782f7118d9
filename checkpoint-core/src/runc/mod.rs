//! The one runc client of Kybernate: every runc command the shim and the library run (lifecycle,
//! checkpoint, restore) goes through [`Runc`], which carries runc's global flags (`--root`, `--log`
//! with `--log-format json`, `--systemd-cgroup`), puts the configured CRIU first on runc's `PATH`,
//! and spawns through the embedder's [`SpawnHook`] (the shim's reaper), as rust-extensions' `runc`
//! crate does with its `Spawner`.

mod checkpoint;
mod lifecycle;
mod restore;

pub use checkpoint::checkpoint_container;
pub use lifecycle::{ChildStdio, SpawnOpts};
pub use restore::{restore_container, ContainerRestore};

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;

use crate::criu::{find_on_path, Criu};
use crate::error::{Error, Result};
use crate::exec::{SpawnHook, Spawner};
use crate::options::CriuFlags;

/// How long a runc lifecycle command (`create`, `state`, `kill`, `delete`, `ps`, …) may run before it
/// is killed, unless [`Runc::with_timeout`] says otherwise. Checkpoint and restore have their own.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

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

/// A runc binary with its global flags, and how its runs are spawned.
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    root: Option<PathBuf>,
    log: Option<PathBuf>,
    systemd_cgroup: bool,
    timeout: Duration,
    spawner: Spawner,
    version: Arc<OnceLock<Option<String>>>,
}

impl Default for Runc {
    fn default() -> Self {
        Runc::new(find_on_path("runc").unwrap_or_else(|| PathBuf::from("runc")), None)
    }
}

/// Whether runc's message says the container does not exist (runc's own words, as containerd's
/// go-runc matches them).
pub(crate) fn says_not_found(message: &str) -> bool {
    message.contains("does not exist") || message.contains("not found")
}

impl Runc {
    /// Uses the runc binary at `binary` with state under `root` (runc's default root when `None`).
    pub fn new(binary: impl Into<PathBuf>, root: Option<PathBuf>) -> Self {
        Runc {
            binary: binary.into(),
            root,
            log: None,
            systemd_cgroup: false,
            timeout: DEFAULT_COMMAND_TIMEOUT,
            spawner: Spawner::default(),
            version: Arc::default(),
        }
    }

    /// runc logs to `log` as JSON (`--log <log> --log-format json`); errors are read back from it.
    pub fn with_log(mut self, log: impl Into<PathBuf>) -> Self {
        self.log = Some(log.into());
        self
    }

    /// runc manages cgroups through systemd (`--systemd-cgroup`), as containerd's
    /// `SystemdCgroup = true` asks.
    pub fn with_systemd_cgroup(mut self, systemd_cgroup: bool) -> Self {
        self.systemd_cgroup = systemd_cgroup;
        self
    }

    /// A lifecycle command still running after `timeout` is killed with its process group, and fails
    /// naming the command and the timeout (default [`DEFAULT_COMMAND_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Every runc run happens inside a span of `hook` (see [`SpawnHook`]).
    pub fn with_spawn_hook(mut self, hook: Arc<dyn SpawnHook>) -> Self {
        self.spawner = Spawner::hooked(hook);
        self
    }

    /// The binary this handle runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The state root (`--root`), if one was set.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// runc's JSON log, if one was set.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Whether runc runs with `--systemd-cgroup`.
    pub fn systemd_cgroup(&self) -> bool {
        self.systemd_cgroup
    }

    /// How runc's runs are spawned.
    pub(crate) fn spawner(&self) -> &Spawner {
        &self.spawner
    }

    /// A runc command with the global flags, logging to `log` (the client's own log when it has one),
    /// whose `criu` is the given one (runc runs `criu` from `PATH`).
    fn command_logging(&self, criu: Option<&Criu>, log: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.binary);
        if let Some(root) = &self.root {
            cmd.arg("--root").arg(root);
        }
        if let Some(log) = self.log.as_deref().or(log) {
            cmd.arg("--log").arg(log).args(["--log-format", "json"]);
        }
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
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

    /// A runc command with the global flags.
    pub(crate) fn command(&self, criu: Option<&Criu>) -> Command {
        self.command_logging(criu, None)
    }

    /// `runc --version`'s version (e.g. `1.1.5+ds1`), for manifests; `None` if runc does not say.
    /// Asked once per handle (clones share the answer).
    pub fn version(&self) -> Option<String> {
        self.version
            .get_or_init(|| {
                let mut cmd = Command::new(&self.binary);
                cmd.arg("--version").stdin(Stdio::null());
                let out = self.spawner.output(&mut cmd).ok()?;
                let text = String::from_utf8_lossy(&out.stdout);
                text.lines().find_map(|l| l.strip_prefix("runc version ")).map(|v| v.trim().to_string())
            })
            .clone()
    }

    /// The error of a command that could not run: runc missing, or killed at the timeout.
    fn spawn_error(&self, action: &'static str, id: &str, source: std::io::Error) -> Error {
        if source.kind() == std::io::ErrorKind::TimedOut {
            return Error::RuncCommand {
                action,
                id: id.to_string(),
                status: format!("did not finish within {:?} and was killed", self.timeout),
                message: "runc hung; check the node (a stuck cgroup or mount), or raise runc_timeout in the shim \
                          config"
                    .into(),
            };
        }
        Error::RuncMissing { path: self.binary.clone(), source }
    }

    fn log_offset(&self) -> u64 {
        self.log.as_ref().and_then(|l| std::fs::metadata(l).ok()).map(|m| m.len()).unwrap_or(0)
    }

    /// The last error runc logged after `offset` in its JSON log, else `stderr`.
    fn message(&self, offset: u64, stderr: &[u8]) -> String {
        let mut text = String::new();
        if let Some(mut f) = self.log.as_ref().and_then(|l| File::open(l).ok()) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = f.read_to_string(&mut text);
            }
        }
        let logged = last_logged_error(&text);
        if logged.is_empty() {
            String::from_utf8_lossy(stderr).trim().to_string()
        } else {
            logged
        }
    }

    fn failure(&self, action: &'static str, id: &str, status: ExitStatus, message: String) -> Error {
        let message = match (&self.log, message.is_empty()) {
            (Some(log), true) => format!("no error logged in {}", log.display()),
            (None, true) => "runc printed no error".to_string(),
            (_, false) => message,
        };
        Error::RuncCommand { action, id: id.to_string(), status: status.to_string(), message }
    }

    /// Runs a command whose output the caller reads: its stdout, or runc's logged error.
    fn run_output(&self, mut cmd: Command, action: &'static str, id: &str) -> Result<Vec<u8>> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let offset = self.log_offset();
        let out = self.spawner.output_within(&mut cmd, self.timeout).map_err(|e| self.spawn_error(action, id, e))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(self.failure(action, id, out.status, self.message(offset, &out.stderr)))
    }

    /// Runs a command whose stdio belongs to a container process: success or runc's logged error.
    fn run_detached(&self, mut cmd: Command, action: &'static str, id: &str, stdio: ChildStdio) -> Result<()> {
        stdio.apply(&mut cmd);
        let offset = self.log_offset();
        let status = self.spawner.status_within(cmd, self.timeout).map_err(|e| self.spawn_error(action, id, e))?;
        if status.success() {
            return Ok(());
        }
        Err(self.failure(action, id, status, self.message(offset, &[])))
    }

    /// The state of container `id`, or `None` when runc does not know it.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>> {
        let mut cmd = self.command(None);
        cmd.args(["state", id]);
        let out = match self.run_output(cmd, "state", id) {
            Ok(out) => out,
            Err(Error::RuncCommand { message, .. }) if says_not_found(&message) => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&out)
            .map(Some)
            .map_err(|e| Error::io(format!("parsing `runc state {id}` output"), std::io::Error::other(e)))
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

    /// Removes what a failed restore created of container `id` (`runc delete --force`, which kills
    /// its processes), so nothing stays half-restored and the id can be used again; says what it did.
    pub(crate) fn remove_failed(&self, id: &str) -> String {
        match self.state(id) {
            Ok(None) => "nothing was left behind".into(),
            Ok(Some(_)) => {
                let mut delete = self.command(None);
                delete.args(["delete", "--force", id]);
                match self.spawner.run(delete, Some(Duration::from_secs(30)), true) {
                    Ok(()) => "runc delete --force removed it".into(),
                    Err(f) => format!("runc delete --force failed: {} {}", f.status, f.stderr),
                }
            }
            Err(e) => format!("its state is unknown: {e}"),
        }
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

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn a_hung_lifecycle_command_is_killed_at_its_timeout_and_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let hung = dir.path().join("runc");
        let pid_file = dir.path().join("sleeper.pid");
        std::fs::write(&hung, format!("#!/bin/sh\nsleep 600 &\necho $! > {}\nwait\n", pid_file.display())).unwrap();
        std::fs::set_permissions(&hung, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runc = Runc::new(&hung, None).with_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let err = runc.state("c1").unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        match err {
            Error::RuncCommand { action: "state", id, status, message } => {
                assert_eq!(id, "c1");
                assert_eq!(status, "did not finish within 300ms and was killed");
                assert!(message.contains("runc_timeout"), "{message}");
            }
            other => panic!("unexpected error {other}"),
        }
        // runc's whole process group went with it
        let sleeper: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let gone = (0..500).any(|_| {
            let stat = std::fs::read_to_string(format!("/proc/{sleeper}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next()).unwrap_or(None);
            if matches!(state, None | Some('Z') | Some('X')) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
            false
        });
        assert!(gone, "the hung runc's child {sleeper} still runs");
        // a detached command (create) is bounded alike
        let pid = dir.path().join("init.pid");
        let opts = SpawnOpts { pid_file: &pid, console_socket: None, no_pivot: false, no_new_keyring: false };
        let err = runc.create("c2", dir.path(), &opts, ChildStdio::default()).unwrap_err().to_string();
        assert!(err.contains("runc create of c2") && err.contains("did not finish within 300ms"), "{err}");
    }

    #[test]
    fn every_command_carries_the_global_flags() {
        let runc =
            Runc::new("/usr/bin/runc", Some("/run/r/ns".into())).with_log("/b/log.json").with_systemd_cgroup(true);
        assert_eq!(
            args(&runc.command(None)),
            ["--root", "/run/r/ns", "--log", "/b/log.json", "--log-format", "json", "--systemd-cgroup"]
        );
        // without a log of its own, a command may name one (restore logs next to CRIU's log)
        let plain = Runc::new("runc", None);
        assert!(args(&plain.command(None)).is_empty());
        assert_eq!(
            args(&plain.command_logging(None, Some(Path::new("/w/runc.log")))),
            ["--log", "/w/runc.log", "--log-format", "json"]
        );
        let criu = Criu::new("/opt/criu/sbin/criu");
        let path = runc
            .command(Some(&criu))
            .get_envs()
            .find(|(k, _)| *k == "PATH")
            .and_then(|(_, v)| v)
            .map(|v| v.to_string_lossy().into_owned());
        assert!(path.is_some_and(|p| p.starts_with("/opt/criu/sbin:")));
    }
}
