//! A private containerd for the shim tests: own root, state, sockets and config in a temp dir, the
//! Kybernate shim on its PATH, and a busybox image built locally (no registry).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

use crate::images::busybox_oci_image;
use crate::process::{become_subreaper, kill_and_reap, pids_with_arg, wait_for};
use crate::tools::{find_criu, require_tools, run_with_timeout, CmdOutput, KYBERNATE_SHIM};

/// The environment variable naming the directory of the `containerd` and `ctr` binaries the tests
/// run (`make test` sets it to `make deps`' containerd 1.7 for a second pass); unset: `PATH`'s.
pub const CONTAINERD_BIN_ENV: &str = "KYBERNATE_TEST_CONTAINERD_BIN";

/// `containerd` or `ctr` (`tool`) of the containerd under test (see [`CONTAINERD_BIN_ENV`]).
pub fn containerd_tool(tool: &str) -> PathBuf {
    match std::env::var_os(CONTAINERD_BIN_ENV) {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join(tool),
        _ => PathBuf::from(tool),
    }
}

/// The runtime type of Kybernate's shim.
pub const KYBERNATE_RUNTIME: &str = "io.containerd.kybernate.v1";
/// Name under which [`Containerd::import_busybox`] imports the test image.
pub const BUSYBOX_IMAGE: &str = "docker.io/kybernate/busybox:test";

/// A private containerd (root, state, sockets, config in a temp dir) with the Kybernate shim on its
/// PATH, driven with `ctr`. On drop, every task is removed, containerd is stopped, and any shim or
/// container left over is killed and reaped.
pub struct Containerd {
    /// Everything of this instance lives here.
    pub dir: tempfile::TempDir,
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The containerd namespace the tests use.
    pub namespace: String,
    /// A shim config file (private runc root, debug logging), for `--runtime-config-path`.
    pub shim_config: PathBuf,
    /// runc's state root for this namespace (from the shim config).
    pub runc_root: PathBuf,
    /// containerd's log (its stderr, including the shims' logs).
    pub log: PathBuf,
    child: std::process::Child,
    daemon: Command,
}

/// What [`Containerd::start_with`] sets up beyond what [`Containerd::start`] does.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// The namespace the helpers use (`ctr`, bundles, runc root); `None`: one unique to the instance.
    pub namespace: Option<String>,
    /// containerd config (version 2) tables for the CRI plugin, appended to the config; `None`
    /// disables the plugin.
    pub cri_plugin: Option<String>,
    /// Lines of the shim config; a key set here replaces the instance's default for it.
    pub shim_config: String,
}

impl Containerd {
    /// Starts containerd with `shim` (the shim binary) on its PATH and waits until it answers.
    pub fn start(shim: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kt-").tempdir_in("/tmp")?;
        Self::start_with(dir, shim, &ContainerdOptions::default())
    }

    /// Like [`Containerd::start`], in `dir` (the options may name paths in it), with `options`.
    pub fn start_with(dir: tempfile::TempDir, shim: &Path, options: &ContainerdOptions) -> Result<Self> {
        let (containerd, ctr) = (containerd_tool("containerd"), containerd_tool("ctr"));
        require_tools(&[&containerd.to_string_lossy(), &ctr.to_string_lossy(), "runc"])?;
        let criu = find_criu()?;
        become_subreaper();
        start_shim_reaper();
        let d = dir.path();
        let bin = d.join("bin");
        fs::create_dir_all(&bin)?;
        symlink(shim, bin.join(KYBERNATE_SHIM))?;
        let socket = d.join("containerd.sock");
        let namespace = options.namespace.clone().unwrap_or_else(|| {
            format!("kt{}", d.file_name().and_then(|n| n.to_str()).unwrap_or("x").trim_start_matches("kt-"))
        });
        let config = d.join("containerd.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 # the shim copies this score; a negative one needs CAP_SYS_RESOURCE\noom_score = 0\n\
                 {disabled}\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"{d}/debug.sock\"\n  level = \"debug\"\n{cri}",
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = socket.display(),
                d = d.display(),
                disabled = if options.cri_plugin.is_some() {
                    ""
                } else {
                    "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
                },
                cri = options.cri_plugin.as_deref().unwrap_or_default(),
            ),
        )?;
        let runc_root = d.join("runc");
        let shim_config = d.join("kybernate.toml");
        // The node's own signing key, as `make deps` creates one.
        let keys = d.join("keys");
        fs::create_dir_all(keys.join("trusted"))?;
        let signing_key = keys.join("signing.key");
        checkpoint_core::trust::SigningKey::generate()?.write(&signing_key, &keys.join("signing.pub"))?;
        // The instance's defaults (TOML values), unless the options set the same key. Restores may come
        // from anywhere in the instance's directory.
        let quoted = |p: &Path| format!("{:?}", p.display().to_string());
        let defaults = [
            ("runc_root", quoted(&runc_root)),
            ("log_level", "\"debug\"".into()),
            ("criu_binary", quoted(&criu)),
            ("signing_key", quoted(&signing_key)),
            ("trusted_keys", format!("[{}]", quoted(&keys.join("trusted")))),
            ("restore_roots", format!("[{}]", quoted(d))),
        ];
        let set_by_options =
            |key: &str| options.shim_config.lines().any(|l| l.split('=').next().map(str::trim) == Some(key));
        let mut text: String = defaults
            .iter()
            .filter(|(key, _)| !set_by_options(key))
            .map(|(key, value)| format!("{key} = {value}\n"))
            .collect();
        text.push_str(&options.shim_config);
        fs::write(&shim_config, text)?;
        let log = d.join("containerd.log");
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        // containerd 1.6 extracts checkpoints for restore into $XDG_RUNTIME_DIR and never removes them.
        let xdg = d.join("xdg");
        fs::create_dir_all(&xdg)?;
        let mut daemon = Command::new(&containerd);
        daemon.arg("--config").arg(&config).env("PATH", path).env("XDG_RUNTIME_DIR", &xdg).stdin(Stdio::null());
        fs::File::create(&log)?;
        let child = spawn_logging(&mut daemon, &log)?;
        let mut me = Containerd { dir, socket, namespace, shim_config, runc_root: PathBuf::new(), log, child, daemon };
        me.runc_root = runc_root.join(&me.namespace);
        me.wait_answering()?;
        Ok(me)
    }

    /// Stops containerd (SIGTERM, as a service restart does) and starts it again with the same
    /// config and state; the shims keep running, and containerd reconnects to them.
    pub fn restart(&mut self) -> Result<()> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        wait_for("containerd to stop", Duration::from_secs(30), || self.child.try_wait().ok().flatten())?;
        self.child = spawn_logging(&mut self.daemon, &self.log)?;
        self.wait_answering()
    }

    fn wait_answering(&self) -> Result<()> {
        wait_for("containerd to answer", Duration::from_secs(30), || {
            self.ctr_run(&["version"], Duration::from_secs(10)).ok().filter(|o| o.code == Some(0)).map(drop)
        })
        .with_context(|| format!("containerd log:\n{}", self.log_tail(40)))
    }

    /// The last `n` lines of containerd's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Points the helpers (`ctr`, bundles, runc root) at containerd namespace `namespace`, another
    /// tenant on the same node, and imports the busybox image there.
    pub fn use_namespace(&mut self, namespace: &str) -> Result<&'static str> {
        self.namespace = namespace.to_string();
        self.runc_root = self.runc_root.with_file_name(namespace);
        self.import_busybox()
    }

    /// A `ctr` command for this containerd and namespace.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(containerd_tool("ctr"));
        cmd.arg("--address").arg(&self.socket).arg("--namespace").arg(&self.namespace);
        cmd
    }

    /// Runs `ctr <args>` with a timeout.
    pub fn ctr_run(&self, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
        let mut cmd = self.ctr();
        cmd.args(args);
        run_with_timeout(cmd, timeout)
    }

    /// Runs `ctr <args>` and returns its stdout, failing unless it exits 0.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        self.ctr_run(args, Duration::from_secs(120))?.ok(&format!("ctr {}", args.join(" ")))
    }

    /// Builds a busybox image (an OCI layout with one layer from the host's busybox-static) and imports it.
    pub fn import_busybox(&self) -> Result<&'static str> {
        let tar = self.dir.path().join("busybox-oci.tar");
        fs::write(&tar, busybox_oci_image(BUSYBOX_IMAGE)?)?;
        self.ctr_ok(&["images", "import", tar.to_str().context("temp path")?])?;
        Ok(BUSYBOX_IMAGE)
    }

    /// The status column of `ctr tasks ls` for `id` (`RUNNING`, `STOPPED`, ...), `None` without a task.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["tasks", "ls"]).ok()?;
        out.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().map(|s| s.to_string())).flatten()
        })
    }

    /// Waits until the task `id` reports `status`.
    pub fn wait_task_status(&self, id: &str, status: &str, timeout: Duration) -> Result<()> {
        wait_for(&format!("task {id} to be {status}"), timeout, || {
            (self.task_status(id).as_deref() == Some(status)).then_some(())
        })
    }

    /// The bundle directory containerd made for task `id`.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.path().join("state/io.containerd.runtime.v2.task").join(&self.namespace).join(id)
    }

    /// Path of a blob in containerd's content store.
    pub fn blob(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join("root/io.containerd.content.v1.content/blobs/sha256").join(hex)
    }

    /// The digest of the first manifest of `media_type` in the index of image `reference`.
    pub fn index_entry(&self, reference: &str, media_type: &str) -> Result<String> {
        let listing = self.ctr_ok(&["images", "ls"])?;
        let digest = listing
            .lines()
            .find_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.first() == Some(&reference)).then(|| cols.get(2).map(|s| s.to_string())).flatten()
            })
            .with_context(|| format!("image {reference} not found in:\n{listing}"))?;
        let index: serde_json::Value = serde_json::from_slice(&fs::read(self.blob(&digest))?)?;
        index["manifests"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["mediaType"] == media_type))
            .and_then(|m| m["digest"].as_str().map(str::to_string))
            .with_context(|| format!("image {reference} has no {media_type}: {index}"))
    }

    /// Pids of this instance's shims (they are started with `-address <our socket>`).
    pub fn shim_pids(&self) -> Vec<i32> {
        let address = format!(" -address {} ", self.socket.display());
        pids_with_arg(&address)
            .into_iter()
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        c.split(|b| *b == 0).next().is_some_and(|argv0| {
                            argv0.ends_with(b"containerd-shim-kybernate-v1")
                                || argv0.ends_with(b"containerd-shim-runc-v2")
                        })
                    })
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Pids of this instance's shims started for container `id`.
    pub fn shim_pids_for(&self, id: &str) -> Vec<i32> {
        let arg = format!(" -id {id} ");
        self.shim_pids()
            .into_iter()
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&arg))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Ids of the containers runc knows under this instance's root.
    pub fn runc_containers(&self) -> Vec<String> {
        fs::read_dir(&self.runc_root)
            .map(|d| d.flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Remove every task and container through containerd, so shims shut down cleanly.
        if let Ok(out) = self.ctr_ok(&["tasks", "ls", "-q"]) {
            for id in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = self.ctr_run(&["tasks", "kill", "-s", "SIGKILL", id], Duration::from_secs(10));
                let _ = self.ctr_run(&["tasks", "rm", "-f", id], Duration::from_secs(30));
            }
        }
        if let Ok(out) = self.ctr_ok(&["containers", "ls", "-q"]) {
            for id in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = self.ctr_run(&["containers", "rm", id], Duration::from_secs(30));
            }
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let stopped = wait_for("containerd to stop", Duration::from_secs(10), || self.child.try_wait().ok().flatten());
        if stopped.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Whatever is left: runc containers first (their shims reap them), then the shims.
        for id in self.runc_containers() {
            let _ = Command::new("runc").arg("--root").arg(&self.runc_root).args(["delete", "--force", &id]).status();
        }
        for pid in self.shim_pids() {
            kill_and_reap(pid);
        }
        reap_dead_shims();
        // Mounts the shims or snapshotter may have left under the temp dir.
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let prefix = self.dir.path().display().to_string();
            let mut targets: Vec<&str> =
                mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|t| t.starts_with(&prefix)).collect();
            targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
            for t in targets {
                let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        // The (now empty) cgroups containerd made for this namespace (`/<namespace>/<id>`), in every
        // hierarchy (cgroup v1 has one per controller, v2 one).
        let hierarchies = fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten().map(|e| e.path());
        for dir in hierarchies.chain([PathBuf::from("/sys/fs/cgroup")]) {
            remove_cgroup_tree(&dir.join(&self.namespace));
        }
    }
}

/// Starts `cmd` with stdout and stderr appended to `log`.
fn spawn_logging(cmd: &mut Command, log: &Path) -> Result<std::process::Child> {
    let open = || fs::OpenOptions::new().append(true).open(log);
    cmd.stdout(open()?).stderr(open()?).spawn().context("starting containerd")
}

/// Removes an empty cgroup and its empty children (rmdir, deepest first); busy ones are left alone.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
        let _ = fs::remove_dir(dir);
    }
}

/// Reaps zombie shims re-parented to this (subreaper) test process. Only processes whose name says
/// they are containerd shims are waited for, so no exit status of a command a test waits for is stolen.
fn reap_dead_shims() {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = &stat[open + 1..close];
        let mut rest = stat[close + 1..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next().and_then(|p| p.parse::<i32>().ok()));
        if state == Some("Z") && ppid == Some(me) && comm.starts_with("containerd-shim") {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

fn start_shim_reaper() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| loop {
            reap_dead_shims();
            std::thread::sleep(Duration::from_millis(100));
        });
    });
}
