//! The CUDA driver's checkpoint API (`cuCheckpointProcess*`, driver >= 570), loaded from
//! `libcuda.so.1` at run time so that nodes without a GPU need no CUDA library at all.

use std::ffi::c_int;
use std::time::Duration;

use libloading::{Library, Symbol};

use super::{CudaCheckpointDriver, CudaProcessState, GpuError, GpuPair};

type CuResult = c_int;

#[repr(C)]
struct LockArgs {
    timeout_ms: u32,
    reserved0: u32,
    reserved1: [u64; 7],
}

#[repr(C)]
struct ReservedArgs {
    reserved: [u64; 8],
}

#[repr(C)]
struct RestoreArgs {
    gpu_pairs: *const GpuPair,
    gpu_pairs_count: u32,
    reserved: [u8; 44],
    reserved1: u64,
}

const _: () = assert!(std::mem::size_of::<LockArgs>() == 64);
const _: () = assert!(std::mem::size_of::<RestoreArgs>() == 64);
const _: () = assert!(std::mem::size_of::<GpuPair>() == 32);

/// The driver API backend: `libcuda.so.1` opened once, `cuInit` called.
pub struct DriverApi {
    lib: Library,
}

impl std::fmt::Debug for DriverApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DriverApi(libcuda.so.1)")
    }
}

fn error_name(code: CuResult) -> &'static str {
    match code {
        1 => "CUDA_ERROR_INVALID_VALUE",
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        100 => "CUDA_ERROR_NO_DEVICE",
        401 => "CUDA_ERROR_ILLEGAL_STATE",
        801 => "CUDA_ERROR_NOT_SUPPORTED",
        999 => "CUDA_ERROR_UNKNOWN",
        _ => "CUDA error",
    }
}

impl DriverApi {
    /// Opens `libcuda.so.1` and initialises the driver. Fails with a clear message on nodes without
    /// the NVIDIA driver, or with a driver older than 570 (no checkpoint API).
    pub fn open() -> Result<Self, GpuError> {
        let fail = |detail: String| GpuError { backend: "driver-api".into(), operation: "open", pid: 0, detail };
        // SAFETY: loading the system's CUDA driver library; its initialisers are the vendor's.
        let lib = unsafe { Library::new("libcuda.so.1") }
            .map_err(|e| fail(format!("libcuda.so.1 not found ({e}): is the NVIDIA driver installed?")))?;
        let api = DriverApi { lib };
        for symbol in ["cuCheckpointProcessLock", "cuCheckpointProcessGetState"] {
            // SAFETY: only checks that the symbol exists.
            unsafe { api.lib.get::<*const ()>(symbol.as_bytes()) }.map_err(|_| {
                fail(format!("the driver has no {symbol}: the CUDA checkpoint API needs driver 570 or newer"))
            })?;
        }
        // SAFETY: cuInit(unsigned int flags) per cuda.h.
        let code = unsafe {
            let init: Symbol<unsafe extern "C" fn(u32) -> CuResult> =
                api.lib.get(b"cuInit").map_err(|e| fail(format!("cuInit missing: {e}")))?;
            init(0)
        };
        if code != 0 {
            return Err(fail(format!("cuInit returned {} ({code})", error_name(code))));
        }
        Ok(api)
    }

    fn call<A>(&self, symbol: &'static str, operation: &'static str, pid: i32, args: *mut A) -> Result<(), GpuError> {
        let fail = |detail: String| GpuError { backend: "driver-api".into(), operation, pid, detail };
        // SAFETY: every cuCheckpointProcess* operation is `CUresult f(int pid, Args *args)`, and `args`
        // points to a zeroed struct of the documented 64-byte layout (checked at compile time).
        let code = unsafe {
            let f: Symbol<unsafe extern "C" fn(c_int, *mut A) -> CuResult> =
                self.lib.get(symbol.as_bytes()).map_err(|e| fail(format!("{symbol} missing: {e}")))?;
            f(pid, args)
        };
        if code == 0 {
            Ok(())
        } else {
            Err(fail(format!("{symbol} returned {} ({code})", error_name(code))))
        }
    }
}

impl CudaCheckpointDriver for DriverApi {
    fn name(&self) -> &str {
        "driver-api"
    }

    fn state(&self, pid: i32) -> Result<CudaProcessState, GpuError> {
        let mut state: c_int = -1;
        self.call("cuCheckpointProcessGetState", "get-state", pid, &mut state)?;
        Ok(CudaProcessState::from_raw(state))
    }

    fn lock(&self, pid: i32, timeout: Duration) -> Result<(), GpuError> {
        let mut args = LockArgs {
            timeout_ms: timeout.as_millis().clamp(1, u32::MAX as u128) as u32,
            reserved0: 0,
            reserved1: [0; 7],
        };
        self.call("cuCheckpointProcessLock", "lock", pid, &mut args)
    }

    fn checkpoint(&self, pid: i32) -> Result<(), GpuError> {
        let mut args = ReservedArgs { reserved: [0; 8] };
        self.call("cuCheckpointProcessCheckpoint", "checkpoint", pid, &mut args)
    }

    fn restore(&self, pid: i32, gpu_pairs: &[GpuPair]) -> Result<(), GpuError> {
        let mut args = RestoreArgs {
            gpu_pairs: if gpu_pairs.is_empty() { std::ptr::null() } else { gpu_pairs.as_ptr() },
            gpu_pairs_count: gpu_pairs.len() as u32,
            reserved: [0; 44],
            reserved1: 0,
        };
        self.call("cuCheckpointProcessRestore", "restore", pid, &mut args)
    }

    fn unlock(&self, pid: i32) -> Result<(), GpuError> {
        let mut args = ReservedArgs { reserved: [0; 8] };
        self.call("cuCheckpointProcessUnlock", "unlock", pid, &mut args)
    }
}
