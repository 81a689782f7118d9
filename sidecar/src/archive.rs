//! Streams a bundle directory as a tar archive (optionally zstd-compressed) in fixed-size chunks.
//!
//! A blocking writer thread walks the bundle in a fixed (sorted) order, writes tar headers and file
//! contents through an optional multithreaded zstd encoder into a [`ChunkWriter`], which hands
//! `chunk_size` pieces to the uploader over a bounded channel. Memory stays at
//! `(channel_depth + 1) * chunk_size` plus the encoder's window; nothing is staged on disk. The same
//! bundle always yields the same bytes, which is what lets an interrupted S3 upload resume. With a
//! [`Sealing`], the compressed stream is encrypted on the same thread ([`crate::crypt`]).

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::crypt::{EncryptWriter, Sealing};
use crate::error::{join_error, Error, Result};

/// Callback told how many more bytes were processed (read from the bundle, or downloaded).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// How the tar stream is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain tar.
    None,
    /// tar compressed with zstd.
    Zstd,
}

impl Compression {
    /// File-name suffix of an archive in this format.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => ".tar",
            Compression::Zstd => ".tar.zst",
        }
    }

    /// The format implied by an object key's suffix, if any (also behind the suffix of an
    /// encrypted object, [`crate::crypt::SUFFIX`]).
    pub fn from_key(key: &str) -> Option<Self> {
        let key = crate::crypt::strip_suffix(key);
        if key.ends_with(".tar.zst") {
            Some(Compression::Zstd)
        } else if key.ends_with(".tar") {
            Some(Compression::None)
        } else {
            None
        }
    }
}

/// Settings for producing an archive.
#[derive(Clone, Debug)]
pub struct ArchiveOptions {
    /// Compression of the tar stream.
    pub compression: Compression,
    /// zstd level (1–22; 3 is zstd's default).
    pub zstd_level: i32,
    /// zstd worker threads; 0 means one per available core.
    pub zstd_threads: u32,
    /// Size of the pieces handed to the store.
    pub chunk_size: usize,
    /// How many chunks may wait between the writer thread and the store.
    pub channel_depth: usize,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        ArchiveOptions {
            compression: Compression::Zstd,
            zstd_level: 3,
            zstd_threads: 0,
            chunk_size: 1 << 20,
            channel_depth: 4,
        }
    }
}

/// The archive as a stream of chunks, hashed as it is consumed.
///
/// [`ArchiveStream::next`] returns `Ok(None)` only after the producer finished successfully, so a
/// store never commits a truncated archive.
pub struct ArchiveStream {
    rx: mpsc::Receiver<Bytes>,
    producer: Option<JoinHandle<Result<()>>>,
    hasher: Sha256,
    size: u64,
}

impl ArchiveStream {
    /// The next chunk, `Ok(None)` at the (successful) end, or the producer's error.
    /// Cancel-safe: dropping the future loses no data and no error.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        if let Some(chunk) = self.rx.recv().await {
            self.hasher.update(&chunk);
            self.size += chunk.len() as u64;
            return Ok(Some(chunk));
        }
        if let Some(handle) = self.producer.as_mut() {
            let joined = handle.await;
            self.producer = None;
            joined.map_err(|e| join_error("archive writer", e))??;
        }
        Ok(None)
    }

    /// Size and hex sha256 of everything returned by [`ArchiveStream::next`] so far.
    pub fn digest(&self) -> (u64, String) {
        (self.size, hex::encode(self.hasher.clone().finalize()))
    }
}

/// Starts archiving `bundle` on a blocking thread and returns the stream of its bytes, encrypted
/// with `sealing` when given: a second thread encrypts the compressed stream (so that encryption
/// overlaps reading and compressing) before it is cut into chunks for the store, so the stream —
/// and its size and sha256 — is what the store holds. Must be called inside a tokio runtime.
pub fn archive_bundle(
    bundle: &Path,
    opts: &ArchiveOptions,
    sealing: Option<Sealing>,
    progress: Option<Progress>,
) -> ArchiveStream {
    let (tx, rx) = mpsc::channel(opts.channel_depth.max(1));
    let bundle = bundle.to_path_buf();
    let opts = opts.clone();
    let producer = tokio::task::spawn_blocking(move || {
        let result = match &sealing {
            None => write_archive(&bundle, &opts, progress, tx),
            Some(sealing) => std::thread::scope(|scope| {
                let (plain_tx, plain_rx) = mpsc::channel(opts.channel_depth.max(1));
                let sink = ChunkWriter::new(tx, opts.chunk_size);
                let encryptor = scope.spawn(move || encrypt_chunks(plain_rx, sealing, sink));
                let written = write_archive(&bundle, &opts, progress, plain_tx.clone());
                if written.is_ok() {
                    // The end marker: only now may the encryptor seal the last chunk.
                    let _ = plain_tx.blocking_send(Bytes::new());
                }
                drop(plain_tx);
                let encrypted =
                    encryptor.join().unwrap_or_else(|_| Err(io::Error::other("the encryption thread panicked")));
                written.and(encrypted)
            }),
        };
        result.map_err(|source| Error::Archive { bundle: bundle.clone(), source })
    });
    ArchiveStream { rx, producer: Some(producer), hasher: Sha256::new(), size: 0 }
}

fn write_archive(
    bundle: &Path,
    opts: &ArchiveOptions,
    progress: Option<Progress>,
    tx: mpsc::Sender<Bytes>,
) -> io::Result<()> {
    let entries = walk(bundle)?;
    write_compressed(&entries, opts, ChunkWriter::new(tx, opts.chunk_size), progress.as_ref())?.finish()
}

/// Encrypts the plaintext chunks from `rx` into `sink`. The last chunk is sealed only on the end
/// marker (an empty chunk, which [`ChunkWriter`] never sends otherwise), so an archive whose writer
/// failed never looks complete.
fn encrypt_chunks(mut rx: mpsc::Receiver<Bytes>, sealing: &Sealing, sink: ChunkWriter) -> io::Result<()> {
    let mut writer = EncryptWriter::new(sink, sealing)?;
    while let Some(chunk) = rx.blocking_recv() {
        if chunk.is_empty() {
            return writer.finish()?.finish();
        }
        writer.write_all(&chunk)?;
    }
    Err(io::Error::other("the archive writer stopped before the end of the archive"))
}

/// Writes the tar of `entries` into `sink`, through zstd if `opts` say so; returns `sink`.
fn write_compressed<W: Write>(
    entries: &[Entry],
    opts: &ArchiveOptions,
    sink: W,
    progress: Option<&Progress>,
) -> io::Result<W> {
    match opts.compression {
        Compression::None => write_tar(entries, sink, progress),
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(sink, opts.zstd_level)?;
            enc.include_checksum(true)?;
            enc.multithread(zstd_workers(opts))?;
            write_tar(entries, enc, progress)?.finish()
        }
    }
}

/// zstd worker threads for `opts` (0: one per available core).
fn zstd_workers(opts: &ArchiveOptions) -> u32 {
    if opts.zstd_threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        opts.zstd_threads
    }
}

fn write_tar<W: Write>(entries: &[Entry], sink: W, progress: Option<&Progress>) -> io::Result<W> {
    let mut builder = tar::Builder::new(sink);
    for entry in entries {
        let md = &entry.metadata;
        let mut header = tar::Header::new_gnu();
        header.set_mode(md.mode() & 0o7777);
        header.set_uid(u64::from(md.uid()));
        header.set_gid(u64::from(md.gid()));
        header.set_mtime(md.mtime().max(0) as u64);
        let ft = md.file_type();
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, &entry.rel, io::empty())?;
        } else if ft.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            let target = fs::read_link(&entry.abs)?;
            builder.append_link(&mut header, &entry.rel, target)?;
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(md.len());
            let file = File::open(&entry.abs)?;
            let reader = ExactReader { inner: file, remaining: md.len(), path: &entry.abs, progress };
            builder.append_data(&mut header, &entry.rel, reader)?;
        }
    }
    builder.into_inner()
}

/// One file or directory of a bundle, in archive order.
struct Entry {
    rel: PathBuf,
    abs: PathBuf,
    metadata: Metadata,
}

/// Lists the bundle depth-first in byte order of names (directories before their contents).
/// Symlinks are not followed; device nodes, fifos and sockets are refused.
fn walk(bundle: &Path) -> io::Result<Vec<Entry>> {
    fn visit(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> io::Result<()> {
        let mut names: Vec<_> = fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let abs = dir.join(&name);
            let metadata = fs::symlink_metadata(&abs)?;
            let ft = metadata.file_type();
            let kind = if ft.is_block_device() || ft.is_char_device() {
                Some("device node")
            } else if ft.is_fifo() {
                Some("fifo")
            } else if ft.is_socket() {
                Some("socket")
            } else {
                None
            };
            if let Some(kind) = kind {
                return Err(io::Error::new(io::ErrorKind::InvalidData, Error::UnsupportedFile { path: abs, kind }));
            }
            let rel = abs.strip_prefix(root).map_err(io::Error::other)?.to_path_buf();
            let is_dir = ft.is_dir();
            out.push(Entry { rel, abs: abs.clone(), metadata });
            if is_dir {
                visit(root, &abs, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    visit(bundle, bundle, &mut out)?;
    Ok(out)
}

/// A cheap identity of a bundle's contents: sha256 over every entry's path, type, size, mtime and
/// mode, plus the bytes of its manifest. Used to recognise a bundle already in the store.
pub fn fingerprint(bundle: &Path) -> Result<String> {
    let entries = walk(bundle).map_err(|source| Error::Archive { bundle: bundle.to_path_buf(), source })?;
    let mut h = Sha256::new();
    for e in &entries {
        let md = &e.metadata;
        let kind = if md.is_dir() {
            'd'
        } else if md.file_type().is_symlink() {
            'l'
        } else {
            'f'
        };
        h.update(e.rel.as_os_str().as_encoded_bytes());
        h.update(format!("\0{kind}\0{}\0{}.{}\0{:o}\n", md.len(), md.mtime(), md.mtime_nsec(), md.mode()).as_bytes());
    }
    let manifest = bundle.join(checkpoint_core::bundle::MANIFEST_FILE);
    if manifest.is_file() {
        let bytes = fs::read(&manifest).map_err(|e| Error::io("read manifest", &manifest, e))?;
        h.update(&bytes);
    }
    Ok(hex::encode(h.finalize()))
}

/// Identity of the archive [`archive_bundle`] makes of `bundle` with `opts`: the bundle's
/// [`fingerprint`], every entry's owner and symlink target (also in the tar headers), the archive
/// settings and the zstd and sidecar versions. The same identity means the same archive bytes
/// (short of file contents changed with their size and mtime kept, which a sealed bundle's must
/// not be): a retried encrypted upload reuses its nonce only under the same identity.
pub fn stream_identity(bundle: &Path, opts: &ArchiveOptions) -> Result<String> {
    let entries = walk(bundle).map_err(|source| Error::Archive { bundle: bundle.to_path_buf(), source })?;
    let mut h = Sha256::new();
    h.update(fingerprint(bundle)?);
    for e in &entries {
        h.update(e.rel.as_os_str().as_encoded_bytes());
        h.update(format!("\0{}:{}\0", e.metadata.uid(), e.metadata.gid()));
        if e.metadata.file_type().is_symlink() {
            let target = fs::read_link(&e.abs).map_err(|e2| Error::io("read symlink", &e.abs, e2))?;
            h.update(target.as_os_str().as_encoded_bytes());
        }
        h.update(b"\n");
    }
    h.update(format!(
        "{:?} level {} workers {} zstd {} sidecar {}",
        opts.compression,
        opts.zstd_level,
        zstd_workers(opts),
        zstd::zstd_safe::version_number(),
        env!("CARGO_PKG_VERSION")
    ));
    Ok(hex::encode(h.finalize()))
}

/// Total bytes of the regular files in `bundle` (what archiving reads; for progress bars).
pub fn content_size(bundle: &Path) -> Result<u64> {
    let entries = walk(bundle).map_err(|source| Error::Archive { bundle: bundle.to_path_buf(), source })?;
    Ok(entries.iter().filter(|e| e.metadata.is_file()).map(|e| e.metadata.len()).sum())
}

/// Reads exactly `remaining` bytes, failing if the file shrank or grew while being archived.
struct ExactReader<'a> {
    inner: File,
    remaining: u64,
    path: &'a Path,
    progress: Option<&'a Progress>,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? != 0 {
                return Err(changed(self.path));
            }
            return Ok(0);
        }
        let want = buf.len().min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(changed(self.path));
        }
        self.remaining -= n as u64;
        if let Some(p) = self.progress {
            p(n as u64);
        }
        Ok(n)
    }
}

fn changed(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} changed size while being archived; a COMPLETE bundle must not be modified", path.display()),
    )
}

/// A `Write` that cuts the byte stream into `chunk` sized pieces and sends them downstream.
struct ChunkWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    chunk: usize,
}

impl ChunkWriter {
    fn new(tx: mpsc::Sender<Bytes>, chunk: usize) -> Self {
        let chunk = chunk.max(4096);
        ChunkWriter { tx, buf: Vec::with_capacity(chunk), chunk }
    }

    fn send(&mut self) -> io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        self.tx
            .blocking_send(Bytes::from(data))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the store stopped reading the archive"))
    }

    fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
