//! `deploy/` is a kustomize base that `kubectl kustomize` renders, and every object it renders is a
//! valid object of its Kubernetes kind: it parses into the k8s-openapi type, and serializing that
//! type gives back exactly what was rendered (a misspelt or unknown field would be dropped).

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `object` read as `T` and written back: the same JSON when every field is one `T` knows.
fn round_trip<T: DeserializeOwned + Serialize>(object: &serde_json::Value) -> serde_json::Value {
    let typed: T = serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object}"));
    numbers_as_floats(serde_json::to_value(typed).unwrap())
}

/// JSON with every number as a float, so that `0` and `0.0` (a schema's `minimum`) compare equal.
fn numbers_as_floats(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(Value::Number(n)),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, numbers_as_floats(v))).collect()),
        other => other,
    }
}

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
        let back = match kind {
            "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(object),
            "RuntimeClass" => round_trip::<RuntimeClass>(object),
            "DaemonSet" => round_trip::<DaemonSet>(object),
            "ConfigMap" => round_trip::<ConfigMap>(object),
            "Secret" => round_trip::<Secret>(object),
            other => panic!("deploy/ renders a {other} ({name}) this test does not know: add its type here"),
        };
        assert_eq!(back, numbers_as_floats(object.clone()), "{kind} {name} has fields Kubernetes does not know");
        if kind == "CustomResourceDefinition" {
            let generated = kybernate_api::crds().into_iter().find(|(_, c)| c.metadata.name.as_deref() == Some(name));
            let generated =
                generated.unwrap_or_else(|| panic!("deploy/ renders CRD {name}, which api/ does not define"));
            assert_eq!(back, numbers_as_floats(serde_json::to_value(generated.1).unwrap()), "{name} is stale");
        }
        kinds.push(kind);
    }
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "ConfigMap",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "DaemonSet",
            "DaemonSet",
            "RuntimeClass",
            "Secret"
        ]
    );
}
