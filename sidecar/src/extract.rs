//! Safe extraction of a bundle archive into a hidden temp directory beside the destination, then
//! an atomic rename into place.
//!
//! Rejected: absolute paths, `..` components, entries that would be written through a symlink,
//! symlinks whose target is absolute or resolves outside the bundle (also through other symlinks,
//! checked after extraction), hardlinks to anything but a regular file already in the bundle,
//! device nodes, fifos and unknown entry types, duplicates, and archives beyond the byte and entry
//! limits. Files are created with `O_CREAT|O_EXCL` (which fails on an existing symlink), set-id
//! bits are dropped. On any error the temp directory is removed and nothing is published.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use checkpoint_core::bundle::is_complete;

use crate::archive::Compression;
use crate::error::{Error, Result};
use crate::fsutil::{sync_dir, temp_sibling};

/// Upper bounds on what an archive may unpack to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Total bytes of file contents.
    pub max_unpacked_bytes: u64,
    /// Number of entries (files, directories, links).
    pub max_entries: u64,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        ExtractLimits { max_unpacked_bytes: 1 << 40, max_entries: 100_000 }
    }
}

impl ExtractLimits {
    /// Most bytes the (decompressed) tar stream may have: contents plus per-entry header room.
    pub fn max_stream_bytes(&self) -> u64 {
        self.max_unpacked_bytes.saturating_add(self.max_entries.saturating_mul(8 << 10)).saturating_add(1 << 20)
    }
}

/// What a successful extraction unpacked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries extracted.
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// An archive unpacked into a temp directory, not yet visible at its destination.
/// Dropping it without [`Staged::publish`] removes the temp directory.
#[derive(Debug)]
pub struct Staged {
    temp: PathBuf,
    dest: PathBuf,
    stats: UnpackStats,
    published: bool,
}

impl Staged {
    /// The staging directory the archive is unpacked in.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// What was unpacked.
    pub fn stats(&self) -> UnpackStats {
        self.stats
    }

    /// Checks that the bundle is complete (has `COMPLETE`) and that its manifest verifies (every
    /// file present with its sealed size and sha256, nothing added), makes it durable and renames it
    /// to its destination. `key` names the archive in errors. Returns the destination.
    pub fn publish(self, key: &str) -> Result<PathBuf> {
        self.publish_checked(key, true)
    }

    /// [`Staged::publish`] without the manifest pass (a second read of every file): for a caller
    /// that verifies the manifest itself before the bundle is used. `COMPLETE` is still required of
    /// a Kybernate bundle; an archive another runtime wrote (no Kybernate file at its top) is
    /// published as it is, for the caller's trust rules to judge.
    pub fn publish_without_manifest_check(self, key: &str) -> Result<PathBuf> {
        self.publish_checked(key, false)
    }

    fn publish_checked(mut self, key: &str, manifest: bool) -> Result<PathBuf> {
        let ours = checkpoint_core::bundle::has_kybernate_files(&self.temp);
        if !ours && manifest {
            return Err(Error::Foreign { key: key.to_string(), dest: self.dest.clone() });
        }
        if ours && !is_complete(&self.temp) {
            return Err(Error::NotComplete { bundle: self.dest.clone() });
        }
        if !ours {
            tracing::warn!(key, dest = %self.dest.display(), "the archive holds no Kybernate bundle; published unverified for the caller to judge");
        }
        if manifest {
            checkpoint_core::bundle::verify(&self.temp).map_err(|source| Error::BundleInvalid {
                key: key.to_string(),
                dest: self.dest.clone(),
                source: Box::new(source),
            })?;
        }
        sync_tree(&self.temp)?;
        if fs::symlink_metadata(&self.dest).is_ok() {
            return Err(Error::DestinationExists { path: self.dest.clone() });
        }
        fs::rename(&self.temp, &self.dest).map_err(|e| Error::io("rename into place", &self.dest, e))?;
        self.published = true;
        sync_dir(self.dest.parent().unwrap_or(Path::new("/")))?;
        Ok(self.dest.clone())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.published {
            if let Err(e) = fs::remove_dir_all(&self.temp) {
                tracing::warn!(path = %self.temp.display(), error = %e, "cannot remove staging directory");
            }
        }
    }
}

/// Unpacks the archive read from `raw` (in `compression`) into a temp directory beside `dest`.
/// `name` identifies the archive in errors. `dest` must not exist; its parent is created.
/// For zstd, the whole compressed frame is consumed; bytes after it are left in `raw`.
pub fn stage<R: Read>(
    raw: &mut R,
    compression: Compression,
    dest: &Path,
    limits: &ExtractLimits,
    name: &str,
) -> Result<Staged> {
    let (mut staged, mut ctx) = begin(dest, limits, name)?;
    let max_stream = limits.max_stream_bytes();
    match compression {
        Compression::None => {
            let mut limited = Limited::new(raw, max_stream);
            ctx.unpack(&mut limited)?;
        }
        Compression::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(raw).map_err(|e| ctx.unpack_err(e))?;
            let mut limited = Limited::new(decoder.single_frame(), max_stream);
            ctx.unpack(&mut limited)?;
            // Consume the rest of the frame so its checksum is verified.
            io::copy(&mut limited, &mut io::sink()).map_err(|e| ctx.stream_err(e, max_stream))?;
        }
    }
    ctx.check_symlinks()?;
    staged.stats = ctx.stats;
    Ok(staged)
}

/// A regular file [`stage_deferring`] created at its full size without reading its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deferred {
    /// Its path in the bundle.
    pub rel: PathBuf,
    /// Where its contents start in the tar stream.
    pub offset: u64,
    /// Its size.
    pub size: u64,
}

/// Like [`stage`] for a plain tar that can be read at any offset (a ranged reader over a store):
/// the regular files `defer` picks are created at their size, sparse, and their contents skipped,
/// for the caller to fill in; everything else is checked and unpacked as [`stage`] does.
pub fn stage_deferring<R: Read + Seek>(
    raw: R,
    dest: &Path,
    limits: &ExtractLimits,
    name: &str,
    defer: &dyn Fn(&Path) -> bool,
) -> Result<(Staged, Vec<Deferred>)> {
    let (mut staged, mut ctx) = begin(dest, limits, name)?;
    let mut limited = Limited::new(raw, limits.max_stream_bytes());
    let max_stream = limited.limit;
    let mut archive = tar::Archive::new(&mut limited);
    let entries = archive.entries_with_seek().map_err(|e| ctx.stream_err(e, max_stream))?;
    let deferred = ctx.unpack_entries(entries, max_stream, Some(defer))?;
    ctx.check_symlinks()?;
    staged.stats = ctx.stats;
    Ok((staged, deferred))
}

/// Makes the staging directory beside `dest` and the unpacker that fills it.
fn begin<'a>(dest: &Path, limits: &ExtractLimits, name: &'a str) -> Result<(Staged, Unpacker<'a>)> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(Error::DestinationExists { path: dest.to_path_buf() });
    }
    let parent = dest.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
    let temp = temp_sibling(dest, "partial");
    DirBuilder::new().mode(0o700).create(&temp).map_err(|e| Error::io("create staging directory", &temp, e))?;
    let staged = Staged { temp, dest: dest.to_path_buf(), stats: UnpackStats::default(), published: false };
    let ctx = Unpacker {
        root: staged.temp.clone(),
        dest: staged.dest.clone(),
        limits: *limits,
        name,
        stats: UnpackStats::default(),
        symlinks: Vec::new(),
    };
    Ok((staged, ctx))
}

struct Unpacker<'a> {
    root: PathBuf,
    dest: PathBuf,
    limits: ExtractLimits,
    name: &'a str,
    stats: UnpackStats,
    symlinks: Vec<(PathBuf, String)>,
}

impl Unpacker<'_> {
    fn unsafe_entry(&self, entry: &str, reason: impl Into<String>) -> Error {
        Error::UnsafeArchive { entry: entry.to_string(), reason: reason.into(), dest: self.dest.clone() }
    }

    fn limit(&self, what: &'static str, limit: u64) -> Error {
        Error::LimitExceeded { what, limit, dest: self.dest.clone() }
    }

    fn unpack_err(&self, source: io::Error) -> Error {
        Error::Unpack { key: self.name.to_string(), source }
    }

    fn stream_err(&self, e: io::Error, max_stream: u64) -> Error {
        if e.get_ref().is_some_and(|inner| inner.is::<StreamLimit>()) {
            self.limit("archive stream size", max_stream)
        } else {
            self.unpack_err(e)
        }
    }

    fn unpack<R: Read>(&mut self, reader: &mut Limited<R>) -> Result<()> {
        let max_stream = reader.limit;
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| self.stream_err(e, max_stream))?;
        self.unpack_entries(entries, max_stream, None).map(drop)
    }

    /// Unpacks `entries`; the regular files `defer` picks are only created at their size.
    fn unpack_entries<R: Read>(
        &mut self,
        entries: tar::Entries<'_, R>,
        max_stream: u64,
        defer: Option<&dyn Fn(&Path) -> bool>,
    ) -> Result<Vec<Deferred>> {
        let mut deferred = Vec::new();
        for entry in entries {
            let mut entry = entry.map_err(|e| self.stream_err(e, max_stream))?;
            let raw_path = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw_path).into_owned();
            let kind = entry.header().entry_type();
            if matches!(kind, tar::EntryType::XGlobalHeader) {
                continue;
            }
            self.stats.entries += 1;
            if self.stats.entries > self.limits.max_entries {
                return Err(self.limit("entry count", self.limits.max_entries));
            }
            let rel = safe_relative(&raw_path).map_err(|r| self.unsafe_entry(&shown, r))?;
            match kind {
                tar::EntryType::Directory => {
                    if rel.as_os_str().is_empty() {
                        continue;
                    }
                    let path = self.prepare(&rel, &shown, true)?;
                    if !path.is_dir() {
                        DirBuilder::new()
                            .mode(0o700)
                            .create(&path)
                            .map_err(|e| Error::io("create directory", &path, e))?;
                    }
                    let mode = entry.header().mode().unwrap_or(0o755) & 0o777 | 0o700;
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                        .map_err(|e| Error::io("set permissions of", &path, e))?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                    let path = self.prepare_nonempty(&rel, &shown)?;
                    let size = entry.size();
                    if self.stats.bytes.saturating_add(size) > self.limits.max_unpacked_bytes {
                        return Err(self.limit("unpacked size", self.limits.max_unpacked_bytes));
                    }
                    let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
                    let mtime = entry.header().mtime().ok();
                    let mut file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(|e| Error::io("create", &path, e))?;
                    if kind == tar::EntryType::Regular && defer.is_some_and(|defer| defer(&rel)) {
                        file.set_len(size).map_err(|e| Error::io("size", &path, e))?;
                        file.set_permissions(fs::Permissions::from_mode(mode))
                            .map_err(|e| Error::io("set permissions of", &path, e))?;
                        self.stats.bytes += size;
                        deferred.push(Deferred { rel, offset: entry.raw_file_position(), size });
                        continue;
                    }
                    let copied = io::copy(&mut (&mut entry).take(size), &mut file)
                        .map_err(|e| self.stream_err(e, max_stream))?;
                    if copied != size {
                        return Err(self.unpack_err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("entry `{shown}` is truncated ({copied} of {size} bytes)"),
                        )));
                    }
                    self.stats.bytes += size;
                    file.set_permissions(fs::Permissions::from_mode(mode))
                        .map_err(|e| Error::io("set permissions of", &path, e))?;
                    if let Some(t) = mtime {
                        file.set_modified(UNIX_EPOCH + Duration::from_secs(t))
                            .map_err(|e| Error::io("set mtime of", &path, e))?;
                    }
                    file.sync_all().map_err(|e| Error::io("fsync", &path, e))?;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .ok_or_else(|| self.unsafe_entry(&shown, "symlink without a target"))?;
                    check_symlink_target(&rel, &target).map_err(|r| self.unsafe_entry(&shown, r))?;
                    let path = self.prepare_nonempty(&rel, &shown)?;
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &path)
                        .map_err(|e| Error::io("create symlink", &path, e))?;
                    self.symlinks.push((path, shown));
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .ok_or_else(|| self.unsafe_entry(&shown, "hardlink without a target"))?;
                    let target_rel = safe_relative(&target)
                        .map_err(|r| self.unsafe_entry(&shown, format!("hardlink target: {r}")))?;
                    if target_rel.as_os_str().is_empty() {
                        return Err(self.unsafe_entry(&shown, "hardlink to the bundle root"));
                    }
                    self.check_no_symlink_parents(&target_rel, &shown)?;
                    let source = self.root.join(&target_rel);
                    match fs::symlink_metadata(&source) {
                        Ok(md) if md.file_type().is_file() => {}
                        _ => {
                            return Err(self.unsafe_entry(
                                &shown,
                                "hardlink target is not a regular file extracted earlier from \
                                 this archive",
                            ))
                        }
                    }
                    let path = self.prepare_nonempty(&rel, &shown)?;
                    fs::hard_link(&source, &path).map_err(|e| Error::io("create hardlink", &path, e))?;
                }
                tar::EntryType::Char | tar::EntryType::Block => {
                    return Err(self.unsafe_entry(&shown, "device nodes are not allowed in a bundle"))
                }
                tar::EntryType::Fifo => return Err(self.unsafe_entry(&shown, "fifos are not allowed in a bundle")),
                other => return Err(self.unsafe_entry(&shown, format!("unsupported entry type {other:?}"))),
            }
        }
        Ok(deferred)
    }

    fn prepare_nonempty(&self, rel: &Path, shown: &str) -> Result<PathBuf> {
        if rel.as_os_str().is_empty() {
            return Err(self.unsafe_entry(shown, "entry would replace the bundle root"));
        }
        self.prepare(rel, shown, false)
    }

    /// Creates missing parent directories of `rel` (refusing to pass through symlinks or
    /// non-directories) and checks that `rel` itself does not exist yet (a directory may exist
    /// when `dir_ok`). Returns the absolute path.
    fn prepare(&self, rel: &Path, shown: &str, dir_ok: bool) -> Result<PathBuf> {
        let mut cur = self.root.clone();
        let components: Vec<_> = rel.components().collect();
        for c in &components[..components.len().saturating_sub(1)] {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(self.unsafe_entry(shown, "path goes through a symlink"))
                }
                Ok(md) if md.is_dir() => {}
                Ok(_) => return Err(self.unsafe_entry(shown, "a parent path is not a directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    DirBuilder::new().mode(0o755).create(&cur).map_err(|e| Error::io("create directory", &cur, e))?;
                }
                Err(e) => return Err(Error::io("stat", &cur, e)),
            }
        }
        let path = self.root.join(rel);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path),
            Ok(md) if dir_ok && md.is_dir() => Ok(path),
            Ok(_) => Err(self.unsafe_entry(shown, "duplicate entry")),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    fn check_no_symlink_parents(&self, rel: &Path, shown: &str) -> Result<()> {
        let mut cur = self.root.clone();
        let components: Vec<_> = rel.components().collect();
        for c in &components[..components.len().saturating_sub(1)] {
            cur.push(c);
            if fs::symlink_metadata(&cur).is_ok_and(|md| md.file_type().is_symlink()) {
                return Err(self.unsafe_entry(shown, "hardlink target goes through a symlink"));
            }
        }
        Ok(())
    }

    /// Every symlink must resolve (through any other symlinks) to a path inside the bundle.
    fn check_symlinks(&self) -> Result<()> {
        if self.symlinks.is_empty() {
            return Ok(());
        }
        let root = fs::canonicalize(&self.root).map_err(|e| Error::io("resolve", &self.root, e))?;
        for (path, shown) in &self.symlinks {
            match fs::canonicalize(path) {
                Ok(real) if real.starts_with(&root) => {}
                Ok(_) => return Err(self.unsafe_entry(shown, "symlink resolves outside the bundle")),
                Err(_) => {
                    return Err(
                        self.unsafe_entry(shown, "symlink is dangling or loops (its target is not in the bundle)")
                    )
                }
            }
        }
        Ok(())
    }
}

/// Normalises an archive path into a relative path of plain components (empty for the root).
fn safe_relative(raw: &[u8]) -> std::result::Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("empty path".into());
    }
    if raw.starts_with(b"/") {
        return Err("absolute path".into());
    }
    let mut out = PathBuf::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path has a `..` component".into()),
            p => out.push(std::ffi::OsStr::from_bytes(p)),
        }
    }
    Ok(out)
}

/// A symlink's target must be relative and, resolved lexically from the link's directory, stay
/// inside the bundle.
fn check_symlink_target(link: &Path, target: &[u8]) -> std::result::Result<(), String> {
    if target.is_empty() {
        return Err("symlink with an empty target".into());
    }
    let target = Path::new(std::ffi::OsStr::from_bytes(target));
    let mut depth = link.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("symlink target `{}` escapes the bundle", target.display()));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("symlink target `{}` is absolute", target.display()))
            }
        }
    }
    Ok(())
}

/// fsyncs every directory of a tree (files were synced as they were written).
fn sync_tree(root: &Path) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(|e| Error::io("list directory", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("list directory", &dir, e))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("fsync directory", &dir, e))?;
    }
    Ok(())
}

/// Marker error: the stream exceeded its byte limit.
#[derive(Debug)]
struct StreamLimit;

impl std::fmt::Display for StreamLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("archive stream exceeds the size limit")
    }
}

impl std::error::Error for StreamLimit {}

/// A reader that fails once more than `limit` bytes were read through it.
struct Limited<R> {
    inner: R,
    limit: u64,
    read: u64,
}

impl<R> Limited<R> {
    fn new(inner: R, limit: u64) -> Self {
        Limited { inner, limit, read: 0 }
    }
}

impl<R: Seek> Seek for Limited<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let at = self.inner.seek(pos)?;
        // What is skipped counts as read: the limit bounds how far into the stream an entry may lie.
        self.read = self.read.max(at);
        if self.read > self.limit {
            return Err(io::Error::other(StreamLimit));
        }
        Ok(at)
    }
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::other(StreamLimit));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_normalised_or_rejected() {
        assert_eq!(safe_relative(b"a/./b//c/").unwrap(), PathBuf::from("a/b/c"));
        assert_eq!(safe_relative(b"./").unwrap(), PathBuf::new());
        assert!(safe_relative(b"/etc/passwd").is_err());
        assert!(safe_relative(b"a/../../b").is_err());
        assert!(safe_relative(b"..").is_err());
        assert!(safe_relative(b"").is_err());
    }

    #[test]
    fn symlink_targets_must_stay_inside() {
        assert!(check_symlink_target(Path::new("a/b/link"), b"../c").is_ok());
        assert!(check_symlink_target(Path::new("a/b/link"), b"../../c").is_ok());
        assert!(check_symlink_target(Path::new("a/b/link"), b"../../../c").is_err());
        assert!(check_symlink_target(Path::new("link"), b"x/../../y").is_err());
        assert!(check_symlink_target(Path::new("link"), b"/etc/passwd").is_err());
        assert!(check_symlink_target(Path::new("link"), b"").is_err());
    }
}
