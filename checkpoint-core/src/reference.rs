//! Bundle references: the value of `kybernate.io/restore-from` and of `kybernate-sidecar pull`'s
//! argument, parsed by one set of rules for the shim and the sidecar.
//!
//! - an absolute path or `file:///path` (percent-escapes decoded) naming a **directory**: a bundle on
//!   this node, used in place (a path that does not exist is one too, so opening it says so);
//! - the same naming a **file**: an archive in a filesystem store, which the sidecar fetches;
//! - `s3://bucket/key`: an archive in an S3 bucket, which the sidecar fetches.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where a bundle reference points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleRef {
    /// A bundle directory on this node.
    LocalDir(PathBuf),
    /// An archive file in a filesystem store.
    FsArchive {
        /// The store's directory.
        store: PathBuf,
        /// The archive's file name in it.
        name: String,
    },
    /// An archive in an S3 bucket.
    S3 {
        /// The bucket.
        bucket: String,
        /// The object key.
        key: String,
    },
}

impl BundleRef {
    /// Parses a reference (see the module docs); the error names the reference and the accepted forms.
    pub fn parse(reference: &str) -> Result<Self> {
        let bad = |reason: String| Error::Reference { reference: reference.to_string(), reason };
        if let Some(rest) = reference.strip_prefix("s3://") {
            let (bucket, key) =
                rest.split_once('/').ok_or_else(|| bad("an s3:// reference needs a key after the bucket".into()))?;
            if bucket.is_empty() {
                return Err(bad("the bucket name is missing".into()));
            }
            check_key(key).map_err(|why| bad(format!("its key {key:?} {why}")))?;
            return Ok(BundleRef::S3 { bucket: bucket.to_string(), key: key.to_string() });
        }
        let path = match reference.strip_prefix("file://") {
            Some(rest) => percent_decode(rest).ok_or_else(|| bad("it has a bad %-escape".into()))?,
            None if reference.contains("://") => return Err(bad("its scheme is not supported".into())),
            None => reference.to_string(),
        };
        let path = Path::new(&path);
        if !path.is_absolute() {
            return Err(bad("a path must be absolute".into()));
        }
        if !path.is_file() {
            return Ok(BundleRef::LocalDir(path.to_path_buf()));
        }
        match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
            (Some(store), Some(name)) => {
                Ok(BundleRef::FsArchive { store: store.to_path_buf(), name: name.to_string() })
            }
            _ => Err(bad("it names no archive file".into())),
        }
    }

    /// Whether the sidecar must fetch it before it can be restored.
    pub fn is_remote(&self) -> bool {
        !matches!(self, BundleRef::LocalDir(_))
    }
}

impl fmt::Display for BundleRef {
    /// The canonical spelling, which [`BundleRef::parse`] reads back to the same reference.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BundleRef::LocalDir(dir) => write!(f, "{}", dir.display()),
            BundleRef::FsArchive { store, name } => write!(f, "{}", store.join(name).display()),
            BundleRef::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

/// Why `key` cannot be an object key: it must be relative, without empty, `.` or `..` components and
/// without NUL bytes.
fn check_key(key: &str) -> std::result::Result<(), &'static str> {
    if key.is_empty() {
        return Err("is empty");
    }
    if key.starts_with('/') {
        return Err("must be relative (no leading /)");
    }
    if key.contains('\0') {
        return Err("contains a NUL byte");
    }
    if key.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("has an empty, `.` or `..` path component");
    }
    Ok(())
}

/// Decodes `%XX` escapes (as in `file://` URLs); `None` for a broken escape or a result that is not
/// UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_by_one_set_of_rules() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("b c.tar");
        std::fs::write(&archive, b"").unwrap();
        let d = dir.path().display().to_string();
        assert_eq!(BundleRef::parse(&d).unwrap(), BundleRef::LocalDir(dir.path().into()));
        assert_eq!(BundleRef::parse(&format!("file://{d}")).unwrap(), BundleRef::LocalDir(dir.path().into()));
        let fs_archive = BundleRef::FsArchive { store: dir.path().into(), name: "b c.tar".into() };
        assert_eq!(BundleRef::parse(&archive.display().to_string()).unwrap(), fs_archive);
        assert_eq!(BundleRef::parse(&format!("file://{d}/b%20c.tar")).unwrap(), fs_archive);
        assert!(fs_archive.is_remote() && !BundleRef::LocalDir("/x".into()).is_remote());
        let s3 = BundleRef::parse("s3://bk/ns/pod/c/t.tar.zst").unwrap();
        assert_eq!(s3, BundleRef::S3 { bucket: "bk".into(), key: "ns/pod/c/t.tar.zst".into() });
        for r in [s3, fs_archive] {
            assert_eq!(BundleRef::parse(&r.to_string()).unwrap(), r, "{r} does not read back");
        }
        // a missing directory is a local reference; opening it says it does not exist
        assert_eq!(BundleRef::parse("/nonexistent/b").unwrap(), BundleRef::LocalDir("/nonexistent/b".into()));
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (bad, why) in [
            ("relative/b", "must be absolute"),
            ("file://relative", "must be absolute"),
            ("", "must be absolute"),
            ("http://x/y", "scheme is not supported"),
            ("s3://bucket", "needs a key"),
            ("s3:///key", "bucket name is missing"),
            ("s3://b/a/../k", "`..`"),
            ("s3://b/a//k", "empty"),
            ("file:///a%zz", "bad %-escape"),
        ] {
            let err = BundleRef::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("s3://bucket/key"), "{bad}: {err}");
        }
    }
}
