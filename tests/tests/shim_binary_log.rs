//! `binary://` logging URIs (what nerdctl's `run -d` and `ctr run --log-uri` use) on
//! containerd-shim-kybernate-v1 under a real, private containerd: the logging binary
//! (`kybernate-test-logger`) gets the process's stdout and stderr, the query as arguments and only
//! `CONTAINER_ID`/`CONTAINER_NAMESPACE` as environment; it runs as the shim's child and is gone (not a
//! zombie) once the process was deleted; a missing binary, or one that fails before it is ready, fails
//! the run clearly and leaves nothing behind.
//!
//! Every test starts its own containerd and fails — never skips — when containerd or runc are missing.

use std::fs;
use std::path::Path;

use common::*;
use kybernate_tests::{wait_for, Containerd};

mod common;

const LOGGER: &str = env!("CARGO_BIN_EXE_kybernate-test-logger");

fn lines(log: &Path) -> Vec<String> {
    fs::read_to_string(log).unwrap_or_default().lines().map(str::to_string).collect()
}

/// The rest of the first line of `log` that starts with `key `.
fn field(log: &[String], key: &str) -> String {
    let prefix = format!("{key} ");
    log.iter().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {key:?} line in {log:#?}")).into()
}

/// The logger's pid and its parent's, from its `pid <pid> ppid <ppid>` line.
fn pids(log: &[String]) -> (i32, i32) {
    let line = field(log, "pid");
    let (pid, ppid) = line.split_once(" ppid ").unwrap();
    (pid.parse().unwrap(), ppid.parse().unwrap())
}

/// Waits until `log` holds all of `wanted` as lines; all its lines.
fn wait_lines(c: &Containerd, log: &Path, wanted: &[&str]) -> Vec<String> {
    wait_for(&format!("{wanted:?} in {}", log.display()), TIMEOUT, || {
        let got = lines(log);
        wanted.iter().all(|w| got.iter().any(|l| l == w)).then_some(got)
    })
    .unwrap_or_else(|e| panic!("{e}: {:#?}\ncontainerd log:\n{}", lines(log), c.log_tail(40)))
}

/// Whether `pid` is gone, zombie included.
fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// A failed `ctr run` left no task, runc container, shim or rootfs mount; the container record
/// `ctr run` made before the task failed removes cleanly.
fn assert_nothing_left(c: &Containerd, id: &str) {
    assert_eq!(c.task_status(id), None);
    assert!(!c.runc_containers().contains(&id.to_string()), "{:?}", c.runc_containers());
    wait_for("the shim of the failed run to exit", TIMEOUT, || c.shim_pids_for(id).is_empty().then_some(())).unwrap();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&c.bundle(id).display().to_string()), "{mounts}");
    c.ctr_ok(&["containers", "rm", id]).unwrap();
}

#[test]
fn a_logging_binary_gets_the_output_and_ends_with_its_process() {
    let (c, image) = setup();
    let log = c.dir.path().join("init.log");
    let uri = format!("binary://{LOGGER}?file={}&mode=test", log.display());
    let script = "echo out-1; echo err-1 >&2; echo out-2; exec sleep 1000";
    ctr_run(&c, &["-d", "--log-uri", &uri], image, "blog", &["sh", "-c", script])
        .unwrap()
        .ok("ctr run -d --log-uri")
        .unwrap();
    let init_log = wait_lines(&c, &log, &["stdout out-1", "stderr err-1", "stdout out-2"]);
    let position = |l: &str| init_log.iter().position(|x| x == l).unwrap();
    assert!(position("stdout out-1") < position("stdout out-2"), "{init_log:#?}");
    assert_eq!(field(&init_log, "args"), format!("file {} mode test", log.display()));
    assert_eq!(field(&init_log, "env"), format!("CONTAINER_ID=blog CONTAINER_NAMESPACE={}", c.namespace));
    let (logger, parent) = pids(&init_log);
    let shim = c.shim_pids_for("blog");
    assert_eq!(shim, [parent], "the logging binary must be the shim's child");

    // An exec'd process gets a logging binary of its own, which containerd names by the exec id;
    // `ctr tasks exec` deletes the process once it exited, and with it goes the binary.
    let exec_log = c.dir.path().join("exec.log");
    let exec_uri = format!("binary://{LOGGER}?file={}", exec_log.display());
    let out = c
        .ctr_run(
            &["tasks", "exec", "--exec-id", "e1", "--log-uri", &exec_uri, "blog", "sh", "-c", "echo exec-out; exit 3"],
            TIMEOUT,
        )
        .unwrap();
    assert_eq!(out.code, Some(3), "{out:?}");
    let exec_lines = wait_lines(&c, &exec_log, &["stdout exec-out", "eof"]);
    assert_eq!(field(&exec_lines, "env"), format!("CONTAINER_ID=e1 CONTAINER_NAMESPACE={}", c.namespace));
    let (exec_logger, exec_parent) = pids(&exec_lines);
    assert_eq!(exec_parent, shim[0]);
    assert!(gone(exec_logger), "the exec's logging binary (pid {exec_logger}) outlived the exec's deletion");
    assert!(!gone(logger), "the init's logging binary must run as long as the task");

    // Kill and delete: the binary read everything up to EOF, exited by itself, and was reaped.
    remove_task(&c, "blog");
    assert!(gone(logger), "the logging binary (pid {logger}) outlived the task's deletion");
    assert_eq!(lines(&log).last().map(String::as_str), Some("eof"), "{:#?}", lines(&log));
    wait_shims_gone(&c);
}

#[test]
fn a_missing_logging_binary_fails_the_run_and_leaves_nothing() {
    let (c, image) = setup();
    let uri = "binary:///nonexistent/kybernate-logger?file=/tmp/never";
    let out = ctr_run(&c, &["-d", "--log-uri", uri], image, "nolog", &["sleep", "1000"]).unwrap();
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("logging binary /nonexistent/kybernate-logger does not exist"), "{out:?}");
    assert_nothing_left(&c, "nolog");
}

#[test]
fn a_logging_binary_that_fails_to_start_fails_the_run_and_leaves_nothing() {
    let (c, image) = setup();
    let log = c.dir.path().join("failing.log");
    let uri = format!("binary://{LOGGER}?file={}&fail=3", log.display());
    let out = ctr_run(&c, &["-d", "--log-uri", &uri], image, "badlog", &["sleep", "1000"]).unwrap();
    assert_ne!(out.code, Some(0), "{out:?}");
    let message = format!("logging binary {LOGGER} exited with status 3 before it was ready");
    assert!(out.stderr.contains(&message), "{out:?}");
    let (logger, _) = pids(&lines(&log));
    assert!(gone(logger), "the failed logging binary (pid {logger}) was not reaped");
    assert_nothing_left(&c, "badlog");
}
