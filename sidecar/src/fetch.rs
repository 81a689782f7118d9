//! Fetching a bundle for restore, the library side of `kybernate-sidecar pull`: resolve the
//! reference (checkpoint-core's [`BundleRef`], the shim's rules), download (parallel ranged reads,
//! in order), verify size and sha256 against the object's record while streaming, decrypt and
//! authenticate an encrypted object as it streams ([`crate::crypt`]), extract safely, check
//! `COMPLETE`, verify the bundle's manifest (unless [`FetchOptions::skip_manifest_check`]), publish
//! atomically. Nothing is staged on disk but the extracted files themselves.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use checkpoint_core::bundle::is_complete;
use checkpoint_core::pod::{self, PodEntry, Selection};
use checkpoint_core::reference::BundleRef;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::archive::{Compression, Progress};
use crate::crypt::{self, DecryptReader, Key, Keyring};
use crate::error::{join_error, Error, Result};
use crate::extract::{self, ExtractLimits};
use crate::retry::RetryPolicy;
use crate::store::{validate_key, FsStore, ObjectInfo, S3Options, Store, StoreLocation, LABEL_BUNDLE};

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
    /// Publish without the bundle's manifest pass (every file's size and sha256, a second read of
    /// the whole bundle). The archive's transport checksum (its size and sha256 recorded at upload,
    /// hashed as it streams) and `COMPLETE` are always checked. For a caller that verifies the
    /// manifest itself before using the bundle, as the shim does before anything reaches CRIU
    /// (`pull --skip-manifest-check`). Default: false (verify).
    pub skip_manifest_check: bool,
    /// Keys that decrypt encrypted objects, and whether unencrypted ones are refused.
    pub keys: Keyring,
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
            skip_manifest_check: false,
            keys: Keyring::default(),
        }
    }
}

/// Parses a bundle reference (the value of `kybernate.io/restore-from`, taken as it is) by
/// checkpoint-core's rules, the shim's: an absolute path or `file:///path` naming a directory is a
/// bundle on this node (so is one that does not exist), naming a file an archive in a filesystem
/// store; `s3://bucket/key` an archive in S3.
pub fn parse_reference(reference: &str) -> Result<BundleRef> {
    BundleRef::parse(reference).map_err(|e| match e {
        checkpoint_core::Error::Reference { reference, reason } => invalid(reference, reason),
        other => invalid(reference, other),
    })
}

/// Like [`parse_reference`] for a command-line argument: a relative path (no `scheme://`) is made
/// absolute against the working directory first.
pub fn parse_cli_reference(arg: &str) -> Result<BundleRef> {
    if arg.contains("://") || arg.is_empty() || Path::new(arg).is_absolute() {
        return parse_reference(arg);
    }
    let path = std::path::absolute(arg).map_err(|e| Error::io("resolve", arg, e))?;
    match path.to_str() {
        Some(path) => parse_reference(path),
        None => Err(invalid(arg, "the path is not UTF-8")),
    }
}

/// Fetches the bundle `reference` into `dest_root` and returns the bundle directory: the library
/// entry of `kybernate-sidecar pull`, which the shim runs as a separate process (so the async
/// runtime and the S3 client never live in the shim's memory). The binary itself extracts to
/// exactly its DEST ([`open_reference`] + [`fetch_object`]).
///
/// A local bundle directory is returned as it is once its `COMPLETE` marker is checked. An archive
/// (a file in a filesystem store, `s3://bucket/key`) is extracted to
/// `dest_root/<bundle path recorded at upload>` (e.g. `<ns>/<pod>/<container>/<time>`); if that
/// directory already holds a complete bundle it is reused.
pub async fn fetch_bundle(reference: &BundleRef, dest_root: &Path, opts: &FetchOptions) -> Result<PathBuf> {
    if let BundleRef::LocalDir(dir) = reference {
        check_exists(reference, dir)?;
        return if is_complete(dir) { Ok(dir.clone()) } else { Err(Error::NotComplete { bundle: dir.clone() }) };
    }
    let (store, info) = open_reference(reference, &opts.s3).await?;
    let dest = dest_root.join(bundle_path(&info)?);
    if is_complete(&dest) {
        tracing::info!(bundle = %dest.display(), "bundle already fetched");
        return Ok(dest);
    }
    fetch_object(store, &info, &dest, opts).await
}

/// Like [`fetch_bundle`] for callers without a tokio runtime: runs one and blocks on it.
/// Must not be called from inside a tokio runtime.
pub fn fetch_bundle_blocking(reference: &BundleRef, dest_root: &Path, opts: &FetchOptions) -> Result<PathBuf> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start a runtime for", dest_root, e))?
        .block_on(fetch_bundle(reference, dest_root, opts))
}

/// Opens the store of an archive reference and looks the archive up. Errors for a local bundle
/// directory (nothing to fetch) and for an archive that is not committed in its store.
pub async fn open_reference(reference: &BundleRef, s3: &S3Options) -> Result<(Arc<dyn Store>, ObjectInfo)> {
    let (location, key) = archive_location(reference)?;
    let store = location.open(s3).await?;
    let info = match (store.head(key).await?, reference) {
        (Some(info), _) => Some(info),
        (None, BundleRef::FsArchive { store: dir, .. }) => FsStore::new(dir.clone()).loose_archive(key).await?,
        (None, BundleRef::S3 { .. } | BundleRef::LocalDir(_)) => None,
    };
    let info = info.ok_or_else(|| Error::NotFound { location: store.location(), key: key.to_string() })?;
    Ok((store, info))
}

/// Opens the store of a pod-level reference (a pod's prefix: `s3://bucket/<ns>/<pod>`, or its
/// directory in a filesystem store) and finds the archive of `container` in the pod checkpoint at
/// `at`, or in the newest one (checkpoint-core's [`checkpoint_core::pod::select`], the rule the shim
/// applies to a node directory). The store's listing under the prefix is the pod's index: every
/// committed `<container>/<time>.tar[.zst][.kenc]` object (an encrypted one wins over an unencrypted
/// one of the same bundle). [`Error::NotCovered`] when the pod checkpoint holds no bundle of
/// `container`.
pub async fn open_pod_reference(
    reference: &BundleRef,
    container: &str,
    at: Option<&str>,
    s3: &S3Options,
) -> Result<(Arc<dyn Store>, ObjectInfo)> {
    let (location, prefix) = match reference {
        BundleRef::LocalDir(dir) => {
            check_exists(reference, dir)?;
            (StoreLocation::Fs(dir.clone()), String::new())
        }
        BundleRef::S3 { bucket, key } => (
            StoreLocation::S3 { bucket: bucket.clone(), prefix: String::new() },
            format!("{}/", key.trim_end_matches('/')),
        ),
        BundleRef::FsArchive { .. } => {
            return Err(invalid(reference, "it names one archive, not a pod's prefix; drop --container"))
        }
    };
    let store = location.open(s3).await?;
    let objects = store.list(&prefix).await?;
    let mut entries: Vec<PodEntry> = objects
        .iter()
        .filter_map(|o| {
            let rel = o.key.strip_prefix(&prefix)?;
            let entry = PodEntry::parse(crypt::strip_suffix(rel))?;
            Some(PodEntry { rel: rel.to_string(), ..entry })
        })
        .collect();
    // `pod::select` takes the first entry of the container: the encrypted one, if there are two.
    entries.sort_by_key(|e| !e.rel.ends_with(crypt::SUFFIX));
    let chosen = match pod::select(&entries, container, at) {
        Selection::Covered(entry) => format!("{prefix}{}", entry.rel),
        Selection::NotCovered { time, containers } => {
            return Err(Error::NotCovered {
                reference: reference.to_string(),
                container: container.to_string(),
                detail: format!("its pod checkpoint {time} holds bundles of {} only", containers.join(", ")),
            })
        }
        Selection::Empty => {
            let which = at.map(|t| format!("at {t}")).unwrap_or_else(|| "at all".into());
            return Err(invalid(reference, format!("the store holds no pod checkpoint {which} under it")));
        }
    };
    let info = objects.into_iter().find(|o| o.key == chosen).expect("the chosen key was listed");
    Ok((store, info))
}

/// The store and key of an archive reference, the key checked by the store's rules (which reserve
/// more than the reference parser does, e.g. `*.meta.json`).
fn archive_location(reference: &BundleRef) -> Result<(StoreLocation, &str)> {
    let (store, key) = match reference {
        BundleRef::LocalDir(dir) => {
            check_exists(reference, dir)?;
            return Err(invalid(reference, "it is a bundle directory on this node, not an archive; use it directly"));
        }
        BundleRef::FsArchive { store, name } => (StoreLocation::Fs(store.clone()), name),
        BundleRef::S3 { bucket, key } => (StoreLocation::S3 { bucket: bucket.clone(), prefix: String::new() }, key),
    };
    validate_key(key).map_err(|e| invalid(reference, e))?;
    Ok((store, key))
}

/// A path that names nothing parses as a bundle directory; say that it names nothing.
fn check_exists(reference: &BundleRef, dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    Err(invalid(reference, format!("{} is neither a bundle directory nor an archive file", dir.display())))
}

fn invalid(reference: impl ToString, reason: impl ToString) -> Error {
    Error::InvalidReference { reference: reference.to_string(), reason: reason.to_string() }
}

/// The relative directory an object's bundle is restored to: its `bundle` label, or its key
/// without the archive (and encryption) suffix.
pub fn bundle_path(info: &ObjectInfo) -> Result<PathBuf> {
    let rel = match info.meta.labels.get(LABEL_BUNDLE) {
        Some(b) => b.clone(),
        None => {
            let key = crypt::strip_suffix(&info.key);
            key.strip_suffix(info.meta.compression.suffix()).unwrap_or(key).to_string()
        }
    };
    validate_key(&rel)
        .map_err(|e| Error::Metadata { key: info.key.clone(), reason: format!("its bundle path is unsafe: {e}") })?;
    Ok(PathBuf::from(rel))
}

/// Downloads, verifies (decrypting an encrypted object) and extracts `info` from `store` to `dest`
/// (which must not exist). An object that no configured key decrypts (or an unencrypted one under
/// `require_encryption`) is refused before anything is downloaded or written.
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
    let decryption = opts.keys.key_for(&info.key, info.meta.encryption.as_ref())?;
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
    let (expected, limits, dest_owned, manifest) =
        (info.clone(), opts.limits, dest.to_path_buf(), !opts.skip_manifest_check);
    let extractor = tokio::task::spawn_blocking(move || {
        unpack_verified(rx, &expected, decryption.as_deref(), &dest_owned, &limits, manifest)
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

/// Reads bytes `range` of `key`, with retries.
pub(crate) async fn read_range(
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

/// Runs on a blocking thread: hashes the raw stream while extracting (decrypting it with
/// `decryption`), then verifies the stream against the record of `expected` and publishes (running
/// the bundle's manifest pass if `manifest`).
fn unpack_verified(
    rx: mpsc::Receiver<Bytes>,
    expected: &ObjectInfo,
    decryption: Option<&Key>,
    dest: &Path,
    limits: &ExtractLimits,
    manifest: bool,
) -> Result<PathBuf> {
    let (key, size, expected_sha) = (expected.key.as_str(), expected.meta.size, &expected.meta.sha256);
    let mut raw = HashingReader { rx, current: Bytes::new(), hasher: Sha256::new(), read: 0 };
    let compression = expected.meta.compression;
    let staged = match decryption {
        None => extract::stage(&mut raw, compression, dest, limits, key),
        Some(k) => stage_decrypted(&mut raw, k, compression, dest, limits, key),
    };
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
    } else if sha != *expected_sha {
        Err(Error::Integrity { key: key.to_string(), what: "sha256", expected: expected_sha.to_string(), actual: sha })
    } else {
        Ok(())
    };
    match (staged, integrity) {
        (Ok(staged), Ok(())) => {
            drained.map_err(|source| Error::Unpack { key: key.to_string(), source })?;
            if manifest {
                staged.publish(key)
            } else {
                staged.publish_without_manifest_check(key)
            }
        }
        // A mismatch explains any extraction error.
        (_, Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
    }
}

/// Decrypts `raw` with `k` into [`extract::stage`], then authenticates the rest of it (the last
/// chunk above all, which proves that nothing was cut off). A decryption failure is reported as
/// such, whatever the extractor made of the stream; the staging directory is then removed.
fn stage_decrypted(
    raw: &mut HashingReader,
    k: &Key,
    compression: Compression,
    dest: &Path,
    limits: &ExtractLimits,
    key: &str,
) -> Result<extract::Staged> {
    let decrypt_error =
        |reason: &str| Error::Decrypt { key: key.to_string(), reason: reason.into(), dest: dest.into() };
    let mut plain = DecryptReader::new(raw, k).map_err(|reason| decrypt_error(&reason))?;
    let staged = extract::stage(&mut plain, compression, dest, limits, key);
    let rest = io::copy(&mut plain, &mut io::sink());
    if let Some(reason) = plain.failure() {
        return Err(decrypt_error(reason));
    }
    let staged = staged?;
    rest.map_err(|source| Error::Unpack { key: key.to_string(), source })?;
    Ok(staged)
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

    fn location(reference: &str) -> Result<(StoreLocation, String)> {
        archive_location(&parse_reference(reference)?).map(|(store, key)| (store, key.to_string()))
    }

    #[test]
    fn references_parse() {
        assert_eq!(
            location("s3://bkt/ns/pod/c/t.tar.zst").unwrap(),
            (StoreLocation::S3 { bucket: "bkt".into(), prefix: String::new() }, "ns/pod/c/t.tar.zst".into())
        );
        // A path names an archive only if it is a file; one that names nothing is a bundle directory
        // (checkpoint-core's rule), which fetching says does not exist.
        let store = tempfile::tempdir().unwrap();
        std::fs::write(store.path().join("t.tar"), b"").unwrap();
        assert_eq!(
            location(&format!("file://{}/t.tar", store.path().display())).unwrap(),
            (StoreLocation::Fs(store.path().into()), "t.tar".into())
        );
        assert_eq!(parse_reference("file:///srv/store/t.tar").unwrap(), BundleRef::LocalDir("/srv/store/t.tar".into()));
        let err = location("file:///srv/store/t.tar").unwrap_err().to_string();
        assert!(err.contains("neither a bundle directory nor an archive file"), "{err}");
        let dir = std::env::temp_dir();
        assert_eq!(parse_reference(dir.to_str().unwrap()).unwrap(), BundleRef::LocalDir(dir.clone()));
        let err = location(dir.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("use it directly"), "{err}");
        for bad in ["s3://bkt", "s3:///k", "s3://b/../x", "http://x/y", "", "file://", "relative/b"] {
            assert!(matches!(parse_reference(bad), Err(Error::InvalidReference { .. })), "{bad:?} accepted");
        }
        // The store's key rules still apply after parsing.
        std::fs::write(store.path().join("t.tar.meta.json"), b"{}").unwrap();
        for bad in [format!("{}/t.tar.meta.json", store.path().display()), "s3://b/ns/.hidden.tar".into()] {
            let err = location(&bad).unwrap_err().to_string();
            assert!(err.contains("invalid bundle reference") && err.contains("reserved"), "{bad}: {err}");
        }
    }

    #[test]
    fn command_line_references_may_be_relative() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(parse_cli_reference("src").unwrap(), BundleRef::LocalDir(cwd.join("src")));
        assert_eq!(
            parse_cli_reference("Cargo.toml").unwrap(),
            BundleRef::FsArchive { store: cwd.clone(), name: "Cargo.toml".into() }
        );
        assert!(parse_reference("src").is_err(), "annotation values are parsed as they are");
        for bad in ["", "file://src", "http://x/y"] {
            assert!(parse_cli_reference(bad).is_err(), "{bad:?} accepted");
        }
    }
}
