//! GPU-aware checkpoints of real runc containers with real runc and CRIU, and a recording fake CUDA
//! driver and GPU inventory (no GPU on CI). The inventory reports the container's init process as a
//! GPU process, so `checkpoint_container_bundle` must lock and checkpoint it around the dump and record
//! the manifest's GPU section, or roll every step back with the container still running and the
//! bundle marked FAILED. The restore side checks the node's GPUs before anything is created, then
//! restores and unlocks the restored process, and removes the container when that fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use checkpoint_core::bundle::{
    self, BundleLayout, ContainerIdentity, Durability, GpuProcess, COMPLETE_MARKER, FAILED_MARKER,
};
use checkpoint_core::gpu::{ComputeProcess, CudaProcessState, GpuBackend, GpuContext, GpuInfo, GpuMatch, GpuStep};
use checkpoint_core::{
    checkpoint_container_bundle, open_container_bundle, restore_container_bundle, CheckpointOptions,
    ContainerCheckpoint, Criu, Error, OpenOptions, RestorableBundle, RestoreTarget, Runc,
};
use kybernate_tests::gpu_fakes::{fake_gpu, CallLog, FakeDriver, FakeInventory, GIB};
use kybernate_tests::{
    busybox_bundle, read_counter, reap_if_exited, wait_counter_past, wait_for, RuncContainer, COUNTER_SCRIPT,
};

const H100: &str = "NVIDIA H100 80GB HBM3";
const UUID_A: &str = "GPU-aaaaaaaa-0000-0000-0000-000000000000";
const UUID_B: &str = "GPU-bbbbbbbb-0000-0000-0000-000000000000";
const DRIVER: &str = "580.95.05";
const LOCK_TIMEOUT: Duration = Duration::from_secs(7);

/// A fake driver (every lock bounded by [`LOCK_TIMEOUT`]) whose processes start in `state`, failing
/// `fail`; and its call log.
fn fake_driver(fail: Option<&'static str>, state: CudaProcessState) -> (FakeDriver, CallLog) {
    let fake = FakeDriver::default().in_state(state).expecting_lock_timeout(LOCK_TIMEOUT);
    let fake = match fail {
        Some(op) => fake.failing(op),
        None => fake,
    };
    let log = fake.log();
    (fake, log)
}

/// GPU 0 of a node, `name` with `uuid`: compute capability 9.0, 80 GiB with 70 free.
fn gpu(uuid: &str, name: &str) -> GpuInfo {
    fake_gpu(0, uuid, name, "9.0", 70)
}

/// A node running [`DRIVER`] with `gpus`, nothing on them.
fn inventory(gpus: Vec<GpuInfo>) -> FakeInventory {
    FakeInventory { driver: DRIVER.into(), gpus, ..Default::default() }
}

/// One H100 on which `pid` holds 1 GiB.
fn node_running(pid: i32) -> FakeInventory {
    let mut node = inventory(vec![gpu(UUID_A, H100)]);
    node.processes.insert(0, vec![ComputeProcess { pid, used_memory: Some(GIB) }]);
    node
}

fn context(backend: GpuBackend, inventory: FakeInventory) -> Arc<GpuContext> {
    Arc::new(GpuContext { backend, inventory: Box::new(inventory), lock_timeout: LOCK_TIMEOUT })
}

fn driver(driver: FakeDriver) -> GpuBackend {
    GpuBackend::Driver { driver: Box::new(driver), criu_plugin: None }
}

/// Runs the counter container `id` (stdout on `stdout` when given) and waits for it to count.
fn start(dir: &Path, id: &str, stdout: Option<std::fs::File>) -> (Runc, RuncContainer) {
    let root = dir.join("runc-root");
    let bundle = busybox_bundle(&dir.join("bundle"), &["/bin/sh", "-c", COUNTER_SCRIPT]).unwrap();
    let container = RuncContainer::run_with_stdout(&root, id, &bundle, stdout).unwrap();
    wait_counter_past(&bundle, 3).unwrap();
    (Runc::new("runc", Some(root)), container)
}

fn request(container: &RuncContainer, gpu: Arc<GpuContext>) -> ContainerCheckpoint {
    ContainerCheckpoint {
        id: container.id.clone(),
        spec: container.bundle.join("config.json"),
        upperdir: None,
        identity: ContainerIdentity {
            namespace: "kybernate-tests".into(),
            name: container.id.clone(),
            id: container.id.clone(),
            ..Default::default()
        },
        runtime: "kybernate-tests".into(),
        gpu: Some(gpu),
        layout: BundleLayout::Archive,
        durability: Durability::Synced,
        signer: Some(kybernate_tests::keys::node_key()),
        restored_at: None,
    }
}

/// Checkpoint options with a work directory of their own (outside the bundle) under `dir`.
fn options(dir: &Path, name: &str, leave_running: bool) -> CheckpointOptions {
    CheckpointOptions { leave_running, work_dir: Some(dir.join(format!("work-{name}"))), ..Default::default() }
}

fn ops(pid: i32, ops: &[&str]) -> Vec<String> {
    ops.iter().map(|op| format!("{op} {pid}")).collect()
}

/// The container is running and still counting.
fn assert_running(container: &RuncContainer) {
    assert_eq!(container.status().as_deref(), Some("running"));
    let seen = read_counter(&container.bundle).unwrap();
    wait_counter_past(&container.bundle, seen + 1).unwrap();
}

/// The bundle was abandoned: marked FAILED, never COMPLETE.
fn assert_abandoned(bundle_dir: &Path) {
    assert!(bundle_dir.join(FAILED_MARKER).is_file(), "{} is not marked FAILED", bundle_dir.display());
    assert!(!bundle_dir.join(COMPLETE_MARKER).exists());
}

/// Checkpoints the container (without leave-running) with the fake driver; returns the bundle
/// directory and the counter value it stopped at. The container is gone afterwards.
fn checkpoint_gpu_container(dir: &Path, runc: &Runc, container: &RuncContainer) -> (PathBuf, u64) {
    let (fake, log) = fake_driver(None, CudaProcessState::Running);
    let out = dir.join("checkpoint-bundle");
    let ctx = context(driver(fake), node_running(container.pid));
    let report = checkpoint_container_bundle(
        runc,
        &Criu::from_path(),
        &out,
        &request(container, ctx),
        &options(dir, "dump", false),
    )
    .unwrap();
    assert_eq!(log.calls(), ops(container.pid, &["lock", "checkpoint"]), "GPU steps before the dump");
    let gpu = report.manifest.gpu.clone().expect("the manifest has a GPU section");
    assert_eq!(gpu.backend, "fake");
    assert_eq!(gpu.driver_version.as_deref(), Some(DRIVER));
    assert_eq!(gpu.devices.iter().map(|d| d.uuid.as_str()).collect::<Vec<_>>(), [UUID_A]);
    assert_eq!(
        gpu.processes,
        [GpuProcess { pid: container.pid, gpu_uuid: Some(UUID_A.into()), memory_bytes: Some(GIB), ns_pid: Some(1) }],
        "the init process, pid 1 inside the container"
    );
    assert_eq!(bundle::verify(&out).unwrap().gpu, Some(gpu), "the sealed manifest carries the section");
    assert!(matches!(container.status().as_deref(), None | Some("stopped")), "{:?}", container.status());
    let stopped_at = read_counter(&container.bundle).unwrap();
    container.delete();
    (out, stopped_at)
}

/// Opens the bundle `out` for a restore on a node whose GPUs are `ctx`'s.
fn open(out: &Path, ctx: Arc<GpuContext>) -> checkpoint_core::Result<RestorableBundle> {
    let gpu = move || Ok(Arc::clone(&ctx));
    let trust = kybernate_tests::keys::trusted();
    let opts = OpenOptions {
        accept_unsealed: false,
        accept_partial: false,
        lazy: false,
        hold: false,
        gpu: &gpu,
        gpu_match: GpuMatch::default(),
        trust: &trust,
        tenant: None,
    };
    open_container_bundle(out, &Criu::from_path(), &opts)
}

/// The checkpointed container restored under its own id and bundle.
fn target(dir: &Path, container: &RuncContainer) -> RestoreTarget {
    RestoreTarget {
        id: container.id.clone(),
        bundle: container.bundle.clone(),
        work_dir: Some(dir.join("restore-work")),
        timeout: None,
        pid_file: None,
        console_socket: None,
        no_pivot: false,
        gate_program: None,
    }
}

#[test]
fn gpu_container_is_checkpointed_with_its_gpu_state_and_restored_onto_another_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "gpu-ck", None);
    let (out, stopped_at) = checkpoint_gpu_container(dir.path(), &runc, &container);

    // Restore on a node whose H100 has another UUID: the state moves there.
    let (fake, log) = fake_driver(None, CudaProcessState::Checkpointed);
    let node = inventory(vec![gpu(UUID_B, H100)]);
    let opened = open(&out, context(driver(fake), node)).unwrap();
    let plan = opened.gpu.as_ref().expect("a GPU restore plan");
    assert_eq!(plan.mapping().assignments.len(), 1);
    assert_eq!(
        (plan.mapping().assignments[0].old_uuid.as_str(), plan.mapping().assignments[0].new_uuid.as_str()),
        (UUID_A, UUID_B)
    );

    assert!(log.calls().is_empty(), "no GPU step before the restore");
    let criu = Criu::from_path();
    let report = restore_container_bundle(&runc, &criu, &opened, &target(dir.path(), &container), Default::default())
        .unwrap()
        .report;
    let restored = RuncContainer::adopt(runc.root().unwrap(), &container.id, &container.bundle, report.pid);
    // the GPU steps ran on the restored process, after runc restore gave it its pid
    assert_eq!(log.calls(), [format!("restore {} moving 1", report.pid), format!("unlock {}", report.pid)]);
    assert_eq!(restored.status().as_deref(), Some("running"));
    let after = wait_counter_past(&container.bundle, stopped_at).unwrap();
    assert!(after < stopped_at + 50, "the counter continued from {stopped_at} rather than restarting: {after}");
}

#[test]
fn gpu_restore_is_checked_before_anything_is_created_and_its_failure_removes_the_container() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "gpu-rs", None);
    let (out, _) = checkpoint_gpu_container(dir.path(), &runc, &container);

    // Another driver and another GPU model: refused with every difference, nothing created.
    let (fake, log) = fake_driver(None, CudaProcessState::Checkpointed);
    let other = FakeInventory { driver: "550.54.15".into(), ..inventory(vec![gpu(UUID_B, "NVIDIA A100-SXM4-80GB")]) };
    let err = open(&out, context(driver(fake), other)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Gpu { step: GpuStep::Compatibility, .. }), "{text}");
    assert!(text.contains("driver 580.95.05, this node runs 550.54.15"), "{text}");
    assert!(text.contains(&format!("GPU {UUID_A} ({H100}")) && text.contains("A100"), "{text}");
    assert!(log.calls().is_empty());
    assert_eq!(runc.state(&container.id).unwrap(), None, "nothing was created");

    // GPU checkpointing off here: refused before the restore too.
    let off = GpuBackend::Off { reason: "switched off".into() };
    let err = open(&out, context(off, node_running(0))).unwrap_err();
    assert!(matches!(err, Error::Gpu { step: GpuStep::Backend, .. }), "{err}");
    assert!(err.to_string().contains("GPU checkpointing is unavailable here (switched off)"), "{err}");

    // The checks pass, but the driver cannot restore: the restored container is removed, the bundle kept.
    let (fake, log) = fake_driver(Some("restore"), CudaProcessState::Checkpointed);
    let opened = open(&out, context(driver(fake), node_running(0))).unwrap();
    assert!(opened.gpu.as_ref().unwrap().mapping().gpu_pairs().is_empty(), "same GPU: nothing moves");
    let criu = Criu::from_path();
    let err = restore_container_bundle(&runc, &criu, &opened, &target(dir.path(), &container), Default::default())
        .unwrap_err();
    let text = err.to_string();
    let restored_pid: i32 =
        log.calls()[0].strip_prefix("restore ").and_then(|p| p.parse().ok()).expect("a restore call");
    assert!(matches!(err, Error::Gpu { step: GpuStep::Restore, .. }), "{text}");
    assert!(
        text.contains("injected failure")
            && text.contains("the restored container gpu-rs was taken down (runc delete --force removed it)"),
        "{text}"
    );
    assert_eq!(log.calls(), [format!("restore {restored_pid}")]);
    assert_eq!(runc.state(&container.id).unwrap(), None, "the restored container is gone");
    wait_for("the restored init process to end", Duration::from_secs(10), || {
        reap_if_exited(restored_pid);
        (!kybernate_tests::alive(restored_pid)).then_some(())
    })
    .unwrap();
    bundle::verify(&out).expect("the bundle is untouched for another try");
}

#[test]
fn criu_failure_after_the_gpu_checkpoint_rolls_back_and_the_container_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    // A host file on the container's stdout lies outside its mounts: CRIU fails half-way through the
    // dump, after the GPU state was checkpointed.
    let host_file = std::fs::File::create(dir.path().join("stdout.log")).unwrap();
    let (runc, container) = start(dir.path(), "gpu-criu", Some(host_file));
    let (fake, log) = fake_driver(None, CudaProcessState::Running);
    let out = dir.path().join("checkpoint-bundle");
    let ctx = context(driver(fake), node_running(container.pid));
    let err = checkpoint_container_bundle(
        &runc,
        &Criu::from_path(),
        &out,
        &request(&container, ctx),
        &options(dir.path(), "dump", false),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Gpu { step: GpuStep::Criu, .. }), "{text}");
    assert!(text.contains("Can't lookup mount"), "CRIU's reason is kept: {text}");
    let pid = container.pid;
    assert!(text.contains(&format!("restored GPU state of {pid}, unlocked {pid}")), "{text}");
    assert_eq!(log.calls(), ops(pid, &["lock", "checkpoint", "restore", "unlock"]));
    assert_running(&container);
    assert_abandoned(&out);
}

#[test]
fn a_failure_at_every_gpu_step_leaves_the_container_running_and_the_bundle_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "gpu-steps", None);
    let pid = container.pid;
    // The GPU steps after the dump only run with leave-running.
    let cases = [
        ("lock", false, GpuStep::Lock, vec!["lock"]),
        ("checkpoint", false, GpuStep::Checkpoint, vec!["lock", "checkpoint", "unlock"]),
        ("restore", true, GpuStep::Restore, vec!["lock", "checkpoint", "restore", "unlock"]),
        ("unlock", true, GpuStep::Unlock, vec!["lock", "checkpoint", "restore", "unlock"]),
    ];
    for (fail, leave_running, step, want) in cases {
        let (fake, log) = fake_driver(Some(fail), CudaProcessState::Running);
        let out = dir.path().join(format!("bundle-{fail}"));
        let ctx = context(driver(fake), node_running(pid));
        let err = checkpoint_container_bundle(
            &runc,
            &Criu::from_path(),
            &out,
            &request(&container, ctx),
            &options(dir.path(), fail, leave_running),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Gpu { step: s, .. } if s == step), "{fail}: {err}");
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(log.calls(), ops(pid, &want), "after a failed {fail}");
        assert_running(&container);
        assert_abandoned(&out);
    }
}

#[test]
fn the_gpu_steps_are_skipped_without_gpu_processes_or_with_criu_plugin_and_refused_when_off() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "gpu-skip", None);
    let criu = Criu::from_path();
    let pid = container.pid;

    // No process of the container on a GPU (another container's is): a plain checkpoint.
    let (fake, log) = fake_driver(None, CudaProcessState::Running);
    let out = dir.path().join("bundle-cpu");
    let ctx = context(driver(fake), node_running(i32::MAX));
    let report =
        checkpoint_container_bundle(&runc, &criu, &out, &request(&container, ctx), &options(dir.path(), "cpu", true))
            .unwrap();
    assert!(log.calls().is_empty());
    assert_eq!(report.manifest.gpu, None);
    assert!(bundle::is_complete(&out));
    assert_running(&container);

    // CRIU's CUDA plugin does the GPU steps inside the dump: Kybernate runs none, but records the GPUs.
    let plugin = GpuBackend::CriuPlugin { plugin: "/usr/lib/criu/cuda_plugin.so".into() };
    let out = dir.path().join("bundle-plugin");
    let ctx = context(plugin, node_running(pid));
    let report = checkpoint_container_bundle(
        &runc,
        &criu,
        &out,
        &request(&container, ctx),
        &options(dir.path(), "plugin", true),
    )
    .unwrap();
    let gpu = report.manifest.gpu.expect("a GPU section");
    assert_eq!(gpu.backend, "criu-plugin");
    assert_eq!(gpu.processes.iter().map(|p| (p.pid, p.ns_pid)).collect::<Vec<_>>(), [(pid, Some(1))]);
    assert_running(&container);

    // GPU checkpointing off: a container on a GPU is refused before anything changes.
    let off = GpuBackend::Off { reason: "switched off".into() };
    let out = dir.path().join("bundle-off");
    let ctx = context(off, node_running(pid));
    let err =
        checkpoint_container_bundle(&runc, &criu, &out, &request(&container, ctx), &options(dir.path(), "off", false))
            .unwrap_err();
    assert!(matches!(err, Error::Gpu { step: GpuStep::Backend, .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("processes [{pid}] use a GPU but GPU checkpointing is unavailable (switched off)")),
        "{err}"
    );
    assert!(!dir.path().join("work-off").join("dump.log").exists(), "CRIU never ran");
    assert_running(&container);
    assert_abandoned(&out);
}
