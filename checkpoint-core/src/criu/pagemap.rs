//! CRIU's page maps (`pagemap-<id>.img`, `pagemap-shmem-<id>.img`): which pages of memory a dump
//! holds, where in its `pages-<n>.img` each run of them lies, and which of them a lazy restore leaves
//! to the lazy-pages daemon (`PE_LAZY`).
//!
//! A pages image holds the pages of its map's present entries back to back, in the map's order, so
//! an entry's offset in it is the sum of the sizes of the present entries before it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use prost::Message;

use super::image::{read_entries, COMMON_MAGIC};
use crate::error::{Error, Result};

/// Size of a page in CRIU's images on the architectures Kybernate runs on.
pub const PAGE_SIZE: u64 = 4096;
/// Magic of pagemap images (task and shared memory).
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// The entry's pages are in the parent checkpoint (pre-dump chains).
const PE_PARENT: u32 = 1 << 0;
/// The entry's pages may be restored lazily.
const PE_LAZY: u32 = 1 << 1;
/// The entry's pages are in this checkpoint's pages image.
const PE_PRESENT: u32 = 1 << 2;

#[derive(Clone, PartialEq, Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

#[derive(Clone, PartialEq, Message)]
struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
}

/// One run of consecutive pages a map holds in its pages image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Address of the first page.
    pub vaddr: u64,
    /// Number of pages.
    pub nr_pages: u64,
    /// Byte offset of the first page in the pages image.
    pub offset: u64,
    /// Whether a lazy restore leaves these pages to the lazy-pages daemon.
    pub lazy: bool,
}

impl PageRun {
    /// The run's bytes in the pages image.
    pub fn bytes(&self) -> Range<u64> {
        self.offset..self.offset + self.nr_pages * PAGE_SIZE
    }
}

/// Whose memory a page map describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MapKind {
    /// A process's private memory (`pagemap-<pid>.img`); the id is the pid CRIU's page server names.
    Task,
    /// Shared anonymous memory (`pagemap-shmem-<id>.img`), which a restore always reads in full.
    Shmem,
}

/// One page map: its runs of present pages and the pages image they are in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageMap {
    /// Task or shared memory.
    pub kind: MapKind,
    /// The image id (`<id>` of the file name).
    pub id: u64,
    /// File name of its pages image (`pages-<n>.img`).
    pub pages_file: String,
    /// Runs of present pages, in the image's order.
    pub runs: Vec<PageRun>,
}

impl PageMap {
    /// Reads the page map at `path`, of `kind` and image id `id`.
    pub fn read(path: &Path, kind: MapKind, id: u64) -> Result<PageMap> {
        let bad = |reason: String| Error::BadImage { path: path.to_path_buf(), reason };
        let entries = read_entries(path, COMMON_MAGIC, PAGEMAP_MAGIC)?;
        let (head, rest) = entries.split_first().ok_or_else(|| bad("it has no head entry".into()))?;
        let head = PagemapHead::decode(head.as_slice()).map_err(|e| bad(format!("its head does not decode: {e}")))?;
        let mut runs = Vec::with_capacity(rest.len());
        let mut offset = 0u64;
        for body in rest {
            let e = PagemapEntry::decode(body.as_slice()).map_err(|e| bad(format!("an entry does not decode: {e}")))?;
            let flags = e.flags.unwrap_or(if e.in_parent == Some(true) { PE_PARENT } else { PE_PRESENT });
            if flags & PE_PRESENT == 0 {
                continue;
            }
            let nr_pages = u64::from(e.nr_pages);
            runs.push(PageRun { vaddr: e.vaddr, nr_pages, offset, lazy: flags & PE_LAZY != 0 });
            offset += nr_pages * PAGE_SIZE;
        }
        Ok(PageMap { kind, id, pages_file: format!("pages-{}.img", head.pages_id), runs })
    }

    /// Every page map in `image_dir`, task maps first, each kind by id.
    pub fn read_dir(image_dir: &Path) -> Result<Vec<PageMap>> {
        let listing = |e| Error::io(format!("listing {}", image_dir.display()), e);
        let mut found = Vec::new();
        for entry in std::fs::read_dir(image_dir).map_err(listing)? {
            let name = entry.map_err(listing)?.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_prefix("pagemap-").and_then(|n| n.strip_suffix(".img")) else { continue };
            let (kind, id) = match stem.strip_prefix("shmem-") {
                Some(id) => (MapKind::Shmem, id),
                None => (MapKind::Task, stem),
            };
            let Ok(id) = id.parse::<u64>() else { continue };
            found.push((kind, id, name));
        }
        found.sort();
        found.into_iter().map(|(kind, id, name)| PageMap::read(&image_dir.join(name), kind, id)).collect()
    }

    /// The offset in the pages image of `nr_pages` pages from `vaddr`, when one run holds them all.
    pub fn locate(&self, vaddr: u64, nr_pages: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.vaddr <= vaddr).checked_sub(1)?;
        let run = &self.runs[i];
        let skip = (vaddr - run.vaddr) / PAGE_SIZE;
        let aligned = (vaddr - run.vaddr) % PAGE_SIZE == 0;
        (aligned && skip + nr_pages <= run.nr_pages).then(|| run.offset + skip * PAGE_SIZE)
    }
}

/// For each pages image of `maps`, the byte ranges a restore reads itself even when it is lazy:
/// everything but the lazy runs of task maps (stacks, file-backed and shared memory, and whatever a
/// map does not cover). Ranges are sorted and merged; `sizes` gives each pages image's length.
pub fn eager_ranges(maps: &[PageMap], sizes: &BTreeMap<String, u64>) -> BTreeMap<String, Vec<Range<u64>>> {
    let mut lazy: BTreeMap<&str, Vec<Range<u64>>> = BTreeMap::new();
    for map in maps.iter().filter(|m| m.kind == MapKind::Task) {
        let runs = map.runs.iter().filter(|r| r.lazy).map(PageRun::bytes);
        lazy.entry(map.pages_file.as_str()).or_default().extend(runs);
    }
    sizes
        .iter()
        .map(|(file, &size)| {
            let mut holes = lazy.remove(file.as_str()).unwrap_or_default();
            holes.sort_by_key(|r| r.start);
            let mut eager = Vec::new();
            let mut at = 0;
            for hole in holes {
                if hole.start > at {
                    eager.push(at..hole.start.min(size));
                }
                at = at.max(hole.end);
            }
            if at < size {
                eager.push(at..size);
            }
            eager.retain(|r| !r.is_empty());
            (file.clone(), eager)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&COMMON_MAGIC.to_le_bytes());
        out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        for e in entries {
            out.extend_from_slice(&(e.len() as u32).to_le_bytes());
            out.extend_from_slice(e);
        }
        out
    }

    fn entry(vaddr: u64, nr_pages: u32, flags: u32) -> Vec<u8> {
        PagemapEntry { vaddr, nr_pages, in_parent: None, flags: Some(flags) }.encode_to_vec()
    }

    fn write_maps(dir: &Path) {
        let task = image(&[
            PagemapHead { pages_id: 3 }.encode_to_vec(),
            entry(0x1000, 2, PE_PRESENT),
            entry(0x10000, 4, PE_PRESENT | PE_LAZY),
            entry(0x20000, 1, PE_PARENT),
            entry(0x7ff000, 1, PE_PRESENT),
        ]);
        std::fs::write(dir.join("pagemap-7.img"), task).unwrap();
        let shmem = image(&[PagemapHead { pages_id: 4 }.encode_to_vec(), entry(0, 2, PE_PRESENT | PE_LAZY)]);
        std::fs::write(dir.join("pagemap-shmem-12.img"), shmem).unwrap();
        std::fs::write(dir.join("pages-3.img"), b"not a map").unwrap();
    }

    #[test]
    fn runs_lie_back_to_back_in_the_pages_image() {
        let dir = tempfile::tempdir().unwrap();
        write_maps(dir.path());
        let maps = PageMap::read_dir(dir.path()).unwrap();
        assert_eq!(maps.len(), 2);
        let task = &maps[0];
        assert_eq!((task.kind, task.id, task.pages_file.as_str()), (MapKind::Task, 7, "pages-3.img"));
        assert_eq!(
            task.runs,
            vec![
                PageRun { vaddr: 0x1000, nr_pages: 2, offset: 0, lazy: false },
                PageRun { vaddr: 0x10000, nr_pages: 4, offset: 2 * PAGE_SIZE, lazy: true },
                PageRun { vaddr: 0x7ff000, nr_pages: 1, offset: 6 * PAGE_SIZE, lazy: false },
            ]
        );
        assert_eq!((maps[1].kind, maps[1].id, maps[1].pages_file.as_str()), (MapKind::Shmem, 12, "pages-4.img"));

        assert_eq!(task.locate(0x11000, 3), Some(3 * PAGE_SIZE));
        assert_eq!(task.locate(0x11000, 4), None, "past the run");
        assert_eq!(task.locate(0x20000, 1), None, "in the parent");
        assert_eq!(task.locate(0x1800, 1), None, "not page-aligned");
        assert_eq!(task.locate(0x0, 1), None, "below every run");
    }

    #[test]
    fn a_lazy_restore_reads_all_but_the_lazy_runs_of_task_maps() {
        let dir = tempfile::tempdir().unwrap();
        write_maps(dir.path());
        let maps = PageMap::read_dir(dir.path()).unwrap();
        let sizes =
            BTreeMap::from([("pages-3.img".to_string(), 7 * PAGE_SIZE), ("pages-4.img".to_string(), 2 * PAGE_SIZE)]);
        let eager = eager_ranges(&maps, &sizes);
        assert_eq!(eager["pages-3.img"], vec![0..2 * PAGE_SIZE, 6 * PAGE_SIZE..7 * PAGE_SIZE]);
        assert_eq!(eager["pages-4.img"], vec![0..2 * PAGE_SIZE], "shared memory is always read whole");
    }

    #[test]
    fn a_truncated_map_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_maps(dir.path());
        let path = dir.path().join("pagemap-7.img");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = PageMap::read_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
