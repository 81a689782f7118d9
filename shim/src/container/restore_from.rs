//! Restore on create: a container whose spec carries `kybernate.io/restore-from` (a pod annotation,
//! which containerd passes to the sandbox and to every container, or a container's own) is restored
//! instead of started fresh. The pod's sandbox always starts fresh.
//!
//! The reference is read by checkpoint-core's one parser ([`BundleRef`]) and names either one bundle
//! or a pod checkpoint (`checkpoint_core::pod`): the pod's directory on this node or its prefix in a
//! store, optionally `#<time>`. From a pod checkpoint each container takes the bundle with its own
//! name (`io.kubernetes.cri.container-name`) in the newest (or named) pod checkpoint; a container it
//! does not cover (an init container, a container added since) starts fresh, unless
//! `kybernate.io/restore-policy: fail` is set. `kybernate.io/restore-from.<name>` overrides the
//! reference for one container (`none`: start fresh).
//!
//! An archive in a store is fetched into the restore directory by the sidecar (`kybernate-sidecar
//! pull`: download with its transport checksum, safe extraction). Either way the bundle is then opened
//! by one checkpoint-core call, which verifies every file's hash — the only place a fetched bundle is
//! hashed — and checks this node, GPUs included, before the container is created. When the bundle
//! cannot be used, `kybernate.io/restore-policy` decides between failing the Create (default) and
//! starting fresh.
//!
//! Only what the node allows is restored (`docs/security.md`): the reference must lie under the
//! configured restore roots (checked before anything is fetched, again on the bundle found), the
//! manifest must be signed by a trusted key (checked before anything else of the bundle is read), and
//! the bundle must be of the restoring container's tenant, unless the config or a signed
//! `kybernate.io/restore-grant` allows the pair. A refusal fails the Create with PERMISSION_DENIED
//! (or, with `fallback-fresh`, starts the container fresh and logs why).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use checkpoint_core::bundle::ContainerIdentity;
use checkpoint_core::pod::{self, DirKind, Selection};
use checkpoint_core::reference::BundleRef;
use checkpoint_core::tenant::Tenant;
use checkpoint_core::{open_container_bundle, Criu, OpenOptions, PageFeed, RestorableBundle, TenantCheck};

use crate::annotations::{
    is_sandbox, restore_policy, RestorePolicy, CONTAINER_NAME, POD_NAMESPACE, RESTORE_FROM,
    RESTORE_FROM_CONTAINER_PREFIX, RESTORE_GRANT, RESTORE_POLICY,
};
use crate::config::{RestoreMode, ShimConfig};
use crate::error::{Result, ShimError};
use crate::reaper::Reaper;
use crate::spec::SpecInfo;

/// Exit status of `kybernate-sidecar pull --container` for a container the pod checkpoint does not
/// cover (the sidecar's `NOT_COVERED_EXIT`).
const SIDECAR_NOT_COVERED: i32 = 3;

/// Who a bundle is opened for: the tenant that restores it, the reference that named it and the
/// grant the container carries.
pub(super) struct Restoring<'a> {
    /// The restoring container's tenant.
    pub target: Tenant,
    /// The reference (annotation value, or the task checkpoint directory).
    pub reference: &'a str,
    /// `kybernate.io/restore-grant`, if set.
    pub grant: Option<&'a str>,
    /// Whether the restore is lazy where the node and bundle allow it (`kybernate.io/restore-mode`,
    /// else the config's `restore_mode`).
    pub lazy: bool,
    /// `kybernate.io/restore-policy`, if set.
    pub policy: Option<RestorePolicy>,
}

impl<'a> Restoring<'a> {
    /// The restore `spec` asks for from `reference`, by a container in containerd namespace
    /// `namespace`: its tenant is its pod's Kubernetes namespace, else that containerd namespace.
    pub fn new(spec: &'a SpecInfo, namespace: &str, reference: &'a str, config: &ShimConfig) -> Result<Self> {
        let identity = ContainerIdentity {
            namespace: namespace.to_string(),
            kube_namespace: spec.annotation(POD_NAMESPACE).map(str::to_string),
            ..Default::default()
        };
        let lazy = crate::annotations::restore_mode(spec, config)? == RestoreMode::Lazy;
        let policy = restore_policy(spec)?;
        Ok(Restoring { target: Tenant::of(&identity), reference, grant: spec.annotation(RESTORE_GRANT), lazy, policy })
    }

    /// Whether a full restore's page images are verified while CRIU restores them, the tasks held
    /// until they match (a mismatch fails the Start): unless `kybernate.io/restore-policy:
    /// fallback-fresh`, which needs every hash checked at Create to start fresh instead.
    fn hold(&self) -> bool {
        self.policy != Some(RestorePolicy::FallbackFresh)
    }
}

/// Where a reference led for this container.
enum Located {
    /// A bundle directory on this node (fetched or in place).
    Bundle(PathBuf),
    /// A bundle the sidecar published before its pages arrived, and the feed that serves them to a
    /// lazy restore (remote lazy restore).
    Fed(PathBuf, PageFeed),
    /// The pod checkpoint holds no bundle of this container; why, in words.
    NotCovered(String),
}

/// The restore the spec asks for, if any, checked and ready; `None` when the spec names no bundle for
/// this container, when it is the sandbox, or when the bundle cannot be used and the policy says start
/// fresh.
pub fn resolve(
    spec: &SpecInfo,
    id: &str,
    namespace: &str,
    config: &ShimConfig,
    criu: &Criu,
    reaper: &Arc<Reaper>,
) -> Result<Option<RestorableBundle>> {
    let name = spec.annotation(CONTAINER_NAME).unwrap_or(id);
    let own = format!("{RESTORE_FROM_CONTAINER_PREFIX}{name}");
    let Some(reference) = spec.annotation(&own).or_else(|| spec.annotation(RESTORE_FROM)) else { return Ok(None) };
    if is_sandbox(spec) {
        tracing::debug!(id, reference, "the pod's sandbox starts fresh; its containers restore");
        return Ok(None);
    }
    if reference == "none" {
        tracing::info!(id, container = name, "{own}: none; starting fresh");
        return Ok(None);
    }
    let restoring = Restoring::new(spec, namespace, reference, config)?;
    let policy = restoring.policy;
    let accept_partial = policy == Some(RestorePolicy::AllowPartial);
    let opened = match locate(reference, name, id, config, reaper, restoring.lazy.then_some(criu)) {
        Ok(Located::NotCovered(why)) => {
            if policy != Some(RestorePolicy::Fail) {
                tracing::info!(id, container = name, reference, reason = %why, "not in the pod checkpoint; starting fresh");
                return Ok(None);
            }
            return Err(ShimError::FailedPrecondition(format!(
                "container {name} cannot be restored from {reference}: {why}; {RESTORE_POLICY}: fail refuses to start \
                 it fresh (set {own}: none for a container that is meant to start fresh, such as an init container)"
            )));
        }
        Ok(Located::Bundle(dir)) => open(&dir, config, criu, false, accept_partial, &restoring),
        Ok(Located::Fed(dir, feed)) => open(&dir, config, criu, false, accept_partial, &restoring)
            .and_then(|b| Ok(b.feed_pages(feed).map(|()| b)?)),
        Err(e) => Err(e),
    };
    match (opened, policy.unwrap_or(RestorePolicy::Fail)) {
        (Ok(opened), _) => {
            tracing::info!(id, reference, bundle = %opened.dir.display(), gpu = opened.gpu.is_some(), signed = ?opened.provenance, "restoring from bundle");
            Ok(Some(opened))
        }
        (Err(e), RestorePolicy::Fail | RestorePolicy::AllowPartial) if e.is_refusal() => {
            Err(ShimError::PermissionDenied(format!("container {id} cannot be restored: {e}")))
        }
        (Err(e), RestorePolicy::Fail | RestorePolicy::AllowPartial) => Err(ShimError::FailedPrecondition(format!(
            "container {id} cannot be restored from {reference}: {e}; fix or replace the bundle, or set \
             {RESTORE_POLICY}: fallback-fresh to start fresh when it cannot be restored"
        ))),
        (Err(e), RestorePolicy::FallbackFresh) => {
            tracing::warn!(id, reference, error = %e, "bundle cannot be restored; starting fresh ({RESTORE_POLICY}: fallback-fresh)");
            Ok(None)
        }
    }
}

/// Opens a bundle for a restore on this node with checkpoint-core: its signature checked against the
/// node's trusted keys, its tenant against `restoring`'s, verified, host and GPUs checked; this node's
/// GPU context is built only when the bundle holds GPU state.
pub(super) fn open(
    dir: &Path,
    config: &ShimConfig,
    criu: &Criu,
    accept_unsealed: bool,
    accept_partial: bool,
    restoring: &Restoring<'_>,
) -> Result<RestorableBundle> {
    let trust = crate::keys::trusted(config)?;
    let policy = crate::keys::tenant_policy(config)?;
    let gpu = || crate::gpu::node_context(config, criu, config.checkpoint_budget()).map_err(|e| e.to_string());
    let tenant = TenantCheck {
        policy: &policy,
        target: &restoring.target,
        reference: restoring.reference,
        grant: restoring.grant,
    };
    let opts = OpenOptions {
        accept_unsealed,
        accept_partial,
        gpu: &gpu,
        gpu_match: Default::default(),
        trust: &trust,
        tenant: Some(tenant),
        lazy: restoring.lazy,
        hold: restoring.hold(),
    };
    Ok(open_container_bundle(dir, criu, &opts)?)
}

/// Follows `reference` to this container's bundle: in place, from a pod checkpoint on this node, or
/// fetched by the sidecar (one archive, or this container's from a pod checkpoint in a store). The
/// reference, and a bundle found in a pod's directory, must lie under the restore roots. With
/// `lazy` (the CRIU of a lazy restore), a fetched bundle is published before its pages arrive and
/// they are served as the restore asks for them, where this node can restore lazily.
fn locate(
    reference: &str,
    container: &str,
    id: &str,
    config: &ShimConfig,
    reaper: &Arc<Reaper>,
    lazy: Option<&Criu>,
) -> Result<Located> {
    let (target, at) = pod::split_time(reference);
    let roots = config.restore_roots();
    let parsed = roots.confine(&BundleRef::parse(target)?)?;
    let pod_prefix = match &parsed {
        BundleRef::LocalDir(dir) => match pod::classify(dir) {
            DirKind::Bundle if at.is_none() => return Ok(Located::Bundle(dir.clone())),
            DirKind::Bundle => {
                return Err(ShimError::InvalidArgument(format!(
                    "{target} is one bundle; #<time> names a pod checkpoint in a pod's directory"
                )))
            }
            DirKind::NodePod => {
                let entries = pod::node_entries(dir);
                return match pod::select(&entries, container, at) {
                    Selection::Covered(entry) => Ok(Located::Bundle(roots.confine_path(&dir.join(&entry.rel))?)),
                    Selection::NotCovered { time, containers } => Ok(Located::NotCovered(format!(
                        "its pod checkpoint {time} holds bundles of {} only",
                        containers.join(", ")
                    ))),
                    Selection::Empty => Err(ShimError::FailedPrecondition(format!(
                        "{} holds no sealed pod checkpoint{}",
                        dir.display(),
                        at.map(|t| format!(" at {t}")).unwrap_or_default()
                    ))),
                };
            }
            DirKind::StorePod => true,
        },
        BundleRef::FsArchive { .. } => false,
        BundleRef::S3 { key, .. } => !pod::is_archive(key),
    };
    let pod_container = pod_prefix.then_some(container);
    fetch(&parsed, at, pod_container, id, config, reaper, lazy)
}

/// Fetches a remote bundle with `kybernate-sidecar pull` into a new directory under the restore dir:
/// one archive, or — with `container` — that container's archive in a pod checkpoint in a store. The
/// sidecar skips its own manifest pass: the bundle is verified when it is opened. For a lazy restore
/// (`lazy`, where CRIU finds userfaultfd) the sidecar serves the pages while it fetches them
/// (`pull --serve-pages`).
fn fetch(
    reference: &BundleRef,
    at: Option<&str>,
    container: Option<&str>,
    id: &str,
    config: &ShimConfig,
    reaper: &Arc<Reaper>,
    lazy: Option<&Criu>,
) -> Result<Located> {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let dest = config.restore_dir.join(format!("{id}-{stamp}"));
    std::fs::create_dir_all(&config.restore_dir)
        .map_err(|e| ShimError::io(format!("creating restore directory {}", config.restore_dir.display()), e))?;
    let mut target = reference.to_string();
    if let Some(at) = at {
        target = format!("{target}#{at}");
    }
    tracing::info!(id, reference = %target, container, dest = %dest.display(), "fetching bundle");
    let mut args = vec!["pull".into(), "--skip-manifest-check".into()];
    if let Some(container) = container {
        args.extend(["--container".into(), container.into()]);
    }
    args.extend([std::ffi::OsString::from(&target), dest.clone().into_os_string()]);
    let what = format!("fetching {target}");
    let fix = "raise fetch_timeout in the shim config, or check the store";
    let run = match lazy.and_then(remote_lazy_criu) {
        Some(version) => {
            let timeout = config.fetch_timeout();
            match crate::sidecar::pull_serving_pages(config, reaper, &args, &version, timeout, &what, fix)? {
                Ok((dir, feed)) if dir == dest => {
                    tracing::info!(%id, reference = %target, bundle = %dir.display(), "bundle published; its pages are served as the lazy restore asks for them");
                    return Ok(Located::Fed(dir, feed));
                }
                Ok((dir, _)) => {
                    return Err(ShimError::Internal(format!(
                        "the sidecar published {} instead of {}",
                        dir.display(),
                        dest.display()
                    )))
                }
                Err(run) => run,
            }
        }
        None => crate::sidecar::run(config, reaper, &args, config.fetch_timeout(), &what, fix)?,
    };
    let said = run.said;
    match run.code {
        Some(0) => Ok(Located::Bundle(dest)),
        Some(SIDECAR_NOT_COVERED) if container.is_some() => Ok(Located::NotCovered(said)),
        _ => Err(ShimError::Unavailable(format!("fetching {target} failed ({}): {said}", run.status))),
    }
}

/// The version of `criu` when it can restore lazily on this node (the sidecar then serves the pages
/// of a remote bundle as they arrive); `None`, with the reason logged, when it cannot.
fn remote_lazy_criu(criu: &Criu) -> Option<String> {
    match (criu.has_feature(checkpoint_core::Feature::LazyPages), criu.version()) {
        (Ok(true), Ok(version)) => Some(version.to_string()),
        (Ok(false), _) => None,
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot tell whether CRIU restores lazily here; fetching the whole bundle first");
            None
        }
    }
}
