//! A container served by this shim: its settings, its processes, and the operations that only read or
//! signal them. The lifecycle operations live in `create.rs`, `start.rs`, `exec.rs`, `delete.rs` and
//! `checkpoint.rs`.
//!
//! Locking: `ops` serialises lifecycle operations of one container (they may take seconds: a
//! checkpoint); `procs` guards the process table and is held only briefly, except across the few runc
//! calls whose events must be ordered before the exit of the process they start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use checkpoint_core::Criu;
use containerd_shim::api::{PidsResponse, StateResponse, Status};
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::events::task::{TaskExit, TaskPaused, TaskResumed};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::util::convert_to_any;

use crate::checkpoint::RestoreSource;
use crate::config::ShimConfig;
use crate::error::{Result, ShimError};
use crate::events::Publisher;
use crate::io::ProcessIo;
use crate::process::{Exit, Process};
use crate::runc::RuncCli;

/// What the shim needs from the container's OCI spec (`config.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecInfo {
    /// Spec annotations.
    pub annotations: HashMap<String, String>,
    /// Whether the container has a pid namespace of its own (then the kernel kills all its processes
    /// when init exits; otherwise the shim must).
    pub private_pid_ns: bool,
    /// `root.path`: the container's root filesystem, absolute or relative to the bundle.
    pub root: PathBuf,
}

impl SpecInfo {
    /// Reads `config.json` in `bundle`.
    pub fn load(bundle: &Path) -> Result<Self> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|e| ShimError::io(format!("reading {}", path.display()), e))?;
        let spec: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| ShimError::InvalidArgument(format!("{} is not valid JSON: {e}", path.display())))?;
        Ok(SpecInfo::from_json(&spec))
    }

    /// Extracts the fields from a parsed spec.
    pub fn from_json(spec: &serde_json::Value) -> Self {
        let annotations = spec["annotations"]
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let private_pid_ns = spec["linux"]["namespaces"].as_array().is_some_and(|nss| {
            nss.iter().any(|ns| ns["type"] == "pid" && ns["path"].as_str().is_none_or(str::is_empty))
        });
        let root = PathBuf::from(spec["root"]["path"].as_str().unwrap_or("rootfs"));
        SpecInfo { annotations, private_pid_ns, root }
    }

    /// An annotation's value, if set and not empty.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// Settings from the task's runtime options that concern runc.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateFlags {
    /// `--no-pivot` for rootfs on a ramdisk.
    pub no_pivot: bool,
    /// `--no-new-keyring`.
    pub no_new_keyring: bool,
    /// Owner of the stdio pipes.
    pub io_uid: u32,
    /// Group of the stdio pipes.
    pub io_gid: u32,
    /// CRIU work directory for checkpoint and restore (default: in the bundle).
    pub criu_work_path: Option<PathBuf>,
}

/// The process table of a container.
pub struct Processes {
    /// The init process.
    pub init: Process,
    /// Exec'd processes by exec id.
    pub execs: HashMap<String, Process>,
}

impl Processes {
    /// The init process (`exec_id` empty) or an exec'd one.
    pub fn get(&self, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} does not exist")))
    }

    /// Mutable access to a process.
    pub fn get_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs.get_mut(exec_id).ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} does not exist")))
    }
}

/// A container served by this shim.
pub struct Container {
    /// containerd's container id (also runc's).
    pub id: String,
    /// The OCI bundle directory.
    pub bundle: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// runc, bound to this bundle.
    pub runc: RuncCli,
    /// CRIU as configured.
    pub criu: Criu,
    /// The configuration in effect for this container.
    pub config: ShimConfig,
    /// runc-related runtime options.
    pub flags: CreateFlags,
    /// What the spec says.
    pub spec: SpecInfo,
    /// The rootfs the shim mounted (unmounted at Delete).
    pub rootfs: Option<PathBuf>,
    /// The overlayfs upper directory of the rootfs (its writable layer), when it is an overlay.
    pub upperdir: Option<PathBuf>,
    /// Whether a stop signal checkpoints the container first.
    pub checkpoint_on_stop: bool,
    /// Where events go.
    pub events: Publisher,
    /// The checkpoint to restore at Start, when Create carried one.
    pub restore: Mutex<Option<RestoreSource>>,
    /// The exit status to report for init when it was checkpointed on stop (CRIU ends it with
    /// SIGKILL; containerd is told it stopped on the stop signal it sent).
    pub stop_status: Mutex<Option<u32>>,
    /// The locks and process table; see the module docs.
    pub lifecycle: Lifecycle,
}

/// What serialises a container's operations and guards its processes.
pub struct Lifecycle {
    ops: Mutex<()>,
    procs: Mutex<Processes>,
    changed: Condvar,
}

impl Lifecycle {
    /// The state of a new container whose init process is `init`.
    pub fn new(init: Process) -> Self {
        Lifecycle {
            ops: Mutex::new(()),
            procs: Mutex::new(Processes { init, execs: HashMap::new() }),
            changed: Condvar::new(),
        }
    }
}

impl Container {
    /// Serialises lifecycle operations of this container.
    pub fn ops(&self) -> MutexGuard<'_, ()> {
        self.lifecycle.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process table.
    pub fn procs(&self) -> MutexGuard<'_, Processes> {
        self.lifecycle.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes Wait calls after a process changed.
    pub fn notify(&self) {
        self.lifecycle.changed.notify_all();
    }

    /// Host pid of the init process (0 before it exists).
    pub fn pid(&self) -> u32 {
        self.procs().init.pid.max(0) as u32
    }

    /// The bundle path as a string, for containerd's messages.
    pub fn bundle_str(&self) -> String {
        self.bundle.display().to_string()
    }

    /// Where CRIU writes its logs for this container.
    pub fn criu_work_dir(&self, what: &str) -> PathBuf {
        match &self.flags.criu_work_path {
            Some(dir) => dir.join(format!("{}-{what}", self.id)),
            None => self.bundle.join(format!("criu-{what}")),
        }
    }

    /// State of the init process or an exec'd one.
    pub fn state(&self, exec_id: &str) -> Result<StateResponse> {
        let procs = self.procs();
        Ok(procs.get(exec_id)?.state(&self.id, &self.bundle_str()))
    }

    /// Blocks until the process exited; its exit.
    pub fn wait(&self, exec_id: &str) -> Result<Exit> {
        let mut procs = self.procs();
        loop {
            if let Some(exit) = procs.get(exec_id)?.exit {
                return Ok(exit);
            }
            procs = self.lifecycle.changed.wait(procs).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Claims the exit of `pid` if it is one of this container's live processes: returns the
    /// process's stdio (whose output should drain before the exit is recorded with
    /// [`Container::record_exit`]). Without a pid namespace of its own, the container's other
    /// processes outlive init and are killed here, so they release the stdio too.
    pub fn claim_exit(&self, pid: i32) -> Option<Option<Arc<ProcessIo>>> {
        let procs = self.procs();
        let (io, is_init) = if procs.init.pid == pid && procs.init.exit.is_none() {
            (procs.init.io.clone(), true)
        } else {
            (procs.execs.values().find(|p| p.pid == pid && p.exit.is_none())?.io.clone(), false)
        };
        drop(procs);
        if is_init && !self.spec.private_pid_ns {
            if let Err(e) = self.runc.kill(&self.id, libc::SIGKILL as u32, true) {
                tracing::warn!(id = %self.id, error = %e, "killing the remaining processes after init exited");
            }
        }
        Some(io)
    }

    /// Records the exit of `pid`, publishes TaskExit and wakes Wait calls.
    pub fn record_exit(&self, pid: i32, status: u32) {
        let mut procs = self.procs();
        let exec_id = if procs.init.pid == pid && procs.init.exit.is_none() {
            String::new()
        } else if let Some(p) = procs.execs.values().find(|p| p.pid == pid && p.exit.is_none()) {
            p.exec_id.clone()
        } else {
            return;
        };
        let status = match exec_id.is_empty() {
            true => self.stop_status.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(status),
            false => status,
        };
        let process = procs.get_mut(&exec_id).expect("the process was just found");
        process.set_exited(status);
        let exit = process.exit.expect("exit was just set");
        tracing::info!(id = %self.id, exec_id, pid, status, "process exited");
        self.events.publish(TaskExit {
            container_id: self.id.clone(),
            id: if exec_id.is_empty() { self.id.clone() } else { exec_id },
            pid: pid as u32,
            exit_status: status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        });
        drop(procs);
        self.notify();
    }

    /// Sends `signal` to the init process (through runc, to all processes with `all`) or to an exec.
    /// An opted-in container is checkpointed first when the signal is a stop signal (see `stop.rs`);
    /// once checkpointed it is gone and the signal is not sent.
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
            if self.checkpoint_on_stop && crate::stop::is_stop_signal(signal) && self.checkpoint_before_stop(signal) {
                return Ok(());
            }
            return self.runc.kill(&self.id, signal, all);
        }
        let sig = nix::sys::signal::Signal::try_from(signal as i32)
            .map_err(|_| ShimError::InvalidArgument(format!("{signal} is not a signal number")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig).map_err(|e| match e {
            nix::Error::ESRCH => ShimError::NotFound(format!("process {} already finished", p.pid)),
            e => ShimError::io(format!("signalling pid {}", p.pid), e.into()),
        })
    }

    /// The host pids of the container's processes, exec'd ones marked with their exec id.
    pub fn pids(&self) -> Result<PidsResponse> {
        let pids = self.runc.ps(&self.id)?;
        let procs = self.procs();
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let mut info = ProcessInfo { pid, ..Default::default() };
            if let Some(p) = procs.execs.values().find(|p| p.pid > 0 && p.pid as u32 == pid) {
                let details = ProcessDetails { exec_id: p.exec_id.clone(), ..Default::default() };
                info.info = MessageField::some(any(details)?);
            }
            processes.push(info);
        }
        Ok(PidsResponse { processes, ..Default::default() })
    }

    /// Freezes the container.
    pub fn pause(&self) -> Result<()> {
        let _ops = self.ops();
        self.require_status(&[Status::RUNNING], "paused")?;
        self.runc.pause(&self.id)?;
        self.procs().init.status = Status::PAUSED;
        self.events.publish(TaskPaused { container_id: self.id.clone(), ..Default::default() });
        Ok(())
    }

    /// Thaws the container.
    pub fn resume(&self) -> Result<()> {
        let _ops = self.ops();
        self.require_status(&[Status::PAUSED], "resumed")?;
        self.runc.resume(&self.id)?;
        {
            let mut procs = self.procs();
            if procs.init.exit.is_none() {
                procs.init.status = Status::RUNNING;
            }
        }
        self.events.publish(TaskResumed { container_id: self.id.clone(), ..Default::default() });
        Ok(())
    }

    /// Fails unless the init process is alive with one of `allowed` statuses; the error says why.
    pub fn require_status(&self, allowed: &[Status], verb: &str) -> Result<()> {
        let procs = self.procs();
        let init = &procs.init;
        if init.is_alive() && allowed.contains(&init.status) {
            return Ok(());
        }
        let why = match (init.exit, init.status) {
            (Some(exit), _) => format!(
                "has exited (status {}): it cannot be {verb}; only a running task can be paused, checkpointed or exec'd into",
                exit.status
            ),
            (None, Status::CREATED) => format!("has not been started: it cannot be {verb} before Start"),
            (None, Status::PAUSED) => format!("is paused: it cannot be {verb}; resume it first"),
            (None, Status::RUNNING) => format!("is running: it cannot be {verb}, it is not paused"),
            (None, other) => format!("is {}: it cannot be {verb}", format!("{other:?}").to_lowercase()),
        };
        Err(ShimError::FailedPrecondition(format!("task {} {why}", self.id)))
    }

    /// Applies new resource limits (an OCI `LinuxResources` JSON document).
    pub fn update(&self, resources: &[u8]) -> Result<()> {
        let _ops = self.ops();
        serde_json::from_slice::<serde_json::Value>(resources).map_err(|e| {
            ShimError::InvalidArgument(format!("resources are not an OCI LinuxResources document: {e}"))
        })?;
        let path = self.bundle.join("update-resources.json");
        std::fs::write(&path, resources).map_err(|e| ShimError::io(format!("writing {}", path.display()), e))?;
        let result = self.runc.update(&self.id, &path);
        let _ = std::fs::remove_file(&path);
        result
    }

    /// cgroup statistics, as containerd's v1 metrics.
    pub fn stats(&self) -> Result<Any> {
        let event = self.runc.stats(&self.id)?;
        if event.kind != "stats" {
            return Err(ShimError::Internal(format!("runc events --stats sent a {:?} event", event.kind)));
        }
        any(crate::stats::metrics(event.data)?)
    }

    /// Resizes the terminal of a process.
    pub fn resize_pty(&self, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let io = self.procs().get(exec_id)?.io.clone();
        io.ok_or_else(|| ShimError::FailedPrecondition("the process has no terminal yet".into()))?.resize(width, height)
    }

    /// CloseIO: lets the process see EOF on stdin once the client closed it.
    pub fn close_io(&self, exec_id: &str, stdin: bool) -> Result<()> {
        let io = self.procs().get(exec_id)?.io.clone();
        if let (true, Some(io)) = (stdin, io) {
            io.close_stdin();
        }
        Ok(())
    }
}

/// Packs a message the way containerd's typeurl expects it.
pub fn any<M: containerd_shim::protos::protobuf::MessageDyn>(m: M) -> Result<Any> {
    convert_to_any(Box::new(m)).map_err(|e| ShimError::Internal(format!("encoding a protobuf message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_info_reads_annotations_and_pid_namespace() {
        let spec = serde_json::json!({
            "annotations": {"io.kubernetes.pod.name": "p", "empty": ""},
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]}
        });
        let info = SpecInfo::from_json(&spec);
        assert!(info.private_pid_ns);
        assert_eq!(info.annotation("io.kubernetes.pod.name"), Some("p"));
        assert_eq!(info.annotation("empty"), None);
        let shared = serde_json::json!({"linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}});
        assert!(!SpecInfo::from_json(&shared).private_pid_ns);
        assert!(!SpecInfo::from_json(&serde_json::json!({})).private_pid_ns);
    }
}
