//! Shipping one bundle: check `COMPLETE`, skip what was already shipped, stream the archive into
//! the store, then record the shipment durably.
//!
//! The sidecar's own state lives in `<checkpoint dir>/.kybernate-sidecar/` (outside every bundle,
//! so bundles stay byte-for-byte what the shim wrote):
//! - `shipped/<bundle path>.json`: written atomically once the store confirmed the upload;
//! - `uploads/<bundle path>.json`: an S3 upload's resume file while it is in progress;
//! - `encryption/<bundle path>.json`: the nonce of an encrypted upload in progress, so that a retry
//!   re-encrypts to the very same bytes (and an S3 upload resumes) — used again only for the same
//!   key and the same archive ([`stream_identity`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use checkpoint_core::bundle::is_complete;
use serde::{Deserialize, Serialize};

use crate::archive::{archive_bundle, fingerprint, stream_identity, ArchiveOptions, Progress};
use crate::crypt::{Key, KeyId, Keyring, Sealing, NONCE_PREFIX_LEN, SUFFIX};
use crate::error::{Error, Result};
use crate::fsutil::{remove_if_exists, write_atomic};
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

    /// Where the nonce of an encrypted upload of bundle `rel` in progress lives.
    pub fn sealing_path(&self, rel: &str) -> PathBuf {
        self.root.join("encryption").join(format!("{rel}.json"))
    }

    /// What the archive of bundle `rel` (identity `identity`) is encrypted with: the nonce of an
    /// earlier attempt at the very same archive with the same key, else a fresh one, recorded
    /// before anything is sent.
    fn sealing(&self, rel: &str, key: &Arc<Key>, identity: &str) -> Result<Sealing> {
        let path = self.sealing_path(rel);
        let earlier = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<SealingRecord>(&b).ok());
        if let Some(r) = earlier.filter(|r| r.key_id == key.id() && r.identity == identity) {
            let mut nonce = [0u8; NONCE_PREFIX_LEN];
            if hex::decode_to_slice(&r.nonce, &mut nonce).is_ok() {
                return Ok(Sealing::with_nonce(key.clone(), nonce));
            }
        }
        let sealing = Sealing::fresh(key.clone())?;
        let record =
            SealingRecord { key_id: key.id(), identity: identity.to_string(), nonce: hex::encode(sealing.nonce()) };
        write_atomic(&path, &serde_json::to_vec_pretty(&record).expect("SealingRecord always serialises"))?;
        Ok(sealing)
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

    /// Records the shipment, then forgets the nonce of the upload.
    fn mark_shipped(&self, rel: &str, record: &ShippedRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(record).expect("ShippedRecord always serialises");
        write_atomic(&self.shipped_path(rel), &json)?;
        remove_if_exists(&self.sealing_path(rel))
    }
}

/// The nonce of an encrypted upload in progress (public, like the header that holds it).
#[derive(Serialize, Deserialize)]
struct SealingRecord {
    key_id: KeyId,
    identity: String,
    nonce: String,
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
    /// Keys: with an encryption key, every archive is encrypted with it.
    pub keys: Keyring,
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

/// The object key of bundle `rel` (its path relative to the checkpoint directory), with
/// [`SUFFIX`] when it is `encrypted`.
pub fn object_key(rel: &str, archive: &ArchiveOptions, encrypted: bool) -> String {
    format!("{rel}{}{}", archive.compression.suffix(), if encrypted { SUFFIX } else { "" })
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
    let encryption_key = opts.keys.encryption_key();
    let key = object_key(rel, &opts.archive, encryption_key.is_some());
    let fp = fingerprint(bundle)?;
    if !opts.force {
        if let Some(existing) = store.head(&key).await? {
            let same_key = existing.meta.encryption.as_ref().map(|e| e.key_id) == encryption_key.map(|k| k.id());
            if existing.meta.labels.get(LABEL_FINGERPRINT) == Some(&fp) && same_key {
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
    let sealing = match encryption_key {
        Some(k) => Some(opts.state.sealing(rel, k, &stream_identity(bundle, &opts.archive)?)?),
        None => None,
    };
    let req = PutRequest {
        key: key.clone(),
        compression: opts.archive.compression,
        encryption: sealing.as_ref().map(Sealing::info),
        labels,
        resume_file: Some(opts.state.resume_path(rel)),
    };
    let started = Instant::now();
    let key_id = encryption_key.map(|k| k.id().to_string());
    tracing::info!(
        bundle = %bundle.display(), location = %store.location(), %key, encryption_key_id = key_id.as_deref(),
        "shipping bundle"
    );
    let body = archive_bundle(bundle, &opts.archive, sealing, opts.progress.clone());
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
