//! Remote lazy restore, the sidecar's side (`kybernate-sidecar pull --serve-pages FD`): the bundle
//! is published before its memory is downloaded, and its pages are served to CRIU's lazy-pages
//! daemon from the store while the rest of them is fetched in the background.
//!
//! For an archive stored as an uncompressed tar, encrypted or not, every byte can be read at its
//! offset (an encrypted one's 1 MiB chunks authenticate and decrypt on their own,
//! [`crate::crypt::ChunkDecryptor`]), so:
//! 1. the tar is walked with ranged reads; every file but the page images (`pages-*.img`) is checked
//!    and unpacked as a full pull does, and the page images are created at their size, empty;
//! 2. the ranges of the page images a lazy restore reads itself (all but the lazy runs of the
//!    processes' page maps, [`checkpoint_core::criu::pagemap::eager_ranges`]; everything for a bundle
//!    with GPU state, which is restored fully) are fetched;
//! 3. the bundle is published and `ready` is said; the shim opens it and restores with the daemon
//!    connected to the socket, and every page the daemon asks for is fetched first, the rest in
//!    order behind it, into the page images on disk;
//! 4. once every page is on disk and synced and the daemon has closed its session, the pull ends
//!    with 0. If a read fails the socket is closed, which fails the daemon, and the shim kills the
//!    container: it never runs on a page that did not come.
//!
//! A zstd archive is pulled whole first and then served from disk: the restore is still lazy, but
//! starts only once the download is done (logged).
//!
//! The page images' hashes are not checked here: the shim checks them against the signed manifest
//! once the pull has ended, as it does for a local lazy restore.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use checkpoint_core::bundle::{is_page_image, BundleLayout};
use checkpoint_core::criu::page_server::{self, Framing, PageSource, Served};
use checkpoint_core::criu::pagemap::{eager_ranges, PageMap};
use tokio::runtime::Handle;

use crate::archive::Compression;
use crate::crypt::{ChunkDecryptor, HEADER_LEN};
use crate::error::{join_error, Error, Result};
use crate::extract::{self, Deferred};
use crate::fetch::{fetch_object, read_range, FetchOptions};
use crate::retry::RetryPolicy;
use crate::store::{ObjectInfo, Store};

/// Bytes fetched at once while page images are filled (and the unit a page request waits for).
pub const BLOCK_SIZE: u64 = 4 << 20;
/// Bytes read at once while the tar's other files are walked.
const WALK_WINDOW: u64 = 1 << 20;
/// Blocks fetched at once by the background fill.
const FILL_CONCURRENCY: usize = 4;

/// How the pages are served.
pub struct ServePages {
    /// Connected to the lazy-pages daemon (the shim hands the other end to `criu lazy-pages`).
    pub socket: UnixStream,
    /// The daemon's CRIU's framing of requests.
    pub framing: Framing,
}

/// Fetches `info` into `dest` for a lazy restore and serves its pages on `serve.socket` (see the
/// module docs); `ready` is called with the bundle directory once it is published. Returns once
/// every page is on disk and the daemon has closed its session.
pub async fn fetch_serving_pages(
    store: Arc<dyn Store>,
    info: &ObjectInfo,
    dest: &Path,
    opts: &FetchOptions,
    serve: ServePages,
    ready: impl FnOnce(&Path),
) -> Result<PathBuf> {
    if info.meta.compression != Compression::None {
        tracing::warn!(key = %info.key, "the archive is compressed, so its pages cannot be read where they lie: pulling it whole before the lazy restore starts (store it with compression = \"none\" for a remote lazy restore)");
        let dir = fetch_object(store, info, dest, opts).await?;
        let images = Images::local(&dir)?;
        let stream = images.attach(serve.socket)?;
        ready(&dir);
        let served = tokio::task::spawn_blocking(move || images.serve(stream, serve.framing))
            .await
            .map_err(|e| join_error("serve pages", e))??;
        tracing::info!(
            requests = served.requests,
            bytes = served.bytes,
            "served every page the lazy restore asked for"
        );
        return Ok(dir);
    }
    let plain = Arc::new(Plaintext::open(store, info, opts, dest).await?);
    let reader = Ranged::new(Arc::clone(&plain));
    let (limits, key, dest_owned) = (opts.limits, info.key.clone(), dest.to_path_buf());
    let (staged, deferred) = tokio::task::spawn_blocking(move || {
        extract::stage_deferring(reader, &dest_owned, &limits, &key, &|rel: &Path| {
            is_page_image(&rel.to_string_lossy())
        })
    })
    .await
    .map_err(|e| join_error("walk the archive", e))??;
    let images = Images::deferred(staged.path(), &deferred, plain)?;
    let images = Arc::new(images);
    let eager = images.eager_ranges(staged.path())?;
    let eager_bytes: u64 = eager.iter().map(|(_, r)| r.end - r.start).sum();
    let fetching = Arc::clone(&images);
    tokio::task::spawn_blocking(move || eager.into_iter().try_for_each(|(file, range)| fetching.ensure(file, range)))
        .await
        .map_err(|e| join_error("fetch the eager pages", e))??;
    let dir = staged.publish_without_manifest_check(&info.key)?;
    tracing::info!(bundle = %dir.display(), eager_bytes, lazy_bytes = images.total() - eager_bytes, "bundle published; serving its pages while they are fetched");
    let stream = images.attach(serve.socket)?;
    ready(&dir);
    let filler = {
        let images = Arc::clone(&images);
        tokio::task::spawn_blocking(move || images.fill())
    };
    let server = {
        let images = Arc::clone(&images);
        tokio::task::spawn_blocking(move || images.serve(stream, serve.framing))
    };
    let filled = filler.await.map_err(|e| join_error("fill the page images", e))?;
    if filled.is_err() {
        // The daemon must not wait on pages that will not come: end its session.
        images.close();
    }
    let served = server.await.map_err(|e| join_error("serve pages", e))?;
    // The first failure explains the rest: a fill that failed ended the session, and a session that
    // failed stopped the fill.
    let served = match (filled, served) {
        (Err(fill), _) => return Err(fill),
        (Ok(_), Err(serve)) => return Err(serve),
        (Ok(true), Ok(served)) => served,
        (Ok(false), Ok(_)) => {
            return Err(Error::io("fill", dest, io::Error::other("the fill stopped before every page was fetched")))
        }
    };
    tracing::info!(
        requests = served.requests,
        bytes = served.bytes,
        "every page is on disk and the lazy restore has every page it asked for"
    );
    Ok(dir)
}

/// Bytes of an archive's tar stream at any offset, blocking: ranged reads of the object, through its
/// encryption when it is encrypted (only the chunks that hold the bytes are read and authenticated).
struct Plaintext {
    rt: Handle,
    store: Arc<dyn Store>,
    key: String,
    retry: RetryPolicy,
    cipher: Option<ChunkDecryptor>,
    size: u64,
    dest: PathBuf,
}

impl Plaintext {
    /// The archive `info`; an encrypted one must be decrypted by a key of `opts` (checked on its
    /// header, before anything is written to `dest`).
    async fn open(store: Arc<dyn Store>, info: &ObjectInfo, opts: &FetchOptions, dest: &Path) -> Result<Plaintext> {
        let (key, retry) = (info.key.clone(), opts.s3.retry);
        let cipher = match opts.keys.key_for(&info.key, info.meta.encryption.as_ref())? {
            None => None,
            Some(k) => {
                let header =
                    read_range(store.clone(), key.clone(), 0..(HEADER_LEN as u64).min(info.meta.size), retry).await?;
                let refuse = |reason: String| Error::Decrypt { key: key.clone(), reason, dest: dest.to_path_buf() };
                let header: [u8; HEADER_LEN] =
                    header[..].try_into().map_err(|_| refuse("it ends inside its encryption header".into()))?;
                Some(ChunkDecryptor::new(&header, &k, info.meta.size).map_err(refuse)?)
            }
        };
        let size = cipher.as_ref().map_or(info.meta.size, ChunkDecryptor::plain_size);
        Ok(Plaintext { rt: Handle::current(), store, key, retry, cipher, size, dest: dest.to_path_buf() })
    }

    /// Bytes `range` of the tar stream.
    fn read(&self, range: Range<u64>) -> Result<Bytes> {
        let Some(cipher) = &self.cipher else {
            return self.rt.block_on(read_range(self.store.clone(), self.key.clone(), range, self.retry));
        };
        let (chunks, sealed) = cipher.locate(&range);
        let bytes = self.rt.block_on(read_range(self.store.clone(), self.key.clone(), sealed, self.retry))?;
        let plain = cipher.decrypt(chunks, &bytes, &range).map_err(|reason| Error::Decrypt {
            key: self.key.clone(),
            reason,
            dest: self.dest.clone(),
        })?;
        Ok(Bytes::from(plain))
    }
}

/// A blocking, seekable reader of an archive's tar stream, by reads of [`WALK_WINDOW`].
struct Ranged {
    plain: Arc<Plaintext>,
    pos: u64,
    window: Bytes,
    window_at: u64,
}

impl Ranged {
    fn new(plain: Arc<Plaintext>) -> Ranged {
        Ranged { plain, pos: 0, window: Bytes::new(), window_at: 0 }
    }
}

impl Read for Ranged {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.plain.size {
            return Ok(0);
        }
        let in_window = self.pos >= self.window_at && self.pos < self.window_at + self.window.len() as u64;
        if !in_window {
            let range = self.pos..(self.pos + WALK_WINDOW).min(self.plain.size);
            self.window = self.plain.read(range).map_err(io::Error::other)?;
            self.window_at = self.pos;
        }
        let from = (self.pos - self.window_at) as usize;
        let n = buf.len().min(self.window.len() - from);
        buf[..n].copy_from_slice(&self.window[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Ranged {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let to = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.plain.size.checked_add_signed(d),
        };
        self.pos = to.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

/// Where a block stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Missing,
    Fetching,
    Present,
}

/// One page image on disk, and where its contents lie in the archive.
struct Image {
    file: File,
    size: u64,
    archive_offset: u64,
    blocks: Vec<Block>,
}

/// The page images of one bundle: complete on disk, or filled from the store block by block.
struct Images {
    images: Mutex<BTreeMap<String, Image>>,
    changed: Condvar,
    fetch: Option<Arc<Plaintext>>,
    maps: Vec<PageMap>,
    socket: Mutex<Option<UnixStream>>,
    /// Set once the session is ended: the fill stops.
    closed: std::sync::atomic::AtomicBool,
}

impl Images {
    /// The complete page images of the bundle `dir`.
    fn local(dir: &Path) -> Result<Images> {
        let image_dir = image_dir_of(dir);
        let mut images = BTreeMap::new();
        for name in page_image_names(&image_dir)? {
            let path = image_dir.join(&name);
            let file = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
            let size = file.metadata().map_err(|e| Error::io("stat", &path, e))?.len();
            images.insert(name, Image { file, size, archive_offset: 0, blocks: vec![Block::Present; blocks_in(size)] });
        }
        Images::new(images, None, &image_dir)
    }

    /// The page images `deferred` (created empty at their size under `staging`), to be filled from
    /// the archive's tar stream `plain`.
    fn deferred(staging: &Path, deferred: &[Deferred], plain: Arc<Plaintext>) -> Result<Images> {
        let mut images = BTreeMap::new();
        for d in deferred {
            let path = staging.join(&d.rel);
            let file = File::options().read(true).write(true).open(&path).map_err(|e| Error::io("open", &path, e))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            images.insert(
                name,
                Image { file, size: d.size, archive_offset: d.offset, blocks: vec![Block::Missing; blocks_in(d.size)] },
            );
        }
        Images::new(images, Some(plain), &image_dir_of(staging))
    }

    fn new(images: BTreeMap<String, Image>, fetch: Option<Arc<Plaintext>>, image_dir: &Path) -> Result<Images> {
        let maps = PageMap::read_dir(image_dir)
            .map_err(|e| Error::io("read the page maps in", image_dir, io::Error::other(e)))?;
        Ok(Images {
            images: Mutex::new(images),
            changed: Condvar::new(),
            fetch,
            maps,
            socket: Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Image>> {
        self.images.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of all page images.
    fn total(&self) -> u64 {
        self.lock().values().map(|i| i.size).sum()
    }

    /// The byte ranges a lazy restore reads itself (everything, for a bundle with GPU state).
    fn eager_ranges(&self, bundle: &Path) -> Result<Vec<(String, Range<u64>)>> {
        let sizes: BTreeMap<String, u64> = self.lock().iter().map(|(n, i)| (n.clone(), i.size)).collect();
        let whole = has_gpu_state(bundle);
        let ranges = if whole {
            tracing::info!("the bundle holds GPU state, which is restored fully: fetching every page first");
            sizes.iter().map(|(n, &s)| (n.clone(), std::iter::once(0..s).collect())).collect()
        } else {
            eager_ranges(&self.maps, &sizes)
        };
        Ok(ranges.into_iter().flat_map(|(n, rs)| rs.into_iter().map(move |r| (n.clone(), r))).collect())
    }

    /// Makes sure bytes `range` of image `name` are on disk, fetching the blocks that are not (or
    /// waiting for those another thread fetches).
    fn ensure(&self, name: String, range: Range<u64>) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let first = (range.start / BLOCK_SIZE) as usize;
        let last = ((range.end - 1) / BLOCK_SIZE) as usize;
        for block in first..=last {
            self.ensure_block(&name, block)?;
        }
        Ok(())
    }

    fn ensure_block(&self, name: &str, block: usize) -> Result<()> {
        let mut images = self.lock();
        loop {
            let image = images.get_mut(name).ok_or_else(|| unknown(name))?;
            match image.blocks.get(block).copied() {
                None => return Err(Error::io("fetch pages of", Path::new(name), io::Error::other("past its end"))),
                Some(Block::Present) => return Ok(()),
                Some(Block::Fetching) => images = self.changed.wait(images).unwrap_or_else(|p| p.into_inner()),
                Some(Block::Missing) => {
                    image.blocks[block] = Block::Fetching;
                    let start = block as u64 * BLOCK_SIZE;
                    let len = BLOCK_SIZE.min(image.size - start);
                    let (archive, file) = (image.archive_offset + start, image.file.try_clone());
                    drop(images);
                    let fetched = self.fetch_into(name, file, archive..archive + len, start);
                    images = self.lock();
                    let image = images.get_mut(name).ok_or_else(|| unknown(name))?;
                    image.blocks[block] = if fetched.is_ok() { Block::Present } else { Block::Missing };
                    self.changed.notify_all();
                    return fetched;
                }
            }
        }
    }

    fn fetch_into(&self, name: &str, file: io::Result<File>, archive: Range<u64>, at: u64) -> Result<()> {
        let fetch = self.fetch.as_ref().ok_or_else(|| {
            Error::io("fetch pages of", Path::new(name), io::Error::other("the image is local and incomplete"))
        })?;
        let bytes = fetch.read(archive)?;
        let file = file.map_err(|e| Error::io("open", Path::new(name), e))?;
        file.write_all_at(&bytes, at).map_err(|e| Error::io("write pages into", Path::new(name), e))
    }

    /// Fetches every block still missing, in order, [`FILL_CONCURRENCY`] at a time, then syncs the
    /// images: `true`; `false` when the session was ended first ([`Images::close`]).
    fn fill(&self) -> Result<bool> {
        let work: Vec<(String, usize)> =
            self.lock().iter().flat_map(|(n, i)| (0..i.blocks.len()).map(move |b| (n.clone(), b))).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..FILL_CONCURRENCY)
                .map(|_| {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((name, block)) = work.get(i) else { return Ok(()) };
                        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
                            return Ok(());
                        }
                        self.ensure_block(name, *block)?;
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(Error::io("fill", Path::new("page images"), io::Error::other("a fill thread panicked")))
                })
            })
        })?;
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(false);
        }
        for (name, image) in self.lock().iter() {
            image.file.sync_all().map_err(|e| Error::io("fsync", Path::new(name), e))?;
        }
        Ok(true)
    }

    /// Takes the daemon's socket, so that [`Images::close`] can end its session from any thread;
    /// returns the stream to serve it on.
    fn attach(&self, socket: UnixStream) -> Result<UnixStream> {
        let stream = socket.try_clone().map_err(|e| Error::io("clone", Path::new("the page-server socket"), e))?;
        *self.socket.lock().unwrap_or_else(|p| p.into_inner()) = Some(socket);
        Ok(stream)
    }

    /// Serves the daemon on `stream` (from [`Images::attach`]) until it closes its session.
    fn serve(&self, stream: UnixStream, framing: Framing) -> Result<Served> {
        let served = page_server::serve(stream, &self.maps, self, framing).map_err(|e| {
            // The daemon must not wait for an answer that will not come.
            self.close();
            Error::io("serve pages", Path::new("criu lazy-pages"), io::Error::other(e))
        })?;
        if !served.closed {
            self.close();
            return Err(Error::io(
                "serve pages",
                Path::new("criu lazy-pages"),
                io::Error::other(
                    "the lazy-pages daemon went away before it had every page; the shim kills the container",
                ),
            ));
        }
        Ok(served)
    }

    /// Ends the daemon's session (it then fails, and the container with it).
    fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(socket) = self.socket.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl PageSource for Images {
    fn read_pages(&self, pages_file: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.ensure(pages_file.to_string(), offset..offset + buf.len() as u64).map_err(io::Error::other)?;
        let file = self
            .lock()
            .get(pages_file)
            .map(|i| i.file.try_clone())
            .ok_or_else(|| io::Error::other(unknown(pages_file)))??;
        file.read_exact_at(buf, offset)
    }
}

fn unknown(name: &str) -> Error {
    Error::io(
        "serve pages of",
        Path::new(name),
        io::Error::new(io::ErrorKind::NotFound, "no such page image in the bundle"),
    )
}

fn blocks_in(size: u64) -> usize {
    size.div_ceil(BLOCK_SIZE) as usize
}

/// The image directory of a bundle directory, in either layout (where its inventory image is).
fn image_dir_of(dir: &Path) -> PathBuf {
    BundleLayout::detect(dir).map_or_else(|| dir.to_path_buf(), |layout| layout.image_dir(dir))
}

/// The page images in `image_dir`.
fn page_image_names(image_dir: &Path) -> Result<Vec<String>> {
    let listing = |e| Error::io("list", image_dir, e);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(image_dir).map_err(listing)? {
        let name = entry.map_err(listing)?.file_name().to_string_lossy().into_owned();
        if is_page_image(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// Whether the bundle's manifest (not yet verified: the shim verifies it) records GPU state.
fn has_gpu_state(bundle: &Path) -> bool {
    let manifest = std::fs::read(bundle.join(checkpoint_core::bundle::MANIFEST_FILE)).ok();
    manifest
        .and_then(|m| serde_json::from_slice::<checkpoint_core::bundle::Manifest>(&m).ok())
        .is_some_and(|m| m.gpu.is_some())
}
