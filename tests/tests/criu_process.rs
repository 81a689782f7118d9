//! checkpoint-core against real CRIU: a live process tree is checkpointed, killed and restored with
//! its memory and counter intact, and every failure path leaves the workload running.

use std::path::{Path, PathBuf};
use std::process::Command;

use checkpoint_core::{checkpoint_process, restore_process, CheckpointOptions, Criu, Error, RestoreOptions};
use kybernate_tests::{alive, become_subreaper, kill_and_reap, spawn_workload, WorkloadState};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_kybernate-test-workload");

struct Running {
    pid: i32,
    state: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        kill_and_reap(self.pid);
    }
}

fn start(dir: &Path, mem_mib: u32) -> Running {
    become_subreaper();
    let state = dir.join("state");
    let pid = spawn_workload(Path::new(WORKLOAD), &state, mem_mib).unwrap();
    WorkloadState::wait_past(&state, 3).unwrap();
    Running { pid, state }
}

#[test]
fn probe_reports_a_supported_criu() {
    let info = Criu::from_path().probe().expect("criu probe (run `make deps`)");
    assert!(info.version.major >= 4, "{info:?}");
}

#[test]
fn process_is_checkpointed_killed_and_restored_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let w = start(dir.path(), 64);
    let criu = Criu::from_path();
    let images = dir.path().join("images");
    let opts = CheckpointOptions::default();

    let report = checkpoint_process(&criu, w.pid, &images, &opts).unwrap();
    // Without leave-running CRIU kills the tree once the image is safe.
    kill_and_reap(w.pid);
    let frozen = WorkloadState::read(&w.state).unwrap();
    assert!(report.pages_written * 4096 >= 64 << 20, "64 MiB of pattern must be in the image: {report:?}");
    assert!(report.image_bytes >= report.memory_bytes && report.timings.total >= report.timings.frozen);
    assert!(report.log.is_file());

    let restored = restore_process(&criu, &images, &RestoreOptions::matching(&opts)).unwrap();
    assert_eq!(restored.pid, w.pid, "CRIU restores the original pid");
    let after = WorkloadState::wait_past(&w.state, frozen.counter).unwrap();
    assert_eq!(after.checksum, frozen.checksum);
    assert!(after.mem_ok, "memory pattern survived: {after:?}");
    assert!(
        after.counter > frozen.counter && after.counter < frozen.counter + 100,
        "counter continued: {frozen:?} -> {after:?}"
    );
    assert!(restored.pages_restored > 0 || restored.timings.total > std::time::Duration::ZERO);
    kill_and_reap(restored.pid);
}

#[test]
fn leave_running_keeps_the_process_alive() {
    let dir = tempfile::tempdir().unwrap();
    let w = start(dir.path(), 8);
    let opts = CheckpointOptions { leave_running: true, ..Default::default() };
    let report = checkpoint_process(&Criu::from_path(), w.pid, &dir.path().join("images"), &opts).unwrap();
    assert!(alive(w.pid));
    let before = WorkloadState::read(&w.state).unwrap();
    let after = WorkloadState::wait_past(&w.state, before.counter + 2).unwrap();
    assert!(after.mem_ok && report.pages_written > 0);
}

#[test]
fn pre_dump_is_used_or_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let w = start(dir.path(), 8);
    let criu = Criu::from_path();
    let opts = CheckpointOptions { pre_dump: true, leave_running: true, ..Default::default() };
    let result = checkpoint_process(&criu, w.pid, &dir.path().join("images"), &opts);
    if criu.probe().unwrap().pre_dump_supported {
        let report = result.unwrap();
        assert!(dir.path().join("images").join(checkpoint_core::process::PRE_DUMP_DIR).join("inventory.img").is_file());
        assert!(report.pages_written > 0);
    } else {
        let err = result.unwrap_err().to_string();
        assert!(err.contains("pre-dump needs dirty-page tracking"), "{err}");
    }
    assert!(alive(w.pid));
}

#[test]
fn missing_criu_binary_is_a_clear_error_and_the_workload_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let w = start(dir.path(), 1);
    let err = checkpoint_process(&Criu::new("/opt/nowhere/criu"), w.pid, &dir.path().join("i"), &Default::default())
        .unwrap_err();
    assert!(matches!(err, Error::CriuMissing { .. }), "{err}");
    assert!(err.to_string().contains("/opt/nowhere/criu") && err.to_string().contains("make deps"));
    assert!(alive(w.pid));
}

#[test]
fn unwritable_image_dir_is_refused_before_the_workload_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let w = start(dir.path(), 1);
    let ro = dir.path().join("readonly");
    std::fs::create_dir(&ro).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"]).arg(&ro).status().unwrap();
    assert!(mounted.success(), "mounting a read-only tmpfs (tests run as root)");
    let err = checkpoint_process(&Criu::from_path(), w.pid, &ro.join("images"), &Default::default()).unwrap_err();
    Command::new("umount").arg(&ro).status().unwrap();
    assert!(matches!(err, Error::Directory { .. }), "{err}");
    assert!(err.to_string().contains("choose a writable location"), "{err}");
    let before = WorkloadState::read(&w.state).unwrap();
    WorkloadState::wait_past(&w.state, before.counter).unwrap();
}

#[test]
fn dumping_a_pid_that_does_not_exist_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = checkpoint_process(&Criu::from_path(), i32::MAX - 7, &dir.path().join("images"), &Default::default())
        .unwrap_err();
    assert!(matches!(err, Error::NoSuchProcess { .. }) && err.to_string().contains("no process with pid"), "{err}");
    assert!(!dir.path().join("images").exists(), "nothing is created for a failed precondition");
}

#[test]
fn criu_failure_carries_its_log_and_leaves_the_workload_running() {
    let dir = tempfile::tempdir().unwrap();
    become_subreaper();
    let state = dir.path().join("state");
    // Not a session leader and sharing our session: CRIU refuses such a tree without --shell-job.
    let mut child = Command::new(WORKLOAD).arg(&state).arg("1").spawn().unwrap();
    let pid = child.id() as i32;
    WorkloadState::wait_past(&state, 2).unwrap();
    let err = checkpoint_process(&Criu::from_path(), pid, &dir.path().join("images"), &Default::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Criu { action: "dump", .. }), "{text}");
    assert!(text.contains("Error (") && text.contains("is still running"), "{text}");
    assert!(dir.path().join("images/dump.log").is_file(), "the log is kept for inspection");
    let before = WorkloadState::read(&state).unwrap();
    WorkloadState::wait_past(&state, before.counter).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn truncated_image_fails_to_restore_cleanly_and_the_intact_copy_still_restores() {
    let dir = tempfile::tempdir().unwrap();
    let w = start(dir.path(), 8);
    let criu = Criu::from_path();
    let images = dir.path().join("images");
    checkpoint_process(&criu, w.pid, &images, &Default::default()).unwrap();
    kill_and_reap(w.pid);
    let frozen = WorkloadState::read(&w.state).unwrap();

    let broken = dir.path().join("broken");
    let status = Command::new("cp").arg("-a").arg(&images).arg(&broken).status().unwrap();
    assert!(status.success());
    let pages = std::fs::read_dir(&broken)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages-"));
    let pages = pages.expect("a pages image");
    let len = std::fs::metadata(&pages).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&pages).unwrap().set_len(len / 2).unwrap();

    // The size manifest written at checkpoint time catches the damage before CRIU runs.
    let err = restore_process(&criu, &broken, &Default::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::BadImage { .. }), "{text}");
    assert!(
        text.contains("truncated or corrupt") && text.contains(&*pages.file_name().unwrap().to_string_lossy()),
        "{text}"
    );
    assert!(!alive(w.pid));

    // Without the manifest (images from another tool), CRIU 4.1 would spin forever on the short
    // pages file: the restore deadline stops it and removes the half-restored tree.
    std::fs::remove_file(broken.join(checkpoint_core::criu::image::IMAGE_MANIFEST)).unwrap();
    let opts = RestoreOptions { timeout: Some(std::time::Duration::from_secs(5)), ..Default::default() };
    let err = restore_process(&criu, &broken, &opts).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Criu { action: "restore", .. }), "{text}");
    assert!(text.contains("was not restored") && text.contains("restore.log"), "{text}");
    kybernate_tests::wait_for("the half-restored tree to be gone", std::time::Duration::from_secs(10), || {
        kybernate_tests::reap_if_exited(w.pid);
        (!alive(w.pid)).then_some(())
    })
    .unwrap();

    let not_an_image = restore_process(&criu, dir.path(), &Default::default()).unwrap_err();
    assert!(not_an_image.to_string().contains("inventory.img is missing"), "{not_an_image}");

    let restored = restore_process(&criu, &images, &Default::default()).unwrap();
    let after = WorkloadState::wait_past(&w.state, frozen.counter).unwrap();
    assert!(after.mem_ok && after.checksum == frozen.checksum);
    kill_and_reap(restored.pid);
}
