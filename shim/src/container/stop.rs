//! Checkpoint on stop: when an opted-in container's init process is sent a stop signal (what CRI
//! StopContainer and `ctr t kill` send), the container is checkpointed into the node checkpoint
//! directory before it exits, and containerd is told it stopped on that signal.
//!
//! The Kill request returns once the bundle is sealed (so CRI's grace period starts after the
//! checkpoint): the container is frozen for the dump and killed only after the seal, so its exit
//! never reaches containerd before the bundle is durable. One budget covers the GPU steps, the dump
//! and the seal. If the dump fails or runs past it, the container is thawed and runs on, the bundle
//! is emptied and marked `FAILED`; if a step after the dump fails, the images are kept and the bundle
//! marked `PARTIAL`. Either way the failure is logged (saying which) and the stop signal is delivered
//! as if Kybernate were not there.
//!
//! A diskless checkpoint (`diskless.rs`) is sealed in memory instead and pushed to the store before
//! the Kill returns; it lands in the checkpoint directory only when the push fails.
//!
//! On a node with NVML, the container's processes that use a GPU are locked and their GPU state
//! checkpointed around the dump by the configured `gpu_backend` (rolled back on failure), and the
//! bundle's manifest describes the GPUs; see `docs/gpu.md`. Every bundle is signed with the node's key
//! (`signing_key`); without a usable key there is no checkpoint, and the container stops as usual.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use checkpoint_core::bundle::{bundle_dir, BundleLayout, Durability};
use checkpoint_core::trust::SigningKey;
use checkpoint_core::{BundleReport, CheckpointOptions, ContainerCheckpoint};

use super::diskless::MemoryRoot;
use super::state::Container;
use crate::annotations::{CONTAINER_NAME, POD_NAME, POD_NAMESPACE};
use crate::config::CheckpointMode;
use crate::events::TaskEvent;
use crate::task::TaskStatus;
use crate::RUNTIME_ID;

/// The signals that mean "stop" (SIGKILL never waits for a checkpoint).
const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];

/// Whether `signal` asks the container to stop (and so triggers a checkpoint on stop).
pub fn is_stop_signal(signal: u32) -> bool {
    STOP_SIGNALS.contains(&(signal as i32))
}

impl Container {
    /// Writes a node bundle of the container into `dir` with one checkpoint-core call: the archive
    /// layout with the writable layer (the overlay upper directory), signed by `signer`, fsynced
    /// unless `durability` says otherwise (a diskless bundle, in memory).
    /// The one writer of checkpoint on stop and of the node agent's checkpoints (`checkpoint.rs`).
    pub(super) fn write_node_bundle(
        &self,
        dir: &Path,
        signer: Arc<SigningKey>,
        opts: &CheckpointOptions,
        durability: Durability,
    ) -> checkpoint_core::Result<BundleReport> {
        let container = ContainerCheckpoint {
            id: self.id.clone(),
            spec: self.bundle.join("config.json"),
            upperdir: self.upperdir.clone(),
            identity: self.identity(),
            runtime: RUNTIME_ID.to_string(),
            gpu: self.gpu_context(),
            layout: BundleLayout::Archive,
            durability,
            signer: Some(signer),
            restored_at: self.restored_at,
        };
        checkpoint_core::checkpoint_container_bundle(&self.runc, &self.criu, dir, &container, opts)
    }

    /// Retention after a new node bundle `dir`: its container's directory keeps the newest
    /// `keep_bundles` sealed bundles.
    pub(super) fn prune_old_bundles(&self, dir: &Path) {
        if let Some(container_dir) = dir.parent() {
            let keep = self.config.keep_bundles;
            for removed in checkpoint_core::bundle::prune(container_dir, keep, self.config.failed_bundle_grace()) {
                tracing::info!(id = %self.id, bundle = %removed.display(), keep, "removed an old bundle");
            }
        }
    }

    /// Whether runc no longer knows the container, or knows it stopped.
    pub fn gone(&self) -> bool {
        match self.runc.state(&self.id) {
            Ok(None) => true,
            Ok(Some(state)) => state.status == checkpoint_core::runc::ContainerStatus::Stopped,
            Err(_) => false,
        }
    }

    /// Checkpoints the running container into a new bundle, in `mode`, before it stops on `signal`.
    /// Returns whether it did: then the container is gone and its exit is reported as
    /// `128 + signal`. Otherwise (not running, or the checkpoint failed) the caller delivers the
    /// signal.
    pub fn checkpoint_before_stop(&self, signal: u32, mode: CheckpointMode) -> bool {
        let _ops = self.ops();
        if self.procs().init.status != TaskStatus::Running || !self.procs().init.is_alive() {
            return false;
        }
        let signer = match crate::keys::signer(&self.config) {
            Ok(signer) => signer,
            Err(e) => {
                tracing::error!(id = %self.id, error = %e, "no checkpoint on stop: this node cannot sign bundles");
                return false;
            }
        };
        let pod = self.spec.annotation(POD_NAME).unwrap_or(&self.id);
        let namespace = self.spec.annotation(POD_NAMESPACE).unwrap_or(&self.namespace);
        let name = self.spec.annotation(CONTAINER_NAME).unwrap_or(&self.id);
        // A pod's containers share the time of the pod checkpoint they join; others take the time now.
        let at = match self.spec.annotation(POD_NAME) {
            Some(_) => {
                self.pod_checkpoints.join(&format!("{namespace}/{pod}"), name, self.config.pod_checkpoint_window())
            }
            None => SystemTime::now(),
        };
        let memory = (mode == CheckpointMode::Diskless).then(|| MemoryRoot::new(&self.config.diskless_dir, &self.id));
        let root = memory.as_ref().map_or(&self.config.checkpoint_dir, |m| &m.root);
        let dir = match bundle_dir(root, namespace, pod, name, at) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::warn!(id = %self.id, error = %e, "no checkpoint on stop: the bundle cannot be named");
                return false;
            }
        };
        let work_dir = self.criu_work_dir("stop");
        let _ = std::fs::remove_dir_all(&work_dir);
        let opts = CheckpointOptions {
            leave_running: false,
            work_dir: Some(work_dir),
            timeout: Some(self.config.checkpoint_budget()),
            ..Default::default()
        };
        tracing::info!(id = %self.id, signal, bundle = %dir.display(), ?mode, "checkpointing before stop");
        *self.stop_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(128 + signal);
        let durability = if memory.is_some() { Durability::Unsynced } else { Durability::Synced };
        let result = self.write_node_bundle(&dir, signer, &opts, durability);
        // Where the bundle is now. A diskless one goes from memory to the store, or to disk when it
        // cannot (so does a FAILED or PARTIAL one, for the record); the memory is freed after.
        let dir = match (&memory, &result) {
            (None, _) => dir,
            (Some(memory), Ok(report)) => {
                let time_left = self.config.checkpoint_budget().saturating_sub(report.total);
                match self.ship_from_memory(memory, &dir, time_left) {
                    Ok(location) => PathBuf::from(location),
                    // Neither the store nor the disk took it (logged): the container is gone all the same.
                    Err(_) => return true,
                }
            }
            (Some(memory), Err(_)) => self.keep_on_disk(memory, &dir).unwrap_or(dir),
        };
        drop(memory);
        match result {
            Ok(report) => {
                self.events.send(TaskEvent::Checkpointed {
                    container_id: self.id.clone(),
                    checkpoint: dir.display().to_string(),
                });
                tracing::info!(
                    id = %self.id,
                    bundle = %dir.display(),
                    frozen_ms = report.checkpoint.timings.frozen.as_millis() as u64,
                    dump_ms = report.checkpoint.timings.total.as_millis() as u64,
                    rootfs_ms = report.rootfs_time.as_millis() as u64,
                    seal_ms = report.seal_time.as_millis() as u64,
                    total_ms = report.total.as_millis() as u64,
                    bytes = report.checkpoint.image_bytes,
                    "checkpointed on stop"
                );
                if dir.starts_with(&self.config.checkpoint_dir) {
                    self.prune_old_bundles(&dir);
                }
                true
            }
            Err(e) => {
                // The container runs on (checkpoint-core thawed it), so the stop signal is delivered and
                // it stops as it would without Kybernate. Should runc no longer know it, or know it stopped, it is
                // gone and there is nothing to signal.
                let gone = self.gone();
                if !gone {
                    *self.stop_status.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                let outcome = match &e {
                    checkpoint_core::Error::Partial { .. } => {
                        "checkpoint on stop is PARTIAL: its CRIU images are kept (restore-policy: allow-partial \
                         restores it); the container stops on the signal"
                    }
                    _ => "checkpoint on stop failed; the bundle is marked FAILED and the container stops on the signal",
                };
                tracing::warn!(id = %self.id, bundle = %dir.display(), error = %e, container_gone = gone, "{outcome}");
                gone
            }
        }
    }
}
