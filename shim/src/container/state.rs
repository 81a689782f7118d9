//! A container served by this shim: its settings, its process table and the locks around them, and
//! the operations that only read the table or wait on it. Each lifecycle operation has a file of its
//! own beside this one.
//!
//! Locking: `ops` serialises lifecycle operations of one container (they may take seconds: a
//! checkpoint); `procs` guards the process table and is held only briefly, except across the few runc
//! calls whose events must be ordered before the exit of the process they start.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use checkpoint_core::bundle::ContainerIdentity;
use checkpoint_core::gpu::GpuContext;
use checkpoint_core::{Criu, RestorableBundle, Runc};

use super::pod_checkpoint::PodCheckpoints;
use crate::annotations::{CONTAINER_NAME, IMAGE_NAME, POD_NAME, POD_NAMESPACE};
use crate::config::{CheckpointMode, ShimConfig};
use crate::error::{Result, ShimError};
use crate::events::{Events, TaskEvent};
use crate::io::ProcessIo;
use crate::process::Process;
use crate::reaper::Reaper;
use crate::spec::SpecInfo;
use crate::task::{Exit, PidInfo, ProcessState, TaskStatus};

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
    /// runc, bound to this bundle, spawning inside the reaper's spans.
    pub runc: Runc,
    /// CRIU as configured.
    pub criu: Criu,
    /// The shim's reaper (the container's processes are watched by it).
    pub reaper: Arc<Reaper>,
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
    /// Whether a stop signal checkpoints the container first, and where to.
    pub checkpoint_on_stop: Option<CheckpointMode>,
    /// The pod checkpoints of this shim, which checkpoints on stop join.
    pub pod_checkpoints: Arc<PodCheckpoints>,
    /// Where events go.
    pub events: Events,
    /// The checkpoint to restore at Start, when Create carried one (opened and checked at Create).
    pub restore: Mutex<Option<Arc<RestorableBundle>>>,
    /// A bundle the sidecar fetched into `restore_dir` for this container, removed at Delete.
    pub fetched: Option<PathBuf>,
    /// The exit status to report for init when it was checkpointed on stop (CRIU ends it with
    /// SIGKILL; containerd is told it stopped on the stop signal it sent).
    pub stop_status: Mutex<Option<u32>>,
    /// When the container was first created (RFC 3339): now, or for a restored container the time
    /// its bundle records.
    pub created: String,
    /// When this container was restored from a bundle, if it was.
    pub restored_at: Option<SystemTime>,
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

    /// Who this container is, for manifests: CRI's pod and container names when it runs in a pod.
    pub fn identity(&self) -> ContainerIdentity {
        ContainerIdentity {
            namespace: self.namespace.clone(),
            kube_namespace: self.spec.annotation(POD_NAMESPACE).map(str::to_string),
            pod: self.spec.annotation(POD_NAME).map(str::to_string),
            name: self.spec.annotation(CONTAINER_NAME).unwrap_or(&self.id).to_string(),
            id: self.id.clone(),
            image: self.spec.annotation(IMAGE_NAME).map(str::to_string),
            created: Some(self.created.clone()),
        }
    }

    /// This node's GPU context for a checkpoint of this container, bounded by the checkpoint budget;
    /// `None` on a node without NVML (the container is checkpointed without GPU steps).
    pub fn gpu_context(&self) -> Option<Arc<GpuContext>> {
        match crate::gpu::node_context(&self.config, &self.criu, self.config.checkpoint_budget()) {
            Ok(context) => Some(context),
            Err(e) => {
                tracing::debug!(id = %self.id, reason = %e, "no GPU on this node: checkpointing without GPU steps");
                None
            }
        }
    }

    /// State of the init process or an exec'd one.
    pub fn state(&self, exec_id: &str) -> Result<ProcessState> {
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

    /// Records the exit of `pid`, sends the Exit event and wakes Wait calls.
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
        self.events.send(TaskEvent::Exit {
            container_id: self.id.clone(),
            id: if exec_id.is_empty() { self.id.clone() } else { exec_id },
            pid: pid as u32,
            status,
            at: exit.at,
        });
        drop(procs);
        self.notify();
    }

    /// The host pids of the container's processes, exec'd ones marked with their exec id.
    pub fn pids(&self) -> Result<Vec<PidInfo>> {
        let pids = self.runc.ps(&self.id)?;
        let procs = self.procs();
        Ok(pids
            .into_iter()
            .map(|pid| PidInfo {
                pid: pid as u32,
                exec_id: procs.execs.values().find(|p| p.pid > 0 && p.pid == pid).map(|p| p.exec_id.clone()),
            })
            .collect())
    }

    /// Fails unless the init process is alive with one of `allowed` statuses; the error says why.
    pub fn require_status(&self, allowed: &[TaskStatus], verb: &str) -> Result<()> {
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
            (None, TaskStatus::Created) => format!("has not been started: it cannot be {verb} before Start"),
            (None, TaskStatus::Paused) => format!("is paused: it cannot be {verb}; resume it first"),
            (None, TaskStatus::Running) => format!("is running: it cannot be {verb}, it is not paused"),
            (None, other) => format!("is {}: it cannot be {verb}", other.as_str()),
        };
        Err(ShimError::FailedPrecondition(format!("task {} {why}", self.id)))
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
