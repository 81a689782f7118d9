//! Hostile archives are rejected and nothing is ever written outside the destination.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use kybernate_sidecar::archive::Compression;
use kybernate_sidecar::extract::{stage, ExtractLimits};
use kybernate_sidecar::fetch::{fetch_bundle, FetchOptions};
use kybernate_sidecar::store::{ObjectMeta, META_FORMAT};
use kybernate_sidecar::Error;
use sha2::{Digest, Sha256};

use crate::common::{bundle_ref, listing};

/// Builds tar archives byte by byte, so that entries no well-behaved writer would produce can be
/// expressed.
#[derive(Default)]
struct RawTar(Vec<u8>);

impl RawTar {
    fn entry(mut self, name: &[u8], kind: tar::EntryType, data: &[u8], link: &[u8]) -> Self {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }
    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name.as_bytes(), tar::EntryType::Regular, data, b"")
    }
    fn dir(self, name: &str) -> Self {
        self.entry(name.as_bytes(), tar::EntryType::Directory, b"", b"")
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(name.as_bytes(), tar::EntryType::Symlink, b"", target.as_bytes())
    }
    fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(name.as_bytes(), tar::EntryType::Link, b"", target.as_bytes())
    }
    fn complete(self) -> Self {
        self.file("COMPLETE", b"ok\n")
    }
    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// A sandbox: `base/` holds only `node/` (the destination's parent); the destination is
/// `base/node/bundle`. Everything an attack might create outside is checked to be absent.
struct Sandbox {
    base: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Sandbox { base: tempfile::tempdir().unwrap() }
    }
    fn dest(&self) -> PathBuf {
        self.base.path().join("node/bundle")
    }
    fn outside(&self) -> PathBuf {
        self.base.path().join("outside")
    }

    /// Extracts `archive` and expects a rejection; then checks that nothing exists anywhere in
    /// the sandbox except the (empty) destination parent.
    fn expect_rejected(&self, archive: &[u8], compression: Compression, limits: ExtractLimits) -> Error {
        let err = stage(&mut Cursor::new(archive), compression, &self.dest(), &limits, "hostile")
            .expect_err("hostile archive must be rejected");
        assert_eq!(
            listing(self.base.path()),
            vec!["node".to_string()],
            "after `{err}` the sandbox must hold only the empty destination parent"
        );
        err
    }
}

fn unsafe_reason(err: &Error) -> &str {
    match err {
        Error::UnsafeArchive { reason, .. } => reason,
        other => panic!("expected UnsafeArchive, got {other:?}"),
    }
}

#[test]
fn parent_dir_components_are_rejected() {
    let sb = Sandbox::new();
    for name in ["../outside", "../../outside", "ok/../../outside", "a/../../../outside"] {
        let tar = RawTar::default().dir("ok").file(name, b"pwned").complete().finish();
        let err = sb.expect_rejected(&tar, Compression::None, ExtractLimits::default());
        assert!(unsafe_reason(&err).contains(".."), "{name}: {err}");
        assert!(!sb.outside().exists());
    }
}

#[test]
fn absolute_paths_are_rejected() {
    let sb = Sandbox::new();
    let target = sb.outside();
    let tar = RawTar::default().file(target.to_str().unwrap(), b"pwned").finish();
    let err = sb.expect_rejected(&tar, Compression::None, ExtractLimits::default());
    assert!(unsafe_reason(&err).contains("absolute"), "{err}");
    assert!(!target.exists());

    let etc = format!("/etc/kybernate-hostile-{}", std::process::id());
    let tar = RawTar::default().file(&etc, b"pwned").finish();
    sb.expect_rejected(&tar, Compression::None, ExtractLimits::default());
    assert!(!Path::new(&etc).exists());
}

#[test]
fn symlink_escapes_are_rejected() {
    let sb = Sandbox::new();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("relative escape", RawTar::default().symlink("link", "../../outside").complete().finish()),
        ("absolute target", RawTar::default().symlink("link", "/etc/passwd").complete().finish()),
        (
            "write through an escaping symlink",
            RawTar::default().symlink("link", "..").file("link/outside", b"pwned").complete().finish(),
        ),
        (
            "write through an inside symlink",
            RawTar::default().dir("sub").symlink("s", "sub").file("s/f", b"x").complete().finish(),
        ),
        (
            // Lexically inside (sub/up/.. = sub), but sub/up -> .. makes it resolve above the root.
            "escape through a chain of symlinks",
            RawTar::default().dir("sub").symlink("sub/up", "..").symlink("esc", "sub/up/..").complete().finish(),
        ),
        ("dangling", RawTar::default().symlink("link", "missing").complete().finish()),
    ];
    for (what, tar) in cases {
        let err = sb.expect_rejected(&tar, Compression::None, ExtractLimits::default());
        assert!(unsafe_reason(&err).contains("symlink"), "{what}: {err}");
        assert!(!sb.outside().exists(), "{what}");
    }
}

#[test]
fn hardlink_escapes_are_rejected() {
    let sb = Sandbox::new();
    std::fs::write(sb.base.path().join("secret"), b"secret").unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("parent dir", RawTar::default().hardlink("h", "../../secret").finish()),
        ("absolute", RawTar::default().hardlink("h", sb.base.path().join("secret").to_str().unwrap()).finish()),
        ("missing", RawTar::default().hardlink("h", "nothing-here").finish()),
        ("to a symlink", RawTar::default().file("f", b"x").symlink("s", "f").hardlink("h", "s").finish()),
        (
            "through a symlink",
            RawTar::default().dir("d").file("d/f", b"x").symlink("s", "d").hardlink("h", "s/f").finish(),
        ),
    ];
    for (what, tar) in cases {
        let err = stage(&mut Cursor::new(&tar), Compression::None, &sb.dest(), &ExtractLimits::default(), "hostile")
            .expect_err(what);
        assert!(unsafe_reason(&err).contains("hardlink"), "{what}: {err}");
        let mut left = listing(sb.base.path());
        left.retain(|p| p != "secret");
        assert_eq!(left, vec!["node".to_string()], "{what}");
        assert_eq!(std::fs::read(sb.base.path().join("secret")).unwrap(), b"secret");
    }
}

#[test]
fn device_nodes_and_fifos_are_rejected() {
    let sb = Sandbox::new();
    for kind in [tar::EntryType::Char, tar::EntryType::Block, tar::EntryType::Fifo] {
        let tar = RawTar::default().dir("dev").entry(b"dev/node", kind, b"", b"").complete().finish();
        let err = sb.expect_rejected(&tar, Compression::None, ExtractLimits::default());
        let reason = unsafe_reason(&err);
        assert!(reason.contains("device") || reason.contains("fifo"), "{kind:?}: {err}");
    }
}

#[test]
fn duplicates_are_rejected() {
    let sb = Sandbox::new();
    let tar = RawTar::default().file("a", b"1").file("a", b"2").complete().finish();
    let err = sb.expect_rejected(&tar, Compression::None, ExtractLimits::default());
    assert!(unsafe_reason(&err).contains("duplicate"), "{err}");
}

#[test]
fn oversized_archives_are_rejected() {
    let sb = Sandbox::new();
    let small = ExtractLimits { max_unpacked_bytes: 1 << 20, max_entries: 10 };
    // Too many bytes in one file.
    let tar = RawTar::default().file("big", &vec![7u8; 2 << 20]).complete().finish();
    let err = sb.expect_rejected(&tar, Compression::None, small);
    assert!(matches!(err, Error::LimitExceeded { what: "unpacked size", .. }), "{err:?}");

    // Too many entries.
    let mut many = RawTar::default();
    for i in 0..20 {
        many = many.file(&format!("f{i}"), b"x");
    }
    let err = sb.expect_rejected(&many.complete().finish(), Compression::None, small);
    assert!(matches!(err, Error::LimitExceeded { what: "entry count", .. }), "{err:?}");

    // A zstd bomb: 64 MiB of zeros compress to almost nothing.
    let bomb = RawTar::default().file("zeros", &vec![0u8; 64 << 20]).complete().finish();
    let compressed = zstd::encode_all(Cursor::new(bomb), 3).unwrap();
    assert!(compressed.len() < 1 << 20);
    let err = sb.expect_rejected(&compressed, Compression::Zstd, small);
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err:?}");
}

#[test]
fn inside_links_extract_safely_but_a_bundle_that_does_not_verify_is_not_published() {
    let sb = Sandbox::new();
    let tar = RawTar::default()
        .dir("checkpoint")
        .file("checkpoint/pages-1.img", b"pages")
        .symlink("checkpoint/current", "pages-1.img")
        .symlink("top", "checkpoint/../checkpoint/pages-1.img")
        .hardlink("checkpoint/pages-copy", "checkpoint/pages-1.img")
        .complete()
        .finish();
    // Links that stay inside the destination are safe to extract...
    let staged = stage(&mut Cursor::new(&tar), Compression::None, &sb.dest(), &ExtractLimits::default(), "ok").unwrap();
    assert_eq!(staged.stats().entries, 6);
    // ...but this is no sealed bundle (no manifest, links): it is never published.
    let err = staged.publish("ok").unwrap_err().to_string();
    assert!(err.contains("does not verify") && err.contains("push the bundle again"), "{err}");
    assert!(!sb.dest().exists());
    assert_eq!(listing(&sb.base.path().join("node")).len(), 0, "the staging directory was removed");
}

/// End to end: a malicious object with a valid record in a filesystem store is refused by
/// `fetch_bundle`, and nothing lands outside (or at) the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_refuses_a_hostile_object_with_a_valid_record() {
    let store = tempfile::tempdir().unwrap();
    let node = tempfile::tempdir().unwrap();
    let archive = RawTar::default().file("COMPLETE", b"ok").file("../../../escaped", b"pwned").finish();
    let key = "ns/pod/ctr/2024-01-01T00:00:00Z.tar";
    let path = store.path().join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &archive).unwrap();
    let meta = ObjectMeta {
        format: META_FORMAT,
        size: archive.len() as u64,
        sha256: hex::encode(Sha256::digest(&archive)),
        compression: Compression::None,
        encryption: None,
        part_size: None,
        part_sha256: vec![],
        stored_at: "2024-01-01T00:00:00Z".into(),
        labels: Default::default(),
    };
    std::fs::write(format!("{}.meta.json", path.display()), meta.to_json()).unwrap();

    let err = fetch_bundle(&bundle_ref(&format!("file://{}", path.display())), node.path(), &FetchOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnsafeArchive { .. }), "{err:?}");
    // Without a bundle label the bundle would have gone to node/<file stem>: nothing is there.
    assert!(listing(node.path()).is_empty(), "{:?}", listing(node.path()));
    for dir in [node.path(), store.path()] {
        assert!(!listing(dir).iter().any(|p| p.contains("escaped")));
    }
}
