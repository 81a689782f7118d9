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
    wait_log_within(c, needles, TIMEOUT)
}

/// [`wait_log`] with its own bound.
fn wait_log_within(c: &Containerd, needles: &[&str], within: Duration) -> String {
    wait_for(&format!("a log line with {needles:?}"), within, || {
        let log = fs::read_to_string(&c.log).ok()?;
        log.lines().find(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(40)))
}

/// How long a remote lazy restore may take to fetch every page and hash it: the sidecar's reads of the
/// store and the shim's hashing (unoptimized in tests) share two cores with the other tests' workloads.
const REMOTE_FILL: Duration = Duration::from_secs(300);

/// Waits until no sidecar serves pages into `c`'s restore directory any more.
fn wait_sidecars_gone(c: &Containerd) {
    let restores = c.dir.path().join("restore").display().to_string();
    wait_for("the sidecar serving pages to exit", TIMEOUT, || pids_with_arg(&restores).is_empty().then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {:?}", pids_with_arg(&restores)));
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

/// The shim config of the remote lazy tests: the shim's sidecar is the wrapper [`sidecar_wrapper`]
/// writes, restores are fetched into the instance's directory and may come from there or from the
/// test S3 server's bucket.
const REMOTE: &str =
    "checkpoint_dir = \"{dir}/checkpoints\"\nrestore_dir = \"{dir}/restore\"\nsidecar_binary = \"{dir}/sidecar\"\n\
     restore_roots = [\"{dir}\", \"s3://bundles\"]\n";

/// Writes the sidecar the shim runs for an instance started with [`REMOTE`]: the real one with
/// `flags` (its store, compression and key, as a node's sidecar config would set them) and `env`.
fn sidecar_wrapper(c: &Containerd, flags: &[String], env: &[(&str, String)]) -> PathBuf {
    let sidecar = kybernate_tests::kybernate_sidecar_binary().unwrap();
    let wrapper = c.dir.path().join("sidecar");
    let exports: String = env.iter().map(|(k, v)| format!("export {k}={v:?}\n")).collect();
    let flags: Vec<String> = flags.iter().map(|f| format!("{f:?}")).collect();
    let script = format!("#!/bin/sh\n{exports}exec {:?} {} \"$@\"\n", sidecar.display().to_string(), flags.join(" "));
    fs::write(&wrapper, script).unwrap();
    fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    wrapper
}

/// Pushes `bundle` to the store of `wrapper` (`store_url`) as the one archive there, removes the
/// node's copy, and returns the archive's reference.
fn ship(c: &Containerd, wrapper: &Path, store_url: &str, bundle: &Path) -> String {
    let push = std::process::Command::new(wrapper)
        .arg("--checkpoint-dir")
        .arg(checkpoint_root(c))
        .arg("push")
        .arg(bundle)
        .output()
        .unwrap();
    assert_eq!(push.status.code(), Some(0), "push: {}", String::from_utf8_lossy(&push.stderr));
    let ls = std::process::Command::new(wrapper).arg("ls").output().unwrap();
    assert_eq!(ls.status.code(), Some(0), "ls: {}", String::from_utf8_lossy(&ls.stderr));
    let keys: Vec<String> =
        String::from_utf8_lossy(&ls.stdout).lines().map(|l| l.split('\t').next().unwrap().to_string()).collect();
    assert_eq!(keys.len(), 1, "one archive in the store: {keys:?}");
    assert!(!keys[0].contains(".zst"), "stored uncompressed: {keys:?}");
    fs::remove_dir_all(bundle).unwrap();
    match store_url.strip_prefix("file://") {
        Some(dir) => format!("{dir}/{}", keys[0]),
        None => format!("{store_url}/{}", keys[0]),
    }
}

/// Ships `bundle` (of a [`MEMORY_CHECKER`] that counted to `last`) with [`ship`], and checks that a
/// lazy restore of the archive as `id` runs while the sidecar serves its pages: the bundle is
/// published before the restore, every page comes in and verifies, the memory is intact, and the
/// sidecar exits once every page is on disk.
fn assert_remote_lazy_restore(
    c: &Containerd,
    image: &str,
    wrapper: &Path,
    store_url: &str,
    bundle: &Path,
    last: u64,
    id: &str,
) {
    let reference = ship(c, wrapper, store_url, bundle);
    restore(c, image, id, Path::new(&reference), &[LAZY]);
    let with_id = format!("id={id}");
    let published =
        wait_log(c, &["bundle published; its pages are served as the lazy restore asks for them", &with_id]);
    let restored = wait_log(c, &["container restored", &with_id, "lazy_page_server="]);
    assert!(!restored.contains("lazy_page_server=None"), "{restored}");
    let log = fs::read_to_string(&c.log).unwrap();
    assert!(log.find(&published) < log.find(&restored), "the bundle is published before the restore");
    wait_log_within(c, &["lazy restore: every page is in and verified", &with_id], REMOTE_FILL);
    let after = wait_for("two memory checks after the restore", TIMEOUT, || {
        memory_state(c, id).filter(|(round, _)| *round >= last + 2)
    })
    .unwrap();
    assert!(after.1, "the memory served from the store differs from the checkpointed one: {after:?}");
    assert_eq!(c.task_status(id).as_deref(), Some("RUNNING"));
    wait_sidecars_gone(c);
    remove_task(c, id);
}

/// The flags of a sidecar that stores uncompressed archives at `store_url`.
fn uncompressed(store_url: &str) -> Vec<String> {
    ["--store", store_url, "--compression", "none"].map(String::from).to_vec()
}

#[test]
fn a_remote_lazy_restore_runs_while_the_sidecar_serves_its_pages_from_the_store() {
    let (c, image) = setup_with(REMOTE);
    let store = format!("file://{}", c.dir.path().join("store").display());
    let wrapper = sidecar_wrapper(&c, &uncompressed(&store), &[]);
    let (bundle, last) = bundle_of(&c, image, "src", MEMORY_CHECKER);
    assert_remote_lazy_restore(&c, image, &wrapper, &store, &bundle, last, "remote");
}

#[test]
fn an_encrypted_archive_is_restored_lazily_chunk_by_chunk() {
    let (c, image) = setup_with(REMOTE);
    let key = c.dir.path().join("store.key");
    let sidecar = kybernate_tests::kybernate_sidecar_binary().unwrap();
    let keygen = std::process::Command::new(&sidecar).arg("keygen").arg("--out").arg(&key).output().unwrap();
    assert_eq!(keygen.status.code(), Some(0), "keygen: {}", String::from_utf8_lossy(&keygen.stderr));
    let store = format!("file://{}", c.dir.path().join("store").display());
    let mut flags = uncompressed(&store);
    flags.extend(["--encryption-key-file".into(), key.display().to_string()]);
    let wrapper = sidecar_wrapper(&c, &flags, &[]);
    let (bundle, last) = bundle_of(&c, image, "src", MEMORY_CHECKER);
    assert_remote_lazy_restore(&c, image, &wrapper, &store, &bundle, last, "sealed");
}

#[test]
fn an_s3_archive_is_restored_lazily_with_ranged_gets() {
    let s3 = kybernate_tests::s3::S3Server::start();
    let (c, image) = setup_with(REMOTE);
    let store = format!("s3://{}", kybernate_tests::s3::BUCKET);
    let wrapper = sidecar_wrapper(&c, &uncompressed(&store), &s3.sidecar_env());
    let (bundle, last) = bundle_of(&c, image, "src", MEMORY_CHECKER);
    assert_remote_lazy_restore(&c, image, &wrapper, &store, &bundle, last, "from-s3");
}

#[test]
fn a_store_that_fails_mid_fill_gets_the_remotely_restored_container_killed() {
    let mut s3 = kybernate_tests::s3::S3Server::start();
    let (c, image) = setup_with(REMOTE);
    let store = format!("s3://{}", kybernate_tests::s3::BUCKET);
    // One attempt per request: the fill fails as soon as the store refuses the connection.
    let mut env = s3.sidecar_env();
    env.push(("KYBERNATE_S3_MAX_ATTEMPTS", "1".into()));
    let wrapper = sidecar_wrapper(&c, &uncompressed(&store), &env);
    let (bundle, _) = bundle_of(&c, image, "big", BIG_MEMORY);
    let reference = ship(&c, &wrapper, &store, &bundle);
    restore(&c, image, "cut", Path::new(&reference), &[LAZY]);
    // The 512 MiB are still being fetched when the store goes away.
    wait_log(&c, &["bundle published; its pages are served as the lazy restore asks for them", "id=cut"]);
    s3.stop();
    c.wait_task_status("cut", "STOPPED", TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(40)));
    assert_eq!(exit_status(&c, "cut"), 137, "the container is killed, not left waiting on pages that will not come");
    wait_log(&c, &["lazy restore failed after the container started; it was killed", "id=cut"]);
    wait_sidecars_gone(&c);
    remove_task(&c, "cut");
}
