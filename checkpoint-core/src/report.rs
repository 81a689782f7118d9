//! What a checkpoint or restore measured.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::criu::stats;
use crate::criu::CriuVersion;
use crate::error::Result;

/// CRIU's page size on the architectures we support.
const PAGE_SIZE: u64 = 4096;

/// Timings of a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointTimings {
    /// Time to freeze the process tree.
    pub freeze: Duration,
    /// Time spent collecting memory while frozen.
    pub dump: Duration,
    /// Time spent writing memory pages to the image.
    pub write: Duration,
    /// How long the workload was frozen.
    pub frozen: Duration,
    /// Wall time of the whole operation, as seen by the caller.
    pub total: Duration,
}

/// The result of a successful checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// Where the CRIU images are.
    pub image_dir: PathBuf,
    /// CRIU's log of the dump.
    pub log: PathBuf,
    /// How long each phase took.
    pub timings: CheckpointTimings,
    /// Pages CRIU scanned.
    pub pages_scanned: u64,
    /// Pages CRIU wrote.
    pub pages_written: u64,
    /// Bytes of memory pages written (`pages_written` × page size).
    pub memory_bytes: u64,
    /// Total size of the image directory in bytes.
    pub image_bytes: u64,
    /// The CRIU that wrote the images.
    pub criu_version: CriuVersion,
}

/// CRIU's statistics from `path`, or zeros when it wrote none or they cannot be read: they describe
/// a dump or restore that succeeded, and are never a reason to fail it.
fn read_or_default<T: Default>(path: &Path, read: fn(&Path) -> Result<T>) -> T {
    if !path.exists() {
        return T::default();
    }
    read(path).unwrap_or_else(|e| {
        tracing::warn!(stats = %path.display(), error = %e, "CRIU's statistics cannot be read; reporting no timings");
        T::default()
    })
}

impl CheckpointReport {
    /// Builds a report from CRIU's statistics file, if it wrote one.
    pub(crate) fn collect(
        image_dir: &Path,
        work_dir: &Path,
        log: PathBuf,
        total: Duration,
        criu_version: CriuVersion,
    ) -> Result<Self> {
        let s = read_or_default(&work_dir.join(stats::STATS_DUMP_FILE), stats::read_dump_stats);
        Ok(CheckpointReport {
            image_dir: image_dir.to_path_buf(),
            log,
            timings: CheckpointTimings {
                freeze: s.freezing,
                dump: s.memdump,
                write: s.memwrite,
                frozen: s.frozen,
                total,
            },
            pages_scanned: s.pages_scanned,
            pages_written: s.pages_written,
            memory_bytes: s.pages_written * PAGE_SIZE,
            image_bytes: crate::fsutil::dir_size(image_dir)?,
            criu_version,
        })
    }
}

/// Timings of a restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreTimings {
    /// Time CRIU spent forking the process tree.
    pub forking: Duration,
    /// Time CRIU spent restoring state.
    pub restore: Duration,
    /// Wall time of the whole operation, as seen by the caller.
    pub total: Duration,
}

/// The result of a successful restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Host pid of the restored root process.
    pub pid: i32,
    /// CRIU's log of the restore.
    pub log: PathBuf,
    /// How long each phase took.
    pub timings: RestoreTimings,
    /// Pages restored.
    pub pages_restored: u64,
}

impl RestoreReport {
    pub(crate) fn collect(pid: i32, work_dir: &Path, log: PathBuf, total: Duration) -> Result<Self> {
        let s = read_or_default(&work_dir.join(stats::STATS_RESTORE_FILE), stats::read_restore_stats);
        Ok(RestoreReport {
            pid,
            log,
            timings: RestoreTimings { forking: s.forking, restore: s.restore, total },
            pages_restored: s.pages_restored,
        })
    }
}
