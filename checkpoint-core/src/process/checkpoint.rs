//! `criu dump` of a process tree.

use std::path::Path;
use std::time::Instant;

use crate::criu::image::ImageManifest;
use crate::criu::{Criu, Feature};
use crate::error::{Error, Result, ToolFailure};
use crate::fsutil;
use crate::options::{CheckpointOptions, CriuFlags};
use crate::report::CheckpointReport;

/// Sub-directory of the image directory that holds pre-dump images, when pre-dump is used.
pub const PRE_DUMP_DIR: &str = "pre-dump";

/// Checkpoints the process tree rooted at `pid` into `image_dir` (created; must be empty).
///
/// Without [`CheckpointOptions::leave_running`] the tree is gone once this returns `Ok`. On any error
/// the tree keeps running, CRIU's log stays in the work directory, and the error carries its tail.
pub fn checkpoint_process(
    criu: &Criu,
    pid: i32,
    image_dir: &Path,
    opts: &CheckpointOptions,
) -> Result<CheckpointReport> {
    let started = Instant::now();
    opts.validate()?;
    let version = criu.version()?;
    if !fsutil::process_alive(pid) {
        return Err(Error::NoSuchProcess { pid });
    }
    let work_dir = prepare_checkpoint(criu, image_dir, opts)?;

    if opts.pre_dump {
        let pre_dir = image_dir.join(PRE_DUMP_DIR);
        fsutil::ensure_dir(&pre_dir)?;
        let log = work_dir.join("pre-dump.log");
        let mut cmd = dump_command(criu, "pre-dump", pid, &pre_dir, &work_dir, &log, opts);
        cmd.arg("--track-mem");
        criu.spawner().run(cmd, opts.timeout, true).map_err(|f| criu_error("pre-dump", f, pid, &log))?;
    }

    let log = work_dir.join("dump.log");
    let mut cmd = dump_command(criu, "dump", pid, image_dir, &work_dir, &log, opts);
    if opts.leave_running {
        cmd.arg("--leave-running");
    }
    if opts.pre_dump {
        cmd.args(["--track-mem", "--prev-images-dir", PRE_DUMP_DIR]);
    }
    criu.spawner().run(cmd, opts.timeout, true).map_err(|f| criu_error("dump", f, pid, &log))?;
    ImageManifest::record(image_dir)?.write(image_dir)?;
    let report = CheckpointReport::collect(image_dir, &work_dir, log, started.elapsed(), version)?;
    tracing::info!(pid, image_dir = %image_dir.display(), pages = report.pages_written, total_ms = report.timings.total.as_millis() as u64, "process checkpointed");
    Ok(report)
}

/// Checks what a checkpoint needs before anything is frozen (pre-dump support, an empty writable image
/// directory) and returns the work directory.
pub(crate) fn prepare_checkpoint(
    criu: &Criu,
    image_dir: &Path,
    opts: &CheckpointOptions,
) -> Result<std::path::PathBuf> {
    if opts.pre_dump {
        criu.require_feature(Feature::MemDirtyTrack)?;
    }
    fsutil::prepare_empty_dir(image_dir)?;
    let work_dir = fsutil::work_dir_or(&opts.work_dir, image_dir);
    fsutil::ensure_dir(&work_dir)?;
    Ok(work_dir)
}

fn dump_command(
    criu: &Criu,
    action: &str,
    pid: i32,
    image_dir: &Path,
    work_dir: &Path,
    log: &Path,
    opts: &CheckpointOptions,
) -> std::process::Command {
    let mut cmd = criu.command();
    cmd.arg(action)
        .arg("--tree")
        .arg(pid.to_string())
        .arg("--images-dir")
        .arg(image_dir)
        .arg("--work-dir")
        .arg(work_dir)
        .arg("--log-file")
        .arg(log)
        .arg("-v4");
    add_criu_flags(&mut cmd, &opts.flags);
    cmd
}

fn criu_error(action: &'static str, failure: crate::exec::Failure, pid: i32, log: &Path) -> Error {
    let output = format!("{}\n{}", failure.stderr, fsutil::log_tail(log)).trim().to_string();
    Error::Criu {
        action,
        failure: Box::new(ToolFailure {
            status: failure.status,
            workload: fsutil::describe_process(pid),
            log: log.to_path_buf(),
            output,
        }),
    }
}

/// Adds the tree-describing flags in CRIU's spelling.
pub(super) fn add_criu_flags(cmd: &mut std::process::Command, flags: &CriuFlags) {
    cmd.args(flags.switches());
    if let Some(mode) = flags.manage_cgroups_mode {
        cmd.args(["--manage-cgroups", mode.as_str()]);
    }
    for ns in &flags.empty_namespaces {
        cmd.args(["--empty-ns", ns.criu_name()]);
    }
}
