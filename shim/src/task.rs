//! The task operations as plain Rust, below the protobuf edge: what `service.rs` decodes containerd's
//! requests into, what a container answers, and the [`Runtime`] / [`Instance`] traits the task
//! service is written against (the runc-backed [`crate::container::Container`] in the shim, a fake in
//! the service's unit tests), in the manner of runwasi's shimkit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use checkpoint_core::CriuFlags;

use crate::config::RuntimeOptions;
use crate::error::Result;
use crate::io::StdioPaths;
use crate::mount::MountSpec;

/// Exit status reported for processes the shim had to kill (SIGKILL), as containerd's runc shim does.
pub const KILLED_STATUS: u32 = 128 + libc::SIGKILL as u32;

/// The lifecycle status of a process, as containerd's task API knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Frozen.
    Paused,
    /// Exited (or deleted before it ran).
    Stopped,
}

impl TaskStatus {
    /// The word for messages (`created`, `running`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Created => "created",
            TaskStatus::Running => "running",
            TaskStatus::Paused => "paused",
            TaskStatus::Stopped => "stopped",
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// When the shim learnt of it.
    pub at: SystemTime,
}

/// What State answers for one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessState {
    /// The container id for init, else the exec id.
    pub id: String,
    /// The exec id; empty for init.
    pub exec_id: String,
    /// The container's OCI bundle.
    pub bundle: String,
    /// Host pid (0 before it exists).
    pub pid: u32,
    /// Lifecycle status.
    pub status: TaskStatus,
    /// The stdio containerd asked for.
    pub stdio: StdioPaths,
    /// How it ended, once it did.
    pub exit: Option<Exit>,
}

/// A new container, as Create asks for it.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Container id.
    pub id: String,
    /// OCI bundle directory.
    pub bundle: PathBuf,
    /// The rootfs mounts to make in `<bundle>/rootfs`.
    pub rootfs: Vec<MountSpec>,
    /// Stdio of the init process.
    pub stdio: StdioPaths,
    /// A checkpoint directory to restore from (`ctr c restore`); empty for a fresh start.
    pub checkpoint: String,
    /// Its parent (incremental checkpoints; refused).
    pub parent_checkpoint: String,
    /// The runtime options, decoded.
    pub options: RuntimeOptions,
}

/// A process to exec into a running container.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Exec id.
    pub exec_id: String,
    /// Its stdio.
    pub stdio: StdioPaths,
    /// Its OCI process spec (JSON object).
    pub spec: serde_json::Value,
}

/// What a task-API checkpoint writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// A task image into containerd's directory: CRIU's images at the top, no writable layer, not
    /// fsynced (containerd tars it into its content store). What `ctr` and CRI ask for.
    TaskImage,
    /// A node bundle, as a checkpoint on stop writes it: the KEP-2008 archive layout with the writable
    /// layer, fsynced, in a directory under the shim config's `checkpoint_dir`. What Kybernate's node
    /// agent asks for (`kybernate.shim.v1.CheckpointOptions`).
    NodeBundle,
}

/// A checkpoint asked for over the task API (`ctr c checkpoint`, CRI's CheckpointContainer, the node
/// agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRequest {
    /// What is written.
    pub kind: CheckpointKind,
    /// Where the checkpoint goes (containerd's directory, or the node bundle's).
    pub image_dir: PathBuf,
    /// CRIU's work directory, if containerd named one.
    pub work_dir: Option<PathBuf>,
    /// Whether the task exits after the dump (else it keeps running).
    pub exit: bool,
    /// The CRIU flags of the dump.
    pub flags: CriuFlags,
}

/// One process of a container, for Pids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidInfo {
    /// Host pid.
    pub pid: u32,
    /// The exec id when the process is an exec'd one the shim started.
    pub exec_id: Option<String>,
}

/// What a deleted process left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Its pid (0 if it never ran).
    pub pid: u32,
    /// Its exit.
    pub exit: Exit,
}

/// One container served by a shim: every task-API operation on it, in domain types.
pub trait Instance: Send + Sync + 'static {
    /// Host pid of the init process (0 before it exists).
    fn pid(&self) -> u32;
    /// State of init (`exec_id` empty) or an exec'd process.
    fn state(&self, exec_id: &str) -> Result<ProcessState>;
    /// Starts (or restores) init, or runs an exec'd process; its pid.
    fn start(&self, exec_id: &str) -> Result<u32>;
    /// Sends `signal` to init (to all its processes with `all`) or to an exec'd process.
    fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()>;
    /// Registers a process to exec; it runs at Start.
    fn exec(&self, req: ExecRequest) -> Result<()>;
    /// Blocks until the process exited.
    fn wait(&self, exec_id: &str) -> Result<Exit>;
    /// Deletes an exited exec'd process, or the container (which must not run).
    fn delete(&self, exec_id: &str) -> Result<Deleted>;
    /// The container's processes.
    fn pids(&self) -> Result<Vec<PidInfo>>;
    /// Freezes the container.
    fn pause(&self) -> Result<()>;
    /// Thaws it.
    fn resume(&self) -> Result<()>;
    /// Checkpoints it into the request's directory.
    fn checkpoint(&self, req: &CheckpointRequest) -> Result<()>;
    /// Applies new resource limits (an OCI `LinuxResources` JSON document).
    fn update(&self, resources: &[u8]) -> Result<()>;
    /// A cgroup statistics snapshot as runc prints it (`runc events --stats` data).
    fn stats(&self) -> Result<serde_json::Value>;
    /// Resizes the terminal of a process.
    fn resize_pty(&self, exec_id: &str, width: u32, height: u32) -> Result<()>;
    /// Lets the process see EOF on stdin.
    fn close_io(&self, exec_id: &str, stdin: bool) -> Result<()>;
}

/// What creates the containers of a shim.
pub trait Runtime: Send + Sync + 'static {
    /// The containers it creates.
    type Instance: Instance;
    /// What [`Runtime::prepare`] found out, for [`Runtime::create`].
    type Prepared;
    /// The side-effect-free part of Create, run before the container table is locked (it may take a
    /// while: a checkpoint is verified).
    fn prepare(&self, req: &CreateRequest) -> Result<Self::Prepared>;
    /// Creates the container; on error nothing is left behind. Runs without the container table
    /// locked (a Create may take seconds: mounts, a writable layer, a terminal), so other containers'
    /// requests go on meanwhile.
    fn create(&self, req: &CreateRequest, prepared: Self::Prepared) -> Result<Arc<Self::Instance>>;
    /// Told once the new container is in the table: a process of it that exited meanwhile can now be
    /// reported.
    fn added(&self, _container: &Arc<Self::Instance>) {}
}
