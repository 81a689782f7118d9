//! Start of the init process: `runc start`, or — when Create carried a checkpoint — `runc restore
//! --detach` through checkpoint-core, with stdio wired exactly as for a fresh start, followed by the
//! restore of the GPU state a bundle holds (checked at Create).

use checkpoint_core::{restore_container, ContainerRestore, RestoreIo, RestoreOptions};
use containerd_shim::api::Status;
use containerd_shim::protos::events::task::TaskStart;

use crate::checkpoint::RestoreSource;
use crate::container::Container;
use crate::create::{CONSOLE_TIMEOUT, INIT_PID_FILE};
use crate::error::{Result, ShimError};
use crate::io::ConsoleSocket;

impl Container {
    /// Starts (or restores) the init process; its pid.
    pub fn start_init(&self) -> Result<u32> {
        let _ops = self.ops();
        let (pid, status) = {
            let procs = self.procs();
            (procs.init.pid, if procs.init.exit.is_some() { Status::STOPPED } else { procs.init.status })
        };
        if status != Status::CREATED {
            return Err(ShimError::FailedPrecondition(format!(
                "task {} is {} (pid {pid}): only a created task can be started",
                self.id,
                format!("{status:?}").to_lowercase()
            )));
        }
        let restore = self.restore.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(source) = restore {
            return self.restore_init(&source);
        }
        // The process table stays locked until TaskStart is queued, so its exit is published after it.
        let mut procs = self.procs();
        self.runc.start(&self.id)?;
        procs.init.status = Status::RUNNING;
        self.events.publish(TaskStart { container_id: self.id.clone(), pid: pid as u32, ..Default::default() });
        tracing::info!(id = %self.id, pid, "container started");
        Ok(pid as u32)
    }

    fn restore_init(&self, source: &RestoreSource) -> Result<u32> {
        let io = self.procs().init.io.clone().ok_or_else(|| ShimError::Internal("init has no stdio".into()))?;
        let terminal = io.paths().terminal;
        let guard = self.runc.reaper().guard();
        let console = if terminal { Some(ConsoleSocket::new()?) } else { None };
        let stdio = io.take_child_stdio();
        let req = ContainerRestore {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            image_dir: source.image_dir.clone(),
            options: RestoreOptions {
                work_dir: Some(self.criu_work_dir("restore")),
                timeout: Some(self.config.restore_timeout()),
                flags: source.flags.clone(),
            },
            pid_file: Some(self.bundle.join(INIT_PID_FILE)),
            console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
            no_pivot: self.flags.no_pivot,
        };
        let _ = std::fs::remove_dir_all(self.criu_work_dir("restore"));
        let runc = self.runc.core();
        let report = restore_container(
            &runc,
            &self.criu,
            &req,
            RestoreIo { stdin: stdio.stdin, stdout: stdio.stdout, stderr: stdio.stderr },
        )
        .map_err(|e| match e {
            // CRIU's own failure: the image could not be brought back (checkpoint-core removed the rest).
            e @ checkpoint_core::Error::Runc { .. } => ShimError::Internal(format!(
                "restoring container {} from {} failed: {e}",
                self.id,
                source.image_dir.display()
            )),
            e => ShimError::from(e),
        })?;
        if let Some(gpu) = &source.gpu {
            // On failure checkpoint-core has removed the restored container: the task stays created.
            gpu.restore(&runc, &req).map_err(|e| {
                ShimError::Internal(format!(
                    "restoring the GPU state of container {} from {} failed: {e}",
                    self.id,
                    source.image_dir.display()
                ))
            })?;
        }
        let pid = report.pid;
        if let Some(console) = &console {
            io.attach_console(&self.id, console.receive_master(CONSOLE_TIMEOUT)?)?;
        }
        {
            let mut procs = self.procs();
            procs.init.pid = pid;
            procs.init.status = Status::RUNNING;
            self.runc.reaper().watch(pid);
            self.events.publish(TaskStart { container_id: self.id.clone(), pid: pid as u32, ..Default::default() });
        }
        drop(guard);
        self.restore.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(e) = crate::oom::watch(&self.id, pid, self.events.clone()) {
            tracing::warn!(id = %self.id, error = %e, "OOM events will not be reported");
        }
        tracing::info!(
            id = %self.id,
            pid,
            image = %source.image_dir.display(),
            from = source.manifest.as_ref().map(|m| m.container.id.as_str()).unwrap_or("an image without manifest"),
            total_ms = report.timings.total.as_millis() as u64,
            pages = report.pages_restored,
            "container restored"
        );
        Ok(pid as u32)
    }
}
