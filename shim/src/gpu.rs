//! The GPU side of checkpoints on stop and restores on create: the node's GPUs (NVML) and the backend
//! that does the GPU steps (config key `gpu_backend`). See `docs/gpu.md`.

use std::sync::Arc;
use std::time::Duration;

use checkpoint_core::gpu::{select_backend, GpuBackend, GpuContext, InventoryError, NodeProbe, NvmlInventory};
use checkpoint_core::Criu;

use crate::config::ShimConfig;

/// The GPU context of this node for a checkpoint or restore, with GPU locks bounded by
/// `lock_timeout`; an error when NVML cannot be loaded, i.e. this node has no GPU. A backend chosen
/// in the configuration that this node cannot use becomes [`GpuBackend::Off`] with the reason, so
/// containers that use a GPU are refused with it (never checkpointed without their GPU state) while
/// the others are checkpointed as usual. Runs `criu --help` (inside the reaper's span, as CRIU's runs are).
pub fn node_context(
    config: &ShimConfig,
    criu: &Criu,
    lock_timeout: Duration,
) -> Result<Arc<GpuContext>, InventoryError> {
    let inventory = NvmlInventory::open(None)?;
    let probe = NodeProbe::for_criu(criu);
    let backend = select_backend(config.gpu_backend(), &probe).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "containers that use a GPU cannot be checkpointed or restored on this node");
        GpuBackend::Off { reason: e.to_string() }
    });
    tracing::debug!(?backend, "GPU checkpointing on this node");
    Ok(Arc::new(GpuContext { backend, inventory: Box::new(inventory), lock_timeout }))
}
