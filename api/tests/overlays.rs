//! The overlays in `deploy/overlays/` render with `kubectl kustomize` (as deploy/ does in deploy.rs;
//! `KUBECTL` names another kubectl), every object they render is valid for its kind, and they deploy
//! what docs/deploy.md says: the node DaemonSet (deploy/node) instead of the base's two, the images
//! scripts/build-images.sh builds (local-images, never pulled) or a registry's with limits
//! (production), and each node container with only the host access it needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::Value;
mod common;
use common::{numbers_as_floats, round_trip_kind};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn deploy_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(sub)
}

/// Every object `kubectl kustomize deploy/<sub>` renders, each checked against its Kubernetes type.
fn render(sub: &str) -> Vec<Value> {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(deploy_dir(sub))
        .output()
        .unwrap_or_else(|e| panic!("{kubectl} is needed to render deploy/{sub} (run `make deps`): {e}"));
    assert!(out.status.success(), "kubectl kustomize deploy/{sub} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML"))
        .collect();
    for object in &objects {
        let kind = object["kind"].as_str().unwrap_or_else(|| panic!("deploy/{sub} renders an object without kind"));
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let back = round_trip_kind(object, &format!("deploy/{sub}"));
        assert_eq!(back, numbers_as_floats(object.clone()), "{kind} {name} has fields Kubernetes does not know");
    }
    objects
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} is rendered"))
}

/// `(kind, name)` of every object, sorted.
fn inventory(objects: &[Value]) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = objects
        .iter()
        .map(|o| (o["kind"].as_str().unwrap().to_string(), o["metadata"]["name"].as_str().unwrap().to_string()))
        .collect();
    all.sort();
    all
}

fn node_pod(objects: &[Value]) -> PodSpec {
    let ds: DaemonSet = serde_json::from_value(find(objects, "DaemonSet", "kybernate-node").clone()).unwrap();
    ds.spec.unwrap().template.spec.unwrap()
}

fn operator(objects: &[Value]) -> Container {
    let d: Deployment = serde_json::from_value(find(objects, "Deployment", "kybernate-operator").clone()).unwrap();
    d.spec.unwrap().template.spec.unwrap().containers.into_iter().next().unwrap()
}

/// Every container of the node pod and the operator, init containers first.
fn all_containers(objects: &[Value]) -> Vec<Container> {
    let pod = node_pod(objects);
    pod.init_containers.unwrap_or_default().into_iter().chain(pod.containers).chain([operator(objects)]).collect()
}

fn names(containers: &[Container]) -> Vec<&str> {
    containers.iter().map(|c| c.name.as_str()).collect()
}

/// The objects every overlay renders: the base's, with kybernate-node for its two node DaemonSets.
fn expected_inventory() -> Vec<(String, String)> {
    let base = render("");
    let mut expected: Vec<(String, String)> = inventory(&base)
        .into_iter()
        .filter(|(kind, name)| {
            !(kind == "DaemonSet" && (name == "kybernate-sidecar" || name == "kybernate-device-plugin"))
        })
        .chain([("DaemonSet".to_string(), "kybernate-node".to_string())])
        .collect();
    expected.sort();
    expected
}

#[test]
fn the_local_images_overlay_runs_the_archives_scripts_build_images_makes_and_never_pulls() {
    let objects = render("overlays/local-images");
    assert_eq!(inventory(&objects), expected_inventory());
    let pod = node_pod(&objects);
    let init = pod.init_containers.clone().unwrap_or_default();
    assert_eq!(names(&init), ["install"]);
    assert_eq!(names(&pod.containers), ["agent", "sidecar", "device-plugin"]);
    let images: BTreeMap<&str, String> =
        init.iter().chain(&pod.containers).map(|c| (c.name.as_str(), c.image.clone().unwrap())).collect();
    let tag = |name: &str| format!("ghcr.io/kybernate/{name}:{VERSION}");
    assert_eq!(
        images,
        BTreeMap::from([
            ("install", tag("kybernate-install")),
            ("agent", tag("kybernate-agent")),
            ("sidecar", tag("kybernate-sidecar")),
            ("device-plugin", tag("kybernate-device-plugin")),
        ])
    );
    assert_eq!(operator(&objects).image.as_deref(), Some(tag("kybernate-operator").as_str()));
    for c in all_containers(&objects) {
        assert_eq!(c.image_pull_policy.as_deref(), Some("Never"), "{} would pull", c.name);
    }
}

#[test]
fn the_production_overlay_pulls_from_a_registry_and_limits_every_container() {
    let objects = render("overlays/production");
    assert_eq!(inventory(&objects), expected_inventory());
    let containers = all_containers(&objects);
    assert_eq!(names(&containers), ["install", "agent", "sidecar", "device-plugin", "operator"]);
    for c in &containers {
        let component = match c.name.as_str() {
            "install" | "agent" | "sidecar" | "device-plugin" | "operator" => format!("kybernate-{}", c.name),
            other => panic!("{other}"),
        };
        assert_eq!(c.image.as_deref(), Some(format!("registry.example.com/kybernate/{component}:{VERSION}").as_str()));
        assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"), "{}", c.name);
        let resources = c.resources.clone().unwrap_or_default();
        for (what, set) in [("limits", resources.limits), ("requests", resources.requests)] {
            let set = set.unwrap_or_default();
            assert!(set.contains_key("cpu") && set.contains_key("memory"), "{} has {what} {set:?}", c.name);
        }
    }
    let agent = &containers[1];
    let limits = agent.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!((limits["cpu"].0.as_str(), limits["memory"].0.as_str()), ("1", "1Gi"));
}

#[test]
fn the_installer_init_container_writes_only_the_host_shim_and_containerd_directories() {
    let objects = render("overlays/local-images");
    let pod = node_pod(&objects);
    let [install] = pod.init_containers.as_deref().unwrap_or_default() else { panic!("one init container") };
    assert_eq!(
        install.command.as_deref().unwrap_or_default(),
        [
            "/usr/local/bin/kybernate-install",
            "--shim=/usr/local/bin/containerd-shim-kybernate-v1",
            "--host-bin-dir=/host/usr/local/bin",
            "--host-containerd-dir=/host/etc/containerd",
            "--containerd-config-version=2",
        ]
    );
    assert_eq!(install.args, None);
    let security = install.security_context.clone().unwrap();
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let caps = security.capabilities.unwrap();
    assert_eq!((caps.drop.as_deref(), caps.add), (Some(&["ALL".to_string()][..]), None));
    assert_eq!(
        mounts(install),
        [("host-bin", "/host/usr/local/bin", false), ("host-containerd-config", "/host/etc/containerd", false)]
    );
    let host = host_paths(&pod);
    assert_eq!(host["host-bin"], "/usr/local/bin");
    assert_eq!(host["host-containerd-config"], "/etc/containerd");
}

/// `(volume, mount path, read-only)` of every mount of `c`.
fn mounts(c: &Container) -> Vec<(&str, &str, bool)> {
    c.volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only.unwrap_or(false)))
        .collect()
}

/// Volume name → host path of every hostPath volume.
fn host_paths(pod: &PodSpec) -> BTreeMap<String, String> {
    pod.volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect()
}

#[test]
fn each_node_container_gets_only_the_host_access_it_needs() {
    let objects = render("overlays/production");
    let pod = node_pod(&objects);
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(
        host_paths(&pod),
        BTreeMap::from(
            [
                ("agent-socket", "/run/kybernate"),
                ("containerd-run", "/run/containerd"),
                ("device-plugins", "/var/lib/kubelet/device-plugins"),
                ("host-bin", "/usr/local/bin"),
                ("host-containerd-config", "/etc/containerd"),
                ("kybernate-data", "/var/lib/kybernate"),
                ("nvidia-driver-libs", "/usr/lib/x86_64-linux-gnu"),
                ("shim-config", "/etc/kybernate"),
                ("store", "/var/lib/kybernate/store"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        )
    );
    let container = |name: &str| pod.containers.iter().find(|c| c.name == name).unwrap().clone();
    let (agent, sidecar, plugin) = (container("agent"), container("sidecar"), container("device-plugin"));
    assert_eq!(
        mounts(&agent),
        [
            ("agent-socket", "/run/kybernate", false),
            ("containerd-run", "/run/containerd", true),
            ("kybernate-data", "/var/lib/kybernate", false),
            ("store", "/var/lib/kybernate/store", false),
            ("shim-config", "/etc/kybernate", true),
            ("sidecar-config", "/etc/kybernate-sidecar/sidecar.toml", true),
        ]
    );
    assert!(agent.args.as_deref().unwrap().contains(&"--containerd-socket=/run/containerd/containerd.sock".into()));
    assert_eq!(
        mounts(&sidecar),
        [
            ("kybernate-data", "/var/lib/kybernate", false),
            ("store", "/var/lib/kybernate/store", false),
            ("sidecar-config", "/etc/kybernate/sidecar.toml", true),
        ]
    );
    assert_eq!(
        mounts(&plugin),
        [
            ("device-plugins", "/var/lib/kubelet/device-plugins", false),
            ("device-plugin-config", "/etc/kybernate/device-plugin.toml", true),
            ("nvidia-driver-libs", "/host-driver-libs", true),
        ]
    );
    for (c, added) in
        [(&agent, &["DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER"][..]), (&sidecar, &["DAC_OVERRIDE", "DAC_READ_SEARCH"])]
    {
        let security = c.security_context.clone().unwrap();
        assert_eq!(security.privileged, Some(false), "{}", c.name);
        assert_eq!(security.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(security.read_only_root_filesystem, Some(true), "{}", c.name);
        let caps = security.capabilities.unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]), "{}", c.name);
        assert_eq!(caps.add.unwrap_or_default(), added, "{}", c.name);
    }
    // Only NVML's devices need a privileged container.
    assert_eq!(plugin.security_context.and_then(|s| s.privileged), Some(true));
}

#[test]
fn the_node_layer_carries_the_bases_configuration_unchanged() {
    let base = render("");
    let node = render("node");
    assert_eq!(
        inventory(&node),
        [
            ("ConfigMap", "kybernate-device-plugin"),
            ("ConfigMap", "kybernate-sidecar"),
            ("DaemonSet", "kybernate-node"),
            ("Secret", "kybernate-sidecar-s3")
        ]
        .map(|(k, n)| (k.to_string(), n.to_string()))
    );
    for (kind, name) in [
        ("ConfigMap", "kybernate-sidecar"),
        ("ConfigMap", "kybernate-device-plugin"),
        ("Secret", "kybernate-sidecar-s3"),
    ] {
        assert_eq!(find(&node, kind, name), find(&base, kind, name), "deploy/node/config.yaml's {kind} {name} drifted");
    }
    // Every ConfigMap the node pod mounts is one the node layer renders.
    for volume in node_pod(&node).volumes.unwrap_or_default() {
        if let Some(cm) = volume.config_map {
            find(&node, "ConfigMap", &cm.name);
        }
    }
}
