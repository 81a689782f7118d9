//! `runc restore --detach` of a container from a checkpoint image.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{add_runc_flags, Runc};
use crate::criu::Criu;
use crate::error::{Error, Result, ToolFailure};
use crate::exec;
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
}

/// The stdio the restored container's process gets (runc passes its own stdio through).
#[derive(Debug, Default)]
pub struct RestoreIo {
    /// Standard input (`/dev/null` when `None`).
    pub stdin: Option<Stdio>,
    /// Standard output (`/dev/null` when `None`).
    pub stdout: Option<Stdio>,
    /// Standard error (`/dev/null` when `None`).
    pub stderr: Option<Stdio>,
}

/// Restores a container with `runc restore --detach`; returns once it runs.
///
/// The restored init process is re-parented to the nearest subreaper when runc exits, so the caller
/// should be one (as a containerd shim is). On error, a half-created container is deleted so the id
/// can be used again, and the error carries runc's message and the tail of CRIU's log.
pub fn restore_container(runc: &Runc, criu: &Criu, req: &ContainerRestore, io: RestoreIo) -> Result<RestoreReport> {
    let started = Instant::now();
    req.options.validate()?;
    criu.version()?;
    fsutil::check_image_dir(&req.image_dir)?;
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

    let mut cmd = runc.command(Some(criu));
    cmd.arg("--log").arg(work_dir.join("runc-restore.log"));
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
    cmd.arg(&req.id);
    cmd.stdin(io.stdin.unwrap_or_else(Stdio::null))
        .stdout(io.stdout.unwrap_or_else(Stdio::null))
        .stderr(io.stderr.unwrap_or_else(Stdio::null));
    exec::run(cmd, req.options.timeout, false).map_err(|failure| {
        let cleanup = cleanup_failed(runc, &req.id);
        let log = work_dir.join("restore.log");
        let runc_log = std::fs::read_to_string(work_dir.join("runc-restore.log")).unwrap_or_default();
        Error::Runc {
            action: "restore",
            id: req.id.clone(),
            failure: Box::new(ToolFailure {
                status: failure.status,
                workload: format!("was not restored ({cleanup})"),
                output: format!("{}\n{}", last_lines(&runc_log, 5), fsutil::log_tail(&log)),
                log,
            }),
        }
    })?;
    let pid = fsutil::read_pid_file(&pid_file)?;
    let report = RestoreReport::collect(pid, &work_dir, work_dir.join("restore.log"), started.elapsed())?;
    tracing::info!(id = %req.id, pid, total_ms = report.timings.total.as_millis() as u64, "container restored");
    Ok(report)
}

/// Removes what a restore created of container `id` (`runc delete --force`, which kills its
/// processes), so nothing stays half-restored and the id can be used again; says what it did.
pub(crate) fn cleanup_failed(runc: &Runc, id: &str) -> String {
    match runc.state(id) {
        Ok(None) => "nothing was left behind".into(),
        Ok(Some(_)) => {
            let mut delete = runc.command(None);
            delete.args(["delete", "--force", id]);
            match exec::run(delete, Some(Duration::from_secs(30)), true) {
                Ok(()) => "runc delete --force removed it".into(),
                Err(f) => format!("runc delete --force failed: {} {}", f.status, f.stderr),
            }
        }
        Err(e) => format!("its state is unknown: {e}"),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
