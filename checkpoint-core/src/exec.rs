//! Running CRIU, runc and `cuda-checkpoint` as child processes: every child the library starts goes
//! through a [`Spawner`], which tells the embedding process's [`SpawnHook`] (if any) before the child is
//! spawned and after it was waited for, and can enforce a deadline.

use std::fmt;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Told around every child process the library starts.
///
/// A process that reaps children itself (a containerd shim is the child subreaper of its containers)
/// must not run a blanket `waitpid(-1)` while a tool runs, or it steals the tool's exit status: it
/// counts [`SpawnHook::enter`] / [`SpawnHook::leave`] pairs and sweeps only when none is open. Calls
/// nest: an embedder may hold its own span around several library calls.
pub trait SpawnHook: Send + Sync {
    /// A child is about to be spawned.
    fn enter(&self);
    /// The child started after the matching [`SpawnHook::enter`] has been waited for (or never
    /// started).
    fn leave(&self);
}

/// Hands `fd` to `cmd`'s child as descriptor `as_fd` (without close-on-exec), and to no one else.
/// The command owns `fd` until it is dropped: drop it once the child is spawned, so that this
/// process keeps no copy (a peer then sees the connection end when the child does).
pub fn pass_fd(cmd: &mut Command, fd: OwnedFd, as_fd: RawFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls are made (fcntl, dup2); `fd` lives
    // in the closure, so `raw` is open until the command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let _owned = &fd;
            let done = if raw == as_fd { libc::fcntl(raw, libc::F_SETFD, 0) } else { libc::dup2(raw, as_fd) };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How the library starts children: plainly, or inside a [`SpawnHook`]'s span.
#[derive(Clone, Default)]
pub struct Spawner {
    hook: Option<Arc<dyn SpawnHook>>,
}

impl fmt::Debug for Spawner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spawner").field("hooked", &self.hook.is_some()).finish()
    }
}

impl PartialEq for Spawner {
    fn eq(&self, other: &Self) -> bool {
        match (&self.hook, &other.hook) {
            (None, None) => true,
            (Some(a), Some(b)) => std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)),
            _ => false,
        }
    }
}

impl Eq for Spawner {}

/// Closes a hook's span when dropped.
pub(crate) struct Span<'a>(Option<&'a dyn SpawnHook>);

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if let Some(hook) = self.0 {
            hook.leave();
        }
    }
}

/// How a failed run ended, for error messages.
#[derive(Debug)]
pub(crate) struct Failure {
    /// Exit status, or why it did not finish.
    pub status: String,
    /// What it wrote to stderr (empty when stderr was not captured).
    pub stderr: String,
    /// Whether it was killed for running past its deadline.
    pub timed_out: bool,
}

impl Spawner {
    /// Children are started inside `hook`'s spans, and die with this process: each gets SIGKILL as
    /// its parent-death signal, so a shim that dies takes the runc or CRIU it was running along
    /// instead of leaving them to finish (or half-finish) work nobody waits for. The signal is tied
    /// to the spawning thread, which always waits for the child here, so it fires only when the
    /// process dies.
    pub fn hooked(hook: Arc<dyn SpawnHook>) -> Self {
        Spawner { hook: Some(hook) }
    }

    /// Makes `cmd`'s child die with this process when this spawner is hooked (see [`Spawner::hooked`]).
    pub(crate) fn prepare(&self, cmd: &mut Command) {
        if self.hook.is_none() {
            return;
        }
        let parent = std::process::id();
        // SAFETY: between fork and exec only async-signal-safe calls are made (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the signal was armed.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("the parent process died before the tool started"));
                }
                Ok(())
            });
        }
    }

    /// Opens a span of the hook; it closes when the returned value is dropped.
    pub(crate) fn span(&self) -> Span<'_> {
        let hook = self.hook.as_deref();
        if let Some(hook) = hook {
            hook.enter();
        }
        Span(hook)
    }

    /// `cmd.output()` inside a span (stdin from `/dev/null` unless the caller set it).
    pub(crate) fn output(&self, cmd: &mut Command) -> std::io::Result<Output> {
        tracing::debug!(?cmd, "running");
        self.prepare(cmd);
        let _span = self.span();
        cmd.output()
    }

    /// `cmd.output()` inside a span, killing the command's process group once `timeout` has passed
    /// (the error is then `TimedOut`, naming the timeout). For tools the embedder runs itself, such
    /// as the sidecar the shim runs to fetch a bundle.
    pub fn output_within(&self, cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
        tracing::debug!(?cmd, ?timeout, "running");
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        self.prepare(cmd);
        let _span = self.span();
        let mut child = cmd.spawn()?;
        let readers = [
            child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>),
            child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>),
        ]
        .map(|stream| {
            stream.map(|mut r| {
                std::thread::spawn(move || {
                    let mut bytes = Vec::new();
                    let _ = r.read_to_end(&mut bytes);
                    bytes
                })
            })
        });
        let status = wait_within(&mut child, timeout, cmd.get_program())?;
        let [stdout, stderr] = readers.map(|r| r.and_then(|t| t.join().ok()).unwrap_or_default());
        Ok(Output { status, stdout, stderr })
    }

    /// Spawns `cmd` (its own process group, dying with this process when hooked) inside a span and
    /// waits for it, killing its process group once `timeout` has passed (a `TimedOut` error). For
    /// commands whose stdio the caller set up, such as `runc create` with a container's stdio: the
    /// command (and so this process's copies of that stdio) is dropped once the child started, or
    /// pipes the container shares would never see EOF.
    pub(crate) fn status_within(&self, mut cmd: Command, timeout: Duration) -> std::io::Result<ExitStatus> {
        tracing::debug!(?cmd, ?timeout, "running");
        cmd.process_group(0);
        self.prepare(&mut cmd);
        let _span = self.span();
        let mut child = cmd.spawn()?;
        let program = cmd.get_program().to_os_string();
        drop(cmd);
        wait_within(&mut child, timeout, &program)
    }

    /// Runs `cmd` to completion inside a span, killing it after `timeout`. Stdout is discarded;
    /// stderr is captured unless the caller set it (then `capture_stderr` is false and the caller's
    /// stdio is left alone).
    ///
    /// With a deadline the command runs in a process group of its own, and the whole group is killed
    /// when the deadline passes: runc's CRIU child must not finish a dump (and kill the workload) after
    /// the caller gave up on it.
    pub(crate) fn run(&self, mut cmd: Command, timeout: Option<Duration>, capture_stderr: bool) -> Result<(), Failure> {
        tracing::debug!(?cmd, ?timeout, "running");
        if capture_stderr {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        if timeout.is_some() {
            cmd.process_group(0);
        }
        self.prepare(&mut cmd);
        let _span = self.span();
        let mut child = cmd.spawn().map_err(|e| Failure {
            status: format!("could not start {:?}", cmd.get_program()),
            stderr: e.to_string(),
            timed_out: false,
        })?;
        let program = cmd.get_program().to_os_string();
        // Our copies of the child's stdio must be closed now, or pipes it shares never see EOF.
        drop(cmd);
        let reader = child.stderr.take().map(|mut err| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                text
            })
        });
        let status = match timeout {
            Some(timeout) => wait_within(&mut child, timeout, &program),
            None => child.wait(),
        };
        let timed_out = matches!(&status, Err(e) if e.kind() == std::io::ErrorKind::TimedOut);
        let stderr = reader.and_then(|r| r.join().ok()).unwrap_or_default().trim().to_string();
        match status {
            Ok(s) if s.success() => Ok(()),
            Err(_) if timed_out => Err(Failure {
                status: format!("did not finish within {:?} and was killed", timeout.unwrap_or_default()),
                stderr,
                timed_out,
            }),
            Ok(s) => Err(Failure { status: s.to_string(), stderr, timed_out }),
            Err(e) => Err(Failure { status: format!("could not be waited for: {e}"), stderr, timed_out }),
        }
    }
}

/// Waits for `child` (the leader of its own process group), killing the group once `timeout` has
/// passed; the error is then `TimedOut`, naming `program` and the timeout.
fn wait_within(child: &mut Child, timeout: Duration, program: &std::ffi::OsStr) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{program:?} did not finish within {timeout:?} and was killed"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI32, Ordering};

    #[test]
    fn reports_exit_status_stderr_and_timeouts() {
        let spawner = Spawner::default();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo oops >&2; exit 3"]);
        let f = spawner.run(cmd, None, true).unwrap_err();
        assert_eq!((f.status.as_str(), f.stderr.as_str(), f.timed_out), ("exit status: 3", "oops", false));

        let mut cmd = Command::new("sleep");
        cmd.arg("10");
        let started = Instant::now();
        let f = spawner.run(cmd, Some(Duration::from_millis(100)), true).unwrap_err();
        assert!(f.timed_out && f.status.contains("was killed") && started.elapsed() < Duration::from_secs(5));

        let mut cmd = Command::new("true");
        cmd.arg("x");
        spawner.run(cmd, Some(Duration::from_secs(5)), true).unwrap();
    }

    /// Counts open spans, and records the deepest nesting seen while a child ran.
    #[derive(Default)]
    struct Counting {
        open: AtomicI32,
        max: AtomicI32,
    }

    impl SpawnHook for Counting {
        fn enter(&self) {
            let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(now, Ordering::SeqCst);
        }
        fn leave(&self) {
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_hooked_spawners_child_dies_with_its_parent() {
        let spawner = Spawner::hooked(Arc::new(Counting::default()) as Arc<dyn SpawnHook>);
        // The parent-death signal follows the spawning thread: let that thread end without waiting.
        let mut child = std::thread::scope(|s| {
            s.spawn(|| {
                let mut cmd = Command::new("sleep");
                cmd.arg("30");
                spawner.prepare(&mut cmd);
                cmd.spawn().unwrap()
            })
            .join()
            .unwrap()
        });
        let started = Instant::now();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // an unhooked spawner leaves its children alone
        let mut cmd = Command::new("true");
        Spawner::default().prepare(&mut cmd);
        assert!(cmd.status().unwrap().success());
    }

    #[test]
    fn every_child_runs_inside_a_span_of_the_hook() {
        let hook = Arc::new(Counting::default());
        let spawner = Spawner::hooked(Arc::clone(&hook) as Arc<dyn SpawnHook>);
        spawner.run(Command::new("true"), None, true).unwrap();
        assert_eq!(spawner.output(&mut Command::new("true")).unwrap().status.code(), Some(0));
        // a child that cannot start still closes its span
        assert!(spawner.run(Command::new("/nonexistent/tool"), None, true).is_err());
        assert_eq!(hook.open.load(Ordering::SeqCst), 0);
        assert_eq!(hook.max.load(Ordering::SeqCst), 1);
        {
            let _outer = spawner.span();
            spawner.run(Command::new("true"), None, true).unwrap();
        }
        assert_eq!((hook.open.load(Ordering::SeqCst), hook.max.load(Ordering::SeqCst)), (0, 2));
        let out = spawner
            .output_within(Command::new("sh").args(["-c", "echo out; echo err >&2"]), Duration::from_secs(10))
            .unwrap();
        assert_eq!((out.stdout.as_slice(), out.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
        let started = Instant::now();
        let err = spawner.output_within(Command::new("sleep").arg("10"), Duration::from_millis(100)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("did not finish within 100ms") && started.elapsed() < Duration::from_secs(5));
        assert_eq!(hook.open.load(Ordering::SeqCst), 0);
        assert_eq!(spawner, spawner.clone());
        assert_ne!(spawner, Spawner::default());
    }
}
