//! Create: mount the rootfs, set up stdio, and either `runc create` the container or, when the request
//! carries a checkpoint, open and check it (one checkpoint-core call), re-apply its writable layer
//! and fit the new spec to it (two more), and leave
//! `runc restore` to Start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use checkpoint_core::{Criu, RestorableBundle, Runc, SpawnOpts};
use containerd_shim::util::{read_pid_from_file, write_options};

use super::pod_checkpoint::PodCheckpoints;
use super::restore_from;
use super::state::{Container, CreateFlags, Lifecycle};
use crate::config::{CheckpointMode, ShimConfig};
use crate::error::{Result, ShimError};
use crate::events::{Events, TaskEvent};
use crate::io::{ConsoleSocket, IoOwner, ProcessIo};
use crate::mount::{mount_rootfs, unmount_all, MountSpec};
use crate::process::Process;
use crate::reaper::Reaper;
use crate::runc::{criu_for, runc_for};
use crate::spec::SpecInfo;
use crate::task::{CreateRequest, TaskStatus};

/// File runc writes the init pid to.
pub const INIT_PID_FILE: &str = "init.pid";
/// How long runc may take to send a terminal.
pub const CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The shim-wide things a Create needs.
pub struct CreateContext<'a> {
    /// containerd namespace of this shim.
    pub namespace: &'a str,
    /// The reaper.
    pub reaper: &'a Arc<Reaper>,
    /// The event sink.
    pub events: &'a Events,
    /// The shim's pod checkpoints.
    pub pod_checkpoints: &'a Arc<PodCheckpoints>,
}

/// Undoes a partial Create unless disarmed.
struct Cleanup<'a> {
    rootfs: Option<PathBuf>,
    runc: Option<(&'a Runc, &'a str)>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some((runc, id)) = self.runc.take() {
            if let Err(e) = runc.delete(id, true) {
                tracing::warn!(id, error = %e, "removing the half-created container");
            }
        }
        if let Some(rootfs) = self.rootfs.take() {
            if let Err(e) = unmount_all(&rootfs) {
                tracing::warn!(rootfs = %rootfs.display(), error = %e, "unmounting after a failed create");
            }
        }
    }
}

/// What Create decided before changing anything: settings, and the checked checkpoint.
pub struct Prepared {
    config: ShimConfig,
    flags: CreateFlags,
    spec: SpecInfo,
    runc: Runc,
    criu: Criu,
    restore: Option<RestorableBundle>,
    checkpoint_on_stop: Option<CheckpointMode>,
}

/// The side-effect-free part of Create (it may take a while: a checkpoint is hashed). Reads the
/// configuration and spec; a checkpoint is opened and checked against this node here.
pub fn prepare(ctx: &CreateContext<'_>, req: &CreateRequest) -> Result<Prepared> {
    if req.id.is_empty() {
        return Err(ShimError::InvalidArgument("the container id is empty".into()));
    }
    if !req.bundle.join("config.json").is_file() {
        return Err(ShimError::InvalidArgument(format!(
            "{} is not an OCI bundle (no config.json)",
            req.bundle.display()
        )));
    }
    let config = req.options.config()?;
    let runc_opts = req.options.runc.clone().unwrap_or_default();
    let flags = CreateFlags {
        no_pivot: runc_opts.no_pivot_root,
        no_new_keyring: runc_opts.no_new_keyring,
        io_uid: runc_opts.io_uid,
        io_gid: runc_opts.io_gid,
        criu_work_path: (!runc_opts.criu_work_path.is_empty()).then(|| PathBuf::from(&runc_opts.criu_work_path)),
    };
    let spec = SpecInfo::load(&req.bundle)?;
    let runc = runc_for(&config, ctx.namespace, &req.bundle, ctx.reaper);
    let criu = criu_for(&config, ctx.reaper);
    let checkpoint_on_stop = crate::annotations::on_stop(&spec, &config)?;
    // A checkpoint named by containerd (`ctr c restore`) wins over one named by annotation.
    let restore = match req.checkpoint.as_str() {
        "" => restore_from::resolve(&spec, &req.id, ctx.namespace, &config, &criu, ctx.reaper)?,
        dir => {
            let restoring = restore_from::Restoring::new(&spec, ctx.namespace, dir, &config)?;
            Some(open_task_checkpoint(Path::new(dir), &req.parent_checkpoint, &config, &criu, &restoring)?)
        }
    };
    Ok(Prepared { config, flags, spec, runc, criu, restore, checkpoint_on_stop })
}

/// Opens a checkpoint containerd hands over (`ctr c restore`): signed by a trusted key, of the
/// restoring container's tenant, and verified, like any bundle; an image of another shim (no
/// manifest) only with `allow_unsigned`.
fn open_task_checkpoint(
    dir: &Path,
    parent: &str,
    config: &ShimConfig,
    criu: &Criu,
    restoring: &restore_from::Restoring<'_>,
) -> Result<RestorableBundle> {
    let refuse =
        |why: String| ShimError::InvalidArgument(format!("checkpoint {} cannot be restored: {why}", dir.display()));
    if !parent.is_empty() {
        return Err(refuse(format!(
            "it names parent checkpoint {parent}; incremental restores are not supported, restore a full checkpoint"
        )));
    }
    restore_from::open(dir, config, criu, true, false, restoring).map_err(|e| match e {
        ShimError::Core(e @ (checkpoint_core::Error::Bundle { .. } | checkpoint_core::Error::BadImage { .. })) => {
            refuse(e.to_string())
        }
        e => e,
    })
}

/// Creates the container of `req` as [`prepare`]d; on error nothing is left behind (no runc
/// container, no mounts).
pub fn create(ctx: &CreateContext<'_>, req: &CreateRequest, prepared: Prepared) -> Result<Arc<Container>> {
    let Prepared { config, flags, spec, runc, criu, restore, checkpoint_on_stop } = prepared;
    let bundle = req.bundle.clone();
    save_runc_options(&config, &bundle)?;

    let mut cleanup = Cleanup { rootfs: None, runc: None };
    let rootfs = if req.rootfs.is_empty() {
        None
    } else {
        let target = bundle.join("rootfs");
        mount_rootfs(&req.rootfs, &target)?;
        cleanup.rootfs = Some(target.clone());
        Some(target)
    };
    if let Some(opened) = &restore {
        let root = rootfs.clone().unwrap_or_else(|| bundle.join(&spec.root));
        opened.apply_writable_layer(&root).map_err(|e| {
            ShimError::FailedPrecondition(format!(
                "re-applying the writable layer of {} onto {}: {e}",
                opened.dir.display(),
                root.display()
            ))
        })?;
        opened.fit_spec(&bundle, &root).map_err(|e| {
            ShimError::FailedPrecondition(format!(
                "fitting the spec in {1} to the checkpoint in {0}: {e}",
                opened.dir.display(),
                bundle.display()
            ))
        })?;
    }

    let owner = IoOwner { namespace: ctx.namespace, container_id: &req.id, exec_id: "", reaper: ctx.reaper };
    let io = Arc::new(ProcessIo::new(&owner, &req.stdio, flags.io_uid, flags.io_gid)?);
    let mut init = Process::new("", req.stdio.clone(), None);
    init.io = Some(Arc::clone(&io));

    let fresh = restore.is_none();
    let now = SystemTime::now();
    let created = restore
        .as_ref()
        .and_then(|b| b.manifest.as_ref()?.container.created.clone())
        .unwrap_or_else(|| humantime::format_rfc3339_millis(now).to_string());
    let fetched = restore.as_ref().map(|b| b.dir.clone()).filter(|dir| dir.starts_with(&config.restore_dir));
    let container = Container {
        id: req.id.clone(),
        bundle: bundle.clone(),
        namespace: ctx.namespace.to_string(),
        runc: runc.clone(),
        criu,
        reaper: Arc::clone(ctx.reaper),
        config,
        flags,
        spec,
        rootfs,
        upperdir: overlay_upperdir(&req.rootfs),
        checkpoint_on_stop,
        pod_checkpoints: Arc::clone(ctx.pod_checkpoints),
        events: Arc::clone(ctx.events),
        restore: Mutex::new(restore.map(Arc::new)),
        fetched,
        stop_status: Mutex::new(None),
        created,
        restored_at: (!fresh).then_some(now),
        lifecycle: Lifecycle::new(init),
    };

    if fresh {
        // The init process must be watched before the guard ends, or its exit could be missed.
        let guard = ctx.reaper.guard();
        let console = if req.stdio.terminal { Some(ConsoleSocket::new()?) } else { None };
        let pid_file = bundle.join(INIT_PID_FILE);
        let spawn = SpawnOpts {
            pid_file: &pid_file,
            console_socket: console.as_ref().map(ConsoleSocket::path),
            no_pivot: container.flags.no_pivot,
            no_new_keyring: container.flags.no_new_keyring,
        };
        // A failed `runc create` may leave runc state behind; remove it like a later failure.
        cleanup.runc = Some((&runc, &req.id));
        runc.create(&req.id, &bundle, &spawn, io.take_child_stdio())?;
        if let Some(console) = &console {
            io.attach_console(&req.id, console.receive_master(CONSOLE_TIMEOUT)?)?;
        }
        let pid = read_pid(&pid_file)?;
        {
            let mut procs = container.procs();
            procs.init.pid = pid;
            procs.init.status = TaskStatus::Created;
            ctx.reaper.watch(pid);
        }
        drop(guard);
        if let Err(e) = crate::oom::watch(&req.id, pid, Arc::clone(ctx.events)) {
            tracing::warn!(id = %req.id, error = %e, "OOM events will not be reported");
        }
    }

    container.events.send(TaskEvent::Create {
        container_id: req.id.clone(),
        bundle: container.bundle_str(),
        rootfs: req.rootfs.clone(),
        stdio: req.stdio.clone(),
        checkpoint: req.checkpoint.clone(),
        pid: container.pid(),
    });
    cleanup.runc = None;
    cleanup.rootfs = None;
    tracing::info!(id = %req.id, pid = container.pid(), restore = !fresh, "container created");
    Ok(Arc::new(container))
}

/// Saves the runc settings in the bundle (containerd-shim's `options.json`), so that `shim delete`,
/// run by containerd in a fresh process after a shim died, cleans up with the same runc and root.
fn save_runc_options(config: &ShimConfig, bundle: &Path) -> Result<()> {
    let options = containerd_shim::protos::shim::oci::Options {
        binary_name: config.runc_binary.display().to_string(),
        root: config.runc_root.display().to_string(),
        systemd_cgroup: config.systemd_cgroup,
        ..Default::default()
    };
    write_options(&bundle.display().to_string(), &options)
        .map_err(|e| ShimError::Internal(format!("saving the runc options in {}: {e}", bundle.display())))
}

/// Reads a pid file runc wrote (containerd-shim's reader).
pub fn read_pid(path: &Path) -> Result<i32> {
    read_pid_from_file(path).map_err(|e| ShimError::Internal(format!("reading pid file {}: {e}", path.display())))
}

/// The upper (writable) directory of an overlayfs rootfs, from its `upperdir=` mount option.
fn overlay_upperdir(mounts: &[MountSpec]) -> Option<PathBuf> {
    let overlay = mounts.iter().find(|m| m.kind == "overlay")?;
    overlay.options.iter().find_map(|o| o.strip_prefix("upperdir=")).map(PathBuf::from)
}
