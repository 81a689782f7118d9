//! The container's writable layer in a bundle: `rootfs-diff.tar` (what the container added or changed)
//! and `deleted.files` (what it removed from the image), as Podman and CRI-O write them, captured from
//! an overlayfs upper directory and re-applied onto a fresh rootfs before a restore.
//!
//! Capture reads the upper directory of a stopped (or frozen) container: whiteouts (0/0 character
//! devices) become `deleted.files` entries, opaque directories are listed there too (their image
//! contents are gone) and archived with their new contents, everything else goes into the tar.
//! Device nodes are left out (a restore refuses them), and set-id files are recorded in
//! [`CapturedLayer::setid`], which the manifest carries.
//! Apply reads the tar plain or gzip-compressed (as containerd's CRI writes it), refuses any path
//! that would leave the rootfs (absolute or `..` entries, symlinked parents)
//! and any device node, removes the deleted paths first, then unpacks the tar, clearing the set-user-
//! and set-group-id bits of every file the signed manifest does not record with them.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bundle::{DELETED_FILES, ROOTFS_DIFF};
use crate::error::{Error, Result};

/// What [`capture_overlay_diff`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsDiffStats {
    /// Entries archived in `rootfs-diff.tar` (files, directories, links).
    pub entries: u64,
    /// Bytes of regular-file content archived.
    pub content_bytes: u64,
    /// Paths listed in `deleted.files`.
    pub deleted: u64,
    /// Device nodes the container created in its writable layer, left out (a restore would refuse
    /// them).
    #[serde(default)]
    pub devices_skipped: u64,
}

/// The set-user-id and set-group-id bits.
pub const SETID_BITS: u32 = 0o6000;

/// What [`capture_overlay_diff`] wrote, and what the manifest must record of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapturedLayer {
    /// Counts.
    pub stats: RootfsDiffStats,
    /// The files archived with a set-user-id or set-group-id bit, by archive path, with their mode
    /// (`0o7777` bits): the only ones that keep those bits when applied.
    pub setid: BTreeMap<String, u32>,
}

fn diff_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Bundle { path: path.to_path_buf(), reason: reason.into() }
}

/// Whether overlayfs marked `dir` opaque (its lower contents are hidden).
fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else { return false };
    let mut value = [0u8; 4];
    ["trusted.overlay.opaque", "user.overlay.opaque"].iter().any(|name| {
        let name = CString::new(*name).expect("static xattr name");
        // SAFETY: both strings are NUL-terminated and live across the call; the buffer is sized.
        let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        n == 1 && value[0] == b'y'
    })
}

/// Writes `rootfs-diff.tar` and `deleted.files` into `bundle` from the overlayfs upper directory
/// `upperdir` of a container that no longer runs (or is frozen).
pub fn capture_overlay_diff(upperdir: &Path, bundle: &Path) -> Result<CapturedLayer> {
    if !upperdir.is_dir() {
        return Err(diff_error(
            upperdir,
            "the container's overlay upper directory does not exist; was the container's snapshot removed?",
        ));
    }
    let tar_path = bundle.join(ROOTFS_DIFF);
    let file = File::create(&tar_path).map_err(|e| Error::io(format!("creating {}", tar_path.display()), e))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    let mut layer = CapturedLayer::default();
    let stats = &mut layer.stats;
    let mut deleted = Vec::new();
    let mut stack = vec![PathBuf::new()];
    let write_err = |e: std::io::Error| Error::io(format!("writing {}", tar_path.display()), e);
    while let Some(rel_dir) = stack.pop() {
        let abs_dir = upperdir.join(&rel_dir);
        let mut entries: Vec<_> = fs::read_dir(&abs_dir)
            .map_err(|e| Error::io(format!("listing {}", abs_dir.display()), e))?
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(format!("listing {}", abs_dir.display()), e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let rel = rel_dir.join(entry.file_name());
            let abs = entry.path();
            let meta = fs::symlink_metadata(&abs).map_err(|e| Error::io(format!("stat {}", abs.display()), e))?;
            let kind = meta.file_type();
            if kind.is_char_device() && meta.rdev() == 0 {
                deleted.push(format!("/{}", rel.display()));
                continue;
            }
            if kind.is_char_device() || kind.is_block_device() {
                tracing::warn!(path = %rel.display(), "leaving a device node out of the writable layer");
                stats.devices_skipped += 1;
                continue;
            }
            if kind.is_dir() && is_opaque(&abs) {
                deleted.push(format!("/{}", rel.display()));
            }
            if kind.is_file() && meta.mode() & SETID_BITS != 0 {
                layer.setid.insert(rel.to_string_lossy().into_owned(), meta.mode() & 0o7777);
            }
            tar.append_path_with_name(&abs, &rel).map_err(write_err)?;
            stats.entries += 1;
            if kind.is_file() {
                stats.content_bytes += meta.len();
            }
            if kind.is_dir() {
                stack.push(rel);
            }
        }
    }
    let mut out = tar.into_inner().map_err(write_err)?;
    out.flush().map_err(write_err)?;
    deleted.sort();
    stats.deleted = deleted.len() as u64;
    let list = bundle.join(DELETED_FILES);
    fs::write(&list, serde_json::to_vec(&deleted).expect("a list of strings serializes"))
        .map_err(|e| Error::io(format!("writing {}", list.display()), e))?;
    Ok(layer)
}

/// `rootfs` joined with the in-container path `path` (`/a/b`), refusing `..`, and parents that are
/// symlinks (which could point outside the rootfs).
fn contained(rootfs: &Path, path: &str) -> Result<PathBuf> {
    let refuse = |why: &str| diff_error(rootfs, format!("{DELETED_FILES} entry {path:?} {why}; the bundle is corrupt"));
    let rel = Path::new(path.strip_prefix('/').unwrap_or(path));
    let mut out = rootfs.to_path_buf();
    let mut parts = rel.components().peekable();
    if parts.peek().is_none() {
        return Err(refuse("names the root itself"));
    }
    while let Some(part) = parts.next() {
        let Component::Normal(name) = part else { return Err(refuse("leaves the container's root")) };
        out.push(name);
        let last = parts.peek().is_none();
        if !last && fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(refuse("goes through a symbolic link"));
        }
    }
    Ok(out)
}

/// Whether `bundle` carries a captured writable layer.
pub fn has_rootfs_diff(bundle: &Path) -> bool {
    bundle.join(ROOTFS_DIFF).is_file()
}

/// Re-applies the writable layer captured in `bundle` onto the (fresh, not yet running) `rootfs`:
/// deletions first, then the archive. Nothing is written outside `rootfs`; a device node is refused;
/// a file keeps its set-user-id or set-group-id bit only when `setid` (the signed manifest's record)
/// has it with that mode.
pub fn apply_rootfs_diff(bundle: &Path, rootfs: &Path, setid: &BTreeMap<String, u32>) -> Result<()> {
    let list = bundle.join(DELETED_FILES);
    let deleted: Vec<String> = match fs::read(&list) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| diff_error(&list, format!("is not a JSON list of paths ({e}); the bundle is corrupt")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(format!("reading {}", list.display()), e)),
    };
    for path in &deleted {
        let target = contained(rootfs, path)?;
        let removed = match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&target),
            Ok(_) => fs::remove_file(&target),
            Err(_) => Ok(()),
        };
        removed.map_err(|e| Error::io(format!("removing {} from the new rootfs", target.display()), e))?;
    }
    unpack_layer(&bundle.join(ROOTFS_DIFF), rootfs, setid)
}

/// Unpacks the tar at `tar_path` (gzip-compressed or not) into `dest`, which must not be running
/// yet: entries that leave `dest` and device nodes are refused, set-id bits are kept only as `setid`
/// records them.
pub(crate) fn unpack_layer(tar_path: &Path, dest: &Path, setid: &BTreeMap<String, u32>) -> Result<()> {
    let file = File::open(tar_path).map_err(|e| Error::io(format!("opening {}", tar_path.display()), e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    // containerd's CRI writes the layer gzip-compressed under the same name; Podman and CRI-O do not.
    let gzipped = std::io::BufRead::fill_buf(&mut reader)
        .map_err(|e| Error::io(format!("reading {}", tar_path.display()), e))?
        .starts_with(&[0x1f, 0x8b]);
    let stream: Box<dyn std::io::Read> = match gzipped {
        true => Box::new(flate2::read::GzDecoder::new(reader)),
        false => Box::new(reader),
    };
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries().map_err(|e| Error::io(format!("reading {}", tar_path.display()), e))? {
        let mut entry = entry.map_err(|e| Error::io(format!("reading {}", tar_path.display()), e))?;
        let name = entry.path().map_err(|e| Error::io(format!("reading {}", tar_path.display()), e))?.into_owned();
        if name.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(diff_error(
                tar_path,
                format!("entry {} leaves the container's root; the bundle is corrupt", name.display()),
            ));
        }
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() {
            return Err(diff_error(
                tar_path,
                format!(
                    "entry {} is a device node, which a restore never creates; the bundle is hostile",
                    name.display()
                ),
            ));
        }
        let mode = entry.header().mode().unwrap_or(0) & 0o7777;
        if mode & SETID_BITS != 0 && setid.get(name.to_string_lossy().as_ref()) != Some(&mode) {
            tracing::warn!(path = %name.display(), mode = format!("{mode:o}"), "clearing set-id bits the manifest does not record");
            entry.set_mask(SETID_BITS);
        }
        let unpacked = entry
            .unpack_in(dest)
            .map_err(|e| Error::io(format!("unpacking {} into {}", name.display(), dest.display()), e))?;
        if !unpacked {
            return Err(diff_error(
                tar_path,
                format!("entry {} leaves the container's root; the bundle is corrupt", name.display()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn capture_and_apply_round_trip() {
        let upper = tempfile::tempdir().unwrap();
        let bundle = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        fs::create_dir_all(upper.path().join("etc/app")).unwrap();
        fs::write(upper.path().join("etc/app/state"), b"42").unwrap();
        symlink("state", upper.path().join("etc/app/link")).unwrap();
        // a whiteout needs CAP_MKNOD (root); the tests run as root
        nix_mknod_whiteout(&upper.path().join("etc/old.conf"));
        fs::write(rootfs.path().join("keep"), b"image file").unwrap();
        fs::create_dir(rootfs.path().join("etc")).unwrap();
        fs::write(rootfs.path().join("etc/old.conf"), b"from the image").unwrap();

        let layer = capture_overlay_diff(upper.path(), bundle.path()).unwrap();
        let stats = layer.stats;
        assert_eq!(stats.deleted, 1);
        assert_eq!(stats.content_bytes, 2);
        assert_eq!(stats.entries, 4, "{stats:?}"); // etc, etc/app, state, link
        let listed: Vec<String> =
            serde_json::from_slice(&fs::read(bundle.path().join(DELETED_FILES)).unwrap()).unwrap();
        assert_eq!(listed, vec!["/etc/old.conf".to_string()]);

        apply_rootfs_diff(bundle.path(), rootfs.path(), &layer.setid).unwrap();
        assert_eq!(fs::read(rootfs.path().join("etc/app/state")).unwrap(), b"42");
        assert_eq!(fs::read_link(rootfs.path().join("etc/app/link")).unwrap(), Path::new("state"));
        assert!(!rootfs.path().join("etc/old.conf").exists());
        assert_eq!(fs::read(rootfs.path().join("keep")).unwrap(), b"image file");
    }

    fn nix_mknod_whiteout(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) };
        assert_eq!(rc, 0, "mknod whiteout: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn hostile_deleted_entries_are_refused() {
        let bundle = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"x").unwrap();
        symlink(outside.path(), rootfs.path().join("escape")).unwrap();
        fs::write(bundle.path().join(ROOTFS_DIFF), tar_with(&[])).unwrap();
        for hostile in ["/../victim", "/escape/victim", "/", "../x"] {
            fs::write(bundle.path().join(DELETED_FILES), serde_json::to_vec(&[hostile]).unwrap()).unwrap();
            let err = apply_rootfs_diff(bundle.path(), rootfs.path(), &BTreeMap::new()).unwrap_err().to_string();
            assert!(err.contains("corrupt"), "{hostile}: {err}");
        }
        assert!(outside.path().join("victim").exists());
    }

    #[test]
    fn hostile_archive_entries_are_refused() {
        let bundle = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), rootfs.path().join("escape")).unwrap();
        for name in ["escape/planted", "../planted"] {
            fs::write(bundle.path().join(ROOTFS_DIFF), tar_with(&[name])).unwrap();
            assert!(apply_rootfs_diff(bundle.path(), rootfs.path(), &BTreeMap::new()).is_err(), "{name} was unpacked");
            assert!(!outside.path().join("planted").exists());
        }
    }

    #[test]
    fn set_id_bits_survive_only_as_recorded_and_device_nodes_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let upper = tempfile::tempdir().unwrap();
        let bundle = tempfile::tempdir().unwrap();
        for name in ["recorded", "added"] {
            fs::write(upper.path().join(name), b"#!/bin/sh").unwrap();
            fs::set_permissions(upper.path().join(name), fs::Permissions::from_mode(0o4755)).unwrap();
        }
        let c = CString::new(upper.path().join("null").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; a 1:3 character device like /dev/null.
        assert_eq!(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) }, 0);
        let layer = capture_overlay_diff(upper.path(), bundle.path()).unwrap();
        assert_eq!(layer.stats.devices_skipped, 1);
        assert_eq!(layer.setid, BTreeMap::from([("added".into(), 0o4755), ("recorded".into(), 0o4755)]));

        // what a signed manifest recorded keeps its bits; a set-id bit nobody recorded is cleared
        let rootfs = tempfile::tempdir().unwrap();
        let recorded = BTreeMap::from([("recorded".to_string(), 0o4755)]);
        apply_rootfs_diff(bundle.path(), rootfs.path(), &recorded).unwrap();
        let mode = |name: &str| fs::metadata(rootfs.path().join(name)).unwrap().permissions().mode() & 0o7777;
        assert_eq!((mode("recorded"), mode("added")), (0o4755, 0o755));
        assert!(!rootfs.path().join("null").exists());

        let mut device = tar::Header::new_gnu();
        device.set_path("dev-mem").unwrap();
        device.set_entry_type(tar::EntryType::Char);
        device.set_device_major(1).unwrap();
        device.set_device_minor(1).unwrap();
        device.set_size(0);
        device.set_mode(0o600);
        device.set_cksum();
        let mut hostile = device.as_bytes().to_vec();
        hostile.extend_from_slice(&[0u8; 1024]);
        fs::write(bundle.path().join(ROOTFS_DIFF), hostile).unwrap();
        let err = apply_rootfs_diff(bundle.path(), rootfs.path(), &recorded).unwrap_err().to_string();
        assert!(err.contains("dev-mem is a device node"), "{err}");
        assert!(!rootfs.path().join("dev-mem").exists());
    }

    /// A tar whose regular-file entries carry `names` verbatim (the tar crate's builder refuses `..`).
    fn tar_with(names: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for name in names {
            let mut header = tar::Header::new_old();
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_size(1);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            out.extend_from_slice(header.as_bytes());
            let mut block = [0u8; 512];
            block[0] = b'x';
            out.extend_from_slice(&block);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}
