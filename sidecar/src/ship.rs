//! Shipping one bundle: check `COMPLETE`, skip what was already shipped, stream the archive into
//! the store, then record the shipment durably.
//!
//! The sidecar's own state lives in `<checkpoint dir>/.kybernate-sidecar/` (outside every bundle,
//! so bundles stay byte-for-byte what the shim wrote):
//! - `shipped/<bundle path>.json`: written atomically once the store confirmed the upload;
//! - `uploads/<bundle path>.json`: an S3 upload's resume file while it is in progress.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use checkpoint_core::bundle::is_complete;
use serde::{Deserialize, Serialize};

use crate::archive::{archive_bundle, fingerprint, ArchiveOptions, Progress};
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use crate::store::{
    now_rfc3339, validate_key, ObjectInfo, PutRequest, Store, LABEL_BUNDLE, LABEL_CHECKPOINT_TIME, LABEL_FINGERPRINT,
};

/// Name of the sidecar's state directory inside the node checkpoint directory.
pub const STATE_DIR_NAME: &str = ".kybernate-sidecar";

/// The durable record that a bundle reached the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippedRecord {
    /// The store it went to.
    pub location: String,
    /// Its key there.
    pub key: String,
    /// Archive size.
    pub size: u64,
    /// Archive sha256 (hex).
    pub sha256: String,
    /// When the shipment was recorded (RFC3339).
    pub shipped_at: String,
}

/// The sidecar's state directory (shipped records and resume files).
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory of the node checkpoint directory `checkpoint_dir`.
    pub fn for_checkpoint_dir(checkpoint_dir: &Path) -> Self {
        StateDir { root: checkpoint_dir.join(STATE_DIR_NAME) }
    }

    /// Where the shipped record of bundle `rel` lives.
    pub fn shipped_path(&self, rel: &str) -> PathBuf {
        self.root.join("shipped").join(format!("{rel}.json"))
    }

    /// Where the resume file of bundle `rel` lives.
    pub fn resume_path(&self, rel: &str) -> PathBuf {
        self.root.join("uploads").join(format!("{rel}.json"))
    }

    /// The shipped record of bundle `rel`, if it was shipped.
    pub fn shipped(&self, rel: &str) -> Result<Option<ShippedRecord>> {
        let path = self.shipped_path(rel);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::Metadata {
                key: path.display().to_string(),
                reason: format!("{e}; delete the file to ship the bundle again"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    fn mark_shipped(&self, rel: &str, record: &ShippedRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(record).expect("ShippedRecord always serialises");
        write_atomic(&self.shipped_path(rel), &json)
    }
}

/// Settings for [`ship_bundle`].
#[derive(Clone)]
pub struct ShipOptions {
    /// How to archive.
    pub archive: ArchiveOptions,
    /// Where shipped records and resume files are kept.
    pub state: StateDir,
    /// Ship even if a shipped record exists.
    pub force: bool,
    /// Told the number of bundle bytes archived as they are read.
    pub progress: Option<Progress>,
}

/// What [`ship_bundle`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum ShipOutcome {
    /// The archive was uploaded and committed.
    Shipped {
        /// The committed object.
        object: ObjectInfo,
        /// Seconds the upload took.
        seconds: f64,
        /// Bytes an earlier interrupted attempt had stored and that were not sent again.
        reused_bytes: u64,
    },
    /// A shipped record already existed; nothing was sent.
    AlreadyShipped(ShippedRecord),
    /// The store already held this exact bundle (same fingerprint); only the record was written.
    AlreadyInStore(ObjectInfo),
}

/// The object key of bundle `rel` (its path relative to the checkpoint directory).
pub fn object_key(rel: &str, archive: &ArchiveOptions) -> String {
    format!("{rel}{}", archive.compression.suffix())
}

/// Ships the bundle directory `bundle`, known to the store as `rel` (its path relative to the node
/// checkpoint directory, e.g. `ns/pod/container/2024-05-01T10:00:00Z`).
///
/// Never ships a bundle without `COMPLETE`. On failure the bundle is untouched and no record is
/// written, so a later attempt ships (or resumes) it again.
pub async fn ship_bundle(store: &dyn Store, bundle: &Path, rel: &str, opts: &ShipOptions) -> Result<ShipOutcome> {
    validate_key(rel)?;
    if !is_complete(bundle) {
        return Err(Error::NotComplete { bundle: bundle.to_path_buf() });
    }
    if !opts.force {
        if let Some(record) = opts.state.shipped(rel)? {
            return Ok(ShipOutcome::AlreadyShipped(record));
        }
    }
    let key = object_key(rel, &opts.archive);
    let fp = fingerprint(bundle)?;
    if !opts.force {
        if let Some(existing) = store.head(&key).await? {
            if existing.meta.labels.get(LABEL_FINGERPRINT) == Some(&fp) {
                opts.state.mark_shipped(rel, &record(store, &existing))?;
                tracing::info!(bundle = %bundle.display(), %key, "bundle already in the store; recorded");
                return Ok(ShipOutcome::AlreadyInStore(existing));
            }
        }
    }
    let mut labels = BTreeMap::from([(LABEL_BUNDLE.to_string(), rel.to_string()), (LABEL_FINGERPRINT.to_string(), fp)]);
    if let Some(t) = rel.rsplit('/').next().and_then(|name| humantime::parse_rfc3339_weak(name).ok()) {
        labels.insert(LABEL_CHECKPOINT_TIME.to_string(), humantime::format_rfc3339_seconds(t).to_string());
    }
    let req = PutRequest {
        key: key.clone(),
        compression: opts.archive.compression,
        labels,
        resume_file: Some(opts.state.resume_path(rel)),
    };
    let started = Instant::now();
    tracing::info!(bundle = %bundle.display(), location = %store.location(), %key, "shipping bundle");
    let body = archive_bundle(bundle, &opts.archive, opts.progress.clone());
    let committed = store.put(&req, body).await?;
    opts.state.mark_shipped(rel, &record(store, &committed.object))?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        bundle = %bundle.display(), %key, size = committed.object.meta.size, seconds,
        reused_bytes = committed.reused_bytes, "bundle shipped"
    );
    Ok(ShipOutcome::Shipped { object: committed.object, seconds, reused_bytes: committed.reused_bytes })
}

fn record(store: &dyn Store, object: &ObjectInfo) -> ShippedRecord {
    ShippedRecord {
        location: store.location(),
        key: object.key.clone(),
        size: object.meta.size,
        sha256: object.meta.sha256.clone(),
        shipped_at: now_rfc3339(),
    }
}

/// Finds bundle directories (those holding a `COMPLETE` marker) under `root`, skipping hidden
/// directories. Returns `(path, path relative to root)` pairs sorted by relative path; does not
/// descend into bundles or deeper than `max_depth`.
pub fn find_complete_bundles(root: &Path, max_depth: usize) -> Vec<(PathBuf, String)> {
    fn visit(root: &Path, dir: &Path, depth: usize, max: usize, out: &mut Vec<(PathBuf, String)>) {
        if depth > 0 && is_complete(dir) {
            if let Some(rel) = dir.strip_prefix(root).ok().and_then(|r| r.to_str()) {
                if validate_key(rel).is_ok() {
                    out.push((dir.to_path_buf(), rel.to_string()));
                }
            }
            return;
        }
        if depth >= max {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if !hidden && entry.file_type().is_ok_and(|t| t.is_dir()) {
                visit(root, &entry.path(), depth + 1, max, out);
            }
        }
    }
    let mut out = Vec::new();
    visit(root, root, 0, max_depth, &mut out);
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}
