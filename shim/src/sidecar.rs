//! Running `kybernate-sidecar` from the shim: fetching a remote bundle for a restore (`pull`) and
//! pushing a diskless checkpoint to the store (`push`), and for a remote lazy restore, fetching while
//! serving the pages (`pull --serve-pages`). One place spawns it, under the reaper's
//! spawn hook, within a time limit, and words its failures with the fix.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use checkpoint_core::{PageFeed, SpawnHook, Spawner};

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
    let said = last_lines(&String::from_utf8_lossy(&output.stderr));
    Ok(SidecarRun {
        code: output.status.code(),
        status: output.status.to_string(),
        stdout: String::from_utf8_lossy(&output.stdout).trim().to_string(),
        said,
    })
}

/// A `kybernate-sidecar pull --serve-pages` that said its bundle can be restored and now serves its
/// pages (`docs/shim.md`, remote lazy restore). Dropped before [`ServingPull::finish`], it is killed.
struct ServingPull {
    child: Option<Child>,
    stderr: Option<std::thread::JoinHandle<String>>,
    reaper: Arc<Reaper>,
    what: String,
}

impl ServingPull {
    /// Waits for the sidecar to exit: its exit status and its stderr; `None` once it was waited for.
    fn end(&mut self) -> Option<(std::io::Result<ExitStatus>, String)> {
        let mut child = self.child.take()?;
        let status = child.wait();
        self.reaper.leave();
        let said = self.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default();
        Some((status, said))
    }

    /// Waits for the pull to end: `Ok` once it has written every page and the daemon had all it asked
    /// for.
    fn finish(mut self) -> checkpoint_core::Result<()> {
        let Some((status, said)) = self.end() else { return Ok(()) };
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(checkpoint_core::Error::io(
                format!("{} ({s})", self.what),
                std::io::Error::other(last_lines(&said)),
            )),
            Err(e) => Err(checkpoint_core::Error::io(format!("waiting for {}", self.what), e)),
        }
    }
}

impl Drop for ServingPull {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.reaper.leave();
        }
    }
}

/// Runs `kybernate-sidecar` with `args` plus `--serve-pages` on one end of a new socket pair and
/// returns, once it prints the bundle directory (within `timeout`), that directory and the page
/// feed a lazy restore of it takes its pages from (the other end of the pair); a run that ended
/// before, with what it said.
pub fn pull_serving_pages<S: AsRef<OsStr>>(
    config: &ShimConfig,
    reaper: &Arc<Reaper>,
    args: &[S],
    criu_version: &str,
    timeout: Duration,
    what: &str,
    timeout_fix: &str,
) -> Result<std::result::Result<(PathBuf, PageFeed), SidecarRun>> {
    const SERVE_FD: i32 = 3;
    let (ours, theirs) = UnixStream::pair().map_err(|e| ShimError::io("creating the page-server socket", e))?;
    let mut cmd = Command::new(&config.sidecar_binary);
    cmd.args(args)
        .args(["--serve-pages", &SERVE_FD.to_string(), "--criu-version", criu_version])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    checkpoint_core::pass_fd(&mut cmd, OwnedFd::from(theirs), SERVE_FD);
    reaper.enter();
    let spawned = cmd.spawn();
    // The command holds this side's copy of the sidecar's end.
    drop(cmd);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            reaper.leave();
            return Err(ShimError::Unavailable(format!(
                "{what} with kybernate-sidecar: {e}; install kybernate-sidecar or set sidecar_binary in the shim config (now {})",
                config.sidecar_binary.display()
            )));
        }
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
            text
        })
    });
    let mut pull = ServingPull { child: Some(child), stderr, reaper: Arc::clone(reaper), what: what.to_string() };
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = stdout {
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
    }
    let line = match rx.recv_timeout(timeout) {
        Ok(line) => line.trim().to_string(),
        Err(RecvTimeoutError::Timeout) => {
            return Err(ShimError::Unavailable(format!(
                "{what} with kybernate-sidecar: it did not finish within {timeout:?}; {timeout_fix}"
            )))
        }
        Err(RecvTimeoutError::Disconnected) => String::new(),
    };
    if line.is_empty() {
        let (status, said) = pull.end().map(|(status, said)| (status.ok(), said)).unwrap_or_default();
        return Ok(Err(SidecarRun {
            code: status.and_then(|s| s.code()),
            status: status.map(|s| s.to_string()).unwrap_or_else(|| "lost".into()),
            stdout: String::new(),
            said: last_lines(&said),
        }));
    }
    let feed = PageFeed { socket: OwnedFd::from(ours), finished: Box::new(move || pull.finish()) };
    Ok(Ok((PathBuf::from(line), feed)))
}

/// The last lines of a tool's stderr, joined with `; `.
fn last_lines(stderr: &str) -> String {
    stderr.trim().lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ")
}
