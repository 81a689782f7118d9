//! CRIU's lazy-pages daemon (`criu lazy-pages`), which a lazy restore (`--lazy-pages`) hands the
//! restored processes' anonymous memory to: the processes run at once, each missing page is copied
//! in through userfaultfd when it is first touched, and the daemon copies the rest in the background
//! and exits once every page is in.
//!
//! The daemon reads the pages from the image directory's pages images, or — for a remote lazy
//! restore — asks a page server for them over a connected socket it is handed ([`PageSupply`]).
//!
//! A daemon that dies early leaves memory that would read back as zeros, so whoever restores must
//! kill the workload then (see [`LazyPageServer::wait`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Criu;
use crate::error::{Error, Result};
use crate::fsutil;

/// The socket the daemon listens on in its work directory, where `criu restore --lazy-pages` (run
/// with the same work directory) connects.
pub const LAZY_PAGES_SOCKET: &str = "lazy-pages.socket";
/// The daemon's log, in the work directory.
pub const LAZY_PAGES_LOG: &str = "lazy-pages.log";
/// How long the daemon may take to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the start is checked for.
const READY_POLL: Duration = Duration::from_millis(5);

/// The descriptor number a page server's socket has in the daemon.
const PS_SOCKET_FD: i32 = 3;

/// Where the daemon takes the pages from.
#[derive(Debug)]
pub enum PageSupply {
    /// The pages images in the image directory, which are complete.
    Images,
    /// A page server on the other end of this connected socket (see [`super::page_server`]); the
    /// image directory needs the page maps only.
    Server(OwnedFd),
}

/// A running `criu lazy-pages` daemon serving one restore's image directory.
///
/// It is spawned and waited for by a thread of its own, which holds a span of the CRIU handle's
/// [`crate::SpawnHook`] for the daemon's whole life (so an embedder's reaper leaves its exit status
/// alone) and which its parent-death signal is tied to.
#[derive(Debug)]
pub struct LazyPageServer {
    pid: u32,
    pidfd: OwnedFd,
    log: PathBuf,
    exit: JoinHandle<Result<()>>,
}

impl LazyPageServer {
    /// Starts the daemon on `image_dir` with `work_dir` as its work directory, taking the pages from
    /// `supply`, and returns once it listens on [`LAZY_PAGES_SOCKET`] there.
    pub fn start(criu: &Criu, image_dir: &Path, work_dir: &Path, supply: PageSupply) -> Result<LazyPageServer> {
        fsutil::ensure_dir(work_dir)?;
        let socket = work_dir.join(LAZY_PAGES_SOCKET);
        let _ = std::fs::remove_file(&socket);
        let log = work_dir.join(LAZY_PAGES_LOG);
        let mut cmd = criu.command();
        cmd.arg("lazy-pages")
            .arg("--images-dir")
            .arg(image_dir)
            .arg("--work-dir")
            .arg(work_dir)
            .args(["-o", LAZY_PAGES_LOG, "-v2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let PageSupply::Server(socket) = supply {
            cmd.args(["--page-server", "--ps-socket", &PS_SOCKET_FD.to_string()]);
            crate::exec::pass_fd(&mut cmd, socket, PS_SOCKET_FD);
        }
        let (started, spawned) = mpsc::channel();
        let spawner = criu.spawner().clone();
        let binary = criu.binary().to_path_buf();
        let daemon_log = log.clone();
        let exit = std::thread::Builder::new()
            .name("criu-lazy-pages".into())
            .spawn(move || supervise(spawner, cmd, started, &daemon_log))
            .map_err(|e| Error::io("starting the lazy-pages thread", e))?;
        let pid = match spawned.recv() {
            Ok(Ok(pid)) => pid,
            Ok(Err(source)) => {
                return Err(Error::CriuMissing {
                    path: binary,
                    min_version: super::MIN_CRIU_VERSION.to_string(),
                    source,
                })
            }
            Err(_) => return Err(lost(&log)),
        };
        let pidfd = pidfd_open(pid).map_err(|e| Error::io(format!("opening a pidfd of criu lazy-pages ({pid})"), e))?;
        let server = LazyPageServer { pid, pidfd, log, exit };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !socket.exists() {
            if server.exit.is_finished() {
                let log = server.log.clone();
                let why = match server.wait() {
                    Ok(()) => "exited before it listened".to_string(),
                    Err(Error::LazyPages { what, .. }) => what,
                    Err(e) => return Err(e),
                };
                return Err(Error::LazyPages { tail: fsutil::log_tail(&log), what: why, log });
            }
            if Instant::now() >= deadline {
                server.kill();
                return Err(Error::LazyPages {
                    what: format!("did not listen on {} within {READY_TIMEOUT:?} and was killed", socket.display()),
                    tail: fsutil::log_tail(&server.log),
                    log: server.log,
                });
            }
            std::thread::sleep(READY_POLL);
        }
        tracing::debug!(pid, image_dir = %image_dir.display(), "lazy-pages daemon listening");
        Ok(server)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the daemon (through its pidfd, so never another process that took its pid).
    pub fn kill(&self) {
        // SAFETY: a pidfd this value owns; signal 9, no siginfo.
        unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0)
        };
    }

    /// Waits until the daemon exits: `Ok` once it has copied every page in (CRIU exits 0 then), an
    /// error with its exit status and log tail when it failed or was killed before that.
    pub fn wait(self) -> Result<()> {
        let log = self.log;
        self.exit.join().unwrap_or_else(|_| Err(lost(&log)))
    }
}

/// Spawns the daemon, says its pid (or the spawn error) through `started`, and waits for it: the body
/// of the daemon's own thread.
fn supervise(
    spawner: crate::exec::Spawner,
    mut cmd: Command,
    started: mpsc::Sender<std::io::Result<u32>>,
    log: &Path,
) -> Result<()> {
    spawner.prepare(&mut cmd);
    let _span = spawner.span();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = started.send(Err(e));
            return Ok(());
        }
    };
    // The command holds this side's copy of a page server's socket: close it, so the server sees the
    // connection end when the daemon does.
    drop(cmd);
    let _ = started.send(Ok(child.id()));
    let status = child.wait().map_err(|e| Error::io("waiting for criu lazy-pages", e))?;
    if status.success() {
        tracing::debug!(log = %log.display(), "lazy-pages daemon copied every page in");
        return Ok(());
    }
    Err(Error::LazyPages {
        what: format!("ended ({status}) before every page of the restored memory was in"),
        tail: fsutil::log_tail(log),
        log: log.to_path_buf(),
    })
}

fn lost(log: &Path) -> Error {
    Error::LazyPages { what: "lost its supervising thread".into(), tail: String::new(), log: log.to_path_buf() }
}

/// `pidfd_open(2)`.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
