//! Diskless checkpoints on stop (`checkpoint_mode = "diskless"`, or `kybernate.io/checkpoint-mode:
//! diskless`): the bundle is sealed in memory (`diskless_dir`, a tmpfs) and `kybernate-sidecar push`
//! streams it from there into the store within what is left of the checkpoint budget, so
//! stop-to-durable is the dump plus the upload, with no write to the node's disk and no fsync.
//!
//! Nothing is lost: the container is gone once CRIU has dumped it, so the memory copy is the only
//! one until the store commits it. When the push fails or runs out of time, and when the checkpoint
//! itself ended `FAILED` or `PARTIAL`, the bundle is copied into the node checkpoint directory
//! (fsynced, renamed into place whole), exactly where a disk checkpoint would be, and the sidecar
//! daemon ships it from there later. The memory copy is removed either way.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::state::Container;

/// A push given less time than this is not tried: the bundle goes to disk at once.
const MIN_PUSH_TIME: Duration = Duration::from_secs(1);

/// Where a diskless checkpoint is written: its own checkpoint root in memory, so that the sidecar's
/// state for the push (and anything else it leaves) goes with it.
pub(super) struct MemoryRoot {
    /// The root (`<diskless_dir>/<container id>-<ms>`), standing for the checkpoint directory.
    pub root: PathBuf,
}

impl MemoryRoot {
    /// A new root for container `id` under `diskless_dir`.
    pub fn new(diskless_dir: &Path, id: &str) -> Self {
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        MemoryRoot { root: diskless_dir.join(format!("{id}-{stamp}")) }
    }
}

impl Drop for MemoryRoot {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.root) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.root.display(), error = %e, "removing a diskless checkpoint's memory failed");
            }
        }
    }
}

impl Container {
    /// Pushes the sealed bundle `dir` (under `memory`) to the store within `time_left`; when it
    /// cannot, keeps it in the checkpoint directory. Returns where the bundle is now: the sidecar's
    /// word for the stored object, or the directory on disk. `Err` only when neither worked (then
    /// the bundle is lost, which the log says).
    pub(super) fn ship_from_memory(
        &self,
        memory: &MemoryRoot,
        dir: &Path,
        time_left: Duration,
    ) -> Result<String, String> {
        let pushed = if time_left < MIN_PUSH_TIME {
            Err(format!("only {time_left:?} of the checkpoint budget was left for the push"))
        } else {
            let args = ["--checkpoint-dir".as_ref(), memory.root.as_os_str(), "push".as_ref(), dir.as_os_str()];
            let what = format!("pushing diskless checkpoint {}", dir.display());
            let fix = "raise checkpoint_budget in the shim config, or check the store";
            match crate::sidecar::run(&self.config, &self.reaper, &args, time_left, &what, fix) {
                Ok(run) if run.code == Some(0) => Ok(stored_object(&run.stdout)),
                Ok(run) => Err(format!("{what} failed ({}): {}", run.status, run.said)),
                Err(e) => Err(e.to_string()),
            }
        };
        match pushed {
            Ok(object) => {
                tracing::info!(id = %self.id, %object, "diskless checkpoint pushed to the store");
                Ok(object)
            }
            Err(why) => {
                let kept = self.keep_on_disk(memory, dir)?;
                tracing::warn!(
                    id = %self.id,
                    bundle = %kept.display(),
                    error = %why,
                    "the diskless checkpoint could not be pushed; it is kept on disk, for the sidecar to ship"
                );
                Ok(kept.display().to_string())
            }
        }
    }

    /// Copies bundle `dir` (under `memory`) to the same place under the checkpoint directory.
    pub(super) fn keep_on_disk(&self, memory: &MemoryRoot, dir: &Path) -> Result<PathBuf, String> {
        let rel =
            dir.strip_prefix(&memory.root).map_err(|_| format!("{} is outside its memory root", dir.display()))?;
        let target = self.config.checkpoint_dir.join(rel);
        persist(dir, &target).map_err(|e| {
            let message = format!(
                "copying the diskless checkpoint {} to {}: {e}; it is lost (check the space in checkpoint_dir)",
                dir.display(),
                target.display()
            );
            tracing::error!(id = %self.id, "{message}");
            message
        })?;
        Ok(target)
    }
}

/// The stored object in `kybernate-sidecar push`'s report (`shipped <dir> to <store>/<key> (…)`), or
/// the report itself when it reads otherwise.
fn stored_object(report: &str) -> String {
    report
        .split_once(" to ")
        .and_then(|(_, rest)| rest.split_once(" ("))
        .map_or_else(|| report.to_string(), |(object, _)| object.to_string())
}

/// Copies the bundle `from` to `to` durably: into a hidden sibling of `to`, every file and directory
/// fsynced, then renamed into place and its parent fsynced, so `to` appears whole or not at all.
fn persist(from: &Path, to: &Path) -> io::Result<()> {
    let parent = to.parent().ok_or_else(|| io::Error::other("a bundle directory has a parent"))?;
    let name = to.file_name().ok_or_else(|| io::Error::other("a bundle directory has a name"))?;
    fs::create_dir_all(parent)?;
    let staging = parent.join(format!(".{}.copying", name.to_string_lossy()));
    match fs::remove_dir_all(&staging) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    copy_tree(from, &staging)?;
    fs::rename(&staging, to)?;
    fs::File::open(parent)?.sync_all()
}

/// Copies directory `from` to the new directory `to`, fsyncing each file and directory.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&source, &target)?;
        } else if kind.is_file() {
            fs::copy(&source, &target)?;
            fs::File::open(&target)?.sync_all()?;
        } else {
            return Err(io::Error::other(format!("{} is neither a file nor a directory", source.display())));
        }
    }
    fs::File::open(to)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pushed_object_is_read_from_the_report() {
        let report = "shipped /dev/shm/kybernate/c-1/ns/p/c/t to s3://bundles/ns/p/c/t.tar (1.0 MiB, 0.2s, 0 B resumed, sha256 ab)";
        assert_eq!(stored_object(report), "s3://bundles/ns/p/c/t.tar");
        assert_eq!(stored_object("already shipped"), "already shipped");
    }

    #[test]
    fn a_bundle_is_persisted_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("memory/ns/p/c/t");
        fs::create_dir_all(from.join("checkpoint")).unwrap();
        fs::write(from.join("checkpoint/pages-1.img"), b"pages").unwrap();
        fs::write(from.join("COMPLETE"), b"manifest.json sha256:x\n").unwrap();
        let to = tmp.path().join("disk/ns/p/c/t");
        persist(&from, &to).unwrap();
        assert_eq!(fs::read(to.join("checkpoint/pages-1.img")).unwrap(), b"pages");
        assert_eq!(fs::read(to.join("COMPLETE")).unwrap(), b"manifest.json sha256:x\n");
        let left: Vec<_> = fs::read_dir(to.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["t"], "no staging directory is left");

        std::os::unix::fs::symlink("/etc/passwd", from.join("link")).unwrap();
        let err = persist(&from, &tmp.path().join("disk/ns/p/c/u")).unwrap_err();
        assert!(err.to_string().ends_with("link is neither a file nor a directory"), "{err}");
    }
}
