//! Restore of a runc container from a bundle: open and verify it and check this node before anything
//! is created ([`open_container_bundle`]), re-apply its writable layer onto the new rootfs, then
//! `runc restore` and the GPU state ([`restore_container_bundle`]).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::criu_config;
use super::mounts::MappedMount;
use super::restore_gate::{GateOutcome, RestoreGate};
use crate::bundle::{self, BundleLayout, DeferredHashes, Manifest, MANIFEST_FILE};
use crate::criu::lazy_pages::{LazyPageServer, PageSupply};
use crate::criu::{Criu, Feature};
use crate::error::{Error, GpuStep, Result};
use crate::gpu::{gpu_error, GpuContext, GpuMatch, GpuRestorePlan};
use crate::options::{CriuFlags, RestoreOptions};
use crate::report::RestoreReport;
use crate::rootfs;
use crate::runc::{restore_container, ChildStdio, ContainerRestore, Runc};
use crate::tenant::{Access, Tenant, TenantPolicy};
use crate::trust::{Provenance, TrustedKeys};

/// How [`open_container_bundle`] treats what it opens.
pub struct OpenOptions<'a> {
    /// Accept a CRIU image directory without Kybernate's manifest, as another shim writes a containerd
    /// task checkpoint: it is restored unverified, with a warning, with CRIU's default flags. Bundles
    /// named by a user (`kybernate.io/restore-from`) are never opened so.
    pub accept_unsealed: bool,
    /// Accept a `PARTIAL` bundle (`kybernate.io/restore-policy: allow-partial`): its memory is
    /// complete, verified against the manifest the marker binds; its writable layer is re-applied as
    /// far as it was captured.
    pub accept_partial: bool,
    /// This node's GPU context, asked for only when the bundle holds GPU state; its error says why the
    /// node's GPUs cannot be listed.
    pub gpu: &'a dyn Fn() -> std::result::Result<Arc<GpuContext>, String>,
    /// How closely this node's GPUs must match the checkpoint's.
    pub gpu_match: GpuMatch,
    /// The keys whose signatures this node accepts; the manifest's signature is checked first, before
    /// anything else of the bundle is read.
    pub trust: &'a TrustedKeys,
    /// The tenant check, when the restore is done for a tenant: the bundle's recorded tenant must be
    /// the target's, or the policy must grant the pair.
    pub tenant: Option<TenantCheck<'a>>,
    /// Restore lazily where this node and the bundle allow it (see [`RestorableBundle::lazy`]): the
    /// kernel has non-cooperative userfaultfd and the bundle holds no GPU state. Otherwise, or when
    /// `false`, the restore is full, and the reason is logged.
    pub lazy: bool,
    /// For a full restore of a sealed bundle, hash its page images while CRIU restores them and hold
    /// the restored tasks before they resume until every one matches ([`super::restore_gate`]),
    /// instead of hashing them before CRIU starts. A mismatch then fails the Start rather than the
    /// open. The restore needs a gate program ([`RestoreTarget::gate_program`]); without one the
    /// page images are hashed when [`restore_container_bundle`] begins.
    pub hold: bool,
}

/// Who a bundle is restored for (see [`crate::tenant`]).
#[derive(Debug, Clone, Copy)]
pub struct TenantCheck<'a> {
    /// The node's grants.
    pub policy: &'a TenantPolicy,
    /// The tenant of the container being restored.
    pub target: &'a Tenant,
    /// The reference the bundle was named by (what a grant may be bound to).
    pub reference: &'a str,
    /// The grant token the restore carries (`kybernate.io/restore-grant`), if any.
    pub grant: Option<&'a str>,
}

/// A bundle that was verified and checked against this node, ready to be restored.
#[derive(Debug)]
pub struct RestorableBundle {
    /// The bundle directory.
    pub dir: PathBuf,
    /// Where its images are.
    pub layout: BundleLayout,
    /// Its manifest (every hash verified); `None` for an unsealed image accepted with
    /// [`OpenOptions::accept_unsealed`].
    pub manifest: Option<Manifest>,
    /// The CRIU flags of the dump, which the restore repeats (CRIU's defaults without a manifest).
    pub flags: CriuFlags,
    /// The GPU state to restore after the processes, checked against this node's GPUs.
    pub gpu: Option<GpuRestorePlan>,
    /// What is missing from a `PARTIAL` bundle opened with [`OpenOptions::accept_partial`].
    pub partial: Option<String>,
    /// Who signed it.
    pub provenance: Provenance,
    /// `Some` when it is restored lazily: the hashes of its page images, which were checked for
    /// their size only, are checked while the page server reads them (a mismatch kills the
    /// container); everything else was verified before anything reached CRIU.
    pub lazy: Option<DeferredHashes>,
    /// `Some` when it is restored fully with its page images' hashes (checked for their size only)
    /// checked while CRIU restores them, the restored tasks held until they match
    /// ([`OpenOptions::hold`]).
    pub held: Option<DeferredHashes>,
    /// Where a lazy restore's pages come from when the page images are still arriving
    /// ([`RestorableBundle::feed_pages`]); the images themselves otherwise.
    feed: Mutex<Option<PageFeed>>,
}

/// The pages of a bundle that are still arriving, for a remote lazy restore: a page server on the
/// other end of `socket` (see [`crate::criu::page_server`]) serves the lazy-pages daemon while it
/// writes the rest of the page images, and `finished` waits until it has written them all.
pub struct PageFeed {
    /// Connected to the page server.
    pub socket: OwnedFd,
    /// Waits until every page image is complete on disk; the page server's error otherwise.
    pub finished: Box<dyn FnOnce() -> Result<()> + Send>,
}

impl std::fmt::Debug for PageFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageFeed").field("socket", &self.socket).finish_non_exhaustive()
    }
}

impl RestorableBundle {
    /// Has the lazy restore of this bundle take its pages from `feed` instead of the page images,
    /// which are still being written; their deferred hashes are checked once `feed` says they are
    /// complete. Only for a bundle opened for a lazy restore: one restored fully needs its images
    /// complete and verified before it is opened.
    pub fn feed_pages(&self, feed: PageFeed) -> Result<()> {
        if self.lazy.is_none() {
            return Err(Error::InvalidOptions(format!(
                "bundle {} is restored fully, so its page images must be complete before it is opened, not fed while it runs",
                self.dir.display()
            )));
        }
        *self.feed.lock().unwrap_or_else(|p| p.into_inner()) = Some(feed);
        Ok(())
    }

    /// The CRIU images.
    pub fn image_dir(&self) -> PathBuf {
        self.layout.image_dir(&self.dir)
    }

    /// Re-applies the bundle's writable layer (`rootfs-diff.tar`, `deleted.files`) onto the new
    /// container's rootfs, which must not be running yet; `false` when the bundle carries none.
    /// For a partial bundle, a layer that cannot be applied to its end is logged and left as far as it
    /// got.
    pub fn apply_writable_layer(&self, rootfs: &Path) -> Result<bool> {
        if !rootfs::has_rootfs_diff(&self.dir) {
            return Ok(false);
        }
        let setid = self.manifest.as_ref().map(|m| m.setid_files.clone()).unwrap_or_default();
        match (rootfs::apply_rootfs_diff(&self.dir, rootfs, &setid), &self.partial) {
            (Ok(()), _) => Ok(true),
            (Err(e), Some(missing)) => {
                tracing::warn!(bundle = %self.dir.display(), error = %e, %missing, "the partial bundle's writable layer was applied as far as it was captured");
                Ok(false)
            }
            (Err(e), None) => Err(e),
        }
    }
}

impl RestorableBundle {
    /// Fits the new container's spec (`oci_bundle/config.json`, its rootfs at `rootfs` with the
    /// writable layer applied) to the checkpoint, rewriting it only if something changed:
    /// - the mounts the checkpointed container had and it lacks: a placeholder bound at each such
    ///   bind-mount destination (the sources the checkpoint names are never used) and a read-only
    ///   cgroup mount (see the `mounts` module);
    /// - for a checkpoint without a Kybernate manifest (another engine's, restored under
    ///   `allow_unsigned`), CRIU's check of the modes of the files it reopens is skipped: engines make
    ///   the rootfs differently (Podman's root directory is 0555, containerd's 0755). A spec that
    ///   names its own CRIU config (`org.criu.config`) keeps it.
    ///
    /// Returns the placeholders bound.
    pub fn fit_spec(&self, oci_bundle: &Path, rootfs: &Path) -> Result<Vec<MappedMount>> {
        let path = oci_bundle.join("config.json");
        let mut config = super::mounts::read_json(&path)?;
        let before = config.clone();
        let mapped = super::mounts::add_expected_mounts(&self.dir, &mut config, oci_bundle, rootfs)?;
        if self.manifest.is_none() && criu_config::named(&config).is_none() {
            let conf = oci_bundle.join(FOREIGN_CRIU_CONFIG);
            std::fs::write(&conf, "skip-file-rwx-check\n")
                .map_err(|e| Error::io(format!("writing {}", conf.display()), e))?;
            criu_config::point_at(&mut config, &path, &conf)?;
        }
        if config != before {
            super::mounts::write_spec(oci_bundle, &config)?;
        }
        Ok(mapped)
    }
}

/// The CRIU configuration [`RestorableBundle::fit_spec`] writes into the OCI bundle for a
/// checkpoint another engine wrote.
pub const FOREIGN_CRIU_CONFIG: &str = "kybernate-criu.conf";

/// Opens the bundle `dir` for a restore on this node: sealed with every hash matching (or an unsealed
/// image, when `opts` accepts one), taken on a compatible node ([`check_host`]), and, when it holds
/// GPU state, restorable onto this node's GPUs by a backend this node has. Changes nothing.
pub fn open_container_bundle(dir: &Path, criu: &Criu, opts: &OpenOptions<'_>) -> Result<RestorableBundle> {
    let refuse = |reason: String| Error::Bundle { path: dir.to_path_buf(), reason };
    if !dir.is_dir() {
        return Err(refuse("the directory does not exist".into()));
    }
    let mut partial = None;
    let lazy = opts.lazy && lazy_supported(criu, dir);
    let mut deferred = None;
    let has_markers = bundle::has_kybernate_files(dir);
    let nested = dir.join(bundle::CHECKPOINT_DIR);
    let (manifest, provenance) = if !has_markers && nested.join(MANIFEST_FILE).exists() {
        // A KEP-2008 archive a CRI built around a Kybernate task image (containerd 2.x's
        // CheckpointContainer): the images and their signed manifest are in checkpoint/; the CRI's
        // files beside them (config.dump, spec.dump, the writable layer) are not covered by it.
        let (manifest, provenance) = bundle::verify_trusted(&nested, opts.trust)?;
        tracing::warn!(archive = %dir.display(), "restoring a CRI checkpoint archive: its images are signed, its writable layer and metadata are not (set-id bits are cleared)");
        (Some(manifest), provenance)
    } else if !has_markers && (opts.accept_unsealed || is_foreign_archive(dir)) {
        if !opts.trust.allow_unsigned {
            return Err(Error::Refused {
                subject: format!("checkpoint {}", dir.display()),
                reason: "it has no Kybernate manifest (another runtime or shim wrote it: CRI-O, Podman, a CRI around \
                         another shim), so nothing says who wrote it or that it is intact; checkpoint with Kybernate, \
                         or set allow_unsigned = true in the shim config to restore such checkpoints unverified"
                    .into(),
            });
        }
        check_foreign(dir)?;
        tracing::warn!(image = %dir.display(), "checkpoint has no Kybernate manifest; restoring it unverified (allow_unsigned)");
        (None, Provenance::Unsigned)
    } else {
        let (manifest, provenance) = if opts.accept_partial && dir.join(bundle::PARTIAL_MARKER).exists() {
            let (manifest, missing, provenance) = bundle::verify_partial(dir, Some(opts.trust))?;
            tracing::warn!(bundle = %dir.display(), %missing, "restoring a partial checkpoint (allow-partial)");
            partial = Some(missing);
            (manifest, provenance.unwrap_or(Provenance::Unsigned))
        } else if lazy || opts.hold {
            let (manifest, provenance, pages) = bundle::verify_trusted_deferring_pages(dir, opts.trust)?;
            deferred = Some(pages);
            (manifest, provenance)
        } else {
            bundle::verify_trusted(dir, opts.trust)?
        };
        (Some(manifest), provenance)
    };
    if let Some(manifest) = &manifest {
        if let Some(check) = &opts.tenant {
            let from = Tenant::of(&manifest.container);
            let access = check.policy.check(&from, check.target, check.reference, check.grant)?;
            if access != Access::Own {
                tracing::info!(bundle = %dir.display(), %from, to = %check.target, ?access, "restoring another tenant's bundle, as granted");
            }
        }
        check_host(dir, manifest, criu)?;
    }
    let layout = BundleLayout::detect(dir).ok_or_else(|| {
        refuse(format!(
            "{} is missing: this is not a CRIU checkpoint image (neither {}/ nor the directory itself holds one)",
            bundle::INVENTORY_IMAGE,
            bundle::CHECKPOINT_DIR
        ))
    })?;
    let gpu = match manifest.as_ref().and_then(|m| m.gpu.as_ref()) {
        None => None,
        Some(section) => {
            let context = (opts.gpu)().map_err(|e| {
                gpu_error(
                    GpuStep::Compatibility,
                    format!("bundle {} holds GPU state, but this node's GPUs cannot be listed: {e}", dir.display()),
                    "nothing was restored".into(),
                )
            })?;
            Some(GpuRestorePlan::check(section, context, opts.gpu_match)?)
        }
    };
    // Images of other shims carry no flags: CRIU's defaults, as runc's restore assumes.
    let flags = manifest.as_ref().and_then(|m| m.criu_flags.clone()).unwrap_or_default();
    let lazy = match (lazy, &gpu) {
        (true, Some(_)) => {
            tracing::info!(bundle = %dir.display(), "restoring fully, not lazily: the bundle holds GPU state, which the CUDA driver restores from the whole of host memory");
            None
        }
        (true, None) => Some(deferred.take().unwrap_or_default()),
        (false, _) => None,
    };
    let held = if opts.hold { deferred.take() } else { None };
    if let Some(pages) = deferred {
        pages.verify()?;
    }
    Ok(RestorableBundle {
        dir: dir.to_path_buf(),
        layout,
        manifest,
        flags,
        gpu,
        partial,
        provenance,
        lazy,
        held,
        feed: Mutex::new(None),
    })
}

/// Whether a lazy restore of `dir` is possible on this node: CRIU finds non-cooperative
/// userfaultfd in the kernel. The reason is logged when it is not.
fn lazy_supported(criu: &Criu, dir: &Path) -> bool {
    match criu.has_feature(Feature::LazyPages) {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(bundle = %dir.display(), reason = Feature::LazyPages.missing_explanation(), "restoring fully, not lazily");
            false
        }
        Err(e) => {
            tracing::warn!(bundle = %dir.display(), error = %e, "restoring fully, not lazily: CRIU's features could not be checked");
            false
        }
    }
}

/// Whether `dir` is a KEP-2008 checkpoint archive (unpacked) that Kybernate did not write: CRIU's
/// images in `checkpoint/` beside `config.dump` and `spec.dump`, as kubelet's CRI, CRI-O and Podman
/// export them.
fn is_foreign_archive(dir: &Path) -> bool {
    [bundle::CONFIG_DUMP, bundle::SPEC_DUMP].iter().all(|f| dir.join(f).is_file())
        && dir.join(bundle::CHECKPOINT_DIR).join(bundle::INVENTORY_IMAGE).is_file()
}

/// What can be checked of a checkpoint without a manifest: CRIU's inventory is there, and when it is
/// a KEP-2008 archive, its `config.dump` and `spec.dump` are JSON objects; links and special files
/// are refused.
fn check_foreign(dir: &Path) -> Result<()> {
    let refuse = |reason: String| Error::Bundle { path: dir.to_path_buf(), reason };
    for file in [bundle::CONFIG_DUMP, bundle::SPEC_DUMP] {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        let text = std::fs::read(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        match serde_json::from_slice::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(_)) => {}
            _ => return Err(refuse(format!("{file} is not a JSON object: this is not a checkpoint archive"))),
        }
    }
    bundle::list_files(dir).map(drop)
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

/// The container a bundle is restored into.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    /// Id the restored container gets (need not be the checkpointed one's).
    pub id: String,
    /// OCI bundle (config.json and rootfs) of the new container.
    pub bundle: PathBuf,
    /// CRIU's work directory (its logs); the image directory when `None`.
    pub work_dir: Option<PathBuf>,
    /// How long `runc restore` may take.
    pub timeout: Option<Duration>,
    /// Where runc writes the pid of the restored init process (a file in the work dir by default).
    pub pid_file: Option<PathBuf>,
    /// Socket that receives the pty master, for containers with a terminal.
    pub console_socket: Option<PathBuf>,
    /// Do not use pivot_root (rootfs on a ramdisk).
    pub no_pivot: bool,
    /// The program CRIU runs as its action script to hold a restore whose page images are still
    /// being hashed ([`RestorableBundle::held`]): a binary that calls
    /// [`super::restore_gate::action_script_main`] first thing. Without one they are hashed before
    /// `runc restore` starts.
    pub gate_program: Option<PathBuf>,
}

/// A restored container.
#[derive(Debug)]
pub struct Restored {
    /// How the restore went.
    pub report: RestoreReport,
    /// The background fill of a lazy restore; `None` for a full one.
    pub fill: Option<LazyFill>,
}

/// The rest of a lazy restore, after the container runs: CRIU's page server copies the remaining
/// pages in while the page images' deferred hashes are checked. If the server dies early or a hash
/// does not match, the container is killed (`runc kill --all … KILL`), so it never runs on with
/// pages missing or pages it should not have.
#[derive(Debug)]
pub struct LazyFill {
    daemon: u32,
    done: std::thread::JoinHandle<Result<()>>,
}

impl LazyFill {
    /// The page server's pid.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon
    }

    /// Waits for the end of the fill: `Ok` once every page is in and verified; the error that
    /// got the container killed otherwise.
    pub fn wait(self) -> Result<()> {
        self.done.join().unwrap_or_else(|_| {
            Err(Error::io("watching a lazy restore", std::io::Error::other("the supervisor panicked")))
        })
    }
}

/// Watches the fill of a lazy restore of container `id` (see [`LazyFill`]). With a page feed, the
/// page images are hashed once the feed has written them all; else while the daemon reads them.
fn supervise_fill(
    runc: &Runc,
    id: &str,
    server: LazyPageServer,
    pages: DeferredHashes,
    feed: Option<Box<dyn FnOnce() -> Result<()> + Send>>,
) -> Result<LazyFill> {
    let daemon = server.pid();
    let (runc, id) = (runc.clone(), id.to_string());
    let done = std::thread::Builder::new()
        .name("lazy-fill".into())
        .spawn(move || {
            let (started, page_bytes) = (std::time::Instant::now(), pages.bytes());
            let result = match feed {
                None => {
                    // The daemon copies pages in on its own; the page images are hashed meanwhile.
                    let verified = pages.verify();
                    if verified.is_err() {
                        server.kill();
                    }
                    verified.and(server.wait())
                }
                Some(finished) => server.wait().and_then(|()| finished()).and_then(|()| pages.verify()),
            };
            match &result {
                Ok(()) => tracing::info!(%id, fill_ms = started.elapsed().as_millis() as u64, page_bytes, "lazy restore: every page is in and verified"),
                Err(e) => {
                    let killed = match runc.kill(&id, libc::SIGKILL as u32, true) {
                        Ok(()) => "it was killed".to_string(),
                        Err(kill) => format!("killing it failed: {kill}"),
                    };
                    tracing::error!(%id, error = %e, "lazy restore failed after the container started; {killed}");
                }
            }
            result
        })
        .map_err(|e| Error::io("starting the lazy-restore supervisor", e))?;
    Ok(LazyFill { daemon, done })
}

/// What a gated restore ([`RestorableBundle::held`]) comes to once runc returned with `restored`:
/// the restore when every page image matched; the mismatch otherwise, with the container removed if
/// CRIU let it run without asking the gate.
fn through_gate(
    runc: &Runc,
    req: &ContainerRestore,
    gate: RestoreGate,
    restored: Result<RestoreReport>,
) -> Result<RestoreReport> {
    let with = |error: Error, what: String| match error {
        Error::Bundle { path, reason } => Error::Bundle { path, reason: format!("{reason}; {what}") },
        other => other,
    };
    match (gate.finish(), restored) {
        (GateOutcome::Verified { asked }, Ok(report)) => {
            if asked {
                tracing::info!(id = %req.id, "page images verified while CRIU restored them");
            } else {
                tracing::warn!(id = %req.id, "page images verified, but CRIU did not run the restore gate before the tasks resumed: its post-restore action script was not run (a CRIU that ignores action-script in its configuration under runc)");
            }
            Ok(report)
        }
        (GateOutcome::Verified { .. }, Err(e)) => Err(e),
        (GateOutcome::Refused { error, asked: true }, _) => Err(with(
            error,
            "CRIU restored the processes but held them before they ran, and the restore was aborted".into(),
        )),
        (GateOutcome::Refused { error, asked: false }, Ok(_)) => {
            let removed = runc.remove_failed(&req.id);
            Err(with(
                error,
                format!(
                    "CRIU did not hold the restored processes at the gate, so the container was removed ({removed})"
                ),
            ))
        }
        (GateOutcome::Refused { error, asked: false }, Err(_)) => Err(error),
    }
}

/// Restores `bundle` (opened with [`open_container_bundle`], its writable layer applied) into
/// `target`: `runc restore --detach` with the dump's CRIU flags and the given stdio, then — when the
/// bundle holds GPU state — the GPU restore and unlock of each GPU process (see
/// [`GpuRestorePlan::restore`]). Returns once the container runs. A bundle opened for a lazy
/// restore is restored with CRIU's lazy-pages daemon serving its memory, and its fill is watched
/// in the background ([`Restored::fill`]).
///
/// On failure nothing is left running: a half-restored container is deleted (runc's, or ours when the
/// GPU state could not be restored), and the bundle is untouched for another try.
pub fn restore_container_bundle(
    runc: &Runc,
    criu: &Criu,
    bundle: &RestorableBundle,
    target: &RestoreTarget,
    stdio: ChildStdio,
) -> Result<Restored> {
    let image_dir = bundle.image_dir();
    let gate = match (&bundle.held, &target.gate_program) {
        (Some(pages), Some(program)) => {
            let work_dir = crate::fsutil::work_dir_or(&target.work_dir, &image_dir);
            Some(RestoreGate::arm(&target.bundle, &work_dir, program, pages.clone())?)
        }
        (Some(pages), None) => {
            pages.verify()?;
            None
        }
        (None, _) => None,
    };
    let req = ContainerRestore {
        id: target.id.clone(),
        bundle: target.bundle.clone(),
        image_dir,
        options: RestoreOptions {
            work_dir: target.work_dir.clone(),
            timeout: target.timeout,
            flags: bundle.flags.clone(),
        },
        pid_file: target.pid_file.clone(),
        console_socket: target.console_socket.clone(),
        no_pivot: target.no_pivot,
        lazy_pages: bundle.lazy.is_some(),
        env: gate.iter().map(RestoreGate::env).collect(),
    };
    let feed = bundle.feed.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (server, finished) = match (&bundle.lazy, feed) {
        (Some(_), feed) => {
            let work_dir = target.work_dir.clone().unwrap_or_else(|| req.image_dir.clone());
            let (supply, finished) = match feed {
                Some(PageFeed { socket, finished }) => (PageSupply::Server(socket), Some(finished)),
                None => (PageSupply::Images, None),
            };
            (Some(LazyPageServer::start(criu, &req.image_dir, &work_dir, supply)?), finished)
        }
        (None, _) => (None, None),
    };
    let restored = restore_container(runc, criu, &req, stdio);
    let restored = match gate {
        Some(gate) => through_gate(runc, &req, gate, restored),
        None => restored,
    };
    let report = match restored {
        Ok(report) => report,
        Err(e) => {
            if let Some(server) = server {
                server.kill();
                let _ = server.wait();
            }
            return Err(e);
        }
    };
    let fill = match (server, &bundle.lazy) {
        (Some(server), Some(pages)) => Some(supervise_fill(runc, &req.id, server, pages.clone(), finished)?),
        _ => None,
    };
    if let Some(gpu) = &bundle.gpu {
        let id = req.id.as_str();
        let take_down = || {
            format!(
                "the restored container {id} was taken down ({}); the checkpoint in {} is untouched for another try",
                runc.remove_failed(id),
                req.image_dir.display()
            )
        };
        let pids = runc.ps(id).map_err(|e| gpu_error(GpuStep::Restore, e.to_string(), take_down()))?;
        gpu.restore(id, &pids, &take_down)?;
    }
    Ok(Restored { report, fill })
}
