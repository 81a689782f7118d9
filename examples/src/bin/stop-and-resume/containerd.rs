//! Just enough containerd for the demo: a private instance (its own root, state, socket and config
//! in a temp dir, so the node's containerd is not touched) that runs Kybernate's shim, a busybox
//! image built from the host's busybox-static (no registry needed), and `ctr` to drive it.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The runtime type that selects Kybernate's shim (`ctr run --runtime`).
pub const KYBERNATE_RUNTIME: &str = "io.containerd.kybernate.v1";
/// The binary containerd looks up on its PATH for [`KYBERNATE_RUNTIME`].
pub const KYBERNATE_SHIM: &str = "containerd-shim-kybernate-v1";
/// The name the busybox image is imported under.
const IMAGE: &str = "docker.io/kybernate/busybox:demo";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A containerd of the demo's own, stopped (with everything it runs) on drop.
pub struct Containerd {
    dir: TempDir,
    namespace: String,
    socket: PathBuf,
    log: PathBuf,
    daemon: Child,
    /// The shim's config file, for `ctr run --runtime-config-path`.
    pub shim_config: PathBuf,
}

impl Containerd {
    /// Starts containerd in `dir` with `shim` (the shim binary) on its PATH and waits until it answers.
    /// The shim gets a private runc root, debug logging and the lines of `shim_settings`.
    pub fn start(dir: TempDir, shim: &Path, shim_settings: &str) -> Result<Self> {
        for tool in ["containerd", "ctr", "runc"] {
            find_on_path(tool).with_context(|| format!("{tool} is missing: run `make deps` (as root)"))?;
        }
        let criu = find_on_path("criu")
            .or_else(|| Some(PathBuf::from("/usr/local/sbin/criu")).filter(|p| p.is_file()))
            .context("CRIU is missing: run `make deps` (as root) to build and install it")?;
        let d = dir.path().to_path_buf();
        let socket = d.join("containerd.sock");
        let config = d.join("containerd.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
# the shim copies containerd's OOM score; a negative one would need CAP_SYS_RESOURCE
oom_score = 0
# the demo drives containerd with ctr: no Kubernetes
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{d}/debug.sock"
  level = "debug"
"#,
                d = d.display(),
                socket = socket.display(),
            ),
        )?;
        let shim_config = d.join("kybernate.toml");
        fs::write(
            &shim_config,
            format!(
                "runc_root = \"{}\"\nlog_level = \"debug\"\ncriu_binary = \"{}\"\n{shim_settings}",
                d.join("runc").display(),
                criu.display()
            ),
        )?;

        // containerd finds the shim next to this program; its log and the shim's go to one file.
        let shim_dir = shim.parent().context("the shim's directory")?;
        let path = format!("{}:{}", shim_dir.display(), std::env::var("PATH").unwrap_or_default());
        let log = d.join("containerd.log");
        let log_file = fs::File::create(&log)?;
        fs::create_dir_all(d.join("xdg"))?;
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            // containerd keeps files it extracts for restores here: inside the temp dir, not /run/user
            .env("XDG_RUNTIME_DIR", d.join("xdg"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting containerd")?;
        // A namespace of this run's own (containerd names the containers' cgroups after it).
        let namespace = d.file_name().and_then(|n| n.to_str()).unwrap_or("kybernate-demo").to_string();
        let containerd = Containerd { dir, namespace, socket, log, daemon, shim_config };
        wait_for("containerd's socket", Duration::from_secs(30), || containerd.socket.exists().then_some(()))
            .and_then(|()| containerd.ctr_ok(&["version"]))
            .with_context(|| format!("containerd did not come up; its log ends:\n{}", containerd.log_tail(40)))?;
        Ok(containerd)
    }

    /// Runs `ctr args` on this containerd and namespace. `timeout` (coreutils) ends a `ctr` that
    /// hangs after two minutes, so the demo fails instead of waiting forever.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        Command::new("timeout")
            .args(["--foreground", "120", "ctr", "--namespace", &self.namespace, "--address"])
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")
    }

    /// Runs `ctr args` and returns what it printed, failing unless it succeeded.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!("ctr {} failed ({}): {}", args.join(" "), out.status, stderr.trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until `ctr tasks ls` shows task `id` with `status` (`RUNNING`, `STOPPED`).
    pub fn wait_task_status(&self, id: &str, status: &str, timeout: Duration) -> Result<()> {
        wait_for(&format!("task {id} to be {status}"), timeout, || {
            let tasks = self.ctr_ok(&["tasks", "ls"]).ok()?;
            // columns: TASK PID STATUS
            let shown = |row: &str| {
                let columns: Vec<&str> = row.split_whitespace().collect();
                columns.first() == Some(&id) && columns.last() == Some(&status)
            };
            tasks.lines().any(shown).then_some(())
        })
    }

    /// The bundle directory of task `id` (containerd mounts the container's rootfs in it).
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.path().join("state/io.containerd.runtime.v2.task").join(&self.namespace).join(id)
    }

    /// The counter that container `id` last wrote to `/state/counter`, if it wrote one.
    pub fn counter(&self, id: &str) -> Option<u64> {
        fs::read_to_string(self.bundle(id).join("rootfs/state/counter")).ok()?.trim().parse().ok()
    }

    /// Imports a one-layer image holding the host's busybox-static (`make deps` installs it) and the
    /// applets the demo's shell loop runs; returns its name.
    pub fn import_busybox(&self) -> Result<&'static str> {
        let work = self.dir.path().join("image");
        let rootfs = work.join("rootfs");
        fs::create_dir_all(rootfs.join("bin"))?;
        for dir in ["dev", "etc", "proc", "state", "sys", "tmp"] {
            fs::create_dir(rootfs.join(dir))?;
        }
        fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .context("copying /bin/busybox: install busybox-static (make deps)")?;
        for applet in ["sh", "echo", "mv", "sleep"] {
            symlink("busybox", rootfs.join("bin").join(applet))?;
        }

        // An OCI image layout: content-addressed blobs, and an index naming the image's manifest.
        let layout = work.join("layout");
        let blobs = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        let blob = |media_type: &str, data: &[u8]| -> Result<Value> {
            let hex = format!("{:x}", Sha256::digest(data));
            fs::write(blobs.join(&hex), data)?;
            Ok(json!({ "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len() }))
        };
        let layer = blob("application/vnd.oci.image.layer.v1.tar", &tar_of(&rootfs)?)?;
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": { "Env": ["PATH=/bin"], "Cmd": ["sh"] },
            // the layer is not compressed: its digest is its diff id
            "rootfs": { "type": "layers", "diff_ids": [layer["digest"]] },
        });
        let config = blob("application/vnd.oci.image.config.v1+json", &serde_json::to_vec(&config)?)?;
        let manifest = json!({ "schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": [layer] });
        let mut manifest = blob(MANIFEST, &serde_json::to_vec(&manifest)?)?;
        manifest["annotations"] =
            json!({ "io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "demo" });
        fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": [manifest] }))?,
        )?;
        fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;

        let archive = work.join("busybox.tar");
        fs::write(&archive, tar_of(&layout)?)?;
        self.ctr_ok(&["images", "import", archive.to_str().context("the temp dir's path")?])?;
        Ok(IMAGE)
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Containerd {
    /// Removes the containers a failed run left, stops containerd, and removes the (empty) cgroups it
    /// made for them: `/<namespace>/<container>` in every hierarchy (cgroup v1 has one per controller).
    fn drop(&mut self) {
        for id in self.ctr_ok(&["containers", "ls", "-q"]).unwrap_or_default().split_whitespace() {
            let _ = self.ctr(&["tasks", "rm", "--force", id]);
            let _ = self.ctr(&["containers", "rm", id]);
        }
        let _ = kill(Pid::from_raw(self.daemon.id() as i32), Signal::SIGTERM);
        if wait_for("containerd to stop", Duration::from_secs(10), || self.daemon.try_wait().ok().flatten()).is_err() {
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
        }
        let cgroup_root = PathBuf::from("/sys/fs/cgroup");
        let hierarchies = fs::read_dir(&cgroup_root).into_iter().flatten().flatten().map(|e| e.path());
        for namespace in hierarchies.chain([cgroup_root.clone()]).map(|h| h.join(&self.namespace)) {
            for container in fs::read_dir(&namespace).into_iter().flatten().flatten() {
                let _ = fs::remove_dir(container.path());
            }
            let _ = fs::remove_dir(namespace);
        }
    }
}

/// Calls `ready` until it returns something, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut ready: impl FnMut() -> Option<T>) -> Result<T> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(value) = ready() {
            return Ok(value);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// `name` in a directory of PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// A tar of what is under `dir`, with symbolic links kept as links.
fn tar_of(dir: &Path) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all("", dir)?;
    Ok(tar.into_inner()?)
}
