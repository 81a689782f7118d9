//! Checkpoint over the task API. Two kinds, one checkpoint-core call each:
//!
//! - a *task image* (`ctr c checkpoint`, `ctr t checkpoint`, containerd 2.x CRI's
//!   CheckpointContainer): CRIU's images and Kybernate's manifest in the directory containerd names,
//!   images at the top as runc's shim writes them; it travels with containerd's checkpoint image and
//!   is verified — its signature first — when it is restored;
//! - a *node bundle* (Kybernate's node agent, `kybernate.shim.v1.CheckpointOptions`): the bundle a
//!   checkpoint on stop writes (`stop.rs`'s writer: archive layout, writable layer, fsynced, signed),
//!   in a directory that must lie under the config's `checkpoint_dir`, so the sidecar daemon ships it
//!   and `restore-from` finds it; the task keeps running unless asked to exit.

use std::path::{Component, Path};

use checkpoint_core::bundle::{BundleLayout, Durability};
use checkpoint_core::{checkpoint_container_bundle, CheckpointOptions, ContainerCheckpoint};

use super::state::Container;
use crate::error::{Result, ShimError};
use crate::events::TaskEvent;
use crate::task::{CheckpointKind, CheckpointRequest, TaskStatus};
use crate::RUNTIME_ID;

impl Container {
    /// Checkpoints the task into the request's directory; with `exit` the task is gone afterwards and
    /// its exit is reported as usual.
    pub fn checkpoint(&self, req: &CheckpointRequest) -> Result<()> {
        if req.kind == CheckpointKind::NodeBundle {
            confine_to_checkpoint_dir(&self.config.checkpoint_dir, &req.image_dir)?;
        }
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
        let report = match req.kind {
            CheckpointKind::TaskImage => {
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
                checkpoint_container_bundle(&self.runc, &self.criu, &req.image_dir, &container, &opts)?
            }
            CheckpointKind::NodeBundle => {
                let report = self.write_node_bundle(&req.image_dir, signer, &opts, Durability::Synced)?;
                self.prune_old_bundles(&req.image_dir);
                report
            }
        };
        self.events.send(TaskEvent::Checkpointed {
            container_id: self.id.clone(),
            checkpoint: req.image_dir.display().to_string(),
        });
        tracing::info!(
            id = %self.id,
            image = %req.image_dir.display(),
            kind = ?req.kind,
            exit = req.exit,
            frozen_ms = report.checkpoint.timings.frozen.as_millis() as u64,
            bytes = report.checkpoint.image_bytes,
            "checkpoint written"
        );
        Ok(())
    }
}

/// Refuses a node bundle directory that does not lie below `root` (the config's `checkpoint_dir`):
/// it must be absolute, below the root, without `.` or `..`, and the part of it that exists must
/// resolve (symlinks followed) below the resolved root.
fn confine_to_checkpoint_dir(root: &Path, dir: &Path) -> Result<()> {
    let refuse = |why: &str| {
        ShimError::InvalidArgument(format!(
            "node bundle directory {} is refused: {why}; it must lie under checkpoint_dir {}",
            dir.display(),
            root.display()
        ))
    };
    if !dir.is_absolute() || dir.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(refuse("it is not an absolute path without `.` and `..`"));
    }
    if !dir.starts_with(root) || dir == root {
        return Err(refuse("it is not below checkpoint_dir"));
    }
    // The deepest part that exists, if it is the root or below it, must resolve below the root.
    if let Some(existing) = dir.ancestors().find(|a| a.exists()).filter(|a| a.starts_with(root)) {
        let resolved = existing.canonicalize().map_err(|e| refuse(&format!("it cannot be resolved: {e}")))?;
        let root = root.canonicalize().map_err(|e| refuse(&format!("checkpoint_dir cannot be resolved: {e}")))?;
        if !resolved.starts_with(&root) {
            return Err(refuse(&format!("it resolves to {}", resolved.display())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_bundles_stay_under_checkpoint_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("checkpoints");
        std::fs::create_dir_all(root.join("ns")).unwrap();
        confine_to_checkpoint_dir(&root, &root.join("ns/pod/c/2026-01-01T00:00:00.000Z")).unwrap();
        // a root that does not exist yet (the first checkpoint creates it)
        confine_to_checkpoint_dir(&tmp.path().join("later"), &tmp.path().join("later/ns/p/c/t")).unwrap();
        let outside = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("ns/link")).unwrap();
        for (dir, why) in [
            (tmp.path().join("elsewhere/b"), "not below checkpoint_dir"),
            (root.clone(), "not below checkpoint_dir"),
            (root.join("ns/../../elsewhere"), "without `.` and `..`"),
            (Path::new("relative/ns/p/c/t").to_path_buf(), "not an absolute path"),
            (root.join("ns/link/c/t"), "it resolves to"),
        ] {
            let err = confine_to_checkpoint_dir(&root, &dir).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, ShimError::InvalidArgument(_)), "{text}");
            assert!(text.contains(why) && text.contains(&format!("checkpoint_dir {}", root.display())), "{text}");
        }
    }
}
