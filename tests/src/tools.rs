//! The programs the tests need: host tools (checked, never skipped), CRIU, commands run with a
//! timeout, and this workspace's shim binary, built on demand.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The binary containerd starts for [`crate::KYBERNATE_RUNTIME`].
pub const KYBERNATE_SHIM: &str = "containerd-shim-kybernate-v1";
/// The sidecar binary, which the shim runs to fetch remote bundles.
pub const KYBERNATE_SIDECAR: &str = "kybernate-sidecar";
/// The node agent binary's name.
pub const KYBERNATE_AGENT: &str = "kybernate-agent";

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
    BUILT.get_or_init(|| build("kybernate-shim", KYBERNATE_SHIM)).clone().map_err(anyhow::Error::msg)
}

/// The sidecar binary (`kybernate-sidecar`) of this workspace, built like [`kybernate_shim_binary`].
pub fn kybernate_sidecar_binary() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<std::result::Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| build("kybernate-sidecar", KYBERNATE_SIDECAR)).clone().map_err(anyhow::Error::msg)
}

/// The node agent binary (`kybernate-agent`) of this workspace, built like [`kybernate_shim_binary`].
pub fn kybernate_agent_binary() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<std::result::Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| build("kybernate-agent", KYBERNATE_AGENT)).clone().map_err(anyhow::Error::msg)
}

/// `cargo build -p <package> --bin <bin>` into the target directory and profile of the running test.
fn build(package: &str, bin: &str) -> std::result::Result<PathBuf, String> {
    let built = || -> Result<PathBuf> {
        // <target>/<profile>/deps/<test binary>
        let exe = std::env::current_exe()?;
        let profile_dir = exe.parent().and_then(Path::parent).context("locating the target directory")?;
        let target_dir = profile_dir.parent().context("locating the target directory")?;
        let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", package, "--bin", bin])
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
        run_with_timeout(cmd, Duration::from_secs(1200))?.ok(&format!("cargo build -p {package}"))?;
        let binary = profile_dir.join(bin);
        if !binary.is_file() {
            bail!("cargo did not produce {}", binary.display());
        }
        Ok(binary)
    };
    built().map_err(|e| format!("building {bin}: {e:#}"))
}
