//! Checkpoint of a running (or paused) task through checkpoint-core, with Kybernate's manifest added
//! to the image directory so it travels with containerd's checkpoint image; and the checks a
//! checkpoint image must pass at Create before it is restored at Start.
//!
//! The image directory holds CRIU's images and runc's `descriptors.json`, plus `kybernate.json` and
//! `COMPLETE` (checkpoint-core's bundle manifest and marker): versions of CRIU/runc/kernel/arch, the
//! container's identity, the checkpoint report, the CRIU flags of the dump (which the restore
//! repeats), and every file's size and SHA-256, verified before a restore.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use checkpoint_core::bundle::{self, ContainerIdentity, HostInfo, Manifest};
use checkpoint_core::gpu::GpuRestorePlan;
use checkpoint_core::{
    check_host, checkpoint_container, CgroupsMode, CheckpointOptions, CheckpointReport, Criu, CriuFlags,
    EmptyNamespace, OpenedBundle,
};
use containerd_shim::api::{CheckpointTaskRequest, Status};
use containerd_shim::protos::events::task::TaskCheckpointed;
use containerd_shim::protos::shim::oci::CheckpointOptions as RuncCheckpointOptions;

use crate::annotations::{CONTAINER_NAME, IMAGE_NAME, POD_NAME};
use crate::config::decode_checkpoint_options;
use crate::container::Container;
use crate::error::{Result, ShimError};
use crate::reaper::Reaper;

/// Translates containerd's checkpoint options into checkpoint-core's.
pub fn core_options(opts: &RuncCheckpointOptions, work_dir: PathBuf) -> Result<CheckpointOptions> {
    let manage_cgroups_mode = match opts.cgroups_mode.as_str() {
        "" => None,
        mode => Some(mode.parse::<CgroupsMode>()?),
    };
    let empty_namespaces = opts
        .empty_namespaces
        .iter()
        .map(|ns| match ns.as_str() {
            "network" | "net" => Ok(EmptyNamespace::Network),
            other => Err(ShimError::InvalidArgument(format!(
                "empty namespace {other:?} is not supported: runc can only leave the network namespace empty"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CheckpointOptions {
        leave_running: !opts.exit,
        pre_dump: false,
        work_dir: Some(work_dir),
        timeout: None,
        flags: CriuFlags {
            tcp_established: opts.open_tcp,
            ext_unix_sk: opts.external_unix_sockets,
            shell_job: opts.terminal,
            file_locks: opts.file_locks,
            manage_cgroups_mode,
            empty_namespaces,
        },
    })
}

impl Container {
    /// Checkpoints the task into the request's path (or the options' image path); with `exit` the
    /// task is gone afterwards and its exit is reported as usual.
    pub fn checkpoint(&self, req: &CheckpointTaskRequest) -> Result<CheckpointReport> {
        let opts = decode_checkpoint_options(req.options.as_ref())?;
        let image_dir = match (req.path.as_str(), opts.image_path.as_str()) {
            ("", "") => {
                return Err(ShimError::InvalidArgument(format!(
                    "checkpoint of {} names no image directory: set the request path or ImagePath",
                    self.id
                )))
            }
            ("", path) | (path, _) => PathBuf::from(path),
        };
        let work_dir = match opts.work_path.as_str() {
            "" => self.criu_work_dir("checkpoint"),
            dir => PathBuf::from(dir),
        };
        let core_opts = core_options(&opts, work_dir.clone())?;
        let _ops = self.ops();
        self.require_status(&[Status::RUNNING, Status::PAUSED], "checkpointed")?;
        if opts.work_path.is_empty() {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        let report = {
            let _guard = self.runc.reaper().guard();
            checkpoint_container(&self.runc.core(), &self.criu, &self.id, &image_dir, &core_opts)?
        };
        self.write_manifest(&image_dir, &core_opts.flags, &report)?;
        self.events.publish(TaskCheckpointed {
            container_id: self.id.clone(),
            checkpoint: image_dir.display().to_string(),
            ..Default::default()
        });
        tracing::info!(
            id = %self.id,
            image = %image_dir.display(),
            exit = opts.exit,
            frozen_ms = report.timings.frozen.as_millis() as u64,
            bytes = report.image_bytes,
            "checkpoint written"
        );
        Ok(report)
    }

    fn write_manifest(&self, image_dir: &Path, flags: &CriuFlags, report: &CheckpointReport) -> Result<()> {
        let host = HostInfo::current(report.criu_version.to_string(), self.runc.version());
        let mut manifest = Manifest::new(host, self.identity());
        manifest.checkpoint = Some(report.clone());
        manifest.criu_flags = Some(flags.clone());
        // containerd tars the image into its content store next; that copy is the durable one.
        bundle::seal_with(image_dir, manifest, bundle::Durability::Unsynced)?;
        Ok(())
    }

    /// Who this container is, for manifests: CRI's pod and container names when it runs in a pod.
    pub fn identity(&self) -> ContainerIdentity {
        ContainerIdentity {
            namespace: self.namespace.clone(),
            pod: self.spec.annotation(POD_NAME).map(str::to_string),
            name: self.spec.annotation(CONTAINER_NAME).unwrap_or(&self.id).to_string(),
            id: self.id.clone(),
            image: self.spec.annotation(IMAGE_NAME).map(str::to_string),
        }
    }
}

/// A checkpoint image accepted at Create, restored at Start.
#[derive(Debug, Clone)]
pub struct RestoreSource {
    /// The CRIU image directory.
    pub image_dir: PathBuf,
    /// The flags it was dumped with.
    pub flags: CriuFlags,
    /// Kybernate's manifest, when the image has one (images of other shims do not).
    pub manifest: Option<Arc<Manifest>>,
    /// The node bundle the images belong to, when restoring from `kybernate.io/restore-from`.
    pub bundle: Option<Arc<OpenedBundle>>,
    /// The GPU state to restore after the processes, checked against this node's GPUs at Create;
    /// `None` when the checkpoint holds none.
    pub gpu: Option<Arc<GpuRestorePlan>>,
}

impl RestoreSource {
    /// Checks a checkpoint image before anything is created: it exists, its manifest (if any) verifies
    /// (every file present with its size and SHA-256), and it was taken on a compatible node.
    pub fn inspect(dir: &Path, parent: &str, criu: &Criu, reaper: &Reaper) -> Result<RestoreSource> {
        let refuse =
            |why: String| ShimError::InvalidArgument(format!("checkpoint {} cannot be restored: {why}", dir.display()));
        if !parent.is_empty() {
            return Err(refuse(format!(
                "it names parent checkpoint {parent}; incremental restores are not supported, restore a full checkpoint"
            )));
        }
        if !dir.is_dir() {
            return Err(refuse("the directory does not exist".into()));
        }
        let manifest = if dir.join(bundle::MANIFEST_FILE).exists() {
            let manifest = bundle::verify(dir).map_err(|e| refuse(e.to_string()))?;
            {
                let _guard = reaper.guard();
                check_host(dir, &manifest, criu)?;
            }
            Some(Arc::new(manifest))
        } else {
            if !dir.join("inventory.img").is_file() {
                return Err(refuse("inventory.img is missing: this is not a CRIU checkpoint image".into()));
            }
            tracing::warn!(image = %dir.display(), "checkpoint has no Kybernate manifest; restoring it unverified");
            None
        };
        // Images of other shims carry no flags: CRIU's defaults, as runc's restore assumes.
        let flags = manifest.as_ref().and_then(|m| m.criu_flags.clone()).unwrap_or_default();
        Ok(RestoreSource { image_dir: dir.to_path_buf(), flags, manifest, bundle: None, gpu: None })
    }

    /// A node bundle (opened and verified) to restore: CRIU images in `checkpoint/`, flags from the
    /// manifest, the writable layer to re-apply at Create, and the GPU state `gpu` (checked against
    /// this node) to restore after the processes.
    pub fn from_bundle(opened: OpenedBundle, gpu: Option<GpuRestorePlan>) -> RestoreSource {
        RestoreSource {
            image_dir: opened.image_dir.clone(),
            flags: opened.manifest.criu_flags.clone().unwrap_or_default(),
            manifest: Some(Arc::new(opened.manifest.clone())),
            bundle: Some(Arc::new(opened)),
            gpu: gpu.map(Arc::new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_options_translate() {
        let opts = RuncCheckpointOptions {
            exit: true,
            open_tcp: true,
            file_locks: true,
            terminal: true,
            cgroups_mode: "soft".into(),
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        let core = core_options(&opts, "/w".into()).unwrap();
        assert!(!core.leave_running);
        assert_eq!(core.work_dir.as_deref(), Some(Path::new("/w")));
        assert!(core.flags.tcp_established && core.flags.file_locks && core.flags.shell_job && !core.flags.ext_unix_sk);
        assert_eq!(core.flags.manage_cgroups_mode, Some(CgroupsMode::Soft));
        assert_eq!(core.flags.empty_namespaces, vec![EmptyNamespace::Network]);

        assert!(core_options(&RuncCheckpointOptions::default(), "/w".into()).unwrap().leave_running);
        let bad = RuncCheckpointOptions { empty_namespaces: vec!["ipc".into()], ..Default::default() };
        assert!(matches!(core_options(&bad, "/w".into()), Err(ShimError::InvalidArgument(_))));
        let bad = RuncCheckpointOptions { cgroups_mode: "weird".into(), ..Default::default() };
        assert!(core_options(&bad, "/w".into()).is_err());
    }
}
