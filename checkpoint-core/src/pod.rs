//! Pod checkpoints: the bundles that the containers of one pod wrote when the pod was stopped, and the
//! rule by which each container of a new pod finds its own in them.
//!
//! Bundles keep the node layout `<namespace>/<pod>/<container>/<time>/` (archives in a store:
//! `<namespace>/<pod>/<container>/<time>.tar[.zst]`). The containers checkpointed in one stop of a pod
//! share the `<time>` name: that time *is* the pod checkpoint's id. A pod-level reference names the
//! pod's directory (or store prefix), optionally with `#<time>` to pin a pod checkpoint; without it the
//! newest pod checkpoint is taken. Each container then restores `<its name>/<that time>`, and a
//! container the pod checkpoint does not cover is told so ([`Selection::NotCovered`]).
//!
//! The same rule serves the shim (a node directory, listed by [`node_entries`]) and the sidecar (a
//! store's key listing under the pod prefix, parsed by [`PodEntry::parse`]).

use std::fs;
use std::path::Path;

use crate::bundle::{self, CHECKPOINT_DIR, FAILED_MARKER, MANIFEST_FILE};

/// Archive suffixes a store gives a bundle's key.
/// Longest first: an archive the sidecar encrypted ends in `.kenc` (`docs/sidecar.md`).
const ARCHIVE_SUFFIXES: [&str; 4] = [".tar.zst.kenc", ".tar.kenc", ".tar.zst", ".tar"];

/// Whether `name` (a file name or store key) is a bundle archive, as the sidecar names them.
pub fn is_archive(name: &str) -> bool {
    ARCHIVE_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// One sealed bundle of a pod checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    /// The container name (`io.kubernetes.cri.container-name`).
    pub container: String,
    /// The pod checkpoint's time (RFC 3339, UTC), the bundle's directory name.
    pub time: String,
    /// Its path (node) or key (store) relative to the pod directory or prefix.
    pub rel: String,
}

impl PodEntry {
    /// Reads `<container>/<time>` or `<container>/<time>.tar[.zst]`; `None` for anything else.
    pub fn parse(rel: &str) -> Option<PodEntry> {
        let (container, file) = rel.split_once('/')?;
        let time = ARCHIVE_SUFFIXES.iter().find_map(|s| file.strip_suffix(s)).unwrap_or(file);
        let looks_like_time = time.len() >= 20 && time.as_bytes()[4] == b'-' && time.as_bytes()[10] == b'T';
        let valid = !container.is_empty() && !container.starts_with('.') && !time.contains('/') && looks_like_time;
        valid.then(|| PodEntry { container: container.into(), time: time.into(), rel: rel.into() })
    }
}

/// Which bundle of a pod checkpoint a container restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<'a> {
    /// Its bundle in the chosen pod checkpoint.
    Covered(&'a PodEntry),
    /// The chosen pod checkpoint (`time`) holds bundles of `containers` only.
    NotCovered {
        /// The pod checkpoint taken.
        time: String,
        /// The containers it covers.
        containers: Vec<String>,
    },
    /// No pod checkpoint at all (or none at the time asked for).
    Empty,
}

/// The bundle `container` restores from `entries` (one pod's): in the pod checkpoint at `at`, or in
/// the newest one.
pub fn select<'a>(entries: &'a [PodEntry], container: &str, at: Option<&str>) -> Selection<'a> {
    let time = match at {
        Some(at) => at,
        None => match entries.iter().map(|e| e.time.as_str()).max() {
            Some(newest) => newest,
            None => return Selection::Empty,
        },
    };
    let mut in_checkpoint = entries.iter().filter(|e| e.time == time).peekable();
    if in_checkpoint.peek().is_none() {
        return Selection::Empty;
    }
    let mut containers = Vec::new();
    for entry in in_checkpoint {
        if entry.container == container {
            return Selection::Covered(entry);
        }
        containers.push(entry.container.clone());
    }
    containers.sort();
    Selection::NotCovered { time: time.to_string(), containers }
}

/// Splits a pod-level reference into the reference and the pod checkpoint time it pins
/// (`<reference>#<time>`).
pub fn split_time(reference: &str) -> (&str, Option<&str>) {
    match reference.rsplit_once('#') {
        Some((reference, time)) if PodEntry::parse(&format!("c/{time}")).is_some() => (reference, Some(time)),
        _ => (reference, None),
    }
}

/// What a directory named by a reference holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// One bundle (it has a manifest, a marker or CRIU images — or does not exist, so opening it says so).
    Bundle,
    /// A pod's directory on this node: `<container>/<time>/` bundles.
    NodePod,
    /// A pod's prefix in a filesystem store: `<container>/<time>.tar[.zst]` archives.
    StorePod,
}

/// Tells a bundle directory from a pod directory.
pub fn classify(dir: &Path) -> DirKind {
    let bundle_files = [MANIFEST_FILE, bundle::COMPLETE_MARKER, FAILED_MARKER, CHECKPOINT_DIR];
    if !dir.is_dir() || bundle_files.iter().any(|f| dir.join(f).exists()) {
        return DirKind::Bundle;
    }
    let archives = children(dir)
        .into_iter()
        .flat_map(|c| children(&dir.join(c)))
        .any(|name| ARCHIVE_SUFFIXES.iter().any(|s| name.ends_with(s)) && !name.ends_with(".meta.json"));
    if archives {
        DirKind::StorePod
    } else {
        DirKind::NodePod
    }
}

/// The sealed bundles of a pod directory on this node (`<container>/<time>/` with `COMPLETE`).
pub fn node_entries(dir: &Path) -> Vec<PodEntry> {
    let mut entries: Vec<PodEntry> = children(dir)
        .into_iter()
        .flat_map(|container| {
            let parent = dir.join(&container);
            children(&parent)
                .into_iter()
                .filter(|time| bundle::is_complete(&parent.join(time)))
                .filter_map(|time| PodEntry::parse(&format!("{container}/{time}")))
                .collect::<Vec<_>>()
        })
        .collect();
    entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    entries
}

/// The names in `dir` that are not hidden, sorted (none when it cannot be read).
fn children(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "2026-12-02T01:00:00.000Z";
    const T2: &str = "2026-12-02T02:00:00.000Z";

    fn entries(rels: &[&str]) -> Vec<PodEntry> {
        rels.iter().map(|r| PodEntry::parse(r).unwrap_or_else(|| panic!("{r} does not parse"))).collect()
    }

    #[test]
    fn entries_parse_from_node_paths_and_store_keys() {
        assert_eq!(
            PodEntry::parse(&format!("app/{T1}.tar.zst")),
            Some(PodEntry { container: "app".into(), time: T1.into(), rel: format!("app/{T1}.tar.zst") })
        );
        assert_eq!(PodEntry::parse(&format!("app/{T1}")).unwrap().time, T1);
        for suffix in [".tar", ".tar.zst", ".tar.kenc", ".tar.zst.kenc"] {
            assert_eq!(PodEntry::parse(&format!("app/{T1}{suffix}")).unwrap().time, T1, "{suffix}");
            assert!(is_archive(&format!("ns/pod/app/{T1}{suffix}")), "{suffix}");
        }
        assert!(!is_archive(&format!("ns/pod/app/{T1}.tar.zst.meta.json")));
        for bad in ["app", &format!("/{T1}"), "app/not-a-time", &format!(".hidden/{T1}"), &format!("a/b/{T1}")] {
            assert_eq!(PodEntry::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_newest_pod_checkpoint_is_taken_unless_one_is_named() {
        let all = entries(&[&format!("app/{T1}"), &format!("side/{T1}"), &format!("app/{T2}.tar")]);
        assert_eq!(select(&all, "app", None), Selection::Covered(&all[2]));
        assert_eq!(
            select(&all, "side", None),
            Selection::NotCovered { time: T2.into(), containers: vec!["app".into()] },
            "the newest pod checkpoint does not cover it, even if an older one does"
        );
        assert_eq!(select(&all, "side", Some(T1)), Selection::Covered(&all[1]));
        assert_eq!(select(&all, "app", Some("2026-12-02T03:00:00.000Z")), Selection::Empty);
        assert_eq!(select(&[], "app", None), Selection::Empty);
    }

    #[test]
    fn references_may_pin_a_pod_checkpoint() {
        assert_eq!(split_time(&format!("/c/ns/pod#{T1}")), ("/c/ns/pod", Some(T1)));
        assert_eq!(split_time(&format!("s3://b/ns/pod#{T2}")), ("s3://b/ns/pod", Some(T2)));
        assert_eq!(split_time("/c/ns/pod#notatime"), ("/c/ns/pod#notatime", None));
        assert_eq!(split_time("/c/ns/pod"), ("/c/ns/pod", None));
    }

    #[test]
    fn directories_are_told_apart_and_only_sealed_bundles_count() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pod");
        let sealed = pod.join("app").join(T1);
        fs::create_dir_all(&sealed).unwrap();
        fs::write(sealed.join(bundle::COMPLETE_MARKER), "x").unwrap();
        let failed = pod.join("side").join(T1);
        fs::create_dir_all(&failed).unwrap();
        fs::write(failed.join(FAILED_MARKER), "dump failed").unwrap();
        assert_eq!(classify(&pod), DirKind::NodePod);
        assert_eq!(classify(&sealed), DirKind::Bundle);
        assert_eq!(classify(&dir.path().join("missing")), DirKind::Bundle);
        assert_eq!(node_entries(&pod), entries(&[&format!("app/{T1}")]));

        let store = dir.path().join("store-pod");
        fs::create_dir_all(store.join("app")).unwrap();
        fs::write(store.join("app").join(format!("{T1}.tar.zst")), "").unwrap();
        assert_eq!(classify(&store), DirKind::StorePod);
    }
}
