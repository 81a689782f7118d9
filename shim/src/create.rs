//! Create: mount the rootfs, set up stdio, and either `runc create` the container or, when the request
//! carries a checkpoint, check the checkpoint image and defer `runc restore` to Start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkpoint_core::Criu;
use containerd_shim::api::{CreateTaskRequest, Status};
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::protobuf::MessageField;

use crate::checkpoint::RestoreSource;
use crate::config::{RuntimeOptions, ShimConfig};
use crate::container::{Container, CreateFlags, Lifecycle, SpecInfo};
use crate::error::{Result, ShimError};
use crate::events::Publisher;
use crate::io::{ConsoleSocket, IoOwner, ProcessIo, StdioPaths};
use crate::mount::{mount_rootfs, unmount_all, MountSpec};
use crate::process::Process;
use crate::reaper::Reaper;
use crate::runc::{RuncCli, SpawnOpts};
use crate::settings::SavedSettings;

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
    pub events: &'a Publisher,
}

/// Undoes a partial Create unless disarmed.
struct Cleanup<'a> {
    rootfs: Option<PathBuf>,
    runc: Option<(&'a RuncCli, &'a str)>,
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
    bundle: PathBuf,
    config: ShimConfig,
    flags: CreateFlags,
    spec: SpecInfo,
    runc: RuncCli,
    criu: Criu,
    restore: Option<RestoreSource>,
    checkpoint_on_stop: bool,
}

/// The side-effect-free part of Create (it may take a while: a checkpoint image is hashed). Decodes
/// the options and reads the configuration and spec; a checkpoint is verified here.
pub fn prepare(ctx: &CreateContext<'_>, req: &CreateTaskRequest) -> Result<Prepared> {
    if req.id.is_empty() {
        return Err(ShimError::InvalidArgument("the container id is empty".into()));
    }
    let bundle = PathBuf::from(&req.bundle);
    if !bundle.join("config.json").is_file() {
        return Err(ShimError::InvalidArgument(format!("{} is not an OCI bundle (no config.json)", bundle.display())));
    }
    let options = RuntimeOptions::decode(req.options.as_ref())?;
    let config = options.config()?;
    let runc_opts = options.runc.clone().unwrap_or_default();
    let flags = CreateFlags {
        no_pivot: runc_opts.no_pivot_root,
        no_new_keyring: runc_opts.no_new_keyring,
        io_uid: runc_opts.io_uid,
        io_gid: runc_opts.io_gid,
        criu_work_path: (!runc_opts.criu_work_path.is_empty()).then(|| PathBuf::from(&runc_opts.criu_work_path)),
    };
    let spec = SpecInfo::load(&bundle)?;
    let runc = RuncCli::new(&config, ctx.namespace, &bundle, Arc::clone(ctx.reaper));
    let criu = config.criu_binary.clone().map(Criu::new).unwrap_or_else(Criu::from_path);
    let checkpoint_on_stop = crate::annotations::checkpoint_on_stop(&spec, &config)?;
    // A checkpoint named by containerd (`ctr c restore`) wins over one named by annotation.
    let restore = match req.checkpoint.as_str() {
        "" => crate::restore_from::resolve(&spec, &req.id, &config, &criu, ctx.reaper)?,
        dir => Some(RestoreSource::inspect(Path::new(dir), &req.parent_checkpoint, &criu, ctx.reaper)?),
    };
    Ok(Prepared { bundle, config, flags, spec, runc, criu, restore, checkpoint_on_stop })
}

/// Creates the container of `req` as [`prepare`]d; on error nothing is left behind (no runc
/// container, no mounts).
pub fn create(ctx: &CreateContext<'_>, req: &CreateTaskRequest, prepared: Prepared) -> Result<Arc<Container>> {
    let Prepared { bundle, config, flags, spec, runc, criu, restore, checkpoint_on_stop } = prepared;
    SavedSettings::from_config(&config, ctx.namespace).save(&bundle)?;

    let mut cleanup = Cleanup { rootfs: None, runc: None };
    let mounts: Vec<MountSpec> = req
        .rootfs
        .iter()
        .map(|m| MountSpec { kind: m.type_.clone(), source: m.source.clone(), options: m.options.clone() })
        .collect();
    let rootfs = if mounts.is_empty() {
        None
    } else {
        let target = bundle.join("rootfs");
        mount_rootfs(&mounts, &target)?;
        cleanup.rootfs = Some(target.clone());
        Some(target)
    };
    if let Some(opened) = restore.as_ref().and_then(|r| r.bundle.as_ref()).filter(|b| b.has_rootfs_diff()) {
        let root = rootfs.clone().unwrap_or_else(|| bundle.join(&spec.root));
        opened.apply_rootfs(&root).map_err(|e| {
            ShimError::FailedPrecondition(format!(
                "re-applying the writable layer of {} onto {}: {e}",
                opened.dir.display(),
                root.display()
            ))
        })?;
    }

    let stdio = StdioPaths {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        terminal: req.terminal,
    };
    let owner = IoOwner { namespace: ctx.namespace, container_id: &req.id, exec_id: "", reaper: ctx.reaper };
    let io = Arc::new(ProcessIo::new(&owner, &stdio, flags.io_uid, flags.io_gid)?);
    let mut init = Process::new("", stdio, None);
    init.io = Some(Arc::clone(&io));

    let container = Container {
        id: req.id.clone(),
        bundle: bundle.clone(),
        namespace: ctx.namespace.to_string(),
        runc: runc.clone(),
        criu,
        config,
        flags,
        spec,
        rootfs,
        upperdir: overlay_upperdir(&mounts),
        checkpoint_on_stop,
        events: ctx.events.clone(),
        restore: Mutex::new(restore),
        stop_status: Mutex::new(None),
        lifecycle: Lifecycle::new(init),
    };

    if container.restore.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
        // The init process must be watched before the guard ends, or its exit could be missed.
        let guard = ctx.reaper.guard();
        let console = if req.terminal { Some(ConsoleSocket::new()?) } else { None };
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
        let pid = read_pid_file(&pid_file)?;
        {
            let mut procs = container.procs();
            procs.init.pid = pid;
            procs.init.status = Status::CREATED;
            ctx.reaper.watch(pid);
        }
        drop(guard);
        if let Err(e) = crate::oom::watch(&req.id, pid, ctx.events.clone()) {
            tracing::warn!(id = %req.id, error = %e, "OOM events will not be reported");
        }
    }

    container.events.publish(TaskCreate {
        container_id: req.id.clone(),
        bundle: req.bundle.clone(),
        rootfs: req.rootfs.clone(),
        io: MessageField::some(TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        }),
        checkpoint: req.checkpoint.clone(),
        pid: container.pid(),
        ..Default::default()
    });
    cleanup.runc = None;
    cleanup.rootfs = None;
    tracing::info!(id = %req.id, pid = container.pid(), restore = !req.checkpoint.is_empty(), "container created");
    Ok(Arc::new(container))
}

/// The upper (writable) directory of an overlayfs rootfs, from its `upperdir=` mount option.
fn overlay_upperdir(mounts: &[MountSpec]) -> Option<PathBuf> {
    let overlay = mounts.iter().find(|m| m.kind == "overlay")?;
    overlay.options.iter().find_map(|o| o.strip_prefix("upperdir=")).map(PathBuf::from)
}

/// Reads a pid file runc wrote.
pub fn read_pid_file(path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path).map_err(|e| ShimError::io(format!("reading {}", path.display()), e))?;
    text.trim()
        .parse()
        .map_err(|_| ShimError::Internal(format!("pid file {} holds {:?}, not a pid", path.display(), text.trim())))
}
