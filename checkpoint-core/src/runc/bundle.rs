//! A runc container checkpointed into a complete bundle (the layout of `docs/bundle-format.md`): CRIU
//! images in `checkpoint/`, `config.dump`, `spec.dump`, the writable layer, `stats-dump`, and the
//! sealed manifest; and the checks that open such a bundle for a restore.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::{checkpoint_container, Runc};
use crate::bundle::{self, ContainerIdentity, HostInfo, Manifest, CHECKPOINT_DIR, CONFIG_DUMP, SPEC_DUMP, STATS_DUMP};
use crate::criu::{stats, Criu};
use crate::error::{Error, Result};
use crate::gpu::{checkpoint_container_gpu, GpuContext};
use crate::options::CheckpointOptions;
use crate::report::CheckpointReport;
use crate::rootfs::{self, RootfsDiffStats};

/// `config.dump`: the container's identity with the field names Podman, CRI-O and checkpointctl use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDump {
    /// Container id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// Image the rootfs came from.
    #[serde(rename = "rootfsImageName", default, skip_serializing_if = "Option::is_none")]
    pub rootfs_image_name: Option<String>,
    /// The runtime that ran the container.
    #[serde(rename = "runtime")]
    pub oci_runtime: String,
    /// When the checkpoint was taken (RFC 3339).
    #[serde(rename = "checkpointedTime")]
    pub checkpointed_time: String,
}

/// A container to checkpoint into a bundle.
#[derive(Debug, Clone)]
pub struct ContainerCheckpoint {
    /// runc's container id.
    pub id: String,
    /// The container's OCI spec (`config.json`), copied to `spec.dump`.
    pub spec: PathBuf,
    /// The overlayfs upper directory of its rootfs, whose changes become `rootfs-diff.tar`; `None`
    /// when the rootfs is not an overlay (the writable layer is then not captured, and the manifest
    /// says so by the absence of the file).
    pub upperdir: Option<PathBuf>,
    /// Who it is, for the manifest and `config.dump`.
    pub identity: ContainerIdentity,
    /// The runtime name recorded in `config.dump` (e.g. `io.containerd.kybernate.v1`).
    pub runtime: String,
    /// How to handle GPU state: with a context, processes of the container that use a GPU are locked
    /// and checkpointed around the dump (or left to CRIU's CUDA plugin) and the manifest gets a GPU
    /// section; `None` checkpoints the container as if it used no GPU (see `docs/gpu.md`).
    pub gpu: Option<Arc<GpuContext>>,
}

/// How a bundle checkpoint went.
#[derive(Debug, Clone)]
pub struct BundleReport {
    /// The sealed manifest.
    pub manifest: Manifest,
    /// The CRIU dump's report.
    pub checkpoint: CheckpointReport,
    /// What the writable layer held, when captured.
    pub rootfs: Option<RootfsDiffStats>,
    /// Time to capture the writable layer.
    pub rootfs_time: Duration,
    /// Time to hash, fsync and seal the bundle.
    pub seal_time: Duration,
    /// From the start of the checkpoint until `COMPLETE` was durable.
    pub total: Duration,
}

/// Checkpoints the running container into the new bundle directory `dir` (created; must not exist)
/// and seals it. `opts.work_dir` should be outside `dir` (CRIU's log stays there); its statistics are
/// copied into the bundle.
///
/// With a [`GpuContext`] in `container.gpu`, processes of the container that use a GPU have their GPU
/// state checkpointed around the dump and described in the manifest's GPU section (see
/// `docs/gpu.md`).
///
/// If the dump fails the container keeps running (GPU steps are rolled back); on any failure `dir` is
/// emptied and marked failed (so nothing ships or restores it), and the error says what happened.
pub fn checkpoint_container_bundle(
    runc: &Runc,
    criu: &Criu,
    dir: &Path,
    container: &ContainerCheckpoint,
    opts: &CheckpointOptions,
) -> Result<BundleReport> {
    let started = Instant::now();
    if dir.exists() {
        return Err(Error::Bundle {
            path: dir.to_path_buf(),
            reason: "it already exists; every checkpoint needs a directory of its own".into(),
        });
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating bundle directory {}", dir.display()), e))?;
    let result = write_bundle(runc, criu, dir, container, opts, started);
    if let Err(e) = &result {
        abandon(dir, &e.to_string());
    }
    result
}

/// Empties an unfinished bundle and marks it failed, keeping only the reason.
fn abandon(dir: &Path, reason: &str) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        }
    }
    if let Err(e) = bundle::mark_failed(dir, reason) {
        tracing::warn!(dir = %dir.display(), error = %e, "marking the abandoned bundle failed");
    }
}

fn write_bundle(
    runc: &Runc,
    criu: &Criu,
    dir: &Path,
    container: &ContainerCheckpoint,
    opts: &CheckpointOptions,
    started: Instant,
) -> Result<BundleReport> {
    let image_dir = dir.join(CHECKPOINT_DIR);
    let (report, gpu) = match &container.gpu {
        Some(ctx) => checkpoint_container_gpu(ctx, runc, criu, &container.id, &image_dir, opts)?,
        None => (checkpoint_container(runc, criu, &container.id, &image_dir, opts)?, None),
    };
    let work_dir = opts.work_dir.clone().unwrap_or_else(|| image_dir.clone());
    let stats_src = work_dir.join(stats::STATS_DUMP_FILE);
    if stats_src.is_file() {
        let target = dir.join(STATS_DUMP);
        let copied = if work_dir == image_dir {
            fs::rename(&stats_src, &target)
        } else {
            fs::copy(&stats_src, &target).map(drop)
        };
        copied.map_err(|e| Error::io(format!("copying {} into the bundle", stats_src.display()), e))?;
    }
    fs::copy(&container.spec, dir.join(SPEC_DUMP))
        .map_err(|e| Error::io(format!("copying the container spec {}", container.spec.display()), e))?;
    let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let config = ConfigDump {
        id: container.identity.id.clone(),
        name: container.identity.name.clone(),
        rootfs_image_name: container.identity.image.clone(),
        oci_runtime: container.runtime.clone(),
        checkpointed_time: now,
    };
    fs::write(dir.join(CONFIG_DUMP), serde_json::to_vec_pretty(&config).expect("config.dump serializes"))
        .map_err(|e| Error::io(format!("writing {}", dir.join(CONFIG_DUMP).display()), e))?;

    let rootfs_started = Instant::now();
    let rootfs = container.upperdir.as_deref().map(|upper| rootfs::capture_overlay_diff(upper, dir)).transpose()?;
    let rootfs_time = rootfs_started.elapsed();

    let seal_started = Instant::now();
    let mut manifest =
        Manifest::new(HostInfo::current(report.criu_version.to_string(), runc.version()), container.identity.clone());
    manifest.checkpoint = Some(report.clone());
    manifest.criu_flags = Some(opts.flags.clone());
    manifest.gpu = gpu;
    let manifest = bundle::seal(dir, manifest)?;
    Ok(BundleReport {
        manifest,
        checkpoint: report,
        rootfs,
        rootfs_time,
        seal_time: seal_started.elapsed(),
        total: started.elapsed(),
    })
}

/// A verified bundle, ready to be restored.
#[derive(Debug, Clone)]
pub struct OpenedBundle {
    /// The bundle directory.
    pub dir: PathBuf,
    /// Its manifest (hashes verified).
    pub manifest: Manifest,
    /// The CRIU images.
    pub image_dir: PathBuf,
}

impl OpenedBundle {
    /// Whether the bundle carries the container's writable layer.
    pub fn has_rootfs_diff(&self) -> bool {
        rootfs::has_rootfs_diff(&self.dir)
    }

    /// Re-applies the writable layer onto the new container's (not yet running) rootfs.
    pub fn apply_rootfs(&self, rootfs: &Path) -> Result<()> {
        rootfs::apply_rootfs_diff(&self.dir, rootfs)
    }
}

/// Opens the bundle `dir` for a restore on this node: sealed, every hash matching, and
/// [`check_host`] compatible.
pub fn open_bundle(dir: &Path, criu: &Criu) -> Result<OpenedBundle> {
    let manifest = bundle::verify(dir)?;
    check_host(dir, &manifest, criu)?;
    let image_dir = dir.join(CHECKPOINT_DIR);
    if !image_dir.is_dir() {
        return Err(Error::Bundle {
            path: dir.to_path_buf(),
            reason: format!("it has no {CHECKPOINT_DIR}/ directory of CRIU images"),
        });
    }
    Ok(OpenedBundle { dir: dir.to_path_buf(), manifest, image_dir })
}

/// Checks that the checkpoint of `manifest` (in `dir`) can be restored here: same CPU architecture,
/// and this node's CRIU (its version is read) at least as new as the one that wrote it.
pub fn check_host(dir: &Path, manifest: &Manifest, criu: &Criu) -> Result<()> {
    let refuse = |reason: String| Error::Bundle { path: dir.to_path_buf(), reason };
    let arch = std::env::consts::ARCH;
    if manifest.host.arch != arch {
        return Err(refuse(format!("it was taken on {} and cannot be restored on {arch}", manifest.host.arch)));
    }
    let ours = criu.version()?;
    let mut parts = manifest.host.criu_version.split('.').map(|p| p.trim().parse::<u32>());
    if let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) {
        if (ours.major, ours.minor) < (major, minor) {
            return Err(refuse(format!(
                "it was written by CRIU {} but this node has CRIU {ours}: install CRIU >= {major}.{minor}",
                manifest.host.criu_version
            )));
        }
    }
    Ok(())
}
