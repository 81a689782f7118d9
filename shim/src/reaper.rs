//! Reaping: the shim is the child subreaper of everything runc and CRIU start, so container init
//! processes, exec'd processes and restored trees are re-parented to it and must be waited for here.
//!
//! Two kinds of children share the process: short-lived tools (runc, CRIU via checkpoint-core) that
//! their callers wait for with `std::process`, and the long-lived workload processes. A blanket
//! `waitpid(-1)` would steal the tools' exit statuses, so it runs only while no tool runs: every tool
//! checkpoint-core starts runs inside a span of the reaper (it is their [`SpawnHook`]), and the shim
//! holds a [`ChildGuard`] where a span must outlast one run. Workload processes are registered with [`Reaper::watch`] and
//! waited for by pid at every `SIGCHLD`, guard or not, so their exits are never delayed.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use checkpoint_core::SpawnHook;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Result, ShimError};

/// Called with `(pid, exit status)` for every watched process that exits; the status is the exit
/// code, or 128 + the signal number for a process killed by a signal (as containerd reports it).
/// Returns whether a container claimed the exit; an unclaimed one is kept for
/// [`Reaper::replay_unclaimed`].
pub type ExitHandler = Box<dyn Fn(i32, u32) -> bool + Send + Sync>;

/// How many unclaimed exits are kept (the oldest go first).
const MAX_UNCLAIMED: usize = 64;

#[derive(Default)]
struct State {
    /// Tool runs in progress; the blanket sweep waits until there are none.
    tools: usize,
    /// Workload processes whose exits are reported.
    watched: HashSet<i32>,
    /// Exits of watched processes that no container claimed yet: a process that exits while its
    /// container is still being created (the container table is not locked across Create).
    unclaimed: Vec<(i32, u32)>,
}

/// The shim's reaper. Create one per process with [`Reaper::start`].
pub struct Reaper {
    state: Mutex<State>,
    wake: UnixStream,
    on_exit: ExitHandler,
}

/// Held while a tool (runc, CRIU) runs as a child of the shim; see the module docs.
pub struct ChildGuard<'a> {
    reaper: &'a Reaper,
}

impl Drop for ChildGuard<'_> {
    fn drop(&mut self) {
        self.reaper.leave();
    }
}

/// checkpoint-core spawns runc, CRIU and `cuda-checkpoint` inside these spans, so every tool run
/// holds back the blanket sweep without the shim wrapping each call.
impl SpawnHook for Reaper {
    fn enter(&self) {
        self.lock().tools += 1;
    }

    fn leave(&self) {
        self.lock().tools -= 1;
        self.nudge();
    }
}

impl Reaper {
    /// Makes this process a child subreaper, installs the `SIGCHLD` handler and starts the reaping
    /// thread, which calls `on_exit` for watched processes.
    pub fn start(on_exit: ExitHandler) -> Result<Arc<Reaper>> {
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| ShimError::Internal(format!("cannot become a child subreaper: {e}")))?;
        let (mut rx, tx) = UnixStream::pair().map_err(|e| ShimError::io("creating the SIGCHLD pipe", e))?;
        let signal_tx = tx.try_clone().map_err(|e| ShimError::io("cloning the SIGCHLD pipe", e))?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGCHLD, signal_tx)
            .map_err(|e| ShimError::io("installing the SIGCHLD handler", e))?;
        tx.set_nonblocking(true).map_err(|e| ShimError::io("configuring the SIGCHLD pipe", e))?;
        let reaper = Arc::new(Reaper { state: Mutex::new(State::default()), wake: tx, on_exit });
        let worker = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    match rx.read(&mut buf) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "SIGCHLD pipe failed; no more exits will be reaped");
                            return;
                        }
                    }
                    for (pid, status) in worker.reap() {
                        worker.report(pid, status);
                    }
                }
            })
            .map_err(|e| ShimError::io("starting the reaper thread", e))?;
        Ok(reaper)
    }

    /// A reaper that reaps nothing (no `SIGCHLD` handler, no thread), for tests of code that takes
    /// its guards: a sweep would steal the statuses of children other tests wait for.
    #[cfg(test)]
    pub(crate) fn inert() -> Arc<Reaper> {
        let (_, wake) = UnixStream::pair().expect("a socket pair");
        wake.set_nonblocking(true).expect("a non-blocking socket");
        Arc::new(Reaper { state: Mutex::new(State::default()), wake, on_exit: Box::new(|_, _| false) })
    }

    /// Hands an exit to the handler, keeping it when no container claims it.
    fn report(&self, pid: i32, status: u32) {
        if !(self.on_exit)(pid, status) {
            tracing::debug!(pid, status, "exit not claimed yet; kept until its container is added");
            let mut state = self.lock();
            if state.unclaimed.len() == MAX_UNCLAIMED {
                state.unclaimed.remove(0);
            }
            state.unclaimed.push((pid, status));
        }
    }

    /// Offers the kept, unclaimed exits to the handler again: call it once a new container is in the
    /// table, so an init process that exited while its container was being created is reported.
    pub fn replay_unclaimed(&self) {
        let pending = std::mem::take(&mut self.lock().unclaimed);
        for (pid, status) in pending {
            self.report(pid, status);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds back the blanket sweep until the guard is dropped: for spans longer than one tool run,
    /// such as `runc create` until the new init process is [watched](Reaper::watch).
    pub fn guard(&self) -> ChildGuard<'_> {
        self.enter();
        ChildGuard { reaper: self }
    }

    /// Reports the exit of `pid` (a workload process re-parented to the shim) to the exit handler.
    /// Register it before dropping the guard of the tool that started it, so no exit is missed.
    /// (The exit of a pid that is unwatched again is still reaped, but reported to no one.)
    pub fn watch(&self, pid: i32) {
        if pid > 0 {
            self.lock().watched.insert(pid);
            self.nudge();
        }
    }

    /// Stops reporting `pid` (its container is gone); a later exit is still reaped.
    pub fn unwatch(&self, pid: i32) {
        self.lock().watched.remove(&pid);
    }

    /// Wakes the reaping thread (a missed `SIGCHLD` costs nothing but a pass).
    fn nudge(&self) {
        let _ = (&self.wake).write(&[0]);
    }

    /// One pass: watched pids first, then everything else if no tool is running.
    fn reap(&self) -> Vec<(i32, u32)> {
        let watched: Vec<i32> = self.lock().watched.iter().copied().collect();
        let mut exits = Vec::new();
        for pid in watched {
            if let Some(status) = wait_one(Pid::from_raw(pid)) {
                exits.push((pid, status));
            }
        }
        let mut state = self.lock();
        if state.tools == 0 {
            // Holding the lock keeps new tools from starting while we sweep.
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) => exits.push((pid.as_raw(), code as u32)),
                    Ok(WaitStatus::Signaled(pid, sig, _)) => exits.push((pid.as_raw(), 128 + sig as u32)),
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "waitpid failed");
                        break;
                    }
                }
            }
        }
        exits.retain(|(pid, status)| {
            let known = state.watched.remove(pid);
            if !known {
                tracing::debug!(pid, status, "reaped an orphan");
            }
            known
        });
        exits
    }
}

/// Waits for `pid` without blocking; its exit status if it has exited.
fn wait_one(pid: Pid) -> Option<u32> {
    loop {
        return match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(code as u32),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(128 + sig as u32),
            Err(Errno::EINTR) => continue,
            // still running, stopped, or not (yet) our child
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_no_container_claims_yet_is_reported_once_one_does() {
        let claimable = Arc::new(Mutex::new(HashSet::new()));
        let reported = Arc::new(Mutex::new(Vec::new()));
        let (claim, seen) = (Arc::clone(&claimable), Arc::clone(&reported));
        let (_, wake) = UnixStream::pair().unwrap();
        let reaper = Reaper {
            state: Mutex::new(State::default()),
            wake,
            on_exit: Box::new(move |pid, status| {
                let claimed = claim.lock().unwrap().contains(&pid);
                if claimed {
                    seen.lock().unwrap().push((pid, status));
                }
                claimed
            }),
        };
        reaper.report(41, 0);
        reaper.report(42, 143);
        assert!(reported.lock().unwrap().is_empty());
        claimable.lock().unwrap().insert(42);
        reaper.replay_unclaimed();
        assert_eq!(*reported.lock().unwrap(), [(42, 143)], "reported once its container is added");
        reaper.replay_unclaimed();
        assert_eq!(reported.lock().unwrap().len(), 1, "reported once only");
        assert_eq!(reaper.lock().unclaimed, [(41, 0)], "one nobody claims stays kept");
        for pid in 0..MAX_UNCLAIMED as i32 + 5 {
            reaper.report(1000 + pid, 0);
        }
        assert_eq!(reaper.lock().unclaimed.len(), MAX_UNCLAIMED, "bounded");
    }
}
