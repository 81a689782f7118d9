//! Diskless checkpoint on stop, on real containerd, runc and CRIU and a real S3 server (s3s-fs): the
//! bundle is sealed in memory (a tmpfs under /dev/shm) and pushed to S3 by the sidecar before the stop
//! returns; nothing is left on the node's disk or in memory, and a new container restores from S3 with
//! its counter. With the store down, the bundle is kept in the checkpoint directory instead, sealed,
//! and restores from there.

mod common;

use std::fs;
use std::path::PathBuf;

use checkpoint_core::bundle;
use common::*;
use kybernate_tests::s3::{S3Server, BUCKET};
use kybernate_tests::{kybernate_sidecar_binary, read_counter, wait_for, Containerd, COUNTER_SCRIPT};

/// A node whose checkpoints on stop are diskless into `memory`, with the sidecar reaching `s3` (and
/// `extra_env`, shell `export` lines, in its environment).
struct Node {
    c: Containerd,
    image: &'static str,
    memory: tempfile::TempDir,
    wrapper: PathBuf,
    _tools: tempfile::TempDir,
}

fn node(s3: &S3Server, extra_env: &str) -> Node {
    let memory = tempfile::Builder::new().prefix("kt-diskless-").tempdir_in("/dev/shm").unwrap();
    let tools = tempfile::tempdir().unwrap();
    // The shim runs the sidecar; this wrapper gives it the test's store.
    let wrapper = tools.path().join("kybernate-sidecar");
    let mut env: String = s3.sidecar_env().iter().map(|(k, v)| format!("export {k}='{v}'\n")).collect();
    env.push_str(extra_env);
    let sidecar = kybernate_sidecar_binary().unwrap();
    fs::write(&wrapper, format!("#!/bin/sh\n{env}exec {} --store s3://{BUCKET} \"$@\"\n", sidecar.display())).unwrap();
    fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = format!(
        "{CHECKPOINTS}checkpoint_mode = \"diskless\"\ndiskless_dir = {:?}\nsidecar_binary = {:?}\n\
         restore_dir = \"{{dir}}/restore\"\nrestore_roots = [\"{{dir}}/checkpoints\", \"s3://{BUCKET}\"]\n",
        memory.path().display().to_string(),
        wrapper.display().to_string(),
    );
    let (c, image) = setup_with(&config);
    Node { c, image, memory, wrapper, _tools: tools }
}

/// The keys of the store, through the sidecar.
fn stored_keys(node: &Node) -> Vec<String> {
    let out = std::process::Command::new(&node.wrapper).arg("ls").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "ls: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split('\t').next().unwrap().to_string()).collect()
}

/// Starts a container `id` restoring from `reference` and checks it resumes past `last`.
fn assert_resumes(c: &Containerd, image: &str, id: &str, reference: &str, last: u64) {
    let restore = format!("kybernate.io/restore-from={reference}");
    ctr_run(c, &["-d", "--annotation", &restore], image, id, &["sh", "-c", COUNTER_SCRIPT])
        .unwrap()
        .ok("ctr run with restore-from")
        .unwrap();
    let first = wait_for("the restored counter", TIMEOUT, || read_counter(&c.bundle(id))).unwrap();
    assert!(first >= last && first < last + 50, "resumed at {first}, checkpointed at {last}");
    counter_past(c, id, first);
    remove_task(c, id);
}

#[test]
fn a_diskless_checkpoint_goes_from_memory_to_the_store_and_restores() {
    let s3 = S3Server::start();
    let node = node(&s3, "");
    let c = &node.c;
    run_counter(c, node.image, "dl", &["--annotation", OPT_IN], COUNTER_SCRIPT);
    counter_past(c, "dl", 10);
    let (rm, last) = stop_and_remove(c, "dl");
    assert!(rm.contains("143"), "a checkpointed container exits as on SIGTERM (143): {rm}");

    let keys = stored_keys(&node);
    assert_eq!(keys.len(), 1, "one archive in the store: {keys:?}");
    let prefix = format!("{}/dl/dl/", c.namespace);
    assert!(keys[0].starts_with(&prefix) && keys[0].ends_with(".tar.zst"), "{keys:?}");
    assert_eq!(bundles(c), Vec::<PathBuf>::new(), "nothing on the node's disk");
    assert_eq!(files_in(node.memory.path()), Vec::<PathBuf>::new(), "the memory is freed");
    let log = c.log_tail(100_000);
    assert!(log.contains("diskless checkpoint pushed to the store"), "{log}");

    assert_resumes(c, node.image, "dl-back", &format!("s3://{BUCKET}/{}", keys[0]), last);
}

#[test]
fn a_diskless_checkpoint_the_store_does_not_take_is_kept_on_disk() {
    let mut s3 = S3Server::start();
    // One attempt per request: the push fails as soon as the store refuses the connection.
    let node = node(&s3, "export KYBERNATE_S3_MAX_ATTEMPTS=1\n");
    let c = &node.c;
    run_counter(c, node.image, "dk", &["--annotation", OPT_IN], COUNTER_SCRIPT);
    counter_past(c, "dk", 10);
    s3.stop();
    let (rm, last) = stop_and_remove(c, "dk");
    assert!(rm.contains("143"), "still checkpointed: {rm}");

    let found = bundles(c);
    assert_eq!(found.len(), 1, "kept in the checkpoint directory: {found:?}");
    let manifest = bundle::verify(&found[0]).expect("a sealed bundle");
    assert_eq!(manifest.container.id, "dk");
    assert_eq!(files_in(node.memory.path()), Vec::<PathBuf>::new(), "the memory is freed");
    let log = c.log_tail(100_000);
    assert!(log.contains("the diskless checkpoint could not be pushed; it is kept on disk"), "{log}");

    assert_resumes(c, node.image, "dk-back", &found[0].display().to_string(), last);
}
