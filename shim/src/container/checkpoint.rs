//! Checkpoint over the task API (`ctr c checkpoint`, `ctr t checkpoint`, containerd 2.x CRI's
//! CheckpointContainer): one checkpoint-core call writes CRIU's images and Kybernate's manifest into
//! the directory containerd names, as a task image (images at the top, as runc's shim writes them),
//! which travels with containerd's checkpoint image and is verified — its signature first — when it is
//! restored.

use checkpoint_core::bundle::{BundleLayout, Durability};
use checkpoint_core::{checkpoint_container_bundle, CheckpointOptions, ContainerCheckpoint};

use super::state::Container;
use crate::error::Result;
use crate::events::TaskEvent;
use crate::task::{CheckpointRequest, TaskStatus};
use crate::RUNTIME_ID;

impl Container {
    /// Checkpoints the task into the request's directory; with `exit` the task is gone afterwards and
    /// its exit is reported as usual.
    pub fn checkpoint(&self, req: &CheckpointRequest) -> Result<()> {
        let work_dir = req.work_dir.clone().unwrap_or_else(|| self.criu_work_dir("checkpoint"));
        let opts = CheckpointOptions {
            leave_running: !req.exit,
            pre_dump: false,
            work_dir: Some(work_dir.clone()),
            timeout: None,
            flags: req.flags.clone(),
        };
        let signer = crate::keys::signer(&self.config)?;
        let _ops = self.ops();
        self.require_status(&[TaskStatus::Running, TaskStatus::Paused], "checkpointed")?;
        if req.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        let container = ContainerCheckpoint {
            id: self.id.clone(),
            spec: self.bundle.join("config.json"),
            upperdir: None,
            identity: self.identity(),
            runtime: RUNTIME_ID.to_string(),
            gpu: self.gpu_context(),
            layout: BundleLayout::TaskImage,
            // containerd tars the image into its content store next; that copy is the durable one.
            durability: Durability::Unsynced,
            signer: Some(signer),
            restored_at: self.restored_at,
        };
        let report = checkpoint_container_bundle(&self.runc, &self.criu, &req.image_dir, &container, &opts)?;
        self.events.send(TaskEvent::Checkpointed {
            container_id: self.id.clone(),
            checkpoint: req.image_dir.display().to_string(),
        });
        tracing::info!(
            id = %self.id,
            image = %req.image_dir.display(),
            exit = req.exit,
            frozen_ms = report.checkpoint.timings.frozen.as_millis() as u64,
            bytes = report.checkpoint.image_bytes,
            "checkpoint written"
        );
        Ok(())
    }
}
