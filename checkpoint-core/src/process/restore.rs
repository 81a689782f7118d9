//! `criu restore` of a process tree.

use std::path::Path;
use std::time::Instant;

use crate::criu::image::image_pids;
use crate::criu::Criu;
use crate::error::{Error, Result, ToolFailure};
use crate::fsutil;
use crate::options::RestoreOptions;
use crate::report::RestoreReport;

/// Restores the process tree checkpointed in `image_dir`.
///
/// The restored root becomes a child of the calling process (CRIU's `--restore-sibling`), so the caller
/// can wait for it; it keeps its original pid, which must be free. On error nothing is left behind:
/// CRIU kills a partly restored tree.
pub fn restore_process(criu: &Criu, image_dir: &Path, opts: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    opts.validate()?;
    criu.version()?;
    crate::criu::image::check_image_dir(image_dir)?;
    let pids = image_pids(image_dir)?;
    let work_dir = fsutil::work_dir_or(&opts.work_dir, image_dir);
    fsutil::ensure_dir(&work_dir)?;
    let log = work_dir.join("restore.log");
    let pid_file = work_dir.join("restore.pid");
    let _ = std::fs::remove_file(&pid_file);

    let mut cmd = criu.command();
    cmd.arg("restore")
        .arg("--images-dir")
        .arg(image_dir)
        .arg("--work-dir")
        .arg(&work_dir)
        .arg("--log-file")
        .arg(&log)
        .arg("-v4")
        .args(["--restore-detached", "--restore-sibling", "--pidfile"])
        .arg(&pid_file);
    super::checkpoint::add_criu_flags(&mut cmd, &opts.flags);
    criu.spawner().run(cmd, opts.timeout, true).map_err(|failure| {
        let workload = if failure.timed_out {
            // CRIU is gone; the tree it was building would linger, so remove it.
            let killed = remove_partial_tree(&pids);
            format!("was not restored (CRIU was stopped; {killed}); the images are untouched")
        } else {
            "was not restored (CRIU removes a partly restored tree); the images are untouched".into()
        };
        let output = format!("{}\n{}", failure.stderr, fsutil::log_tail(&log)).trim().to_string();
        Error::Criu {
            action: "restore",
            failure: Box::new(ToolFailure { status: failure.status, workload, log: log.clone(), output }),
        }
    })?;
    let pid = fsutil::read_pid_file(&pid_file)?;
    let report = RestoreReport::collect(pid, &work_dir, log, started.elapsed())?;
    tracing::info!(pid, image_dir = %image_dir.display(), total_ms = report.timings.total.as_millis() as u64, "process restored");
    Ok(report)
}

/// Kills what a stopped CRIU left of the tree (same pids as recorded: we restore in our pid namespace).
fn remove_partial_tree(pids: &[i32]) -> String {
    let killed: Vec<String> = pids
        .iter()
        .filter(|pid| fsutil::process_alive(**pid))
        .filter(|pid| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(**pid), nix::sys::signal::Signal::SIGKILL).is_ok()
        })
        .map(|pid| pid.to_string())
        .collect();
    if killed.is_empty() {
        "no partly restored process was left".into()
    } else {
        format!("killed the partly restored processes {}", killed.join(", "))
    }
}
