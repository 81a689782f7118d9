//! The spec annotations through which pods and containers ask for Kybernate's behaviour (CRI copies
//! them from the pod and container metadata when the runtime handler's `pod_annotations` /
//! `container_annotations` allow-lists name `kybernate.io/*`; `ctr run --annotation` sets them too).

use crate::config::{CheckpointMode, RestoreMode, ShimConfig};
use crate::error::{Result, ShimError};
use crate::spec::SpecInfo;

/// `"true"`: checkpoint the container when it is stopped; `"false"`: never (overrides the config).
pub const CHECKPOINT_ON_STOP: &str = "kybernate.io/checkpoint-on-stop";
/// `disk` or `diskless`: where a checkpoint on stop is written (wins over the config's
/// `checkpoint_mode`).
pub const CHECKPOINT_MODE: &str = "kybernate.io/checkpoint-mode";
/// A bundle to restore instead of starting fresh: a local path, `file://…` or `s3://bucket/key`.
/// On a pod, it names a pod checkpoint (the pod's directory or store prefix, optionally
/// `#<time>`), in which each container finds its own bundle by name.
pub const RESTORE_FROM: &str = "kybernate.io/restore-from";
/// `kybernate.io/restore-from.<container name>`: the reference for that container alone (a bundle or
/// a pod checkpoint), or `none` to start it fresh; wins over [`RESTORE_FROM`].
pub const RESTORE_FROM_CONTAINER_PREFIX: &str = "kybernate.io/restore-from.";
/// What to do when the bundle cannot be restored: `fail` (default), `fallback-fresh` or
/// `allow-partial` (as `fail`, but a `PARTIAL` bundle is restored); and whether a
/// container that the pod checkpoint does not cover fails (`fail`, only when set) or starts fresh.
pub const RESTORE_POLICY: &str = "kybernate.io/restore-policy";
/// A restore grant (a token the operator signs, see `docs/security.md`) that lets this pod restore a
/// bundle of another tenant, the one the grant names.
pub const RESTORE_GRANT: &str = "kybernate.io/restore-grant";
/// `lazy` or `full`: how the container's memory is restored (wins over the config's
/// `restore_mode`).
pub const RESTORE_MODE: &str = "kybernate.io/restore-mode";
/// CRI's container type: `sandbox` for the pod's pause container, `container` for the others.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// CRI's annotations naming the Kubernetes pod, its namespace, the container and its image.
pub const POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// The Kubernetes namespace of the pod.
pub const POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// The Kubernetes container name.
pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
/// The image the container runs.
pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// What happens when a `restore-from` bundle is missing, corrupt or incompatible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestorePolicy {
    /// Create fails with the reason (the default: a silent cold start would lose state unnoticed).
    Fail,
    /// The container starts fresh, and the reason is logged.
    FallbackFresh,
    /// Like `Fail`, but a `PARTIAL` bundle (its memory complete, something after the dump missing) is
    /// restored as far as it goes.
    AllowPartial,
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(ShimError::InvalidArgument(format!("annotation {key}={other:?} must be \"true\" or \"false\""))),
    }
}

/// Whether this is a pod's sandbox (pause) container, which is never checkpointed or restored: pod
/// annotations reach it too, but it holds no state and always starts fresh.
pub fn is_sandbox(spec: &SpecInfo) -> bool {
    spec.annotation(CONTAINER_TYPE) == Some("sandbox")
}

/// Whether the container checkpoints when stopped: its annotation, else the configuration's default;
/// never for a sandbox.
pub fn checkpoint_on_stop(spec: &SpecInfo, config: &ShimConfig) -> Result<bool> {
    if is_sandbox(spec) {
        return Ok(false);
    }
    match spec.annotation(CHECKPOINT_ON_STOP) {
        Some(value) => parse_bool(CHECKPOINT_ON_STOP, value),
        None => Ok(config.checkpoint_on_stop),
    }
}

/// How the container is checkpointed on stop, if it is: [`checkpoint_on_stop`], and then its
/// `kybernate.io/checkpoint-mode` annotation, else the configuration's `checkpoint_mode`.
pub fn on_stop(spec: &SpecInfo, config: &ShimConfig) -> Result<Option<CheckpointMode>> {
    if !checkpoint_on_stop(spec, config)? {
        return Ok(None);
    }
    match spec.annotation(CHECKPOINT_MODE) {
        None => Ok(Some(config.checkpoint_mode)),
        Some("disk") => Ok(Some(CheckpointMode::Disk)),
        Some("diskless") => Ok(Some(CheckpointMode::Diskless)),
        Some(other) => Err(ShimError::InvalidArgument(format!(
            "annotation {CHECKPOINT_MODE}={other:?} is not a checkpoint mode: use \"disk\" or \"diskless\""
        ))),
    }
}

/// The container's restore policy as set; `None` when the annotation is absent (an unusable bundle then
/// fails the Create, and a container the pod checkpoint does not cover starts fresh).
pub fn restore_policy(spec: &SpecInfo) -> Result<Option<RestorePolicy>> {
    match spec.annotation(RESTORE_POLICY) {
        None => Ok(None),
        Some("fail") => Ok(Some(RestorePolicy::Fail)),
        Some("fallback-fresh") => Ok(Some(RestorePolicy::FallbackFresh)),
        Some("allow-partial") => Ok(Some(RestorePolicy::AllowPartial)),
        Some(other) => Err(ShimError::InvalidArgument(format!(
            "annotation {RESTORE_POLICY}={other:?} is not a policy: use \"fail\", \"fallback-fresh\" or \"allow-partial\""
        ))),
    }
}

/// How the container's memory is restored: its annotation, else the configuration's default.
pub fn restore_mode(spec: &SpecInfo, config: &ShimConfig) -> Result<RestoreMode> {
    match spec.annotation(RESTORE_MODE) {
        None => Ok(config.restore_mode),
        Some("full") => Ok(RestoreMode::Full),
        Some("lazy") => Ok(RestoreMode::Lazy),
        Some(other) => Err(ShimError::InvalidArgument(format!(
            "annotation {RESTORE_MODE}={other:?} is not a restore mode: use \"full\" or \"lazy\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pairs: &[(&str, &str)]) -> SpecInfo {
        SpecInfo {
            annotations: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn opt_in_follows_the_annotation_then_the_config() {
        let off = ShimConfig::default();
        let on = ShimConfig { checkpoint_on_stop: true, ..Default::default() };
        assert!(!checkpoint_on_stop(&spec(&[]), &off).unwrap());
        assert!(checkpoint_on_stop(&spec(&[]), &on).unwrap());
        assert!(checkpoint_on_stop(&spec(&[(CHECKPOINT_ON_STOP, "true")]), &off).unwrap());
        assert!(!checkpoint_on_stop(&spec(&[(CHECKPOINT_ON_STOP, "false")]), &on).unwrap());
        let sandbox = spec(&[(CHECKPOINT_ON_STOP, "true"), (CONTAINER_TYPE, "sandbox")]);
        assert!(!checkpoint_on_stop(&sandbox, &on).unwrap(), "a pod's sandbox is never checkpointed");
        assert!(
            checkpoint_on_stop(&spec(&[(CHECKPOINT_ON_STOP, "true"), (CONTAINER_TYPE, "container")]), &off).unwrap()
        );
        let err = checkpoint_on_stop(&spec(&[(CHECKPOINT_ON_STOP, "yes")]), &off).unwrap_err().to_string();
        assert!(err.contains(CHECKPOINT_ON_STOP) && err.contains("\"true\""), "{err}");
    }

    #[test]
    fn restore_policy_parses() {
        assert_eq!(restore_policy(&spec(&[])).unwrap(), None);
        assert_eq!(restore_policy(&spec(&[(RESTORE_POLICY, "fail")])).unwrap(), Some(RestorePolicy::Fail));
        assert_eq!(
            restore_policy(&spec(&[(RESTORE_POLICY, "fallback-fresh")])).unwrap(),
            Some(RestorePolicy::FallbackFresh)
        );
        let err = restore_policy(&spec(&[(RESTORE_POLICY, "retry")])).unwrap_err().to_string();
        assert!(err.contains("fallback-fresh"), "{err}");
    }

    #[test]
    fn restore_mode_follows_the_annotation_then_the_config() {
        let full = ShimConfig::default();
        let lazy = ShimConfig { restore_mode: RestoreMode::Lazy, ..Default::default() };
        assert_eq!(restore_mode(&spec(&[]), &full).unwrap(), RestoreMode::Full);
        assert_eq!(restore_mode(&spec(&[]), &lazy).unwrap(), RestoreMode::Lazy);
        assert_eq!(restore_mode(&spec(&[(RESTORE_MODE, "lazy")]), &full).unwrap(), RestoreMode::Lazy);
        assert_eq!(restore_mode(&spec(&[(RESTORE_MODE, "full")]), &lazy).unwrap(), RestoreMode::Full);
        let err = restore_mode(&spec(&[(RESTORE_MODE, "fast")]), &full).unwrap_err().to_string();
        assert_eq!(
            err,
            "annotation kybernate.io/restore-mode=\"fast\" is not a restore mode: use \"full\" or \"lazy\""
        );
    }

    #[test]
    fn the_checkpoint_mode_follows_the_annotation_then_the_config() {
        let disk = ShimConfig { checkpoint_on_stop: true, ..Default::default() };
        let diskless = ShimConfig { checkpoint_mode: CheckpointMode::Diskless, ..disk.clone() };
        assert_eq!(on_stop(&spec(&[]), &disk).unwrap(), Some(CheckpointMode::Disk));
        assert_eq!(on_stop(&spec(&[]), &diskless).unwrap(), Some(CheckpointMode::Diskless));
        assert_eq!(on_stop(&spec(&[(CHECKPOINT_MODE, "diskless")]), &disk).unwrap(), Some(CheckpointMode::Diskless));
        assert_eq!(on_stop(&spec(&[(CHECKPOINT_MODE, "disk")]), &diskless).unwrap(), Some(CheckpointMode::Disk));
        let off = spec(&[(CHECKPOINT_ON_STOP, "false"), (CHECKPOINT_MODE, "diskless")]);
        assert_eq!(on_stop(&off, &disk).unwrap(), None, "no checkpoint on stop, in any mode");
        let err = on_stop(&spec(&[(CHECKPOINT_MODE, "ram")]), &disk).unwrap_err().to_string();
        assert_eq!(
            err,
            "annotation kybernate.io/checkpoint-mode=\"ram\" is not a checkpoint mode: use \"disk\" or \"diskless\""
        );
    }
}
