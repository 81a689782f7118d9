//! Checkpoints a live child process with checkpoint-core, kills it, restores it, and shows that its
//! memory and counter carried on. Run as root: `cargo run -p kybernate-examples --bin checkpoint-restore-process`.
//!
//! The child is this same program started with `--child`: it keeps a counter and a 32 MiB buffer of
//! known contents in memory, and prints both to a log file every 100 ms.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use checkpoint_core::{checkpoint_process, restore_process, CheckpointOptions, Criu, RestoreOptions};

const BUFFER_MIB: usize = 32;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(Path::new(&args[2]));
    }
    let work = std::env::temp_dir().join(format!("kybernate-example-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let log = work.join("child.log");

    let criu = Criu::from_path();
    let info = criu.probe().context("CRIU is not usable here (run `make deps`)")?;
    println!(
        "CRIU {} at {} (pre-dump {})",
        info.version,
        info.binary.display(),
        if info.pre_dump_supported { "available" } else { "unavailable: no dirty-page tracking" }
    );

    // Our restored child becomes our child again (CRIU --restore-sibling); as subreaper we can reap it.
    nix::sys::prctl::set_child_subreaper(true)?;
    let child = unsafe {
        Command::new(std::env::current_exe()?)
            .arg("--child")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from))
            .spawn()?
    };
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(1500));
    println!("child {pid} running:      {}", last_line(&log)?);

    let images = work.join("images");
    let opts = CheckpointOptions::default();
    let report = checkpoint_process(&criu, pid, &images, &opts)?;
    let t = report.timings;
    println!(
        "checkpointed in {:?} (frozen {:?}: freeze {:?}, dump {:?}, write {:?}); {} pages, {:.1} MiB of images in {}",
        t.total,
        t.frozen,
        t.freeze,
        t.dump,
        t.write,
        report.pages_written,
        report.image_bytes as f64 / 1048576.0,
        images.display()
    );
    nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)?; // CRIU ended it after the dump
    let at_checkpoint = last_line(&log)?;
    println!("child gone; last words: {at_checkpoint}");
    std::thread::sleep(Duration::from_secs(1));
    if last_line(&log)? != at_checkpoint {
        bail!("the child kept running after a checkpoint without leave-running");
    }

    let restored = restore_process(&criu, &images, &RestoreOptions::matching(&opts))?;
    println!("restored as pid {} in {:?}", restored.pid, restored.timings.total);
    std::thread::sleep(Duration::from_millis(1500));
    let resumed = last_line(&log)?;
    println!("child running again:  {resumed}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(restored.pid), nix::sys::signal::Signal::SIGKILL)?;
    nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(restored.pid), None)?;

    let counter = |line: &str| line.split_whitespace().find_map(|w| w.strip_prefix("counter=")?.parse::<u64>().ok());
    match (counter(&at_checkpoint), counter(&resumed)) {
        (Some(before), Some(after)) if after > before && resumed.contains("memory=intact") => {
            println!("OK: the counter went on from {before} to {after} and the {BUFFER_MIB} MiB buffer is intact");
            std::fs::remove_dir_all(&work)?;
            Ok(())
        }
        _ => bail!(
            "state did not survive: before {at_checkpoint:?}, after {resumed:?} (images kept in {})",
            work.display()
        ),
    }
}

fn last_line(log: &Path) -> Result<String> {
    let text = std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    Ok(text.lines().last().unwrap_or_default().to_string())
}

fn child(log: &Path) -> Result<()> {
    use std::io::Write;
    let buffer: Vec<u8> = (0..BUFFER_MIB << 20).map(|i| (i % 251) as u8).collect();
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    for counter in 1u64.. {
        let intact = buffer.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8);
        writeln!(out, "counter={counter} memory={}", if intact { "intact" } else { "CORRUPT" })?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
