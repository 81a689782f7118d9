//! Helpers shared by the test files that drive the shim through a private containerd with `ctr`.
#![allow(dead_code)] // each test file uses its own subset

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::Result;
use checkpoint_core::bundle::{COMPLETE_MARKER, FAILED_MARKER};
use kybernate_tests::{kybernate_shim_binary, read_counter, wait_for, Containerd, COUNTER_SCRIPT, KYBERNATE_RUNTIME};

pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stop may take: a checkpoint on stop may use the whole default checkpoint budget (2
/// minutes) on a loaded machine before the container exits.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(150);

pub fn setup() -> (Containerd, &'static str) {
    let shim = kybernate_shim_binary().unwrap();
    let containerd = Containerd::start(&shim).unwrap();
    let image = containerd.import_busybox().unwrap();
    (containerd, image)
}

/// `ctr run` arguments that select the Kybernate runtime with the instance's shim config.
pub fn runtime_args(c: &Containerd) -> Vec<String> {
    vec![
        "--runtime".into(),
        KYBERNATE_RUNTIME.into(),
        "--runtime-config-path".into(),
        c.shim_config.display().to_string(),
    ]
}

pub fn ctr_run(
    c: &Containerd,
    flags: &[&str],
    image: &str,
    id: &str,
    args: &[&str],
) -> Result<kybernate_tests::CmdOutput> {
    let mut all: Vec<String> = vec!["run".into()];
    all.extend(flags.iter().map(|s| s.to_string()));
    all.extend(runtime_args(c));
    all.push(image.into());
    all.push(id.into());
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    c.ctr_run(&refs, TIMEOUT)
}

/// Runs the counter container `id` detached and waits until it counted past `min`.
pub fn start_counter(c: &Containerd, image: &str, id: &str, min: u64) -> u64 {
    ctr_run(c, &["-d"], image, id, &["sh", "-c", COUNTER_SCRIPT]).unwrap().ok("ctr run -d").unwrap();
    counter_past(c, id, min)
}

pub fn counter_past(c: &Containerd, id: &str, min: u64) -> u64 {
    let bundle = c.bundle(id);
    wait_for(&format!("the counter of {id} to pass {min}"), Duration::from_secs(30), || {
        read_counter(&bundle).filter(|v| *v > min)
    })
    .unwrap()
}

pub fn remove_task(c: &Containerd, id: &str) -> kybernate_tests::CmdOutput {
    let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", id], TIMEOUT);
    c.wait_task_status(id, "STOPPED", TIMEOUT).unwrap();
    let out = c.ctr_run(&["tasks", "rm", id], TIMEOUT).unwrap();
    assert_eq!(out.code, Some(0), "ctr tasks rm {id}: {out:?}");
    c.ctr_ok(&["containers", "rm", id]).unwrap();
    out
}

/// Waits until the instance's shims exited (they do once their last container was deleted).
pub fn wait_shims_gone(c: &Containerd) {
    if let Err(e) = wait_for("the shim to exit", TIMEOUT, || c.shim_pids().is_empty().then_some(())) {
        let threads: Vec<String> = c
            .shim_pids()
            .iter()
            .flat_map(|pid| fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten())
            .map(|t| {
                let read = |f: &str| fs::read_to_string(t.path().join(f)).unwrap_or_default().trim().to_string();
                format!("{:?} {} {} {}", t.file_name(), read("comm"), read("wchan"), read("stack").replace('\n', " | "))
            })
            .collect();
        panic!("{e}: {:?}\nthreads: {threads:#?}\ncontainerd log:\n{}", c.shim_pids(), c.log_tail(60));
    }
}

/// A ttrpc client of the shim serving task `id` (its address is in the bundle), for requests `ctr` of
/// containerd 1.6 cannot send to a non-runc runtime.
pub fn shim_client(c: &Containerd, id: &str) -> containerd_shim_protos::TaskClient {
    let address = fs::read_to_string(c.bundle(id).join("address")).unwrap();
    let client = containerd_shim_protos::ttrpc::Client::connect(address.trim()).unwrap();
    containerd_shim_protos::TaskClient::new(client)
}

/// The exit status of task `id` (it has stopped), as its shim reports it.
pub fn exit_status(c: &Containerd, id: &str) -> u32 {
    let wait = containerd_shim_protos::shim::shim::WaitRequest { id: id.into(), ..Default::default() };
    shim_client(c, id).wait(ttrpc_timeout(), &wait).unwrap().exit_status
}

pub fn ttrpc_timeout() -> containerd_shim_protos::ttrpc::context::Context {
    containerd_shim_protos::ttrpc::context::with_timeout(TIMEOUT.as_nanos() as i64)
}

/// A CheckpointTaskRequest for `id` into `path`, with runc's checkpoint options.
pub fn checkpoint_request(
    id: &str,
    path: &Path,
    opts: containerd_shim_protos::shim::oci::CheckpointOptions,
) -> containerd_shim_protos::shim::shim::CheckpointTaskRequest {
    use containerd_shim_protos::protobuf::Message;
    containerd_shim_protos::shim::shim::CheckpointTaskRequest {
        id: id.into(),
        path: path.display().to_string(),
        options: containerd_shim_protos::protobuf::MessageField::some(
            containerd_shim_protos::protobuf::well_known_types::any::Any {
                type_url: "containerd.runc.v1.CheckpointOptions".into(),
                value: opts.write_to_bytes().unwrap(),
                ..Default::default()
            },
        ),
        ..Default::default()
    }
}

/// `ctr events`, captured into a file until stopped.
pub struct Events {
    child: Child,
    file: std::path::PathBuf,
}

impl Events {
    pub fn start(c: &Containerd) -> Events {
        let file = c.dir.path().join("events.txt");
        let child = c
            .ctr()
            .arg("events")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&file).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Events { child, file }
    }

    pub fn text(&self) -> String {
        fs::read_to_string(&self.file).unwrap_or_default()
    }

    /// Waits until an event line contains all of `needles`.
    pub fn wait_for(&self, needles: &[&str]) -> String {
        wait_for(&format!("an event with {needles:?}"), TIMEOUT, || {
            self.text().lines().find(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string)
        })
        .unwrap_or_else(|e| panic!("{e}\nevents so far:\n{}", self.text()))
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Like [`setup`], with `shim_config` lines appended to the shim config; `{dir}` in them stands for
/// the instance's directory.
pub fn setup_with(shim_config: &str) -> (Containerd, &'static str) {
    let shim = kybernate_shim_binary().unwrap();
    let dir = tempfile::Builder::new().prefix("kt-").tempdir_in("/tmp").unwrap();
    let options = kybernate_tests::ContainerdOptions {
        shim_config: shim_config.replace("{dir}", &dir.path().display().to_string()),
        ..Default::default()
    };
    let containerd = Containerd::start_with(dir, &shim, &options).unwrap();
    let image = containerd.import_busybox().unwrap();
    (containerd, image)
}

/// The annotation that opts a container into checkpoint on stop.
pub const OPT_IN: &str = "kybernate.io/checkpoint-on-stop=true";
/// The checkpoint directory of an instance started by [`setup_with`] with [`CHECKPOINTS`].
pub const CHECKPOINTS: &str = "checkpoint_dir = \"{dir}/checkpoints\"\n";
/// A counter that exits 7 on SIGTERM (a shell as pid 1 ignores signals it does not trap).
pub const TRAPPING_COUNTER: &str =
    "trap 'exit 7' TERM; i=0; while :; do i=$((i+1)); echo $i > /state/counter.new; mv /state/counter.new /state/counter; sleep 0.1; done";

/// The checkpoint directory of an instance started with [`CHECKPOINTS`].
pub fn checkpoint_root(c: &Containerd) -> PathBuf {
    c.dir.path().join("checkpoints")
}

/// Every bundle directory (holding a marker) under the checkpoint root.
pub fn bundles(c: &Containerd) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.join(COMPLETE_MARKER).exists() || path.join(FAILED_MARKER).exists() {
                out.push(path);
            } else if path.is_dir() {
                walk(&path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&checkpoint_root(c), &mut out);
    out.sort();
    out
}

/// Runs `script` detached in container `id` with extra `ctr run` flags; waits for its counter.
pub fn run_counter(c: &Containerd, image: &str, id: &str, flags: &[&str], script: &str) -> u64 {
    ctr_run(c, &[&["-d"], flags].concat(), image, id, &["sh", "-c", script]).unwrap().ok("ctr run -d").unwrap();
    counter_past(c, id, 3)
}

/// `ctr t kill` (SIGTERM), then waits for the task to stop and removes it; returns `ctr t rm`'s
/// report (which carries the exit status) and the last counter value the container wrote.
pub fn stop_and_remove(c: &Containerd, id: &str) -> (String, u64) {
    c.ctr_ok(&["tasks", "kill", id]).unwrap();
    c.wait_task_status(id, "STOPPED", STOP_TIMEOUT).unwrap();
    let last = read_counter(&c.bundle(id)).unwrap();
    let rm = c.ctr_run(&["tasks", "rm", id], TIMEOUT).unwrap();
    assert_eq!(rm.code, Some(0), "{rm:?}");
    c.ctr_ok(&["containers", "rm", id]).unwrap();
    (format!("{}{}", rm.stdout, rm.stderr), last)
}

/// Takes a checkpoint on stop of a fresh opted-in counter container `id`; the bundle and the last value.
pub fn checkpointed_bundle(c: &Containerd, image: &str, id: &str) -> (PathBuf, u64) {
    run_counter(c, image, id, &["--annotation", OPT_IN], COUNTER_SCRIPT);
    counter_past(c, id, 10);
    bundle_of_stopped(c, id)
}

/// Stops the opted-in container `id` (a checkpoint is taken), checks it exited as on SIGTERM, and
/// returns its one bundle and the last value it counted.
pub fn bundle_of_stopped(c: &Containerd, id: &str) -> (PathBuf, u64) {
    let (rm, last) = stop_and_remove(c, id);
    assert!(rm.contains("143"), "a checkpointed container exits as on SIGTERM (143): {rm}");
    let found: Vec<PathBuf> = bundles(c).into_iter().filter(|b| b.components().any(|p| p.as_os_str() == id)).collect();
    assert_eq!(found.len(), 1, "one bundle for {id}: {found:?}");
    (found[0].clone(), last)
}

/// Processes in containerd namespace `ns`'s cgroup of container `id` (cgroup v1 or v2 paths).
pub fn cgroup_pids(ns: &str, id: &str) -> Vec<i32> {
    let suffix = format!(":/{ns}/{id}");
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| kybernate_tests::alive(*pid))
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.lines().any(|l| l.ends_with(&suffix)))
        })
        .collect()
}

/// Corrupts the bundle's first CRIU page image (its first byte flipped); its path and new contents.
pub fn corrupt_pages(bundle_dir: &Path) -> (PathBuf, Vec<u8>) {
    let pages = fs::read_dir(bundle_dir.join("checkpoint"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages-"))
        .unwrap();
    let mut bytes = fs::read(&pages).unwrap();
    bytes[0] ^= 0xff;
    fs::write(&pages, &bytes).unwrap();
    (pages, bytes)
}

/// The files under `dir`, recursively (none when it does not exist).
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_in(&path));
        } else {
            out.push(path);
        }
    }
    out
}
