//! Typed options for checkpoint and restore, with the defaults containerd's runc shim uses.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How CRIU treats the container's cgroups (runc's `--manage-cgroups-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupsMode {
    /// Restore cgroup properties only when the cgroup is created by CRIU (CRIU's default).
    Soft,
    /// Always restore all cgroup properties.
    Full,
    /// Like full, but fail if a cgroup already exists.
    Strict,
    /// Do not touch cgroups at all.
    Ignore,
}

impl CgroupsMode {
    /// The word CRIU and runc use on their command lines.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupsMode::Soft => "soft",
            CgroupsMode::Full => "full",
            CgroupsMode::Strict => "strict",
            CgroupsMode::Ignore => "ignore",
        }
    }
}

impl std::str::FromStr for CgroupsMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "soft" => Ok(CgroupsMode::Soft),
            "full" => Ok(CgroupsMode::Full),
            "strict" => Ok(CgroupsMode::Strict),
            "ignore" => Ok(CgroupsMode::Ignore),
            other => Err(Error::InvalidOptions(format!(
                "unknown cgroups mode {other:?}: use one of soft, full, strict, ignore"
            ))),
        }
    }
}

/// Namespaces that may be created empty on restore (runc supports only the network namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmptyNamespace {
    /// Create the network namespace but do not restore its interfaces (the runtime sets it up).
    Network,
}

impl EmptyNamespace {
    /// The word runc uses (`--empty-ns network`).
    pub fn runc_name(self) -> &'static str {
        match self {
            EmptyNamespace::Network => "network",
        }
    }

    /// The word CRIU uses (`--empty-ns net`).
    pub fn criu_name(self) -> &'static str {
        match self {
            EmptyNamespace::Network => "net",
        }
    }
}

/// Flags that describe what the checkpointed tree holds; a restore must use the same ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CriuFlags {
    /// Established TCP connections are checkpointed and restored.
    pub tcp_established: bool,
    /// Unix sockets connected to peers outside the tree are allowed.
    pub ext_unix_sk: bool,
    /// A controlling terminal / session outside the tree is allowed (interactive jobs).
    pub shell_job: bool,
    /// File locks are checkpointed and restored.
    pub file_locks: bool,
    /// How cgroups are handled; `None` leaves CRIU's default.
    pub manage_cgroups_mode: Option<CgroupsMode>,
    /// Namespaces created empty on restore.
    pub empty_namespaces: Vec<EmptyNamespace>,
}

impl CriuFlags {
    /// The boolean switches that are set, spelt as both CRIU and runc spell them.
    pub(crate) fn switches(&self) -> Vec<&'static str> {
        [
            (self.tcp_established, "--tcp-established"),
            (self.ext_unix_sk, "--ext-unix-sk"),
            (self.shell_job, "--shell-job"),
            (self.file_locks, "--file-locks"),
        ]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect()
    }

    fn validate(&self) -> Result<()> {
        let mut seen = Vec::new();
        for ns in &self.empty_namespaces {
            if seen.contains(ns) {
                return Err(Error::InvalidOptions(format!(
                    "empty namespace {:?} listed twice: list each namespace once",
                    ns.runc_name()
                )));
            }
            seen.push(*ns);
        }
        Ok(())
    }
}

/// Options for a checkpoint, shared by process and container checkpoints.
///
/// The defaults match what containerd's runc shim passes for `ctr c checkpoint` with no flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointOptions {
    /// Keep the workload running after the dump (otherwise CRIU kills it once the image is written).
    pub leave_running: bool,
    /// Copy memory in a pre-dump pass while the workload runs, then dump only what changed.
    /// Needs the kernel's dirty-page tracking; refused with a clear error where it is missing.
    pub pre_dump: bool,
    /// Where CRIU writes its log and statistics; defaults to the image directory.
    pub work_dir: Option<PathBuf>,
    /// Abandon the dump after this long (the workload is thawed and keeps running). `None` waits for
    /// CRIU however long it takes.
    pub timeout: Option<Duration>,
    /// What the tree holds (must be repeated on restore).
    #[serde(flatten)]
    pub flags: CriuFlags,
}

impl CheckpointOptions {
    /// Rejects combinations that cannot work, before anything runs.
    pub fn validate(&self) -> Result<()> {
        if self.flags.manage_cgroups_mode == Some(CgroupsMode::Strict) && self.leave_running {
            return Err(Error::InvalidOptions(
                "manage_cgroups_mode=strict makes restore fail while the original cgroup still exists, \
                 so it cannot be combined with leave_running: use soft or full"
                    .into(),
            ));
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(Error::InvalidOptions(
                "a checkpoint timeout of zero can never be met: leave it unset or give it a duration".into(),
            ));
        }
        self.flags.validate()
    }
}

/// Options for a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RestoreOptions {
    /// Where CRIU writes its restore log and statistics; defaults to the image directory.
    pub work_dir: Option<PathBuf>,
    /// Give up (and remove what was restored so far) after this long; a damaged image can make CRIU
    /// spin forever. `None` waits indefinitely.
    pub timeout: Option<Duration>,
    /// What the tree holds: the flags it was checkpointed with.
    #[serde(flatten)]
    pub flags: CriuFlags,
}

/// Default for [`RestoreOptions::timeout`]: generous for tens of GiB, finite for a hung CRIU.
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions { work_dir: None, timeout: Some(DEFAULT_RESTORE_TIMEOUT), flags: CriuFlags::default() }
    }
}

impl RestoreOptions {
    /// Restore options matching the flags a checkpoint was taken with.
    pub fn matching(checkpoint: &CheckpointOptions) -> Self {
        RestoreOptions { flags: checkpoint.flags.clone(), ..Default::default() }
    }

    /// Rejects combinations that cannot work, before anything runs.
    pub fn validate(&self) -> Result<()> {
        self.flags.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_are_valid() {
        CheckpointOptions::default().validate().unwrap();
    }

    #[test]
    fn strict_cgroups_with_leave_running_is_rejected() {
        let opts = CheckpointOptions {
            leave_running: true,
            flags: CriuFlags { manage_cgroups_mode: Some(CgroupsMode::Strict), ..Default::default() },
            ..Default::default()
        };
        let err = opts.validate().unwrap_err().to_string();
        assert!(err.contains("strict") && err.contains("leave_running"), "{err}");
    }

    #[test]
    fn duplicate_empty_namespace_is_rejected() {
        let opts = CheckpointOptions {
            flags: CriuFlags { empty_namespaces: vec![EmptyNamespace::Network; 2], ..Default::default() },
            ..Default::default()
        };
        assert!(opts.validate().unwrap_err().to_string().contains("listed twice"));
    }

    #[test]
    fn cgroups_mode_parses_and_rejects_unknown() {
        assert_eq!("full".parse::<CgroupsMode>().unwrap(), CgroupsMode::Full);
        assert!("bogus".parse::<CgroupsMode>().unwrap_err().to_string().contains("soft, full, strict, ignore"));
    }

    #[test]
    fn restore_options_follow_checkpoint_flags() {
        let flags = CriuFlags { tcp_established: true, shell_job: true, ..Default::default() };
        let r = RestoreOptions::matching(&CheckpointOptions { flags, ..Default::default() });
        assert!(r.flags.tcp_established && r.flags.shell_job && !r.flags.file_locks);
        assert_eq!(r.flags.switches(), ["--tcp-established", "--shell-job"]);
    }
}
