//! The CRIU binary: locating it, its version, and what this kernel lets it do.

pub mod image;
pub mod lazy_pages;
pub mod page_server;
pub mod pagemap;
pub mod stats;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::exec::{SpawnHook, Spawner};

/// The oldest CRIU Kybernate supports (CRIU 3.x fails on recent kernels and lacks the CUDA hooks).
pub const MIN_CRIU_VERSION: CriuVersion = CriuVersion { major: 4, minor: 0, patch: 0 };

/// A CRIU version as printed by `criu --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CriuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level (0 when CRIU prints only two numbers).
    pub patch: u32,
}

impl CriuVersion {
    /// Parses the output of `criu --version` (`Version: 4.1.1`, optionally followed by `GitID: …`).
    pub fn parse(output: &str) -> Option<Self> {
        let line = output.lines().find_map(|l| l.trim().strip_prefix("Version:"))?;
        let mut parts = line.trim().split(['.', '-']).map(|p| p.parse::<u32>());
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let patch = parts.next().and_then(|p| p.ok()).unwrap_or(0);
        Some(CriuVersion { major, minor, patch })
    }
}

impl fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Optional kernel features CRIU can use, checked with `criu check --feature`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Soft-dirty page tracking, needed for pre-dump (iterative, low-downtime checkpoints).
    MemDirtyTrack,
    /// userfaultfd, needed for lazy restore.
    LazyPages,
}

impl Feature {
    fn criu_name(self) -> &'static str {
        match self {
            Feature::MemDirtyTrack => "mem_dirty_track",
            Feature::LazyPages => "uffd-noncoop",
        }
    }

    /// Why the feature matters, for error messages.
    pub fn missing_explanation(self) -> &'static str {
        match self {
            Feature::MemDirtyTrack => {
                "pre-dump needs dirty-page tracking (soft-dirty bits), which this kernel does not provide; \
                 checkpoint without pre_dump, or run on a kernel built with CONFIG_MEM_SOFT_DIRTY"
            }
            Feature::LazyPages => {
                "lazy restore needs non-cooperative userfaultfd, which this kernel does not provide; restore without lazy pages"
            }
        }
    }
}

/// What was learnt about CRIU on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriuInfo {
    /// The binary probed.
    pub binary: PathBuf,
    /// Its version.
    pub version: CriuVersion,
    /// Whether pre-dump is possible (kernel dirty-page tracking).
    pub pre_dump_supported: bool,
}

/// Handle on a CRIU binary, and how its runs are spawned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Criu {
    binary: PathBuf,
    spawner: Spawner,
}

impl Default for Criu {
    fn default() -> Self {
        Criu::from_path()
    }
}

impl Criu {
    /// Uses the CRIU binary at `binary`.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Criu { binary: binary.into(), spawner: Spawner::default() }
    }

    /// The same CRIU, with every run inside a span of `hook` (see [`SpawnHook`]).
    pub fn with_spawn_hook(mut self, hook: Arc<dyn SpawnHook>) -> Self {
        self.spawner = Spawner::hooked(hook);
        self
    }

    /// How this CRIU's runs are spawned.
    pub(crate) fn spawner(&self) -> &Spawner {
        &self.spawner
    }

    /// Uses `criu` as found on `PATH` (or the bare name, which then fails with a clear error).
    pub fn from_path() -> Self {
        Criu::new(find_on_path("criu").unwrap_or_else(|| PathBuf::from("criu")))
    }

    /// The binary this handle runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub(crate) fn command(&self) -> Command {
        Command::new(&self.binary)
    }

    fn output(&self, args: &[&str]) -> Result<std::process::Output> {
        self.spawner.output(self.command().args(args).stdin(std::process::Stdio::null())).map_err(|source| {
            Error::CriuMissing { path: self.binary.clone(), min_version: MIN_CRIU_VERSION.to_string(), source }
        })
    }

    /// The installed version, or an error if CRIU is missing or older than [`MIN_CRIU_VERSION`].
    pub fn version(&self) -> Result<CriuVersion> {
        let out = self.output(&["--version"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = CriuVersion::parse(&text).ok_or_else(|| Error::KernelFeature {
            what: format!("`{} --version`", self.binary.display()),
            detail: format!("unexpected output {:?}; is this really CRIU?", text.trim()),
        })?;
        if version < MIN_CRIU_VERSION {
            return Err(Error::CriuTooOld {
                path: self.binary.clone(),
                found: version.to_string(),
                min_version: MIN_CRIU_VERSION.to_string(),
            });
        }
        Ok(version)
    }

    /// Runs `criu check`: the kernel supports what CRIU needs for a basic dump and restore.
    pub fn check(&self) -> Result<()> {
        let out = self.output(&["check"])?;
        if out.status.success() {
            return Ok(());
        }
        let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        detail.push_str(String::from_utf8_lossy(&out.stdout).trim());
        Err(Error::KernelFeature {
            what: "`criu check` failed: this kernel lacks features CRIU needs".into(),
            detail: format!("{detail}\n(run `criu check --all` for details; a distribution kernel >= 5.x with CONFIG_CHECKPOINT_RESTORE works)"),
        })
    }

    /// Whether this kernel provides an optional feature.
    pub fn has_feature(&self, feature: Feature) -> Result<bool> {
        Ok(self.output(&["check", "--feature", feature.criu_name()])?.status.success())
    }

    /// Fails with an explanation when `feature` is missing.
    pub fn require_feature(&self, feature: Feature) -> Result<()> {
        if self.has_feature(feature)? {
            Ok(())
        } else {
            Err(Error::KernelFeature {
                what: format!("kernel feature {} is missing", feature.criu_name()),
                detail: feature.missing_explanation().into(),
            })
        }
    }

    /// Version, `criu check` and optional features in one go.
    pub fn probe(&self) -> Result<CriuInfo> {
        let version = self.version()?;
        self.check()?;
        Ok(CriuInfo {
            binary: self.binary.clone(),
            version,
            pre_dump_supported: self.has_feature(Feature::MemDirtyTrack)?,
        })
    }
}

/// Finds `name` in the directories of `PATH` (and the sbin directories root uses).
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(CriuVersion::parse("Version: 4.1.1\n"), Some(CriuVersion { major: 4, minor: 1, patch: 1 }));
        assert_eq!(
            CriuVersion::parse("Version: 3.17\nGitID: v3.17\n"),
            Some(CriuVersion { major: 3, minor: 17, patch: 0 })
        );
        assert_eq!(CriuVersion::parse("hello"), None);
        assert!(CriuVersion { major: 3, minor: 17, patch: 0 } < MIN_CRIU_VERSION);
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = Criu::new("/nonexistent/criu").version().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/criu") && err.contains("make deps"), "{err}");
    }
}
