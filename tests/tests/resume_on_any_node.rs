//! The cluster layer end to end, with containerd's CRI plugin acting as kubelet on two nodes (two
//! containerds, each with its own root, socket and node key) and a real S3 server (s3s-fs) as the
//! shared store: a StatefulSet pod admitted by the operator's webhook logic runs on Kybernate with
//! checkpoint on stop, is stopped, checkpointed and shipped to S3; the pod its StatefulSet re-creates
//! (same name, new uid) is admitted again, now with `restore-from` naming its pod checkpoint in S3,
//! and resumes its counter and its writable layer on the other node.

use std::fs;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod as KubePod;
use kube::core::admission::AdmissionReview;
use kybernate_api::CheckpointPolicy;
use kybernate_operator::admission::review;
use kybernate_operator::store_index::StoreIndex;
use kybernate_sidecar::store::{S3Options, StaticCredentials};
use kybernate_tests::cri::{
    counter_values, Cri, CHECKPOINT_ON_STOP, CRI_COUNTER_SCRIPT, CRI_HANDLER, RESTORE_FROM, RESTORE_POLICY,
};
use kybernate_tests::s3::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use serde_json::{json, Value};

const GRACE: Duration = Duration::from_secs(60);

/// The pod the StatefulSet `web` creates for ordinal 0 in `namespace`, as the API server hands it to
/// a mutating webhook.
fn statefulset_pod(namespace: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-0", "namespace": namespace, "uid": uid, "labels": {"app": "web"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "sts-1", "controller": true}]
        },
        "spec": {"containers": [{"name": "app", "image": "docker.io/kybernate/busybox:test"}]}
    })
}

/// The pod after the webhook's patch: what the API server stores and kubelet then runs.
fn admitted(pod: &Value, policy: &CheckpointPolicy, index: &StoreIndex) -> Value {
    let request: AdmissionReview<KubePod> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "e2e-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web-0", "namespace": pod["metadata"]["namespace"], "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:statefulset-controller"},
            "object": pod, "oldObject": null, "dryRun": false
        }
    }))
    .unwrap();
    let out =
        serde_json::to_value(review(request.request.as_ref().unwrap(), std::slice::from_ref(policy), index)).unwrap();
    let response = &out["response"];
    assert_eq!(response["allowed"], true, "{response}");
    let bytes: Vec<u8> = match &response["patch"] {
        Value::String(b64) => base64::engine::general_purpose::STANDARD.decode(b64).unwrap(),
        Value::Array(items) => items.iter().map(|b| b.as_u64().unwrap() as u8).collect(),
        other => panic!("the webhook patches a pod its policy selects: {other}"),
    };
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &serde_json::from_slice::<json_patch::Patch>(&bytes).unwrap()).unwrap();
    patched
}

/// The pod's annotations (containerd passes them to the sandbox and every container).
fn annotations(pod: &Value) -> Vec<(String, String)> {
    let map = pod["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    map.into_iter().map(|(k, v)| (k, v.as_str().unwrap().to_string())).collect()
}

/// Runs `pod` on `node` as kubelet would: the sandbox with the pod's annotations under the handler
/// its RuntimeClass names, then its counter container `app`; returns the container id.
fn run(node: &Cri, pod: &Value, token: &str) -> (kybernate_tests::cri::Pod, String) {
    assert_eq!(pod["spec"]["runtimeClassName"], CRI_HANDLER, "the webhook put the pod on Kybernate");
    let owned = annotations(pod);
    let refs: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let sandbox = node.run_pod_exactly("web-0", &refs).unwrap();
    let id =
        node.create_container(&sandbox, "app", &["sh", "-c", CRI_COUNTER_SCRIPT], &[], &[("TOKEN", token)]).unwrap();
    node.start_container(&id).unwrap();
    (sandbox, id)
}

#[test]
fn a_statefulset_pod_stopped_on_one_node_resumes_on_another_from_s3() {
    let s3 = S3Server::start();
    let node_a = Cri::start().unwrap();
    let mut node_b = Cri::start().unwrap();
    // one Kubernetes namespace across the cluster; node B trusts node A's key (docs/security.md)
    node_b.k8s_namespace = node_a.k8s_namespace.clone();
    fs::copy(
        node_a.containerd.dir.path().join("keys/signing.pub"),
        node_b.containerd.dir.path().join("keys/trusted/node-a.pub"),
    )
    .unwrap();
    for node in [&node_a, &node_b] {
        node.set_sidecar_env(&s3.sidecar_env()).unwrap();
    }
    let namespace = node_a.k8s_namespace.clone();
    let store = format!("s3://{BUCKET}");
    let policy: CheckpointPolicy = serde_json::from_value(json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "CheckpointPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "store": store}
    }))
    .unwrap();
    let index = StoreIndex {
        s3: S3Options {
            endpoint: Some(s3.endpoint()),
            region: Some("us-east-1".into()),
            force_path_style: true,
            credentials: Some(StaticCredentials {
                access_key_id: ACCESS_KEY.into(),
                secret_access_key: SECRET_KEY.into(),
            }),
            ..S3Options::default()
        },
    };

    // First creation: no checkpoint in the store yet, so the pod starts fresh with checkpoint on stop.
    let first = admitted(&statefulset_pod(&namespace, "uid-1"), &policy, &index);
    assert_eq!(first["metadata"]["annotations"][CHECKPOINT_ON_STOP], "true");
    assert!(first["metadata"]["annotations"].get(RESTORE_FROM).is_none(), "{first}");
    let (sandbox, id) = run(&node_a, &first, "token-web-0");
    node_a.wait_counter_past(&id, 10).unwrap();

    // Evicted: kubelet stops it; the shim checkpoints it on stop; the node's sidecar ships it to S3.
    node_a.stop_container(&id, GRACE).unwrap();
    let status = node_a.container_status(&id).unwrap();
    assert_eq!(status.exit_code, 143, "checkpointed on stop: {status:?}");
    let last = counter_values(&node_a.container_log(&id).unwrap()).into_iter().max().unwrap();
    let [bundle] = node_a.bundles(&sandbox, "app").try_into().unwrap_or_else(|b| panic!("one bundle: {b:?}"));
    let push = std::process::Command::new(&node_a.sidecar)
        .arg("--checkpoint-dir")
        .arg(&node_a.checkpoint_dir)
        .args(["--store", &store, "push"])
        .arg(&bundle)
        .envs(s3.sidecar_env())
        .output()
        .unwrap();
    assert_eq!(push.status.code(), Some(0), "push: {}", String::from_utf8_lossy(&push.stderr));
    node_a.remove_pod(&sandbox).unwrap();

    // Re-created by its StatefulSet (same name, new uid): the webhook finds its pod checkpoint in S3.
    let second = admitted(&statefulset_pod(&namespace, "uid-2"), &policy, &index);
    let second_annotations = &second["metadata"]["annotations"];
    let time = bundle.file_name().unwrap().to_str().unwrap();
    assert_eq!(second_annotations[RESTORE_FROM], format!("{store}/{namespace}/web-0#{time}"), "{second}");
    assert_eq!(second_annotations[RESTORE_POLICY], "fallback-fresh");

    // Scheduled on node B, which never saw it: it resumes from S3.
    let (restored, id) = run(&node_b, &second, "fresh-start");
    let values = node_b.wait_counter_past(&id, 0).unwrap();
    assert!(values[0] > last && values[0] < last + 50, "resumed at {}, checkpointed at {last}: {values:?}", values[0]);
    let token = fs::read_to_string(node_b.container_file(&id, "/state/token")).unwrap();
    assert_eq!(token.trim(), "token-web-0", "the writable layer came along");
    assert!(node_b.bundles(&restored, "app").is_empty(), "node B holds no bundle of its own");
    node_b.remove_pod(&restored).unwrap();
}
