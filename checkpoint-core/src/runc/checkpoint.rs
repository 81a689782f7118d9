//! `runc checkpoint` of a running container.

use std::path::Path;
use std::time::Instant;

use super::{ContainerStatus, Runc};
use crate::criu::image::ImageManifest;
use crate::criu::Criu;
use crate::error::{Error, Result, ToolFailure};
use crate::exec;
use crate::fsutil;
use crate::options::CheckpointOptions;
use crate::report::CheckpointReport;

/// Checkpoints the running (or paused) container `id` into `image_dir` (created; must be empty), like
/// containerd's runc shim does for `ctr c checkpoint`.
///
/// On error the container keeps running (runc and CRIU resume it) and the error says so, with the
/// tail of CRIU's log, which stays in the work directory.
pub fn checkpoint_container(
    runc: &Runc,
    criu: &Criu,
    id: &str,
    image_dir: &Path,
    opts: &CheckpointOptions,
) -> Result<CheckpointReport> {
    let started = Instant::now();
    opts.validate()?;
    let version = criu.version()?;
    let was_paused = match runc.state(id)? {
        // A paused container can be dumped too (containerd pauses a task around its checkpoint); CRIU
        // leaves its cgroup frozen as it found it.
        Some(s) if s.status == ContainerStatus::Running => false,
        Some(s) if s.status == ContainerStatus::Paused => true,
        Some(s) => {
            return Err(Error::ContainerState {
                id: id.into(),
                state: format!("{:?}", s.status).to_lowercase(),
                hint: "only a running container can be checkpointed; start it (or resume it) first".into(),
            })
        }
        None => {
            return Err(Error::ContainerState {
                id: id.into(),
                state: "absent".into(),
                hint: format!("runc (root {:?}) does not know this container id", runc.root()),
            })
        }
    };
    let work_dir = crate::process::prepare_checkpoint(criu, image_dir, opts)?;

    if opts.pre_dump {
        let pre_dir = image_dir.join(crate::process::PRE_DUMP_DIR);
        let mut cmd = checkpoint_command(runc, criu, &pre_dir, &work_dir, opts);
        cmd.arg("--pre-dump").arg(id);
        let offset = runc.log_offset();
        runc.spawner()
            .run(cmd, opts.timeout, true)
            .map_err(|failure| failed(runc, id, &work_dir, failure, offset, was_paused))?;
    }
    let mut cmd = checkpoint_command(runc, criu, image_dir, &work_dir, opts);
    if opts.leave_running {
        cmd.arg("--leave-running");
    }
    if opts.pre_dump {
        cmd.args(["--parent-path", crate::process::PRE_DUMP_DIR]);
    }
    cmd.arg(id);
    let offset = runc.log_offset();
    runc.spawner()
        .run(cmd, opts.timeout, true)
        .map_err(|failure| failed(runc, id, &work_dir, failure, offset, was_paused))?;
    ImageManifest::record(image_dir)?.write(image_dir)?;
    let report =
        CheckpointReport::collect(image_dir, &work_dir, work_dir.join("dump.log"), started.elapsed(), version)?;
    tracing::info!(id, image_dir = %image_dir.display(), pages = report.pages_written, total_ms = report.timings.total.as_millis() as u64, "container checkpointed");
    Ok(report)
}

fn checkpoint_command(
    runc: &Runc,
    criu: &Criu,
    image_dir: &Path,
    work_dir: &Path,
    opts: &CheckpointOptions,
) -> std::process::Command {
    let mut cmd = runc.command(Some(criu));
    cmd.arg("checkpoint").arg("--image-path").arg(image_dir).arg("--work-path").arg(work_dir);
    super::add_runc_flags(&mut cmd, &opts.flags);
    cmd
}

/// The error of a failed dump, after making sure the container runs again: a dump killed at its
/// deadline leaves the cgroup frozen (runc had no chance to thaw it), so it is resumed here unless it
/// was paused before the checkpoint.
fn failed(runc: &Runc, id: &str, work_dir: &Path, failure: exec::Failure, offset: u64, was_paused: bool) -> Error {
    if failure.timed_out && !was_paused {
        if let Ok(Some(s)) = runc.state(id) {
            if s.status == ContainerStatus::Paused {
                if let Err(e) = runc.resume(id) {
                    tracing::warn!(id, error = %e, "thawing the container after an abandoned dump");
                }
            }
        }
    }
    let log = work_dir.join("dump.log");
    Error::Runc {
        action: "checkpoint",
        id: id.into(),
        failure: Box::new(ToolFailure {
            status: failure.status,
            workload: runc.describe(id),
            output: format!("{}\n{}", runc.message(offset, failure.stderr.as_bytes()), fsutil::log_tail(&log)),
            log,
        }),
    }
}
