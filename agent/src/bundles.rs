//! The node's bundles: listing the sealed ones under `checkpoint_dir` (checkpoint-core's pod
//! layout), and deleting one, never anything outside `checkpoint_dir`.

use std::path::{Component, Path, PathBuf};

use checkpoint_core::bundle::{self, Manifest, COMPLETE_MARKER, FAILED_MARKER, IN_PROGRESS_MARKER, PARTIAL_MARKER};
use kybernate_proto::kybernate::agent::v1 as api;

use crate::error::{AgentError, Result};

/// Which bundles a listing shows; an empty field matches every value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// The namespace directory.
    pub namespace: String,
    /// The pod (or container id) directory.
    pub pod: String,
    /// The container directory.
    pub container: String,
}

fn matches(wanted: &str, name: &str) -> bool {
    wanted.is_empty() || wanted == name
}

fn dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// The manifest of the sealed bundle `dir`, if it can be read.
pub fn manifest(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read(dir.join(bundle::MANIFEST_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The size of every file `manifest` lists.
pub fn bytes(manifest: &Manifest) -> u64 {
    manifest.files.values().map(|f| f.size).sum()
}

/// The sealed bundles under `root` (`<namespace>/<pod>/<container>/<time>/` with `COMPLETE`) that
/// `filter` admits, oldest first within each container.
pub fn list(root: &Path, filter: &Filter) -> Vec<api::Bundle> {
    let mut out = Vec::new();
    for namespace in dirs(root).into_iter().filter(|n| matches(&filter.namespace, n)) {
        for pod in dirs(&root.join(&namespace)).into_iter().filter(|p| matches(&filter.pod, p)) {
            let pod_dir = root.join(&namespace).join(&pod);
            for entry in checkpoint_core::pod::node_entries(&pod_dir) {
                if !matches(&filter.container, &entry.container) {
                    continue;
                }
                let path = pod_dir.join(&entry.rel);
                let manifest = manifest(&path);
                out.push(api::Bundle {
                    path: path.display().to_string(),
                    namespace: namespace.clone(),
                    pod: pod.clone(),
                    container: entry.container,
                    time: entry.time,
                    container_id: manifest.as_ref().map(|m| m.container.id.clone()).unwrap_or_default(),
                    bytes: manifest.as_ref().map(bytes).unwrap_or_default(),
                });
            }
        }
    }
    out
}

/// Deletes the bundle `path` (absolute, or relative to `root`), and the directories above it that it
/// leaves empty, up to `root`. Refuses anything that is not a bundle four levels below `root`
/// (`<namespace>/<pod>/<container>/<time>`), a path with `..`, one that resolves outside `root`, and a
/// bundle still being written. Returns the directory removed.
pub fn delete(root: &Path, path: &str) -> Result<PathBuf> {
    let refuse = |why: String| {
        AgentError::InvalidArgument(format!(
            "{path:?} is not deleted: {why}; Delete removes only bundles <namespace>/<pod>/<container>/<time> of the \
             checkpoint directory {}",
            root.display()
        ))
    };
    let given = Path::new(path);
    if path.is_empty() || given.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refuse("it is empty or has a `..` component".into()));
    }
    let joined = root.join(given);
    let resolved = match joined.canonicalize() {
        Ok(resolved) => resolved,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AgentError::NotFound(format!("no bundle {} on this node", joined.display())))
        }
        Err(e) => return Err(AgentError::io(format!("resolving {}", joined.display()), e)),
    };
    let root = root.canonicalize().map_err(|e| AgentError::io(format!("resolving {}", root.display()), e))?;
    let depth = match resolved.strip_prefix(&root) {
        Ok(rel) => rel.components().count(),
        Err(_) => {
            return Err(refuse(format!("it resolves to {}, outside the checkpoint directory", resolved.display())))
        }
    };
    if depth != 4 {
        return Err(refuse(format!("{} is not a bundle directory", resolved.display())));
    }
    if resolved.join(IN_PROGRESS_MARKER).exists() && !resolved.join(COMPLETE_MARKER).exists() {
        return Err(AgentError::FailedPrecondition(format!(
            "bundle {} is still being written ({IN_PROGRESS_MARKER}); delete it once it is sealed or failed",
            resolved.display()
        )));
    }
    if ![COMPLETE_MARKER, FAILED_MARKER, PARTIAL_MARKER].iter().any(|m| resolved.join(m).is_file()) {
        return Err(refuse(format!("{} has no bundle marker", resolved.display())));
    }
    std::fs::remove_dir_all(&resolved)
        .map_err(|e| AgentError::io(format!("removing bundle {}", resolved.display()), e))?;
    // The container, pod and namespace directories it leaves empty (remove_dir keeps non-empty ones).
    for parent in resolved.ancestors().skip(1).take_while(|p| *p != root) {
        if std::fs::remove_dir(parent).is_err() {
            break;
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "2026-01-01T00:00:00.000Z";
    const T2: &str = "2026-01-02T00:00:00.000Z";

    fn sealed(root: &Path, rel: &str) -> PathBuf {
        let dir = root.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(COMPLETE_MARKER), "x").unwrap();
        dir
    }

    #[test]
    fn lists_filter_and_deletes_stay_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("checkpoints");
        sealed(&root, &format!("shop/web-0/app/{T1}"));
        sealed(&root, &format!("shop/web-0/app/{T2}"));
        sealed(&root, &format!("shop/web-0/log/{T1}"));
        sealed(&root, &format!("dev/c/c/{T1}"));
        std::fs::create_dir_all(root.join(format!("dev/c/c/{T2}"))).unwrap(); // not sealed

        let all: Vec<String> = list(&root, &Filter::default()).into_iter().map(|b| b.path).collect();
        let expected: Vec<String> = [
            format!("dev/c/c/{T1}"),
            format!("shop/web-0/app/{T1}"),
            format!("shop/web-0/app/{T2}"),
            format!("shop/web-0/log/{T1}"),
        ]
        .iter()
        .map(|rel| root.join(rel).display().to_string())
        .collect();
        assert_eq!(all, expected);
        let app = list(&root, &Filter { namespace: "shop".into(), pod: "web-0".into(), container: "app".into() });
        assert_eq!(app.iter().map(|b| b.time.as_str()).collect::<Vec<_>>(), [T1, T2]);
        assert_eq!(
            (app[0].namespace.as_str(), app[0].pod.as_str(), app[0].container.as_str()),
            ("shop", "web-0", "app")
        );
        assert!(list(&root.join("nowhere"), &Filter::default()).is_empty());

        let outside = tmp.path().join("precious");
        std::fs::create_dir_all(outside.join("a/b/c")).unwrap();
        std::fs::write(outside.join("a/b/c/COMPLETE"), "x").unwrap();
        let escapes = [
            "../precious/a/b/c".to_string(),
            outside.join("a/b/c").display().to_string(),
            "shop/web-0/app".to_string(),
            String::new(),
        ];
        for path in &escapes {
            let err = delete(&root, path).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{path}: {}", err.chain());
        }
        std::os::unix::fs::symlink(outside.join("a"), root.join("shop/link")).unwrap();
        let err = delete(&root, "shop/link/b/c").unwrap_err().chain();
        assert!(err.contains("outside the checkpoint directory"), "{err}");
        assert!(outside.join("a/b/c/COMPLETE").exists(), "nothing outside is touched");
        assert_eq!(
            delete(&root, &format!("shop/web-0/app/{}", "2030-01-01T00:00:00.000Z")).unwrap_err().code(),
            tonic::Code::NotFound
        );

        std::fs::write(root.join(format!("dev/c/c/{T2}/{IN_PROGRESS_MARKER}")), "pid").unwrap();
        assert_eq!(delete(&root, &format!("dev/c/c/{T2}")).unwrap_err().code(), tonic::Code::FailedPrecondition);

        let removed = delete(&root, &format!("shop/web-0/log/{T1}")).unwrap();
        assert_eq!(removed, root.canonicalize().unwrap().join(format!("shop/web-0/log/{T1}")));
        assert!(!root.join("shop/web-0/log").exists(), "the emptied container directory goes too");
        assert!(root.join("shop/web-0/app").exists());
        let absolute = root.join(format!("shop/web-0/app/{T1}")).display().to_string();
        delete(&root, &absolute).unwrap();
        assert_eq!(list(&root, &Filter { container: "app".into(), ..Default::default() }).len(), 1);
    }
}
