//! The checkpoint bundle: one directory per checkpoint, laid out like the archives of Podman, CRI-O and
//! checkpointctl (KEP-2008) plus Kybernate's manifest. See `docs/bundle-format.md`.

use std::path::Path;

/// Written last, by rename, once everything else is durable: the only signal that a bundle may be
/// shipped or restored.
pub const COMPLETE_MARKER: &str = "COMPLETE";
/// Written instead of [`COMPLETE_MARKER`] when a checkpoint was abandoned; holds the reason.
pub const FAILED_MARKER: &str = "FAILED";
/// Kybernate's manifest: format version, versions of the tools, identity, GPU section, file hashes.
pub const MANIFEST_FILE: &str = "kybernate.json";
/// Container identity and checkpoint metadata (Podman/CRI-O field names).
pub const CONFIG_DUMP: &str = "config.dump";
/// The OCI runtime spec of the container.
pub const SPEC_DUMP: &str = "spec.dump";
/// Directory holding CRIU's image files.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Changes in the container's writable layer.
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
/// Paths deleted from the image's layers.
pub const DELETED_FILES: &str = "deleted.files";
/// CRIU's dump statistics.
pub const STATS_DUMP: &str = "stats-dump";

/// Whether `dir` holds a finished bundle (its [`COMPLETE_MARKER`] exists).
pub fn is_complete(dir: &Path) -> bool {
    dir.join(COMPLETE_MARKER).is_file()
}
