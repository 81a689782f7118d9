//! Lazy restore through `ctr` and a private containerd (real CRIU, runc and userfaultfd): a
//! container checkpointed on stop is restored with `kybernate.io/restore-mode=lazy`, runs while
//! CRIU's lazy-pages daemon copies its memory in, and its memory is intact; a daemon that dies
//! mid-fill, or a page image that does not match its signed hash, gets the container killed
//! (exit 137), never left running on missing or foreign pages; without userfaultfd the restore is
//! full and the log says why.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kybernate_tests::{pids_with_arg, wait_for, Containerd};

mod common;

/// A counter whose shell holds 32 MiB of random text and checks it on every round: it writes
/// `<round> <1 if the text is unchanged, else 0>` to `/state/mem` and the round to `/state/counter`.
const MEMORY_CHECKER: &str = "x=$(head -c 33554432 /dev/urandom | base64); want=$(echo \"$x\" | md5sum); i=0; \
     while :; do i=$((i+1)); ok=0; [ \"$(echo \"$x\" | md5sum)\" = \"$want\" ] && ok=1; \
     echo \"$i $ok\" > /state/mem.new; mv /state/mem.new /state/mem; \
     echo $i > /state/counter.new; mv /state/counter.new /state/counter; done";

/// A counter next to a process holding 512 MiB of random bytes (a `dd` whose one 512 MiB block
/// waits on a pipe nobody reads), so that a lazy restore takes a while to copy everything in. The
/// counter starts once the block is full.
const BIG_MEMORY: &str = "dd if=/dev/urandom bs=512M count=1 2>/dev/null | sleep 100000 & \
     while [ \"$(awk '/VmRSS/ {print $2}' /proc/$(pidof dd)/status 2>/dev/null || echo 0)\" -lt 520000 ]; do sleep 0.1; done; \
     i=0; while :; do i=$((i+1)); echo $i > /state/counter.new; mv /state/counter.new /state/counter; sleep 0.1; done";

const LAZY: &str = "kybernate.io/restore-mode=lazy";

/// `(round, memory intact)` from a [`MEMORY_CHECKER`] container's rootfs.
fn memory_state(c: &Containerd, id: &str) -> Option<(u64, bool)> {
    let text = fs::read_to_string(c.bundle(id).join("rootfs/state/mem")).ok()?;
    let (round, ok) = text.trim().split_once(' ')?;
    Some((round.parse().ok()?, ok == "1"))
}

/// Runs `script` opted in to checkpoint on stop as `id`, waits until it counted past 2, stops it
/// (a checkpoint is taken) and returns the bundle and the last value it counted. A
/// [`MEMORY_CHECKER`] must have found its memory intact before it stopped.
fn bundle_of(c: &Containerd, image: &str, id: &str, script: &str) -> (PathBuf, u64) {
    run_counter(c, image, id, &["--annotation", OPT_IN], script);
    counter_past(c, id, 2);
    if script == MEMORY_CHECKER {
        assert_eq!(
            memory_state(c, id).map(|(_, intact)| intact),
            Some(true),
            "the memory check works before the checkpoint"
        );
    }
    bundle_of_stopped(c, id)
}

/// `ctr run -d` of a container restored from `bundle` with extra annotations.
fn restore(c: &Containerd, image: &str, id: &str, bundle: &Path, annotations: &[&str]) {
    let from = format!("kybernate.io/restore-from={}", bundle.display());
    let mut flags = vec!["-d", "--annotation", &from];
    for a in annotations {
        flags.extend(["--annotation", a]);
    }
    ctr_run(c, &flags, image, id, &["sh", "-c", "exit 99"]).unwrap().ok("ctr run with restore-from").unwrap();
}

/// Waits until containerd's log (which carries the shim's) holds a line with every one of `needles`.
fn wait_log(c: &Containerd, needles: &[&str]) -> String {
    wait_for(&format!("a log line with {needles:?}"), TIMEOUT, || {
        let log = fs::read_to_string(&c.log).ok()?;
        log.lines().find(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(40)))
}

/// The lazy-pages daemons serving `bundle`.
fn page_servers(bundle: &Path) -> Vec<i32> {
    pids_with_arg(&format!("lazy-pages --images-dir {}", bundle.display()))
}

#[test]
fn a_lazy_restore_resumes_with_its_memory_intact() {
    let (c, image) = setup_with(CHECKPOINTS);
    let (bundle, last) = bundle_of(&c, image, "src", MEMORY_CHECKER);

    restore(&c, image, "lazy", &bundle, &[LAZY]);
    let line = wait_log(&c, &["container restored", "id=lazy", "lazy_page_server="]);
    assert!(!line.contains("lazy_page_server=None"), "{line}");
    wait_log(&c, &["lazy restore: every page is in and verified", "id=lazy"]);
    // Two rounds after the restore: the whole text was read back through the restored memory.
    let after = wait_for("two memory checks after the restore", TIMEOUT, || {
        memory_state(&c, "lazy").filter(|(round, _)| *round >= last + 2)
    })
    .unwrap();
    assert!(after.1, "the restored memory differs from the checkpointed one: {after:?}");
    assert_eq!(c.task_status("lazy").as_deref(), Some("RUNNING"));
    assert!(page_servers(&bundle).is_empty(), "the daemon exits once every page is in");
    remove_task(&c, "lazy");
}

#[test]
fn a_page_server_dying_mid_fill_gets_the_container_killed() {
    let (c, image) = setup_with(CHECKPOINTS);
    let (bundle, _) = bundle_of(&c, image, "big", BIG_MEMORY);
    restore(&c, image, "cut", &bundle, &[LAZY]);
    // The container runs; 512 MiB are still being copied in.
    let servers = page_servers(&bundle);
    assert_eq!(servers.len(), 1, "one lazy-pages daemon is still filling the 512 MiB: {servers:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(servers[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    c.wait_task_status("cut", "STOPPED", TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(40)));
    assert_eq!(exit_status(&c, "cut"), 137, "the container is killed, not left on missing pages");
    wait_log(&c, &["lazy restore failed after the container started; it was killed", "id=cut", "lazy-pages"]);
    remove_task(&c, "cut");
}

#[test]
fn a_page_image_that_does_not_match_its_hash_gets_the_lazily_restored_container_killed() {
    let (c, image) = setup_with(CHECKPOINTS);
    let (bundle, _) = bundle_of(&c, image, "src", MEMORY_CHECKER);
    // The last byte of the largest page image (inside the workload's text) is changed after sealing.
    let largest = fs::read_dir(bundle.join("checkpoint"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = fs::read(&largest).unwrap();
    *bytes.last_mut().unwrap() ^= 0x01;
    fs::write(&largest, &bytes).unwrap();

    restore(&c, image, "tampered", &bundle, &[LAZY]);
    c.wait_task_status("tampered", "STOPPED", TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(40)));
    assert_eq!(exit_status(&c, "tampered"), 137);
    let name = largest.file_name().unwrap().to_string_lossy().to_string();
    wait_log(&c, &["lazy restore failed after the container started; it was killed", "id=tampered", &name]);
    remove_task(&c, "tampered");
}

#[test]
fn without_userfaultfd_a_lazy_restore_is_full_and_the_log_says_why() {
    // A CRIU whose feature check finds no non-cooperative userfaultfd, as on kernels without it.
    let wrapper = tempfile::tempdir().unwrap();
    let criu = wrapper.path().join("criu");
    let real = kybernate_tests::find_criu().unwrap();
    let script = format!(
        "#!/bin/sh\n[ \"$1 $2 $3\" = \"check --feature uffd-noncoop\" ] && exit 1\nexec {} \"$@\"\n",
        real.display()
    );
    fs::write(&criu, script).unwrap();
    fs::set_permissions(&criu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = format!("{CHECKPOINTS}criu_binary = {:?}\n", criu.display().to_string());
    let (c, image) = setup_with(&config);
    let (bundle, last) = bundle_of(&c, image, "src", MEMORY_CHECKER);

    restore(&c, image, "full", &bundle, &[LAZY]);
    wait_log(&c, &["restoring fully, not lazily", "userfaultfd"]);
    let line = wait_log(&c, &["container restored", "id=full"]);
    assert!(!line.contains("lazy_page_server"), "a full restore has no page server: {line}");
    let after = wait_for("a memory check after the restore", TIMEOUT, || {
        memory_state(&c, "full").filter(|(round, _)| *round > last)
    })
    .unwrap();
    assert!(after.1, "{after:?}");
    remove_task(&c, "full");
}

#[test]
fn an_unknown_restore_mode_is_refused_by_name() {
    let (c, image) = setup_with(CHECKPOINTS);
    let (bundle, _) = bundle_of(&c, image, "src", COUNTER);
    let from = format!("kybernate.io/restore-from={}", bundle.display());
    let out = ctr_run(
        &c,
        &["-d", "--annotation", &from, "--annotation", "kybernate.io/restore-mode=fast"],
        image,
        "odd",
        &["sh", "-c", "exit 99"],
    )
    .unwrap();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(
        out.stderr.trim_end(),
        "ctr: failed to create shim task: annotation kybernate.io/restore-mode=\"fast\" is not a restore mode: use \"full\" \
         or \"lazy\": invalid argument"
    );
    let _ = c.ctr_run(&["containers", "rm", "odd"], Duration::from_secs(30));
}

/// The plain counter.
const COUNTER: &str = kybernate_tests::COUNTER_SCRIPT;

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_remote_lazy_restore_runs_while_the_sidecar_serves_its_pages_from_the_store() {
    let sidecar = kybernate_tests::kybernate_sidecar_binary().unwrap();
    let config = format!(
        "{CHECKPOINTS}restore_dir = \"{{dir}}/restore\"\nsidecar_binary = {:?}\n",
        sidecar.display().to_string()
    );
    let (c, image) = setup_with(&config);
    let (bundle, last) = bundle_of(&c, image, "src", MEMORY_CHECKER);
    // Shipped as a plain tar to a filesystem store, so its pages can be read where they lie; the
    // node's copy is gone.
    let store = c.dir.path().join("store");
    let push = std::process::Command::new(&sidecar)
        .arg("--checkpoint-dir")
        .arg(checkpoint_root(&c))
        .args(["--store", &format!("file://{}", store.display()), "--compression", "none", "push"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert_eq!(push.status.code(), Some(0), "push: {}", String::from_utf8_lossy(&push.stderr));
    let archives: Vec<PathBuf> =
        files_under(&store).into_iter().filter(|p| p.extension().is_some_and(|e| e == "tar")).collect();
    assert_eq!(archives.len(), 1, "one plain tar in the store: {archives:?}");
    fs::remove_dir_all(&bundle).unwrap();

    restore(&c, image, "remote", &archives[0], &[LAZY]);
    let published =
        wait_log(&c, &["bundle published; its pages are served as the lazy restore asks for them", "id=remote"]);
    let restored = wait_log(&c, &["container restored", "id=remote", "lazy_page_server="]);
    assert!(!restored.contains("lazy_page_server=None"), "{restored}");
    let log = fs::read_to_string(&c.log).unwrap();
    assert!(log.find(&published) < log.find(&restored), "the bundle is published before the restore");
    wait_log(&c, &["lazy restore: every page is in and verified", "id=remote"]);
    let after = wait_for("two memory checks after the restore", TIMEOUT, || {
        memory_state(&c, "remote").filter(|(round, _)| *round >= last + 2)
    })
    .unwrap();
    assert!(after.1, "the memory served from the store differs from the checkpointed one: {after:?}");
    assert_eq!(c.task_status("remote").as_deref(), Some("RUNNING"));
    assert!(pids_with_arg("--serve-pages").is_empty(), "the sidecar exits once every page is on disk");
    remove_task(&c, "remote");
}
