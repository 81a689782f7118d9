//! What the shim needs from a container's OCI spec (`config.json`): annotations, the pid namespace
//! and the root path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Result, ShimError};

/// What the shim needs from the container's OCI spec (`config.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecInfo {
    /// Spec annotations.
    pub annotations: HashMap<String, String>,
    /// Whether the container has a pid namespace of its own (then the kernel kills all its processes
    /// when init exits; otherwise the shim must).
    pub private_pid_ns: bool,
    /// `root.path`: the container's root filesystem, absolute or relative to the bundle.
    pub root: PathBuf,
}

impl SpecInfo {
    /// Reads `config.json` in `bundle`.
    pub fn load(bundle: &Path) -> Result<Self> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|e| ShimError::io(format!("reading {}", path.display()), e))?;
        let spec: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| ShimError::InvalidArgument(format!("{} is not valid JSON: {e}", path.display())))?;
        Ok(SpecInfo::from_json(&spec))
    }

    /// Extracts the fields from a parsed spec.
    pub fn from_json(spec: &serde_json::Value) -> Self {
        let annotations = spec["annotations"]
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let private_pid_ns = spec["linux"]["namespaces"].as_array().is_some_and(|nss| {
            nss.iter().any(|ns| ns["type"] == "pid" && ns["path"].as_str().is_none_or(str::is_empty))
        });
        let root = PathBuf::from(spec["root"]["path"].as_str().unwrap_or("rootfs"));
        SpecInfo { annotations, private_pid_ns, root }
    }

    /// An annotation's value, if set and not empty.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_info_reads_annotations_and_pid_namespace() {
        let spec = serde_json::json!({
            "annotations": {"io.kubernetes.pod.name": "p", "empty": ""},
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]}
        });
        let info = SpecInfo::from_json(&spec);
        assert!(info.private_pid_ns);
        assert_eq!(info.annotation("io.kubernetes.pod.name"), Some("p"));
        assert_eq!(info.annotation("empty"), None);
        let shared = serde_json::json!({"linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}});
        assert!(!SpecInfo::from_json(&shared).private_pid_ns);
        assert!(!SpecInfo::from_json(&serde_json::json!({})).private_pid_ns);
    }
}
