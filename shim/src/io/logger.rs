//! Logging binaries: containerd's `binary://` stdio URIs, which nerdctl (`run -d`) and `ctr run
//! --log-uri` use.
//!
//! As containerd's runc shim does, the shim starts the binary named by the URI's path with the query's
//! keys and values as arguments (`?a=1&b=2` gives `a 1 b 2`), and with nothing in its environment but
//! `CONTAINER_ID` and `CONTAINER_NAMESPACE` (plus `NAME=value` for each `env.NAME=value` parameter, as
//! containerd 2 does). The binary reads the process's stdout on fd 3 and its stderr on fd 4, and writes
//! a byte to or closes fd 5 once it is ready; the shim waits for that (at most [`READY_TIMEOUT`])
//! before the process is created.
//!
//! The binary is a child of the shim but no workload: it is never [`watch`](Reaper::watch)ed, so its
//! exit never reaches the exit handler and can never pass for a container process's. It is started
//! under a [`ChildGuard`](crate::reaper::ChildGuard), so the reaper's blanket sweep cannot reap it
//! before the shim holds a pidfd of it; from then on the pidfd is how the shim signals it (never a
//! recycled pid) and sees it exit. Whoever waits first reaps it: the sweep, or [`Logger::stop`].

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};

use crate::error::{Result, ShimError};
use crate::reaper::Reaper;

/// The scheme of logging binary URIs.
pub(super) const SCHEME: &str = "binary://";
/// Query parameters with this prefix set environment variables instead of adding arguments.
const ENV_PREFIX: &str = "env.";
/// How long a logging binary may take to signal readiness on fd 5.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a logging binary may take to exit after SIGTERM (containerd's runc shim gives it 12 s).
const TERM_TIMEOUT: Duration = Duration::from_secs(12);
/// How long to wait for a logging binary after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(2);
/// `PF_EXITING` in the flags of `/proc/<pid>/stat`: the task has begun to exit.
const PF_EXITING: u64 = 0x4;

/// A logging binary, as a `binary://` URI names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LogBinary {
    /// Absolute path of the binary.
    pub path: PathBuf,
    /// Its arguments: each query parameter's key and value, in order.
    pub args: Vec<String>,
    /// Environment variables from `env.NAME=value` parameters.
    pub env: Vec<(String, String)>,
}

impl LogBinary {
    /// Parses `uri`, whose part after `binary://` is `rest`, and checks that the binary is an
    /// executable file. Query keys and values are form-decoded; a repeated key counts once, with
    /// its first value (as containerd takes them).
    pub(super) fn parse(uri: &str, rest: &str) -> Result<LogBinary> {
        let invalid = |why: String| ShimError::InvalidArgument(format!("stdio URI {uri:?}: {why}"));
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !location.starts_with('/') {
            return Err(invalid(
                "name the logging binary by absolute path, as in binary:///usr/local/bin/logger".into(),
            ));
        }
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(location).collect();
        let path = PathBuf::from(OsStr::from_bytes(&decoded));
        let (mut args, mut env, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if !seen.insert(key.clone()) {
                continue;
            }
            match key.strip_prefix(ENV_PREFIX) {
                Some(name) if name.is_empty() || name.contains('=') => {
                    return Err(invalid(format!("{key:?} does not name an environment variable")));
                }
                Some(name) => env.push((name.to_string(), value.into_owned())),
                None => {
                    args.push(key.into_owned());
                    args.push(value.into_owned());
                }
            }
        }
        let meta = std::fs::metadata(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => invalid(format!("logging binary {} does not exist", path.display())),
            _ => invalid(format!("logging binary {} cannot be used: {e}", path.display())),
        })?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(invalid(format!("logging binary {} is not an executable file", path.display())));
        }
        Ok(LogBinary { path, args, env })
    }

    /// Starts the binary for process `id` (the container id, or the exec id of an exec'd process, as
    /// containerd passes it) of `namespace`, and waits until it is ready.
    pub(super) fn start(&self, id: &str, namespace: &str, reaper: &Reaper) -> Result<Logger> {
        let _guard = reaper.guard();
        self.spawn(id, namespace, READY_TIMEOUT)
    }

    /// [`LogBinary::start`], for a caller that keeps anyone else from reaping the shim's children
    /// until it returns (a reaper guard).
    fn spawn(&self, id: &str, namespace: &str, ready_timeout: Duration) -> Result<Logger> {
        let (out_r, out_w) = super::pipe()?;
        let (err_r, err_w) = super::pipe()?;
        let (ready_r, ready_w) = super::pipe()?;
        let passed = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
        let mut cmd = Command::new(&self.path);
        cmd.args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("CONTAINER_ID", id)
            .env("CONTAINER_NAMESPACE", namespace)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs between fork and exec and only calls fcntl and dup2, which are
        // async-signal-safe; the descriptors it moves stay open in the parent until spawn returns.
        unsafe { cmd.pre_exec(move || place_fds(passed)) };
        let child = cmd
            .spawn()
            .map_err(|e| ShimError::Unavailable(format!("starting logging binary {}: {e}", self.path.display())))?;
        // The binary has its copies; the pipes reach EOF and lose their reader with it alone.
        drop((out_r, err_r, ready_w));
        let pid = child.id() as i32;
        let pidfd = pidfd_open(pid).map_err(|e| {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            ShimError::io(format!("opening a pidfd of logging binary {} (needs Linux 5.3)", self.path.display()), e)
        })?;
        let logger = Logger {
            binary: self.path.clone(),
            pid,
            pidfd,
            pipes: Mutex::new(Some(LoggerPipes { stdout: out_w, stderr: err_w })),
            stopped: AtomicBool::new(false),
        };
        match logger.wait_ready(File::from(ready_r), ready_timeout) {
            Ok(()) => {
                tracing::info!(binary = %self.path.display(), pid, id, "logging binary ready");
                Ok(logger)
            }
            Err(not_ready) => Err(logger.abort(not_ready)),
        }
    }
}

/// In the child: moves the three descriptors onto fds 3, 4 and 5 (without close-on-exec).
fn place_fds(passed: [RawFd; 3]) -> std::io::Result<()> {
    // First above 5 (close-on-exec), so that no dup2 below overwrites a descriptor still to be moved.
    let mut lifted = [0; 3];
    for (high, fd) in lifted.iter_mut().zip(passed) {
        // SAFETY: F_DUPFD_CLOEXEC only duplicates an open descriptor.
        *high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 6) };
        if *high < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (target, fd) in (3..).zip(lifted) {
        // SAFETY: dup2 onto a descriptor number this (single-threaded, about to exec) child owns.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The write ends of a logging binary's stdout (fd 3) and stderr (fd 4) pipes.
pub(super) struct LoggerPipes {
    /// What the process writes to stdout (or the terminal's output is copied to).
    pub stdout: OwnedFd,
    /// What the process writes to stderr.
    pub stderr: OwnedFd,
}

/// Why a logging binary did not become ready.
enum NotReady {
    /// It did not signal within the timeout.
    Timeout(Duration),
    /// It exited (which closed fd 5).
    Exited,
    /// Waiting for it failed.
    Io(std::io::Error),
}

/// A running logging binary.
pub(super) struct Logger {
    binary: PathBuf,
    pid: i32,
    pidfd: OwnedFd,
    /// The pipes' write ends, until the process's stdio (or a terminal copy) takes them.
    pipes: Mutex<Option<LoggerPipes>>,
    /// Set once [`Logger::stop`] ran (or the start failed and the binary was reaped).
    stopped: AtomicBool,
}

impl Logger {
    /// The write ends of the pipes, once.
    pub(super) fn take_pipes(&self) -> Option<LoggerPipes> {
        self.pipes.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Waits for a byte on, or the closing of, fd 5 of the binary.
    fn wait_ready(&self, mut ready: File, timeout: Duration) -> std::result::Result<(), NotReady> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !poll_readable(ready.as_fd(), left).map_err(NotReady::Io)? {
                return Err(NotReady::Timeout(timeout));
            }
            let mut byte = [0u8; 1];
            match ready.read(&mut byte) {
                Ok(0) => break,
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(NotReady::Io(e)),
            }
        }
        // Closing fd 5 signals readiness, but so does exiting. A task is marked exiting before its
        // descriptors are closed, and cannot have been reaped (the caller holds a reaper guard).
        match self.exiting() {
            Ok(true) => Err(NotReady::Exited),
            Ok(false) => Ok(()),
            Err(e) => {
                tracing::debug!(pid = self.pid, error = %e, "cannot tell whether the logging binary exits; taking it as ready");
                Ok(())
            }
        }
    }

    /// Whether every thread of the binary has begun to exit.
    fn exiting(&self) -> std::io::Result<bool> {
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid))? {
            let stat = std::fs::read_to_string(task?.path().join("stat"))?;
            let flags = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(6))
                .and_then(|f| f.parse::<u64>().ok())
                .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, format!("unexpected stat line {stat:?}")))?;
            if flags & PF_EXITING == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Kills and reaps a binary that did not become ready; the error for the caller.
    fn abort(&self, why: NotReady) -> ShimError {
        self.stopped.store(true, Ordering::Release);
        self.signal(libc::SIGKILL);
        let ended = match waitid(Id::PIDFd(self.pidfd.as_fd()), WaitPidFlag::WEXITED) {
            Ok(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
            Ok(WaitStatus::Signaled(_, signal, _)) => format!("was killed by {signal}"),
            Ok(other) => format!("ended ({other:?})"),
            Err(e) => format!("could not be waited for ({e})"),
        };
        let binary = self.binary.display();
        ShimError::Unavailable(match why {
            NotReady::Timeout(timeout) => format!(
                "logging binary {binary} did not signal readiness (a byte on, or the closing of, fd 5) \
                 within {timeout:?}; it {ended}"
            ),
            NotReady::Exited => format!("logging binary {binary} {ended} before it was ready"),
            NotReady::Io(e) => format!("waiting for logging binary {binary} to be ready failed ({e}); it {ended}"),
        })
    }

    /// Waits until the binary exited, at most `timeout`; whether it did.
    pub(super) fn wait_exit(&self, timeout: Duration) -> bool {
        poll_readable(self.pidfd.as_fd(), timeout).unwrap_or_else(|e| {
            tracing::debug!(pid = self.pid, error = %e, "polling the logging binary's pidfd failed");
            false
        })
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: pidfd_send_signal with a pidfd we own, no siginfo, and no flags.
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), signal, std::ptr::null::<u8>(), 0)
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(pid = self.pid, signal, error = %e, "signalling the logging binary failed");
            }
        }
    }

    /// Closes the shim's pipe ends, then ends the binary as containerd's runc shim does: SIGTERM, and
    /// SIGKILL if it has not exited after [`TERM_TIMEOUT`]. Returns once it exited and was reaped.
    /// Call after the process's output drained (a binary exits by itself at EOF).
    pub(super) fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        drop(self.take_pipes());
        if !self.wait_exit(Duration::ZERO) {
            self.signal(libc::SIGTERM);
            if !self.wait_exit(TERM_TIMEOUT) {
                tracing::warn!(binary = %self.binary.display(), pid = self.pid, "logging binary ignored SIGTERM for {TERM_TIMEOUT:?}; killing it");
                self.signal(libc::SIGKILL);
                if !self.wait_exit(KILL_TIMEOUT) {
                    tracing::warn!(binary = %self.binary.display(), pid = self.pid, "logging binary survives SIGKILL");
                    return;
                }
            }
        }
        // The reaper's sweep may have been first (ECHILD); the pidfd keeps this from reaping another.
        match waitid(Id::PIDFd(self.pidfd.as_fd()), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
            Ok(status) => tracing::debug!(pid = self.pid, ?status, "logging binary reaped"),
            Err(Errno::ECHILD) => tracing::debug!(pid = self.pid, "logging binary already reaped"),
            Err(e) => tracing::warn!(pid = self.pid, error = %e, "reaping the logging binary failed"),
        }
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `fd` is readable (or hung up), at most `timeout`; whether it is.
fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        // Rounded up to whole milliseconds, so a short wait does not become a busy loop.
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_nanos(999_999);
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)) {
            Ok(n) => return Ok(n > 0),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new (close-on-exec) descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn parse(uri: &str) -> Result<LogBinary> {
        LogBinary::parse(uri, uri.strip_prefix(SCHEME).unwrap())
    }

    /// `/bin/sh -c script`, as a `binary://` URI.
    fn shell(script: &str) -> LogBinary {
        let query: String = form_urlencoded::Serializer::new(String::new()).append_pair("-c", script).finish();
        parse(&format!("binary:///bin/sh?{query}")).unwrap()
    }

    #[test]
    fn uris_parse_like_containerd() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("my logger");
        std::fs::write(&bin, "").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let escaped = bin.display().to_string().replace(' ', "%20");
        let uri = format!("binary://{escaped}?_NERDCTL_INTERNAL_LOGGING=/var/lib/nerdctl/1935db59&a=x+y%2Fz&flag&a=2&env.LEVEL=debug#frag");
        let parsed = parse(&uri).unwrap();
        assert_eq!(parsed.path, bin);
        assert_eq!(parsed.args, ["_NERDCTL_INTERNAL_LOGGING", "/var/lib/nerdctl/1935db59", "a", "x y/z", "flag", ""]);
        assert_eq!(parsed.env, [("LEVEL".to_string(), "debug".to_string())]);

        let err = |uri: &str| parse(uri).unwrap_err().to_string();
        let missing = err("binary:///nonexistent/kybernate-logger?x=y");
        assert!(missing.contains("logging binary /nonexistent/kybernate-logger does not exist"), "{missing}");
        assert!(err("binary://host/usr/bin/logger").contains("absolute path"));
        assert!(err("binary://relative").contains("absolute path"));
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(err(&format!("binary://{}", plain.display())).contains("is not an executable file"));
        assert!(err(&format!("binary://{}", dir.path().display())).contains("is not an executable file"));
        assert!(err(&format!("binary://{escaped}?env.=x")).contains("environment variable"));
    }

    #[test]
    fn a_ready_logger_gets_the_output_and_exits_at_eof() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("log");
        // Signals readiness with a byte, then copies stdout and stderr.
        let script = format!("echo r >&5; exec 5>&-; /bin/cat <&3 > {out}; /bin/cat <&4 >> {out}", out = out.display());
        let logger = shell(&script).spawn("c1", "ns1", Duration::from_secs(10)).unwrap();
        let environ = std::fs::read(format!("/proc/{}/environ", logger.pid)).unwrap();
        assert_eq!(String::from_utf8_lossy(&environ), "CONTAINER_ID=c1\0CONTAINER_NAMESPACE=ns1\0");
        let pipes = logger.take_pipes().unwrap();
        assert!(logger.take_pipes().is_none());
        File::from(pipes.stdout).write_all(b"to stdout\n").unwrap();
        File::from(pipes.stderr).write_all(b"to stderr\n").unwrap();
        assert!(logger.wait_exit(Duration::from_secs(10)), "the logger did not exit at EOF");
        logger.stop();
        assert!(!std::path::Path::new(&format!("/proc/{}", logger.pid)).exists(), "the logger was not reaped");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "to stdout\nto stderr\n");
    }

    #[test]
    fn closing_fd5_is_ready_and_stop_terminates() {
        let logger = shell("exec 5>&-; exec /bin/sleep 60").spawn("c1", "ns1", Duration::from_secs(10)).unwrap();
        assert!(!logger.wait_exit(Duration::from_millis(50)));
        let started = Instant::now();
        logger.stop();
        assert!(started.elapsed() < TERM_TIMEOUT, "SIGTERM did not end the logger");
        assert!(logger.wait_exit(Duration::ZERO));
        assert!(!std::path::Path::new(&format!("/proc/{}", logger.pid)).exists(), "the logger was not reaped");
    }

    #[test]
    fn a_logger_that_exits_or_hangs_fails_clearly() {
        let err = shell("exit 3").spawn("c1", "ns1", Duration::from_secs(10)).err().unwrap().to_string();
        assert!(err.contains("logging binary /bin/sh exited with status 3 before it was ready"), "{err}");
        let err = shell("exec /bin/sleep 60").spawn("c1", "ns1", Duration::from_millis(200)).err().unwrap().to_string();
        assert!(err.contains("did not signal readiness"), "{err}");
        assert!(err.contains("was killed by SIGKILL"), "{err}");
    }
}
