//! The webhook's store index against a real filesystem store the sidecar ships into: the newest pod
//! checkpoint of a StatefulSet pod by name, of a ReplicaSet's pods by owner prefix, none for a pod
//! without one, and a clear error for a store that cannot be read.

use std::path::Path;

use checkpoint_core::bundle::{self, ContainerIdentity, HostInfo, Manifest};
use kybernate_operator::identity::{PodCheckpointIndex, PodIdentity, PodMatch};
use kybernate_operator::store_index::StoreIndex;
use kybernate_sidecar::archive::ArchiveOptions;
use kybernate_sidecar::crypt::Keyring;
use kybernate_sidecar::ship::{ship_bundle, ShipOptions, StateDir};
use kybernate_sidecar::store::FsStore;

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
