//! The Kubernetes path through containerd's CRI plugin, driven with a real CRI v1 client the way the
//! kubelet drives it: pods with the `kybernate` handler on a private containerd, a counter workload,
//! checkpoint on stop of an opted-in container, restore of that bundle into a new pod, and what
//! happens when the bundle is corrupt.
//!
//! Every test starts its own containerd (see `kybernate_tests::cri::Cri`) and fails — never skips —
//! when containerd, runc or CRIU are missing.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use k8s_cri::v1::ContainerState;
use kybernate_tests::cri::{
    counter_values, files_under, Cri, Pod, CHECKPOINT_ON_STOP, CRI_COUNTER_SCRIPT, RESTORE_FROM, RESTORE_POLICY,
};
use kybernate_tests::wait_for;

/// The grace period of StopContainer when the container is expected to checkpoint: ample for
/// dumping a shell loop.
const CHECKPOINT_GRACE: Duration = Duration::from_secs(60);

/// Fails the test with `what`, the error, and the end of containerd's log (the shims log into it).
fn ok<T>(cri: &Cri, what: &str, result: Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e:#}\n--- containerd log:\n{}", cri.log_tail(80)))
}

/// Creates and starts the counter container `name` in `pod`, with `$TOKEN` set to `token`.
fn counter_container(cri: &Cri, pod: &Pod, name: &str, annotations: &[(&str, &str)], token: &str) -> Result<String> {
    let id = cri.create_container(pod, name, &["sh", "-c", CRI_COUNTER_SCRIPT], annotations, &[("TOKEN", token)])?;
    cri.start_container(&id)?;
    Ok(id)
}

/// Runs an opted-in counter in a new pod until it logged past 10, stops it through CRI, and returns
/// the pod, the container id, the highest value it logged, and the bundle checkpoint on stop wrote
/// for it (checked for the files the bundle format promises). `on_pod` puts the opt-in annotation on
/// the pod, else on the container.
fn checkpointed_counter(cri: &Cri, on_pod: bool, token: &str) -> (Pod, String, u64, PathBuf) {
    let opt_in = [(CHECKPOINT_ON_STOP, "true")];
    let (pod_annotations, container_annotations) = if on_pod { (&opt_in[..], &[][..]) } else { (&[][..], &opt_in[..]) };
    let pod = ok(cri, "RunPodSandbox", cri.run_pod("counter-src", pod_annotations));
    let id = ok(cri, "running the counter", counter_container(cri, &pod, "counter", container_annotations, token));
    ok(cri, "waiting for the counter", cri.wait_counter_past(&id, 10));
    ok(cri, "StopContainer", cri.stop_container(&id, CHECKPOINT_GRACE));

    let status = ok(cri, "ContainerStatus", cri.container_status(&id));
    assert_eq!(status.state, ContainerState::ContainerExited as i32, "after StopContainer: {status:?}");
    assert_eq!(status.exit_code, 143, "a checkpointed container exits as if SIGTERM ended it: {status:?}");
    let last = ok(cri, "reading the log", cri.container_log(&id).map(|l| counter_values(&l)))
        .into_iter()
        .max()
        .expect("the counter logged values before it was stopped");

    let bundles = cri.bundles(&pod, "counter");
    let [bundle] = bundles.as_slice() else {
        panic!(
            "expected one bundle under {}/{}/{}/counter, found {bundles:?}; files under the checkpoint dir: {:?}\n\
             --- containerd log:\n{}",
            cri.checkpoint_dir.display(),
            pod.namespace,
            pod.name,
            files_under(&cri.checkpoint_dir),
            cri.log_tail(80)
        )
    };
    let time = bundle.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    assert!(
        time.len() >= 20 && time.as_bytes()[4] == b'-' && time.as_bytes()[10] == b'T' && time.ends_with('Z'),
        "bundle directory {time:?} is not an RFC 3339 UTC time"
    );
    for file in ["COMPLETE", "kybernate.json", "config.dump", "spec.dump", "rootfs-diff.tar", "stats-dump"] {
        assert!(bundle.join(file).is_file(), "{} is missing: {:?}", file, files_under(bundle));
    }
    assert!(bundle.join("checkpoint/inventory.img").is_file(), "no CRIU images: {:?}", files_under(bundle));
    let manifest = checkpoint_core::bundle::verify(bundle).unwrap_or_else(|e| panic!("bundle does not verify: {e}"));
    assert_eq!(manifest.container.name, "counter", "{manifest:?}");
    assert_eq!(manifest.container.id, id, "{manifest:?}");
    assert_eq!(manifest.container.pod.as_deref(), Some(pod.name.as_str()), "{manifest:?}");
    (pod, id, last, bundle.clone())
}

/// Waits until a restored or started counter logged something, and returns its values.
fn first_values(cri: &Cri, id: &str) -> Vec<u64> {
    ok(cri, "waiting for the new counter", cri.wait_counter_past(id, 0))
}

/// Flips one byte in the middle of the largest CRIU image of `bundle` (the memory pages).
fn corrupt_checkpoint_image(bundle: &Path) {
    let image = files_under(&bundle.join("checkpoint"))
        .into_iter()
        .max_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("the bundle has CRIU images");
    let mut file = fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
    let offset = file.metadata().unwrap().len() / 2;
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&[byte[0] ^ 0xff]).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn cri_pod_runs_with_kybernate_handler() {
    let cri = Cri::start().unwrap();
    let pod = ok(&cri, "RunPodSandbox", cri.run_pod("counter", &[]));
    let id = ok(&cri, "running the counter", counter_container(&cri, &pod, "counter", &[], "plain"));
    assert_eq!(ok(&cri, "ContainerStatus", cri.container_state(&id)), ContainerState::ContainerRunning);

    let values = ok(&cri, "waiting for the counter", cri.wait_counter_past(&id, 5));
    assert_eq!(values[..5], [1, 2, 3, 4, 5], "the counter logs 1, 2, 3, ... to stdout");
    let counter = cri.container_file(&id, "/state/counter");
    let in_file: u64 = fs::read_to_string(&counter).unwrap().trim().parse().unwrap();
    assert!(in_file >= 5, "the writable layer holds the counter: {} has {in_file}", counter.display());
    assert_eq!(fs::read_to_string(cri.container_file(&id, "/state/token")).unwrap().trim(), "plain");

    // sh is PID 1 of its pid namespace and ignores SIGTERM, so the grace period runs out and SIGKILL ends it.
    ok(&cri, "StopContainer", cri.stop_container(&id, Duration::from_secs(2)));
    let status = ok(&cri, "ContainerStatus", cri.container_status(&id));
    assert_eq!(status.state, ContainerState::ContainerExited as i32, "{status:?}");
    assert_eq!(status.exit_code, 137, "a container that did not opt in is killed as usual: {status:?}");
    assert_eq!(files_under(&cri.checkpoint_dir), Vec::<PathBuf>::new(), "no bundle without the opt-in");

    ok(&cri, "RemoveContainer", cri.remove_container(&id));
    ok(&cri, "removing the pod", cri.remove_pod(&pod));
    let shims = wait_for("the pod's shim to exit", Duration::from_secs(30), || {
        cri.containerd.shim_pids().is_empty().then_some(())
    });
    ok(&cri, "after RemovePodSandbox", shims);
}

#[test]
fn cri_stop_checkpoints_and_new_pod_restores() {
    let cri = Cri::start().unwrap();
    let (_, _, last, bundle) = checkpointed_counter(&cri, true, "from-source-pod");

    let pod = ok(&cri, "RunPodSandbox", cri.run_pod("counter-restored", &[]));
    let bundle_ref = bundle.display().to_string();
    let restore = [(RESTORE_FROM, bundle_ref.as_str())];
    let id = ok(&cri, "restoring the counter", counter_container(&cri, &pod, "counter", &restore, "fresh-start"));
    let values = first_values(&cri, &id);
    assert!(
        values[0] > last,
        "the restored counter continues above {last}, the last value logged before the stop; it logged {values:?}"
    );
    let token = fs::read_to_string(cri.container_file(&id, "/state/token")).unwrap();
    assert_eq!(token.trim(), "from-source-pod", "the writable layer of the checkpointed container came along");
    let more = ok(&cri, "the restored counter running on", cri.wait_counter_past(&id, values[0] + 5));
    assert_eq!(ok(&cri, "ContainerStatus", cri.container_state(&id)), ContainerState::ContainerRunning, "{more:?}");
    ok(&cri, "removing the restored pod", cri.remove_pod(&pod));
}

#[test]
fn cri_restore_of_corrupt_bundle_fails_clearly_or_falls_back() {
    let cri = Cri::start().unwrap();
    let (_, _, _, bundle) = checkpointed_counter(&cri, false, "from-source-pod");
    corrupt_checkpoint_image(&bundle);
    assert!(checkpoint_core::bundle::verify(&bundle).is_err(), "the corrupted bundle still verifies");
    let bundle_ref = bundle.display().to_string();

    // Default policy: CreateContainer or StartContainer fails, naming the bundle; nothing runs.
    let pod = ok(&cri, "RunPodSandbox", cri.run_pod("counter-corrupt", &[]));
    let restore = [(RESTORE_FROM, bundle_ref.as_str())];
    let mut created = None;
    let result = cri
        .create_container(&pod, "counter", &["sh", "-c", CRI_COUNTER_SCRIPT], &restore, &[("TOKEN", "fresh")])
        .and_then(|id| {
            created = Some(id.clone());
            cri.start_container(&id)
        });
    let error = format!("{:#}", result.expect_err("restoring a corrupt bundle must fail by default"));
    assert!(error.contains(&bundle_ref), "the error names the bundle {bundle_ref}: {error}");
    if let Some(id) = &created {
        let state = ok(&cri, "ContainerStatus", cri.container_state(id));
        assert_ne!(state, ContainerState::ContainerRunning, "the container runs after a failed restore: {error}");
    }
    ok(&cri, "removing the pod of the failed restore", cri.remove_pod(&pod));

    // fallback-fresh: the container starts from its image instead, and counts from 1.
    let pod = ok(&cri, "RunPodSandbox", cri.run_pod("counter-fallback", &[]));
    let fallback = [(RESTORE_FROM, bundle_ref.as_str()), (RESTORE_POLICY, "fallback-fresh")];
    let id = ok(&cri, "starting with fallback-fresh", counter_container(&cri, &pod, "counter", &fallback, "fresh"));
    let values = first_values(&cri, &id);
    assert_eq!(values[0], 1, "fallback-fresh starts the counter afresh: {values:?}");
    let token = fs::read_to_string(cri.container_file(&id, "/state/token")).unwrap();
    assert_eq!(token.trim(), "fresh", "a fresh start has a fresh writable layer");
    ok(&cri, "removing the fallback pod", cri.remove_pod(&pod));
}
