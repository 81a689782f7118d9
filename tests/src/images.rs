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
    let mut layer = Layer::new();
    for dir in ["bin", "tmp", "state", "proc", "dev", "sys", "etc"] {
        layer.dir(dir)?;
    }
    let busybox =
        fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}: install busybox-static (make deps)"))?;
    layer.file("bin/busybox", 0o755, &busybox)?;
    for applet in
        ["sh", "sleep", "echo", "cat", "ls", "mv", "yes", "head", "true", "test", "seq", "kill", "stty", "tty"]
    {
        layer.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    oci_image_archive(name, "test", &layer.finish()?, serde_json::json!({"Env": ["PATH=/bin"], "Cmd": cmd}))
}

/// One image layer being built: an uncompressed tar whose entries are owned by root and dated 0, so
/// that the same files always give the same digest. Paths are relative (`usr/local/bin/x`).
pub struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Layer::new()
    }
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Layer {
        Layer { tar: tar::Builder::new(Vec::new()) }
    }

    /// A directory, mode 0755.
    pub fn dir(&mut self, path: &str) -> Result<()> {
        self.dir_with_mode(path, 0o755)
    }

    /// A directory with `mode` (0o1777 for a `tmp`).
    pub fn dir_with_mode(&mut self, path: &str, mode: u32) -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        self.tar.append_data(&mut h, path, std::io::empty())?;
        Ok(())
    }

    /// A regular file with `mode` holding `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        self.tar.append_data(&mut h, path, data)?;
        Ok(())
    }

    /// A symbolic link at `path` to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(())
    }

    /// The layer's tar.
    pub fn finish(self) -> Result<Vec<u8>> {
        Ok(self.tar.into_inner()?)
    }
}

/// `sha256:<hex>` of `data`, as OCI descriptors name blobs.
pub fn oci_digest(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{:x}", Sha256::digest(data))
}

/// An OCI image layout, as a tar for `ctr images import`, of a one-layer image for this machine's
/// architecture: `layer` (an uncompressed tar, see [`Layer`]) and `config` as the image config's
/// `config` object (`Entrypoint`, `Cmd`, `Env`, `Labels`, ...). The index names it `name` (the
/// `io.containerd.image.name` annotation, the name `ctr images import` gives it) and `ref_name`
/// (`org.opencontainers.image.ref.name`, its tag for other OCI tools).
pub fn oci_image_archive(name: &str, ref_name: &str, layer: &[u8], config: serde_json::Value) -> Result<Vec<u8>> {
    let sha = oci_digest;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a },
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer), "size": layer.len()}]
    }))?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest),
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": ref_name}
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
    for blob in [layer, &config, &manifest] {
        add(format!("blobs/sha256/{}", sha(blob).trim_start_matches("sha256:")), blob)?;
    }
    Ok(out.into_inner()?)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read as _;

    use super::*;

    /// The archive's files by path.
    fn entries(tar: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut archive = tar::Archive::new(tar);
        let mut files = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.insert(entry.path().unwrap().to_string_lossy().into_owned(), data);
        }
        files
    }

    #[test]
    fn an_image_archive_links_index_manifest_config_and_layer_by_digest() {
        let mut layer = Layer::new();
        layer.dir("usr").unwrap();
        layer.file("usr/hello", 0o755, b"hello").unwrap();
        layer.symlink("usr/hi", "hello").unwrap();
        let layer = layer.finish().unwrap();
        let archive = oci_image_archive(
            "example.org/hello:1.0",
            "1.0",
            &layer,
            serde_json::json!({"Entrypoint": ["/usr/hello"]}),
        )
        .unwrap();
        let files = entries(&archive);
        assert_eq!(files["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
        for (path, data) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(oci_digest(data), format!("sha256:{hex}"), "{path}");
            }
        }
        let blob = |descriptor: &serde_json::Value| -> Vec<u8> {
            let data =
                files[&format!("blobs/sha256/{}", descriptor["digest"].as_str().unwrap()[7..].to_owned())].clone();
            assert_eq!(descriptor["size"], data.len());
            data
        };
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let [entry] = index["manifests"].as_array().unwrap().as_slice() else { panic!("one manifest") };
        assert_eq!(entry["annotations"]["io.containerd.image.name"], "example.org/hello:1.0");
        assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], "1.0");
        let manifest: serde_json::Value = serde_json::from_slice(&blob(entry)).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&blob(&manifest["config"])).unwrap();
        assert_eq!(blob(&manifest["layers"][0]), layer);
        assert_eq!(config["rootfs"]["diff_ids"][0], oci_digest(&layer));
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/hello");
        assert_eq!(config["os"], "linux");
        let contents = entries(&layer);
        assert_eq!(contents.keys().collect::<Vec<_>>(), ["usr", "usr/hello", "usr/hi"]);
        assert_eq!(contents["usr/hello"], b"hello");
    }
}
