//! GPU state of runc containers: the steps of [`orchestrate`](super::orchestrate) around `runc
//! checkpoint` and after `runc restore`, for the processes of a container that use a GPU.
//!
//! Checkpoint ([`checkpoint_container_bundle`](crate::checkpoint_container_bundle) with a
//! [`GpuContext`]): the container's pids (`runc ps`) are intersected with the GPU inventory's
//! compute processes ([`find_gpu_processes`]); when none uses a GPU nothing else happens. Otherwise
//! the manifest's GPU section is built while everything still runs, each GPU process's pid inside
//! the container is recorded (`ns_pid`), and the backend's steps wrap the dump: lock → checkpoint GPU
//! → `runc checkpoint` → (leave-running: restore → unlock), rolled back on any failure so the
//! container keeps running with its GPU state. CRIU's CUDA plugin does its steps inside the dump.
//!
//! Restore ([`GpuRestorePlan`]): checked before anything is created, applied after
//! [`restore_container`](crate::restore_container). CRIU gives every restored process its pid inside
//! the container again, so each recorded `ns_pid` is looked up among the restored container's
//! processes (`runc ps`, then the innermost `NSpid` of each) to find its new host pid.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::orchestrate::{dump_with_backend, gpu_error, restore_driver, restore_steps};
use super::{
    check_restore, find_gpu_processes, gpu_section, DiscoveryMethod, GpuBackend, GpuInventory, GpuMapping, GpuMatch,
    GpuStep, ProcScanner,
};
use crate::bundle::GpuSection;
use crate::criu::Criu;
use crate::error::{Error, Result};
use crate::options::CheckpointOptions;
use crate::report::CheckpointReport;
use crate::runc::{checkpoint_container, cleanup_failed, ContainerRestore, Runc};

/// How container checkpoints and restores handle GPU state on this node: who does the GPU steps and
/// where the GPUs are listed. The shim builds it from `gpu_backend` and NVML; tests inject fakes.
pub struct GpuContext {
    /// Who does the GPU steps (from [`select_backend`](super::select_backend)).
    pub backend: GpuBackend,
    /// The node's GPUs and their compute processes ([`NvmlInventory`](super::NvmlInventory)).
    pub inventory: Box<dyn GpuInventory>,
    /// How long locking a process may wait for its CUDA work in flight.
    pub lock_timeout: Duration,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("backend", &self.backend)
            .field("lock_timeout", &self.lock_timeout)
            .finish_non_exhaustive()
    }
}

/// The innermost entry of `NSpid` in `/proc/<pid>/status`: the pid inside the process's own pid
/// namespace. `None` when the process is gone.
fn ns_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// `opts` with its timeout cut to what is left of it after `started`; an error when nothing is left.
fn remaining_budget<'a>(opts: &'a CheckpointOptions, started: Instant, id: &str) -> Result<Cow<'a, CheckpointOptions>> {
    let Some(budget) = opts.timeout else { return Ok(Cow::Borrowed(opts)) };
    let left = budget.saturating_sub(started.elapsed());
    if left.is_zero() {
        return Err(Error::io(
            format!(
                "the checkpoint budget of {budget:?} was spent locking and checkpointing the GPU state of container \
                 {id} before its dump could start; give the checkpoint more time"
            ),
            std::io::ErrorKind::TimedOut.into(),
        ));
    }
    Ok(Cow::Owned(CheckpointOptions { timeout: Some(left), ..opts.clone() }))
}

/// Checkpoints container `id` into `image_dir` with the GPU state of its processes (see the module
/// docs). Returns the dump's report and the manifest's GPU section, `None` when no process of the
/// container uses a GPU. The GPU steps and the dump share `opts.timeout`.
pub(crate) fn checkpoint_container_gpu(
    ctx: &GpuContext,
    runc: &Runc,
    criu: &Criu,
    id: &str,
    image_dir: &Path,
    opts: &CheckpointOptions,
) -> Result<(CheckpointReport, Option<GpuSection>)> {
    let started = Instant::now();
    opts.validate()?;
    let discovery = |detail: String| {
        gpu_error(GpuStep::Discovery, detail, "nothing was changed; the container keeps running".into())
    };
    let pids = runc.ps(id)?;
    let found = find_gpu_processes(Ok(ctx.inventory.as_ref()), &pids, &ProcScanner::default())
        .map_err(|e| discovery(format!("finding the GPU processes of container {id}: {e}")))?;
    let inventory = matches!(found.method, DiscoveryMethod::Nvml).then_some(ctx.inventory.as_ref());
    let section = gpu_section(inventory, &found, ctx.backend.name())
        .map_err(|e| discovery(format!("describing the GPUs of container {id}: {e}")))?;
    let Some(mut section) = section else {
        tracing::debug!(id, "no process of the container uses a GPU; checkpointing without GPU steps");
        return Ok((checkpoint_container(runc, criu, id, image_dir, opts)?, None));
    };
    for process in &mut section.processes {
        process.ns_pid = Some(ns_pid(process.pid).ok_or_else(|| {
            discovery(format!(
                "GPU process {} of container {id} exited while it was being checkpointed; checkpoint again",
                process.pid
            ))
        })?);
    }
    let gpu_pids = found.pids();
    tracing::info!(id, backend = ctx.backend.name(), ?gpu_pids, "checkpointing GPU state with the container");
    let report = dump_with_backend(&ctx.backend, &gpu_pids, ctx.lock_timeout, opts.leave_running, || {
        let opts = remaining_budget(opts, started, id)?;
        checkpoint_container(runc, criu, id, image_dir, &opts)
    })?;
    Ok((report, Some(section)))
}

/// The GPU side of restoring a container from a bundle: checked with [`GpuRestorePlan::check`] before
/// anything is created, carried out with [`GpuRestorePlan::restore`] once
/// [`restore_container`](crate::restore_container) has brought the processes back.
#[derive(Debug)]
pub struct GpuRestorePlan {
    context: Arc<GpuContext>,
    section: GpuSection,
    mapping: GpuMapping,
}

impl GpuRestorePlan {
    /// Checks that this node can take the GPU state of `section` (a bundle's manifest): the GPUs match
    /// ([`check_restore`], every difference listed in the error), and `context`'s backend can restore
    /// it there. Changes nothing.
    pub fn check(section: &GpuSection, context: Arc<GpuContext>, matching: GpuMatch) -> Result<Self> {
        let mapping = check_restore(section, context.inventory.as_ref(), matching)
            .map_err(|e| gpu_error(GpuStep::Compatibility, e.to_string(), "nothing was restored".into()))?;
        restore_driver(&context.backend, &mapping)?;
        Ok(GpuRestorePlan { context, section: section.clone(), mapping })
    }

    /// Where each checkpointed GPU's state goes.
    pub fn mapping(&self) -> &GpuMapping {
        &self.mapping
    }

    /// After `req` was restored by [`restore_container`](crate::restore_container): restores the GPU
    /// state of each checkpointed GPU process (found by its pid inside the container, see the module
    /// docs) onto the mapped GPUs, then unlocks it. Nothing to do when CRIU's CUDA plugin did it during
    /// the restore. If the GPU state cannot be restored, the restored container is killed and deleted
    /// rather than left running without it; the bundle is untouched for another try.
    pub fn restore(&self, runc: &Runc, req: &ContainerRestore) -> Result<()> {
        let Some(driver) = restore_driver(&self.context.backend, &self.mapping)? else { return Ok(()) };
        let id = req.id.as_str();
        let kill = || {
            format!(
                "the restored container {id} was taken down ({}); the checkpoint in {} is untouched for another try",
                cleanup_failed(runc, id),
                req.image_dir.display()
            )
        };
        let pids = runc.ps(id).map_err(|e| gpu_error(GpuStep::Restore, e.to_string(), kill()))?;
        let by_ns_pid: BTreeMap<i32, i32> = pids.iter().filter_map(|host| Some((ns_pid(*host)?, *host))).collect();
        let mut targets = Vec::new();
        let mut missing = Vec::new();
        for process in &self.section.processes {
            match process.ns_pid.and_then(|ns| by_ns_pid.get(&ns)) {
                Some(host) if !targets.contains(host) => targets.push(*host),
                Some(_) => {}
                None => {
                    let pid = match process.ns_pid {
                        Some(ns) => ns.to_string(),
                        None => {
                            format!("? (host pid {} at checkpoint; none recorded inside the container)", process.pid)
                        }
                    };
                    if !missing.contains(&pid) {
                        missing.push(pid);
                    }
                }
            }
        }
        if !missing.is_empty() {
            return Err(gpu_error(
                GpuStep::Restore,
                format!(
                    "the GPU processes recorded in the manifest as pids {} inside container {id} are not among the \
                     restored container's processes (they exited right after the restore, or the bundle's GPU \
                     section does not come from a container checkpoint); restore again, or check the bundle's \
                     kybernate.json",
                    missing.join(", ")
                ),
                kill(),
            ));
        }
        tracing::info!(id, ?targets, gpu_pairs = self.mapping.gpu_pairs().len(), "restoring GPU state");
        restore_steps(driver, &targets, &self.mapping.gpu_pairs(), &kill)
    }
}
