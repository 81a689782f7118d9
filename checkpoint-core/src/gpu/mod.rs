//! GPU state of CUDA processes: the driver's checkpoint API behind one trait, and the ordering that
//! wraps a CRIU dump (lock → checkpoint GPU → CRIU dump → for leave-running: restore → unlock) and
//! restore (CRIU restore → GPU restore → unlock), rolling back so no process is left locked or
//! without its GPU state.
//!
//! Around it: the node's GPUs and a container's GPU processes (NVML, or a `/proc` scan without it),
//! the manifest's GPU section, the compatibility check before a restore with the old → new GPU
//! mapping, the choice of backend (driver API, `cuda-checkpoint`, CRIU's CUDA plugin, or none), and
//! the node's GPU context and restore plan that the container module uses ([`GpuContext`],
//! [`GpuRestorePlan`]). This module knows nothing of runc. See `docs/gpu.md`.

mod cli;
mod compat;
mod context;
mod criu_plugin;
mod discovery;
mod driver_api;
mod nvml;
mod orchestrate;

pub use cli::CudaCheckpointCli;
pub use compat::{
    check_restore, parse_gpu_uuid, Bytes, GpuAssignment, GpuCompatError, GpuMapping, GpuMatch, GpuMismatch,
};
pub(crate) use context::ns_pid;
pub use context::{GpuContext, GpuRestorePlan};
pub use criu_plugin::{
    select_backend, BackendError, BackendProbe, CriuPluginDir, GpuBackend, GpuBackendChoice, NodeProbe,
    PluginDirSource, CRIU_DEFAULT_PLUGIN_DIR, CRIU_LIBS_DIR_ENV, CUDA_PLUGIN,
};
pub use discovery::{
    find_gpu_processes, gpu_section, ComputeProcess, ContainerGpuProcess, DiscoveryMethod, GpuInfo, GpuInventory,
    GpuProcesses, InventoryError, ProcEvidence, ProcScanner,
};
pub use driver_api::DriverApi;
pub use nvml::{NvmlInventory, NVML_LIBRARY};
pub use orchestrate::{checkpoint_gpu_process, checkpoint_with_backend, restore_gpu_process, restore_with_backend};
pub(crate) use orchestrate::{dump_with_backend, gpu_error};

pub use crate::error::GpuStep;

use std::time::Duration;

/// The CUDA checkpoint state of a process (`CUprocessState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaProcessState {
    /// Running normally.
    Running,
    /// Locked: CUDA calls block, no work is in flight.
    Locked,
    /// Device memory copied to host and GPU resources released.
    Checkpointed,
    /// A previous operation failed; the process cannot continue on the GPU.
    Failed,
    /// A state this library does not know (a newer driver).
    Unknown(i32),
}

impl CudaProcessState {
    /// Maps the driver's numeric state; unknown values are kept, never a panic.
    pub fn from_raw(value: i32) -> Self {
        match value {
            0 => CudaProcessState::Running,
            1 => CudaProcessState::Locked,
            2 => CudaProcessState::Checkpointed,
            3 => CudaProcessState::Failed,
            other => CudaProcessState::Unknown(other),
        }
    }
}

/// An old → new GPU UUID mapping for restoring onto different GPUs (`CUcheckpointGpuPair`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuPair {
    /// UUID of the GPU at checkpoint time (16 raw bytes).
    pub old_uuid: [u8; 16],
    /// UUID of the GPU to restore onto.
    pub new_uuid: [u8; 16],
}

/// A failed GPU step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{backend}: {operation} of pid {pid} failed: {detail}")]
pub struct GpuError {
    /// Which backend ran it.
    pub backend: String,
    /// `lock`, `checkpoint`, `restore`, `unlock` or `get-state`.
    pub operation: &'static str,
    /// The process.
    pub pid: i32,
    /// The driver's error (name and code) or the tool's message.
    pub detail: String,
}

/// A way to checkpoint the GPU state of CUDA processes.
pub trait CudaCheckpointDriver: Send + Sync {
    /// Short name for logs and errors (`driver-api`, `cuda-checkpoint`).
    fn name(&self) -> &str;
    /// The process's current state.
    fn state(&self, pid: i32) -> Result<CudaProcessState, GpuError>;
    /// Blocks new CUDA work and waits (at most `timeout`) for work in flight to finish.
    fn lock(&self, pid: i32, timeout: Duration) -> Result<(), GpuError>;
    /// Copies device memory to host memory and releases the GPU (process must be locked).
    fn checkpoint(&self, pid: i32) -> Result<(), GpuError>;
    /// Re-acquires GPUs and copies memory back (process must be checkpointed).
    fn restore(&self, pid: i32, gpu_pairs: &[GpuPair]) -> Result<(), GpuError>;
    /// Lets CUDA work continue (process must be locked).
    fn unlock(&self, pid: i32) -> Result<(), GpuError>;
}
