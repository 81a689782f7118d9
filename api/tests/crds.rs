//! The CRDs in `deploy/crds/` are what the Rust types generate, render with `kubectl kustomize`, and
//! are structural schemas the API server accepts (every node typed, no `$ref`).

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

const REGENERATE: &str = "cargo run -p kybernate-api --bin kybernate-crdgen -- deploy/crds";

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds")
}

#[test]
fn deploy_crds_are_generated_from_the_types() {
    let crds = kybernate_api::crds();
    assert_eq!(crds.len(), 3);
    for (file, crd) in &crds {
        let on_disk = std::fs::read_to_string(crds_dir().join(file)).unwrap_or_default();
        assert_eq!(on_disk, kybernate_api::render(crd), "deploy/crds/{file} is stale: run `{REGENERATE}`");
    }
    let kustomization = std::fs::read_to_string(crds_dir().join("kustomization.yaml")).unwrap_or_default();
    assert_eq!(kustomization, kybernate_api::kustomization(&crds), "deploy/crds/kustomization.yaml is stale");
}

#[test]
fn kubectl_kustomize_renders_every_crd_as_generated() {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(crds_dir())
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed to render deploy/ (run `make deps`): {e}"));
    assert!(out.status.success(), "kubectl kustomize failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut rendered: Vec<CustomResourceDefinition> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("each rendered object is a CustomResourceDefinition"))
        .collect();
    rendered.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut generated: Vec<CustomResourceDefinition> = kybernate_api::crds().into_iter().map(|(_, c)| c).collect();
    generated.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    assert_eq!(rendered, generated);
}

/// Kubernetes accepts only structural schemas: every node has a `type` (or keeps unknown fields /
/// is int-or-string), and there are no references.
fn assert_structural(path: &str, schema: &serde_json::Value) {
    let node = schema.as_object().unwrap_or_else(|| panic!("{path} is not an object"));
    assert!(!node.contains_key("$ref"), "{path} has a $ref");
    let typed = node.contains_key("type")
        || node.get("x-kubernetes-preserve-unknown-fields") == Some(&serde_json::Value::Bool(true))
        || node.get("x-kubernetes-int-or-string") == Some(&serde_json::Value::Bool(true));
    assert!(typed, "{path} has no type: {schema}");
    for (name, child) in node.get("properties").and_then(|p| p.as_object()).into_iter().flatten() {
        assert_structural(&format!("{path}.{name}"), child);
    }
    if let Some(items) = node.get("items") {
        assert_structural(&format!("{path}[]"), items);
    }
    if let Some(extra) = node.get("additionalProperties").filter(|a| a.is_object()) {
        assert_structural(&format!("{path}{{}}"), extra);
    }
}

#[test]
fn every_schema_is_structural_with_a_status_subresource() {
    for (file, crd) in kybernate_api::crds() {
        for version in &crd.spec.versions {
            let schema = serde_json::to_value(&version.schema.as_ref().unwrap().open_api_v3_schema).unwrap();
            assert_structural(&file, &schema);
            assert!(version.subresources.as_ref().is_some_and(|s| s.status.is_some()), "{file}: no status subresource");
            assert!(version.served && version.storage, "{file}");
        }
    }
}

#[test]
fn a_checkpoint_policy_as_users_write_it_reads_with_its_defaults() {
    let yaml = r#"
apiVersion: kybernate.io/v1alpha1
kind: CheckpointPolicy
metadata: { name: trainers, namespace: ml }
spec:
  selector: { matchLabels: { app: trainer } }
  store: s3://checkpoints/cluster-a
"#;
    let policy: kybernate_api::CheckpointPolicy = serde_yaml::from_str(yaml).unwrap();
    let spec = &policy.spec;
    assert_eq!((spec.checkpoint_on_stop, spec.resume_on_recreate, spec.retention), (true, true, 3));
    assert_eq!(spec.store.as_deref(), Some("s3://checkpoints/cluster-a"));
    assert_eq!(spec.selector.match_labels.as_ref().unwrap()["app"], "trainer");
}
