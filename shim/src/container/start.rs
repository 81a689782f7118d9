//! Start of the init process: `runc start`, or — when Create opened a checkpoint — one
//! checkpoint-core call that restores it (`runc restore --detach` with stdio wired exactly as for a
//! fresh start, then the GPU state the bundle holds), after which init is watched like a fresh one.

use std::sync::Arc;

use checkpoint_core::{restore_container_bundle, RestorableBundle, RestoreTarget};

use super::create::{CONSOLE_TIMEOUT, INIT_PID_FILE};
use super::state::Container;
use crate::annotations::RESTORE_POLICY;
use crate::error::{Result, ShimError};
use crate::events::TaskEvent;
use crate::io::ConsoleSocket;
use crate::task::TaskStatus;

impl Container {
    /// Starts (or restores) the init process; its pid.
    pub fn start_init(&self) -> Result<u32> {
        let _ops = self.ops();
        let (pid, status) = {
            let procs = self.procs();
            (procs.init.pid, if procs.init.exit.is_some() { TaskStatus::Stopped } else { procs.init.status })
        };
        if status != TaskStatus::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "task {} is {} (pid {pid}): only a created task can be started",
                self.id,
                status.as_str()
            )));
        }
        let restore = self.restore.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(bundle) = restore {
            return self.restore_init(&bundle);
        }
        // The process table stays locked until Start is queued, so its exit is sent after it.
        let mut procs = self.procs();
        self.runc.start(&self.id)?;
        procs.init.status = TaskStatus::Running;
        self.events.send(TaskEvent::Start { container_id: self.id.clone(), pid: pid as u32 });
        tracing::info!(id = %self.id, pid, "container started");
        Ok(pid as u32)
    }

    fn restore_init(&self, bundle: &Arc<RestorableBundle>) -> Result<u32> {
        let io = self.procs().init.io.clone().ok_or_else(|| ShimError::Internal("init has no stdio".into()))?;
        // The restored init must be watched before the guard ends, or its exit could be missed.
        let guard = self.reaper.guard();
        let console = if io.paths().terminal { Some(ConsoleSocket::new()?) } else { None };
        let work_dir = self.criu_work_dir("restore");
        let _ = std::fs::remove_dir_all(&work_dir);
        let target = RestoreTarget {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            work_dir: Some(work_dir),
            timeout: Some(self.config.restore_timeout()),
            pid_file: Some(self.bundle.join(INIT_PID_FILE)),
            console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
            no_pivot: self.flags.no_pivot,
            // CRIU runs this binary as its action script to hold a restore until the page images
            // are verified (`main` hands it to checkpoint-core's restore gate).
            gate_program: std::env::current_exe().ok(),
        };
        let restored = restore_container_bundle(&self.runc, &self.criu, bundle, &target, io.take_child_stdio())
            .map_err(|e| {
                match e {
                    // The image could not be brought back (checkpoint-core removed what was created).
                    e @ (checkpoint_core::Error::Runc { .. } | checkpoint_core::Error::Gpu { .. }) => {
                        ShimError::Internal(format!(
                            "restoring container {} from {} failed: {e}",
                            self.id,
                            bundle.image_dir().display()
                        ))
                    }
                    // A page image that did not match, found while CRIU restored it (the restore gate).
                    e @ checkpoint_core::Error::Bundle { .. } => ShimError::FailedPrecondition(format!(
                        "container {} cannot be restored: {e}; fix or replace the bundle, or set {RESTORE_POLICY}: \
                         fallback-fresh to start fresh when it cannot be restored",
                        self.id
                    )),
                    e => ShimError::from(e),
                }
            })?;
        let report = restored.report;
        let pid = report.pid;
        if let Some(console) = &console {
            io.attach_console(&self.id, console.receive_master(CONSOLE_TIMEOUT)?)?;
        }
        {
            let mut procs = self.procs();
            procs.init.pid = pid;
            procs.init.status = TaskStatus::Running;
            self.reaper.watch(pid);
            self.events.send(TaskEvent::Start { container_id: self.id.clone(), pid: pid as u32 });
        }
        drop(guard);
        self.restore.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(e) = crate::oom::watch(&self.id, pid, Arc::clone(&self.events)) {
            tracing::warn!(id = %self.id, error = %e, "OOM events will not be reported");
        }
        tracing::info!(
            id = %self.id,
            pid,
            image = %bundle.image_dir().display(),
            from = bundle.manifest.as_ref().map(|m| m.container.id.as_str()).unwrap_or("an image without manifest"),
            total_ms = report.timings.total.as_millis() as u64,
            pages = report.pages_restored,
            lazy_page_server = restored.fill.as_ref().map(|f| f.daemon_pid()),
            "container restored"
        );
        // A lazy restore's fill goes on in checkpoint-core's supervisor, which kills the container
        // (its exit is then reported as any other) if a page cannot be brought in or verified.
        Ok(pid as u32)
    }
}
