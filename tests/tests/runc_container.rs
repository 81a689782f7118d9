//! checkpoint-core against real runc and CRIU: a container built from a local busybox rootfs is
//! checkpointed and restored with its in-memory counter intact; failures leave it running.

use std::path::Path;

use checkpoint_core::{
    checkpoint_container, restore_container, CheckpointOptions, ChildStdio, ContainerRestore, Criu, Error,
    RestoreOptions, Runc,
};
use kybernate_tests::{busybox_bundle, read_counter, wait_counter_past, RuncContainer, COUNTER_SCRIPT};

fn start(dir: &Path, id: &str) -> (Runc, RuncContainer) {
    let root = dir.join("runc-root");
    let bundle = busybox_bundle(&dir.join("bundle"), &["/bin/sh", "-c", COUNTER_SCRIPT]).unwrap();
    let container = RuncContainer::run(&root, id, &bundle).unwrap();
    wait_counter_past(&bundle, 3).unwrap();
    (Runc::new("runc", Some(root)), container)
}

#[test]
fn container_is_checkpointed_and_restored_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "ck-restore");
    let criu = Criu::from_path();

    // Leave-running: a snapshot while the container keeps counting.
    let opts = CheckpointOptions { leave_running: true, ..Default::default() };
    let snap = checkpoint_container(&runc, &criu, "ck-restore", &dir.path().join("snapshot"), &opts).unwrap();
    assert_eq!(container.status().as_deref(), Some("running"));
    let seen = read_counter(&container.bundle).unwrap();
    wait_counter_past(&container.bundle, seen + 2).unwrap();
    assert!(snap.pages_written > 0 && snap.image_bytes > 0);

    // Checkpoint-and-exit, then restore under the same id: the shell's counter continues.
    let images = dir.path().join("images");
    let report = checkpoint_container(&runc, &criu, "ck-restore", &images, &CheckpointOptions::default()).unwrap();
    assert!(report.timings.total >= report.timings.frozen && report.timings.frozen > std::time::Duration::ZERO);
    // runc removes a container it checkpointed without --leave-running.
    assert!(matches!(container.status().as_deref(), None | Some("stopped")), "{:?}", container.status());
    let stopped_at = read_counter(&container.bundle).unwrap();
    container.delete();
    assert!(!kybernate_tests::alive(container.pid), "nothing runs between checkpoint and restore");
    assert_eq!(read_counter(&container.bundle), Some(stopped_at));

    let req = ContainerRestore {
        id: "ck-restore".into(),
        bundle: container.bundle.clone(),
        image_dir: images.clone(),
        options: RestoreOptions { work_dir: Some(dir.path().join("restore-work")), ..Default::default() },
        pid_file: None,
        console_socket: None,
        no_pivot: false,
        lazy_pages: false,
        env: Vec::new(),
    };
    let restored = restore_container(&runc, &criu, &req, ChildStdio::default()).unwrap();
    let restored = RuncContainer::adopt(runc.root().unwrap(), "ck-restore", &container.bundle, restored.pid);
    assert_eq!(restored.status().as_deref(), Some("running"));
    let after = wait_counter_past(&container.bundle, stopped_at).unwrap();
    assert!(after < stopped_at + 50, "the counter continued from {stopped_at} rather than restarting: {after}");
}

#[test]
fn checkpoint_of_a_stopped_container_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "ck-stopped");
    let kill = std::process::Command::new("runc")
        .arg("--root")
        .arg(&container.root)
        .args(["kill", "ck-stopped", "KILL"])
        .status()
        .unwrap();
    assert!(kill.success());
    kybernate_tests::wait_for("the container to stop", std::time::Duration::from_secs(10), || {
        kybernate_tests::reap_if_exited(container.pid);
        (container.status().as_deref() == Some("stopped")).then_some(())
    })
    .unwrap();
    let err = checkpoint_container(&runc, &Criu::from_path(), "ck-stopped", &dir.path().join("i"), &Default::default())
        .unwrap_err();
    assert!(matches!(err, Error::ContainerState { .. }), "{err}");
    assert!(err.to_string().contains("only a running container can be checkpointed"), "{err}");
    let absent =
        checkpoint_container(&runc, &Criu::from_path(), "no-such-id", &dir.path().join("j"), &Default::default())
            .unwrap_err();
    assert!(absent.to_string().contains("absent"), "{absent}");
}

#[test]
fn failed_checkpoint_leaves_the_container_running() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("runc-root");
    let bundle = busybox_bundle(&dir.path().join("bundle"), &["/bin/sh", "-c", COUNTER_SCRIPT]).unwrap();
    // A host file on the container's stdout lies outside its mounts: CRIU cannot dump it, fails
    // half-way through the dump, and must resume the frozen container.
    let host_file = std::fs::File::create(dir.path().join("stdout.log")).unwrap();
    let container = RuncContainer::run_with_stdout(&root, "ck-fail", &bundle, Some(host_file)).unwrap();
    wait_counter_past(&bundle, 3).unwrap();
    let runc = Runc::new("runc", Some(root));
    let images = dir.path().join("images");
    let err = checkpoint_container(&runc, &Criu::from_path(), "ck-fail", &images, &Default::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Runc { action: "checkpoint", .. }), "{text}");
    assert!(text.contains("Can't lookup mount") && text.contains("is still running"), "{text}");
    assert!(images.join("dump.log").is_file(), "CRIU's log is kept for inspection");
    assert_eq!(container.status().as_deref(), Some("running"));
    let seen = read_counter(&bundle).unwrap();
    wait_counter_past(&bundle, seen + 1).unwrap();

    // A missing CRIU and an impossible option combination are refused before anything is frozen.
    let err = checkpoint_container(
        &runc,
        &Criu::new("/nonexistent/criu"),
        "ck-fail",
        &dir.path().join("a"),
        &Default::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/criu"), "{err}");
    let bad = CheckpointOptions {
        leave_running: true,
        flags: checkpoint_core::CriuFlags {
            manage_cgroups_mode: Some(checkpoint_core::CgroupsMode::Strict),
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(matches!(
        checkpoint_container(&runc, &Criu::from_path(), "ck-fail", &dir.path().join("b"), &bad),
        Err(Error::InvalidOptions(_))
    ));
    assert_eq!(container.status().as_deref(), Some("running"));
}

#[test]
fn restore_of_a_corrupt_image_fails_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "ck-corrupt");
    let criu = Criu::from_path();
    let images = dir.path().join("images");
    checkpoint_container(&runc, &criu, "ck-corrupt", &images, &CheckpointOptions::default()).unwrap();
    container.delete();
    // Damage the process tree image in place (same size, so only CRIU can notice).
    let pstree = images.join("pstree.img");
    let mut bytes = std::fs::read(&pstree).unwrap();
    let n = bytes.len();
    bytes[8..n].fill(0xff);
    std::fs::write(&pstree, bytes).unwrap();

    let req = ContainerRestore {
        id: "ck-corrupt".into(),
        bundle: container.bundle.clone(),
        image_dir: images,
        options: RestoreOptions { timeout: Some(std::time::Duration::from_secs(60)), ..Default::default() },
        pid_file: None,
        console_socket: None,
        no_pivot: false,
        lazy_pages: false,
        env: Vec::new(),
    };
    let err = restore_container(&runc, &criu, &req, ChildStdio::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Runc { action: "restore", .. }), "{text}");
    assert!(text.contains("was not restored") && text.contains("restore.log"), "{text}");
    assert_eq!(runc.state("ck-corrupt").unwrap(), None, "no half-created container is left");
}

/// The one runc client passes runc's global flags to every command it runs, checkpoint and restore
/// included. Where systemd manages cgroups (`/run/systemd/system` exists) the flag reaches runc as it
/// is; this machine runs no systemd, so a wrapper records each command line and drops
/// `--systemd-cgroup` before running the real runc, which then checkpoints and restores for real.
#[test]
fn checkpoint_and_restore_carry_systemd_cgroup_and_the_log_to_every_runc_call() {
    use checkpoint_core::bundle::{BundleLayout, ContainerIdentity, Durability};
    use checkpoint_core::{
        checkpoint_container_bundle, open_container_bundle, restore_container_bundle, ContainerCheckpoint, OpenOptions,
        RestoreTarget,
    };
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let (plain, container) = start(dir.path(), "ck-systemd");
    let calls = dir.path().join("runc-calls");
    let wrapper = dir.path().join("runc-wrapper");
    let script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$*\" >> {calls}\n[ -d /run/systemd/system ] && exec {real} \"$@\"\n\
         for a; do shift; [ \"$a\" = --systemd-cgroup ] || set -- \"$@\" \"$a\"; done\nexec {real} \"$@\"\n",
        calls = calls.display(),
        real = Runc::default().binary().display()
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("runc-log.json");
    let runc = Runc::new(&wrapper, plain.root().map(Path::to_path_buf)).with_systemd_cgroup(true).with_log(&log);
    let criu = Criu::from_path();

    let bundle_dir = dir.path().join("bundle-systemd");
    let request = ContainerCheckpoint {
        id: container.id.clone(),
        spec: container.bundle.join("config.json"),
        upperdir: None,
        identity: ContainerIdentity {
            namespace: "t".into(),
            name: "ck-systemd".into(),
            id: "ck-systemd".into(),
            ..Default::default()
        },
        runtime: "kybernate-tests".into(),
        gpu: None,
        layout: BundleLayout::Archive,
        durability: Durability::Synced,
        signer: Some(kybernate_tests::keys::node_key()),
        restored_at: None,
    };
    let opts = CheckpointOptions { work_dir: Some(dir.path().join("dump-work")), ..Default::default() };
    checkpoint_container_bundle(&runc, &criu, &bundle_dir, &request, &opts).unwrap();
    let stopped_at = read_counter(&container.bundle).unwrap();
    container.delete();

    let no_gpu = || Err("no GPU here".to_string());
    let trust = kybernate_tests::keys::trusted();
    let open = OpenOptions {
        accept_unsealed: false,
        accept_partial: false,
        lazy: false,
        hold: false,
        gpu: &no_gpu,
        gpu_match: Default::default(),
        trust: &trust,
        tenant: None,
    };
    let opened = open_container_bundle(&bundle_dir, &criu, &open).unwrap();
    let target = RestoreTarget {
        id: "ck-systemd".into(),
        bundle: container.bundle.clone(),
        work_dir: Some(dir.path().join("restore-work")),
        timeout: Some(std::time::Duration::from_secs(60)),
        pid_file: None,
        console_socket: None,
        no_pivot: false,
        gate_program: None,
    };
    let report = restore_container_bundle(&runc, &criu, &opened, &target, ChildStdio::default()).unwrap().report;
    let restored = RuncContainer::adopt(plain.root().unwrap(), "ck-systemd", &container.bundle, report.pid);
    assert_eq!(restored.status().as_deref(), Some("running"));
    wait_counter_past(&container.bundle, stopped_at).unwrap();

    let lines: Vec<String> = std::fs::read_to_string(&calls).unwrap().lines().map(str::to_string).collect();
    let global = format!("--log {} --log-format json --systemd-cgroup", log.display());
    for sub in [" checkpoint ", " restore "] {
        assert!(lines.iter().any(|l| l.contains(sub)), "no runc{sub}call: {lines:#?}");
    }
    for line in &lines {
        if !line.starts_with("--version") {
            assert!(line.contains(&global), "runc ran without its global flags: {line}");
        }
    }
}

/// A stop checkpoint (`leave_running: false`) of `container` with the writable layer `upperdir` into
/// `bundle_dir`, CRIU's log in `<dir>/dump-work`.
fn stop_checkpoint(
    runc: &Runc,
    container: &RuncContainer,
    dir: &Path,
    upperdir: &Path,
    bundle_dir: &Path,
) -> checkpoint_core::Result<checkpoint_core::BundleReport> {
    stop_checkpoint_with(runc, &Criu::from_path(), container, dir, upperdir, bundle_dir)
}

/// [`stop_checkpoint`] with `criu`.
fn stop_checkpoint_with(
    runc: &Runc,
    criu: &Criu,
    container: &RuncContainer,
    dir: &Path,
    upperdir: &Path,
    bundle_dir: &Path,
) -> checkpoint_core::Result<checkpoint_core::BundleReport> {
    let opts = CheckpointOptions { work_dir: Some(dir.join("dump-work")), ..Default::default() };
    checkpoint_core::checkpoint_container_bundle(runc, criu, bundle_dir, &stop_request(container, upperdir), &opts)
}

/// What a stop checkpoint (`leave_running: false`) of `container` into `dir` is told.
fn stop_request(container: &RuncContainer, upperdir: &Path) -> checkpoint_core::ContainerCheckpoint {
    checkpoint_core::ContainerCheckpoint {
        id: container.id.clone(),
        spec: container.bundle.join("config.json"),
        upperdir: Some(upperdir.to_path_buf()),
        identity: checkpoint_core::bundle::ContainerIdentity {
            namespace: "t".into(),
            name: container.id.clone(),
            id: container.id.clone(),
            ..Default::default()
        },
        runtime: "kybernate-tests".into(),
        gpu: None,
        layout: checkpoint_core::bundle::BundleLayout::Archive,
        durability: checkpoint_core::bundle::Durability::Synced,
        signer: Some(kybernate_tests::keys::node_key()),
        restored_at: None,
    }
}

/// Opens `dir` (a partial bundle when `partial`) and restores it under the container's id and bundle.
fn restore_bundle(dir: &Path, work: &Path, runc: &Runc, container: &RuncContainer, partial: bool) -> RuncContainer {
    restore_bundle_with(&Criu::from_path(), dir, work, runc, container, partial)
}

/// [`restore_bundle`] with `criu`.
fn restore_bundle_with(
    criu: &Criu,
    dir: &Path,
    work: &Path,
    runc: &Runc,
    container: &RuncContainer,
    partial: bool,
) -> RuncContainer {
    use checkpoint_core::{open_container_bundle, restore_container_bundle, OpenOptions, RestoreTarget};
    let no_gpu = || Err("no GPU here".to_string());
    let trust = kybernate_tests::keys::trusted();
    let open = OpenOptions {
        accept_unsealed: false,
        accept_partial: partial,
        lazy: false,
        hold: false,
        gpu: &no_gpu,
        gpu_match: Default::default(),
        trust: &trust,
        tenant: None,
    };
    let opened = open_container_bundle(dir, criu, &open).unwrap();
    let target = RestoreTarget {
        id: container.id.clone(),
        bundle: container.bundle.clone(),
        work_dir: Some(work.to_path_buf()),
        timeout: Some(std::time::Duration::from_secs(60)),
        pid_file: None,
        console_socket: None,
        no_pivot: false,
        gate_program: None,
    };
    let report = restore_container_bundle(runc, criu, &opened, &target, ChildStdio::default()).unwrap().report;
    RuncContainer::adopt(runc.root().unwrap(), &container.id, &container.bundle, report.pid)
}

/// A writable layer of `mib` MiB (one file), so that capturing and sealing it takes a while.
fn big_layer(dir: &Path, mib: usize) -> std::path::PathBuf {
    let upper = dir.join("upper");
    std::fs::create_dir_all(&upper).unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut file = std::fs::File::create(upper.join("data.bin")).unwrap();
    for _ in 0..mib {
        std::io::Write::write_all(&mut file, &block).unwrap();
    }
    upper
}

#[test]
fn a_stop_checkpoint_keeps_the_tasks_frozen_until_the_seal_and_then_ends_them() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "ck-frozen");
    let upper = big_layer(dir.path(), 96);
    let bundle_dir = dir.path().join("bundle-stop");
    let done = AtomicBool::new(false);
    let (report, seen) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut seen = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let status = runc.state("ck-frozen").ok().flatten().map(|st| format!("{:?}", st.status));
                if seen.last() != Some(&status) {
                    seen.push(status);
                }
            }
            seen
        });
        let report = stop_checkpoint(&runc, &container, dir.path(), &upper, &bundle_dir);
        done.store(true, Ordering::SeqCst);
        (report.unwrap(), watcher.join().unwrap())
    });
    assert!(report.rootfs.is_some_and(|r| r.content_bytes == 96 << 20));
    // Frozen after the dump, through the writable layer and the seal, then ended: never running again.
    // (During the dump CRIU may thaw the cgroup while it holds every task under ptrace.)
    // Ending it is SIGKILL while frozen, then a thaw, so runc may see it "running" for the instant the
    // kernel takes to deliver the signal; the counter below shows it executed nothing.
    let paused = seen.iter().rposition(|s| s.as_deref() == Some("Paused")).unwrap_or_else(|| panic!("{seen:?}"));
    let after = &seen[paused + 1..];
    let after = after.strip_prefix(&[Some("Running".to_string())]).unwrap_or(after);
    assert!(!after.is_empty() && after.iter().all(|s| matches!(s.as_deref(), Some("Stopped") | None)), "{seen:?}");
    assert!(checkpoint_core::bundle::is_complete(&bundle_dir));
    assert!(matches!(container.status().as_deref(), None | Some("stopped")), "{:?}", container.status());

    // It executed nothing after the dump: the restored counter writes the very next value.
    let stopped_at = read_counter(&container.bundle).unwrap();
    container.delete();
    let restored = restore_bundle(&bundle_dir, &dir.path().join("restore-work"), &runc, &container, false);
    assert_eq!(restored.status().as_deref(), Some("running"));
    assert_eq!(wait_counter_past(&container.bundle, stopped_at).unwrap(), stopped_at + 1);
}

/// A checkpoint that leaves the container running (the node agent's) captures the writable layer
/// while the tasks are still frozen from the dump, so the layer holds what the memory saw: restored,
/// the counter writes exactly the value after the one in the layer. The container runs on.
#[test]
fn a_running_checkpoint_captures_the_layer_while_frozen_and_the_container_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "ck-live");
    let rootfs = container.bundle.join("rootfs");
    let bundle_dir = dir.path().join("bundle-live");
    let opts =
        CheckpointOptions { leave_running: true, work_dir: Some(dir.path().join("dump-work")), ..Default::default() };
    // the whole rootfs stands for the overlay upper dir, so the counter file is in the layer
    let request = stop_request(&container, &rootfs);
    checkpoint_core::checkpoint_container_bundle(&runc, &Criu::from_path(), &bundle_dir, &request, &opts).unwrap();
    assert_eq!(container.status().as_deref(), Some("running"));
    let seen = read_counter(&container.bundle).unwrap();
    wait_counter_past(&container.bundle, seen + 2).unwrap();

    let mut layer = tar::Archive::new(std::fs::File::open(bundle_dir.join("rootfs-diff.tar")).unwrap());
    let in_layer: u64 = layer
        .entries()
        .unwrap()
        .map(Result::unwrap)
        .find(|e| e.path().unwrap().as_os_str() == "state/counter")
        .map(|mut e| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            text.trim().parse().unwrap()
        })
        .expect("the layer holds state/counter");
    container.delete();
    std::fs::write(rootfs.join("state/counter"), "0").unwrap();
    let restored = restore_bundle(&bundle_dir, &dir.path().join("restore-work"), &runc, &container, false);
    assert_eq!(restored.status().as_deref(), Some("running"));
    assert_eq!(wait_counter_past(&container.bundle, 0).unwrap(), in_layer + 1);
}

/// A tmpfs of `size` mounted at `dir` for the life of the value.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let data = format!("size={size}");
        nix::mount::mount(Some("tmpfs"), dir, Some("tmpfs"), nix::mount::MsFlags::empty(), Some(data.as_str()))
            .unwrap();
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_after_the_dump_keeps_the_images_as_partial_and_the_container_running() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "ck-enospc");
    // Room for the dump and the free-space preflight, not for the 40 MiB writable layer.
    let disk = Tmpfs::mount(&dir.path().join("small-disk"), "32m");
    let upper = big_layer(dir.path(), 40);
    let bundle_dir = disk.0.join("bundle");
    let err = stop_checkpoint(&runc, &container, dir.path(), &upper, &bundle_dir).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Partial { .. }), "{text}");
    assert!(text.contains("No space left on device") && text.contains("rootfs-diff.tar"), "{text}");

    // Nothing lost: the container runs on, the finished images stay, the bundle says it is partial.
    assert_eq!(container.status().as_deref(), Some("running"));
    let seen = read_counter(&container.bundle).unwrap();
    wait_counter_past(&container.bundle, seen + 1).unwrap();
    assert!(bundle_dir.join("checkpoint/inventory.img").is_file());
    assert!(!bundle_dir.join("rootfs-diff.tar").exists(), "the half-written layer is left out");
    let refused = checkpoint_core::bundle::verify(&bundle_dir).unwrap_err().to_string();
    assert!(refused.contains("partial") && refused.contains("allow-partial"), "{refused}");

    // The partial bundle restores its memory when asked to: the counter continues from the dump.
    let trust = kybernate_tests::keys::trusted();
    let (_, missing, signed) = checkpoint_core::bundle::verify_partial(&bundle_dir, Some(&trust)).unwrap();
    assert!(matches!(signed, Some(checkpoint_core::trust::Provenance::Signed { .. })), "{signed:?}");
    assert!(missing.contains("No space left on device"), "{missing}");
    let at_dump =
        checkpoint_core::bundle::verify_partial(&bundle_dir, None).unwrap().0.checkpoint.unwrap().pages_written;
    assert!(at_dump > 0);
    container.delete();
    let restored = restore_bundle(&bundle_dir, &dir.path().join("restore-work"), &runc, &container, true);
    assert_eq!(restored.status().as_deref(), Some("running"));
    let before = read_counter(&container.bundle).unwrap();
    wait_counter_past(&container.bundle, before).unwrap();
}

#[test]
fn a_disk_without_room_for_the_memory_is_refused_before_anything_is_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "ck-full");
    let disk = Tmpfs::mount(&dir.path().join("tiny-disk"), "4m");
    let bundle_dir = disk.0.join("bundle");
    let err = stop_checkpoint(&runc, &container, dir.path(), &dir.path().join("no-layer"), &bundle_dir).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Directory { .. }), "{text}");
    assert!(text.contains(&bundle_dir.display().to_string()) && text.contains("MiB are free there"), "{text}");
    assert!(!dir.path().join("dump-work").join("dump.log").exists(), "CRIU never ran");
    assert_eq!(container.status().as_deref(), Some("running"), "never frozen");
    assert!(bundle_dir.join(checkpoint_core::bundle::FAILED_MARKER).is_file());
}

/// CRIU's statistics describe a dump or restore that succeeded; a stats file that cannot be read
/// (here a CRIU wrapper overwrites each one with garbage after CRIU exits) must fail neither: the bundle
/// seals, the report has no CRIU timings, and the restore runs.
#[test]
fn unreadable_criu_statistics_fail_neither_the_checkpoint_nor_the_restore() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (runc, container) = start(dir.path(), "ck-stats");
    let bin = dir.path().join("criu-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        "#!/bin/sh\n{real} \"$@\"\nrc=$?\nfor f in {dir}/*-work/stats-*; do [ -f \"$f\" ] && printf garbage > \"$f\"; done\nexit $rc\n",
        real = Criu::from_path().binary().display(),
        dir = dir.path().display()
    );
    std::fs::write(bin.join("criu"), script).unwrap();
    std::fs::set_permissions(bin.join("criu"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let criu = Criu::new(bin.join("criu"));

    let bundle_dir = dir.path().join("bundle-stats");
    let upper = dir.path().join("no-upper");
    std::fs::create_dir_all(&upper).unwrap();
    let report = stop_checkpoint_with(&runc, &criu, &container, dir.path(), &upper, &bundle_dir).unwrap();
    assert_eq!(std::fs::read(dir.path().join("dump-work/stats-dump")).unwrap(), b"garbage", "the fault happened");
    assert_eq!((report.checkpoint.timings.frozen, report.checkpoint.pages_written), (std::time::Duration::ZERO, 0));
    checkpoint_core::bundle::verify(&bundle_dir).expect("the bundle is sealed");
    let stopped_at = read_counter(&container.bundle).unwrap();
    container.delete();

    let restored = restore_bundle_with(&criu, &bundle_dir, &dir.path().join("restore-work"), &runc, &container, false);
    assert_eq!(std::fs::read(dir.path().join("restore-work/stats-restore")).unwrap(), b"garbage");
    assert_eq!(restored.status().as_deref(), Some("running"));
    wait_counter_past(&container.bundle, stopped_at).unwrap();
}
