//! The webhook's store index against a real filesystem store the sidecar ships into: the newest pod
//! checkpoint of a StatefulSet pod by name, of a ReplicaSet's pods by owner prefix, none for a pod
//! without one, and a clear error for a store that cannot be read; the policy controller's listing
//! (one pod checkpoint per pod and time) and deletion.

use std::path::Path;

use checkpoint_core::bundle::{self, ContainerIdentity, HostInfo, Manifest};
use kybernate_operator::identity::{PodCheckpointIndex, PodIdentity, PodMatch};
use kybernate_operator::retention::{BundleStores as _, StoredPodCheckpoint};
use kybernate_operator::store_index::StoreIndex;
use kybernate_sidecar::archive::ArchiveOptions;
use kybernate_sidecar::crypt::Keyring;
use kybernate_sidecar::ship::{ship_bundle, ShipOptions, StateDir};
use kybernate_sidecar::store::{FsStore, Store as _};

/// Seals a small bundle at `<root>/<rel>` and ships it into the store at `store_dir`.
fn ship(root: &Path, store_dir: &Path, rel: &str) {
    let dir = root.join(rel);
    std::fs::create_dir_all(dir.join("checkpoint")).unwrap();
    std::fs::write(dir.join("checkpoint/inventory.img"), rel.as_bytes()).unwrap();
    bundle::seal(&dir, Manifest::new(HostInfo::default(), ContainerIdentity::default())).unwrap();
    let opts = ShipOptions {
        archive: ArchiveOptions::default(),
        state: StateDir::for_checkpoint_dir(root),
        force: true,
        progress: None,
        keys: Keyring::default(),
    };
    let store = FsStore::new(store_dir.to_path_buf());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(ship_bundle(&store, &dir, rel, &opts)).unwrap();
}

#[test]
fn the_newest_pod_checkpoint_of_an_identity_is_found_in_a_filesystem_store() {
    let (root, store_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for rel in [
        "ml/web-0/trainer/2026-12-01T10:00:00.000Z",
        "ml/web-0/trainer/2026-12-01T11:00:00.000Z",
        "ml/web-0/sidecar/2026-12-01T11:00:00.000Z",
        "ml/web-1/trainer/2026-12-01T12:00:00.000Z",
        "ml/trainer-7d9f8b6c5-x1/app/2026-12-01T09:00:00.000Z",
        "ml/trainer-7d9f8b6c5-x2/app/2026-12-01T09:30:00.000Z",
        "ml/trainer-5c4b3a2-old/app/2026-12-01T13:00:00.000Z",
        "other/web-0/trainer/2026-12-01T14:00:00.000Z",
    ] {
        ship(root.path(), store_dir.path(), rel);
    }
    let store = format!("file://{}", store_dir.path().display());
    let index = StoreIndex::default();
    let ask = |pods: PodMatch| index.newest(&store, &PodIdentity { namespace: "ml".into(), pods }).unwrap();
    assert_eq!(ask(PodMatch::Named("web-0".into())), Some(format!("{store}/ml/web-0#2026-12-01T11:00:00.000Z")));
    assert_eq!(
        ask(PodMatch::Prefixed("trainer-7d9f8b6c5-".into())),
        Some(format!("{store}/ml/trainer-7d9f8b6c5-x2#2026-12-01T09:30:00.000Z")),
        "the newest of the same ReplicaSet's pods; another template's pods are not taken"
    );
    assert_eq!(ask(PodMatch::Named("web-2".into())), None);
    assert_eq!(ask(PodMatch::Named("web".into())), None, "a name is matched whole");

    let err = index
        .newest("gopher://nowhere", &PodIdentity { namespace: "ml".into(), pods: PodMatch::Named("web-0".into()) })
        .unwrap_err();
    assert!(err.contains("gopher://nowhere"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn pod_checkpoints_are_listed_per_pod_and_time_and_deleted_whole() {
    let (root, store_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rels = [
        "ml/web-0/trainer/2026-12-01T10:00:00.000Z",
        "ml/web-0/sidecar/2026-12-01T10:00:00.000Z",
        "ml/web-0/trainer/2026-12-01T11:00:00.000Z",
        "ml/web-01/trainer/2026-12-01T12:00:00.000Z",
    ];
    let (root_path, store_path) = (root.path().to_path_buf(), store_dir.path().to_path_buf());
    tokio::task::spawn_blocking(move || rels.iter().for_each(|rel| ship(&root_path, &store_path, rel))).await.unwrap();
    let store = format!("file://{}", store_dir.path().display());
    let index = StoreIndex::default();
    let web_0 = PodIdentity { namespace: "ml".into(), pods: PodMatch::Named("web-0".into()) };
    let mut found = index.pod_checkpoints(&store, &web_0).await.unwrap();
    found.iter_mut().for_each(|c| c.keys.sort());
    let all = index_keys(store_dir.path()).await;
    let archive = |rel: &str| {
        let keys: Vec<String> = all.iter().filter(|k| k.starts_with(rel)).cloned().collect();
        assert_eq!(keys.len(), 1, "{rel}: {keys:?}");
        keys[0].clone()
    };
    let first = StoredPodCheckpoint {
        pod: "web-0".into(),
        time: "2026-12-01T10:00:00.000Z".into(),
        keys: vec![
            archive("ml/web-0/sidecar/2026-12-01T10:00:00.000Z"),
            archive("ml/web-0/trainer/2026-12-01T10:00:00.000Z"),
        ],
    };
    let second = StoredPodCheckpoint {
        pod: "web-0".into(),
        time: "2026-12-01T11:00:00.000Z".into(),
        keys: vec![archive("ml/web-0/trainer/2026-12-01T11:00:00.000Z")],
    };
    assert_eq!(found, [first.clone(), second.clone()], "web-01 is another pod");

    index.delete(&store, &first.keys).await.unwrap();
    assert_eq!(index.pod_checkpoints(&store, &web_0).await.unwrap(), [second]);
    let err = index.delete(&store, &first.keys).await.unwrap_err();
    assert!(err.starts_with(&format!("deleting {} from {store}: ", first.keys[0])), "{err}");
}

/// The archive keys of the filesystem store at `dir`.
async fn index_keys(dir: &Path) -> Vec<String> {
    FsStore::new(dir.to_path_buf()).list("").await.unwrap().into_iter().map(|o| o.key).collect()
}
