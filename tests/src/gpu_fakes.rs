//! Stand-ins for a GPU node (CI has no GPU): a CUDA driver that records its calls and fails where it
//! is told to, a node's GPU inventory, and a probe that finds the backends it is told exist.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkpoint_core::gpu::{
    BackendProbe, ComputeProcess, CudaCheckpointDriver, CudaProcessState, GpuError, GpuInfo, GpuInventory, GpuPair,
    InventoryError,
};

/// One GiB, in bytes.
pub const GIB: u64 = 1 << 30;

/// The calls a [`FakeDriver`] received, one `"<operation> <pid>"` line each, in order. Clones share
/// the log, so a test can still read it after the driver moved into a backend.
#[derive(Debug, Clone, Default)]
pub struct CallLog(Arc<Mutex<Vec<String>>>);

impl CallLog {
    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A CUDA driver that records every call in its [`CallLog`] and fails the one operation it is told
/// to (`lock`, `checkpoint`, `restore` or `unlock`) with the detail `injected failure`. It keeps one
/// state for all processes, the one its last successful step left: a restore only restores processes
/// the driver reports as checkpointed.
#[derive(Debug)]
pub struct FakeDriver {
    name: &'static str,
    log: CallLog,
    fail: Option<&'static str>,
    state: Mutex<CudaProcessState>,
    lock_timeout: Option<Duration>,
}

impl Default for FakeDriver {
    /// [`FakeDriver::named`] `fake`.
    fn default() -> Self {
        FakeDriver::named("fake")
    }
}

impl FakeDriver {
    /// A driver called `name` (as backends name theirs) that fails nothing, whose processes run.
    pub fn named(name: &'static str) -> Self {
        FakeDriver {
            name,
            log: CallLog::default(),
            fail: None,
            state: Mutex::new(CudaProcessState::Running),
            lock_timeout: None,
        }
    }

    /// This driver, failing `operation` (the call is still recorded).
    pub fn failing(self, operation: &'static str) -> Self {
        FakeDriver { fail: Some(operation), ..self }
    }

    /// This driver, with its processes in `state` until a step changes it.
    pub fn in_state(self, state: CudaProcessState) -> Self {
        FakeDriver { state: Mutex::new(state), ..self }
    }

    /// This driver, asserting that every lock is bounded by `timeout`.
    pub fn expecting_lock_timeout(self, timeout: Duration) -> Self {
        FakeDriver { lock_timeout: Some(timeout), ..self }
    }

    /// The call log, shared with the driver.
    pub fn log(&self) -> CallLog {
        self.log.clone()
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.log.calls()
    }

    fn step(&self, call: String, operation: &'static str, pid: i32, next: CudaProcessState) -> Result<(), GpuError> {
        self.log.0.lock().unwrap().push(call);
        if self.fail == Some(operation) {
            return Err(GpuError { backend: self.name.into(), operation, pid, detail: "injected failure".into() });
        }
        *self.state.lock().unwrap() = next;
        Ok(())
    }
}

impl CudaCheckpointDriver for FakeDriver {
    fn name(&self) -> &str {
        self.name
    }
    fn state(&self, _pid: i32) -> Result<CudaProcessState, GpuError> {
        Ok(*self.state.lock().unwrap())
    }
    fn lock(&self, pid: i32, timeout: Duration) -> Result<(), GpuError> {
        if let Some(expected) = self.lock_timeout {
            assert_eq!(timeout, expected, "the lock timeout");
        }
        self.step(format!("lock {pid}"), "lock", pid, CudaProcessState::Locked)
    }
    fn checkpoint(&self, pid: i32) -> Result<(), GpuError> {
        self.step(format!("checkpoint {pid}"), "checkpoint", pid, CudaProcessState::Checkpointed)
    }
    /// Recorded as `restore <pid>`, or `restore <pid> moving <n>` when the state moves to other GPUs.
    fn restore(&self, pid: i32, gpu_pairs: &[GpuPair]) -> Result<(), GpuError> {
        let call = match gpu_pairs.len() {
            0 => format!("restore {pid}"),
            n => format!("restore {pid} moving {n}"),
        };
        self.step(call, "restore", pid, CudaProcessState::Locked)
    }
    fn unlock(&self, pid: i32) -> Result<(), GpuError> {
        self.step(format!("unlock {pid}"), "unlock", pid, CudaProcessState::Running)
    }
}

/// A node's GPUs as NVML would list them.
#[derive(Debug, Clone, Default)]
pub struct FakeInventory {
    /// The NVIDIA driver version.
    pub driver: String,
    /// The GPUs, in index order.
    pub gpus: Vec<GpuInfo>,
    /// The compute processes on each GPU, by index; none on a GPU not named.
    pub processes: BTreeMap<u32, Vec<ComputeProcess>>,
    /// Listing the GPUs fails as on a GPU that fell off the bus.
    pub broken: bool,
}

impl GpuInventory for FakeInventory {
    fn driver_version(&self) -> Result<String, InventoryError> {
        Ok(self.driver.clone())
    }
    fn gpus(&self) -> Result<Vec<GpuInfo>, InventoryError> {
        if self.broken {
            return Err(InventoryError::Nvml {
                call: "nvmlDeviceGetCount_v2",
                object: "the system".into(),
                detail: "GPU is lost".into(),
            });
        }
        Ok(self.gpus.clone())
    }
    fn compute_processes(&self, index: u32) -> Result<Vec<ComputeProcess>, InventoryError> {
        Ok(self.processes.get(&index).cloned().unwrap_or_default())
    }
}

/// An 80 GiB GPU with `free_gib` GiB free.
pub fn fake_gpu(index: u32, uuid: &str, name: &str, compute_capability: &str, free_gib: u64) -> GpuInfo {
    GpuInfo {
        index,
        uuid: uuid.into(),
        name: name.into(),
        compute_capability: compute_capability.into(),
        memory_total: 80 * GIB,
        memory_free: free_gib * GIB,
    }
}

/// A node on which the GPU backends are present or not, as told. The drivers it finds are
/// [`FakeDriver`]s named `driver-api` and `cuda-checkpoint`.
#[derive(Debug, Clone, Copy)]
pub struct FakeProbe {
    /// The CUDA driver API (`libcuda.so.1`) is there.
    pub api: bool,
    /// The `cuda-checkpoint` utility is there.
    pub cli: bool,
    /// CRIU's CUDA plugin is there (as `/usr/lib/criu/cuda_plugin.so`).
    pub plugin: bool,
}

impl BackendProbe for FakeProbe {
    fn driver_api(&self) -> Result<Box<dyn CudaCheckpointDriver>, String> {
        if self.api {
            Ok(Box::new(FakeDriver::named("driver-api")))
        } else {
            Err("libcuda.so.1 not found".into())
        }
    }
    fn cli(&self) -> Result<Box<dyn CudaCheckpointDriver>, String> {
        if self.cli {
            Ok(Box::new(FakeDriver::named("cuda-checkpoint")))
        } else {
            Err("cuda-checkpoint not found on PATH".into())
        }
    }
    fn criu_plugin(&self) -> Result<PathBuf, String> {
        if self.plugin {
            Ok(PathBuf::from("/usr/lib/criu/cuda_plugin.so"))
        } else {
            Err("no cuda_plugin.so in /usr/lib/criu".into())
        }
    }
}
