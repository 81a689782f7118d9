//! Where archives go: one [`Store`] trait, a filesystem implementation (the default) and S3.
//!
//! Every archive `<key>` has a small JSON record `<key>.meta.json` beside it ([`ObjectMeta`]: size,
//! whole-archive sha256, per-part sha256, compression, encryption, labels). The record is written only after
//! the archive itself is durable in the store, so it is the commit point: an archive without its
//! record is an unfinished upload and is neither listed nor fetched. (The whole-archive sha256 is
//! only known once the stream ends, after S3 has fixed the object's own metadata, which is why it
//! lives in a record of its own; the object's S3 metadata carries the labels.)

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

use crate::archive::{ArchiveStream, Compression};
use crate::crypt::EncryptionInfo;
use crate::error::{Error, Result};

pub mod fs;
pub mod s3;

pub use self::fs::FsStore;
pub use self::s3::{S3Options, S3Store, StaticCredentials};

/// Suffix of the metadata record stored beside every archive.
pub const META_SUFFIX: &str = ".meta.json";

/// Version of the [`ObjectMeta`] record format.
pub const META_FORMAT: u32 = 1;

/// Label: the bundle's path relative to the node checkpoint directory.
pub const LABEL_BUNDLE: &str = "bundle";
/// Label: the bundle's [`crate::archive::fingerprint`].
pub const LABEL_FINGERPRINT: &str = "fingerprint";
/// Label: the checkpoint time (the bundle directory's RFC3339 name), when it parses.
pub const LABEL_CHECKPOINT_TIME: &str = "checkpoint-time";

/// What the store records about an archive once it is committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Record format version ([`META_FORMAT`]).
    pub format: u32,
    /// Archive size in bytes.
    pub size: u64,
    /// Hex sha256 of the whole archive.
    pub sha256: String,
    /// Compression of the archive (of the plaintext, when it is encrypted).
    pub compression: Compression,
    /// How the archive is encrypted; `None`: it is not. Size and sha256 are of the stored
    /// (encrypted) bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionInfo>,
    /// Multipart part size, for stores that upload in parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_size: Option<u64>,
    /// Hex sha256 of each part, in order, for stores that upload in parts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub part_sha256: Vec<String>,
    /// When the archive was committed (RFC3339, UTC).
    pub stored_at: String,
    /// Free-form labels given at upload (see the `LABEL_*` constants).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// Parses a record, naming `key` in the error.
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Self> {
        let meta: ObjectMeta = serde_json::from_slice(bytes)
            .map_err(|e| Error::Metadata { key: key.to_string(), reason: e.to_string() })?;
        if meta.format != META_FORMAT {
            return Err(Error::Metadata {
                key: key.to_string(),
                reason: format!("record format {} is not supported (this build reads {META_FORMAT})", meta.format),
            });
        }
        Ok(meta)
    }

    /// Serialises the record.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("ObjectMeta always serialises")
    }
}

/// A committed archive in a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store's root/prefix.
    pub key: String,
    /// Its record.
    pub meta: ObjectMeta,
}

/// What a successful [`Store::put`] committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The committed object.
    pub object: ObjectInfo,
    /// Bytes that an earlier, interrupted attempt had already stored and that were not sent again.
    pub reused_bytes: u64,
}

/// An upload request.
#[derive(Clone, Debug)]
pub struct PutRequest {
    /// Destination key relative to the store's root/prefix.
    pub key: String,
    /// Compression of the stream (recorded, not applied).
    pub compression: Compression,
    /// Encryption of the stream (recorded, not applied).
    pub encryption: Option<EncryptionInfo>,
    /// Labels recorded with the object.
    pub labels: BTreeMap<String, String>,
    /// Where a store that can resume keeps its progress (S3: upload id and finished parts).
    pub resume_file: Option<PathBuf>,
}

/// A byte stream read from a store.
pub type ObjectReader = Box<dyn AsyncRead + Send + Unpin>;

/// A place archives are shipped to and fetched from.
#[async_trait]
pub trait Store: Send + Sync {
    /// Where this store is, for logs and errors (never contains credentials).
    fn location(&self) -> String;

    /// Streams `body` into the store under `req.key` and commits it with its record.
    /// Returns only once data and record are durable; on error nothing is committed.
    async fn put(&self, req: &PutRequest, body: ArchiveStream) -> Result<Committed>;

    /// Reads the archive under `key`, or the byte `range` of it.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ObjectReader>;

    /// The committed archive under `key`, if any.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;

    /// Every committed archive whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Deletes the archive under `key` and its record. Errors with [`Error::NotFound`] if absent.
    async fn delete(&self, key: &str) -> Result<()>;
}

/// Checks that `key` is a safe relative object key: non-empty `/`-separated components, none empty,
/// `.`, `..` or hidden (leading `.`), no NUL, and not ending in [`META_SUFFIX`].
pub fn validate_key(key: &str) -> Result<()> {
    let bad = |reason| Err(Error::InvalidKey { key: key.to_string(), reason });
    if key.is_empty() {
        return bad("it is empty");
    }
    if key.starts_with('/') {
        return bad("it must be relative (no leading /)");
    }
    if key.contains('\0') {
        return bad("it contains a NUL byte");
    }
    if key.ends_with(META_SUFFIX) {
        return bad("keys ending in .meta.json are reserved for metadata records");
    }
    for component in key.split('/') {
        if component.is_empty() {
            return bad("it has an empty path component");
        }
        if component == "." || component == ".." {
            return bad("it has a `.` or `..` component");
        }
        if component.starts_with('.') {
            return bad("components must not start with `.` (reserved for temporary files)");
        }
    }
    Ok(())
}

/// Where a store lives, parsed from `file:///dir`, `/dir` or `s3://bucket[/prefix]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// A directory (local disk or shared volume).
    Fs(PathBuf),
    /// An S3 bucket and key prefix (no leading/trailing `/`).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, possibly empty.
        prefix: String,
    },
}

impl StoreLocation {
    /// Parses a store URL.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Config {
            key: "store".into(),
            reason: format!("`{url}`: {reason}; use file:///absolute/dir, /absolute/dir or s3://bucket/prefix"),
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("the bucket name is missing"));
            }
            return Ok(StoreLocation::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() });
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        let path = checkpoint_core::reference::percent_decode(path).ok_or_else(|| bad("bad %-escape"))?;
        if !path.starts_with('/') {
            return Err(bad("the directory must be an absolute path"));
        }
        Ok(StoreLocation::Fs(PathBuf::from(path)))
    }

    /// Opens the store (S3: builds a client from the standard AWS credential chain).
    pub async fn open(&self, s3: &S3Options) -> Result<Arc<dyn Store>> {
        Ok(match self {
            StoreLocation::Fs(dir) => Arc::new(FsStore::new(dir.clone())),
            StoreLocation::S3 { bucket, prefix } => {
                Arc::new(S3Store::connect(bucket.clone(), prefix.clone(), s3.clone()).await?)
            }
        })
    }
}

/// Current time as RFC3339 (UTC, seconds).
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("ns/pod/ctr/2024-01-01T00:00:00Z.tar.zst").is_ok());
        for bad in ["", "/abs", "a//b", "a/../b", "./a", "a/.hidden", "a/b.meta.json", "a\0b"] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn locations_parse() {
        assert_eq!(
            StoreLocation::parse("file:///var/lib/kybernate/store").unwrap(),
            StoreLocation::Fs("/var/lib/kybernate/store".into())
        );
        assert_eq!(StoreLocation::parse("/a%20b").unwrap(), StoreLocation::Fs("/a b".into()));
        assert_eq!(
            StoreLocation::parse("s3://bkt/some/prefix/").unwrap(),
            StoreLocation::S3 { bucket: "bkt".into(), prefix: "some/prefix".into() }
        );
        assert_eq!(
            StoreLocation::parse("s3://bkt").unwrap(),
            StoreLocation::S3 { bucket: "bkt".into(), prefix: String::new() }
        );
        assert!(StoreLocation::parse("s3:///x").is_err());
        assert!(StoreLocation::parse("relative/dir").is_err());
        assert!(StoreLocation::parse("file:///bad%zz").is_err());
    }

    #[test]
    fn meta_round_trips_and_rejects_unknown_format() {
        let meta = ObjectMeta {
            format: META_FORMAT,
            size: 10,
            sha256: "ab".into(),
            compression: Compression::Zstd,
            encryption: None,
            part_size: Some(5),
            part_sha256: vec!["x".into(), "y".into()],
            stored_at: now_rfc3339(),
            labels: BTreeMap::from([(LABEL_BUNDLE.into(), "a/b/c/d".into())]),
        };
        assert_eq!(ObjectMeta::from_json("k", &meta.to_json()).unwrap(), meta);
        let mut other = meta.clone();
        other.format = 99;
        let err = ObjectMeta::from_json("k", &other.to_json()).unwrap_err();
        assert!(err.to_string().contains("format 99"), "{err}");
    }
}
