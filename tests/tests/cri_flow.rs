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

/// Runs an init container in `pod` as kubelet does before the others: it runs to completion (exit 0).
fn run_init(cri: &Cri, pod: &Pod) -> String {
    let id = ok(
        cri,
        "creating the init container",
        cri.create_container(pod, "init", &["sh", "-c", "echo init-ran"], &[], &[]),
    );
    ok(cri, "starting the init container", cri.start_container(&id));
    let status = wait_for("the init container to finish", Duration::from_secs(60), || {
        let status = cri.container_status(&id).ok()?;
        (status.state == ContainerState::ContainerExited as i32).then_some(status)
    });
    let status = ok(cri, "the init container", status);
    assert_eq!(status.exit_code, 0, "the init container fails: {status:?}");
    id
}

/// A pod opted in with a pod annotation only, as a Kubernetes user writes it: an init container, then
/// counters `names` (token `token-<name>`), counted past 10, then stopped as kubelet stops a pod (every
/// container's StopContainer at once, then the sandbox). Returns the pod's checkpoint directory and the
/// last value each counter logged.
fn checkpointed_pod(cri: &Cri, names: &[&str]) -> (PathBuf, Vec<u64>) {
    let pod = ok(cri, "RunPodSandbox", cri.run_pod("pod-src", &[(CHECKPOINT_ON_STOP, "true")]));
    run_init(cri, &pod);
    let ids: Vec<String> = names
        .iter()
        .map(|name| ok(cri, "running a counter", counter_container(cri, &pod, name, &[], &format!("token-{name}"))))
        .collect();
    for id in &ids {
        ok(cri, "waiting for the counter", cri.wait_counter_past(id, 10));
    }
    std::thread::scope(|s| {
        let stops: Vec<_> = ids.iter().map(|id| s.spawn(|| cri.stop_container(id, CHECKPOINT_GRACE))).collect();
        for stop in stops {
            ok(cri, "StopContainer", stop.join().unwrap());
        }
    });
    let mut last = Vec::new();
    for id in &ids {
        let status = ok(cri, "ContainerStatus", cri.container_status(id));
        assert_eq!(status.exit_code, 143, "a checkpointed container exits as if SIGTERM ended it: {status:?}");
        let values = counter_values(&ok(cri, "reading the log", cri.container_log(id)));
        last.push(values.into_iter().max().expect("the counter logged"));
    }
    ok(cri, "removing the source pod", cri.remove_pod(&pod));

    let dir = cri.checkpoint_dir.join(&pod.namespace).join(&pod.name);
    let mut covered: Vec<String> =
        fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    covered.sort();
    assert_eq!(covered, names, "one bundle per counter; none for the sandbox or the init container");
    let times: Vec<Vec<PathBuf>> = names.iter().map(|n| cri.bundles(&pod, n)).collect();
    assert!(times.iter().all(|t| t.len() == 1), "{times:?}");
    let names_of = |t: &Vec<PathBuf>| t[0].file_name().map(|n| n.to_owned());
    assert!(times.iter().all(|t| names_of(t) == names_of(&times[0])), "one pod checkpoint, one time: {times:?}");
    (dir, last)
}

/// Starts the counters `names` in `pod` and checks each continues from its checkpoint (`last`) with
/// its source's writable layer.
fn assert_counters_resume(cri: &Cri, pod: &Pod, names: &[&str], last: &[u64]) {
    for (name, last) in names.iter().zip(last) {
        let id = ok(cri, "restoring a counter", counter_container(cri, pod, name, &[], "fresh-start"));
        let values = first_values(cri, &id);
        assert!(values[0] > *last, "{name} continues above {last}, where it was checkpointed: {values:?}");
        let token = fs::read_to_string(cri.container_file(&id, "/state/token")).unwrap();
        assert_eq!(token.trim(), format!("token-{name}"), "{name}'s writable layer came along");
    }
}

#[test]
fn a_pod_annotation_restores_the_whole_pod_and_its_sandbox_starts_fresh() {
    let cri = Cri::start().unwrap();
    let (dir, last) = checkpointed_pod(&cri, &["a", "b"]);

    let reference = dir.display().to_string();
    let pod = ok(&cri, "RunPodSandbox of the restored pod", cri.run_pod("pod-dst", &[(RESTORE_FROM, &reference)]));
    // kubelet runs the init container again first; the pod checkpoint does not cover it, so it starts fresh
    run_init(&cri, &pod);
    assert_counters_resume(&cri, &pod, &["a", "b"], &last);
    ok(&cri, "removing the restored pod", cri.remove_pod(&pod));
}

#[test]
fn a_container_the_pod_checkpoint_does_not_cover_follows_the_restore_policy() {
    let cri = Cri::start().unwrap();
    let (dir, last) = checkpointed_pod(&cri, &["a"]);
    let reference = dir.display().to_string();

    // By default the uncovered container starts fresh; the covered one resumes.
    let pod = ok(&cri, "RunPodSandbox", cri.run_pod("pod-partial", &[(RESTORE_FROM, &reference)]));
    assert_counters_resume(&cri, &pod, &["a"], &last);
    let extra = ok(&cri, "the uncovered container", counter_container(&cri, &pod, "extra", &[], "extra"));
    assert_eq!(first_values(&cri, &extra)[0], 1, "a container the pod checkpoint does not cover starts fresh");
    ok(&cri, "removing the pod", cri.remove_pod(&pod));

    // restore-policy: fail refuses to start it fresh, and says why and what to do.
    let strict = [(RESTORE_FROM, reference.as_str()), (RESTORE_POLICY, "fail")];
    let pod = ok(&cri, "RunPodSandbox", cri.run_pod("pod-strict", &strict));
    let error = counter_container(&cri, &pod, "extra", &[], "extra").expect_err("an uncovered container must fail");
    let error = format!("{error:#}");
    assert!(
        error.contains("holds bundles of a only") && error.contains("kybernate.io/restore-from.extra: none"),
        "{error}"
    );
    ok(&cri, "removing the pod", cri.remove_pod(&pod));

    // ... unless its own restore-from says none.
    let opt_out =
        [(RESTORE_FROM, reference.as_str()), (RESTORE_POLICY, "fail"), ("kybernate.io/restore-from.extra", "none")];
    let pod = ok(&cri, "RunPodSandbox", cri.run_pod("pod-opt-out", &opt_out));
    let extra = ok(&cri, "the opted-out container", counter_container(&cri, &pod, "extra", &[], "extra"));
    assert_eq!(first_values(&cri, &extra)[0], 1);
    assert_counters_resume(&cri, &pod, &["a"], &last);
    ok(&cri, "removing the pod", cri.remove_pod(&pod));
}

/// Ships every bundle of the pod checkpoint `dir` to `store` with `kybernate-sidecar push --force`
/// (the sidecar records a bundle as shipped once, whatever the store).
fn push_pod(cri: &Cri, dir: &Path, store: &str, env: &[(&str, String)]) {
    for container in fs::read_dir(dir).unwrap().flatten() {
        for bundle in fs::read_dir(container.path()).unwrap().flatten() {
            let out = std::process::Command::new(&cri.sidecar)
                .arg("--checkpoint-dir")
                .arg(&cri.checkpoint_dir)
                .args(["--store", store, "push", "--force"])
                .arg(bundle.path())
                .envs(env.iter().map(|(k, v)| (k, v)))
                .output()
                .unwrap();
            assert!(out.status.success(), "push {}: {}", bundle.path().display(), String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn a_pod_checkpoint_restores_from_the_filesystem_store_and_from_s3() {
    let cri = Cri::start().unwrap();
    let (dir, last) = checkpointed_pod(&cri, &["a", "b"]);
    let rel = dir.strip_prefix(&cri.checkpoint_dir).unwrap().to_path_buf();
    // a filesystem store inside the node's restore roots (the instance's directory)
    let store = cri.containerd.dir.path().join("store");
    push_pod(&cri, &dir, &format!("file://{}", store.display()), &[]);
    let s3 = kybernate_tests::s3::S3Server::start();
    push_pod(&cri, &dir, &format!("s3://{}", kybernate_tests::s3::BUCKET), &s3.sidecar_env());
    fs::remove_dir_all(&dir).unwrap();
    ok(&cri, "the shim's sidecar reaches the S3 server", cri.set_sidecar_env(&s3.sidecar_env()));

    let from_store = store.join(&rel).display().to_string();
    let from_s3 = format!("s3://{}/{}", kybernate_tests::s3::BUCKET, rel.display());
    for reference in [from_store, from_s3] {
        let pod = ok(&cri, "RunPodSandbox", cri.run_pod("pod-remote", &[(RESTORE_FROM, &reference)]));
        run_init(&cri, &pod);
        assert_counters_resume(&cri, &pod, &["a", "b"], &last);
        ok(&cri, "removing the pod", cri.remove_pod(&pod));
    }
}
