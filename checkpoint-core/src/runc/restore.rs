//! `runc restore --detach` of a container from a checkpoint image.

use std::path::PathBuf;
use std::time::Instant;

use super::{add_runc_flags, ChildStdio, Runc};
use crate::criu::Criu;
use crate::error::{Error, Result, ToolFailure};
use crate::fsutil;
use crate::options::RestoreOptions;
use crate::report::RestoreReport;

/// What to restore, and how (the fields of containerd's `RestoreOpts`).
#[derive(Debug, Clone)]
pub struct ContainerRestore {
    /// Id the restored container gets (need not be the checkpointed one's).
    pub id: String,
    /// OCI bundle (config.json and rootfs) of the new container.
    pub bundle: PathBuf,
    /// The CRIU images.
    pub image_dir: PathBuf,
    /// Flags matching the checkpoint, and the work directory.
    pub options: RestoreOptions,
    /// Where runc writes the pid of the restored init process (a file in the work dir by default).
    pub pid_file: Option<PathBuf>,
    /// Socket that receives the pty master, for containers with a terminal.
    pub console_socket: Option<PathBuf>,
    /// Do not use pivot_root (rootfs on a ramdisk).
    pub no_pivot: bool,
    /// Restore memory lazily (`--lazy-pages`): a `criu lazy-pages` daemon must listen in the work
    /// directory (see [`crate::criu::lazy_pages`]).
    pub lazy_pages: bool,
    /// Extra environment for runc, which the CRIU it runs and CRIU's action scripts inherit (a
    /// restore gate's directory).
    pub env: Vec<(String, PathBuf)>,
}

/// Restores a container with `runc restore --detach`; returns once it runs.
///
/// The restored init process is re-parented to the nearest subreaper when runc exits, so the caller
/// should be one (as a containerd shim is). On error, a half-created container is deleted so the id
/// can be used again, and the error carries runc's message and the tail of CRIU's log.
pub fn restore_container(runc: &Runc, criu: &Criu, req: &ContainerRestore, stdio: ChildStdio) -> Result<RestoreReport> {
    let started = Instant::now();
    req.options.validate()?;
    criu.version()?;
    crate::criu::image::check_image_dir(&req.image_dir)?;
    if !req.bundle.join("config.json").is_file() {
        return Err(Error::Directory {
            path: req.bundle.clone(),
            reason: "config.json is missing: not an OCI bundle".into(),
        });
    }
    if let Some(existing) = runc.state(&req.id)? {
        return Err(Error::ContainerState {
            id: req.id.clone(),
            state: format!("{:?}", existing.status).to_lowercase(),
            hint: "a container with this id already exists; delete it or restore under another id".into(),
        });
    }
    let work_dir = fsutil::work_dir_or(&req.options.work_dir, &req.image_dir);
    fsutil::ensure_dir(&work_dir)?;
    let pid_file = req.pid_file.clone().unwrap_or_else(|| work_dir.join("restore.pid"));
    let _ = std::fs::remove_file(&pid_file);

    let mut cmd = runc.command_logging(Some(criu), Some(&work_dir.join("runc-restore.log")));
    cmd.arg("restore")
        .arg("--image-path")
        .arg(&req.image_dir)
        .arg("--work-path")
        .arg(&work_dir)
        .arg("--bundle")
        .arg(&req.bundle)
        .args(["--detach", "--no-subreaper"])
        .arg("--pid-file")
        .arg(&pid_file);
    add_runc_flags(&mut cmd, &req.options.flags);
    if let Some(socket) = &req.console_socket {
        cmd.arg("--console-socket").arg(socket);
    }
    if req.no_pivot {
        cmd.arg("--no-pivot");
    }
    if req.lazy_pages {
        cmd.arg("--lazy-pages");
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    cmd.arg(&req.id);
    stdio.apply(&mut cmd);
    let offset = runc.log_offset();
    runc.spawner().run(cmd, req.options.timeout, false).map_err(|failure| {
        let message = match runc.log() {
            Some(_) => runc.message(offset, &[]),
            None => {
                let own = std::fs::read_to_string(work_dir.join("runc-restore.log")).unwrap_or_default();
                super::last_logged_error(&own)
            }
        };
        let cleanup = runc.remove_failed(&req.id);
        let log = work_dir.join("restore.log");
        Error::Runc {
            action: "restore",
            id: req.id.clone(),
            failure: Box::new(ToolFailure {
                status: failure.status,
                workload: format!("was not restored ({cleanup})"),
                output: format!("{message}\n{}", fsutil::log_tail(&log)),
                log,
            }),
        }
    })?;
    let pid = fsutil::read_pid_file(&pid_file)?;
    let report = RestoreReport::collect(pid, &work_dir, work_dir.join("restore.log"), started.elapsed())?;
    tracing::info!(id = %req.id, pid, total_ms = report.timings.total.as_millis() as u64, "container restored");
    Ok(report)
}
