//! The Kubernetes examples users apply are valid objects of their kinds: each document of every
//! `examples/kubernetes/*.yaml` parses into its k8s-openapi (or Kybernate) type and serializes back
//! to exactly what the file says, so a misspelt or unknown field fails here rather than in a cluster.

use std::path::Path;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kybernate_api::{CheckpointPolicy, Restore};

mod common;
use common::{numbers_as_floats, round_trip};

#[test]
fn every_example_object_is_valid_for_its_kind() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes");
    let mut seen = Vec::new();
    for file in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(file.path()).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let object: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            let kind = object["kind"].as_str().expect("every object has a kind").to_string();
            let back = match kind.as_str() {
                "Namespace" => round_trip::<Namespace>(&object),
                "Service" => round_trip::<Service>(&object),
                "StatefulSet" => round_trip::<StatefulSet>(&object),
                "CheckpointPolicy" => round_trip::<CheckpointPolicy>(&object),
                "Restore" => round_trip::<Restore>(&object),
                other => panic!("{} holds a {other} this test does not know: add its type", file.path().display()),
            };
            assert_eq!(
                back,
                numbers_as_floats(object.clone()),
                "{kind} in {} has unknown fields",
                file.path().display()
            );
            seen.push(kind);
        }
    }
    seen.sort();
    assert_eq!(seen, ["CheckpointPolicy", "Namespace", "Restore", "Service", "StatefulSet"]);
}
