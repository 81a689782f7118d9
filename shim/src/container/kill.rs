//! Kill: a signal to init (through runc, to all its processes with `all`) or to an exec'd process. A
//! stop signal to an opted-in container checkpoints it first (`stop.rs`).

use super::state::Container;
use super::stop::is_stop_signal;
use crate::error::{Result, ShimError};

impl Container {
    /// Sends `signal` to the init process or to an exec. Once an opted-in container was checkpointed
    /// on this stop signal it is gone, and the signal is not sent.
    pub fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let procs = self.procs();
        let p = procs.get(exec_id)?;
        if p.exit.is_some() {
            return Err(ShimError::NotFound(format!("process {} of {} already finished", p.pid, self.id)));
        }
        if p.pid <= 0 {
            return Err(ShimError::FailedPrecondition(format!(
                "{} of container {} has not been started: nothing to signal",
                if exec_id.is_empty() { "the init process".to_string() } else { format!("exec {exec_id}") },
                self.id
            )));
        }
        if exec_id.is_empty() {
            drop(procs);
            let on_stop = self.checkpoint_on_stop.filter(|_| is_stop_signal(signal));
            if on_stop.is_some_and(|mode| self.checkpoint_before_stop(signal, mode)) {
                return Ok(());
            }
            if signal == libc::SIGKILL as u32 {
                // A checkpoint on stop in progress finishes first (bounded by its budget): killing the
                // container in the middle would lose both it and its checkpoint.
                let _ops = self.ops();
                return match self.runc.kill(&self.id, signal, all) {
                    Err(_) if self.gone() => Ok(()),
                    other => Ok(other?),
                };
            }
            return Ok(self.runc.kill(&self.id, signal, all)?);
        }
        let sig = nix::sys::signal::Signal::try_from(signal as i32)
            .map_err(|_| ShimError::InvalidArgument(format!("{signal} is not a signal number")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig).map_err(|e| match e {
            nix::Error::ESRCH => ShimError::NotFound(format!("process {} already finished", p.pid)),
            e => ShimError::io(format!("signalling pid {}", p.pid), e.into()),
        })
    }
}
