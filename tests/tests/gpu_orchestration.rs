//! GPU-aware checkpoint ordering and rollback, with a fake CUDA driver (no GPU on CI) around real CRIU
//! dumps and restores of a real process.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use checkpoint_core::gpu::{
    checkpoint_gpu_process, restore_gpu_process, CudaCheckpointDriver, CudaProcessState, DriverApi, GpuStep,
};
use checkpoint_core::{CheckpointOptions, Criu, Error, RestoreOptions};
use kybernate_tests::gpu_fakes::FakeDriver;
use kybernate_tests::{alive, become_subreaper, kill_and_reap, spawn_workload, WorkloadState};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_kybernate-test-workload");

const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// A fake driver that checks every lock is bounded by [`LOCK_TIMEOUT`].
fn fake_driver() -> FakeDriver {
    FakeDriver::default().expecting_lock_timeout(LOCK_TIMEOUT)
}

fn start(dir: &Path) -> (i32, std::path::PathBuf) {
    become_subreaper();
    let state = dir.join("state");
    let pid = spawn_workload(Path::new(WORKLOAD), &state, 4).unwrap();
    WorkloadState::wait_past(&state, 2).unwrap();
    (pid, state)
}

#[test]
fn checkpoint_and_restore_run_the_gpu_steps_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (pid, state) = start(dir.path());
    let driver = fake_driver();
    let criu = Criu::from_path();
    let images = dir.path().join("images");
    checkpoint_gpu_process(&driver, &criu, pid, &[pid], &images, &CheckpointOptions::default(), LOCK_TIMEOUT).unwrap();
    assert_eq!(driver.calls(), [format!("lock {pid}"), format!("checkpoint {pid}")]);
    kill_and_reap(pid);
    let frozen = WorkloadState::read(&state).unwrap();

    let restored = restore_gpu_process(&driver, &criu, &images, &RestoreOptions::default(), &[]).unwrap();
    assert_eq!(driver.calls()[2..], [format!("restore {pid}"), format!("unlock {pid}")]);
    let after = WorkloadState::wait_past(&state, frozen.counter).unwrap();
    assert!(after.mem_ok);
    kill_and_reap(restored.pid);
}

#[test]
fn leave_running_restores_and_unlocks_after_the_dump() {
    let dir = tempfile::tempdir().unwrap();
    let (pid, _state) = start(dir.path());
    let driver = fake_driver();
    let opts = CheckpointOptions { leave_running: true, ..Default::default() };
    checkpoint_gpu_process(&driver, &Criu::from_path(), pid, &[pid], &dir.path().join("i"), &opts, LOCK_TIMEOUT)
        .unwrap();
    let want: Vec<String> =
        ["lock", "checkpoint", "restore", "unlock"].iter().map(|op| format!("{op} {pid}")).collect();
    assert_eq!(driver.calls(), want);
    assert!(alive(pid));
    kill_and_reap(pid);
}

#[test]
fn every_failure_rolls_back_and_the_process_keeps_running() {
    for (fail, step, rollback) in [("lock", GpuStep::Lock, vec![]), ("checkpoint", GpuStep::Checkpoint, vec!["unlock"])]
    {
        let dir = tempfile::tempdir().unwrap();
        let (pid, state) = start(dir.path());
        let driver = fake_driver().failing(fail);
        let err = checkpoint_gpu_process(
            &driver,
            &Criu::from_path(),
            pid,
            &[pid],
            &dir.path().join("i"),
            &CheckpointOptions::default(),
            LOCK_TIMEOUT,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Gpu { step: s, .. } if s == step), "{err}");
        assert!(err.to_string().contains("injected failure"), "{err}");
        let tail: Vec<String> = driver.calls().into_iter().skip_while(|c| !c.starts_with(fail)).skip(1).collect();
        assert_eq!(tail, rollback.iter().map(|op| format!("{op} {pid}")).collect::<Vec<_>>(), "after {fail}");
        let before = WorkloadState::read(&state).unwrap();
        WorkloadState::wait_past(&state, before.counter).unwrap();
        kill_and_reap(pid);
    }
}

#[test]
fn criu_failure_after_the_gpu_checkpoint_restores_gpu_state() {
    let dir = tempfile::tempdir().unwrap();
    become_subreaper();
    let state = dir.path().join("state");
    // Shares our session: CRIU refuses to dump it, after the GPU was already checkpointed.
    let mut child = Command::new(WORKLOAD).arg(&state).arg("1").spawn().unwrap();
    let pid = child.id() as i32;
    WorkloadState::wait_past(&state, 2).unwrap();
    let driver = fake_driver();
    let err = checkpoint_gpu_process(
        &driver,
        &Criu::from_path(),
        pid,
        &[pid],
        &dir.path().join("i"),
        &CheckpointOptions::default(),
        LOCK_TIMEOUT,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Gpu { step: GpuStep::Criu, .. }), "{err}");
    assert!(err.to_string().contains("restored GPU state of") && err.to_string().contains("unlocked"), "{err}");
    let want: Vec<String> =
        ["lock", "checkpoint", "restore", "unlock"].iter().map(|op| format!("{op} {pid}")).collect();
    assert_eq!(driver.calls(), want);
    assert!(alive(pid));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn failed_gpu_restore_kills_the_restored_tree_and_keeps_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let (pid, _state) = start(dir.path());
    let criu = Criu::from_path();
    let images = dir.path().join("images");
    let driver = fake_driver().failing("restore");
    checkpoint_gpu_process(&driver, &criu, pid, &[pid], &images, &CheckpointOptions::default(), LOCK_TIMEOUT).unwrap();
    kill_and_reap(pid);
    let err = restore_gpu_process(&driver, &criu, &images, &RestoreOptions::default(), &[]).unwrap_err();
    assert!(matches!(err, Error::Gpu { step: GpuStep::Restore, .. }), "{err}");
    assert!(err.to_string().contains("killed the restored tree"), "{err}");
    kill_and_reap(pid);
    assert!(!alive(pid));
    assert!(images.join("inventory.img").is_file(), "the images stay for another try");
}

#[test]
fn driver_api_opens_on_a_gpu_node_or_says_why_not() {
    match DriverApi::open() {
        Ok(api) => {
            // A GPU node: our own process holds no CUDA context, so the driver reports an error or Running.
            let _ = api.state(std::process::id() as i32);
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("is the NVIDIA driver installed?") || text.contains("needs driver 570"),
                "unexpected: {text}"
            );
            eprintln!("no GPU here, skipping the real driver path: {text}");
        }
    }
    assert_eq!(CudaProcessState::from_raw(2), CudaProcessState::Checkpointed);
    assert_eq!(CudaProcessState::from_raw(42), CudaProcessState::Unknown(42));
}
