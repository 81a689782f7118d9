//! Reading CRIU image files, and the size manifest Kybernate writes beside them.
//!
//! CRIU images are a magic header followed by length-prefixed protobuf entries. CRIU trusts its
//! images: a truncated `pages-*.img` makes CRIU 4.1 spin forever in its restorer. So every checkpoint
//! records the size of each image file in [`IMAGE_MANIFEST`], and a restore checks them first.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Magic that prefixes most images.
pub(crate) const COMMON_MAGIC: u32 = 0x5456_4319;
/// Magic that prefixes service images (stats, irmap cache).
pub(crate) const SERVICE_MAGIC: u32 = 0x5510_5940;
/// Magic of `pstree.img`.
const PSTREE_MAGIC: u32 = 0x5027_3030;

/// File Kybernate writes into an image directory after a dump: each image file and its size.
pub const IMAGE_MANIFEST: &str = "kybernate-images.json";

/// Reads the protobuf entries of a CRIU image whose header is `prefix` then `magic`.
pub(crate) fn read_entries(path: &Path, prefix: u32, magic: u32) -> Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading CRIU image {}", path.display()), e))?;
    let bad = |reason: String| Error::BadImage { path: path.to_path_buf(), reason };
    let word = |i: usize| bytes.get(i..i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if word(0) != Some(prefix) || word(4) != Some(magic) {
        return Err(bad(format!(
            "bad magic (expected {prefix:#x} {magic:#x}): not the CRIU image expected, or truncated"
        )));
    }
    let mut entries = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let len = word(at).ok_or_else(|| bad("entry header is truncated".into()))? as usize;
        let body = bytes.get(at + 4..at + 4 + len).ok_or_else(|| bad("entry is truncated".into()))?;
        entries.push(body.to_vec());
        at += 4 + len;
    }
    Ok(entries)
}

#[derive(Clone, PartialEq, Message)]
struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pid: u32,
    #[prost(uint32, required, tag = "2")]
    ppid: u32,
    #[prost(uint32, required, tag = "3")]
    pgid: u32,
    #[prost(uint32, required, tag = "4")]
    sid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    threads: Vec<u32>,
}

/// The pids of the processes recorded in `pstree.img` (as they are inside the checkpointed pid namespace).
pub fn image_pids(image_dir: &Path) -> Result<Vec<i32>> {
    let path = image_dir.join("pstree.img");
    read_entries(&path, COMMON_MAGIC, PSTREE_MAGIC)?
        .iter()
        .map(|body| {
            PstreeEntry::decode(body.as_slice()).map(|e| e.pid as i32).map_err(|e| Error::BadImage {
                path: path.clone(),
                reason: format!("process tree entry does not decode: {e}"),
            })
        })
        .collect()
}

/// Each image file and its size, written after a successful dump.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// File name (relative to the image directory) → size in bytes.
    pub files: BTreeMap<String, u64>,
}

impl ImageManifest {
    /// Records the regular files directly in `image_dir` (CRIU's images are flat; sub-directories such
    /// as a pre-dump parent get their own manifest).
    pub fn record(image_dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let listing = |e| Error::io(format!("listing {}", image_dir.display()), e);
        for entry in std::fs::read_dir(image_dir).map_err(listing)? {
            let entry = entry.map_err(listing)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata().map_err(listing)?;
            if meta.is_file() && name.ends_with(".img") {
                files.insert(name, meta.len());
            }
        }
        Ok(ImageManifest { files })
    }

    /// Writes the manifest into `image_dir`.
    pub fn write(&self, image_dir: &Path) -> Result<()> {
        let path = image_dir.join(IMAGE_MANIFEST);
        let json = serde_json::to_vec_pretty(self).expect("manifest serializes");
        std::fs::write(&path, json).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// Checks `image_dir` against its manifest, if it has one; images without one (written by other
    /// tools) are accepted as they are.
    pub fn verify(image_dir: &Path) -> Result<()> {
        let path = image_dir.join(IMAGE_MANIFEST);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let bad = |reason: String| Error::BadImage { path: image_dir.to_path_buf(), reason };
        let manifest: ImageManifest =
            serde_json::from_slice(&text).map_err(|e| bad(format!("{IMAGE_MANIFEST} does not parse: {e}")))?;
        for (name, size) in &manifest.files {
            match std::fs::metadata(image_dir.join(name)) {
                Ok(meta) if meta.len() == *size => {}
                Ok(meta) => {
                    return Err(bad(format!(
                        "{name} is {} bytes but was written with {size}: the image is truncated or corrupt; \
                         take a new checkpoint or fetch the bundle again",
                        meta.len()
                    )))
                }
                Err(_) => return Err(bad(format!("{name} is missing: the image is incomplete"))),
            }
        }
        Ok(())
    }
}

/// Makes sure `image_dir` looks like a CRIU image directory before CRIU is asked to restore it.
pub(crate) fn check_image_dir(image_dir: &Path) -> Result<()> {
    let bad = |reason: &str| Error::BadImage { path: image_dir.to_path_buf(), reason: reason.to_string() };
    if !image_dir.is_dir() {
        return Err(bad("the directory does not exist"));
    }
    if !image_dir.join("inventory.img").is_file() {
        return Err(bad(
            "inventory.img is missing: this is not a CRIU image directory, or the checkpoint did not finish",
        ));
    }
    ImageManifest::verify(image_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_detects_truncated_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pages-1.img"), vec![7u8; 8192]).unwrap();
        std::fs::write(dir.path().join("core-1.img"), b"core").unwrap();
        std::fs::write(dir.path().join("dump.log"), b"not an image").unwrap();
        let m = ImageManifest::record(dir.path()).unwrap();
        assert_eq!(m.files.len(), 2);
        m.write(dir.path()).unwrap();
        ImageManifest::verify(dir.path()).unwrap();

        std::fs::write(dir.path().join("pages-1.img"), vec![7u8; 4096]).unwrap();
        let err = ImageManifest::verify(dir.path()).unwrap_err().to_string();
        assert!(err.contains("pages-1.img is 4096 bytes but was written with 8192"), "{err}");
        std::fs::remove_file(dir.path().join("pages-1.img")).unwrap();
        assert!(ImageManifest::verify(dir.path()).unwrap_err().to_string().contains("pages-1.img is missing"));
    }

    #[test]
    fn reads_pids_from_a_real_pstree_image() {
        // pstree.img of a two-process runc container written by CRIU 4.1.1.
        const PSTREE: &[u8] = &[
            0x19, 0x43, 0x56, 0x54, 0x30, 0x30, 0x27, 0x50, 0x0a, 0x00, 0x00, 0x00, 0x08, 0x01, 0x10, 0x00, 0x18, 0x01,
            0x20, 0x01, 0x28, 0x01, 0x0c, 0x00, 0x00, 0x00, 0x08, 0xa2, 0x2d, 0x10, 0x01, 0x18, 0x01, 0x20, 0x01, 0x28,
            0xa2, 0x2d,
        ];
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pstree.img"), PSTREE).unwrap();
        assert_eq!(image_pids(dir.path()).unwrap(), vec![1, 5794]);
        std::fs::write(dir.path().join("pstree.img"), &PSTREE[..30]).unwrap();
        assert!(image_pids(dir.path()).unwrap_err().to_string().contains("truncated"));
    }
}
