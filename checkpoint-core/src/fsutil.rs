//! Small filesystem and process helpers shared by the checkpoint and restore paths.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Creates `dir` if needed and makes sure it is empty and writable, so that CRIU's images are never
/// mixed with older ones and a permission problem is reported before anything is frozen.
pub(crate) fn prepare_empty_dir(dir: &Path) -> Result<()> {
    let fail = |reason: String| Error::Directory { path: dir.to_path_buf(), reason };
    fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create it ({e}); choose a writable location")))?;
    let mut entries = fs::read_dir(dir).map_err(|e| fail(format!("cannot list it ({e})")))?;
    if entries.next().is_some() {
        return Err(fail("it is not empty; checkpoint into a new directory so images are not mixed".into()));
    }
    let probe = dir.join(".kybernate-write-test");
    fs::write(&probe, b"").map_err(|e| fail(format!("it is not writable ({e}); choose a writable location")))?;
    fs::remove_file(&probe).map_err(|e| fail(format!("cannot remove the write probe ({e})")))?;
    Ok(())
}

/// Creates `dir` if needed (a work directory for logs; it may already hold older logs).
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::Directory {
        path: dir.to_path_buf(),
        reason: format!("cannot create it ({e}); choose a writable location"),
    })
}

/// Total size in bytes of the regular files below `dir`.
pub(crate) fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(|e| Error::io(format!("listing {}", d.display()), e))? {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", d.display()), e))?;
            let meta = entry.metadata().map_err(|e| Error::io(format!("stat {}", entry.path().display()), e))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

/// The part of a CRIU log worth showing: its error lines and its last lines.
pub(crate) fn log_tail(log: &Path) -> String {
    const LAST: usize = 15;
    const ERRORS: usize = 10;
    let text = match fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return format!("(no log at {}: CRIU did not start)", log.display())
        }
        Err(e) => return format!("(cannot read {}: {e})", log.display()),
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail_start = lines.len().saturating_sub(LAST);
    let mut picked: Vec<&str> =
        lines[..tail_start].iter().filter(|l| l.contains("Error")).take(ERRORS).copied().collect();
    if picked.len() < tail_start && !picked.is_empty() {
        picked.push("...");
    }
    picked.extend_from_slice(&lines[tail_start..]);
    picked.join("\n")
}

/// Whether a process with `pid` exists and is not a zombie.
pub(crate) fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])).unwrap_or(false),
        Err(_) => false,
    }
}

/// Words for the fate of a workload process, for error messages.
pub(crate) fn describe_process(pid: i32) -> String {
    if process_alive(pid) {
        format!("is still running (pid {pid})")
    } else {
        format!("is no longer running (pid {pid})")
    }
}

/// The work directory: the one asked for, or the image directory.
pub(crate) fn work_dir_or(work_dir: &Option<PathBuf>, image_dir: &Path) -> PathBuf {
    work_dir.clone().unwrap_or_else(|| image_dir.to_path_buf())
}

/// Reads a pid file written by CRIU or runc.
pub(crate) fn read_pid_file(path: &Path) -> Result<i32> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(format!("reading pid file {}", path.display()), e))?;
    text.trim().parse().map_err(|_| {
        Error::io(
            format!("pid file {} holds {:?}, not a pid", path.display(), text.trim()),
            std::io::Error::from(ErrorKind::InvalidData),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_errors_and_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        let mut text = String::from("(0.1) Error (x.c:1): early trouble\n");
        for i in 0..40 {
            text.push_str(&format!("(0.2) line {i}\n"));
        }
        fs::write(&log, text).unwrap();
        let tail = log_tail(&log);
        assert!(tail.starts_with("(0.1) Error (x.c:1): early trouble\n..."), "{tail}");
        assert!(tail.ends_with("line 39") && !tail.contains("line 24\n"), "{tail}");
        assert!(log_tail(&dir.path().join("absent.log")).contains("CRIU did not start"));
    }

    #[test]
    fn prepare_empty_dir_refuses_non_empty_and_unusable_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("a/b");
        prepare_empty_dir(&images).unwrap();
        fs::write(images.join("old.img"), b"x").unwrap();
        assert!(prepare_empty_dir(&images).unwrap_err().to_string().contains("not empty"));
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(prepare_empty_dir(&file.join("sub")).unwrap_err().to_string().contains("cannot create"));
    }

    #[test]
    fn process_liveness() {
        assert!(process_alive(std::process::id() as i32));
        assert!(!process_alive(i32::MAX));
    }
}
