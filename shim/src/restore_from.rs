//! Restore on create: a container whose spec carries `kybernate.io/restore-from` is restored from that
//! bundle instead of started fresh. A local bundle directory (absolute path or `file://…`) is verified
//! in place; an archive (`s3://bucket/key`, or a file in a filesystem store) is first fetched into the
//! restore directory by the sidecar (`kybernate-sidecar pull`: download, checksum, safe extraction). Everything is checked before the
//! container is created, including, for a bundle with GPU state, this node's GPUs; when the bundle
//! cannot be used, `kybernate.io/restore-policy` decides between failing the Create (default) and
//! starting fresh.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use checkpoint_core::gpu::{GpuMatch, GpuRestorePlan};
use checkpoint_core::{open_bundle, Criu, OpenedBundle};

use crate::annotations::{restore_policy, RestorePolicy, RESTORE_FROM, RESTORE_POLICY};
use crate::checkpoint::RestoreSource;
use crate::config::ShimConfig;
use crate::container::SpecInfo;
use crate::error::{Result, ShimError};
use crate::reaper::Reaper;

/// Where a reference points (the sidecar reads references the same way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleLocation {
    /// A bundle directory on this node (an absolute path or `file://` URL naming a directory).
    Local(PathBuf),
    /// An archive the sidecar fetches: `s3://bucket/key`, or a path or `file://` URL naming an
    /// archive file in a filesystem store.
    Remote(String),
}

impl BundleLocation {
    /// Parses a `kybernate.io/restore-from` value.
    pub fn parse(reference: &str) -> Result<Self> {
        if reference.starts_with("s3://") {
            return Ok(BundleLocation::Remote(reference.to_string()));
        }
        let path = Path::new(reference.strip_prefix("file://").unwrap_or(reference));
        if !path.is_absolute() {
            return Err(bad_reference(reference));
        }
        if path.is_file() {
            return Ok(BundleLocation::Remote(reference.to_string()));
        }
        Ok(BundleLocation::Local(path.to_path_buf()))
    }
}

fn bad_reference(reference: &str) -> ShimError {
    ShimError::InvalidArgument(format!(
        "annotation {RESTORE_FROM}={reference:?} is not a bundle reference: use an absolute path, file:///path or s3://bucket/key"
    ))
}

/// The restore the spec asks for, if any, checked and ready; `None` when the spec names no bundle, or
/// when it cannot be used and the policy is `fallback-fresh`.
pub fn resolve(
    spec: &SpecInfo,
    id: &str,
    config: &ShimConfig,
    criu: &Criu,
    reaper: &Reaper,
) -> Result<Option<RestoreSource>> {
    let Some(reference) = spec.annotation(RESTORE_FROM) else { return Ok(None) };
    let policy = restore_policy(spec)?;
    let opened = BundleLocation::parse(reference).and_then(|location| {
        let dir = match location {
            BundleLocation::Local(dir) => dir,
            BundleLocation::Remote(url) => fetch(&url, id, config, reaper)?,
        };
        let _guard = reaper.guard();
        let opened = open_bundle(&dir, criu)?;
        let gpu = check_gpu(&opened, config, criu)?;
        Ok((opened, gpu))
    });
    match (opened, policy) {
        (Ok((opened, gpu)), _) => {
            tracing::info!(id, reference, bundle = %opened.dir.display(), gpu = gpu.is_some(), "restoring from bundle");
            Ok(Some(RestoreSource::from_bundle(opened, gpu)))
        }
        (Err(e), RestorePolicy::Fail) => Err(ShimError::FailedPrecondition(format!(
            "container {id} cannot be restored from {reference}: {e}; fix or replace the bundle, or set \
             {RESTORE_POLICY}: fallback-fresh to start fresh when it cannot be restored"
        ))),
        (Err(e), RestorePolicy::FallbackFresh) => {
            tracing::warn!(id, reference, error = %e, "bundle cannot be restored; starting fresh ({RESTORE_POLICY}: fallback-fresh)");
            Ok(None)
        }
    }
}

/// For a bundle that holds GPU state: checks that this node's GPUs can take it (driver, models,
/// count, free memory, and a backend that can restore it there) before anything is created. Runs
/// `criu --help`: call it under a reaper guard.
fn check_gpu(opened: &OpenedBundle, config: &ShimConfig, criu: &Criu) -> Result<Option<GpuRestorePlan>> {
    let Some(section) = &opened.manifest.gpu else { return Ok(None) };
    let context = crate::gpu::node_context(config, criu, config.checkpoint_budget()).map_err(|e| {
        ShimError::FailedPrecondition(format!(
            "bundle {} holds GPU state, but this node's GPUs cannot be listed: {e}",
            opened.dir.display()
        ))
    })?;
    Ok(Some(GpuRestorePlan::check(section, context, GpuMatch::default())?))
}

/// Fetches a remote bundle with `kybernate-sidecar pull` into a new directory under the restore dir.
fn fetch(url: &str, id: &str, config: &ShimConfig, reaper: &Reaper) -> Result<PathBuf> {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let dest = config.restore_dir.join(format!("{id}-{stamp}"));
    std::fs::create_dir_all(&config.restore_dir)
        .map_err(|e| ShimError::io(format!("creating restore directory {}", config.restore_dir.display()), e))?;
    tracing::info!(id, url, dest = %dest.display(), "fetching bundle");
    let output = {
        let _guard = reaper.guard();
        Command::new(&config.sidecar_binary)
            .arg("pull")
            .arg(url)
            .arg(&dest)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                ShimError::Unavailable(format!(
                    "cannot run {} to fetch {url}: {e}; install kybernate-sidecar or set sidecar_binary in the shim config",
                    config.sidecar_binary.display()
                ))
            })?
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ShimError::Unavailable(format!(
            "fetching {url} failed ({}): {}",
            output.status,
            stderr.trim().lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("b.tar");
        std::fs::write(&archive, b"").unwrap();
        let d = dir.path().display();
        assert_eq!(BundleLocation::parse(&format!("{d}")).unwrap(), BundleLocation::Local(dir.path().into()));
        assert_eq!(BundleLocation::parse(&format!("file://{d}")).unwrap(), BundleLocation::Local(dir.path().into()));
        let a = archive.display();
        assert_eq!(BundleLocation::parse(&format!("{a}")).unwrap(), BundleLocation::Remote(format!("{a}")));
        assert_eq!(
            BundleLocation::parse(&format!("file://{a}")).unwrap(),
            BundleLocation::Remote(format!("file://{a}"))
        );
        assert_eq!(BundleLocation::parse("s3://bk/k/x.tar").unwrap(), BundleLocation::Remote("s3://bk/k/x.tar".into()));
        // a missing directory is a local reference; opening it says it does not exist
        assert_eq!(BundleLocation::parse("/nonexistent/b").unwrap(), BundleLocation::Local("/nonexistent/b".into()));
        for bad in ["relative/b", "file://relative", "http://x/y", ""] {
            let err = BundleLocation::parse(bad).unwrap_err().to_string();
            assert!(err.contains("s3://bucket/key"), "{bad}: {err}");
        }
    }
}
