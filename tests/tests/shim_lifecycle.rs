//! containerd-shim-kybernate-v1 under a real, private containerd, driven with `ctr`: the task
//! lifecycle (run, exec, pause/resume, update, metrics, kill, delete), exit codes, terminals, OOM
//! events, checkpoint (leave-running and exit), restore with the workload's memory intact, and clear
//! failures for a stopped task and a corrupt checkpoint image.
//!
//! Every test starts its own containerd (see `Containerd` in the helpers) and fails — never skips —
//! when containerd, runc or CRIU are missing.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use common::*;
use kybernate_tests::{read_counter, require_tools, run_with_timeout, wait_for, zombie_children, KYBERNATE_RUNTIME};

mod common;

const CRIU_TAR: &str = "application/vnd.containerd.container.criu.checkpoint.criu.tar";
#[test]
fn exit_code_and_output_propagate() {
    let (c, image) = setup();
    let out =
        ctr_run(&c, &["--rm"], image, "exit7", &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"]).unwrap();
    assert_eq!(out.code, Some(7), "{out:?}");
    assert_eq!(out.stdout.trim(), "to-stdout", "{out:?}");
    assert!(out.stderr.contains("to-stderr"), "{out:?}");
    assert_eq!(c.task_status("exit7"), None);
    // With its only container gone, the shim shuts down.
    wait_shims_gone(&c);
}

#[test]
fn task_lifecycle_exec_pause_update_kill_delete() {
    let (c, image) = setup();
    let events = Events::start(&c);
    let before = start_counter(&c, image, "life", 2);
    assert_eq!(c.task_status("life").as_deref(), Some("RUNNING"));
    let init_pid: u32 = c
        .ctr_ok(&["tasks", "ls"])
        .unwrap()
        .lines()
        .find(|l| l.starts_with("life"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();

    // exec: output and exit code come back; events are sent.
    let out = c
        .ctr_run(&["tasks", "exec", "--exec-id", "e1", "life", "sh", "-c", "cat /state/counter; exit 3"], TIMEOUT)
        .unwrap();
    assert_eq!(out.code, Some(3), "{out:?}");
    assert!(out.stdout.trim().parse::<u64>().unwrap() >= before, "{out:?}");
    events.wait_for(&["/tasks/exec-added", "\"exec_id\":\"e1\""]);
    events.wait_for(&["/tasks/exec-started", "\"exec_id\":\"e1\""]);
    events.wait_for(&["/tasks/exit", "\"id\":\"e1\"", "\"exit_status\":3"]);
    // the shim reaped it (and the runc runs before it): no zombies under the shim
    let shim = c.shim_pids_for("life")[0];
    wait_for("the shim to have no zombie children", TIMEOUT, || zombie_children(shim).is_empty().then_some(()))
        .unwrap();

    // a detached exec shows up in ps with its exec id, and can be signalled by exec id
    c.ctr_ok(&["tasks", "exec", "-d", "--exec-id", "sleeper", "life", "sleep", "1000"]).unwrap();
    let ps = wait_for("ps to show the exec", TIMEOUT, || {
        c.ctr_ok(&["tasks", "ps", "life"]).ok().filter(|ps| ps.contains("sleeper"))
    })
    .unwrap();
    assert!(ps.contains(&init_pid.to_string()), "{ps}");
    c.ctr_ok(&["tasks", "kill", "--exec-id", "sleeper", "-s", "SIGKILL", "life"]).unwrap();
    events.wait_for(&["/tasks/exit", "\"id\":\"sleeper\"", "\"exit_status\":137"]);

    // pause freezes the counter, resume lets it go on
    c.ctr_ok(&["tasks", "pause", "life"]).unwrap();
    assert_eq!(c.task_status("life").as_deref(), Some("PAUSED"));
    let frozen = read_counter(&c.bundle("life")).unwrap();
    // frozen by the kernel: the container's cgroup says so (cgroup v1 freezer, or v2's cgroup.events)
    let v1 = format!("/sys/fs/cgroup/freezer/{}/life/freezer.state", c.namespace);
    let v2 = format!("/sys/fs/cgroup/{}/life/cgroup.events", c.namespace);
    let frozen_state = fs::read_to_string(&v1)
        .map(|s| s.trim() == "FROZEN")
        .or_else(|_| fs::read_to_string(&v2).map(|s| s.lines().any(|l| l == "frozen 1")))
        .unwrap();
    assert!(frozen_state, "the paused task's cgroup is not frozen");
    assert_eq!(read_counter(&c.bundle("life")), Some(frozen), "a paused task must not run");
    c.ctr_ok(&["tasks", "resume", "life"]).unwrap();
    assert_eq!(c.task_status("life").as_deref(), Some("RUNNING"));
    counter_past(&c, "life", frozen + 2);
    events.wait_for(&["/tasks/paused"]);
    events.wait_for(&["/tasks/resumed"]);

    // update (containerd sends the OCI LinuxResources as JSON; ctr 1.6 has no update command) and metrics
    let update = containerd_shim_protos::shim::shim::UpdateTaskRequest {
        id: "life".into(),
        resources: containerd_shim_protos::protobuf::MessageField::some(
            containerd_shim_protos::protobuf::well_known_types::any::Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: br#"{"memory":{"limit":67108864}}"#.to_vec(),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    shim_client(&c, "life").update(ttrpc_timeout(), &update).unwrap();
    let metrics = c.ctr_ok(&["tasks", "metrics", "life"]).unwrap();
    assert!(metrics.contains("memory.limit_in_bytes") && metrics.contains("67108864"), "{metrics}");
    assert!(metrics.contains("pids.current"), "{metrics}");

    // kill and delete: the exit status is reported
    let rm = remove_task(&c, "life");
    assert!(rm.stderr.contains("137") || rm.stdout.contains("137"), "{rm:?}");
    events.wait_for(&["/tasks/exit", "\"id\":\"life\"", "\"exit_status\":137"]);
    events.wait_for(&["/tasks/delete", "\"container_id\":\"life\""]);
    wait_shims_gone(&c);
}

#[test]
fn terminal_processes_get_a_pty() {
    require_tools(&["script"]).unwrap();
    let (c, image) = setup();
    let ctr = |args: &str| format!("ctr --address {} --namespace {} {args}", c.socket.display(), c.namespace);
    let script = |command: String| {
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &command, "/dev/null"]);
        run_with_timeout(cmd, TIMEOUT).unwrap()
    };
    let rt = format!("--runtime {KYBERNATE_RUNTIME} --runtime-config-path {}", c.shim_config.display());
    let out =
        script(ctr(&format!("run -t --rm {rt} {image} tty1 sh -c 'test -t 0 && test -t 1 && echo TTY-OK; exit 5'")));
    assert_eq!(out.code, Some(5), "{out:?}");
    assert!(out.stdout.contains("TTY-OK"), "{out:?}");

    ctr_run(&c, &["-d"], image, "tty2", &["sleep", "1000"]).unwrap().ok("ctr run -d").unwrap();
    let out = script(ctr("tasks exec -t --exec-id t1 tty2 sh -c 'test -t 0 && echo EXEC-TTY-OK; exit 4'"));
    assert_eq!(out.code, Some(4), "{out:?}");
    assert!(out.stdout.contains("EXEC-TTY-OK"), "{out:?}");
    remove_task(&c, "tty2");
}

#[test]
fn oom_kill_is_reported() {
    let (c, image) = setup();
    let events = Events::start(&c);
    let out = ctr_run(
        &c,
        &["--rm", "--memory-limit", "33554432"],
        image,
        "oom",
        &["sh", "-c", "x=$(yes | head -c 300000000); echo survived"],
    )
    .unwrap();
    assert_eq!(out.code, Some(137), "{out:?}");
    assert!(!out.stdout.contains("survived"), "{out:?}");
    events.wait_for(&["/tasks/oom", "\"container_id\":\"oom\""]);
}

#[test]
fn checkpoint_leave_running_then_restore_resumes_state() {
    let (c, image) = setup();
    start_counter(&c, image, "ck", 3);

    // `ctr t checkpoint` sends no options to a non-runc runtime: the task keeps running.
    let name = c.ctr_ok(&["tasks", "checkpoint", "ck"]).unwrap();
    let name = name.trim();
    assert!(name.starts_with("containerd.io/checkpoint/ck"), "{name}");
    assert_eq!(c.task_status("ck").as_deref(), Some("RUNNING"));
    let after = read_counter(&c.bundle("ck")).unwrap();
    counter_past(&c, "ck", after + 2);
    // containerd 1.6 refuses to store the same spec blob twice: drop the first image before the next.
    c.ctr_ok(&["images", "rm", "--sync", name]).unwrap();

    // `ctr c checkpoint --task`: containerd pauses the task around it and sends runc's options.
    let before = read_counter(&c.bundle("ck")).unwrap();
    c.ctr_ok(&["containers", "checkpoint", "--task", "ck", "ck-image"]).unwrap();
    assert_eq!(c.task_status("ck").as_deref(), Some("RUNNING"));
    counter_past(&c, "ck", before + 2);

    // The image carries Kybernate's sealed manifest.
    let blob = c.blob(&c.index_entry("ck-image", CRIU_TAR).unwrap());
    let mut archive = tar::Archive::new(fs::File::open(&blob).unwrap());
    let mut manifest = None;
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        if path.trim_start_matches("./") == "kybernate.json" {
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            manifest = Some(serde_json::from_str::<serde_json::Value>(&text).unwrap());
        }
        names.push(path.trim_start_matches("./").to_string());
    }
    assert!(names.iter().any(|n| n == "COMPLETE") && names.iter().any(|n| n == "inventory.img"), "{names:?}");
    let manifest = manifest.expect("kybernate.json in the checkpoint");
    assert_eq!(manifest["container"]["id"], "ck");
    assert_eq!(manifest["container"]["namespace"], c.namespace.as_str());
    assert!(manifest["host"]["criu_version"].as_str().is_some_and(|v| !v.is_empty()), "{manifest}");
    assert!(manifest["checkpoint"]["pages_written"].as_u64().unwrap() > 0, "{manifest}");
    assert!(manifest["files"]["inventory.img"]["sha256"].is_string(), "{manifest}");

    // Migrate: the original goes away, the restored one continues counting where it was.
    remove_task(&c, "ck");
    c.ctr_ok(&["containers", "restore", "--live", "ck2", "ck-image"]).unwrap();
    assert_eq!(c.task_status("ck2").as_deref(), Some("RUNNING"));
    let first = wait_for("the restored counter", TIMEOUT, || read_counter(&c.bundle("ck2"))).unwrap();
    assert!(first > before, "restored counter {first} restarted instead of continuing from > {before}");
    assert!(first < before + 100, "restored counter {first} is far beyond the checkpoint ({before})");
    counter_past(&c, "ck2", first + 2);
    remove_task(&c, "ck2");
}

#[test]
fn checkpoint_with_exit_stops_the_task() {
    use containerd_shim_protos::shim::oci::CheckpointOptions;

    let (c, image) = setup();
    start_counter(&c, image, "ex", 3);
    // containerd 1.6's ctr sends no options to non-runc runtimes, so `--exit` is sent as containerd
    // 2.x and nerdctl send it: runc's CheckpointOptions on the task API, here straight to the shim.
    let images = c.dir.path().join("exit-image");
    let opts = CheckpointOptions { exit: true, file_locks: true, ..Default::default() };
    shim_client(&c, "ex").checkpoint(ttrpc_timeout(), &checkpoint_request("ex", &images, opts)).unwrap();

    c.wait_task_status("ex", "STOPPED", TIMEOUT).unwrap();
    // (raw contents: the shell may have been frozen between truncating the file and writing it)
    let counter = c.bundle("ex").join("rootfs/state/counter");
    let stopped_at = fs::read_to_string(&counter).unwrap();
    assert_eq!(cgroup_pids(&c.namespace, "ex"), Vec::<i32>::new(), "nothing may run after a checkpoint with exit");
    assert_eq!(fs::read_to_string(&counter).unwrap(), stopped_at);
    let manifest = checkpoint_core::bundle::verify(&images).unwrap();
    assert_eq!(manifest.container.id, "ex");
    assert!(manifest.checkpoint.is_some());
    let rm = remove_task(&c, "ex");
    assert!(rm.stderr.contains("137"), "{rm:?}");
}

#[test]
fn checkpoint_of_a_stopped_task_is_refused_clearly() {
    let (c, image) = setup();
    ctr_run(&c, &["-d"], image, "done", &["true"]).unwrap().ok("ctr run -d").unwrap();
    c.wait_task_status("done", "STOPPED", TIMEOUT).unwrap();
    // containerd pauses a task before checkpointing it, so ctr hears it from Pause ...
    let out = c.ctr_run(&["tasks", "checkpoint", "done"], TIMEOUT).unwrap();
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("task done has exited (status 0)"), "{out:?}");
    assert!(out.stderr.contains("only a running task can be paused, checkpointed"), "{out:?}");
    assert!(out.stderr.contains("failed precondition"), "{out:?}");
    // ... and a client that checkpoints directly (containerd 2.x does not pause) from Checkpoint.
    let dir = c.dir.path().join("never");
    let err = shim_client(&c, "done")
        .checkpoint(ttrpc_timeout(), &checkpoint_request("done", &dir, Default::default()))
        .unwrap_err();
    match err {
        containerd_shim_protos::ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), containerd_shim_protos::ttrpc::Code::FAILED_PRECONDITION, "{status:?}");
            assert!(
                status.message().contains("task done has exited (status 0): it cannot be checkpointed"),
                "{status:?}"
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(!dir.exists(), "a refused checkpoint must not create its directory");
    c.ctr_ok(&["tasks", "rm", "done"]).unwrap();
}

/// Overwrites bytes inside the file `name` of the tar at `path`, keeping every size the same.
fn corrupt_in_tar(path: &Path, name: &str) -> Result<()> {
    let (offset, size) = {
        let mut archive = tar::Archive::new(fs::File::open(path)?);
        let mut found = None;
        for entry in archive.entries()? {
            let entry = entry?;
            if entry.path()?.display().to_string().trim_start_matches("./") == name {
                found = Some((entry.raw_file_position(), entry.size()));
                break;
            }
        }
        found.with_context(|| format!("{name} is not in {}", path.display()))?
    };
    let mut file = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let n = size.min(4096) as usize;
    let mut buf = vec![0u8; n];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut buf)?;
    buf.iter_mut().for_each(|b| *b ^= 0xff);
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&buf)?;
    Ok(())
}

#[test]
fn restore_of_a_corrupt_checkpoint_fails_and_leaves_nothing() {
    let (c, image) = setup();
    start_counter(&c, image, "src", 3);
    c.ctr_ok(&["containers", "checkpoint", "--task", "src", "src-image"]).unwrap();
    remove_task(&c, "src");
    let blob = c.blob(&c.index_entry("src-image", CRIU_TAR).unwrap());
    corrupt_in_tar(&blob, "pages-1.img").unwrap();

    // Create verifies everything but the page images; Start hashes them while CRIU restores them,
    // and the restore gate aborts the restore before the processes run.
    let out = c.ctr_run(&["containers", "restore", "--live", "bad", "src-image"], TIMEOUT).unwrap();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("container bad cannot be restored"), "{out:?}");
    assert!(out.stderr.contains("pages-1.img does not match its sha256"), "{out:?}");
    assert!(out.stderr.contains("held them before they ran, and the restore was aborted"), "{out:?}");

    // Nothing half-created: the task never started and deletes cleanly; no runc container, no shim,
    // no rootfs mount.
    assert_eq!(c.task_status("bad").as_deref(), Some("CREATED"));
    assert!(!c.runc_containers().contains(&"bad".to_string()), "{:?}", c.runc_containers());
    c.ctr_ok(&["tasks", "rm", "bad"]).unwrap();
    assert_eq!(c.task_status("bad"), None);
    wait_for("the shim of the failed restore to exit", TIMEOUT, || c.shim_pids_for("bad").is_empty().then_some(()))
        .unwrap();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&c.bundle("bad").display().to_string()), "{mounts}");
    // `ctr c restore` created the container record before the task failed; it removes cleanly.
    c.ctr_ok(&["containers", "rm", "bad"]).unwrap();
}

#[test]
fn a_crashed_shim_is_cleaned_up_by_shim_delete() {
    let (c, image) = setup();
    ctr_run(&c, &["-d"], image, "crash", &["sleep", "1000"]).unwrap().ok("ctr run -d").unwrap();
    c.wait_task_status("crash", "RUNNING", TIMEOUT).unwrap();
    let listing = c.ctr_ok(&["tasks", "ls"]).unwrap();
    let init: i32 = listing
        .lines()
        .find(|l| l.starts_with("crash"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap();
    let shims = c.shim_pids_for("crash");
    assert_eq!(shims.len(), 1, "{shims:?}");
    // The container's init is re-parented to this (subreaper) test process when its shim dies.
    kybernate_tests::kill_and_reap(shims[0]);
    // containerd notices, runs `containerd-shim-kybernate-v1 delete` in the bundle, which removes the
    // runc container (killing its processes) and reports exit status 137.
    wait_for("runc to forget the container", TIMEOUT, || {
        (!c.runc_containers().contains(&"crash".to_string())).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(40)));
    wait_for("the container's process to die", TIMEOUT, || {
        kybernate_tests::reap_if_exited(init);
        (!kybernate_tests::alive(init)).then_some(())
    })
    .unwrap();
    let log = fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("cleaning up dead shim"), "{}", c.log_tail(40));
    assert!(!log.contains("failed to clean up after shim disconnected"), "{}", c.log_tail(40));
    let _ = c.ctr_run(&["tasks", "rm", "-f", "crash"], TIMEOUT);
    c.ctr_ok(&["containers", "rm", "crash"]).unwrap();
}

#[test]
fn restored_task_keeps_writing_to_its_stdout() {
    use std::io::BufRead;
    let (c, image) = setup();
    let talker = "i=0; while :; do i=$((i+1)); echo $i > /state/counter.new; mv /state/counter.new /state/counter; echo tick $i; sleep 0.1; done";
    ctr_run(&c, &["-d"], image, "talk", &["sh", "-c", talker]).unwrap().ok("ctr run -d").unwrap();
    let before = counter_past(&c, "talk", 3);
    c.ctr_ok(&["containers", "checkpoint", "--task", "talk", "talk-image"]).unwrap();
    remove_task(&c, "talk");

    // `ctr c restore` wires the new task to FIFOs and returns once it runs; the shim keeps the FIFOs
    // open, so what the restored shell prints can be read from the stdout FIFO the task reports.
    c.ctr_ok(&["containers", "restore", "--live", "talk2", "talk-image"]).unwrap();
    let state = shim_client(&c, "talk2")
        .state(
            ttrpc_timeout(),
            &containerd_shim_protos::shim::shim::StateRequest { id: "talk2".into(), ..Default::default() },
        )
        .unwrap();
    assert!(!state.stdout.is_empty(), "{state:?}");
    let fifo = fs::File::open(&state.stdout).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(fifo).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Lines the original wrote before the checkpoint may still sit in the FIFO; skip to the restored ones.
    let restored: Vec<u64> = (0..400)
        .map_while(|_| rx.recv_timeout(TIMEOUT).ok())
        .filter_map(|l| l.strip_prefix("tick ").and_then(|n| n.parse().ok()))
        .skip_while(|n| *n <= before)
        .take(2)
        .collect();
    assert_eq!(restored.len(), 2, "the restored task printed nothing after tick {before}");
    assert!(restored[0] < before + 100, "restored count {} does not continue from {before}", restored[0]);
    assert_eq!(restored[1], restored[0] + 1);
    remove_task(&c, "talk2");
}

/// containerd 2.x's CRI CheckpointContainer (kubelet's checkpoint API), as its code sends it to a
/// non-runc runtime (containerd v2.1–v2.3 `internal/cri/server/container_checkpoint_linux.go`,
/// `client/task.go`, `core/runtime/v2/shim.go`): Pause, then a task Checkpoint with the request path
/// a fresh temporary directory and no options at all (runc's options are only set for
/// io.containerd.runc.v2), then Resume. containerd then unpacks that directory's files flat into the
/// archive's `checkpoint/`, so it must hold regular files only, CRIU's images among them. The archive
/// containerd builds around it restores through `kybernate.io/restore-from`.
#[test]
fn a_containerd_2_cri_checkpoint_is_served_and_its_archive_restores() {
    let (c, image) = setup();
    start_counter(&c, image, "kubelet-ck", 3);
    let shim = shim_client(&c, "kubelet-ck");
    let id = || containerd_shim_protos::shim::shim::PauseRequest { id: "kubelet-ck".into(), ..Default::default() };
    shim.pause(ttrpc_timeout(), &id()).unwrap();
    let path = c.dir.path().join("ctrd-checkpoint1234");
    fs::create_dir(&path).unwrap();
    let request = containerd_shim_protos::shim::shim::CheckpointTaskRequest {
        id: "kubelet-ck".into(),
        path: path.display().to_string(),
        ..Default::default()
    };
    shim.checkpoint(ttrpc_timeout(), &request).unwrap();
    // containerd takes the rootfs diff while the task is still paused, then resumes it
    let at_checkpoint = read_counter(&c.bundle("kubelet-ck")).unwrap();
    let diff = gzip_rootfs_diff(&c, "kubelet-ck");
    let resume = containerd_shim_protos::shim::shim::ResumeRequest { id: "kubelet-ck".into(), ..Default::default() };
    shim.resume(ttrpc_timeout(), &resume).unwrap();
    assert_eq!(c.task_status("kubelet-ck").as_deref(), Some("RUNNING"), "CRI checkpoints leave the task running");
    let seen = read_counter(&c.bundle("kubelet-ck")).unwrap();
    counter_past(&c, "kubelet-ck", seen + 2);

    let entries: Vec<(String, bool)> = fs::read_dir(&path)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.file_type().unwrap().is_file()))
        .collect();
    assert!(entries.iter().all(|(_, file)| *file), "containerd's flat unpacker needs regular files only: {entries:?}");
    for name in ["inventory.img", "pstree.img", "kybernate.json", "kybernate.json.sig", "COMPLETE"] {
        assert!(entries.iter().any(|(n, _)| n == name), "{name} missing: {entries:?}");
    }
    let (manifest, signed) = checkpoint_core::bundle::verify_trusted(&path, &node_trust(&c)).unwrap();
    assert!(matches!(signed, checkpoint_core::trust::Provenance::Signed { .. }));
    assert_eq!(manifest.container.id, "kubelet-ck");
    assert!(manifest.checkpoint.unwrap().pages_written > 0);

    // The KEP-2008 archive containerd then builds (unpacked): the shim's files flat in checkpoint/,
    // its own config.dump and spec.dump, status.dump, and the gzip-compressed rootfs-diff.tar.
    let archive = c.dir.path().join("kubelet-archive");
    fs::create_dir_all(archive.join("checkpoint")).unwrap();
    for entry in fs::read_dir(&path).unwrap().flatten() {
        fs::copy(entry.path(), archive.join("checkpoint").join(entry.file_name())).unwrap();
    }
    fs::copy(c.bundle("kubelet-ck").join("config.json"), archive.join("spec.dump")).unwrap();
    let config = serde_json::json!({
        "id": "kubelet-ck", "name": "kubelet-ck", "rootfsImageName": image, "runtime": KYBERNATE_RUNTIME,
        "rootfsImage": image, "createdTime": "2026-12-01T10:00:00.123456789Z",
        "checkpointedTime": "2026-12-01T11:00:00.123456789Z", "restoredTime": "0001-01-01T00:00:00Z", "restored": false
    });
    fs::write(archive.join("config.dump"), config.to_string()).unwrap();
    fs::write(archive.join("status.dump"), r#"{"id":"kubelet-ck","state":1}"#).unwrap();
    fs::write(archive.join("rootfs-diff.tar"), &diff).unwrap();
    remove_task(&c, "kubelet-ck");

    // restore-from the archive: the signed images inside are verified, the gzip layer applied, and
    // the counter goes on from where it was checkpointed.
    let restore = format!("kybernate.io/restore-from={}", archive.display());
    ctr_run(
        &c,
        &["-d", "--annotation", &restore],
        image,
        "from-kubelet",
        &["sh", "-c", kybernate_tests::COUNTER_SCRIPT],
    )
    .unwrap()
    .ok("ctr run restoring the CRI archive")
    .unwrap();
    let first = wait_for("the restored counter", TIMEOUT, || read_counter(&c.bundle("from-kubelet"))).unwrap();
    assert!(
        first >= at_checkpoint && first < at_checkpoint + 50,
        "resumed from {first}, checkpointed at {at_checkpoint}"
    );
    counter_past(&c, "from-kubelet", first);
    remove_task(&c, "from-kubelet");

    // The same archive as another runtime writes it (no Kybernate manifest) is refused: nothing
    // says who wrote it, unless the node allows unsigned checkpoints.
    for file in ["kybernate.json", "kybernate.json.sig", "COMPLETE"] {
        fs::remove_file(archive.join("checkpoint").join(file)).unwrap();
    }
    let out = ctr_run(&c, &["-d", "--annotation", &restore], image, "foreign", &["sh", "-c", "true"]).unwrap();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("it has no Kybernate manifest") && out.stderr.contains("allow_unsigned"), "{out:?}");
    assert_eq!(c.task_status("foreign"), None);
}

/// The container's writable layer as containerd's CRI stores it in a checkpoint archive: a gzip
/// tar of the overlay upper directory (its snapshot diff).
fn gzip_rootfs_diff(c: &kybernate_tests::Containerd, id: &str) -> Vec<u8> {
    let rootfs = c.bundle(id).join("rootfs").display().to_string();
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts.lines().find(|l| l.split(' ').nth(4) == Some(rootfs.as_str())).expect("the rootfs mount");
    let upper = line
        .split(',')
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(|u| u.split(' ').next().unwrap_or(u).to_string())
        .expect("an overlay rootfs");
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(".", &upper).unwrap();
    let bytes = tar.into_inner().unwrap().finish().unwrap();
    assert_eq!(bytes[..2], [0x1f, 0x8b]);
    bytes
}

/// The keys the instance's shim signs with (its own key, as the kit made it).
fn node_trust(c: &kybernate_tests::Containerd) -> checkpoint_core::trust::TrustedKeys {
    checkpoint_core::trust::TrustedKeys::load(&[c.dir.path().join("keys/signing.pub")], false).unwrap()
}
