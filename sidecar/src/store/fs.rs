//! The filesystem store: a directory on local disk or a shared volume (NFS, hostPath, PVC).
//!
//! An archive is written to a hidden temp name in its target directory by a thread that owns the
//! file from creation to rename (so an abandoned upload never leaves it behind), fsynced, renamed
//! into place and the directory fsynced; then its record is written the same way.

use std::fs::OpenOptions;
use std::io::{SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::{
    now_rfc3339, validate_key, Committed, ObjectInfo, ObjectMeta, ObjectReader, PutRequest, Store, LABEL_BUNDLE,
    META_FORMAT, META_SUFFIX,
};
use crate::archive::{ArchiveStream, Compression};
use crate::error::{join_error, Error, Result};
use crate::fsutil::{prune_empty_dirs, remove_if_exists, sync_dir, temp_sibling, write_atomic};

/// A store in a local (or mounted shared) directory.
#[derive(Clone, Debug)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: PathBuf) -> Self {
        FsStore { root }
    }

    /// The file that holds the archive under `key`.
    pub fn object_path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// An archive file under `key` that no sidecar stored, so no record lies beside it: Podman's
    /// `container checkpoint --export`, kubelet's checkpoint tar, a copy made by hand. Its size and
    /// sha256 are read from the file (what the download is then checked against: that it did not
    /// change while it was read) and its compression from its first bytes (zstd or none). `None`
    /// when there is no such file; an error for a record-less file that is not a tar archive.
    pub async fn loose_archive(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.object_path(key)?;
        if !path.is_file() || Self::meta_path(&path).exists() {
            return Ok(None);
        }
        let key = key.to_string();
        tokio::task::spawn_blocking(move || read_loose(&path, key).map(Some))
            .await
            .map_err(|e| join_error("read archive", e))?
    }

    fn meta_path(data: &Path) -> PathBuf {
        let mut name = data.as_os_str().to_owned();
        name.push(META_SUFFIX);
        PathBuf::from(name)
    }
}

/// What the async side of a put sends to the thread that owns the file.
enum WriteMsg {
    /// Append these bytes.
    Data(Bytes),
    /// The stream ended successfully: make the file durable and rename it into place.
    Commit,
}

/// Runs on a blocking thread that owns the temp file from creation to rename, so that no
/// cancellation can leave it behind: if the sender goes away without [`WriteMsg::Commit`] (error,
/// or the put was dropped), the temp file is removed here.
fn write_blocking(path: &Path, tmp: &Path, mut rx: mpsc::Receiver<WriteMsg>) -> Result<()> {
    let result = (|| {
        let mut file =
            OpenOptions::new().write(true).create_new(true).open(tmp).map_err(|e| Error::io("create", tmp, e))?;
        loop {
            match rx.blocking_recv() {
                Some(WriteMsg::Data(chunk)) => file.write_all(&chunk).map_err(|e| Error::io("write", tmp, e))?,
                Some(WriteMsg::Commit) => break,
                None => {
                    return Err(Error::Task { task: "filesystem store upload", message: "abandoned".into() });
                }
            }
        }
        file.sync_all().map_err(|e| Error::io("fsync", tmp, e))?;
        drop(file);
        // Uncommit any previous version first, so a record never describes other bytes.
        remove_if_exists(&FsStore::meta_path(path))?;
        std::fs::rename(tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
        sync_dir(path.parent().unwrap_or(Path::new("/")))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

#[async_trait]
impl Store for FsStore {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn put(&self, req: &PutRequest, mut body: ArchiveStream) -> Result<Committed> {
        let path = self.object_path(&req.key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        let tmp = temp_sibling(&path, "partial");
        let (tx, rx) = mpsc::channel(2);
        let writer = {
            let (path, tmp) = (path.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || write_blocking(&path, &tmp, rx))
        };
        let sent = async {
            while let Some(chunk) = body.next().await? {
                if tx.send(WriteMsg::Data(chunk)).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            let _ = tx.send(WriteMsg::Commit).await;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = sent {
            drop(tx); // tells the writer to remove the temp file
            let _ = writer.await;
            return Err(e);
        }
        writer.await.map_err(|e| join_error("filesystem store upload", e))??;
        let (size, sha256) = body.digest();
        let meta = ObjectMeta {
            format: META_FORMAT,
            size,
            sha256,
            compression: req.compression,
            encryption: req.encryption.clone(),
            part_size: None,
            part_sha256: Vec::new(),
            stored_at: now_rfc3339(),
            labels: req.labels.clone(),
        };
        write_atomic(&Self::meta_path(&path), &meta.to_json())?;
        Ok(Committed { object: ObjectInfo { key: req.key.clone(), meta }, reused_bytes: 0 })
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ObjectReader> {
        let path = self.object_path(key)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound { location: self.location(), key: key.to_string() })
            }
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        match range {
            None => Ok(Box::new(file)),
            Some(r) => {
                file.seek(SeekFrom::Start(r.start)).await.map_err(|e| Error::io("seek", &path, e))?;
                Ok(Box::new(file.take(r.end.saturating_sub(r.start))))
            }
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.object_path(key)?;
        let meta_path = Self::meta_path(&path);
        let bytes = match tokio::fs::read(&meta_path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &meta_path, e)),
        };
        if !path.is_file() {
            return Ok(None);
        }
        Ok(Some(ObjectInfo { key: key.to_string(), meta: ObjectMeta::from_json(key, &bytes)? }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || list_blocking(&root, &prefix))
            .await
            .map_err(|e| join_error("list store", e))?
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.object_path(key)?;
        let meta_path = Self::meta_path(&path);
        if !path.exists() && !meta_path.exists() {
            return Err(Error::NotFound { location: self.location(), key: key.to_string() });
        }
        remove_if_exists(&meta_path)?;
        remove_if_exists(&path)?;
        let dir = path.parent().unwrap_or(&self.root);
        sync_dir(dir)?;
        prune_empty_dirs(dir, &self.root);
        Ok(())
    }
}

/// The record of a loose archive (see [`FsStore::loose_archive`]), read from the file itself.
fn read_loose(path: &Path, key: String) -> Result<ObjectInfo> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut head = [0u8; 512];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(|e| Error::io("read", path, e))? {
            0 => break,
            n => filled += n,
        }
    }
    let compression = sniff(&head[..filled]).map_err(|reason| Error::Metadata { key: key.clone(), reason })?;
    let mut hasher = Sha256::new();
    hasher.update(&head[..filled]);
    let size = filled as u64 + std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io("read", path, e))?;
    let stored_at = file
        .metadata()
        .and_then(|m| m.modified())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .map_err(|e| Error::io("stat", path, e))?;
    tracing::info!(key, size, ?compression, "archive has no sidecar record; taking its size and sha256 from the file");
    // Restored to its name without the archive suffix the user gave it (`x.tar.gz` holding zstd too).
    let bundle = [".tar.zst", ".tar.gz", ".tgz", ".tar"].iter().find_map(|s| key.strip_suffix(s)).unwrap_or(&key);
    let labels = [(LABEL_BUNDLE.to_string(), bundle.to_string())].into();
    let meta = ObjectMeta {
        format: META_FORMAT,
        size,
        sha256: hex::encode(hasher.finalize()),
        compression,
        encryption: None,
        part_size: None,
        part_sha256: Vec::new(),
        stored_at,
        labels,
    };
    Ok(ObjectInfo { key, meta })
}

/// The compression of an archive from its first bytes: zstd's frame magic, or a POSIX tar header
/// (`ustar` at offset 257); anything else is named with the fix.
fn sniff(head: &[u8]) -> std::result::Result<Compression, String> {
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
    if head.starts_with(&ZSTD_MAGIC) {
        Ok(Compression::Zstd)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Ok(Compression::None)
    } else if head.starts_with(&GZIP_MAGIC) {
        Err("it is gzip-compressed, which is not read here: decompress it (`gunzip`), or export it with \
             `--compress zstd` or `--compress none`"
            .into())
    } else {
        Err("it has no sidecar record and is neither a tar nor a zstd-compressed tar archive".into())
    }
}

fn list_blocking(root: &Path, prefix: &str) -> Result<Vec<ObjectInfo>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == root => return Ok(out),
            Err(e) => return Err(Error::io("list directory", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list directory", &dir, e))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| Error::io("stat", &path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            let Some(data_name) = name.strip_suffix(META_SUFFIX) else {
                continue;
            };
            let data = path.with_file_name(data_name);
            let Ok(rel) = data.strip_prefix(root) else {
                continue;
            };
            let Some(key) = rel.to_str().map(str::to_string) else {
                continue;
            };
            if !key.starts_with(prefix) || !data.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
            out.push(ObjectInfo { meta: ObjectMeta::from_json(&key, &bytes)?, key });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}
