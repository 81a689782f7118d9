//! The checkpoint bundle: one directory per checkpoint, laid out like the archives of Podman, CRI-O and
//! checkpointctl (KEP-2008) plus Kybernate's manifest. See `docs/bundle-format.md`.
//!
//! A bundle becomes usable only when [`seal`] has hashed every file into the manifest, made everything
//! durable, and renamed [`COMPLETE_MARKER`] into place. [`verify`] checks all of it before a restore.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::report::CheckpointReport;
use crate::trust::{Provenance, SigningKey, TrustedKeys, SIGNATURE_FILE};

/// Written last, by rename, once everything else is durable: the only signal that a bundle may be
/// shipped or restored.
pub const COMPLETE_MARKER: &str = "COMPLETE";
/// Written instead of [`COMPLETE_MARKER`] when a checkpoint was abandoned; holds the reason.
pub const FAILED_MARKER: &str = "FAILED";
/// Written instead of [`COMPLETE_MARKER`] when CRIU's dump succeeded but a later step did not (the
/// writable layer, metadata, the seal, the budget): the finished images are kept, the manifest
/// covers what was written, and the marker binds it and says what is missing and why. Restored only
/// when asked for (`kybernate.io/restore-policy: allow-partial`), never shipped.
pub const PARTIAL_MARKER: &str = "PARTIAL";
/// Present while a checkpoint is being written, naming its writer (pid and process start time), so
/// that [`sweep_interrupted`] can tell a checkpoint whose writer died from one still being written.
pub const IN_PROGRESS_MARKER: &str = "IN-PROGRESS";
/// Kybernate's manifest: format version, versions of the tools, identity, GPU section, file hashes.
pub const MANIFEST_FILE: &str = "kybernate.json";
/// Container identity and checkpoint metadata (Podman/CRI-O field names).
pub const CONFIG_DUMP: &str = "config.dump";
/// The OCI runtime spec of the container.
pub const SPEC_DUMP: &str = "spec.dump";
/// Directory holding CRIU's image files.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Changes in the container's writable layer.
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
/// Paths deleted from the image's layers.
pub const DELETED_FILES: &str = "deleted.files";
/// CRIU's dump statistics.
pub const STATS_DUMP: &str = "stats-dump";
/// The manifest format this library writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Default node checkpoint directory.
pub const DEFAULT_CHECKPOINT_ROOT: &str = "/var/lib/kybernate/checkpoints";

/// Where a bundle keeps its CRIU images. Kybernate writes both with one writer and opens both with one
/// opener; the manifest's file list says which one a bundle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleLayout {
    /// A node bundle (KEP-2008 archive layout, as Podman, CRI-O and checkpointctl read it): images in
    /// [`CHECKPOINT_DIR`]`/`, beside `config.dump`, `spec.dump`, the writable layer and `stats-dump`.
    Archive,
    /// A containerd task checkpoint (`ctr c checkpoint`, the task API's Checkpoint): CRIU images at the
    /// top of the directory containerd names, as runc's shim writes them. containerd tars that directory
    /// into its content store, and its CRI nests it as `checkpoint/` of a KEP-2008 archive, adding
    /// `config.dump` and `spec.dump` itself; so nothing but the images and the manifest goes here.
    TaskImage,
}

impl BundleLayout {
    /// The directory of CRIU images in the bundle `dir`.
    pub fn image_dir(self, dir: &Path) -> PathBuf {
        match self {
            BundleLayout::Archive => dir.join(CHECKPOINT_DIR),
            BundleLayout::TaskImage => dir.to_path_buf(),
        }
    }

    /// The layout of the bundle `dir`, from where its CRIU inventory is; `None` when it has none.
    pub fn detect(dir: &Path) -> Option<Self> {
        [BundleLayout::Archive, BundleLayout::TaskImage]
            .into_iter()
            .find(|layout| layout.image_dir(dir).join(INVENTORY_IMAGE).is_file())
    }
}

/// CRIU's inventory image, present in every image directory.
pub const INVENTORY_IMAGE: &str = "inventory.img";

/// Whether `dir` holds a finished bundle (its [`COMPLETE_MARKER`] exists).
pub fn is_complete(dir: &Path) -> bool {
    dir.join(COMPLETE_MARKER).is_file()
}

/// `<root>/<namespace>/<pod-or-container>/<container>/<RFC3339 time>/`, the place of a new bundle.
pub fn bundle_dir(
    root: &Path,
    namespace: &str,
    pod_or_container: &str,
    container: &str,
    at: SystemTime,
) -> Result<PathBuf> {
    for (what, part) in [("namespace", namespace), ("pod", pod_or_container), ("container", container)] {
        if part.is_empty() || part == "." || part == ".." || part.contains('/') || part.contains('\0') {
            return Err(Error::InvalidOptions(format!(
                "{what} name {part:?} cannot be a directory name: it must be non-empty without '/'"
            )));
        }
    }
    let time = humantime::format_rfc3339_millis(at).to_string();
    Ok(root.join(namespace).join(pod_or_container).join(container).join(time))
}

/// Who was checkpointed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerIdentity {
    /// containerd namespace (`k8s.io` under Kubernetes).
    pub namespace: String,
    /// Kubernetes namespace of the pod, when the container belongs to one: with `namespace`, whose
    /// bundle this is ([`crate::tenant::Tenant::of`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_namespace: Option<String>,
    /// Kubernetes pod name, when the container belongs to a pod.
    pub pod: Option<String>,
    /// Container name (Kubernetes container name, or the containerd id).
    pub name: String,
    /// containerd container id.
    pub id: String,
    /// Image reference the container was created from.
    pub image: Option<String>,
    /// When the container was first created (RFC 3339): kept across restores, for `config.dump`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// The node the checkpoint was taken on, for compatibility checks at restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// CRIU version (`4.1.1`).
    pub criu_version: String,
    /// runc version, when a container was checkpointed.
    pub runc_version: Option<String>,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
}

impl HostInfo {
    /// Reads kernel and architecture of this node, with the given tool versions.
    pub fn current(criu_version: String, runc_version: Option<String>) -> Self {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        HostInfo { criu_version, runc_version, kernel, arch: std::env::consts::ARCH.to_string() }
    }
}

/// One GPU the workload used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// GPU UUID (`GPU-…`).
    pub uuid: String,
    /// Marketing name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Compute capability (`9.0`).
    pub compute_capability: String,
    /// Total memory in bytes.
    pub memory_bytes: u64,
}

/// GPU memory one checkpointed process held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    /// Host pid at checkpoint time.
    pub pid: i32,
    /// UUID of the GPU the memory was on; `null` when it was found without NVML (`/proc` scan).
    pub gpu_uuid: Option<String>,
    /// Bytes of device memory; `null` when NVML could not tell or was not usable.
    pub memory_bytes: Option<u64>,
    /// The pid inside the container's pid namespace at checkpoint time (the innermost `NSpid` of
    /// `/proc/<pid>/status`), which CRIU gives the process again on restore: how a container restore
    /// finds the restored process. `null` for process-tree checkpoints, and in older bundles.
    #[serde(default)]
    pub ns_pid: Option<i32>,
}

/// The GPU section of the manifest, present when the workload used a GPU (filled by
/// [`crate::gpu::gpu_section`], checked by [`crate::gpu::check_restore`]; see `docs/gpu.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSection {
    /// NVIDIA driver version; `null` when NVML was not usable at checkpoint time.
    pub driver_version: Option<String>,
    /// The backend that checkpointed the GPU state (`driver-api`, `cuda-checkpoint`, `criu-plugin`).
    #[serde(default)]
    pub backend: String,
    /// The GPUs used (empty when NVML was not usable at checkpoint time).
    pub devices: Vec<GpuDevice>,
    /// Device memory per process and GPU.
    pub processes: Vec<GpuProcess>,
}

/// Size and SHA-256 of one file of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// `kybernate.json`: what the bundle is and everything in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// When the checkpoint was taken (RFC 3339, UTC).
    pub created: String,
    /// Node facts for compatibility checks.
    pub host: HostInfo,
    /// Who was checkpointed.
    pub container: ContainerIdentity,
    /// Timings and sizes of the dump.
    pub checkpoint: Option<CheckpointReport>,
    /// GPU state, when the workload used a GPU.
    pub gpu: Option<GpuSection>,
    /// The CRIU flags of the dump, which the restore must repeat (absent in bundles that predate it).
    #[serde(default)]
    pub criu_flags: Option<crate::options::CriuFlags>,
    /// Files of the writable layer (`rootfs-diff.tar` paths) with a set-user-id or set-group-id bit,
    /// and their mode: a restore clears those bits on every file not recorded here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub setid_files: BTreeMap<String, u32>,
    /// Every file of the bundle except the manifest and the markers, by relative path.
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    /// A manifest for a checkpoint taken now; [`seal`] fills in the files.
    pub fn new(host: HostInfo, container: ContainerIdentity) -> Self {
        Manifest {
            format_version: FORMAT_VERSION,
            created: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            host,
            container,
            checkpoint: None,
            gpu: None,
            criu_flags: None,
            setid_files: BTreeMap::new(),
            files: BTreeMap::new(),
        }
    }
}

fn bundle_error(dir: &Path, reason: impl Into<String>) -> Error {
    Error::Bundle { path: dir.to_path_buf(), reason: reason.into() }
}

/// The files Kybernate adds beside a bundle's contents: the manifest, its signature, the markers.
const KYBERNATE_FILES: [&str; 6] =
    [MANIFEST_FILE, SIGNATURE_FILE, COMPLETE_MARKER, FAILED_MARKER, PARTIAL_MARKER, IN_PROGRESS_MARKER];

fn is_marker_or_manifest(rel: &str) -> bool {
    KYBERNATE_FILES.contains(&rel)
}

/// Whether Kybernate wrote (or began writing) `dir`: it has a manifest, a signature or a marker.
pub fn has_kybernate_files(dir: &Path) -> bool {
    KYBERNATE_FILES.iter().any(|f| dir.join(f).exists())
}

/// Relative paths of the regular files below `dir`, sorted; links and special files are refused.
pub(crate) fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let abs = dir.join(&rel_dir);
        let entries = fs::read_dir(&abs).map_err(|e| Error::io(format!("listing {}", abs.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", abs.display()), e))?;
            let rel = rel_dir.join(entry.file_name());
            let kind = entry.file_type().map_err(|e| Error::io(format!("stat {}", entry.path().display()), e))?;
            if kind.is_dir() {
                stack.push(rel);
            } else if kind.is_file() {
                let rel = rel.to_str().ok_or_else(|| bundle_error(dir, format!("{} is not UTF-8", rel.display())))?;
                if !is_marker_or_manifest(rel) {
                    out.push(rel.to_string());
                }
            } else {
                return Err(bundle_error(dir, format!("{} is not a regular file or directory", rel.display())));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Size and SHA-256 of `path`, optionally fsyncing it on the way.
fn hash_file(path: &Path, sync: bool, deadline: Option<Instant>) -> Result<FileEntry> {
    let mut file = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::io(
                format!("the checkpoint budget ran out while {} was being sealed", path.display()),
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
        let n = file.read(&mut buf).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    if sync {
        file.sync_all().map_err(|e| Error::io(format!("fsync {}", path.display()), e))?;
    }
    let sha256 = hex::encode(hasher.finalize());
    Ok(FileEntry { size, sha256 })
}

/// Starts writeback of `path`'s dirty pages without waiting for it, so the disk writes while the
/// files are hashed; the fsync after hashing then only waits for what is left.
fn start_writeback(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(file) = File::open(path) {
        // SAFETY: a valid open descriptor; offset 0 and length 0 mean the whole file.
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
}

/// Hashes `files` (relative to `dir`) on all cores, largest first; with `sync`, the writeback of
/// every file is started first and each file is fsynced after it was hashed.
fn hash_all(
    dir: &Path,
    files: &[String],
    sync: bool,
    deadline: Option<Instant>,
) -> Result<BTreeMap<String, FileEntry>> {
    let mut files: Vec<(u64, &String)> =
        files.iter().map(|f| (fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0), f)).collect();
    files.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    let files: Vec<&String> = files.into_iter().map(|(_, f)| f).collect();
    if sync {
        for rel in &files {
            start_writeback(&dir.join(rel));
        }
    }
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(files.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::with_capacity(files.len()));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(rel) = files.get(i) else { break };
                let entry = hash_file(&dir.join(rel), sync, deadline);
                results.lock().expect("hash results lock").push(((*rel).clone(), entry));
            });
        }
    });
    results.into_inner().expect("hash results lock").into_iter().map(|(rel, entry)| Ok((rel, entry?))).collect()
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(format!("fsync {}", dir.display()), e))
}

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    write_atomically(dir, name, bytes, Durability::Synced)
}

/// Writes `bytes` to `dir/name` atomically (temp file, rename), fsyncing file and directory when
/// `durability` asks for it.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8], durability: Durability) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    let sync = durability == Durability::Synced;
    let mut f = File::create(&tmp).map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| if sync { f.sync_all() } else { Ok(()) })
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, &target).map_err(|e| Error::io(format!("renaming {} into place", target.display()), e))?;
    if sync {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Whether [`seal_with`] makes the bundle durable itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// fsync every file and directory before `COMPLETE` (the node checkpoint directory).
    #[default]
    Synced,
    /// Leave durability to whoever copies the bundle next (containerd tars a `ctr` checkpoint into
    /// its content store): the order is the same, only the fsyncs are skipped.
    Unsynced,
}

/// How [`seal_with`] seals a bundle.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seal<'a> {
    /// Whether the bundle is fsynced before `COMPLETE`.
    pub durability: Durability,
    /// Give up (an error, nothing marked) once this passes while files are hashed.
    pub deadline: Option<Instant>,
    /// The node key that signs the manifest ([`SIGNATURE_FILE`]); `None` leaves the bundle unsigned,
    /// which a node restores only with `allow_unsigned`.
    pub signer: Option<&'a SigningKey>,
}

/// Seals the bundle in `dir`: hashes and fsyncs every file, writes the manifest, then renames
/// [`COMPLETE_MARKER`] into place. Until this returns `Ok`, the bundle is never shipped or restored.
/// The bundle is unsigned; see [`seal_with`].
pub fn seal(dir: &Path, manifest: Manifest) -> Result<Manifest> {
    seal_with(dir, manifest, &Seal::default())
}

/// [`seal`], made durable, bounded and signed as `how` says.
pub fn seal_with(dir: &Path, manifest: Manifest, how: &Seal<'_>) -> Result<Manifest> {
    if is_complete(dir) {
        return Err(bundle_error(dir, "it is already sealed; write each checkpoint into a new directory"));
    }
    if dir.join(FAILED_MARKER).exists() {
        return Err(bundle_error(dir, "it was marked failed; take a new checkpoint"));
    }
    let (manifest, digest) = write_manifest(dir, manifest, how)?;
    write_atomically(dir, COMPLETE_MARKER, format!("{MANIFEST_FILE} sha256:{digest}\n").as_bytes(), how.durability)?;
    remove_in_progress(dir);
    Ok(manifest)
}

/// Hashes every file into `manifest` (fsyncing them and their directories when `how` asks), writes
/// it and its signature, and returns it with the SHA-256 of its bytes.
fn write_manifest(dir: &Path, mut manifest: Manifest, how: &Seal<'_>) -> Result<(Manifest, String)> {
    let sync = how.durability == Durability::Synced;
    let files = list_files(dir)?;
    manifest.files = hash_all(dir, &files, sync, how.deadline)?;
    if sync {
        let mut dirs: Vec<PathBuf> = files.iter().filter_map(|f| Path::new(f).parent().map(|p| dir.join(p))).collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            fsync_dir(&d)?;
        }
    }
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    match how.signer {
        Some(key) => write_atomically(dir, SIGNATURE_FILE, &key.sign_manifest(&json), how.durability)?,
        None => {
            let _ = fs::remove_file(dir.join(SIGNATURE_FILE));
        }
    }
    write_atomically(dir, MANIFEST_FILE, &json, how.durability)?;
    Ok((manifest, hex::encode(Sha256::digest(&json))))
}

/// Marks an abandoned bundle, so that nothing ever ships or restores it, and records why.
pub fn mark_failed(dir: &Path, reason: &str) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    write_durably(dir, FAILED_MARKER, format!("{reason}\n").as_bytes())?;
    remove_in_progress(dir);
    Ok(())
}

/// Marks a bundle whose CRIU images are finished but which could not be completed (see
/// [`PARTIAL_MARKER`]): every file there is is hashed into `manifest`, which the marker binds (and
/// `signer` signs), with `reason`. When not even the manifest can be written (a full disk), the marker holds the reason
/// alone and the bundle cannot be verified. Nothing is deleted either way.
pub fn mark_partial(dir: &Path, manifest: Manifest, reason: &str, signer: Option<&SigningKey>) -> Result<()> {
    let how = Seal { signer, ..Seal::default() };
    let binding = match write_manifest(dir, manifest, &how) {
        Ok((_, digest)) => format!("{MANIFEST_FILE} sha256:{digest}\n"),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "the partial bundle's manifest could not be written");
            String::new()
        }
    };
    write_durably(dir, PARTIAL_MARKER, format!("{binding}{reason}\n").as_bytes())?;
    remove_in_progress(dir);
    Ok(())
}

/// Writes [`IN_PROGRESS_MARKER`] naming this process as the bundle's writer.
pub fn mark_in_progress(dir: &Path) -> Result<()> {
    write_atomically(
        dir,
        IN_PROGRESS_MARKER,
        format!("{}\n", process_identity(std::process::id())).as_bytes(),
        Durability::Unsynced,
    )
}

fn remove_in_progress(dir: &Path) {
    let _ = fs::remove_file(dir.join(IN_PROGRESS_MARKER));
}

/// `pid <pid> started <ticks since boot>` of a live process (`None` once it is gone), so a reused pid
/// does not pass for the writer.
fn process_identity(pid: u32) -> String {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // the start time is field 22; the command name (field 2) may contain spaces, so count after ')'
    let started = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(19)).unwrap_or("?");
    format!("pid {pid} started {started}")
}

/// Retention for the bundles of one container (`<root>/<ns>/<pod>/<container>/`, one directory per
/// checkpoint): keeps the newest `keep` sealed ones and removes older sealed ones, and removes `FAILED`
/// ones whose marker is older than `failed_grace`. `PARTIAL` bundles and checkpoints in progress are
/// never removed. Returns what was removed.
pub fn prune(container_dir: &Path, keep: usize, failed_grace: std::time::Duration) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(container_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    // bundle directories are named by RFC 3339 time: newest last
    dirs.sort();
    let sealed: Vec<&PathBuf> = dirs.iter().filter(|d| is_complete(d)).collect();
    let mut doomed: Vec<PathBuf> =
        sealed[..sealed.len().saturating_sub(keep)].iter().map(|d| d.to_path_buf()).collect();
    let expired = |d: &PathBuf| {
        fs::metadata(d.join(FAILED_MARKER))
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age >= failed_grace))
    };
    doomed.extend(dirs.iter().filter(|d| !is_complete(d) && expired(d)).cloned());
    doomed.retain(|d| match fs::remove_dir_all(d) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(bundle = %d.display(), error = %e, "removing an old bundle");
            false
        }
    });
    doomed
}

/// Marks FAILED every bundle directory under `root` (down to `max_depth`) that is still marked
/// [`IN_PROGRESS_MARKER`] by a writer that no longer runs: a checkpoint interrupted by a crash. Its
/// files stay. Returns the directories marked.
pub fn sweep_interrupted(root: &Path, max_depth: usize) -> Vec<PathBuf> {
    let mut marked = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        if let Ok(writer) = fs::read_to_string(dir.join(IN_PROGRESS_MARKER)) {
            let writer = writer.trim();
            let pid = writer.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
            if pid.is_none_or(|pid| process_identity(pid) != writer) {
                let reason = format!("interrupted: its writer ({writer}) stopped before the checkpoint finished");
                match mark_failed(&dir, &reason) {
                    Ok(()) => marked.push(dir),
                    Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "marking an interrupted checkpoint"),
                }
            }
            continue;
        }
        if depth >= max_depth || is_complete(&dir) {
            continue;
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) && !entry.file_name().to_string_lossy().starts_with('.') {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    marked
}

/// Checks a bundle before it is restored or shipped: sealed, of a known format, and every file
/// present with its recorded size and hash, with nothing added. Returns its manifest. It does not
/// check who wrote it: a restore uses [`verify_trusted`].
pub fn verify(dir: &Path) -> Result<Manifest> {
    verify_sealed(dir, None, Defer::Nothing).map(|(manifest, _, _)| manifest)
}

/// [`verify`], after checking the manifest's signature against `trust` — first, before anything of
/// the bundle is hashed or parsed. Returns the manifest and who signed it.
pub fn verify_trusted(dir: &Path, trust: &TrustedKeys) -> Result<(Manifest, Provenance)> {
    let (manifest, provenance, _) = verify_sealed(dir, Some(trust), Defer::Nothing)?;
    Ok((manifest, provenance.unwrap_or(Provenance::Unsigned)))
}

/// [`verify_trusted`] for a lazy restore: everything is checked as there, except that the memory
/// page images (`pages-*.img`) are only checked for their sealed size; their hashes are left to
/// [`DeferredHashes::verify`], run while CRIU's page server reads them.
pub fn verify_trusted_deferring_pages(
    dir: &Path,
    trust: &TrustedKeys,
) -> Result<(Manifest, Provenance, DeferredHashes)> {
    let (manifest, provenance, deferred) = verify_sealed(dir, Some(trust), Defer::PageImages)?;
    Ok((manifest, provenance.unwrap_or(Provenance::Unsigned), deferred))
}

/// Whether `rel` (a bundle-relative path) is one of CRIU's memory page images, which a lazy restore
/// reads page by page while the container runs.
pub fn is_page_image(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name.starts_with("pages-") && name.ends_with(".img")
}

/// Which files' hashes [`verify_bound`] leaves for later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defer {
    Nothing,
    PageImages,
}

/// Files of a verified bundle whose sizes matched the manifest but whose hashes are still to be
/// checked, with [`DeferredHashes::verify`]: the page images of a lazy restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeferredHashes {
    dir: PathBuf,
    files: BTreeMap<String, FileEntry>,
}

impl DeferredHashes {
    /// How many bytes are left to hash.
    pub fn bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }

    /// Hashes the deferred files; an error names the first one that does not match its manifest
    /// entry.
    pub fn verify(&self) -> Result<()> {
        let names: Vec<String> = self.files.keys().cloned().collect();
        let actual = hash_all(&self.dir, &names, false, None)?;
        compare(&self.dir, &self.files, &actual)
    }
}

#[cfg(test)]
impl DeferredHashes {
    /// Deferred hashes of `files` in `dir` as they are now.
    pub(crate) fn for_test(dir: &Path, files: &[&str]) -> DeferredHashes {
        let files = files.iter().map(|f| (f.to_string(), hash_file(&dir.join(f), false, None).unwrap())).collect();
        DeferredHashes { dir: dir.to_path_buf(), files }
    }
}

fn verify_sealed(
    dir: &Path,
    trust: Option<&TrustedKeys>,
    defer: Defer,
) -> Result<(Manifest, Option<Provenance>, DeferredHashes)> {
    if !dir.is_dir() {
        return Err(bundle_error(dir, "the directory does not exist"));
    }
    if dir.join(FAILED_MARKER).exists() {
        let why = fs::read_to_string(dir.join(FAILED_MARKER)).unwrap_or_default();
        return Err(bundle_error(dir, format!("the checkpoint failed ({}); use another bundle", why.trim())));
    }
    if let Ok(partial) = fs::read_to_string(dir.join(PARTIAL_MARKER)) {
        return Err(bundle_error(
            dir,
            format!(
                "the checkpoint is partial ({}): its memory is complete but not everything else was written; \
                 restore it anyway with kybernate.io/restore-policy: allow-partial",
                partial_reason(&partial)
            ),
        ));
    }
    let complete = fs::read_to_string(dir.join(COMPLETE_MARKER))
        .map_err(|_| bundle_error(dir, format!("{COMPLETE_MARKER} is missing: the checkpoint did not finish")))?;
    verify_bound(dir, &complete, COMPLETE_MARKER, trust, defer)
}

/// What a [`PARTIAL_MARKER`] says is missing and why.
fn partial_reason(marker: &str) -> &str {
    let text = marker.trim();
    match text.split_once('\n') {
        Some((first, rest)) if first.starts_with(MANIFEST_FILE) => rest.trim(),
        _ if text.starts_with(MANIFEST_FILE) => "no reason recorded",
        _ => text,
    }
}

/// Verifies a partial bundle (see [`PARTIAL_MARKER`]) as far as it can be: its signature against
/// `trust` (when given), then every file it has against the manifest the marker binds. Returns the
/// manifest, what the marker says is missing, and who signed it (when `trust` was given).
pub fn verify_partial(dir: &Path, trust: Option<&TrustedKeys>) -> Result<(Manifest, String, Option<Provenance>)> {
    let marker = fs::read_to_string(dir.join(PARTIAL_MARKER))
        .map_err(|_| bundle_error(dir, format!("{PARTIAL_MARKER} is missing: it is not a partial checkpoint")))?;
    let reason = partial_reason(&marker).to_string();
    let binding = marker.lines().next().filter(|l| l.starts_with(MANIFEST_FILE)).ok_or_else(|| {
        bundle_error(
            dir,
            format!("the partial checkpoint has no manifest to verify it by ({reason}); it cannot be restored"),
        )
    })?;
    let (manifest, provenance, _) = verify_bound(dir, binding, PARTIAL_MARKER, trust, Defer::Nothing)?;
    Ok((manifest, reason, provenance))
}

/// Checks the manifest's signature (with `trust`), then the manifest against the hash `marker_text`
/// binds, then every file against the manifest.
fn verify_bound(
    dir: &Path,
    marker_text: &str,
    marker: &str,
    trust: Option<&TrustedKeys>,
    defer: Defer,
) -> Result<(Manifest, Option<Provenance>, DeferredHashes)> {
    let json = fs::read(dir.join(MANIFEST_FILE)).map_err(|e| bundle_error(dir, format!("{MANIFEST_FILE}: {e}")))?;
    let provenance = match trust {
        Some(trust) => {
            let signature = match fs::read(dir.join(SIGNATURE_FILE)) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(bundle_error(dir, format!("{SIGNATURE_FILE}: {e}"))),
            };
            Some(trust.check_manifest(dir, &json, signature.as_deref())?)
        }
        None => None,
    };
    let digest = hex::encode(Sha256::digest(&json));
    if marker_text.trim() != format!("{MANIFEST_FILE} sha256:{digest}") {
        return Err(bundle_error(dir, format!("{MANIFEST_FILE} does not match the hash sealed in {marker}")));
    }
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| bundle_error(dir, format!("{MANIFEST_FILE} does not parse: {e}")))?;
    if manifest.format_version > FORMAT_VERSION {
        return Err(bundle_error(
            dir,
            format!(
                "format version {} is newer than this Kybernate understands ({FORMAT_VERSION}); upgrade Kybernate",
                manifest.format_version
            ),
        ));
    }
    let on_disk = list_files(dir)?;
    if let Some(extra) = on_disk.iter().find(|f| !manifest.files.contains_key(*f)) {
        return Err(bundle_error(dir, format!("{extra} is not listed in the manifest: the bundle was altered")));
    }
    let (later, now): (BTreeMap<String, FileEntry>, BTreeMap<String, FileEntry>) = manifest
        .files
        .clone()
        .into_iter()
        .partition(|(rel, _)| defer == Defer::PageImages && is_page_image(rel) && on_disk.contains(rel));
    let hashed: Vec<String> = now.keys().filter(|rel| on_disk.contains(rel)).cloned().collect();
    let mut actual = hash_all(dir, &hashed, false, None)?;
    for (rel, want) in &later {
        let size =
            fs::metadata(dir.join(rel)).map_err(|e| Error::io(format!("stat {}", dir.join(rel).display()), e))?.len();
        // Only the size is known before the deferred hash: a match leaves the hash to `verify`.
        actual.insert(rel.clone(), FileEntry { size, sha256: want.sha256.clone() });
    }
    compare(dir, &manifest.files, &actual)?;
    Ok((manifest, provenance, DeferredHashes { dir: dir.to_path_buf(), files: later }))
}

/// Checks every file `want` lists against what was measured of it.
fn compare(dir: &Path, want: &BTreeMap<String, FileEntry>, actual: &BTreeMap<String, FileEntry>) -> Result<()> {
    for (rel, want) in want {
        match actual.get(rel) {
            None => return Err(bundle_error(dir, format!("{rel} is missing"))),
            Some(got) if got.size != want.size => {
                return Err(bundle_error(
                    dir,
                    format!("{rel} is {} bytes, sealed with {}: truncated", got.size, want.size),
                ))
            }
            Some(got) if got.sha256 != want.sha256 => {
                return Err(bundle_error(dir, format!("{rel} does not match its sha256: the bundle is corrupt")))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Manifest {
        fs::create_dir_all(dir.join(CHECKPOINT_DIR)).unwrap();
        fs::write(dir.join(CHECKPOINT_DIR).join("pages-1.img"), vec![3u8; 10_000]).unwrap();
        fs::write(dir.join(CHECKPOINT_DIR).join("inventory.img"), b"inv").unwrap();
        fs::write(dir.join(SPEC_DUMP), b"{}").unwrap();
        let host = HostInfo::current("4.1.1".into(), Some("1.1.5".into()));
        let id =
            ContainerIdentity { namespace: "default".into(), name: "c".into(), id: "c".into(), ..Default::default() };
        seal(dir, Manifest::new(host, id)).unwrap()
    }

    #[test]
    fn sealed_bundle_verifies_and_lists_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample(dir.path());
        assert!(is_complete(dir.path()));
        assert_eq!(
            m.files.keys().collect::<Vec<_>>(),
            ["checkpoint/inventory.img", "checkpoint/pages-1.img", "spec.dump"]
        );
        assert_eq!(m.files["spec.dump"].sha256, "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
        assert_eq!(verify(dir.path()).unwrap(), m);
        assert!(seal(dir.path(), m).unwrap_err().to_string().contains("already sealed"));
    }

    #[test]
    fn damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        let pages = dir.path().join("checkpoint/pages-1.img");
        fs::write(&pages, vec![3u8; 9_999]).unwrap();
        assert!(verify(dir.path()).unwrap_err().to_string().contains("truncated"));
        fs::write(&pages, vec![4u8; 10_000]).unwrap();
        assert!(verify(dir.path()).unwrap_err().to_string().contains("does not match its sha256"));
        fs::write(&pages, vec![3u8; 10_000]).unwrap();
        verify(dir.path()).unwrap();
        fs::write(dir.path().join("checkpoint/extra.img"), b"x").unwrap();
        assert!(verify(dir.path()).unwrap_err().to_string().contains("extra.img is not listed"));
        fs::remove_file(dir.path().join("checkpoint/extra.img")).unwrap();
        let manifest = dir.path().join(MANIFEST_FILE);
        let edited = fs::read_to_string(&manifest).unwrap().replace("\"c\"", "\"d\"");
        fs::write(&manifest, edited).unwrap();
        assert!(verify(dir.path()).unwrap_err().to_string().contains("does not match the hash sealed"));
    }

    #[test]
    fn a_signed_bundle_verifies_only_with_a_trusted_key_and_its_own_manifest() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(CHECKPOINT_DIR)).unwrap();
        fs::write(dir.path().join(CHECKPOINT_DIR).join("inventory.img"), b"inv").unwrap();
        let key = SigningKey::generate().unwrap();
        let identity = ContainerIdentity { namespace: "default".into(), name: "c".into(), ..Default::default() };
        let sealed = seal_with(
            dir.path(),
            Manifest::new(HostInfo::default(), identity),
            &Seal { signer: Some(&key), ..Seal::default() },
        )
        .unwrap();
        assert!(!sealed.files.contains_key(SIGNATURE_FILE), "the signature is beside the manifest, not in it");
        let trusted = TrustedKeys::default().with(key.trusted());
        let (manifest, provenance) = verify_trusted(dir.path(), &trusted).unwrap();
        assert_eq!(manifest, sealed);
        assert!(matches!(provenance, Provenance::Signed { key_id, .. } if key_id == *key.id()));
        let stranger = TrustedKeys::default().with(SigningKey::generate().unwrap().trusted());
        assert!(matches!(verify_trusted(dir.path(), &stranger), Err(Error::Refused { .. })));

        // A forger who rewrites the manifest and recomputes COMPLETE passes the hash chain, not the signature.
        let path = dir.path().join(MANIFEST_FILE);
        let forged = fs::read_to_string(&path).unwrap().replace("\"default\"", "\"victim\"");
        fs::write(&path, &forged).unwrap();
        let complete = format!("{MANIFEST_FILE} sha256:{}\n", hex::encode(Sha256::digest(forged.as_bytes())));
        fs::write(dir.path().join(COMPLETE_MARKER), complete).unwrap();
        assert_eq!(verify(dir.path()).unwrap().container.namespace, "victim");
        let err = verify_trusted(dir.path(), &trusted).unwrap_err().to_string();
        assert!(err.contains("does not match its contents: it was altered"), "{err}");
        // and with the signature removed, it is unsigned: refused unless allowed
        fs::remove_file(dir.path().join(SIGNATURE_FILE)).unwrap();
        let err = verify_trusted(dir.path(), &trusted).unwrap_err().to_string();
        assert!(err.contains("is not signed"), "{err}");
    }

    #[test]
    fn a_lazy_verification_defers_only_the_page_images_hashes() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(CHECKPOINT_DIR)).unwrap();
        fs::write(dir.path().join(CHECKPOINT_DIR).join("pages-1.img"), vec![3u8; 10_000]).unwrap();
        fs::write(dir.path().join(CHECKPOINT_DIR).join("inventory.img"), b"inv").unwrap();
        let key = SigningKey::generate().unwrap();
        let identity = ContainerIdentity { namespace: "default".into(), name: "c".into(), ..Default::default() };
        seal_with(
            dir.path(),
            Manifest::new(HostInfo::default(), identity),
            &Seal { signer: Some(&key), ..Seal::default() },
        )
        .unwrap();
        let trusted = TrustedKeys::default().with(key.trusted());
        let (_, _, deferred) = verify_trusted_deferring_pages(dir.path(), &trusted).unwrap();
        assert_eq!(deferred.bytes(), 10_000);
        deferred.verify().unwrap();

        // Pages changed in place (same size): found by the deferred check only.
        let pages = dir.path().join("checkpoint/pages-1.img");
        fs::write(&pages, vec![4u8; 10_000]).unwrap();
        let (_, _, deferred) = verify_trusted_deferring_pages(dir.path(), &trusted).unwrap();
        let err = deferred.verify().unwrap_err().to_string();
        assert!(err.contains("checkpoint/pages-1.img does not match its sha256"), "{err}");
        // Truncated pages, and any other file changed, are refused before anything runs.
        fs::write(&pages, vec![3u8; 9_999]).unwrap();
        let err = verify_trusted_deferring_pages(dir.path(), &trusted).unwrap_err().to_string();
        assert!(err.contains("checkpoint/pages-1.img is 9999 bytes, sealed with 10000: truncated"), "{err}");
        fs::write(&pages, vec![3u8; 10_000]).unwrap();
        fs::write(dir.path().join("checkpoint/inventory.img"), b"INV").unwrap();
        let err = verify_trusted_deferring_pages(dir.path(), &trusted).unwrap_err().to_string();
        assert!(err.contains("checkpoint/inventory.img does not match its sha256"), "{err}");
        assert!(is_page_image("checkpoint/pages-12.img") && !is_page_image("checkpoint/pagemap-1.img"));
    }

    #[test]
    fn a_seal_past_its_deadline_stops_hashing_and_marks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(CHECKPOINT_DIR)).unwrap();
        fs::write(dir.path().join(CHECKPOINT_DIR).join("pages-1.img"), vec![1u8; 3 << 20]).unwrap();
        let how = Seal { deadline: Some(Instant::now()), ..Seal::default() };
        let err =
            seal_with(dir.path(), Manifest::new(HostInfo::default(), ContainerIdentity::default()), &how).unwrap_err();
        match &err {
            Error::Io { context, source } => {
                assert!(context.contains("the checkpoint budget ran out while") && context.contains("pages-1.img"));
                assert_eq!(source.kind(), std::io::ErrorKind::TimedOut);
            }
            other => panic!("unexpected {other}"),
        }
        for marker in [COMPLETE_MARKER, MANIFEST_FILE, FAILED_MARKER, PARTIAL_MARKER] {
            assert!(!dir.path().join(marker).exists(), "{marker} was written");
        }
        // the caller (checkpoint_container_bundle) then marks it PARTIAL, keeping the images
        assert!(dir.path().join(CHECKPOINT_DIR).join("pages-1.img").exists());
    }

    #[test]
    fn unsealed_and_failed_bundles_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SPEC_DUMP), b"{}").unwrap();
        assert!(verify(dir.path()).unwrap_err().to_string().contains("COMPLETE is missing"));
        mark_failed(dir.path(), "criu dump failed").unwrap();
        assert!(verify(dir.path()).unwrap_err().to_string().contains("criu dump failed"));
        let host = HostInfo::default();
        assert!(seal(dir.path(), Manifest::new(host, ContainerIdentity::default())).is_err());
        assert!(!is_complete(dir.path()));
    }

    #[test]
    fn bundle_dir_follows_the_layout_and_refuses_path_tricks() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let d = bundle_dir(Path::new("/r"), "k8s.io", "pod", "app", at).unwrap();
        assert_eq!(d, Path::new("/r/k8s.io/pod/app/2023-11-14T22:13:20.123Z"));
        assert!(bundle_dir(Path::new("/r"), "..", "pod", "app", at).is_err());
        assert!(bundle_dir(Path::new("/r"), "ns", "a/b", "app", at).is_err());
    }

    #[test]
    fn a_partial_bundle_is_refused_unless_asked_for_and_verifies_as_far_as_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(CHECKPOINT_DIR)).unwrap();
        fs::write(dir.path().join(CHECKPOINT_DIR).join("pages-1.img"), vec![5u8; 4096]).unwrap();
        mark_in_progress(dir.path()).unwrap();
        let id = ContainerIdentity { name: "c".into(), id: "c".into(), ..Default::default() };
        let key = SigningKey::generate().unwrap();
        let manifest = Manifest::new(HostInfo::default(), id);
        mark_partial(dir.path(), manifest, "writing rootfs-diff.tar: disk full", Some(&key)).unwrap();
        let trusted = TrustedKeys::default().with(key.trusted());
        assert_eq!(verify_partial(dir.path(), Some(&trusted)).unwrap().1, "writing rootfs-diff.tar: disk full");
        let stranger = TrustedKeys::default().with(SigningKey::generate().unwrap().trusted());
        let err = verify_partial(dir.path(), Some(&stranger)).unwrap_err().to_string();
        assert!(err.contains("does not trust"), "{err}");
        assert!(!dir.path().join(IN_PROGRESS_MARKER).exists());
        let err = verify(dir.path()).unwrap_err().to_string();
        assert!(err.contains("partial (writing rootfs-diff.tar: disk full)") && err.contains("allow-partial"), "{err}");
        let (manifest, missing, _) = verify_partial(dir.path(), None).unwrap();
        assert_eq!(missing, "writing rootfs-diff.tar: disk full");
        assert_eq!(manifest.files.keys().collect::<Vec<_>>(), ["checkpoint/pages-1.img"]);
        fs::write(dir.path().join(CHECKPOINT_DIR).join("pages-1.img"), vec![6u8; 4096]).unwrap();
        assert!(verify_partial(dir.path(), None).unwrap_err().to_string().contains("does not match its sha256"));
        // without a manifest (the disk was full) the reason stays, but nothing can be verified
        fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
        write_durably(dir.path(), PARTIAL_MARKER, b"disk full\n").unwrap();
        assert!(verify_partial(dir.path(), None)
            .unwrap_err()
            .to_string()
            .contains("no manifest to verify it by (disk full)"));
    }

    #[test]
    fn the_sweep_marks_checkpoints_whose_writer_died_and_leaves_live_ones() {
        let root = tempfile::tempdir().unwrap();
        let live = root.path().join("ns/pod/c/t1");
        let dead = root.path().join("ns/pod/c/t2");
        let sealed = root.path().join("ns/pod/d/t1");
        for d in [&live, &dead, &sealed] {
            fs::create_dir_all(d.join(CHECKPOINT_DIR)).unwrap();
            fs::write(d.join(CHECKPOINT_DIR).join("inventory.img"), b"inv").unwrap();
        }
        mark_in_progress(&live).unwrap();
        // a writer whose pid exists no more (or was reused: the start time differs)
        write_durably(&dead, IN_PROGRESS_MARKER, b"pid 4194304 started 1\n").unwrap();
        seal(&sealed, Manifest::new(HostInfo::default(), ContainerIdentity::default())).unwrap();
        assert_eq!(sweep_interrupted(root.path(), 4), vec![dead.clone()]);
        let why = fs::read_to_string(dead.join(FAILED_MARKER)).unwrap();
        assert!(why.starts_with("interrupted: its writer (pid 4194304 started 1) stopped"), "{why}");
        assert!(dead.join(CHECKPOINT_DIR).join("inventory.img").is_file(), "the sweep deletes nothing");
        assert!(live.join(IN_PROGRESS_MARKER).is_file() && !live.join(FAILED_MARKER).exists());
        verify(&sealed).unwrap();
    }

    #[test]
    fn retention_keeps_the_newest_sealed_bundles_and_drops_old_failures() {
        let root = tempfile::tempdir().unwrap();
        let at = |t: &str| root.path().join(format!("2026-12-02T0{t}:00:00.000Z"));
        for t in ["1", "2", "3", "4"] {
            fs::create_dir_all(at(t)).unwrap();
            fs::write(at(t).join(SPEC_DUMP), t).unwrap();
            seal(&at(t), Manifest::new(HostInfo::default(), ContainerIdentity::default())).unwrap();
        }
        mark_failed(&at("5"), "dump failed").unwrap();
        fs::create_dir_all(at("6")).unwrap();
        write_durably(&at("6"), PARTIAL_MARKER, b"disk full\n").unwrap();
        assert_eq!(prune(root.path(), 2, std::time::Duration::from_secs(3600)), vec![at("1"), at("2")]);
        assert_eq!(prune(root.path(), 2, std::time::Duration::ZERO), vec![at("5")], "an expired failure goes");
        assert!(at("3").is_dir() && at("4").is_dir() && at("6").is_dir(), "the newest two and the partial stay");
    }
}
