//! The order of GPU and CPU steps, and the rollback that keeps every process alive on failure.

use std::path::Path;
use std::time::Duration;

use super::{CudaCheckpointDriver, CudaProcessState, GpuBackend, GpuMapping, GpuPair};
use crate::criu::image::image_pids;
use crate::criu::Criu;
use crate::error::{Error, GpuStep, Result};
use crate::options::{CheckpointOptions, RestoreOptions};
use crate::process::{checkpoint_process, restore_process};
use crate::report::{CheckpointReport, RestoreReport};

/// Undoes GPU steps in reverse: restores checkpointed processes, unlocks locked ones. Returns what it
/// did, for the error message.
fn roll_back(driver: &dyn CudaCheckpointDriver, locked: &[i32], checkpointed: &[i32]) -> String {
    let mut notes = Vec::new();
    for pid in checkpointed.iter().rev() {
        match driver.restore(*pid, &[]) {
            Ok(()) => notes.push(format!("restored GPU state of {pid}")),
            Err(e) => notes.push(format!("RESTORE FAILED for {pid}: {e}")),
        }
    }
    for pid in locked.iter().rev() {
        match driver.unlock(*pid) {
            Ok(()) => notes.push(format!("unlocked {pid}")),
            Err(e) => notes.push(format!("UNLOCK FAILED for {pid}: {e}")),
        }
    }
    if notes.is_empty() {
        "nothing to roll back".into()
    } else {
        notes.join(", ")
    }
}

pub(crate) fn gpu_error(step: GpuStep, detail: String, rollback: String) -> Error {
    Error::Gpu { step, detail, rollback }
}

/// Runs `dump` between the GPU steps of `gpu_pids`: lock (each bounded by `lock_timeout`) →
/// checkpoint GPU → `dump` → with `leave_running`, restore → unlock. On any failure every GPU step
/// already taken is undone, so each process runs on with its GPU state. Shared by process trees
/// (`dump` is a CRIU dump) and containers (`dump` is `runc checkpoint`).
pub(crate) fn around_dump<T>(
    driver: &dyn CudaCheckpointDriver,
    gpu_pids: &[i32],
    lock_timeout: Duration,
    leave_running: bool,
    dump: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let mut locked = Vec::new();
    for p in gpu_pids {
        if let Err(e) = driver.lock(*p, lock_timeout) {
            return Err(gpu_error(GpuStep::Lock, e.to_string(), roll_back(driver, &locked, &[])));
        }
        locked.push(*p);
    }
    let mut checkpointed = Vec::new();
    for p in gpu_pids {
        if let Err(e) = driver.checkpoint(*p) {
            return Err(gpu_error(GpuStep::Checkpoint, e.to_string(), roll_back(driver, &locked, &checkpointed)));
        }
        checkpointed.push(*p);
    }
    let dumped = match dump() {
        Ok(dumped) => dumped,
        Err(e) => return Err(gpu_error(GpuStep::Criu, e.to_string(), roll_back(driver, &locked, &checkpointed))),
    };
    if leave_running {
        for p in gpu_pids {
            driver
                .restore(*p, &[])
                .map_err(|e| gpu_error(GpuStep::Restore, e.to_string(), roll_back(driver, &locked, &[])))?;
        }
        for p in gpu_pids {
            driver.unlock(*p).map_err(|e| gpu_error(GpuStep::Unlock, e.to_string(), "none possible".into()))?;
        }
    }
    Ok(dumped)
}

/// Runs `dump` with the GPU steps done by `backend`: around it for Kybernate's own driver
/// ([`around_dump`]); not at all for CRIU's CUDA plugin, which does them inside the dump. With GPU
/// checkpointing off, GPU processes are refused before anything changes: CRIU cannot dump their state.
pub(crate) fn dump_with_backend<T>(
    backend: &GpuBackend,
    gpu_pids: &[i32],
    lock_timeout: Duration,
    leave_running: bool,
    dump: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match backend {
        GpuBackend::Driver { driver, .. } => around_dump(driver.as_ref(), gpu_pids, lock_timeout, leave_running, dump),
        GpuBackend::Off { reason } if !gpu_pids.is_empty() => Err(gpu_error(
            GpuStep::Backend,
            format!(
                "processes {gpu_pids:?} use a GPU but GPU checkpointing is unavailable ({reason}); set gpu_backend \
                 to a backend this node has, or do not checkpoint this workload"
            ),
            "nothing was changed; the workload keeps running".into(),
        )),
        GpuBackend::CriuPlugin { .. } | GpuBackend::Off { .. } => dump(),
    }
}

/// Restores the GPU state of `pids` (those the driver reports as checkpointed; processes that are
/// not CUDA processes, or that CRIU's plugin already restored, have nothing to bring back) onto the
/// GPUs of `gpu_pairs`, then unlocks them. On failure `kill` removes the restored workload and says
/// what it did, for the error.
pub(crate) fn restore_steps(
    driver: &dyn CudaCheckpointDriver,
    pids: &[i32],
    gpu_pairs: &[GpuPair],
    kill: &dyn Fn() -> String,
) -> Result<()> {
    let mut restored = Vec::new();
    for p in pids {
        if let Ok(CudaProcessState::Checkpointed) = driver.state(*p) {
            driver.restore(*p, gpu_pairs).map_err(|e| gpu_error(GpuStep::Restore, e.to_string(), kill()))?;
            restored.push(*p);
        }
    }
    for p in &restored {
        driver.unlock(*p).map_err(|e| gpu_error(GpuStep::Unlock, e.to_string(), kill()))?;
    }
    Ok(())
}

/// The driver that restores GPU state onto the GPUs `mapping` names, or `None` when CRIU's CUDA
/// plugin does it inside `criu restore`. Refused before anything is restored when the state cannot
/// land where `mapping` says: CRIU's plugin restores onto the checkpoint's own GPUs, so it rules out
/// moving to other GPUs; and with GPU checkpointing off the state cannot be restored at all.
pub(crate) fn restore_driver<'a>(
    backend: &'a GpuBackend,
    mapping: &GpuMapping,
) -> Result<Option<&'a dyn CudaCheckpointDriver>> {
    let refuse = |detail: String| Err(gpu_error(GpuStep::Backend, detail, "nothing was restored".into()));
    let moves = || {
        mapping
            .assignments
            .iter()
            .filter(|a| a.old_uuid != a.new_uuid)
            .map(|a| format!("{} -> {}", a.old_uuid, a.new_uuid))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match backend {
        GpuBackend::Driver { criu_plugin: Some(plugin), .. } | GpuBackend::CriuPlugin { plugin }
            if !mapping.is_identity() =>
        {
            refuse(format!(
                "the GPU state must move to other GPUs ({}), but CRIU's CUDA plugin {} restores it onto the \
                 checkpoint's own GPUs during `criu restore`; remove the plugin from CRIU's plugin directory \
                 and use the driver-api or cuda-checkpoint backend, or restore on a node with the same GPUs",
                moves(),
                plugin.display()
            ))
        }
        GpuBackend::Driver { driver, .. } => Ok(Some(driver.as_ref())),
        GpuBackend::CriuPlugin { .. } => Ok(None),
        GpuBackend::Off { reason } => refuse(format!(
            "the checkpoint holds GPU state but GPU checkpointing is unavailable here ({reason}); restore on a \
             node with a GPU checkpoint backend"
        )),
    }
}

/// Checkpoints the process tree rooted at `pid`, whose CUDA processes are `gpu_pids`: lock (each
/// bounded by `lock_timeout`) → checkpoint GPU → CRIU dump → with leave-running, restore → unlock.
/// On any failure every step already taken is undone, so each process runs on with its GPU state.
pub fn checkpoint_gpu_process(
    driver: &dyn CudaCheckpointDriver,
    criu: &Criu,
    pid: i32,
    gpu_pids: &[i32],
    image_dir: &Path,
    opts: &CheckpointOptions,
    lock_timeout: Duration,
) -> Result<CheckpointReport> {
    opts.validate()?;
    around_dump(driver, gpu_pids, lock_timeout, opts.leave_running, || checkpoint_process(criu, pid, image_dir, opts))
}

/// Restores a tree checkpointed by [`checkpoint_gpu_process`]: CRIU restore → GPU restore (onto the
/// GPUs named by `gpu_pairs`, or the same ones) → unlock. If the GPU state cannot be restored, the
/// restored tree is killed rather than left running without it; the images stay for another try.
pub fn restore_gpu_process(
    driver: &dyn CudaCheckpointDriver,
    criu: &Criu,
    image_dir: &Path,
    opts: &RestoreOptions,
    gpu_pairs: &[GpuPair],
) -> Result<RestoreReport> {
    let pids = image_pids(image_dir)?;
    let report = restore_process(criu, image_dir, opts)?;
    let kill_tree = || {
        for p in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::Signal::SIGKILL);
        }
        format!("killed the restored tree (pids {pids:?}); the images in {} are untouched", image_dir.display())
    };
    restore_steps(driver, &pids, gpu_pairs, &kill_tree)?;
    Ok(report)
}

/// Checkpoints like [`checkpoint_gpu_process`], with the GPU steps done by `backend`: Kybernate's own
/// driver, or CRIU's CUDA plugin inside the dump (then Kybernate does none, so nothing is done twice).
/// With GPU checkpointing off, a tree with GPU processes is refused before anything changes: CRIU
/// cannot dump their GPU state.
pub fn checkpoint_with_backend(
    backend: &GpuBackend,
    criu: &Criu,
    pid: i32,
    gpu_pids: &[i32],
    image_dir: &Path,
    opts: &CheckpointOptions,
    lock_timeout: Duration,
) -> Result<CheckpointReport> {
    opts.validate()?;
    dump_with_backend(backend, gpu_pids, lock_timeout, opts.leave_running, || {
        checkpoint_process(criu, pid, image_dir, opts)
    })
}

/// Restores a tree with GPU state like [`restore_gpu_process`], onto the GPUs `mapping` names (from
/// [`check_restore`](super::check_restore)). Refused before anything is restored when the state
/// cannot land where `mapping` says: CRIU's CUDA plugin restores GPU state itself, onto the
/// checkpoint's own GPUs, so it rules out moving to other GPUs; and with GPU checkpointing off the
/// state cannot be restored at all.
pub fn restore_with_backend(
    backend: &GpuBackend,
    criu: &Criu,
    image_dir: &Path,
    opts: &RestoreOptions,
    mapping: &GpuMapping,
) -> Result<RestoreReport> {
    match restore_driver(backend, mapping)? {
        Some(driver) => restore_gpu_process(driver, criu, image_dir, opts, &mapping.gpu_pairs()),
        None => restore_process(criu, image_dir, opts),
    }
}
