//! Restore on create: a container whose spec carries `kybernate.io/restore-from` is restored from that
//! bundle instead of started fresh. The reference is read by checkpoint-core's one parser
//! ([`BundleRef`]): a bundle directory on this node is opened in place; an archive (`s3://bucket/key`,
//! or a file in a filesystem store) is first fetched into the restore directory by the sidecar
//! (`kybernate-sidecar pull`: download with its transport checksum, safe extraction). Either way the
//! bundle is then opened by one checkpoint-core call, which verifies every file's hash — the only
//! place a fetched bundle is hashed — and checks this node, GPUs included, before the container is
//! created. When the bundle cannot be used, `kybernate.io/restore-policy` decides between failing the
//! Create (default) and starting fresh.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use checkpoint_core::reference::BundleRef;
use checkpoint_core::{open_container_bundle, Criu, OpenOptions, RestorableBundle};

use crate::annotations::{restore_policy, RestorePolicy, RESTORE_FROM, RESTORE_POLICY};
use crate::config::ShimConfig;
use crate::error::{Result, ShimError};
use crate::reaper::Reaper;
use crate::spec::SpecInfo;

/// The restore the spec asks for, if any, checked and ready; `None` when the spec names no bundle, or
/// when it cannot be used and the policy is `fallback-fresh`.
pub fn resolve(
    spec: &SpecInfo,
    id: &str,
    config: &ShimConfig,
    criu: &Criu,
    reaper: &Reaper,
) -> Result<Option<RestorableBundle>> {
    let Some(reference) = spec.annotation(RESTORE_FROM) else { return Ok(None) };
    let policy = restore_policy(spec)?;
    let opened = BundleRef::parse(reference).map_err(ShimError::from).and_then(|parsed| {
        let dir = match parsed {
            BundleRef::LocalDir(dir) => dir,
            remote => fetch(&remote, id, config, reaper)?,
        };
        let gpu = || crate::gpu::node_context(config, criu, config.checkpoint_budget()).map_err(|e| e.to_string());
        let opts = OpenOptions { accept_unsealed: false, gpu: &gpu, gpu_match: Default::default() };
        Ok(open_container_bundle(&dir, criu, &opts)?)
    });
    match (opened, policy) {
        (Ok(opened), _) => {
            tracing::info!(id, reference, bundle = %opened.dir.display(), gpu = opened.gpu.is_some(), "restoring from bundle");
            Ok(Some(opened))
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

/// Fetches a remote bundle with `kybernate-sidecar pull` into a new directory under the restore dir.
/// The sidecar skips its own manifest pass: the bundle is verified when it is opened, here.
fn fetch(reference: &BundleRef, id: &str, config: &ShimConfig, reaper: &Reaper) -> Result<PathBuf> {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let dest = config.restore_dir.join(format!("{id}-{stamp}"));
    std::fs::create_dir_all(&config.restore_dir)
        .map_err(|e| ShimError::io(format!("creating restore directory {}", config.restore_dir.display()), e))?;
    tracing::info!(id, %reference, dest = %dest.display(), "fetching bundle");
    let output = {
        let _guard = reaper.guard();
        Command::new(&config.sidecar_binary)
            .args(["pull", "--skip-manifest-check"])
            .arg(reference.to_string())
            .arg(&dest)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
            ShimError::Unavailable(format!(
                "cannot run {} to fetch {reference}: {e}; install kybernate-sidecar or set sidecar_binary in the shim config",
                config.sidecar_binary.display()
            ))
        })?
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(ShimError::Unavailable(format!(
            "fetching {reference} failed ({}): {}",
            output.status,
            stderr.trim().lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(dest)
}
