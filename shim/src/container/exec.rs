//! Exec: register an additional process (Exec), then run it with `runc exec --detach` (Start with an
//! exec id).

use std::sync::Arc;

use checkpoint_core::SpawnOpts;

use super::create::{read_pid, CONSOLE_TIMEOUT};
use super::state::Container;
use crate::error::{Result, ShimError};
use crate::events::TaskEvent;
use crate::io::{ConsoleSocket, IoOwner, ProcessIo};
use crate::process::Process;
use crate::task::{ExecRequest, TaskStatus};

impl Container {
    /// Registers an exec'd process; it runs at Start.
    pub fn add_exec(&self, req: ExecRequest) -> Result<()> {
        if req.exec_id.is_empty() {
            return Err(ShimError::InvalidArgument("the exec id is empty".into()));
        }
        let mut process = req.spec;
        if !process.is_object() {
            return Err(ShimError::InvalidArgument(format!(
                "the process spec of exec {} is not an object",
                req.exec_id
            )));
        }
        process["terminal"] = req.stdio.terminal.into();
        let _ops = self.ops();
        self.require_status(&[TaskStatus::Running, TaskStatus::Paused], "exec'd into")?;
        let mut procs = self.procs();
        if procs.execs.contains_key(&req.exec_id) {
            return Err(ShimError::AlreadyExists(format!("exec {} already exists in {}", req.exec_id, self.id)));
        }
        procs.execs.insert(req.exec_id.clone(), Process::new(&req.exec_id, req.stdio, Some(process)));
        self.events.send(TaskEvent::ExecAdded { container_id: self.id.clone(), exec_id: req.exec_id });
        Ok(())
    }

    /// Runs a registered exec'd process; its pid.
    pub fn start_exec(&self, exec_id: &str) -> Result<u32> {
        let _ops = self.ops();
        self.require_status(&[TaskStatus::Running], "exec'd into")?;
        let (stdio, spec) = {
            let procs = self.procs();
            let p = procs.get(exec_id)?;
            if p.pid != 0 || p.exit.is_some() {
                return Err(ShimError::FailedPrecondition(format!("exec {exec_id} has already been started")));
            }
            (p.stdio.clone(), p.spec.clone().unwrap_or_default())
        };
        let owner = IoOwner { namespace: &self.namespace, container_id: &self.id, exec_id, reaper: &self.reaper };
        let io = Arc::new(ProcessIo::new(&owner, &stdio, self.flags.io_uid, self.flags.io_gid)?);
        let process_file = self.bundle.join(format!("exec-{exec_id}.json"));
        let pid_file = self.bundle.join(format!("exec-{exec_id}.pid"));
        std::fs::write(&process_file, spec.to_string())
            .map_err(|e| ShimError::io(format!("writing {}", process_file.display()), e))?;
        // Watch the new pid before the guard ends, so a quick exit is not reaped as an orphan.
        let guard = self.reaper.guard();
        let console = if stdio.terminal { Some(ConsoleSocket::new()?) } else { None };
        let opts = SpawnOpts {
            pid_file: &pid_file,
            console_socket: console.as_ref().map(ConsoleSocket::path),
            no_pivot: false,
            no_new_keyring: false,
        };
        let ran = self.runc.exec(&self.id, &process_file, &opts, io.take_child_stdio());
        let _ = std::fs::remove_file(&process_file);
        ran?;
        if let Some(console) = &console {
            io.attach_console(&format!("{}-{exec_id}", self.id), console.receive_master(CONSOLE_TIMEOUT)?)?;
        }
        let pid = read_pid(&pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        {
            let mut procs = self.procs();
            let p = procs.get_mut(exec_id)?;
            p.pid = pid;
            p.status = TaskStatus::Running;
            p.io = Some(io);
            self.reaper.watch(pid);
            self.events.send(TaskEvent::ExecStarted {
                container_id: self.id.clone(),
                exec_id: exec_id.to_string(),
                pid: pid as u32,
            });
        }
        drop(guard);
        tracing::info!(id = %self.id, exec_id, pid, "exec started");
        Ok(pid as u32)
    }
}
