//! Container images built locally from the host's busybox-static (no registry): OCI bundles for
//! runc, OCI image archives for `ctr images import`, and the counter workload they run.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::process::wait_for;

/// Where busybox-static lives on Debian (installed by `make deps`).
pub const BUSYBOX: &str = "/bin/busybox";

/// Builds an OCI bundle in `dir`: a busybox-static rootfs (no registry needed) and a `config.json`
/// from `runc spec`, running `args` without a terminal, with a writable rootfs.
pub fn busybox_bundle(dir: &Path, args: &[&str]) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    for sub in ["bin", "state", "tmp", "proc", "dev", "sys"] {
        fs::create_dir_all(rootfs.join(sub))?;
    }
    fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
        .with_context(|| format!("copying {BUSYBOX}: install busybox-static (make deps)"))?;
    for applet in ["sh", "sleep", "echo", "cat", "ls", "mv"] {
        symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    let status = Command::new("runc")
        .arg("spec")
        .current_dir(dir)
        .status()
        .context("running `runc spec`: is runc installed?")?;
    if !status.success() {
        bail!("runc spec failed in {}", dir.display());
    }
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = args.iter().map(|a| serde_json::Value::from(*a)).collect();
    spec["root"]["readonly"] = false.into();
    fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(dir.to_path_buf())
}

/// The shell loop our container tests run: a counter held in the shell's memory, written to
/// `/state/counter` ten times a second (by rename, so a reader, or a checkpoint, never sees it half
/// written). If the restore lost memory, the counter would restart at 1.
pub const COUNTER_SCRIPT: &str =
    "i=0; while :; do i=$((i+1)); echo $i > /state/counter.new; mv /state/counter.new /state/counter; sleep 0.1; done";

/// Reads the counter a [`COUNTER_SCRIPT`] container wrote into its rootfs.
pub fn read_counter(bundle: &Path) -> Option<u64> {
    fs::read_to_string(bundle.join("rootfs/state/counter")).ok()?.trim().parse().ok()
}

/// Waits until a [`COUNTER_SCRIPT`] container's counter passes `min`; returns the value seen.
pub fn wait_counter_past(bundle: &Path, min: u64) -> Result<u64> {
    wait_for(&format!("container counter to pass {min}"), Duration::from_secs(20), || {
        read_counter(bundle).filter(|c| *c > min)
    })
}

/// An OCI image layout (as a tar, for `ctr images import`) holding one layer with busybox-static
/// and the applets the tests use, named `name`.
pub fn busybox_oci_image(name: &str) -> Result<Vec<u8>> {
    busybox_oci_image_running(name, &["sh"])
}

/// Like [`busybox_oci_image`], with `cmd` as the image's command.
pub fn busybox_oci_image_running(name: &str, cmd: &[&str]) -> Result<Vec<u8>> {
    use sha2::{Digest, Sha256};
    let sha = |data: &[u8]| format!("sha256:{:x}", Sha256::digest(data));
    let mut layer = tar::Builder::new(Vec::new());
    for dir in ["bin", "tmp", "state", "proc", "dev", "sys", "etc"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        layer.append_data(&mut h, dir, std::io::empty())?;
    }
    let busybox =
        fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}: install busybox-static (make deps)"))?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    layer.append_data(&mut h, "bin/busybox", busybox.as_slice())?;
    for applet in
        ["sh", "sleep", "echo", "cat", "ls", "mv", "yes", "head", "true", "test", "seq", "kill", "stty", "tty"]
    {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        layer.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    let layer = layer.into_inner()?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a },
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [sha(&layer)]}
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&layer), "size": layer.len()}]
    }))?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest),
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "test"}
        }]
    }))?;
    let mut out = tar::Builder::new(Vec::new());
    let mut add = |path: String, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        out.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".into(), &index)?;
    for blob in [&layer, &config, &manifest] {
        add(format!("blobs/sha256/{}", sha(blob).trim_start_matches("sha256:")), blob)?;
    }
    Ok(out.into_inner()?)
}
