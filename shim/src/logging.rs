//! Logging through `tracing` into the `log` FIFO containerd opens in the bundle directory (containerd
//! copies it into its own log), or stderr when there is none.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Name of the FIFO containerd reads the shim's log from, in the shim's working directory.
pub const LOG_FIFO: &str = "log";

/// Installs the global subscriber for the serving shim with the `filter` directive (invalid
/// directives fall back to `info`). Messages of the `log` crate (containerd-shim's) are included.
pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_target(false);
    // Opened non-blocking so a missing reader cannot hang the shim, then made blocking for writes.
    let fifo = OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(LOG_FIFO);
    let result = match fifo {
        Ok(f) => {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            // SAFETY: F_SETFL on a descriptor we own; clearing O_NONBLOCK only changes write semantics.
            unsafe { libc::fcntl(fd, libc::F_SETFL, 0) };
            builder.with_writer(Mutex::new(f)).try_init()
        }
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
    if let Err(e) = result {
        eprintln!("containerd-shim-kybernate-v1: logging is not available: {e}");
    }
}
