//! Checkpoint of a runc container into a bundle: GPU steps around `runc checkpoint` (when the
//! container uses a GPU), the writable layer, `config.dump`, `spec.dump`, `stats-dump`, and the
//! sealed manifest, in the [`BundleLayout`] asked for.

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::bundle::{
    self, BundleLayout, ContainerIdentity, Durability, GpuSection, HostInfo, Manifest, CONFIG_DUMP, DELETED_FILES,
    ROOTFS_DIFF, SPEC_DUMP, STATS_DUMP,
};
use crate::criu::{stats, Criu};
use crate::error::{Error, GpuStep, Result};
use crate::gpu::{
    dump_with_backend, find_gpu_processes, gpu_error, gpu_section, ns_pid, DiscoveryMethod, GpuContext, ProcScanner,
};
use crate::options::CheckpointOptions;
use crate::report::CheckpointReport;
use crate::rootfs::{self, RootfsDiffStats};
use crate::runc::{checkpoint_container, ContainerStatus, Runc};
use crate::trust::SigningKey;

/// `config.dump`: the container's identity with the field names of checkpointctl's
/// `metadata.ContainerConfig` (`lib/metadata.go`, which CRI-O and containerd 2.x write, and a reduced
/// copy of Podman's), so `checkpointctl show` and `inspect` print real values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDump {
    /// Container id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// The image the user asked for.
    #[serde(rename = "rootfsImage", default, skip_serializing_if = "Option::is_none")]
    pub rootfs_image: Option<String>,
    /// The image's id or digest, when known.
    #[serde(rename = "rootfsImageRef", default, skip_serializing_if = "Option::is_none")]
    pub rootfs_image_ref: Option<String>,
    /// Image the rootfs came from.
    #[serde(rename = "rootfsImageName", default, skip_serializing_if = "Option::is_none")]
    pub rootfs_image_name: Option<String>,
    /// The runtime that ran the container.
    #[serde(rename = "runtime")]
    pub oci_runtime: String,
    /// When the container was created (RFC 3339; Go's zero time when unknown).
    #[serde(rename = "createdTime", default = "zero_time")]
    pub created_time: String,
    /// When the checkpoint was taken (RFC 3339).
    #[serde(rename = "checkpointedTime")]
    pub checkpointed_time: String,
    /// When the container was itself restored from a checkpoint (Go's zero time if it was not).
    #[serde(rename = "restoredTime", default = "zero_time")]
    pub restored_time: String,
    /// Whether the container was itself restored from a checkpoint.
    #[serde(default)]
    pub restored: bool,
}

/// Go's zero `time.Time` as its JSON encoder writes it: what checkpointctl reads as "not set".
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

fn zero_time() -> String {
    ZERO_TIME.to_string()
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
    /// The node key that signs the manifest (see [`crate::trust`]); `None` writes an unsigned bundle,
    /// which nodes restore only with `allow_unsigned`.
    pub signer: Option<Arc<SigningKey>>,
    /// When the container was itself restored from a checkpoint, for `config.dump`.
    pub restored_at: Option<SystemTime>,
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
/// Without `opts.leave_running` the container ends, but only once the bundle is sealed: it is frozen
/// (`runc pause`), dumped with CRIU leaving the frozen tasks as they are, the writable layer and
/// metadata are written and the bundle sealed, and only then are the tasks killed (they execute
/// nothing after the dump). `opts.timeout` is one deadline for all of it: the GPU steps, the dump,
/// and the seal (checked between steps and while files are hashed).
///
/// Nothing is lost on failure. If the dump fails, the container keeps running (GPU steps rolled back,
/// thawed if it was frozen here) and the emptied `dir` is marked `FAILED`. If a step after the dump
/// fails, the finished CRIU images are kept, the bundle is marked `PARTIAL` with what is missing
/// ([`Error::Partial`]), and the container is thawed and keeps running; the caller decides what next.
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
    // A node bundle names its writer while it is written, for the sweep after a crash; containerd owns
    // (and cleans up) a task image's directory, whose top holds CRIU's images alone.
    let in_progress = match container.layout {
        BundleLayout::Archive => bundle::mark_in_progress(dir),
        BundleLayout::TaskImage => Ok(()),
    };
    if let Err(e) = in_progress.and_then(|()| check_free_space(runc, &container.id, dir)) {
        abandon(dir, &e.to_string());
        return Err(e);
    }
    // Ending the tasks waits for the seal: right before the dump (after any GPU lock, which needs
    // the processes running) they are frozen, CRIU leaves them frozen, and they are killed once sealed.
    // Tasks left running are frozen the same way when their writable layer is captured after the
    // dump, so the layer holds what the memory saw; they are thawed once it is captured. (Not with
    // GPU state: the GPU unlock after the dump needs the processes running.)
    let freeze_for_dump = !opts.leave_running
        || (container.layout == BundleLayout::Archive && container.upperdir.is_some() && container.gpu.is_none());
    let frozen = Cell::new(false);
    let image_dir = container.layout.image_dir(dir);
    // One deadline for everything: the dump gets what the steps before it (GPU locks) left.
    let deadline = opts.timeout.map(|t| started + t);
    let dump = |dump_opts: &CheckpointOptions| {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|left| left.is_zero()) {
            return Err(budget_spent(opts, &container.id));
        }
        if freeze_for_dump {
            frozen.set(freeze(runc, &container.id)?);
        }
        let dump_opts =
            CheckpointOptions { leave_running: opts.leave_running || frozen.get(), timeout: left, ..dump_opts.clone() };
        checkpoint_container(runc, criu, &container.id, &image_dir, &dump_opts)
    };
    let thaw = || {
        if frozen.replace(false) {
            if let Err(e) = runc.resume(&container.id) {
                tracing::warn!(id = %container.id, error = %e, "thawing the container after its checkpoint");
            }
        }
    };
    // Once the layer is captured, tasks left running run on while the bundle is sealed.
    let layer_captured = || {
        if opts.leave_running {
            thaw();
        }
    };
    let dumped = match &container.gpu {
        Some(ctx) => checkpoint_container_gpu(ctx, runc, &container.id, opts, &dump),
        None => dump(opts).map(|r| (r, None)),
    };
    let (report, gpu) = match dumped {
        Ok(dumped) => dumped,
        Err(e) => {
            abandon(dir, &e.to_string());
            thaw();
            return Err(e);
        }
    };
    // From here on the CRIU images are never deleted.
    let mut manifest =
        Manifest::new(HostInfo::current(report.criu_version.to_string(), runc.version()), container.identity.clone());
    manifest.checkpoint = Some(report.clone());
    manifest.criu_flags = Some(opts.flags.clone());
    manifest.gpu = gpu;
    match finish_bundle(dir, &image_dir, container, opts, manifest.clone(), deadline, &layer_captured) {
        Ok((manifest, rootfs, rootfs_time, seal_time)) => {
            if frozen.get() {
                end_frozen(runc, &container.id);
            }
            Ok(BundleReport { manifest, checkpoint: report, rootfs, rootfs_time, seal_time, total: started.elapsed() })
        }
        Err(e) => {
            let reason = format!("the CRIU images are complete, but {e}");
            if let Err(mark) = bundle::mark_partial(dir, manifest, &reason, container.signer.as_deref()) {
                tracing::error!(dir = %dir.display(), error = %mark, "marking the bundle PARTIAL failed; its images stay");
            }
            thaw();
            Err(Error::Partial { path: dir.to_path_buf(), reason })
        }
    }
}

/// Everything after the dump: the metadata and writable layer of a node bundle (then
/// `layer_captured` is called), then the seal, all before `deadline`. Returns the sealed manifest,
/// the layer's statistics and the two steps' times.
fn finish_bundle(
    dir: &Path,
    image_dir: &Path,
    container: &ContainerCheckpoint,
    opts: &CheckpointOptions,
    mut manifest: Manifest,
    deadline: Option<Instant>,
    layer_captured: &dyn Fn(),
) -> Result<(Manifest, Option<RootfsDiffStats>, Duration, Duration)> {
    let rootfs_started = Instant::now();
    let layer = match container.layout {
        BundleLayout::Archive => write_metadata(dir, image_dir, container, opts)?,
        BundleLayout::TaskImage => None,
    };
    layer_captured();
    let rootfs = layer.map(|layer| {
        manifest.setid_files = layer.setid;
        layer.stats
    });
    let rootfs_time = rootfs_started.elapsed();
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(Error::io(
            "the checkpoint budget ran out after the writable layer was captured, before the seal",
            std::io::ErrorKind::TimedOut.into(),
        ));
    }
    let seal_started = Instant::now();
    let how = bundle::Seal { durability: container.durability, deadline, signer: container.signer.as_deref() };
    let manifest = bundle::seal_with(dir, manifest, &how)?;
    Ok((manifest, rootfs, rootfs_time, seal_started.elapsed()))
}

/// Freezes a running container for its dump; `false` when it was paused already (then it is left
/// as it is).
fn freeze(runc: &Runc, id: &str) -> Result<bool> {
    match runc.state(id)? {
        Some(s) if s.status == ContainerStatus::Running => {
            runc.pause(id)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Ends the frozen, checkpointed container: SIGKILL to every process, then thaw so the kernel delivers
/// it before any of them returns to user space.
fn end_frozen(runc: &Runc, id: &str) {
    if let Err(e) = runc.kill(id, libc::SIGKILL as u32, true) {
        tracing::warn!(id, error = %e, "killing the checkpointed container");
    }
    if let Err(e) = runc.resume(id) {
        tracing::debug!(id, error = %e, "thawing the killed container (it may be gone already)");
    }
}

/// Fails before anything is frozen when the bundle's filesystem cannot hold the container's memory
/// (the sum of its processes' resident sets, what CRIU's page images take at most), naming the
/// directory and the numbers.
fn check_free_space(runc: &Runc, id: &str, dir: &Path) -> Result<()> {
    const MIB: u64 = 1 << 20;
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let resident: u64 = runc
        .ps(id)?
        .iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/statm")).ok())
        .filter_map(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page)
        .sum();
    let needed = resident + 16 * MIB;
    let free = free_bytes(dir)?;
    if free < needed {
        return Err(Error::Directory {
            path: dir.to_path_buf(),
            reason: format!(
                "container {id} holds about {} MiB of memory and its checkpoint needs about {} MiB, but only {} MiB \
                 are free there; free space, or point checkpoint_dir at a larger filesystem",
                resident / MIB,
                needed / MIB,
                free / MIB
            ),
        });
    }
    Ok(())
}

/// Bytes an unprivileged writer could still put on `dir`'s filesystem.
fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::io(format!("{} has a NUL byte", dir.display()), std::io::ErrorKind::InvalidInput.into()))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs buffer the call fills.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(format!("statvfs {}", dir.display()), std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Empties an unfinished bundle and marks it failed, keeping only the reason.
fn abandon(dir: &Path, reason: &str) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name() == bundle::IN_PROGRESS_MARKER {
                continue;
            }
            let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        }
    }
    if let Err(e) = bundle::mark_failed(dir, reason) {
        tracing::warn!(dir = %dir.display(), error = %e, "marking the abandoned bundle failed");
    }
}

/// What a node bundle holds beside the images: `stats-dump`, `spec.dump`, `config.dump` and the
/// writable layer (what it captured, when the rootfs is an overlay).
fn write_metadata(
    dir: &Path,
    image_dir: &Path,
    container: &ContainerCheckpoint,
    opts: &CheckpointOptions,
) -> Result<Option<rootfs::CapturedLayer>> {
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
    let rfc3339 = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let config = ConfigDump {
        id: container.identity.id.clone(),
        name: container.identity.name.clone(),
        rootfs_image: container.identity.image.clone(),
        rootfs_image_ref: None,
        rootfs_image_name: container.identity.image.clone(),
        oci_runtime: container.runtime.clone(),
        created_time: container.identity.created.clone().unwrap_or_else(zero_time),
        checkpointed_time: rfc3339(SystemTime::now()),
        restored_time: container.restored_at.map(rfc3339).unwrap_or_else(zero_time),
        restored: container.restored_at.is_some(),
    };
    fs::write(dir.join(CONFIG_DUMP), serde_json::to_vec_pretty(&config).expect("config.dump serializes"))
        .map_err(|e| Error::io(format!("writing {}", dir.join(CONFIG_DUMP).display()), e))?;

    let layer = container.upperdir.as_deref().map(|upper| rootfs::capture_overlay_diff(upper, dir)).transpose();
    if layer.is_err() {
        // A half-written layer is of no use and may hold the space the manifest needs: leave it out.
        for file in [ROOTFS_DIFF, DELETED_FILES] {
            let _ = fs::remove_file(dir.join(file));
        }
    }
    layer
}

/// The error when the checkpoint budget ran out before the dump could start.
fn budget_spent(opts: &CheckpointOptions, id: &str) -> Error {
    Error::io(
        format!(
            "the checkpoint budget of {:?} was spent before the dump of container {id} could start; give the \
             checkpoint more time",
            opts.timeout.unwrap_or_default()
        ),
        std::io::ErrorKind::TimedOut.into(),
    )
}

/// Checkpoints container `id` into `image_dir` with the GPU state of its processes (see
/// [`crate::gpu`]). Returns the dump's report and the manifest's GPU section, `None` when no process of the
/// container uses a GPU. `dump` (which freezes and dumps) gets what the GPU steps left of the budget.
fn checkpoint_container_gpu(
    ctx: &GpuContext,
    runc: &Runc,
    id: &str,
    opts: &CheckpointOptions,
    dump: &dyn Fn(&CheckpointOptions) -> Result<CheckpointReport>,
) -> Result<(CheckpointReport, Option<GpuSection>)> {
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
        return Ok((dump(opts)?, None));
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
    // A container that ends after its checkpoint keeps its GPU state checkpointed (no GPU restore).
    let report = dump_with_backend(&ctx.backend, &gpu_pids, ctx.lock_timeout, opts.leave_running, || dump(opts))?;
    Ok((report, Some(section)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON names of checkpointctl's `metadata.ContainerConfig`, as read from
    /// github.com/checkpoint-restore/checkpointctl `lib/metadata.go` at 9192f118 (v1.5.0+57), which
    /// containerd 2.x's CRI and CRI-O write into `config.dump`.
    const CHECKPOINTCTL_CONTAINER_CONFIG: [&str; 10] = [
        "id",
        "name",
        "rootfsImage",
        "rootfsImageRef",
        "rootfsImageName",
        "runtime",
        "createdTime",
        "checkpointedTime",
        "restoredTime",
        "restored",
    ];

    #[test]
    fn config_dump_has_checkpointctls_field_names_and_go_time_values() {
        let full = ConfigDump {
            id: "3f2a".into(),
            name: "trainer".into(),
            rootfs_image: Some("docker.io/library/python:3".into()),
            rootfs_image_ref: Some("sha256:abc".into()),
            rootfs_image_name: Some("docker.io/library/python:3".into()),
            oci_runtime: "io.containerd.kybernate.v1".into(),
            created_time: "2026-12-01T10:00:00.000Z".into(),
            checkpointed_time: "2026-12-01T11:00:00.000Z".into(),
            restored_time: ZERO_TIME.into(),
            restored: false,
        };
        let json: serde_json::Value = serde_json::to_value(&full).unwrap();
        let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = CHECKPOINTCTL_CONTAINER_CONFIG;
        expected.sort_unstable();
        assert_eq!(keys, expected);
        // Go parses RFC 3339 with fractional seconds; its zero time means "not restored"
        for key in ["createdTime", "checkpointedTime"] {
            let value = json[key].as_str().unwrap();
            humantime::parse_rfc3339(value).unwrap_or_else(|e| panic!("{key} {value}: {e}"));
        }
        assert_eq!(json["restoredTime"], ZERO_TIME);
        // what Go's omitempty leaves out, we leave out; a config.dump of checkpointctl's reads back
        let sparse = ConfigDump { rootfs_image: None, rootfs_image_ref: None, rootfs_image_name: None, ..full };
        let keys = serde_json::to_value(&sparse).unwrap().as_object().unwrap().len();
        assert_eq!(keys, 7);
        let from_go = r#"{"id":"x","name":"y","runtime":"runc","createdTime":"2026-12-01T10:00:00Z",
            "checkpointedTime":"2026-12-01T11:00:00Z","restoredTime":"0001-01-01T00:00:00Z","restored":false}"#;
        let read: ConfigDump = serde_json::from_str(from_go).unwrap();
        assert_eq!((read.id.as_str(), read.restored_time.as_str()), ("x", ZERO_TIME));
    }
}
