//! Standard I/O of container processes.
//!
//! Without a terminal, each process gets pipes (as containerd's runc shim gives it): CRIU records pipe
//! ends as external descriptors, so a checkpointed process can be restored onto new pipes. Threads
//! copy between the pipes and what containerd asked for: FIFOs (`ctr`, CRI) or `file://` paths.
//! With a terminal, runc sends the pty master over a console socket and threads copy between it and
//! the FIFOs.
//!
//! A `binary://` stdout URI names a logging binary instead (see `io/logger.rs`): the shim starts it, and
//! the process's stdout and stderr pipes are read by the binary itself (a terminal's output is copied
//! into its stdout pipe). As with containerd's runc shim, a process without a terminal then gets no
//! stdin.
//!
//! FIFO handling keeps containerd restarts harmless: output FIFOs are opened read-write, so writes
//! never fail with EPIPE while containerd is away; the stdin FIFO is held open for writing by the shim
//! until CloseIO, so the reader only sees EOF once the client closed stdin and asked for it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::error::{Result, ShimError};
use crate::reaper::Reaper;
use checkpoint_core::ChildStdio;

mod logger;

use logger::{LogBinary, Logger};

/// Stack size of copy threads: they only shuttle a heap buffer, and many run per shim.
const COPY_STACK: usize = 64 * 1024;
/// Buffer size of one copy.
const COPY_BUF: usize = 32 * 1024;

/// What containerd asked for as a process's stdio.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// stdin FIFO (empty: none).
    pub stdin: String,
    /// stdout FIFO, `file://` or `binary://` URI (empty: none).
    pub stdout: String,
    /// stderr FIFO or `file://` URI (empty: none); with a `binary://` stdout, empty or the same URI.
    pub stderr: String,
    /// Whether the process has a terminal (then stderr is unused).
    pub terminal: bool,
}

/// Who a [`ProcessIo`] belongs to: names its copy threads and identifies the process to a logging
/// binary.
pub struct IoOwner<'a> {
    /// containerd namespace of the container.
    pub namespace: &'a str,
    /// The container id.
    pub container_id: &'a str,
    /// The exec id; empty for the init process.
    pub exec_id: &'a str,
    /// The shim's reaper: a logging binary is started under its guard.
    pub reaper: &'a Reaper,
}

impl IoOwner<'_> {
    /// Name of the copy threads: the container id, with the exec id for an exec'd process.
    fn name(&self) -> String {
        match self.exec_id {
            "" => self.container_id.to_string(),
            exec_id => format!("{}-{exec_id}", self.container_id),
        }
    }

    /// `CONTAINER_ID` of a logging binary: as containerd's runc shim passes it, the exec id of an
    /// exec'd process.
    fn log_id(&self) -> &str {
        match self.exec_id {
            "" => self.container_id,
            exec_id => exec_id,
        }
    }
}

/// What a stdio URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sink {
    /// A FIFO or file the shim copies output into.
    Output(Output),
    /// A logging binary that reads the output itself.
    Binary(LogBinary),
}

/// A FIFO or file the shim copies output into.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Output {
    /// A FIFO (containerd's default).
    Fifo(PathBuf),
    /// A file (`file://`), appended to.
    File(PathBuf),
}

impl Sink {
    fn parse(uri: &str) -> Result<Option<Sink>> {
        if uri.is_empty() {
            return Ok(None);
        }
        if let Some(path) = uri.strip_prefix("file://") {
            return Ok(Some(Sink::Output(Output::File(PathBuf::from(path)))));
        }
        if let Some(path) = uri.strip_prefix("fifo://") {
            return Ok(Some(Sink::Output(Output::Fifo(PathBuf::from(path)))));
        }
        if let Some(rest) = uri.strip_prefix(logger::SCHEME) {
            return Ok(Some(Sink::Binary(LogBinary::parse(uri, rest)?)));
        }
        if let Some((scheme, _)) = uri.split_once("://") {
            return Err(ShimError::InvalidArgument(format!(
                "stdio URI {uri:?} uses scheme {scheme:?}, which io.containerd.kybernate.v1 does not support: \
                 use FIFOs (the default), file:// or binary://"
            )));
        }
        Ok(Some(Sink::Output(Output::Fifo(PathBuf::from(uri)))))
    }

    /// The FIFO or file, if the URI names one.
    fn output(self) -> Option<Output> {
        match self {
            Sink::Output(output) => Some(output),
            Sink::Binary(_) => None,
        }
    }
}

impl Output {
    fn open(&self) -> Result<File> {
        match self {
            // Read-write: never blocks, and keeps a reader so writes cannot fail while containerd restarts.
            Output::Fifo(path) => open_fifo(path, true),
            Output::File(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| ShimError::io(format!("creating log directory {}", dir.display()), e))?;
                }
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .map_err(|e| ShimError::io(format!("opening log file {}", path.display()), e))
            }
        }
    }
}

fn open_fifo(path: &Path, read_write: bool) -> Result<File> {
    let meta =
        std::fs::metadata(path).map_err(|e| ShimError::io(format!("opening stdio FIFO {}", path.display()), e))?;
    if !meta.file_type().is_fifo() {
        return Err(ShimError::InvalidArgument(format!("stdio path {} is not a FIFO", path.display())));
    }
    let mut opts = OpenOptions::new();
    opts.read(true).write(read_write).custom_flags(libc::O_CLOEXEC);
    opts.open(path).map_err(|e| ShimError::io(format!("opening stdio FIFO {}", path.display()), e))
}

/// Counts running output copies so that Delete can wait until all output reached containerd.
#[derive(Clone, Default)]
pub struct CopyGroup(Arc<(Mutex<usize>, Condvar)>);

impl CopyGroup {
    fn add(&self) {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn done(&self) {
        let mut n = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        self.0 .1.notify_all();
    }

    /// Waits until every copy finished, or `timeout` passed; whether all finished.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self.0 .1.wait_timeout(n, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

/// Copies `from` into `to` on a thread until EOF or an error; counted in `group` when given.
fn spawn_copy(name: String, mut from: File, mut to: File, group: Option<CopyGroup>) -> Result<()> {
    if let Some(g) = &group {
        g.add();
    }
    let spawned = std::thread::Builder::new().name(name.clone()).stack_size(COPY_STACK).spawn({
        let group = group.clone();
        move || {
            let mut buf = vec![0u8; COPY_BUF];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // EIO: the pty's last slave closed
                    Err(e) => {
                        if e.raw_os_error() != Some(libc::EIO) {
                            tracing::debug!(copy = %name, error = %e, "read ended");
                        }
                        break;
                    }
                };
                if let Err(e) = to.write_all(&buf[..n]) {
                    tracing::debug!(copy = %name, error = %e, "write ended");
                    break;
                }
            }
            drop(to);
            if let Some(g) = group {
                g.done();
            }
        }
    });
    spawned.map(drop).map_err(|e| {
        if let Some(g) = &group {
            g.done();
        }
        ShimError::io("starting an I/O copy thread", e)
    })
}

/// The shim's side of one process's stdio.
pub struct ProcessIo {
    paths: StdioPaths,
    /// The shim's write end of the stdin FIFO, dropped by CloseIO.
    stdin_keep: Mutex<Option<File>>,
    /// The pty master of a terminal process, for ResizePty.
    console: Mutex<Option<File>>,
    /// Output copies in flight.
    copies: CopyGroup,
    /// The container's ends of the pipes, until runc has been given them.
    child: Mutex<Option<ChildEnds>>,
    /// The logging binary of a `binary://` stdout.
    logger: Option<Logger>,
}

struct ChildEnds {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

impl ProcessIo {
    /// Prepares the stdio for one process of `owner`. Without a terminal the pipes are created and
    /// the copies start now; with a terminal the copies start in [`ProcessIo::attach_console`]. A
    /// logging binary (`binary://` stdout) is started and ready when this returns. `uid`/`gid` own
    /// the pipes (the container's user must be able to reopen `/proc/self/fd/*`).
    pub fn new(owner: &IoOwner<'_>, paths: &StdioPaths, uid: u32, gid: u32) -> Result<ProcessIo> {
        let name = owner.name();
        let stdout = Sink::parse(&paths.stdout)?;
        let stderr = if paths.terminal { None } else { Sink::parse(&paths.stderr)? };
        let binary = match (&stdout, &stderr) {
            (Some(Sink::Binary(binary)), None) => Some(binary),
            (Some(Sink::Binary(binary)), Some(_)) if paths.stderr == paths.stdout => Some(binary),
            (Some(Sink::Binary(_)), _) | (_, Some(Sink::Binary(_))) => {
                return Err(ShimError::InvalidArgument(format!(
                    "stdout {:?} and stderr {:?}: a logging binary receives both streams, so stderr must be \
                     empty or the same binary:// URI",
                    paths.stdout, paths.stderr
                )))
            }
            _ => None,
        };
        // As with containerd's runc shim, a process that logs to a binary has no stdin without a terminal.
        let stdin = match (binary, paths.stdin.as_str()) {
            (Some(_), stdin) if !paths.terminal && !stdin.is_empty() => {
                tracing::warn!(process = %name, stdin, "stdin is not supported with a logging binary; ignored");
                ""
            }
            (_, stdin) => stdin,
        };
        let logger = binary.map(|b| b.start(owner.log_id(), owner.namespace, owner.reaper)).transpose()?;
        let (stdout, stderr) = (stdout.and_then(Sink::output), stderr.and_then(Sink::output));
        let stdin_keep = match stdin {
            "" => None,
            path => Some(open_fifo(Path::new(path), true)?),
        };
        let io = ProcessIo {
            paths: paths.clone(),
            stdin_keep: Mutex::new(stdin_keep),
            console: Mutex::new(None),
            copies: CopyGroup::default(),
            child: Mutex::new(None),
            logger,
        };
        if paths.terminal {
            return Ok(io);
        }
        let owner = |fd: &OwnedFd| -> Result<()> {
            if uid != 0 || gid != 0 {
                nix::unistd::fchown(fd.as_raw_fd(), Some(uid.into()), Some(gid.into()))
                    .map_err(|e| ShimError::io("handing the stdio pipes to the container user", e.into()))?;
            }
            Ok(())
        };
        let mut ends = ChildEnds { stdin: None, stdout: None, stderr: None };
        if !stdin.is_empty() {
            let (r, w) = pipe()?;
            owner(&r)?;
            let source = open_fifo(Path::new(stdin), false)?;
            spawn_copy(format!("{name}-stdin"), source, File::from(w), None)?;
            ends.stdin = Some(r);
        }
        if let Some(pipes) = io.logger.as_ref().and_then(Logger::take_pipes) {
            owner(&pipes.stdout)?;
            owner(&pipes.stderr)?;
            ends.stdout = Some(pipes.stdout);
            ends.stderr = Some(pipes.stderr);
        }
        for (output, slot, what) in [(stdout, &mut ends.stdout, "stdout"), (stderr, &mut ends.stderr, "stderr")] {
            let Some(output) = output else { continue };
            let (r, w) = pipe()?;
            owner(&w)?;
            spawn_copy(format!("{name}-{what}"), File::from(r), output.open()?, Some(io.copies.clone()))?;
            *slot = Some(w);
        }
        *io.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(ends);
        Ok(io)
    }

    /// The stdio paths this process was created with.
    pub fn paths(&self) -> &StdioPaths {
        &self.paths
    }

    /// The container's ends of the pipes, for the runc command that creates the process. The shim's
    /// copies are handed over, so output reaches EOF once the process (and runc) closed them.
    pub fn take_child_stdio(&self) -> ChildStdio {
        let ends = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        match ends {
            Some(e) => ChildStdio {
                stdin: e.stdin.map(Stdio::from),
                stdout: e.stdout.map(Stdio::from),
                stderr: e.stderr.map(Stdio::from),
            },
            None => ChildStdio::default(),
        }
    }

    /// Starts copying between a terminal process's pty master and the FIFOs (or a logging binary).
    pub fn attach_console(&self, name: &str, master: File) -> Result<()> {
        if !self.paths.stdin.is_empty() {
            let source = open_fifo(Path::new(&self.paths.stdin), false)?;
            let to = master.try_clone().map_err(|e| ShimError::io("duplicating the pty master", e))?;
            spawn_copy(format!("{name}-stdin"), source, to, None)?;
        }
        let output = match &self.logger {
            // The binary's stderr pipe closes with the rest: a terminal has no stderr.
            Some(logger) => logger.take_pipes().map(|pipes| File::from(pipes.stdout)),
            None => Sink::parse(&self.paths.stdout)?.and_then(Sink::output).map(|o| o.open()).transpose()?,
        };
        if let Some(to) = output {
            let from = master.try_clone().map_err(|e| ShimError::io("duplicating the pty master", e))?;
            spawn_copy(format!("{name}-stdout"), from, to, Some(self.copies.clone()))?;
        }
        *self.console.lock().unwrap_or_else(|p| p.into_inner()) = Some(master);
        Ok(())
    }

    /// Resizes the terminal; fails when the process has none.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let console = self.console.lock().unwrap_or_else(|p| p.into_inner());
        let master = console
            .as_ref()
            .ok_or_else(|| ShimError::FailedPrecondition("the process has no terminal to resize".into()))?;
        let size = libc::winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the fd is an open pty master.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(ShimError::io("resizing the terminal", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// CloseIO: stop holding stdin open, so the process sees EOF once the client closed it too.
    pub fn close_stdin(&self) {
        self.stdin_keep.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Waits (bounded) until all output has been copied, and a logging binary has read it all and
    /// exited (it does at EOF); whether that happened.
    pub fn drain_output(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let drained = self.copies.wait(timeout)
            && self.logger.as_ref().is_none_or(|l| l.wait_exit(deadline.saturating_duration_since(Instant::now())));
        if !drained {
            tracing::warn!(stdout = %self.paths.stdout, "output still unread after {timeout:?}; another process may hold the pipes");
        }
        drained
    }

    /// Lets go of the pipe ends runc never got, waits (bounded) until all output has been copied,
    /// then lets go of stdin and the terminal and stops a logging binary (SIGTERM, if it has not
    /// exited by then).
    pub fn finish(&self, timeout: Duration) {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.drain_output(timeout);
        self.close_stdin();
        self.console.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(logger) = &self.logger {
            logger.stop();
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ShimError::io("creating a stdio pipe", e.into()))
}

/// A console socket in a private temporary directory; runc sends the pty master over it.
pub struct ConsoleSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Creates the socket (short path under the temp dir: socket paths are limited to 108 bytes).
    pub fn new() -> Result<ConsoleSocket> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kybernate-pty-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| ShimError::io(format!("creating console socket directory {}", dir.display()), e))?;
        let path = dir.join("pty.sock");
        let listener = UnixListener::bind(&path)
            .map_err(|e| ShimError::io(format!("binding console socket {}", path.display()), e))?;
        Ok(ConsoleSocket { dir, path, listener })
    }

    /// The socket's path, for `--console-socket`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives the pty master runc sent, waiting at most `timeout`.
    pub fn receive_master(&self, timeout: Duration) -> Result<File> {
        let ready = {
            let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            let ms =
                PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
            poll(&mut fds, ms).map_err(|e| ShimError::io("waiting for runc on the console socket", e.into()))?
        };
        if ready == 0 {
            return Err(ShimError::Internal(format!(
                "runc did not send the terminal within {timeout:?} on {}",
                self.path.display()
            )));
        }
        let (stream, _) = self.listener.accept().map_err(|e| ShimError::io("accepting on the console socket", e))?;
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| ShimError::io("receiving the terminal from runc", e.into()))?;
        for cmsg in msg.cmsgs().map_err(|e| ShimError::io("reading the console socket message", e.into()))? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
                    return Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                }
            }
        }
        Err(ShimError::Internal("runc's console socket message carried no terminal".into()))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_parse() {
        let output = |o| Some(Sink::Output(o));
        assert_eq!(Sink::parse("").unwrap(), None);
        assert_eq!(Sink::parse("/run/x/stdout").unwrap(), output(Output::Fifo("/run/x/stdout".into())));
        assert_eq!(Sink::parse("fifo:///a").unwrap(), output(Output::Fifo("/a".into())));
        assert_eq!(Sink::parse("file:///var/log/c.log").unwrap(), output(Output::File("/var/log/c.log".into())));
        let Some(Sink::Binary(binary)) = Sink::parse("binary:///bin/sh?-c=true").unwrap() else { panic!() };
        assert_eq!((binary.path.to_str(), binary.args.join(" ")), (Some("/bin/sh"), "-c true".into()));
        let err = Sink::parse("binary:///nonexistent/logger?a=b").unwrap_err().to_string();
        assert!(err.contains("logging binary /nonexistent/logger does not exist"), "{err}");
        let err = Sink::parse("syslog://host").unwrap_err().to_string();
        assert!(err.contains("\"syslog\""), "{err}");
    }

    #[test]
    fn pipes_copy_into_fifos_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        nix::unistd::mkfifo(&out, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opened before the shim's writer (without blocking), so EOF comes only once that writer closed.
        let mut fifo = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&out).unwrap();
        let log = dir.path().join("logs/err.log");
        let paths = StdioPaths {
            stdout: out.display().to_string(),
            stderr: format!("file://{}", log.display()),
            ..Default::default()
        };
        let reaper = Reaper::inert();
        let io = ProcessIo::new(&owner(&reaper), &paths, 0, 0).unwrap();
        let reader = std::thread::spawn(move || {
            nix::fcntl::fcntl(fifo.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty())).unwrap();
            let mut s = String::new();
            fifo.read_to_string(&mut s).unwrap();
            s
        });
        let stdio = io.take_child_stdio();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "echo hello; echo oops >&2"])
            .stdin(Stdio::null())
            .stdout(stdio.stdout.unwrap())
            .stderr(stdio.stderr.unwrap())
            .spawn()
            .unwrap();
        child.wait().unwrap();
        io.finish(Duration::from_secs(10));
        assert_eq!(reader.join().unwrap(), "hello\n");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "oops\n");
    }

    fn owner(reaper: &Reaper) -> IoOwner<'_> {
        IoOwner { namespace: "ns", container_id: "c", exec_id: "", reaper }
    }

    /// A `binary://` URI of a shell logger that appends fds 3 and 4 to `log`.
    fn shell_logger(log: &Path) -> String {
        let script = format!("exec 5>&-; /bin/cat <&3 >> {0}; /bin/cat <&4 >> {0}", log.display());
        let query: String = form_urlencoded::Serializer::new(String::new()).append_pair("-c", &script).finish();
        format!("binary:///bin/sh?{query}")
    }

    #[test]
    fn a_logging_binary_reads_the_pipes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let uri = shell_logger(&log);
        let reaper = Reaper::inert();
        let stdin = dir.path().join("stdin");
        nix::unistd::mkfifo(&stdin, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let paths = StdioPaths {
            stdin: stdin.display().to_string(),
            stdout: uri.clone(),
            stderr: uri.clone(),
            terminal: false,
        };
        let io = ProcessIo::new(&owner(&reaper), &paths, 0, 0).unwrap();
        let stdio = io.take_child_stdio();
        assert!(stdio.stdin.is_none(), "stdin is not supported with a logging binary");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "echo hello; echo oops >&2"])
            .stdin(Stdio::null())
            .stdout(stdio.stdout.unwrap())
            .stderr(stdio.stderr.unwrap())
            .spawn()
            .unwrap();
        child.wait().unwrap();
        assert!(io.drain_output(Duration::from_secs(10)), "the logger did not exit at EOF");
        io.finish(Duration::from_secs(10));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\noops\n");

        let other = StdioPaths { stdout: uri, stderr: format!("file://{}", log.display()), ..Default::default() };
        let err = ProcessIo::new(&owner(&reaper), &other, 0, 0).err().unwrap().to_string();
        assert!(err.contains("stderr must be empty or the same binary:// URI"), "{err}");
    }

    #[test]
    fn a_logging_binary_reads_the_terminal() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let reaper = Reaper::inert();
        let paths = StdioPaths { stdout: shell_logger(&log), terminal: true, ..Default::default() };
        let io = ProcessIo::new(&owner(&reaper), &paths, 0, 0).unwrap();
        let pty = nix::pty::openpty(None, None).unwrap();
        io.attach_console("c", File::from(pty.master)).unwrap();
        File::from(pty.slave).write_all(b"on the tty\n").unwrap();
        io.finish(Duration::from_secs(10));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "on the tty\r\n");
    }

    #[test]
    fn copy_group_times_out() {
        let g = CopyGroup::default();
        assert!(g.wait(Duration::from_millis(1)));
        g.add();
        assert!(!g.wait(Duration::from_millis(20)));
        g.done();
        assert!(g.wait(Duration::from_millis(1)));
    }
}
