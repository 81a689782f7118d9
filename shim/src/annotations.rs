//! The spec annotations through which pods and containers ask for Kybernate's behaviour (CRI copies
//! them from the pod and container metadata when the runtime handler's `pod_annotations` /
//! `container_annotations` allow-lists name `kybernate.io/*`; `ctr run --annotation` sets them too).

use crate::config::ShimConfig;
use crate::error::{Result, ShimError};
use crate::spec::SpecInfo;

/// `"true"`: checkpoint the container when it is stopped; `"false"`: never (overrides the config).
pub const CHECKPOINT_ON_STOP: &str = "kybernate.io/checkpoint-on-stop";
/// A bundle to restore instead of starting fresh: a local path, `file://…` or `s3://bucket/key`.
pub const RESTORE_FROM: &str = "kybernate.io/restore-from";
/// What to do when the bundle cannot be restored: `fail` (default) or `fallback-fresh`.
pub const RESTORE_POLICY: &str = "kybernate.io/restore-policy";

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
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(ShimError::InvalidArgument(format!("annotation {key}={other:?} must be \"true\" or \"false\""))),
    }
}

/// Whether the container checkpoints when stopped: its annotation, else the configuration's default.
pub fn checkpoint_on_stop(spec: &SpecInfo, config: &ShimConfig) -> Result<bool> {
    match spec.annotation(CHECKPOINT_ON_STOP) {
        Some(value) => parse_bool(CHECKPOINT_ON_STOP, value),
        None => Ok(config.checkpoint_on_stop),
    }
}

/// The container's restore policy (default [`RestorePolicy::Fail`]).
pub fn restore_policy(spec: &SpecInfo) -> Result<RestorePolicy> {
    match spec.annotation(RESTORE_POLICY) {
        None | Some("fail") => Ok(RestorePolicy::Fail),
        Some("fallback-fresh") => Ok(RestorePolicy::FallbackFresh),
        Some(other) => Err(ShimError::InvalidArgument(format!(
            "annotation {RESTORE_POLICY}={other:?} is not a policy: use \"fail\" or \"fallback-fresh\""
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
        let err = checkpoint_on_stop(&spec(&[(CHECKPOINT_ON_STOP, "yes")]), &off).unwrap_err().to_string();
        assert!(err.contains(CHECKPOINT_ON_STOP) && err.contains("\"true\""), "{err}");
    }

    #[test]
    fn restore_policy_parses() {
        assert_eq!(restore_policy(&spec(&[])).unwrap(), RestorePolicy::Fail);
        assert_eq!(restore_policy(&spec(&[(RESTORE_POLICY, "fallback-fresh")])).unwrap(), RestorePolicy::FallbackFresh);
        let err = restore_policy(&spec(&[(RESTORE_POLICY, "retry")])).unwrap_err().to_string();
        assert!(err.contains("fallback-fresh"), "{err}");
    }
}
