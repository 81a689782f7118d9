//! The GPU side of container checkpoints and restores, without the containers: the node's GPU context
//! ([`GpuContext`]: backend, inventory, lock timeout) and the restore plan ([`GpuRestorePlan`]),
//! checked against this node before anything is created and carried out once the processes are back.
//! The container module (`crate::container`) puts these steps around `runc checkpoint` and after
//! `runc restore`.
//!
//! CRIU gives every restored process its pid inside the container again, so each GPU process's pid
//! inside the container (`ns_pid`, recorded at checkpoint) is looked up among the restored
//! container's processes (the innermost `NSpid` of each) to find its new host pid.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::orchestrate::{gpu_error, restore_driver, restore_steps};
use super::{check_restore, GpuBackend, GpuInventory, GpuMapping, GpuMatch, GpuStep};
use crate::bundle::GpuSection;
use crate::error::Result;

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
pub(crate) fn ns_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
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

    /// Restores the GPU state of each checkpointed GPU process onto the mapped GPUs, then unlocks
    /// it, once the container's processes are back: `pids` are the restored container's host pids,
    /// among which each process is found by its pid inside the container (see the module docs).
    /// Nothing to do when CRIU's CUDA plugin did it during the restore. On failure, `take_down` is
    /// called to remove the restored container (rather than leave it running without its GPU state)
    /// and its words go into the error.
    pub fn restore(&self, id: &str, pids: &[i32], take_down: &dyn Fn() -> String) -> Result<()> {
        let Some(driver) = restore_driver(&self.context.backend, &self.mapping)? else { return Ok(()) };
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
                take_down(),
            ));
        }
        tracing::info!(id, ?targets, gpu_pairs = self.mapping.gpu_pairs().len(), "restoring GPU state");
        restore_steps(driver, &targets, &self.mapping.gpu_pairs(), take_down)
    }
}
