//! What the manifest tests share: an object read as its type and written back.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `object` read as `T` and written back: the same JSON when every field is one `T` knows.
pub fn round_trip<T: DeserializeOwned + Serialize>(object: &serde_json::Value) -> serde_json::Value {
    let typed: T = serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object}"));
    numbers_as_floats(serde_json::to_value(typed).unwrap())
}

/// JSON with every number as a float, so that `0` and `0.0` (a schema's `minimum`) compare equal.
pub fn numbers_as_floats(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(Value::Number(n)),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, numbers_as_floats(v))).collect()),
        other => other,
    }
}

/// A rendered manifest `object` read as the type of its `kind` and written back (see
/// [`round_trip`]); `source` names what rendered it, for the failure of a kind no type is listed for.
#[allow(dead_code)] // the examples test reads its objects by type
pub fn round_trip_kind(object: &serde_json::Value, source: &str) -> serde_json::Value {
    let kind = object["kind"].as_str().unwrap_or_else(|| panic!("{source} renders an object without kind"));
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    match kind {
        "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(object),
        "RuntimeClass" => round_trip::<RuntimeClass>(object),
        "DaemonSet" => round_trip::<DaemonSet>(object),
        "ConfigMap" => round_trip::<ConfigMap>(object),
        "Secret" => round_trip::<Secret>(object),
        "Deployment" => round_trip::<Deployment>(object),
        "Service" => round_trip::<Service>(object),
        "ServiceAccount" => round_trip::<ServiceAccount>(object),
        "ClusterRole" => round_trip::<ClusterRole>(object),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(object),
        "Role" => round_trip::<Role>(object),
        "RoleBinding" => round_trip::<RoleBinding>(object),
        "MutatingWebhookConfiguration" => round_trip::<MutatingWebhookConfiguration>(object),
        other => panic!("{source} renders a {other} ({name}) this test does not know: add its type here"),
    }
}
