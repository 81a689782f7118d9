//! The library's error type. Every variant names what failed, the object it failed on, and what to do.

use std::path::PathBuf;

/// Result alias used throughout checkpoint-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while probing, checkpointing or restoring.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CRIU binary could not be found or started.
    #[error("CRIU not found at {path}: {source}; install CRIU >= {min_version} (run `make deps`) or set its path in the options")]
    CriuMissing {
        /// Where we looked.
        path: PathBuf,
        /// The minimum version we need.
        min_version: String,
        /// Why spawning it failed.
        source: std::io::Error,
    },
    /// CRIU is installed but older than we support.
    #[error("CRIU {found} at {path} is too old: Kybernate needs CRIU >= {min_version} (run `make deps` to build it)")]
    CriuTooOld {
        /// The binary.
        path: PathBuf,
        /// The version it reported.
        found: String,
        /// The minimum version we need.
        min_version: String,
    },
    /// `criu check` (or a feature check) failed: the kernel lacks something CRIU needs.
    #[error("{what}: {detail}")]
    KernelFeature {
        /// The feature or check that failed, in words.
        what: String,
        /// CRIU's output or an explanation with the fix.
        detail: String,
    },
    /// The caller asked for a combination of options that cannot work.
    #[error("invalid checkpoint options: {0}")]
    InvalidOptions(String),
    /// The process to checkpoint does not exist.
    #[error("no process with pid {pid}: nothing to checkpoint (is the workload still running?)")]
    NoSuchProcess {
        /// The pid asked for.
        pid: i32,
    },
    /// A directory we must write into cannot be used.
    #[error("cannot use directory {path}: {reason}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it and what to do.
        reason: String,
    },
    /// A directory does not hold a usable CRIU image.
    #[error("{path} is not a usable checkpoint image: {reason}")]
    BadImage {
        /// The image directory.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// CRIU ran and failed.
    #[error("criu {action} failed ({}); the workload {}; log kept at {}:\n{}", .failure.status, .failure.workload, .failure.log.display(), .failure.output)]
    Criu {
        /// `dump`, `pre-dump` or `restore`.
        action: &'static str,
        /// What happened.
        failure: Box<ToolFailure>,
    },
    /// runc ran and failed.
    #[error("runc {action} of container {id} failed ({}); the container {}; CRIU log kept at {}:\n{}", .failure.status, .failure.workload, .failure.log.display(), .failure.output)]
    Runc {
        /// `checkpoint` or `restore`.
        action: &'static str,
        /// The container id.
        id: String,
        /// What happened.
        failure: Box<ToolFailure>,
    },
    /// A runc lifecycle command (`create`, `start`, `kill`, `state`, ...) ran and failed.
    #[error("runc {action} of {id} failed ({status}): {message}")]
    RuncCommand {
        /// The runc sub-command.
        action: &'static str,
        /// The container id.
        id: String,
        /// How runc exited.
        status: String,
        /// runc's own error message (from its JSON log, else its stderr).
        message: String,
    },
    /// The runc binary could not be started.
    #[error("runc not found at {path}: {source}; install runc (run `make deps`)")]
    RuncMissing {
        /// Where we looked.
        path: PathBuf,
        /// Why spawning it failed.
        source: std::io::Error,
    },
    /// The container is not in a state that allows the operation.
    #[error("container {id} is {state}: {hint}")]
    ContainerState {
        /// The container id.
        id: String,
        /// The state runc reported (or "absent").
        state: String,
        /// What the caller can do.
        hint: String,
    },
    /// A bundle reference does not parse.
    #[error(
        "{reference:?} is not a bundle reference: {reason}; use an absolute path, file:///path or s3://bucket/key"
    )]
    Reference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint bundle is incomplete, damaged or of an unknown format.
    #[error("checkpoint bundle {path} is unusable: {reason}")]
    Bundle {
        /// The bundle directory.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// CRIU's dump succeeded but a later step of the checkpoint did not: the bundle is marked
    /// `PARTIAL`, its images kept, and the container runs on.
    #[error("checkpoint bundle {path} is partial: {reason}; its CRIU images are kept (a restore takes it with kybernate.io/restore-policy: allow-partial), and the container was thawed")]
    Partial {
        /// The bundle directory.
        path: PathBuf,
        /// What is missing and why.
        reason: String,
    },
    /// A restore this node may not do: a bundle signed by no trusted key, another tenant's bundle
    /// without a grant, a reference outside the restore roots. Nothing was read into CRIU or a rootfs.
    #[error("{subject} is refused: {reason}")]
    Refused {
        /// What was refused (the bundle, the reference).
        subject: String,
        /// Why, and what would allow it.
        reason: String,
    },
    /// A signing or verifying key file cannot be used.
    #[error("key {path} cannot be used: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A GPU-aware checkpoint or restore failed at `step`; `rollback` says what was undone.
    #[error("GPU {step:?} step failed: {detail}; rollback: {rollback}")]
    Gpu {
        /// The step that failed.
        step: GpuStep,
        /// What the driver or CRIU said.
        detail: String,
        /// What was undone so the workload keeps running (or why it could not be).
        rollback: String,
    },
    /// CRIU's lazy-pages daemon of a lazy restore failed to start or ended before every page was in.
    #[error("criu lazy-pages {what}; its log is at {}:\n{tail}", .log.display())]
    LazyPages {
        /// What went wrong.
        what: String,
        /// The daemon's log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// Any other I/O error, with the object it concerned.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, naming the path.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// How a run of CRIU or runc failed, and what became of the workload.
#[derive(Debug)]
pub struct ToolFailure {
    /// How the tool exited (or that it was stopped at its deadline).
    pub status: String,
    /// What became of the workload, e.g. "is still running (pid 42)".
    pub workload: String,
    /// CRIU's full log, kept for inspection.
    pub log: PathBuf,
    /// The tool's own message and the interesting end of CRIU's log.
    pub output: String,
}

impl Error {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// The step of a GPU-aware checkpoint or restore that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuStep {
    /// Choosing how to handle the GPU state, before anything was changed.
    Backend,
    /// Finding a container's GPU processes and describing its GPUs, before anything was changed.
    Discovery,
    /// Checking that this node's GPUs can take a checkpoint's GPU state, before anything was restored.
    Compatibility,
    /// Locking CUDA work (bounded by the lock timeout).
    Lock,
    /// Copying device memory to the host.
    Checkpoint,
    /// The CRIU dump or restore between the GPU steps.
    Criu,
    /// Copying memory back to the device.
    Restore,
    /// Letting CUDA work continue.
    Unlock,
}
