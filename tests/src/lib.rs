//! Helpers shared by Kybernate's end-to-end tests: process supervision, workload state, and locally
//! built container bundles (no registry is needed).

use std::fs;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

pub mod cri;

/// Makes this test process the subreaper of everything it starts, so that re-parented container and
/// restored processes are ours to wait for (PID 1 on CI machines may not reap orphans).
pub fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills `pid` with SIGKILL and reaps it. Only named pids are ever reaped: a `waitpid(-1)` would steal
/// the exit status of a CRIU or runc run by a test on another thread.
pub fn kill_and_reap(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(pid), None);
}

/// Reaps `pid` if it has exited (it must be our child, or re-parented to us as subreaper).
pub fn reap_if_exited(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// What `kybernate-test-workload` last wrote to its state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadState {
    /// Iterations so far.
    pub counter: u64,
    /// Checksum of the pattern it filled its memory with.
    pub checksum: String,
    /// Whether its memory still matched that checksum.
    pub mem_ok: bool,
    /// Its pid.
    pub pid: i32,
}

impl WorkloadState {
    /// Reads the state file, `None` while it does not exist yet.
    pub fn read(path: &Path) -> Option<Self> {
        let text = fs::read_to_string(path).ok()?;
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')).map(str::to_string))
        };
        Some(WorkloadState {
            counter: field("counter")?.parse().ok()?,
            checksum: field("checksum")?,
            mem_ok: field("mem_ok")? == "1",
            pid: field("pid")?.parse().ok()?,
        })
    }

    /// Waits until the counter passes `min`.
    pub fn wait_past(path: &Path, min: u64) -> Result<Self> {
        wait_for(&format!("counter in {} to pass {min}", path.display()), Duration::from_secs(20), || {
            Self::read(path).filter(|s| s.counter > min)
        })
    }
}

/// Starts `binary state_file mem_mib` in a session of its own with stdio on /dev/null, as CRIU wants a
/// self-contained process tree. Returns its pid; it is a child of this process.
pub fn spawn_workload(binary: &Path, state: &Path, mem_mib: u32) -> Result<i32> {
    let child = unsafe {
        Command::new(binary)
            .arg(state)
            .arg(mem_mib.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from))
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?
    };
    Ok(child.id() as i32)
}

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

/// A container run directly with runc (`runc run --detach`) under a private state root, with its
/// stdout and stderr on a pipe as containerd would wire them. Killed and deleted on drop.
pub struct RuncContainer {
    /// runc's state root.
    pub root: PathBuf,
    /// Container id.
    pub id: String,
    /// The OCI bundle.
    pub bundle: PathBuf,
    /// Host pid of the init process.
    pub pid: i32,
    /// Read end of the container's stdout/stderr pipe, kept open so the container never gets SIGPIPE.
    _output: std::os::fd::OwnedFd,
}

impl RuncContainer {
    /// Runs the bundle as container `id` under runc state root `root`.
    pub fn run(root: &Path, id: &str, bundle: &Path) -> Result<Self> {
        Self::run_with_stdout(root, id, bundle, None)
    }

    /// Like [`RuncContainer::run`], with the container's stdout sent to `stdout` instead of the pipe.
    pub fn run_with_stdout(root: &Path, id: &str, bundle: &Path, stdout: Option<fs::File>) -> Result<Self> {
        become_subreaper();
        let (read, write) = nix::unistd::pipe()?;
        let stdout = match stdout {
            Some(file) => Stdio::from(file),
            None => Stdio::from(write.try_clone()?),
        };
        let pid_file = bundle.join(format!("{id}.pid"));
        let status = Command::new("runc")
            .arg("--root")
            .arg(root)
            .args(["run", "--detach", "--pid-file"])
            .arg(&pid_file)
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(write)
            .status()
            .context("running runc")?;
        if !status.success() {
            bail!("runc run {id} failed: {status}");
        }
        let pid = fs::read_to_string(&pid_file)?.trim().parse()?;
        Ok(RuncContainer { root: root.to_path_buf(), id: id.into(), bundle: bundle.to_path_buf(), pid, _output: read })
    }

    /// Adopts a container that was restored (rather than run) under `root`.
    pub fn adopt(root: &Path, id: &str, bundle: &Path, pid: i32) -> Self {
        let (read, _) = nix::unistd::pipe().expect("pipe");
        RuncContainer { root: root.to_path_buf(), id: id.into(), bundle: bundle.to_path_buf(), pid, _output: read }
    }

    /// `runc state`'s status word, or `None` when runc no longer knows the container.
    pub fn status(&self) -> Option<String> {
        let out = Command::new("runc").arg("--root").arg(&self.root).args(["state", &self.id]).output().ok()?;
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        state["status"].as_str().map(str::to_string)
    }

    /// `runc delete --force`, then reaps the init process.
    pub fn delete(&self) {
        let _ = Command::new("runc").arg("--root").arg(&self.root).args(["delete", "--force", &self.id]).status();
        let _ = waitpid(Pid::from_raw(self.pid), None);
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        self.delete();
    }
}

// ---------------------------------------------------------------------------------------------------
// A private containerd for the shim tests: own root, state, sockets and config in a temp dir, the
// Kybernate shim on its PATH, and a busybox image built locally (no registry).
// ---------------------------------------------------------------------------------------------------

/// The runtime type of Kybernate's shim.
pub const KYBERNATE_RUNTIME: &str = "io.containerd.kybernate.v1";
/// The binary containerd starts for [`KYBERNATE_RUNTIME`].
pub const KYBERNATE_SHIM: &str = "containerd-shim-kybernate-v1";
/// Name under which [`Containerd::import_busybox`] imports the test image.
pub const BUSYBOX_IMAGE: &str = "docker.io/kybernate/busybox:test";

/// Fails (never skips) unless each of `tools` is found on PATH or as an absolute path.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            if t.starts_with('/') {
                !Path::new(t).is_file()
            } else {
                !std::env::split_paths(&path).any(|dir| dir.join(t).is_file())
            }
        })
        .collect();
    if !missing.is_empty() {
        bail!("required tools are missing: {}; run `make deps` (as root) to install them", missing.join(", "));
    }
    Ok(())
}

/// The CRIU the tests use: `criu` on PATH, else where `make deps` installs it; fails if neither exists.
pub fn find_criu() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("criu"))
        .chain([PathBuf::from("/usr/local/sbin/criu")])
        .find(|p| p.is_file())
        .context("CRIU is missing: run `make deps` (as root) to build and install it")
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct CmdOutput {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CmdOutput {
    /// Fails with both outputs unless the command exited 0.
    pub fn ok(self, what: &str) -> Result<String> {
        if self.code != Some(0) {
            bail!("{what} exited {:?}\nstdout: {}\nstderr: {}", self.code, self.stdout, self.stderr);
        }
        Ok(self.stdout)
    }
}

/// Runs `cmd` with stdout and stderr captured, killing it (and failing) after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<CmdOutput> {
    use std::io::Read;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(CmdOutput {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Builds (once per test process, incrementally) and returns the shim binary of this workspace, in
/// the target directory and profile the running test was built with.
pub fn kybernate_shim_binary() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<std::result::Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_shim().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("building {KYBERNATE_SHIM}: {e}"))
}

fn build_shim() -> Result<PathBuf> {
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("locating the target directory")?;
    let target_dir = profile_dir.parent().context("locating the target directory")?;
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "kybernate-shim", "--bin", KYBERNATE_SHIM])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    run_with_timeout(cmd, Duration::from_secs(1200))?.ok("cargo build -p kybernate-shim")?;
    let binary = profile_dir.join(KYBERNATE_SHIM);
    if !binary.is_file() {
        bail!("cargo did not produce {}", binary.display());
    }
    Ok(binary)
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

/// Pids of live processes whose command line contains `needle`.
pub fn pids_with_arg(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else { return pids };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) {
            let args = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if args.contains(needle) && alive(pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

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
}

/// What [`Containerd::start_with`] sets up beyond what [`Containerd::start`] does.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// The namespace the helpers use (`ctr`, bundles, runc root); `None`: one unique to the instance.
    pub namespace: Option<String>,
    /// containerd config (version 2) tables for the CRI plugin, appended to the config; `None`
    /// disables the plugin.
    pub cri_plugin: Option<String>,
    /// Lines appended to the shim config.
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
        require_tools(&["containerd", "ctr", "runc"])?;
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
        fs::write(
            &shim_config,
            format!(
                "runc_root = \"{}\"\nlog_level = \"debug\"\ncriu_binary = \"{}\"\n{}",
                runc_root.display(),
                criu.display(),
                options.shim_config,
            ),
        )?;
        let log = d.join("containerd.log");
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        // containerd 1.6 extracts checkpoints for restore into $XDG_RUNTIME_DIR and never removes them.
        let xdg = d.join("xdg");
        fs::create_dir_all(&xdg)?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("XDG_RUNTIME_DIR", &xdg)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting containerd")?;
        let mut me = Containerd { dir, socket, namespace, shim_config, runc_root: PathBuf::new(), log, child };
        me.runc_root = runc_root.join(&me.namespace);
        wait_for("containerd to answer", Duration::from_secs(30), || {
            me.ctr_run(&["version"], Duration::from_secs(10)).ok().filter(|o| o.code == Some(0)).map(drop)
        })
        .with_context(|| format!("containerd log:\n{}", me.log_tail(40)))?;
        Ok(me)
    }

    /// The last `n` lines of containerd's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// A `ctr` command for this containerd and namespace.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
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

/// Children of `parent` that exited but were not waited for (zombies).
pub fn zombie_children(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
            let Some((_, rest)) = stat.rsplit_once(')') else { return false };
            let mut fields = rest.split_whitespace();
            fields.next() == Some("Z") && fields.next().and_then(|p| p.parse::<i32>().ok()) == Some(parent)
        })
        .collect()
}
