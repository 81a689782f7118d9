//! Running CRIU and runc as child processes, with an optional deadline.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Runs `cmd` to completion, killing it after `timeout`. Stdout is discarded; stderr is captured unless
/// the caller set it (then `capture_stderr` is false and the caller's stdio is left alone).
///
/// With a deadline the command runs in a process group of its own, and the whole group is killed when
/// the deadline passes: runc's CRIU child must not finish a dump (and kill the workload) after the
/// caller gave up on it.
pub(crate) fn run(mut cmd: Command, timeout: Option<Duration>, capture_stderr: bool) -> Result<(), Failure> {
    tracing::debug!(?cmd, ?timeout, "running");
    if capture_stderr {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    }
    if timeout.is_some() {
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().map_err(|e| Failure {
        status: format!("could not start {:?}", cmd.get_program()),
        stderr: e.to_string(),
        timed_out: false,
    })?;
    let reader = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        })
    });
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if deadline.is_some_and(|d| Instant::now() >= d) => {
                timed_out = true;
                let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
                let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                break child.wait();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(e),
        }
    };
    let stderr = reader.and_then(|r| r.join().ok()).unwrap_or_default().trim().to_string();
    match status {
        Ok(s) if s.success() && !timed_out => Ok(()),
        Ok(_) if timed_out => Err(Failure {
            status: format!("did not finish within {:?} and was killed", timeout.unwrap_or_default()),
            stderr,
            timed_out,
        }),
        Ok(s) => Err(Failure { status: s.to_string(), stderr, timed_out }),
        Err(e) => Err(Failure { status: format!("could not be waited for: {e}"), stderr, timed_out }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_exit_status_stderr_and_timeouts() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo oops >&2; exit 3"]);
        let f = run(cmd, None, true).unwrap_err();
        assert!(f.status.contains('3') && f.stderr == "oops" && !f.timed_out, "{f:?}");

        let mut cmd = Command::new("sleep");
        cmd.arg("10");
        let started = Instant::now();
        let f = run(cmd, Some(Duration::from_millis(100)), true).unwrap_err();
        assert!(f.timed_out && f.status.contains("was killed") && started.elapsed() < Duration::from_secs(5));

        let mut cmd = Command::new("true");
        cmd.arg("x");
        run(cmd, Some(Duration::from_secs(5)), true).unwrap();
    }
}
