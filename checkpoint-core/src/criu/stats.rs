//! CRIU's `stats-dump` / `stats-restore` images: timings and page counts of the last operation.
//!
//! The files are CRIU "service" images: a 4-byte service magic, a 4-byte stats magic, then one
//! length-prefixed protobuf `stats_entry` (criu/images/stats.proto).

use std::path::Path;
use std::time::Duration;

use prost::Message;

use crate::error::{Error, Result};

const STATS_MAGIC: u32 = 0x5709_3306;

/// File name CRIU writes after a dump (in its work directory).
pub const STATS_DUMP_FILE: &str = "stats-dump";
/// File name CRIU writes after a restore (in its work directory).
pub const STATS_RESTORE_FILE: &str = "stats-restore";

#[derive(Clone, PartialEq, Message)]
struct DumpStatsEntry {
    #[prost(uint32, required, tag = "1")]
    freezing_time: u32,
    #[prost(uint32, required, tag = "2")]
    frozen_time: u32,
    #[prost(uint32, required, tag = "3")]
    memdump_time: u32,
    #[prost(uint32, required, tag = "4")]
    memwrite_time: u32,
    #[prost(uint64, required, tag = "5")]
    pages_scanned: u64,
    #[prost(uint64, required, tag = "6")]
    pages_skipped_parent: u64,
    #[prost(uint64, required, tag = "7")]
    pages_written: u64,
}

#[derive(Clone, PartialEq, Message)]
struct RestoreStatsEntry {
    #[prost(uint64, required, tag = "1")]
    pages_compared: u64,
    #[prost(uint64, required, tag = "2")]
    pages_skipped_cow: u64,
    #[prost(uint32, required, tag = "3")]
    forking_time: u32,
    #[prost(uint32, required, tag = "4")]
    restore_time: u32,
    #[prost(uint64, optional, tag = "5")]
    pages_restored: Option<u64>,
}

#[derive(Clone, PartialEq, Message)]
struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    dump: Option<DumpStatsEntry>,
    #[prost(message, optional, tag = "2")]
    restore: Option<RestoreStatsEntry>,
}

/// What CRIU measured during a dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DumpStats {
    /// Time spent freezing the tasks.
    pub freezing: Duration,
    /// Time the tasks stayed frozen.
    pub frozen: Duration,
    /// Time spent collecting memory pages.
    pub memdump: Duration,
    /// Time spent writing memory pages.
    pub memwrite: Duration,
    /// Pages looked at.
    pub pages_scanned: u64,
    /// Pages not written because a parent (pre-dump) image had them.
    pub pages_skipped_parent: u64,
    /// Pages written to the image.
    pub pages_written: u64,
}

/// What CRIU measured during a restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreStats {
    /// Time spent forking the process tree.
    pub forking: Duration,
    /// Time spent restoring.
    pub restore: Duration,
    /// Pages restored.
    pub pages_restored: u64,
}

fn read_entry(path: &Path) -> Result<StatsEntry> {
    let entries = super::image::read_entries(path, super::image::SERVICE_MAGIC, STATS_MAGIC)?;
    let body = entries
        .first()
        .ok_or_else(|| Error::BadImage { path: path.to_path_buf(), reason: "stats image holds no entry".into() })?;
    StatsEntry::decode(body.as_slice())
        .map_err(|e| Error::BadImage { path: path.to_path_buf(), reason: format!("stats entry does not decode: {e}") })
}

fn micros(us: u32) -> Duration {
    Duration::from_micros(u64::from(us))
}

/// Reads a `stats-dump` file.
pub fn read_dump_stats(path: &Path) -> Result<DumpStats> {
    let d = read_entry(path)?.dump.ok_or_else(|| Error::BadImage {
        path: path.to_path_buf(),
        reason: "stats file holds no dump statistics".into(),
    })?;
    Ok(DumpStats {
        freezing: micros(d.freezing_time),
        frozen: micros(d.frozen_time),
        memdump: micros(d.memdump_time),
        memwrite: micros(d.memwrite_time),
        pages_scanned: d.pages_scanned,
        pages_skipped_parent: d.pages_skipped_parent,
        pages_written: d.pages_written,
    })
}

/// Reads a `stats-restore` file.
pub fn read_restore_stats(path: &Path) -> Result<RestoreStats> {
    let r = read_entry(path)?.restore.ok_or_else(|| Error::BadImage {
        path: path.to_path_buf(),
        reason: "stats file holds no restore statistics".into(),
    })?;
    Ok(RestoreStats {
        forking: micros(r.forking_time),
        restore: micros(r.restore_time),
        pages_restored: r.pages_restored.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of a real `stats-dump` written by CRIU 4.1.1 for a small runc container.
    const REAL_DUMP: &[u8] = &[
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x24, 0x00, 0x00, 0x00, 0x0a, 0x22, 0x08, 0x9f, 0x95, 0x06,
        0x10, 0x97, 0xf5, 0x05, 0x18, 0xae, 0x07, 0x20, 0xbb, 0x01, 0x28, 0x2e, 0x30, 0x00, 0x38, 0x20, 0x40, 0x00,
        0x48, 0x00, 0x50, 0x08, 0x58, 0x08, 0x60, 0x00, 0x68, 0x00, 0x70, 0x00,
    ];
    /// Bytes of a real `stats-restore` written by CRIU 4.1.1.
    const REAL_RESTORE: &[u8] = &[
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x0e, 0x00, 0x00, 0x00, 0x12, 0x0c, 0x08, 0x09, 0x10, 0x02,
        0x18, 0x7b, 0x20, 0x85, 0xca, 0x06, 0x28, 0x1e,
    ];

    #[test]
    fn decodes_real_dump_and_restore_stats() {
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join(STATS_DUMP_FILE);
        std::fs::write(&dump, REAL_DUMP).unwrap();
        let stats = read_dump_stats(&dump).unwrap();
        assert_eq!(stats.freezing, Duration::from_micros(101_023));
        assert_eq!(stats.pages_scanned, 46);
        assert_eq!(stats.pages_written, 32);

        let restore = dir.path().join(STATS_RESTORE_FILE);
        std::fs::write(&restore, REAL_RESTORE).unwrap();
        let stats = read_restore_stats(&restore).unwrap();
        assert_eq!(stats.forking, Duration::from_micros(123));
        assert_eq!(stats.pages_restored, 30);
    }

    #[test]
    fn rejects_truncated_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats");
        std::fs::write(&path, &REAL_DUMP[..20]).unwrap();
        assert!(read_dump_stats(&path).unwrap_err().to_string().contains("truncated"));
        std::fs::write(&path, b"not a criu image at all").unwrap();
        assert!(read_dump_stats(&path).unwrap_err().to_string().contains("bad magic"));
        std::fs::write(&path, REAL_RESTORE).unwrap();
        assert!(read_dump_stats(&path).unwrap_err().to_string().contains("no dump statistics"));
    }
}
