//! [`GpuInventory`] through NVML, loaded at run time (`libnvidia-ml.so.1`) so that nodes without the
//! NVIDIA driver need no NVIDIA library and get a clear "NVML not available" error instead.

use std::path::Path;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use super::discovery::{ComputeProcess, GpuInfo, GpuInventory, InventoryError};

/// The library loaded when no path is given.
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// The GPU inventory of this node, read from NVML on every call.
pub struct NvmlInventory {
    nvml: Nvml,
}

impl std::fmt::Debug for NvmlInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NvmlInventory")
    }
}

fn call_error(call: &'static str, object: String) -> impl FnOnce(NvmlError) -> InventoryError {
    move |e| InventoryError::Nvml { call, object, detail: e.to_string() }
}

impl NvmlInventory {
    /// Loads NVML from `library` ([`NVML_LIBRARY`] when `None`) and initialises it.
    pub fn open(library: Option<&Path>) -> Result<Self, InventoryError> {
        let name = library.map_or_else(|| NVML_LIBRARY.to_string(), |p| p.display().to_string());
        let result = match library {
            Some(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
            None => Nvml::init(),
        };
        let nvml = result.map_err(|e| match e {
            NvmlError::LibloadingError(loader) => {
                InventoryError::NotAvailable { library: name, detail: loader.to_string() }
            }
            NvmlError::LibraryNotFound => InventoryError::NotAvailable { library: name, detail: e.to_string() },
            NvmlError::DriverNotLoaded => InventoryError::DriverNotLoaded { library: name },
            NvmlError::NoPermission => InventoryError::NoPermission,
            other => {
                InventoryError::Nvml { call: "nvmlInit_v2", object: "the system".into(), detail: other.to_string() }
            }
        })?;
        Ok(NvmlInventory { nvml })
    }

    fn device(&self, index: u32) -> Result<Device<'_>, InventoryError> {
        self.nvml.device_by_index(index).map_err(call_error("nvmlDeviceGetHandleByIndex_v2", format!("GPU {index}")))
    }
}

impl GpuInventory for NvmlInventory {
    fn driver_version(&self) -> Result<String, InventoryError> {
        self.nvml.sys_driver_version().map_err(call_error("nvmlSystemGetDriverVersion", "the system".into()))
    }

    fn gpus(&self) -> Result<Vec<GpuInfo>, InventoryError> {
        let count = self.nvml.device_count().map_err(call_error("nvmlDeviceGetCount_v2", "the system".into()))?;
        (0..count)
            .map(|index| {
                let device = self.device(index)?;
                let gpu = || format!("GPU {index}");
                let cc = device
                    .cuda_compute_capability()
                    .map_err(call_error("nvmlDeviceGetCudaComputeCapability", gpu()))?;
                let memory = device.memory_info().map_err(call_error("nvmlDeviceGetMemoryInfo_v2", gpu()))?;
                Ok(GpuInfo {
                    index,
                    uuid: device.uuid().map_err(call_error("nvmlDeviceGetUUID", gpu()))?,
                    name: device.name().map_err(call_error("nvmlDeviceGetName", gpu()))?,
                    compute_capability: format!("{}.{}", cc.major, cc.minor),
                    memory_total: memory.total,
                    memory_free: memory.free,
                })
            })
            .collect()
    }

    fn compute_processes(&self, index: u32) -> Result<Vec<ComputeProcess>, InventoryError> {
        let processes = self
            .device(index)?
            .running_compute_processes()
            .map_err(call_error("nvmlDeviceGetComputeRunningProcesses_v3", format!("GPU {index}")))?;
        Ok(processes
            .into_iter()
            .map(|p| ComputeProcess {
                pid: p.pid as i32,
                used_memory: match p.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => Some(bytes),
                    UsedGpuMemory::Unavailable => None,
                },
            })
            .collect())
    }
}
