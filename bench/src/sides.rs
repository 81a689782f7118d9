//! Each side's checkpoint and restore of the same workload, timed the same way: a checkpoint until
//! what it wrote is durable (`sync` after every side's command), a restore until the command
//! returns with the workload running and until all of its memory is resident; the memory is
//! verified after every restore.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kybernate_tests::{kill_and_reap, reap_if_exited, spawn_workload, Containerd, Podman};

use crate::stats::Results;
use crate::workload::{self, run, sync, verify, wait_ready, wait_resident};

/// Operation: until the checkpoint is on disk, durable.
pub const CHECKPOINT: &str = "checkpoint to durable";
/// Operation: until the restoring command returns with the workload running.
pub const TO_RUNNING: &str = "restore to running";
/// Operation: until the workload's memory is all resident again.
pub const TO_FULL_RSS: &str = "restore to full RSS";
/// Figure: shim resident memory per idle container.
pub const SHIM_RSS: &str = "shim RSS per container (MiB)";
/// Figure: shim proportional memory per idle container.
pub const SHIM_PSS: &str = "shim PSS per container (MiB)";

/// Side: writing the same bytes to a file and fsyncing it (the floor of any checkpoint).
pub const DISK: &str = "disk write + fsync";
/// Side: CRIU alone, on the workload outside a container.
pub const RAW: &str = "raw criu";
/// Side: CRIU alone with `--lazy-pages`.
pub const RAW_LAZY: &str = "raw criu --lazy-pages";
/// Side: Kybernate's checkpoint on stop (`ctr t kill`), restored with `kybernate.io/restore-from`.
pub const KYB_STOP: &str = "kybernate stop / restore-from";
/// Side: the same restore with `kybernate.io/restore-mode: lazy`.
pub const KYB_LAZY: &str = "kybernate restore-from, lazy";
/// Side: the same bundle shipped to a filesystem store (uncompressed) and restored from the archive.
pub const KYB_REMOTE: &str = "kybernate restore-from store";
/// Side: the same archive restored lazily: the sidecar serves its pages as CRIU asks for them.
pub const KYB_REMOTE_LAZY: &str = "kybernate restore-from store, lazy";
/// Side: Kybernate through `ctr c checkpoint --task` / `ctr c restore --live`.
pub const KYB_CTR: &str = "kybernate ctr";
/// Side: containerd's runc shim through the same `ctr` commands.
pub const RUNC_CTR: &str = "runc-v2 ctr";
/// Side: Podman's `container checkpoint --export` / `container restore --import`.
pub const PODMAN: &str = "podman export / import";

const KYBERNATE: &str = "io.containerd.kybernate.v1";
const STOCK: &str = "io.containerd.runc.v2";
const TIMEOUT: Duration = Duration::from_secs(600);

/// What every side shares: the private containerd and Podman, the workload binary, scratch space.
pub struct Bench {
    /// Scratch space (bundles, images, state directories).
    pub work: PathBuf,
    /// The directory holding the workload binary, mounted as `/hog`.
    pub hog_dir: PathBuf,
    /// The private containerd with both shims.
    pub containerd: Containerd,
    /// Its busybox image.
    pub image: &'static str,
    /// Podman with private storage and the same image.
    pub podman: Podman,
    /// Kybernate's checkpoint directory (checkpoint on stop).
    pub checkpoints: PathBuf,
    /// The sidecar, which ships bundles to the store and which the shim fetches them with.
    pub sidecar: PathBuf,
    /// The filesystem store bundles are shipped to (uncompressed).
    pub store: PathBuf,
}

impl Bench {
    fn hog(&self) -> PathBuf {
        self.hog_dir.join("hog")
    }

    fn mounts(&self, state: &Path) -> Vec<String> {
        vec![
            "--mount".into(),
            format!("type=bind,src={},dst=/hog,options=rbind:ro", self.hog_dir.display()),
            "--mount".into(),
            format!("type=bind,src={},dst=/state,options=rbind:rw", state.display()),
        ]
    }

    fn ctr(&self, args: &[String]) -> Result<String> {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.containerd.ctr_run(&refs, TIMEOUT)?.ok(&format!("ctr {}", args.join(" ")))
    }

    /// `ctr run -d --runtime <runtime>`, with the instance's shim config for Kybernate.
    fn run_args(&self, runtime: &str) -> Vec<String> {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--runtime".into(), runtime.into()];
        if runtime == KYBERNATE {
            args.extend(["--runtime-config-path".into(), self.containerd.shim_config.display().to_string()]);
        }
        args
    }

    /// `ctr run -d` of the workload as `id` with `runtime` and extra flags.
    fn ctr_run(&self, runtime: &str, id: &str, state: &Path, mib: u64, flags: &[String]) -> Result<()> {
        let mut args = self.run_args(runtime);
        args.extend(self.mounts(state));
        args.extend(flags.iter().cloned());
        args.extend([self.image.to_string(), id.into(), "/hog/hog".into(), "/state".into(), mib.to_string()]);
        self.ctr(&args).map(|_| ())
    }

    /// The host pid of task `id`'s init.
    fn task_pid(&self, id: &str) -> Result<i32> {
        let list = self.ctr(&["tasks".into(), "ls".into()])?;
        list.lines()
            .find_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.first() == Some(&id)).then(|| cols.get(1).and_then(|p| p.parse().ok())).flatten()
            })
            .with_context(|| format!("no task {id} in {list}"))
    }

    fn remove(&self, id: &str) {
        let c = &self.containerd;
        let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", id], TIMEOUT);
        let _ = c.wait_task_status(id, "STOPPED", TIMEOUT);
        let _ = c.ctr_run(&["tasks", "rm", "-f", id], TIMEOUT);
        let _ = c.ctr_run(&["containers", "rm", id], TIMEOUT);
    }

    /// The floor: `mib` MiB of `data` written to a file and fsynced, with its directory.
    pub fn disk(&self, mib: u64, data: &[u8], out: &mut Results) -> Result<()> {
        let path = self.work.join("floor.bin");
        let started = Instant::now();
        let mut file = fs::File::create(&path)?;
        file.write_all(&data[..(mib << 20) as usize])?;
        file.sync_all()?;
        fs::File::open(&self.work)?.sync_all()?;
        out.add(mib, CHECKPOINT, DISK, started.elapsed().as_secs_f64());
        fs::remove_file(&path)?;
        Ok(())
    }

    /// Raw CRIU: `criu dump` + `sync`, then `criu restore -d`, then the same with `--lazy-pages`.
    pub fn raw(&self, mib: u64, out: &mut Results) -> Result<()> {
        let state = workload::state_dir(&self.work, "raw-state")?;
        let pid = spawn_workload(&self.hog(), &state, mib as u32)?;
        wait_ready(&state)?;
        let images = self.work.join("raw-images");
        let _ = fs::remove_dir_all(&images);
        fs::create_dir_all(&images)?;
        let started = Instant::now();
        run(criu(&["dump", "-t", &pid.to_string(), "-D", &path(&images), "-o", "dump.log"]))?;
        sync()?;
        out.add(mib, CHECKPOINT, RAW, started.elapsed().as_secs_f64());
        reap_if_exited(pid);

        let started = Instant::now();
        run(criu(&["restore", "-d", "-D", &path(&images), "-o", "restore.log"]))?;
        restored(out, mib, RAW, started, pid, &state)?;
        kill_and_reap(pid);

        let lazy_work = self.work.join("raw-lazy");
        let _ = fs::remove_dir_all(&lazy_work);
        fs::create_dir_all(&lazy_work)?;
        let mut daemon = LazyDaemon::start(&images, &lazy_work)?;
        let started = Instant::now();
        run(criu(&[
            "restore",
            "-d",
            "--lazy-pages",
            "-D",
            &path(&images),
            "--work-dir",
            &path(&lazy_work),
            "-o",
            "restore.log",
        ]))?;
        restored(out, mib, RAW_LAZY, started, pid, &state)?;
        daemon.finish()?;
        kill_and_reap(pid);
        fs::remove_dir_all(&images)?;
        Ok(())
    }

    /// `ctr c checkpoint --task` + `sync`, then `ctr c restore --live`, through `runtime`.
    pub fn ctr_pair(&self, mib: u64, runtime: &str, side: &'static str, out: &mut Results) -> Result<()> {
        let tag = if runtime == KYBERNATE { "k" } else { "r" };
        let (id, again, image) = (format!("ck-{tag}"), format!("re-{tag}"), format!("bench/ck-{tag}:latest"));
        let state = workload::state_dir(&self.work, &format!("state-{tag}"))?;
        self.ctr_run(runtime, &id, &state, mib, &[])?;
        wait_ready(&state)?;
        let started = Instant::now();
        self.ctr(&["containers".into(), "checkpoint".into(), "--task".into(), id.clone(), image.clone()])?;
        sync()?;
        out.add(mib, CHECKPOINT, side, started.elapsed().as_secs_f64());
        self.remove(&id);
        let started = Instant::now();
        self.ctr(&["containers".into(), "restore".into(), "--live".into(), again.clone(), image.clone()])?;
        let pid = self.task_pid(&again)?;
        restored(out, mib, side, started, pid, &state)?;
        self.remove(&again);
        let _ = self.ctr(&["images".into(), "rm".into(), "--sync".into(), image]);
        Ok(())
    }

    /// Kybernate's checkpoint on stop (`ctr t kill` until the task stopped, + `sync`), then
    /// `kybernate.io/restore-from` fully and lazily from the same bundle, then from the same bundle
    /// shipped to a filesystem store (fetched whole, or served page by page to a lazy restore).
    pub fn kybernate_stop(&self, mib: u64, out: &mut Results) -> Result<()> {
        let _ = fs::remove_dir_all(&self.checkpoints);
        let state = workload::state_dir(&self.work, "state-stop")?;
        let opt_in = ["--annotation".to_string(), "kybernate.io/checkpoint-on-stop=true".into()];
        self.ctr_run(KYBERNATE, "stop", &state, mib, &opt_in)?;
        wait_ready(&state)?;
        let started = Instant::now();
        self.containerd.ctr_ok(&["tasks", "kill", "stop"])?;
        self.containerd.wait_task_status("stop", "STOPPED", TIMEOUT)?;
        sync()?;
        out.add(mib, CHECKPOINT, KYB_STOP, started.elapsed().as_secs_f64());
        self.remove("stop");
        let bundle = find_bundle(&self.checkpoints)?;
        let archive = self.ship(&bundle)?;
        let restores = [
            (KYB_STOP, "full", &bundle),
            (KYB_LAZY, "lazy", &bundle),
            (KYB_REMOTE, "full", &archive),
            (KYB_REMOTE_LAZY, "lazy", &archive),
        ];
        for (i, (side, mode, from)) in restores.into_iter().enumerate() {
            let id = format!("resume-{i}-{mode}");
            let flags = [
                "--annotation".to_string(),
                format!("kybernate.io/restore-from={}", from.display()),
                "--annotation".into(),
                format!("kybernate.io/restore-mode={mode}"),
            ];
            let started = Instant::now();
            self.ctr_run(KYBERNATE, &id, &state, mib, &flags)?;
            let pid = self.task_pid(&id)?;
            restored(out, mib, side, started, pid, &state)?;
            self.remove(&id);
        }
        fs::remove_dir_all(&self.checkpoints)?;
        fs::remove_dir_all(&self.store)?;
        Ok(())
    }

    /// Ships `bundle` to the store as an uncompressed tar (untimed) and returns the archive's path.
    fn ship(&self, bundle: &Path) -> Result<PathBuf> {
        let _ = fs::remove_dir_all(&self.store);
        let store = format!("file://{}", self.store.display());
        let sidecar = |args: &[&str]| -> Result<String> {
            let out = Command::new(&self.sidecar)
                .arg("--checkpoint-dir")
                .arg(&self.checkpoints)
                .args(["--store", &store, "--compression", "none"])
                .args(args)
                .output()?;
            if !out.status.success() {
                bail!("kybernate-sidecar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        sidecar(&["push", &path(bundle)])?;
        let listed = sidecar(&["ls"])?;
        let key = listed.lines().next().and_then(|l| l.split('\t').next()).context("the store lists no archive")?;
        Ok(self.store.join(key))
    }

    /// Podman: `container checkpoint --export` (uncompressed, as the others) + `sync`, then
    /// `container restore --import`.
    pub fn podman(&self, mib: u64, out: &mut Results) -> Result<()> {
        let state = workload::state_dir(&self.work, "state-podman")?;
        let archive = self.work.join("podman-export.tar");
        let _ = fs::remove_file(&archive);
        let (hog, st) = (format!("{}:/hog:ro", self.hog_dir.display()), format!("{}:/state", state.display()));
        let size = mib.to_string();
        #[rustfmt::skip]
        self.podman.ok(&["run", "-d", "--name", "hog", "--network", "none", "--ulimit", "nofile=1024:1024",
            "--ulimit", "nproc=1024:1024", "-v", &hog, "-v", &st, self.image, "/hog/hog", "/state", &size])?;
        wait_ready(&state)?;
        let started = Instant::now();
        self.podman.ok(&["container", "checkpoint", "--compress", "none", "--export", &path(&archive), "hog"])?;
        sync()?;
        out.add(mib, CHECKPOINT, PODMAN, started.elapsed().as_secs_f64());
        self.podman.ok(&["rm", "-f", "hog"])?;
        let started = Instant::now();
        self.podman.ok(&["container", "restore", "--import", &path(&archive)])?;
        let pid: i32 = self.podman.ok(&["inspect", "-f", "{{.State.Pid}}", "hog"])?.trim().parse()?;
        restored(out, mib, PODMAN, started, pid, &state)?;
        self.podman.ok(&["rm", "-f", "hog"])?;
        fs::remove_file(&archive)?;
        Ok(())
    }

    /// Shim memory: `n` idle containers per runtime; RSS and PSS (MiB) of their shims per container.
    pub fn shim_memory(&self, n: usize, out: &mut Results) -> Result<()> {
        for (runtime, side, binary) in
            [(KYBERNATE, KYB_CTR, "containerd-shim-kybernate-v1"), (STOCK, RUNC_CTR, "containerd-shim-runc-v2")]
        {
            let ids: Vec<String> = (0..n).map(|i| format!("idle-{i}")).collect();
            for id in &ids {
                let mut args = self.run_args(runtime);
                args.extend([self.image.into(), id.clone(), "sleep".into(), "1000000".into()]);
                self.ctr(&args)?;
            }
            for id in &ids {
                self.containerd.wait_task_status(id, "RUNNING", TIMEOUT)?;
            }
            let pids: Vec<i32> = self
                .containerd
                .shim_pids()
                .into_iter()
                .filter(|p| {
                    fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                        c.split(|b| *b == 0).next().is_some_and(|argv0| argv0.ends_with(binary.as_bytes()))
                    })
                })
                .collect();
            if pids.is_empty() {
                bail!("no {binary} processes found");
            }
            let kb = |file: &str, field: &str| -> u64 { pids.iter().map(|p| proc_kb(*p, file, field)).sum() };
            out.add(0, SHIM_RSS, side, kb("status", "VmRSS") as f64 / 1024.0 / n as f64);
            out.add(0, SHIM_PSS, side, kb("smaps_rollup", "Pss") as f64 / 1024.0 / n as f64);
            for id in &ids {
                self.remove(id);
            }
        }
        Ok(())
    }
}

/// Records a restore that `started` then: to running now, to full RSS once `pid` has all of its
/// memory back; then verifies the memory.
fn restored(out: &mut Results, mib: u64, side: &'static str, started: Instant, pid: i32, state: &Path) -> Result<()> {
    out.add(mib, TO_RUNNING, side, started.elapsed().as_secs_f64());
    wait_resident(pid, mib)?;
    out.add(mib, TO_FULL_RSS, side, started.elapsed().as_secs_f64());
    verify(state, side)
}

/// `criu` with `args`.
fn criu(args: &[&str]) -> Command {
    let mut cmd = Command::new("criu");
    cmd.args(args).stdin(Stdio::null());
    cmd
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// `criu lazy-pages` for a raw lazy restore.
struct LazyDaemon(Child);

impl LazyDaemon {
    fn start(images: &Path, work: &Path) -> Result<LazyDaemon> {
        let child = criu(&["lazy-pages", "-D", &path(images), "--work-dir", &path(work), "-o", "lazy-pages.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let socket = work.join("lazy-pages.socket");
        workload::wait("criu lazy-pages to listen", || socket.exists())?;
        Ok(LazyDaemon(child))
    }

    /// Waits for the daemon to exit once every page is in.
    fn finish(&mut self) -> Result<()> {
        let status = self.0.wait()?;
        if !status.success() {
            bail!("criu lazy-pages ended with {status}");
        }
        Ok(())
    }
}

impl Drop for LazyDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The one sealed bundle under `root`.
fn find_bundle(root: &Path) -> Result<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.join("COMPLETE").exists() {
                found.push(p);
            } else if p.is_dir() {
                walk(&p, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(root, &mut found);
    match found.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!("expected one sealed bundle under {}, found {other:?}", root.display()),
    }
}

/// A `kB` field of `/proc/<pid>/<file>`.
fn proc_kb(pid: i32, file: &str, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?.strip_prefix(':')?.trim().trim_end_matches("kB").trim().parse().ok()
            })
        })
        .unwrap_or(0)
}
