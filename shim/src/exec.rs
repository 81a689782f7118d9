//! Exec: register an additional process (Exec), then run it with `runc exec --detach` (Start with an
//! exec id).

use std::sync::Arc;

use containerd_shim::api::{ExecProcessRequest, Status};
use containerd_shim::protos::events::task::{TaskExecAdded, TaskExecStarted};

use crate::container::Container;
use crate::create::{read_pid_file, CONSOLE_TIMEOUT};
use crate::error::{Result, ShimError};
use crate::io::{ConsoleSocket, IoOwner, ProcessIo, StdioPaths};
use crate::process::Process;
use crate::runc::SpawnOpts;

impl Container {
    /// Registers an exec'd process; it runs at Start.
    pub fn add_exec(&self, req: &ExecProcessRequest) -> Result<()> {
        if req.exec_id.is_empty() {
            return Err(ShimError::InvalidArgument("the exec id is empty".into()));
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| ShimError::InvalidArgument(format!("exec {} has no process spec", req.exec_id)))?;
        let mut process: serde_json::Value = serde_json::from_slice(&spec.value).map_err(|e| {
            ShimError::InvalidArgument(format!("the process spec of exec {} is not JSON: {e}", req.exec_id))
        })?;
        if !process.is_object() {
            return Err(ShimError::InvalidArgument(format!(
                "the process spec of exec {} is not an object",
                req.exec_id
            )));
        }
        process["terminal"] = req.terminal.into();
        let _ops = self.ops();
        self.require_status(&[Status::RUNNING, Status::PAUSED], "exec'd into")?;
        let mut procs = self.procs();
        if procs.execs.contains_key(&req.exec_id) {
            return Err(ShimError::AlreadyExists(format!("exec {} already exists in {}", req.exec_id, self.id)));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        procs.execs.insert(req.exec_id.clone(), Process::new(&req.exec_id, stdio, Some(process)));
        self.events.publish(TaskExecAdded {
            container_id: self.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }

    /// Runs a registered exec'd process; its pid.
    pub fn start_exec(&self, exec_id: &str) -> Result<u32> {
        let _ops = self.ops();
        self.require_status(&[Status::RUNNING], "exec'd into")?;
        let (stdio, spec) = {
            let procs = self.procs();
            let p = procs.get(exec_id)?;
            if p.pid != 0 || p.exit.is_some() {
                return Err(ShimError::FailedPrecondition(format!("exec {exec_id} has already been started")));
            }
            (p.stdio.clone(), p.spec.clone().unwrap_or_default())
        };
        let owner = IoOwner { namespace: &self.namespace, container_id: &self.id, exec_id, reaper: self.runc.reaper() };
        let io = Arc::new(ProcessIo::new(&owner, &stdio, self.flags.io_uid, self.flags.io_gid)?);
        let process_file = self.bundle.join(format!("exec-{exec_id}.json"));
        let pid_file = self.bundle.join(format!("exec-{exec_id}.pid"));
        std::fs::write(&process_file, spec.to_string())
            .map_err(|e| ShimError::io(format!("writing {}", process_file.display()), e))?;
        // Watch the new pid before the guard ends, so a quick exit is not reaped as an orphan.
        let guard = self.runc.reaper().guard();
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
        let pid = read_pid_file(&pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        {
            let mut procs = self.procs();
            let p = procs.get_mut(exec_id)?;
            p.pid = pid;
            p.status = Status::RUNNING;
            p.io = Some(io);
            self.runc.reaper().watch(pid);
            self.events.publish(TaskExecStarted {
                container_id: self.id.clone(),
                exec_id: exec_id.to_string(),
                pid: pid as u32,
                ..Default::default()
            });
        }
        drop(guard);
        tracing::info!(id = %self.id, exec_id, pid, "exec started");
        Ok(pid as u32)
    }
}
