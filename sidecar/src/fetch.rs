//! Fetching a bundle for restore: resolve the reference, download (parallel ranged reads, in
//! order), verify size and sha256 against the object's record, extract safely, check `COMPLETE`,
//! publish atomically. Nothing is staged on disk but the extracted files themselves.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use checkpoint_core::bundle::is_complete;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::archive::{Compression, Progress};
use crate::error::{join_error, Error, Result};
use crate::extract::{self, ExtractLimits};
use crate::retry::RetryPolicy;
use crate::store::{percent_decode, validate_key, ObjectInfo, S3Options, Store, StoreLocation, LABEL_BUNDLE};

/// Settings for [`fetch_bundle`].
#[derive(Clone)]
pub struct FetchOptions {
    /// How to reach S3 for `s3://` references (endpoint, region, credentials, retries).
    pub s3: S3Options,
    /// Extraction limits.
    pub limits: ExtractLimits,
    /// Size of each ranged read.
    pub range_size: u64,
    /// Ranged reads in flight.
    pub concurrency: usize,
    /// Told the number of bytes downloaded as they arrive.
    pub progress: Option<Progress>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        let s3 = S3Options::default();
        FetchOptions {
            range_size: s3.part_size,
            concurrency: s3.concurrency,
            s3,
            limits: ExtractLimits::default(),
            progress: None,
        }
    }
}

/// A parsed bundle reference (the value of `kybernate.io/restore-from`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleRef {
    /// A bundle directory already on this node.
    LocalDir(PathBuf),
    /// An archive in a store.
    Object {
        /// The store holding it.
        store: StoreLocation,
        /// Its key in that store.
        key: String,
    },
}

impl BundleRef {
    /// Parses a local path, `file://…` URL or `s3://bucket/key`.
    pub fn parse(reference: &str) -> Result<Self> {
        let bad =
            |reason: &str| Error::InvalidReference { reference: reference.to_string(), reason: reason.to_string() };
        if let Some(rest) = reference.strip_prefix("s3://") {
            let (bucket, key) =
                rest.split_once('/').ok_or_else(|| bad("an s3:// reference needs a key after the bucket"))?;
            if bucket.is_empty() {
                return Err(bad("the bucket name is missing"));
            }
            validate_key(key).map_err(|e| bad(&e.to_string()))?;
            return Ok(BundleRef::Object {
                store: StoreLocation::S3 { bucket: bucket.to_string(), prefix: String::new() },
                key: key.to_string(),
            });
        }
        if reference.contains("://") && !reference.starts_with("file://") {
            return Err(bad("unsupported scheme"));
        }
        let path = reference.strip_prefix("file://").unwrap_or(reference);
        let path = percent_decode(path).ok_or_else(|| bad("bad %-escape"))?;
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        let path = std::path::absolute(&path).map_err(|e| bad(&e.to_string()))?;
        if path.is_dir() {
            return Ok(BundleRef::LocalDir(path));
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
            return Err(bad("not a bundle directory or archive file"));
        };
        Ok(BundleRef::Object { store: StoreLocation::Fs(dir.to_path_buf()), key: name.to_string() })
    }
}

/// Fetches the bundle `reference` into `dest_root` and returns the bundle directory.
///
/// A local bundle directory is returned as it is once its `COMPLETE` marker is checked. An archive
/// (`file://…`, a path to an archive, `s3://bucket/key`) is extracted to
/// `dest_root/<bundle path recorded at upload>` (e.g. `<ns>/<pod>/<container>/<time>`); if that
/// directory already holds a complete bundle it is reused.
pub async fn fetch_bundle(reference: &str, dest_root: &Path, opts: &FetchOptions) -> Result<PathBuf> {
    match BundleRef::parse(reference)? {
        BundleRef::LocalDir(dir) => {
            if is_complete(&dir) {
                Ok(dir)
            } else {
                Err(Error::NotComplete { bundle: dir })
            }
        }
        BundleRef::Object { .. } => {
            let (store, info) = open_reference(reference, &opts.s3).await?;
            let dest = dest_root.join(bundle_path(&info)?);
            if is_complete(&dest) {
                tracing::info!(bundle = %dest.display(), "bundle already fetched");
                return Ok(dest);
            }
            fetch_object(store, &info, &dest, opts).await
        }
    }
}

/// Like [`fetch_bundle`] for callers without a tokio runtime: runs one and blocks on it.
/// Must not be called from inside a tokio runtime.
pub fn fetch_bundle_blocking(reference: &str, dest_root: &Path, opts: &FetchOptions) -> Result<PathBuf> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start a runtime for", dest_root, e))?
        .block_on(fetch_bundle(reference, dest_root, opts))
}

/// Opens the store of an archive reference and looks the archive up. Errors for a local bundle
/// directory (nothing to fetch) and for an archive that is not committed in its store.
pub async fn open_reference(reference: &str, s3: &S3Options) -> Result<(Arc<dyn Store>, ObjectInfo)> {
    match BundleRef::parse(reference)? {
        BundleRef::LocalDir(dir) => Err(Error::InvalidReference {
            reference: reference.to_string(),
            reason: format!("{} is already a bundle directory on this node; use it directly", dir.display()),
        }),
        BundleRef::Object { store, key } => {
            let store = store.open(s3).await?;
            let info = store
                .head(&key)
                .await?
                .ok_or_else(|| Error::NotFound { location: store.location(), key: key.clone() })?;
            Ok((store, info))
        }
    }
}

/// The relative directory an object's bundle is restored to: its `bundle` label, or its key
/// without the archive suffix.
pub fn bundle_path(info: &ObjectInfo) -> Result<PathBuf> {
    let rel = match info.meta.labels.get(LABEL_BUNDLE) {
        Some(b) => b.clone(),
        None => {
            let suffix = info.meta.compression.suffix();
            info.key.strip_suffix(suffix).unwrap_or(&info.key).to_string()
        }
    };
    validate_key(&rel)
        .map_err(|e| Error::Metadata { key: info.key.clone(), reason: format!("its bundle path is unsafe: {e}") })?;
    Ok(PathBuf::from(rel))
}

/// Downloads, verifies and extracts `info` from `store` to `dest` (which must not exist).
pub async fn fetch_object(
    store: Arc<dyn Store>,
    info: &ObjectInfo,
    dest: &Path,
    opts: &FetchOptions,
) -> Result<PathBuf> {
    let size = info.meta.size;
    if size > opts.limits.max_stream_bytes() {
        return Err(Error::LimitExceeded {
            what: "archive size",
            limit: opts.limits.max_stream_bytes(),
            dest: dest.to_path_buf(),
        });
    }
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(Error::DestinationExists { path: dest.to_path_buf() });
    }
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let downloader = tokio::spawn(download(
        store.clone(),
        info.key.clone(),
        size,
        opts.range_size.max(1 << 20),
        opts.concurrency.max(1),
        opts.s3.retry,
        opts.progress.clone(),
        tx,
    ));
    let (key, expected_sha, compression, limits, dest_owned) =
        (info.key.clone(), info.meta.sha256.clone(), info.meta.compression, opts.limits, dest.to_path_buf());
    let extractor = tokio::task::spawn_blocking(move || {
        unpack_verified(rx, &key, size, &expected_sha, compression, &dest_owned, &limits)
    });
    let extracted = extractor.await.map_err(|e| join_error("extract", e));
    let downloaded = downloader.await.map_err(|e| join_error("download", e));
    // A download failure explains whatever the extractor saw (truncated stream).
    downloaded??;
    let dest = extracted??;
    tracing::info!(key = %info.key, bundle = %dest.display(), size, "bundle fetched and verified");
    Ok(dest)
}

#[allow(clippy::too_many_arguments)]
async fn download(
    store: Arc<dyn Store>,
    key: String,
    size: u64,
    range_size: u64,
    concurrency: usize,
    retry: RetryPolicy,
    progress: Option<Progress>,
    tx: mpsc::Sender<Bytes>,
) -> Result<()> {
    let mut inflight: VecDeque<JoinHandle<Result<Bytes>>> = VecDeque::new();
    let mut start = 0u64;
    loop {
        while inflight.len() < concurrency && start < size {
            let end = (start + range_size).min(size);
            inflight.push_back(tokio::spawn(read_range(store.clone(), key.clone(), start..end, retry)));
            start = end;
        }
        let Some(next) = inflight.pop_front() else {
            return Ok(());
        };
        let bytes = next.await.map_err(|e| join_error("ranged read", e))??;
        let n = bytes.len() as u64;
        if tx.send(bytes).await.is_err() {
            // The extractor stopped early; its error is reported.
            for handle in inflight {
                handle.abort();
            }
            return Ok(());
        }
        if let Some(p) = &progress {
            p(n);
        }
    }
}

async fn read_range(
    store: Arc<dyn Store>,
    key: String,
    range: std::ops::Range<u64>,
    retry: RetryPolicy,
) -> Result<Bytes> {
    let (store, key, range) = (&store, &key, &range);
    retry
        .run("ranged read", |_| async move {
            let want = (range.end - range.start) as usize;
            let mut reader = store.get(key, Some(range.clone())).await?;
            let transfer = |source| Error::Transfer { location: store.location(), key: key.clone(), source };
            // Exactly `want` bytes, in a buffer of exactly that size, and not one more.
            let mut buf = vec![0u8; want];
            reader.read_exact(&mut buf).await.map_err(transfer)?;
            if reader.read(&mut [0u8; 1]).await.map_err(transfer)? != 0 {
                return Err(transfer(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bytes {}..{} returned more than {want} bytes", range.start, range.end),
                )));
            }
            Ok(Bytes::from(buf))
        })
        .await
}

/// Runs on a blocking thread: hashes the raw stream while extracting, then verifies and publishes.
fn unpack_verified(
    rx: mpsc::Receiver<Bytes>,
    key: &str,
    size: u64,
    expected_sha: &str,
    compression: Compression,
    dest: &Path,
    limits: &ExtractLimits,
) -> Result<PathBuf> {
    let mut raw = HashingReader { rx, current: Bytes::new(), hasher: Sha256::new(), read: 0 };
    let staged = extract::stage(&mut raw, compression, dest, limits, key);
    // Hash whatever the extractor did not read, so corruption is reported as such.
    let drained = io::copy(&mut raw, &mut io::sink());
    let sha = hex::encode(raw.hasher.clone().finalize());
    let integrity = if raw.read != size {
        Err(Error::Integrity {
            key: key.to_string(),
            what: "size",
            expected: size.to_string(),
            actual: raw.read.to_string(),
        })
    } else if sha != expected_sha {
        Err(Error::Integrity { key: key.to_string(), what: "sha256", expected: expected_sha.to_string(), actual: sha })
    } else {
        Ok(())
    };
    match (staged, integrity) {
        (Ok(staged), Ok(())) => {
            drained.map_err(|source| Error::Unpack { key: key.to_string(), source })?;
            staged.publish(key)
        }
        // A mismatch explains any extraction error.
        (_, Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
    }
}

/// Reads the chunks sent by the downloader, hashing and counting them.
struct HashingReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
    hasher: Sha256,
    read: u64,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        let chunk = self.current.split_to(n);
        buf[..n].copy_from_slice(&chunk);
        self.hasher.update(&chunk);
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        assert_eq!(
            BundleRef::parse("s3://bkt/ns/pod/c/t.tar.zst").unwrap(),
            BundleRef::Object {
                store: StoreLocation::S3 { bucket: "bkt".into(), prefix: String::new() },
                key: "ns/pod/c/t.tar.zst".into()
            }
        );
        assert_eq!(
            BundleRef::parse("file:///srv/store/t.tar").unwrap(),
            BundleRef::Object { store: StoreLocation::Fs("/srv/store".into()), key: "t.tar".into() }
        );
        let dir = std::env::temp_dir();
        assert_eq!(BundleRef::parse(dir.to_str().unwrap()).unwrap(), BundleRef::LocalDir(dir.clone()));
        for bad in ["s3://bkt", "s3:///k", "s3://b/../x", "http://x/y", "", "file://"] {
            assert!(BundleRef::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
