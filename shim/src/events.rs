//! Task events in domain terms, and the [`EventSender`] the container layer sends them through. The
//! shim's sender ([`crate::publisher::Publisher`]) turns them into containerd's protobuf events and
//! forwards them over ttrpc; tests send them into a channel.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::io::StdioPaths;
use crate::mount::MountSpec;

/// Something that happened to a task, for containerd (`/tasks/...` topics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// The container was created (`/tasks/create`).
    Create {
        /// Container id.
        container_id: String,
        /// Its OCI bundle.
        bundle: String,
        /// Its rootfs mounts.
        rootfs: Vec<MountSpec>,
        /// Stdio of init.
        stdio: StdioPaths,
        /// The checkpoint it will be restored from (empty for a fresh start).
        checkpoint: String,
        /// Pid of init (0 while a restore is pending).
        pid: u32,
    },
    /// Init started or was restored (`/tasks/start`).
    Start {
        /// Container id.
        container_id: String,
        /// Its pid.
        pid: u32,
    },
    /// A process exited (`/tasks/exit`).
    Exit {
        /// Container id.
        container_id: String,
        /// The container id for init, else the exec id.
        id: String,
        /// Its pid.
        pid: u32,
        /// Exit status.
        status: u32,
        /// When.
        at: SystemTime,
    },
    /// The container was deleted (`/tasks/delete`).
    Delete {
        /// Container id.
        container_id: String,
        /// Pid of init.
        pid: u32,
        /// Its exit status.
        status: u32,
        /// When it exited.
        at: SystemTime,
    },
    /// A process was registered for exec (`/tasks/exec-added`).
    ExecAdded {
        /// Container id.
        container_id: String,
        /// Exec id.
        exec_id: String,
    },
    /// An exec'd process started (`/tasks/exec-started`).
    ExecStarted {
        /// Container id.
        container_id: String,
        /// Exec id.
        exec_id: String,
        /// Its pid.
        pid: u32,
    },
    /// The container was frozen (`/tasks/paused`).
    Paused {
        /// Container id.
        container_id: String,
    },
    /// The container was thawed (`/tasks/resumed`).
    Resumed {
        /// Container id.
        container_id: String,
    },
    /// A checkpoint was written (`/tasks/checkpointed`).
    Checkpointed {
        /// Container id.
        container_id: String,
        /// Where.
        checkpoint: String,
    },
    /// The container's memory cgroup hit its limit (`/tasks/oom`).
    Oom {
        /// Container id.
        container_id: String,
    },
}

/// Where task events go, in the order they are sent (so `Start` precedes the `Exit` of the same
/// process).
pub trait EventSender: Send + Sync {
    /// Queues `event`; never blocks on containerd.
    fn send(&self, event: TaskEvent);
}

/// A shared handle on the shim's event sender.
pub type Events = Arc<dyn EventSender>;

/// Events into a channel, for tests and in-process consumers.
impl EventSender for Mutex<Sender<TaskEvent>> {
    fn send(&self, event: TaskEvent) {
        let _ = self.lock().unwrap_or_else(|p| p.into_inner()).send(event);
    }
}
