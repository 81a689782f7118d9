//! `deploy/` is a kustomize base that `kubectl kustomize` renders, and every object it renders is a
//! valid object of its Kubernetes kind: it parses into the k8s-openapi type, and serializing that
//! type gives back exactly what was rendered (a misspelt or unknown field would be dropped).

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Service;
mod common;
use common::{numbers_as_floats, round_trip_kind};

#[test]
fn the_deploy_base_renders_and_every_object_is_valid_for_its_kind() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&base)
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed to render deploy/ (run `make deps`): {e}"));
    assert!(out.status.success(), "kubectl kustomize deploy/ failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let objects: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML"))
        .collect();
    let mut kinds: Vec<&str> = Vec::new();
    for object in &objects {
        let kind = object["kind"].as_str().expect("every object has a kind");
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let back = round_trip_kind(object, "deploy/");
        assert_eq!(back, numbers_as_floats(object.clone()), "{kind} {name} has fields Kubernetes does not know");
        if kind == "CustomResourceDefinition" {
            let generated = kybernate_api::crds().into_iter().find(|(_, c)| c.metadata.name.as_deref() == Some(name));
            let generated =
                generated.unwrap_or_else(|| panic!("deploy/ renders CRD {name}, which api/ does not define"));
            assert_eq!(back, numbers_as_floats(serde_json::to_value(generated.1).unwrap()), "{name} is stale");
        }
        kinds.push(kind);
    }
    the_webhook_never_blocks_a_pod_and_reaches_the_operator(&objects);
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "DaemonSet",
            "DaemonSet",
            "Deployment",
            "MutatingWebhookConfiguration",
            "Role",
            "RoleBinding",
            "RuntimeClass",
            "Secret",
            "Service",
            "ServiceAccount"
        ]
    );
}

/// The webhook configuration admits pods when the webhook fails, skips kube-system, and names the
/// operator's Service on a port it has.
fn the_webhook_never_blocks_a_pod_and_reaches_the_operator(objects: &[serde_json::Value]) {
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("deploy/ renders no {kind} {name}"))
    };
    let config: MutatingWebhookConfiguration =
        serde_json::from_value(find("MutatingWebhookConfiguration", "kybernate-operator").clone()).unwrap();
    let [webhook] = config.webhooks.as_deref().unwrap_or_default() else { panic!("one webhook") };
    assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"), "a failing webhook must not block pods");
    assert_eq!(webhook.side_effects, "None");
    assert_eq!(webhook.timeout_seconds, Some(5));
    assert_eq!(webhook.admission_review_versions, ["v1"]);
    let rules = webhook.rules.as_deref().unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        (rules[0].operations.as_deref(), rules[0].resources.as_deref()),
        (Some(&["CREATE".to_string()][..]), Some(&["pods".to_string()][..]))
    );
    let excluded = webhook.namespace_selector.as_ref().and_then(|s| s.match_expressions.as_ref()).unwrap();
    assert!(
        excluded.iter().any(|r| r.key == "kubernetes.io/metadata.name"
            && r.operator == "NotIn"
            && r.values.as_deref() == Some(&["kube-system".to_string()][..])),
        "kube-system is not excluded: {excluded:?}"
    );
    let target = webhook.client_config.service.as_ref().expect("the webhook calls a Service");
    assert_eq!((target.path.as_deref(), target.port), (Some("/mutate"), Some(443)));
    let service: Service = serde_json::from_value(find("Service", &target.name).clone()).unwrap();
    assert_eq!(service.metadata.namespace.as_deref(), Some(target.namespace.as_str()));
    let ports = service.spec.and_then(|s| s.ports).unwrap_or_default();
    assert!(ports.iter().any(|p| p.port == 443), "{ports:?}");
}
