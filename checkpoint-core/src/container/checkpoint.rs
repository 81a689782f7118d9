//! Checkpoint of a runc container into a bundle: GPU steps around `runc checkpoint` (when the
//! container uses a GPU), the writable layer, `config.dump`, `spec.dump`, `stats-dump`, and the
//! sealed manifest, in the [`BundleLayout`] asked for.

use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::bundle::{
    self, BundleLayout, ContainerIdentity, Durability, GpuSection, HostInfo, Manifest, CONFIG_DUMP, SPEC_DUMP,
    STATS_DUMP,
};
use crate::criu::{stats, Criu};
use crate::error::{Error, GpuStep, Result};
use crate::gpu::{
    dump_with_backend, find_gpu_processes, gpu_error, gpu_section, ns_pid, DiscoveryMethod, GpuContext, ProcScanner,
};
use crate::options::CheckpointOptions;
use crate::report::CheckpointReport;
use crate::rootfs::{self, RootfsDiffStats};
use crate::runc::{checkpoint_container, Runc};

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
    /// Where the images go: a node bundle ([`BundleLayout::Archive`]) or containerd's task
    /// checkpoint directory ([`BundleLayout::TaskImage`]: images and manifest only; `spec` and
    /// `upperdir` are not used, containerd keeps the writable layer itself).
    pub layout: BundleLayout,
    /// Whether sealing fsyncs the bundle ([`Durability::Unsynced`] when containerd copies it into its
    /// content store next anyway).
    pub durability: Durability,
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

/// Checkpoints the running container into the bundle directory `dir` and seals it: a new directory
/// for a node bundle (created; must not exist), an empty or missing one for a task image.
/// `opts.work_dir` should be outside `dir` (CRIU's log stays there); its statistics are copied into a
/// node bundle.
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
    let occupied = match container.layout {
        BundleLayout::Archive => dir.exists(),
        BundleLayout::TaskImage => fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()),
    };
    if occupied {
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
    let image_dir = container.layout.image_dir(dir);
    let (report, gpu) = match &container.gpu {
        Some(ctx) => checkpoint_container_gpu(ctx, runc, criu, &container.id, &image_dir, opts)?,
        None => (checkpoint_container(runc, criu, &container.id, &image_dir, opts)?, None),
    };
    let rootfs_started = Instant::now();
    let rootfs = match container.layout {
        BundleLayout::Archive => write_metadata(dir, &image_dir, container, opts)?,
        BundleLayout::TaskImage => None,
    };
    let rootfs_time = rootfs_started.elapsed();

    let seal_started = Instant::now();
    let mut manifest =
        Manifest::new(HostInfo::current(report.criu_version.to_string(), runc.version()), container.identity.clone());
    manifest.checkpoint = Some(report.clone());
    manifest.criu_flags = Some(opts.flags.clone());
    manifest.gpu = gpu;
    let manifest = bundle::seal_with(dir, manifest, container.durability)?;
    Ok(BundleReport {
        manifest,
        checkpoint: report,
        rootfs,
        rootfs_time,
        seal_time: seal_started.elapsed(),
        total: started.elapsed(),
    })
}

/// What a node bundle holds beside the images: `stats-dump`, `spec.dump`, `config.dump` and the
/// writable layer (its statistics, when the rootfs is an overlay).
fn write_metadata(
    dir: &Path,
    image_dir: &Path,
    container: &ContainerCheckpoint,
    opts: &CheckpointOptions,
) -> Result<Option<RootfsDiffStats>> {
    let work_dir = opts.work_dir.clone().unwrap_or_else(|| image_dir.to_path_buf());
    let stats_src = work_dir.join(stats::STATS_DUMP_FILE);
    if stats_src.is_file() {
        let target = dir.join(STATS_DUMP);
        let copied = if work_dir == *image_dir {
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

    container.upperdir.as_deref().map(|upper| rootfs::capture_overlay_diff(upper, dir)).transpose()
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

/// Checkpoints container `id` into `image_dir` with the GPU state of its processes (see
/// [`crate::gpu`]). Returns the dump's report and the manifest's GPU section, `None` when no process of the
/// container uses a GPU. The GPU steps and the dump share `opts.timeout`.
fn checkpoint_container_gpu(
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
