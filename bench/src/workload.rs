//! The workload every side checkpoints and restores: a static C program (`hog.c`) holding MiB of
//! incompressible data, which checks every byte when asked; and the waits on it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a workload may take to fill its memory, or to check it.
const WAIT: Duration = Duration::from_secs(300);
/// How often a condition is polled while a time is measured.
const POLL: Duration = Duration::from_millis(2);

/// Compiles the workload (`gcc -O2 -static`) into `dir/hog`; the directory is bind-mounted
/// read-only into every container as `/hog`.
pub fn build(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let source = dir.join("hog.c");
    fs::write(&source, include_str!("hog.c"))?;
    let binary = dir.join("hog");
    let out = Command::new("gcc").args(["-O2", "-static", "-o"]).arg(&binary).arg(&source).output()?;
    if !out.status.success() {
        bail!("gcc -static failed (libc6-dev provides libc.a): {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(binary)
}

/// A fresh, empty state directory for one workload (`ready`, `check`, `verified`).
pub fn state_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    let dir = parent.join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Waits until the workload of `state` has filled its memory.
pub fn wait_ready(state: &Path) -> Result<()> {
    wait("the workload to fill its memory", || state.join("ready").exists())
}

/// Asks the workload of `state` to check every byte, and fails unless its memory is intact.
pub fn verify(state: &Path, what: &str) -> Result<()> {
    let verified = state.join("verified");
    let _ = fs::remove_file(&verified);
    fs::write(state.join("check"), b"")?;
    wait(&format!("{what}: the memory check"), || verified.exists())?;
    match fs::read_to_string(&verified)?.trim() {
        "ok" => Ok(()),
        other => bail!("{what}: the restored memory differs from the checkpointed one ({other})"),
    }
}

/// Waits until process `pid` has at least `mib` MiB of anonymous memory resident: the time a restore
/// takes to bring the whole of it back.
pub fn wait_resident(pid: i32, mib: u64) -> Result<()> {
    let want_kb = mib * 1024 * 99 / 100;
    wait(&format!("process {pid} to have {mib} MiB resident"), || {
        fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("RssAnon:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .is_some_and(|kb| kb >= want_kb)
    })
}

/// Polls `done` every [`POLL`] for up to [`WAIT`].
pub fn wait(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Runs `cmd`, failing with its output unless it exits 0.
pub fn run(mut cmd: Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sync`: what a side wrote is durable.
pub fn sync() -> Result<()> {
    run(Command::new("sync")).map(|_| ())
}
