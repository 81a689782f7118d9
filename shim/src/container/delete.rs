//! Delete: remove an exited exec'd process, or the container itself (runc state, rootfs mount, stdio),
//! after all its output reached containerd.

use std::time::Duration;

use super::state::Container;
use crate::error::{Result, ShimError};
use crate::events::TaskEvent;
use crate::mount::unmount_all;
use crate::task::{Deleted, TaskStatus, KILLED_STATUS};

/// How long Delete waits for output still being copied to containerd.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

impl Container {
    /// Deletes an exec'd process (it must have exited or never started).
    pub fn delete_exec(&self, exec_id: &str) -> Result<Deleted> {
        let mut procs = self.procs();
        let p = procs.get(exec_id)?;
        if p.is_alive() {
            return Err(ShimError::FailedPrecondition(format!(
                "exec {exec_id} (pid {}) is still running: kill it before deleting it",
                p.pid
            )));
        }
        let mut p = procs.execs.remove(exec_id).expect("checked above");
        drop(procs);
        p.set_exited(0);
        self.notify();
        if let Some(io) = &p.io {
            io.finish(OUTPUT_DRAIN);
        }
        Ok(Deleted { pid: p.pid.max(0) as u32, exit: p.exit.expect("set above") })
    }

    /// Deletes the container: it must not run (created or stopped). Processes that never ran are
    /// reported as killed.
    pub fn delete_init(&self) -> Result<Deleted> {
        let _ops = self.ops();
        {
            let procs = self.procs();
            let init = &procs.init;
            if init.is_alive() && init.status != TaskStatus::Created {
                return Err(ShimError::FailedPrecondition(format!(
                    "task {} (pid {}) is {}: kill it before deleting it",
                    self.id,
                    init.pid,
                    init.status.as_str()
                )));
            }
        }
        self.runc.delete(&self.id, true)?;
        let (deleted, ios) = {
            let mut guard = self.procs();
            let procs = &mut *guard;
            let mut ios = Vec::new();
            for p in std::iter::once(&mut procs.init).chain(procs.execs.values_mut()) {
                if p.exit.is_none() {
                    if p.pid > 0 {
                        self.reaper.unwatch(p.pid);
                    }
                    p.set_exited(KILLED_STATUS);
                }
                ios.extend(p.io.clone());
            }
            let init = &procs.init;
            (Deleted { pid: init.pid.max(0) as u32, exit: init.exit.expect("set above") }, ios)
        };
        self.notify();
        for io in ios {
            io.finish(OUTPUT_DRAIN);
        }
        if let Some(rootfs) = &self.rootfs {
            unmount_all(rootfs)?;
        }
        for dir in ["checkpoint", "restore"] {
            let _ = std::fs::remove_dir_all(self.criu_work_dir(dir));
        }
        if let Some(fetched) = &self.fetched {
            match std::fs::remove_dir_all(fetched) {
                Ok(()) => tracing::info!(id = %self.id, bundle = %fetched.display(), "removed the fetched bundle"),
                Err(e) => {
                    tracing::warn!(id = %self.id, bundle = %fetched.display(), error = %e, "removing the fetched bundle")
                }
            }
        }
        self.events.send(TaskEvent::Delete {
            container_id: self.id.clone(),
            pid: deleted.pid,
            status: deleted.exit.status,
            at: deleted.exit.at,
        });
        tracing::info!(id = %self.id, pid = deleted.pid, status = deleted.exit.status, "container deleted");
        Ok(deleted)
    }
}
