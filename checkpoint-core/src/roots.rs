//! Where a node may restore from: the admin's restore roots (node directories and store prefixes),
//! and the check that confines every bundle reference to them after normalisation. See
//! `docs/security.md`.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::reference::{percent_decode, BundleRef};

/// One restore root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// A directory on this node (node bundles, pod checkpoints, filesystem stores) and everything
    /// below it.
    Dir(PathBuf),
    /// A bucket, or the keys under a prefix of it.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix (whole path components); empty for the whole bucket.
        prefix: String,
    },
}

impl Root {
    /// Parses an absolute path, `file:///path` or `s3://bucket[/prefix]`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |reason: &str| {
            Error::InvalidOptions(format!(
                "restore root {text:?} {reason}; write an absolute path, file:///path or s3://bucket/prefix"
            ))
        };
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_end_matches('/');
            if bucket.is_empty() {
                return Err(bad("has no bucket"));
            }
            if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
                return Err(bad("has a `.`, `..` or empty path component"));
            }
            return Ok(Root::S3 { bucket: bucket.into(), prefix: prefix.into() });
        }
        let path = match text.strip_prefix("file://") {
            Some(rest) => percent_decode(rest).ok_or_else(|| bad("has a bad %-escape"))?,
            None if text.contains("://") => return Err(bad("has a scheme that is not supported")),
            None => text.to_string(),
        };
        let path = PathBuf::from(path);
        if !path.is_absolute() || has_dot_dot(&path) {
            return Err(bad("must be an absolute path without `..`"));
        }
        Ok(Root::Dir(path))
    }

    fn admits_key(&self, bucket: &str, key: &str) -> bool {
        match self {
            Root::S3 { bucket: b, prefix } => {
                b == bucket
                    && (prefix.is_empty()
                        || key
                            .strip_prefix(prefix.as_str())
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')))
            }
            Root::Dir(_) => false,
        }
    }
}

impl fmt::Display for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Root::Dir(dir) => write!(f, "{}", dir.display()),
            Root::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Root::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

fn has_dot_dot(path: &Path) -> bool {
    path.components().any(|c| c == Component::ParentDir)
}

/// The roots a node restores from; every reference must lie under one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreRoots(pub Vec<Root>);

impl RestoreRoots {
    /// Parses each root (see [`Root::parse`]).
    pub fn parse<S: AsRef<str>>(roots: &[S]) -> Result<Self> {
        roots.iter().map(|r| Root::parse(r.as_ref())).collect::<Result<Vec<_>>>().map(RestoreRoots)
    }

    /// `reference` confined to the roots: a path without `..`, resolved (symlinks followed) to a path
    /// under a root directory (itself resolved), returned in its resolved form so that what is opened is
    /// what was checked; or an S3 key under a root prefix. Anything else is refused, naming the roots.
    pub fn confine(&self, reference: &BundleRef) -> Result<BundleRef> {
        match reference {
            BundleRef::S3 { bucket, key } => match self.0.iter().any(|r| r.admits_key(bucket, key)) {
                true => Ok(reference.clone()),
                false => Err(self.refuse(reference, "it is not under a restore root".into())),
            },
            BundleRef::LocalDir(dir) => self.confine_path(dir).map(BundleRef::LocalDir),
            BundleRef::FsArchive { store, name } => {
                let resolved = self.confine_path(&store.join(name))?;
                match (resolved.parent(), resolved.file_name().and_then(|n| n.to_str())) {
                    (Some(store), Some(name)) => Ok(BundleRef::FsArchive { store: store.into(), name: name.into() }),
                    _ => Err(self.refuse(reference, "it names no archive file".into())),
                }
            }
        }
    }

    /// `path` (a bundle directory or archive on this node) resolved and confined to the root
    /// directories (see [`RestoreRoots::confine`]).
    pub fn confine_path(&self, path: &Path) -> Result<PathBuf> {
        let reference = BundleRef::LocalDir(path.to_path_buf());
        if has_dot_dot(path) {
            return Err(self.refuse(&reference, "its path has a `..` component".into()));
        }
        let resolved = path.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::Bundle { path: path.to_path_buf(), reason: "the directory does not exist".into() }
            }
            _ => Error::io(format!("resolving {}", path.display()), e),
        })?;
        let admitted = self.0.iter().any(|root| match root {
            Root::Dir(dir) => dir.canonicalize().is_ok_and(|dir| resolved.starts_with(dir)),
            Root::S3 { .. } => false,
        });
        if !admitted {
            let shown = match resolved == path {
                true => String::new(),
                false => format!(" (it resolves to {})", resolved.display()),
            };
            return Err(self.refuse(&reference, format!("it is not under a restore root{shown}")));
        }
        Ok(resolved)
    }

    fn refuse(&self, reference: &BundleRef, reason: String) -> Error {
        Error::Refused {
            subject: format!("restore-from {reference}"),
            reason: format!(
                "{reason}; this node restores only from its restore roots ({}): add the location to restore_roots \
                 in the shim config if it should be allowed",
                self.describe()
            ),
        }
    }

    fn describe(&self) -> String {
        match self.0.is_empty() {
            true => "none".into(),
            false => self.0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_confined_to_the_roots_after_resolving_them() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("checkpoints");
        let bundle = root.join("ns/pod/app/t1");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("escape")).unwrap();
        let roots = RestoreRoots::parse(&[root.to_str().unwrap(), "s3://bucket/team-a"]).unwrap();
        let dir = |p: &Path| BundleRef::LocalDir(p.to_path_buf());

        let resolved = bundle.canonicalize().unwrap();
        assert_eq!(roots.confine(&dir(&bundle)).unwrap(), BundleRef::LocalDir(resolved));
        for outside in [
            PathBuf::from("/etc"),
            PathBuf::from("/proc/self/root/etc"),
            root.join("escape"),
            root.join("ns/../../outside"),
        ] {
            let err = roots.confine(&dir(&outside)).unwrap_err();
            assert!(matches!(err, Error::Refused { .. }), "{}: {err}", outside.display());
            assert!(err.to_string().contains("restore_roots"), "{err}");
        }
        let err = roots.confine(&dir(&root.join("escape"))).unwrap_err().to_string();
        assert!(err.contains("resolves to"), "{err}");

        let s3 = |key: &str| BundleRef::S3 { bucket: "bucket".into(), key: key.into() };
        roots.confine(&s3("team-a/ns/pod/app/t1.tar.zst")).unwrap();
        assert!(roots.confine(&s3("team-ab/x.tar.zst")).is_err(), "a prefix is whole path components");
        assert!(roots.confine(&BundleRef::S3 { bucket: "other".into(), key: "team-a/x".into() }).is_err());
        assert!(RestoreRoots::default().confine(&s3("team-a/x")).unwrap_err().to_string().contains("(none)"));
        for bad in ["relative/dir", "/a/../b", "s3://", "s3://b/../x", "http://x"] {
            assert!(Root::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Root::parse("s3://b").unwrap(), Root::S3 { bucket: "b".into(), prefix: "".into() });
        assert_eq!(Root::parse("file:///var/a%20b").unwrap(), Root::Dir("/var/a b".into()));
    }
}
