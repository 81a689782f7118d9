//! Checkpoint on stop and restore on create through `ctr` and a private containerd: an opted-in
//! container is checkpointed into the node checkpoint directory when `ctr t kill` sends it SIGTERM,
//! and a new container naming that bundle in `kybernate.io/restore-from` continues its counter.
//! Containers that did not opt in stop exactly as before; a checkpoint over budget is abandoned and
//! the container stops normally; a corrupt bundle is refused clearly, or skipped with
//! `fallback-fresh`; two containers stopping at once each get their own bundle.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use checkpoint_core::bundle::{self, COMPLETE_MARKER, FAILED_MARKER};
use common::*;
use kybernate_tests::{read_counter, wait_for, Containerd, COUNTER_SCRIPT};

mod common;

#[test]
fn kill_checkpoints_an_opted_in_container_and_a_new_one_resumes_from_it() {
    let (c, image) = setup_with(CHECKPOINTS);
    let (bundle_dir, last) = checkpointed_bundle(&c, image, "ck1");

    // <root>/<namespace>/<container id (no pod)>/<container>/<time>/, sealed with the KEP-2008 files.
    let rel = bundle_dir.strip_prefix(checkpoint_root(&c)).unwrap();
    let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy().to_string()).collect();
    assert_eq!(parts[..3], [c.namespace.clone(), "ck1".into(), "ck1".into()], "{rel:?}");
    let manifest = bundle::verify(&bundle_dir).unwrap();
    assert_eq!(manifest.container.id, "ck1");
    for file in
        ["checkpoint/inventory.img", "config.dump", "spec.dump", "rootfs-diff.tar", "deleted.files", "stats-dump"]
    {
        assert!(manifest.files.contains_key(file), "{file} missing from {:?}", manifest.files.keys());
    }
    let config: serde_json::Value = serde_json::from_slice(&fs::read(bundle_dir.join("config.dump")).unwrap()).unwrap();
    assert_eq!((config["id"].as_str(), config["name"].as_str()), (Some("ck1"), Some("ck1")), "{config}");
    assert!(manifest.checkpoint.unwrap().memory_bytes > 0);

    // A new container restores from it: the writable layer is back and the counter continues.
    let restore = format!("kybernate.io/restore-from={}", bundle_dir.display());
    ctr_run(&c, &["-d", "--annotation", &restore], image, "ck1b", &["sh", "-c", COUNTER_SCRIPT])
        .unwrap()
        .ok("ctr run with restore-from")
        .unwrap();
    let bundle_b = c.bundle("ck1b");
    let started = Instant::now();
    let mut seen = Vec::new();
    while started.elapsed() < Duration::from_secs(2) {
        seen.extend(read_counter(&bundle_b));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!seen.is_empty() && seen.iter().all(|v| *v >= last), "restarted instead of resumed: last {last}, {seen:?}");
    assert!(seen.last().unwrap() > &last, "the restored counter does not advance: {seen:?}");
    // Its page images were hashed while CRIU restored them, and CRIU waited at the restore gate.
    let log = fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("page images verified while CRIU restored them id=ck1b"), "{}", c.log_tail(40));
    remove_task(&c, "ck1b");
    // The restore read the bundle only: it still verifies.
    bundle::verify(&bundle_dir).unwrap();
}

#[test]
fn containers_that_did_not_opt_in_stop_unchanged() {
    let (c, image) = setup_with(CHECKPOINTS);
    run_counter(&c, image, "plain", &[], TRAPPING_COUNTER);
    let started = Instant::now();
    let (rm, _) = stop_and_remove(&c, "plain");
    assert!(rm.contains("exit status 7") || rm.contains(" 7"), "the trap ran on SIGTERM: {rm}");
    assert!(started.elapsed() < Duration::from_secs(10), "stop took {:?}", started.elapsed());
    assert!(bundles(&c).is_empty(), "no bundle without opt-in: {:?}", bundles(&c));
}

/// Stops the opted-in trapping counter `id` and checks that its checkpoint was abandoned: the
/// container was thawed and its own SIGTERM trap ran (exit 7), and its bundle keeps only `FAILED`;
/// returns the reason recorded there.
fn abandoned_checkpoint(c: &Containerd, image: &str, id: &str) -> String {
    run_counter(c, image, id, &["--annotation", OPT_IN], TRAPPING_COUNTER);
    c.ctr_ok(&["tasks", "kill", id]).unwrap();
    c.wait_task_status(id, "STOPPED", TIMEOUT).unwrap();
    assert_eq!(exit_status(c, id), 7, "the container did not stop on its own SIGTERM handler");
    remove_task(c, id);
    let found = bundles(c);
    assert_eq!(found.len(), 1, "{found:?}");
    let left: Vec<_> = fs::read_dir(&found[0]).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, [FAILED_MARKER], "an abandoned bundle keeps only its FAILED marker");
    fs::read_to_string(found[0].join(FAILED_MARKER)).unwrap()
}

#[test]
fn a_checkpoint_over_budget_during_the_dump_is_abandoned_and_the_container_stops_normally() {
    // A CRIU that takes its time to start dumping (it sleeps before it runs): the budget runs out
    // while runc checkpoint waits for it, and runc and CRIU are killed with their process group.
    let slow = tempfile::tempdir().unwrap();
    let criu = slow.path().join("criu");
    let real = kybernate_tests::find_criu().unwrap();
    let script = format!("#!/bin/sh\n[ \"$1\" = swrk ] && sleep 30\nexec {} \"$@\"\n", real.display());
    fs::write(&criu, script).unwrap();
    fs::set_permissions(&criu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = format!("{CHECKPOINTS}checkpoint_budget = \"2s\"\ncriu_binary = {:?}\n", criu.display().to_string());
    let (c, image) = setup_with(&config);
    let started = Instant::now();
    let reason = abandoned_checkpoint(&c, image, "slow");
    assert!(reason.contains("runc checkpoint of container slow failed (did not finish within"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(25), "the budget did not bound the dump: {:?}", started.elapsed());
}

#[test]
fn a_budget_spent_before_the_dump_abandons_the_checkpoint_and_the_container_stops_normally() {
    let (c, image) = setup_with(&format!("{CHECKPOINTS}checkpoint_budget = \"1ms\"\n"));
    let reason = abandoned_checkpoint(&c, image, "late");
    assert_eq!(
        reason.trim(),
        "the checkpoint budget of 1ms was spent before the dump of container late could start; give the checkpoint \
         more time: timed out"
    );
}

#[test]
fn a_corrupt_bundle_is_refused_clearly_or_skipped_with_fallback_fresh() {
    let (c, image) = setup_with(CHECKPOINTS);
    let (bundle_dir, last) = checkpointed_bundle(&c, image, "src");
    let (pages, _) = corrupt_pages(&bundle_dir);
    let pages = pages.file_name().unwrap().to_string_lossy().to_string();

    // Create verifies everything but the page images; Start hashes them while CRIU restores them and
    // the restore gate aborts the restore before the processes run.
    let restore = format!("kybernate.io/restore-from={}", bundle_dir.display());
    let out = ctr_run(&c, &["-d", "--annotation", &restore], image, "bad", &["sh", "-c", COUNTER_SCRIPT]).unwrap();
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, Some(1), "{text}");
    for part in [
        format!(
            "container bad cannot be restored: checkpoint bundle {} is unusable: checkpoint/{pages} does not match its sha256",
            bundle_dir.display()
        ),
        "CRIU restored the processes but held them before they ran, and the restore was aborted".to_string(),
        "kybernate.io/restore-policy: fallback-fresh".to_string(),
    ] {
        assert!(text.contains(&part), "the error lacks {part:?}: {text}");
    }
    // The task was created and never started; it deletes cleanly and leaves no runc container.
    assert_eq!(c.task_status("bad").as_deref(), Some("CREATED"));
    assert!(!c.runc_containers().contains(&"bad".to_string()), "{:?}", c.runc_containers());
    c.ctr_ok(&["tasks", "rm", "bad"]).unwrap();
    c.ctr_ok(&["containers", "rm", "bad"]).unwrap();
    assert_eq!(c.task_status("bad"), None);

    let flags = ["-d", "--annotation", &restore, "--annotation", "kybernate.io/restore-policy=fallback-fresh"];
    ctr_run(&c, &flags, image, "fresh", &["sh", "-c", COUNTER_SCRIPT]).unwrap().ok("ctr run fallback-fresh").unwrap();
    let first = wait_for("the fresh counter", TIMEOUT, || read_counter(&c.bundle("fresh"))).unwrap();
    assert!(first < last, "fallback-fresh should start from scratch: first {first}, checkpointed at {last}");
    remove_task(&c, "fresh");
}

#[test]
fn two_containers_stopping_at_once_get_a_bundle_each() {
    let (c, image) = setup_with(CHECKPOINTS);
    for id in ["twin-a", "twin-b"] {
        run_counter(&c, image, id, &["--annotation", OPT_IN], COUNTER_SCRIPT);
    }
    std::thread::scope(|s| {
        let kills: Vec<_> = ["twin-a", "twin-b"].map(|id| s.spawn(|| stop_and_remove(&c, id))).into_iter().collect();
        for kill in kills {
            let (rm, _) = kill.join().unwrap();
            assert!(rm.contains("143"), "{rm}");
        }
    });
    let found = bundles(&c);
    assert_eq!(found.len(), 2, "{found:?}");
    for dir in found {
        bundle::verify(&dir).unwrap();
    }
}

/// The exit status the shim reports for `id`'s init process (its Wait answer), once it exited.
#[test]
fn without_criu_a_stop_fails_its_checkpoint_clearly_and_the_container_stops_on_its_signal() {
    let (c, image) = setup_with(&format!("{CHECKPOINTS}criu_binary = \"/nonexistent/criu\"\n"));
    run_counter(&c, image, "nocriu", &["--annotation", OPT_IN], TRAPPING_COUNTER);
    c.ctr_ok(&["tasks", "kill", "nocriu"]).unwrap();
    c.wait_task_status("nocriu", "STOPPED", TIMEOUT).unwrap();
    assert_eq!(exit_status(&c, "nocriu"), 7, "SIGTERM reached the container and its trap ran");
    let found = bundles(&c);
    assert_eq!(found.len(), 1, "{found:?}");
    let reason = fs::read_to_string(found[0].join(FAILED_MARKER)).unwrap();
    assert!(reason.contains("CRIU not found at /nonexistent/criu") && reason.contains("make deps"), "{reason}");
    remove_task(&c, "nocriu");
}

#[test]
fn with_a_criu_too_old_a_stop_fails_its_checkpoint_clearly_and_the_container_stops_on_its_signal() {
    // Debian bookworm's CRIU 3.17, as far as its version goes; it must never be asked to dump.
    let old = tempfile::tempdir().unwrap();
    let criu = old.path().join("criu");
    let dumped = old.path().join("dump-was-called");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = --version ] && {{ echo 'Version: 3.17'; exit 0; }}\ntouch {}\nexit 1\n",
        dumped.display()
    );
    fs::write(&criu, script).unwrap();
    fs::set_permissions(&criu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (c, image) = setup_with(&format!("{CHECKPOINTS}criu_binary = {:?}\n", criu.display().to_string()));
    run_counter(&c, image, "oldcriu", &["--annotation", OPT_IN], TRAPPING_COUNTER);
    c.ctr_ok(&["tasks", "kill", "oldcriu"]).unwrap();
    c.wait_task_status("oldcriu", "STOPPED", TIMEOUT).unwrap();
    assert_eq!(exit_status(&c, "oldcriu"), 7, "SIGTERM reached the container and its trap ran");
    let found = bundles(&c);
    assert_eq!(found.len(), 1, "{found:?}");
    let reason = fs::read_to_string(found[0].join(FAILED_MARKER)).unwrap();
    assert!(reason.contains("CRIU 3.17") && reason.contains("is too old") && reason.contains(">= 4.0.0"), "{reason}");
    assert!(!dumped.exists(), "an old CRIU was asked for more than its version");
    remove_task(&c, "oldcriu");
}

/// Runs an opted-in counter `id` that first writes `mib` MiB into its writable layer and holds
/// `memory_mb` MB in a shell variable, so that its checkpoint (the layer, and the dump) takes a while.
fn run_big_counter(c: &Containerd, image: &str, id: &str, mib: u32, memory_mb: u32) {
    let script = format!(
        "x=$(head -c {memory_mb}000000 /dev/zero | tr '\\0' a); dd if=/dev/zero of=/state/big bs=1M count={mib} 2>/dev/null; {COUNTER_SCRIPT}"
    );
    ctr_run(c, &["-d", "--annotation", OPT_IN], image, id, &["sh", "-c", &script]).unwrap().ok("ctr run").unwrap();
    counter_past(c, id, 3);
}

/// Waits until a checkpoint on stop of `id` is being written; its bundle directory.
fn checkpoint_in_progress(c: &Containerd, id: &str) -> PathBuf {
    wait_for("the checkpoint to start", TIMEOUT, || {
        let root = checkpoint_root(c).join(&c.namespace).join(id).join(id);
        let dir = fs::read_dir(root).ok()?.flatten().next()?.path();
        dir.join(bundle::IN_PROGRESS_MARKER).is_file().then_some(dir)
    })
    .unwrap()
}

#[test]
fn a_shim_killed_mid_checkpoint_leaves_a_bundle_the_next_shim_marks_interrupted() {
    let (c, image) = setup_with(CHECKPOINTS);
    // A large writable layer keeps the checkpoint busy long enough to kill its shim in the middle.
    run_big_counter(&c, image, "victim", 100, 200);
    let shim = c.shim_pids_for("victim");
    assert_eq!(shim.len(), 1, "{shim:?}");
    let in_progress = std::thread::scope(|s| {
        let kill = s.spawn(|| c.ctr_run(&["tasks", "kill", "victim"], TIMEOUT));
        let marker = checkpoint_in_progress(&c, "victim");
        // kill the shim while its runc checkpoint (and CRIU) runs
        let images = marker.join("checkpoint").display().to_string();
        let dumping = || (!kybernate_tests::pids_with_arg(&images).is_empty()).then_some(());
        wait_for("the dump to start", TIMEOUT, dumping).unwrap();
        kybernate_tests::kill_and_reap(shim[0]);
        let _ = kill.join();
        marker
    });
    assert!(!in_progress.join(COMPLETE_MARKER).exists());
    // The next shim to start (any container) marks it FAILED as interrupted, and deletes nothing.
    run_counter(&c, image, "next", &[], COUNTER_SCRIPT);
    let reason = wait_for("the interrupted bundle to be marked", TIMEOUT, || {
        fs::read_to_string(in_progress.join(FAILED_MARKER)).ok()
    })
    .unwrap();
    assert!(reason.starts_with("interrupted: its writer (pid ") && reason.contains(&shim[0].to_string()), "{reason}");
    assert!(!in_progress.join(bundle::IN_PROGRESS_MARKER).exists());
    remove_task(&c, "next");
}

#[test]
fn a_sigkill_during_a_checkpoint_on_stop_waits_for_it() {
    let (c, image) = setup_with(CHECKPOINTS);
    run_big_counter(&c, image, "hurried", 300, 0);
    std::thread::scope(|s| {
        let term = s.spawn(|| c.ctr_run(&["tasks", "kill", "hurried"], TIMEOUT));
        checkpoint_in_progress(&c, "hurried");
        // kubelet's SIGKILL at the end of the grace period: it waits for the checkpoint, then succeeds
        let kill = c.ctr_run(&["tasks", "kill", "--signal", "SIGKILL", "hurried"], TIMEOUT).unwrap();
        assert_eq!(kill.code, Some(0), "{kill:?}");
        assert_eq!(term.join().unwrap().unwrap().code, Some(0));
    });
    c.wait_task_status("hurried", "STOPPED", TIMEOUT).unwrap();
    assert_eq!(exit_status(&c, "hurried"), 143, "the checkpoint finished and the exit is SIGTERM's");
    let found = bundles(&c);
    assert_eq!(found.len(), 1, "{found:?}");
    bundle::verify(&found[0]).expect("the checkpoint SIGKILL waited for is sealed");
    remove_task(&c, "hurried");
}

#[test]
fn a_shim_killed_mid_restore_leaves_nothing_running_and_the_bundle_restores_again() {
    let (c, image) = setup_with(CHECKPOINTS);
    // Memory to restore keeps CRIU busy long enough to kill the shim in the middle.
    run_big_counter(&c, image, "heavy", 0, 150);
    assert!(!cgroup_pids(&c.namespace, "heavy").is_empty(), "the cgroup probe sees a running container");
    let (rm, last) = stop_and_remove(&c, "heavy");
    assert!(rm.contains("143"), "{rm}");
    let bundle_dir = bundles(&c).pop().unwrap();
    let restore = format!("kybernate.io/restore-from={}", bundle_dir.display());
    let images = bundle_dir.join("checkpoint").display().to_string();
    let resume = || ctr_run(&c, &["-d", "--annotation", &restore], image, "resumed", &["sh", "-c", COUNTER_SCRIPT]);
    std::thread::scope(|s| {
        let run = s.spawn(resume);
        let restoring = || (!kybernate_tests::pids_with_arg(&images).is_empty()).then_some(());
        wait_for("runc restore to start", TIMEOUT, restoring).unwrap();
        let shim = c.shim_pids_for("resumed");
        assert_eq!(shim.len(), 1, "{shim:?}");
        kybernate_tests::kill_and_reap(shim[0]);
        let out = run.join().unwrap().unwrap();
        assert_eq!(out.code, Some(1), "{out:?}");
    });
    // containerd cleans up through `shim delete`: runc and CRIU are gone, no task and no process of the
    // container runs, runc forgot it (its criu-root mount released), and the bundle is untouched.
    let runc_state = c.runc_root.join("resumed");
    let settled = || {
        let quiet =
            kybernate_tests::pids_with_arg(&images).is_empty() && cgroup_pids(&c.namespace, "resumed").is_empty();
        (quiet && c.task_status("resumed").is_none() && !runc_state.exists()).then_some(())
    };
    wait_for("the interrupted restore to be cleaned up", TIMEOUT, settled).unwrap_or_else(|e| {
        panic!("{e}: runc state {:?}\n{}", fs::read_dir(&runc_state).map(|d| d.count()), c.log_tail(30))
    });
    bundle::verify(&bundle_dir).unwrap();
    // The same id restores from the same bundle, and the counter goes on.
    c.ctr_ok(&["containers", "rm", "resumed"]).unwrap();
    resume().unwrap().ok("restoring again").unwrap();
    let first = wait_for("the restored counter", TIMEOUT, || read_counter(&c.bundle("resumed"))).unwrap();
    assert!(first >= last, "started fresh ({first}) instead of resuming from {last}");
    counter_past(&c, "resumed", first);
    remove_task(&c, "resumed");
}

#[test]
fn a_containerd_restart_leaves_the_shim_serving_and_the_container_checkpoints_on_stop() {
    let (mut c, image) = setup_with(CHECKPOINTS);
    run_counter(&c, image, "survivor", &["--annotation", OPT_IN], COUNTER_SCRIPT);
    let shim = c.shim_pids_for("survivor");
    assert_eq!(shim.len(), 1, "{shim:?}");
    c.restart().unwrap();
    assert_eq!(c.task_status("survivor").as_deref(), Some("RUNNING"));
    assert_eq!(c.shim_pids_for("survivor"), shim, "the same shim serves the task");
    let seen = read_counter(&c.bundle("survivor")).unwrap();
    counter_past(&c, "survivor", seen);
    // The restarted containerd reaches the shim for an exec, and its exit code comes back.
    let exec = c.ctr_run(&["tasks", "exec", "--exec-id", "after", "survivor", "sh", "-c", "exit 5"], TIMEOUT).unwrap();
    assert_eq!(exec.code, Some(5), "{exec:?}");
    // A stop still checkpoints: the container exits as on SIGTERM and its bundle is sealed.
    c.ctr_ok(&["tasks", "kill", "survivor"]).unwrap();
    c.wait_task_status("survivor", "STOPPED", TIMEOUT).unwrap();
    assert_eq!(exit_status(&c, "survivor"), 143);
    let last = read_counter(&c.bundle("survivor")).unwrap();
    remove_task(&c, "survivor");
    let found = bundles(&c);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(bundle::verify(&found[0]).unwrap().container.id, "survivor");
    assert!(last > seen, "the container counted on after the restart: {seen} -> {last}");
}
