//! The restore gate: a full restore whose page images are hashed while CRIU restores them, with the
//! restored tasks held before they resume until every hash matches.
//!
//! Verifying a bundle before `runc restore` reads every byte of its memory twice, once to hash it
//! and once when CRIU copies it in. The gate overlaps the two: everything CRIU parses (its other
//! images, the manifest, the writable layer) is verified before it starts, as always, and the raw page
//! images are hashed on another thread while CRIU reads them. CRIU runs its `post-restore` action
//! script once every task's memory is in and before any task runs again, and aborts the restore,
//! killing the tasks, when the script fails. The script is the caller's own binary (see
//! [`action_script_main`]), named in a CRIU configuration file that runc hands to CRIU
//! (`org.criu.config`). The gate is a directory: the hashing thread holds an exclusive lock on its
//! lock file until it has written its verdict there, and the script takes a shared lock (waiting for
//! the verdict), reads it and marks the gate asked. A page image that does not match its manifest
//! therefore never runs, as with verification up front; a verdict never written (the shim gone) fails
//! the script too. CRIU may run the script more than once per action (it reads its configuration
//! file twice under runc); every run gets the same verdict.
//!
//! After the restore the shim checks that the gate was asked; a CRIU that did not run the script
//! still had its pages verified, and a mismatch then kills the container.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::criu_config;
use crate::bundle::{self, DeferredHashes};
use crate::error::{Error, Result};

/// The environment variable that names the gate's directory to the action script. It is set on
/// `runc restore` and reaches CRIU and its scripts through their environment.
pub const GATE_ENV: &str = "KYBERNATE_RESTORE_GATE";
/// The environment variable in which CRIU names the action its script is run for.
const ACTION_ENV: &str = "CRTOOLS_SCRIPT_ACTION";
/// The CRIU configuration file the gate writes into the OCI bundle.
pub const GATE_CRIU_CONFIG: &str = "kybernate-restore-criu.conf";
/// runc's CRIU configuration when the spec names none.
const RUNC_DEFAULT_CRIU_CONFIG: &str = "/etc/criu/runc.conf";
/// In the gate's directory: locked exclusively by the hashing thread until the verdict is written.
const LOCK: &str = "lock";
/// In the gate's directory: the verdict, [`PASS`] or why not.
const VERDICT: &str = "verdict";
/// In the gate's directory: created by the script once it read the verdict.
const ASKED: &str = "asked";
/// The verdict when every page image matched.
const PASS: &str = "ok";

/// Runs the binary as CRIU's action script when CRIU started it as one ([`ACTION_ENV`] is set): for
/// `post-restore` of a gated restore ([`GATE_ENV`] set), waits for the verdict and returns 0 only when
/// every page image matched; 0 for every other action. `None` when the binary was not started by
/// CRIU, so it goes on as itself. A binary that is named as the gate program calls this first thing
/// in `main`.
pub fn action_script_main() -> Option<i32> {
    let action = std::env::var_os(ACTION_ENV)?;
    if action != "post-restore" {
        return Some(0);
    }
    // A later dump or restore of this container that is not gated has nothing to wait for.
    let Some(gate) = std::env::var_os(GATE_ENV) else { return Some(0) };
    Some(match wait_for_verdict(Path::new(&gate)) {
        Ok(verdict) if verdict == PASS => 0,
        Ok(verdict) => {
            eprintln!("kybernate restore gate: the page images did not verify ({verdict}); the restore is aborted");
            1
        }
        Err(e) => {
            eprintln!(
                "kybernate restore gate: no verdict in {}: {e}; the restore is aborted",
                Path::new(&gate).display()
            );
            1
        }
    })
}

/// Waits until the gate in `dir` is unlocked, reads its verdict and marks the gate asked. No verdict
/// (the shim went away before it had one) is an error.
fn wait_for_verdict(dir: &Path) -> std::io::Result<String> {
    let lock = File::open(dir.join(LOCK))?;
    flock(&lock, libc::LOCK_SH)?;
    let verdict = std::fs::read_to_string(dir.join(VERDICT))?;
    File::create(dir.join(ASKED))?;
    Ok(verdict.trim().to_string())
}

/// `flock(2)`, retried when interrupted.
fn flock(file: &File, operation: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `file` owns for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A gate armed for one restore (see the module docs): its directory, the thread hashing the page
/// images (holding the gate's lock until its verdict is written), and the CRIU configuration to put
/// back when the restore is over.
#[derive(Debug)]
pub struct RestoreGate {
    dir: PathBuf,
    hashing: JoinHandle<Result<()>>,
    config: PathBuf,
    base: String,
}

/// How a gated restore ended, as far as the page images go.
#[derive(Debug)]
pub enum GateOutcome {
    /// Every page image matched.
    Verified {
        /// Whether CRIU asked the gate before the tasks resumed.
        asked: bool,
    },
    /// A page image did not match, or could not be read: why.
    Refused {
        /// The verification error, naming the file.
        error: Error,
        /// Whether CRIU asked the gate (and so aborted the restore) before the tasks resumed.
        asked: bool,
    },
}

impl RestoreGate {
    /// Arms the gate for a `runc restore` of the OCI bundle `oci_bundle`, with CRIU's work in
    /// `work_dir`: writes a CRIU configuration naming `program` as the action script (keeping what the
    /// spec's own configuration, or runc's default one, says), points the spec at it, locks the gate
    /// and starts hashing `pages`.
    pub fn arm(oci_bundle: &Path, work_dir: &Path, program: &Path, pages: DeferredHashes) -> Result<RestoreGate> {
        let spec_path = oci_bundle.join("config.json");
        let mut spec = super::mounts::read_json(&spec_path)?;
        let config = oci_bundle.join(GATE_CRIU_CONFIG);
        let named = criu_config::named(&spec);
        let base_path = named.clone().unwrap_or_else(|| PathBuf::from(RUNC_DEFAULT_CRIU_CONFIG));
        let script_line = format!("action-script {}", program.display());
        let base = match std::fs::read_to_string(&base_path) {
            Ok(text) => text.lines().filter(|l| l.trim() != script_line).map(|l| format!("{l}\n")).collect(),
            Err(e) if named.is_none() && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(Error::io(format!("reading the spec's CRIU configuration {}", base_path.display()), e))
            }
        };
        bundle::write_atomically(
            oci_bundle,
            GATE_CRIU_CONFIG,
            format!("{base}{script_line}\n").as_bytes(),
            bundle::Durability::Unsynced,
        )?;
        if named.as_deref() != Some(config.as_path()) {
            criu_config::point_at(&mut spec, &spec_path, &config)?;
            super::mounts::write_spec(oci_bundle, &spec)?;
        }

        let dir = work_dir.join("restore-gate");
        let _ = std::fs::remove_dir_all(&dir);
        crate::fsutil::ensure_dir(&dir)?;
        let lock = File::create(dir.join(LOCK))
            .and_then(|lock| flock(&lock, libc::LOCK_EX).map(|()| lock))
            .map_err(|e| Error::io(format!("locking {}", dir.join(LOCK).display()), e))?;
        let gate = dir.clone();
        let hashing = std::thread::Builder::new()
            .name("restore-gate".into())
            .spawn(move || {
                let (started, bytes) = (std::time::Instant::now(), pages.bytes());
                let verified = pages.verify();
                let verdict = match &verified {
                    Ok(()) => PASS.to_string(),
                    Err(e) => e.to_string(),
                };
                let written =
                    bundle::write_atomically(&gate, VERDICT, verdict.as_bytes(), bundle::Durability::Unsynced);
                tracing::debug!(
                    bytes,
                    hash_ms = started.elapsed().as_millis() as u64,
                    ok = verified.is_ok(),
                    "restore gate: page images hashed"
                );
                // Unlocked: the script reads the verdict, or finds none and fails the restore.
                drop(lock);
                verified.and(written)
            })
            .map_err(|e| Error::io("starting the restore gate's hashing", e))?;
        Ok(RestoreGate { dir, hashing, config, base })
    }

    /// The gate's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The environment `runc restore` needs for the gate: [`GATE_ENV`] naming its directory.
    pub fn env(&self) -> (String, PathBuf) {
        (GATE_ENV.to_string(), self.dir.clone())
    }

    /// Waits for the hashing, puts the CRIU configuration back as it was (so later dumps run no
    /// script) and says how the page images fared and whether CRIU asked the gate.
    pub fn finish(self) -> GateOutcome {
        let verified = self.hashing.join().unwrap_or_else(|_| {
            Err(Error::io("verifying the page images", std::io::Error::other("the hashing thread panicked")))
        });
        if let Some(dir) = self.config.parent() {
            if let Err(e) =
                bundle::write_atomically(dir, GATE_CRIU_CONFIG, self.base.as_bytes(), bundle::Durability::Unsynced)
            {
                tracing::warn!(config = %self.config.display(), error = %e, "the restore gate's CRIU configuration was not put back; later dumps run its script, which does nothing then");
            }
        }
        let asked = self.dir.join(ASKED).exists();
        let _ = std::fs::remove_dir_all(&self.dir);
        match verified {
            Ok(()) => GateOutcome::Verified { asked },
            Err(error) => GateOutcome::Refused { error, asked },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::criu_config::CRIU_CONFIG_ANNOTATION;
    use super::*;
    use serde_json::Value;

    fn oci_bundle(annotations: Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({ "ociVersion": "1.0.2", "annotations": annotations });
        std::fs::write(dir.path().join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        dir
    }

    fn pages(sealed: &[u8], now: &[u8]) -> (tempfile::TempDir, DeferredHashes) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pages-1.img"), sealed).unwrap();
        let deferred = DeferredHashes::for_test(dir.path(), &["pages-1.img"]);
        std::fs::write(dir.path().join("pages-1.img"), now).unwrap();
        (dir, deferred)
    }

    fn spec_config(bundle: &Path) -> String {
        let spec: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        spec["annotations"][CRIU_CONFIG_ANNOTATION].as_str().unwrap().to_string()
    }

    #[test]
    fn an_asked_gate_passes_matching_pages_to_every_run_of_the_script_and_puts_the_configuration_back() {
        let own = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(own.path(), "tcp-established\n").unwrap();
        let bundle = oci_bundle(serde_json::json!({ CRIU_CONFIG_ANNOTATION: own.path().to_str().unwrap() }));
        let work = tempfile::tempdir().unwrap();
        let (_images, deferred) = pages(b"memory", b"memory");
        let gate = RestoreGate::arm(bundle.path(), work.path(), Path::new("/usr/bin/gate"), deferred).unwrap();
        let config = bundle.path().join(GATE_CRIU_CONFIG);
        assert_eq!(spec_config(bundle.path()), config.display().to_string());
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "tcp-established\naction-script /usr/bin/gate\n");
        // What CRIU's post-restore script does, twice as CRIU under runc runs it.
        assert_eq!(wait_for_verdict(gate.dir()).unwrap(), PASS);
        assert_eq!(wait_for_verdict(gate.dir()).unwrap(), PASS);
        let dir = gate.dir().to_path_buf();
        assert!(matches!(gate.finish(), GateOutcome::Verified { asked: true }));
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "tcp-established\n");
        assert!(!dir.exists(), "the gate is removed");
    }

    #[test]
    fn a_mismatch_is_refused_and_named() {
        let bundle = oci_bundle(serde_json::json!({}));
        let work = tempfile::tempdir().unwrap();
        let (_images, deferred) = pages(b"memory", b"MEMORY");
        let gate = RestoreGate::arm(bundle.path(), work.path(), Path::new("/usr/bin/gate"), deferred).unwrap();
        let verdict = wait_for_verdict(gate.dir()).unwrap();
        assert!(verdict.contains("pages-1.img does not match its sha256"), "{verdict}");
        match gate.finish() {
            GateOutcome::Refused { error, asked: true } => {
                assert!(error.to_string().contains("pages-1.img does not match its sha256"), "{error}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_gate_nobody_asked_is_reported_so() {
        let bundle = oci_bundle(serde_json::json!({}));
        let work = tempfile::tempdir().unwrap();
        let (_images, deferred) = pages(b"memory", b"memory");
        let gate = RestoreGate::arm(bundle.path(), work.path(), Path::new("/usr/bin/gate"), deferred).unwrap();
        assert!(matches!(gate.finish(), GateOutcome::Verified { asked: false }));
    }

    #[test]
    fn a_verdict_never_written_fails_the_script() {
        let gate = tempfile::tempdir().unwrap();
        File::create(gate.path().join(LOCK)).unwrap();
        let err = wait_for_verdict(gate.path()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
        assert!(!gate.path().join(ASKED).exists());
    }
}
