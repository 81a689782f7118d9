//! Which GPUs a node has and which processes of a container use them: NVML (behind
//! [`GpuInventory`]) when it is usable, otherwise a scan of `/proc` for open NVIDIA device files and
//! the mapped CUDA driver library. Also builds the manifest's GPU section from what was found.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::bundle::{GpuDevice, GpuProcess, GpuSection};

/// Why GPUs or GPU processes could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The NVML library could not be loaded.
    #[error(
        "NVML not available: could not load {library} ({detail}); install the NVIDIA driver on this node \
         (it ships libnvidia-ml.so.1), or run where the driver's libraries are visible"
    )]
    NotAvailable {
        /// The library name or path that was tried.
        library: String,
        /// The loader's message.
        detail: String,
    },
    /// NVML loaded but the NVIDIA kernel driver is not running.
    #[error(
        "NVML not available: {library} loaded but the NVIDIA kernel driver is not running; load it \
         (modprobe nvidia) and check that nvidia-smi works"
    )]
    DriverNotLoaded {
        /// The library that was loaded.
        library: String,
    },
    /// NVML refused access to the driver.
    #[error(
        "NVML not available: no permission to talk to the NVIDIA driver; run as root with the /dev/nvidia* \
         devices present"
    )]
    NoPermission,
    /// An NVML call failed after initialisation.
    #[error("NVML call {call} failed for {object}: {detail}; check that nvidia-smi works on this node")]
    Nvml {
        /// The NVML function.
        call: &'static str,
        /// What it was asked about (`GPU 0`, `the system`).
        object: String,
        /// NVML's error.
        detail: String,
    },
    /// A `/proc` entry of a process could not be read (not because the process has exited).
    #[error("cannot read {path} to find GPU processes: {source}; run as root so every process can be inspected")]
    Proc {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// One GPU as the inventory reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML index (the order of `nvidia-smi`).
    pub index: u32,
    /// UUID (`GPU-…`).
    pub uuid: String,
    /// Marketing name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// CUDA compute capability, `major.minor` (`9.0`).
    pub compute_capability: String,
    /// Total device memory in bytes.
    pub memory_total: u64,
    /// Device memory not in use, in bytes.
    pub memory_free: u64,
}

/// A process with a CUDA context on one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeProcess {
    /// Host pid.
    pub pid: i32,
    /// Device memory it holds in bytes; `None` where the driver cannot tell.
    pub used_memory: Option<u64>,
}

/// The GPUs of a node and the compute processes on them. The real one is
/// [`NvmlInventory`](super::NvmlInventory); tests use fakes.
pub trait GpuInventory: Send + Sync {
    /// The NVIDIA driver version (`580.95.05`), the same for every GPU of the node.
    fn driver_version(&self) -> Result<String, InventoryError>;
    /// Every GPU, in index order.
    fn gpus(&self) -> Result<Vec<GpuInfo>, InventoryError>;
    /// The processes with a compute context on the GPU with this index.
    fn compute_processes(&self, index: u32) -> Result<Vec<ComputeProcess>, InventoryError>;
}

/// What a `/proc` scan looks for, with the real locations as [`Default`]. Tests point it at their
/// own files to run the same matching on processes they control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcScanner {
    /// Where procfs is mounted (`/proc`).
    pub proc_root: PathBuf,
    /// An open file whose path starts with one of these is a GPU device (`/dev/nvidia` matches
    /// `/dev/nvidia0`, `/dev/nvidiactl`, `/dev/nvidia-uvm`).
    pub device_prefixes: Vec<PathBuf>,
    /// A mapped file whose name starts with one of these is the CUDA driver (`libcuda.so` matches
    /// `libcuda.so.1` and `libcuda.so.580.95.05`).
    pub library_names: Vec<String>,
}

impl Default for ProcScanner {
    fn default() -> Self {
        ProcScanner {
            proc_root: PathBuf::from("/proc"),
            device_prefixes: vec![PathBuf::from("/dev/nvidia")],
            library_names: vec!["libcuda.so".to_string()],
        }
    }
}

/// What a `/proc` scan found in one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcEvidence {
    /// The process.
    pub pid: i32,
    /// GPU device files it holds open (each once).
    pub devices: Vec<PathBuf>,
    /// CUDA driver libraries it has mapped (each once).
    pub libraries: Vec<PathBuf>,
}

impl ProcEvidence {
    /// A CUDA process has the driver library mapped and a GPU device open: a process that only loaded
    /// the library has not initialised CUDA, and one that only holds a device (NVML users such as
    /// `nvidia-smi`) has no CUDA state to checkpoint.
    pub fn is_cuda_process(&self) -> bool {
        !self.devices.is_empty() && !self.libraries.is_empty()
    }
}

/// Whether an error reading `/proc/<pid>/…` means the process has exited meanwhile.
fn process_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ESRCH)
}

/// The path field of a `/proc/<pid>/maps` line (after address, perms, offset, device and inode).
fn maps_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = &rest[rest.find(char::is_whitespace)?..];
    }
    let path = rest.trim();
    path.starts_with('/').then(|| path.strip_suffix(" (deleted)").unwrap_or(path))
}

impl ProcScanner {
    fn is_device(&self, target: &Path) -> bool {
        self.device_prefixes.iter().any(|p| target.as_os_str().as_bytes().starts_with(p.as_os_str().as_bytes()))
    }

    fn is_library(&self, path: &Path) -> bool {
        let name = path.file_name().map(OsStr::to_string_lossy).unwrap_or_default();
        self.library_names.iter().any(|n| name.starts_with(n.as_str()))
    }

    /// Reads the open files and mappings of `pid`; `None` when the process no longer exists.
    pub fn scan(&self, pid: i32) -> Result<Option<ProcEvidence>, InventoryError> {
        let base = self.proc_root.join(pid.to_string());
        let fd_dir = base.join("fd");
        let mut devices = BTreeSet::new();
        let entries = match fs::read_dir(&fd_dir) {
            Ok(entries) => entries,
            Err(e) if process_gone(&e) => return Ok(None),
            Err(source) => return Err(InventoryError::Proc { path: fd_dir, source }),
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if process_gone(&e) => return Ok(None),
                Err(source) => return Err(InventoryError::Proc { path: fd_dir, source }),
            };
            // An fd closed between listing and reading the link is simply not there any more.
            if let Ok(target) = fs::read_link(entry.path()) {
                if self.is_device(&target) {
                    devices.insert(target);
                }
            }
        }
        let maps_file = base.join("maps");
        let maps = match fs::read_to_string(&maps_file) {
            Ok(maps) => maps,
            Err(e) if process_gone(&e) => return Ok(None),
            Err(source) => return Err(InventoryError::Proc { path: maps_file, source }),
        };
        let libraries: BTreeSet<PathBuf> =
            maps.lines().filter_map(maps_path).map(PathBuf::from).filter(|p| self.is_library(p)).collect();
        Ok(Some(ProcEvidence {
            pid,
            devices: devices.into_iter().collect(),
            libraries: libraries.into_iter().collect(),
        }))
    }

    /// The CUDA processes (see [`ProcEvidence::is_cuda_process`]) among `pids`; processes that have
    /// exited are skipped.
    pub fn cuda_processes(&self, pids: &[i32]) -> Result<Vec<ProcEvidence>, InventoryError> {
        let mut found = Vec::new();
        for pid in pids {
            if let Some(evidence) = self.scan(*pid)? {
                if evidence.is_cuda_process() {
                    found.push(evidence);
                }
            }
        }
        Ok(found)
    }
}

/// How the GPU processes of a container were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryMethod {
    /// NVML's compute processes, intersected with the container's pids.
    Nvml,
    /// A `/proc` scan, because NVML could not be used; `reason` says why.
    ProcScan {
        /// The NVML error.
        reason: String,
    },
}

/// A process of the container that uses a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerGpuProcess {
    /// Host pid.
    pub pid: i32,
    /// The GPU it uses (known only through NVML).
    pub gpu_uuid: Option<String>,
    /// Device memory it holds on that GPU, in bytes (known only through NVML).
    pub memory_bytes: Option<u64>,
}

/// The GPU processes of a container: one entry per process and GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProcesses {
    /// How they were found.
    pub method: DiscoveryMethod,
    /// The processes.
    pub processes: Vec<ContainerGpuProcess>,
}

impl GpuProcesses {
    /// The distinct pids, sorted: the processes to lock and checkpoint.
    pub fn pids(&self) -> Vec<i32> {
        self.processes.iter().map(|p| p.pid).collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// Whether no process of the container uses a GPU.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }
}

fn nvml_processes(
    inventory: &dyn GpuInventory,
    pids: &BTreeSet<i32>,
) -> Result<Vec<ContainerGpuProcess>, InventoryError> {
    let mut found = Vec::new();
    for gpu in inventory.gpus()? {
        for process in inventory.compute_processes(gpu.index)? {
            if pids.contains(&process.pid) {
                found.push(ContainerGpuProcess {
                    pid: process.pid,
                    gpu_uuid: Some(gpu.uuid.clone()),
                    memory_bytes: process.used_memory,
                });
            }
        }
    }
    Ok(found)
}

/// Finds which of `container_pids` (from the container's cgroup or `runc ps`) use a GPU. With an
/// inventory, NVML's compute processes are intersected with them; without one, or when listing
/// fails, `scanner` looks in `/proc` instead and [`DiscoveryMethod::ProcScan`] records why.
pub fn find_gpu_processes(
    inventory: Result<&dyn GpuInventory, &InventoryError>,
    container_pids: &[i32],
    scanner: &ProcScanner,
) -> Result<GpuProcesses, InventoryError> {
    let pids: BTreeSet<i32> = container_pids.iter().copied().collect();
    let reason = match inventory.map(|inv| nvml_processes(inv, &pids)) {
        Ok(Ok(processes)) => return Ok(GpuProcesses { method: DiscoveryMethod::Nvml, processes }),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::warn!(%reason, "NVML unusable, finding GPU processes by scanning /proc");
    let pids: Vec<i32> = pids.into_iter().collect();
    let processes = scanner
        .cuda_processes(&pids)?
        .into_iter()
        .map(|e| ContainerGpuProcess { pid: e.pid, gpu_uuid: None, memory_bytes: None })
        .collect();
    Ok(GpuProcesses { method: DiscoveryMethod::ProcScan { reason }, processes })
}

/// The manifest's GPU section for a checkpoint of `found` by `backend` (`driver-api`,
/// `cuda-checkpoint`, `criu-plugin`): `None` for a CPU-only container. The devices are the GPUs the
/// processes use, as the inventory describes them. Without an inventory (NVML unusable) only the
/// processes are recorded, and the driver version and devices stay unknown. Each process's `ns_pid`
/// is left `None`; a container checkpoint fills it in.
pub fn gpu_section(
    inventory: Option<&dyn GpuInventory>,
    found: &GpuProcesses,
    backend: &str,
) -> Result<Option<GpuSection>, InventoryError> {
    if found.is_empty() {
        return Ok(None);
    }
    let processes = found
        .processes
        .iter()
        .map(|p| GpuProcess { pid: p.pid, gpu_uuid: p.gpu_uuid.clone(), memory_bytes: p.memory_bytes, ns_pid: None })
        .collect();
    let (driver_version, devices) = match inventory {
        None => (None, Vec::new()),
        Some(inventory) => {
            let used: BTreeSet<&str> = found.processes.iter().filter_map(|p| p.gpu_uuid.as_deref()).collect();
            let devices = inventory
                .gpus()?
                .into_iter()
                .filter(|g| used.contains(g.uuid.as_str()))
                .map(|g| GpuDevice {
                    uuid: g.uuid,
                    name: g.name,
                    compute_capability: g.compute_capability,
                    memory_bytes: g.memory_total,
                })
                .collect();
            (Some(inventory.driver_version()?), devices)
        }
    };
    Ok(Some(GpuSection { driver_version, backend: backend.to_string(), devices, processes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_yield_their_paths() {
        let line =
            "7f1c2a000000-7f1c2a200000 r-xp 00000000 fd:01 1234   /usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05";
        assert_eq!(maps_path(line), Some("/usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05"));
        assert_eq!(maps_path("7f00-7f01 rw-p 00000000 00:00 0 "), None);
        assert_eq!(maps_path("7f00-7f01 rw-p 00000000 00:00 0   [heap]"), None);
        assert_eq!(
            maps_path("7f00-7f01 r--p 00000000 fd:01 9 /opt/a b/libcuda.so.1 (deleted)"),
            Some("/opt/a b/libcuda.so.1")
        );
    }

    #[test]
    fn default_patterns_match_the_driver_files() {
        let s = ProcScanner::default();
        for dev in ["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"] {
            assert!(s.is_device(Path::new(dev)), "{dev}");
        }
        assert!(!s.is_device(Path::new("/dev/null")));
        assert!(s.is_library(Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05")));
        assert!(!s.is_library(Path::new("/usr/lib/libcudart.so.12")));
    }
}
