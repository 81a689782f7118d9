//! The Kybernate story on a private containerd: a container that opted in with
//! `kybernate.io/checkpoint-on-stop` is stopped with `ctr t kill`, the shim checkpoints it into the node
//! checkpoint directory before it exits, the sidecar ships the bundle encrypted to the local
//! (filesystem) store,
//! and a new container started with `kybernate.io/restore-from` naming the archive in that store is
//! fetched back by the shim — its signature, tenant and hashes checked — and resumes its counter where
//! it stopped. Run as root after `make deps`
//! (`make demo` does both).
//!
//! The shim and sidecar binaries are expected next to this program
//! (`cargo build --release -p kybernate-shim -p kybernate-sidecar`). The private containerd it runs
//! them on is in `containerd.rs`, next to this file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use checkpoint_core::bundle;
use checkpoint_core::trust::{Provenance, TrustedKeys};
use containerd::{wait_for, Containerd, KYBERNATE_RUNTIME, KYBERNATE_SHIM};

mod containerd;

/// The public half of the node's signing key, as `make deps` creates it.
const NODE_PUBLIC_KEY: &str = "/etc/kybernate/keys/signing.pub";

/// The workload: a shell counter kept in memory, written to a file of its writable layer.
const COUNTER: &str =
    "i=0; while :; do i=$((i+1)); echo $i > /state/counter.new; mv /state/counter.new /state/counter; sleep 0.1; done";

fn main() -> Result<()> {
    let shim = std::env::current_exe()?.with_file_name(KYBERNATE_SHIM);
    let sidecar = std::env::current_exe()?.with_file_name("kybernate-sidecar");
    for binary in [&shim, &sidecar] {
        if !binary.is_file() {
            bail!("{} not found: `cargo build --release -p kybernate-shim -p kybernate-sidecar`", binary.display());
        }
    }
    let dir = tempfile::Builder::new().prefix("kybernate-demo-").tempdir_in("/tmp")?;
    let checkpoints = dir.path().join("checkpoints");
    let store = dir.path().join("store");
    // The node's signing key is the default one `make deps` created; restores may come from the
    // demo's checkpoint directory and store only.
    // The shim fetches with the sidecar, which needs the store key: a wrapper hands it over, as a
    // node's /etc/kybernate/sidecar.toml (or a Secret in the environment) would.
    let store_key = dir.path().join("store.key");
    let fetcher = dir.path().join("kybernate-sidecar");
    fs::write(
        &fetcher,
        format!(
            "#!/bin/sh\nexport KYBERNATE_ENCRYPTION_KEY_FILE={}\nexec {} \"$@\"\n",
            store_key.display(),
            sidecar.display()
        ),
    )?;
    fs::set_permissions(&fetcher, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let shim_settings = format!(
        "checkpoint_dir = \"{}\"\nrestore_dir = \"{}\"\nsidecar_binary = \"{}\"\nrestore_roots = [\"{}\", \"{}\"]\n",
        checkpoints.display(),
        dir.path().join("restore").display(),
        fetcher.display(),
        checkpoints.display(),
        store.display()
    );
    println!("==> starting a private containerd in {} with {KYBERNATE_RUNTIME}", dir.path().display());
    let c = Containerd::start(dir, &shim, &shim_settings)?;
    let image = c.import_busybox()?;
    let runtime = ["--runtime", KYBERNATE_RUNTIME, "--runtime-config-path", &c.shim_config.display().to_string()]
        .map(str::to_string);

    println!("==> ctr run: container `counter` with kybernate.io/checkpoint-on-stop=true");
    let mut run = vec!["run", "-d", "--annotation", "kybernate.io/checkpoint-on-stop=true"];
    run.extend(runtime.iter().map(String::as_str));
    run.extend([image, "counter", "sh", "-c", COUNTER]);
    c.ctr_ok(&run)?;
    let seen =
        wait_for("the counter to pass 20", Duration::from_secs(30), || c.counter("counter").filter(|v| *v > 20))?;
    println!("    counter is at {seen} and counting");

    println!("==> ctr tasks kill counter (SIGTERM): the shim checkpoints it before it exits");
    let started = Instant::now();
    c.ctr_ok(&["tasks", "kill", "counter"])?;
    c.wait_task_status("counter", "STOPPED", Duration::from_secs(60))?;
    let stop_time = started.elapsed();
    let last = c.counter("counter").context("reading the last counter value")?;
    let rm = c.ctr(&["tasks", "rm", "counter"])?;
    c.ctr_ok(&["containers", "rm", "counter"])?;
    println!("    stopped at counter {last} in {stop_time:.2?} ({})", String::from_utf8_lossy(&rm.stderr).trim());

    let bundle_dir = find_bundle(&checkpoints)?;
    let trusted = TrustedKeys::load(&[PathBuf::from(NODE_PUBLIC_KEY)], false)?;
    let (manifest, signed) = bundle::verify_trusted(&bundle_dir, &trusted)
        .with_context(|| format!("the bundle is not signed by this node's key {NODE_PUBLIC_KEY} (run `make deps`)"))?;
    let report = manifest.checkpoint.as_ref().context("the manifest has no checkpoint report")?;
    println!("==> bundle {}", bundle_dir.display());
    println!(
        "    frozen {:.2?}, CRIU dump {:.2?}, {} KiB of memory, {} files sealed with sha256",
        report.timings.frozen,
        report.timings.total,
        report.memory_bytes / 1024,
        manifest.files.len()
    );
    if let Provenance::Signed { key_id, .. } = signed {
        println!("    manifest signed by this node's key {key_id} ({NODE_PUBLIC_KEY})");
    }
    for name in ["config.dump", "spec.dump", "rootfs-diff.tar", "deleted.files", "stats-dump", "COMPLETE"] {
        let size = fs::metadata(bundle_dir.join(name)).map(|m| m.len()).unwrap_or(0);
        println!("    {name:<16} {size:>8} bytes");
    }

    println!("==> kybernate-sidecar keygen: a key to encrypt what goes to the store");
    let keygen = Command::new(&sidecar).arg("keygen").arg("--out").arg(&store_key).output()?;
    if !keygen.status.success() {
        bail!("kybernate-sidecar keygen failed: {}", String::from_utf8_lossy(&keygen.stderr));
    }
    println!("    {}", String::from_utf8_lossy(&keygen.stdout).trim());
    println!("==> kybernate-sidecar push: the bundle goes, encrypted, to the local store {}", store.display());
    let started = Instant::now();
    let push = Command::new(&sidecar)
        .arg("--checkpoint-dir")
        .arg(&checkpoints)
        .arg("--store")
        .arg(&store)
        .arg("--encryption-key-file")
        .arg(&store_key)
        .arg("push")
        .arg(&bundle_dir)
        .output()?;
    if !push.status.success() {
        bail!("kybernate-sidecar push failed: {}", String::from_utf8_lossy(&push.stderr));
    }
    println!("    {} ({:.2?})", String::from_utf8_lossy(&push.stdout).trim(), started.elapsed());
    // <store>/<bundle path>.tar[.zst][.kenc], next to its <...>.meta.json record
    let stem = store.join(bundle_dir.strip_prefix(&checkpoints)?);
    let (parent, name) = (stem.parent().context("the store path")?, stem.file_name().context("the bundle name")?);
    let archive = fs::read_dir(parent)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let file = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            file.starts_with(&*name.to_string_lossy()) && checkpoint_core::pod::is_archive(file)
        })
        .with_context(|| format!("the sidecar wrote no archive at {}.tar…", stem.display()))?;
    fs::remove_dir_all(&bundle_dir)?;
    println!("    local bundle removed: the restore must come from the store");

    let reference = format!("file://{}", archive.display());
    println!("==> ctr run: container `resumed` with kybernate.io/restore-from={reference}");
    let restore = format!("kybernate.io/restore-from={reference}");
    let mut run = vec!["run", "-d", "--annotation", &restore];
    run.extend(runtime.iter().map(String::as_str));
    run.extend([image, "resumed", "sh", "-c", COUNTER]);
    let started = Instant::now();
    c.ctr_ok(&run)?;
    let restore_time = started.elapsed();
    let first = wait_for("the restored counter to advance", Duration::from_secs(30), || {
        c.counter("resumed").filter(|v| *v > last)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let later = c.counter("resumed").unwrap_or(first);
    println!("    fetched, verified and restored in {restore_time:.2?}: counter went on from {last} to {first}, then {later}");
    if first <= last || later <= first {
        bail!("the counter did not resume: last {last}, then {first}, {later}");
    }
    c.ctr(&["tasks", "kill", "-s", "SIGKILL", "resumed"])?;
    c.wait_task_status("resumed", "STOPPED", Duration::from_secs(30))?;
    c.ctr_ok(&["tasks", "rm", "resumed"])?;
    c.ctr_ok(&["containers", "rm", "resumed"])?;
    println!("==> state survived the stop: {last} -> {first}");
    Ok(())
}

/// The one sealed bundle under `root`.
fn find_bundle(root: &Path) -> Result<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if bundle::is_complete(&dir) {
            return Ok(dir);
        }
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    bail!("no sealed bundle under {}: the checkpoint on stop did not happen (see the shim log)", root.display())
}
