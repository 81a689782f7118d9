//! The mounts a checkpointed container had that the container it is restored into lacks.
//!
//! runc dumps every bind mount of the spec as an external mount keyed by its destination, and at
//! restore maps only the bind mounts of the *new* spec; CRIU refuses any key left without a mapping
//! ("No mapping for … mountpoint"). A checkpoint taken by another engine (Podman binds `/etc/hosts`,
//! `/etc/hostname`, `/run/.containerenv` and `/dev/shm`; a CRI binds `/etc/resolv.conf` and
//! `/dev/termination-log`) thus cannot be restored into a container `ctr` or another CRI created,
//! until each such destination is a bind mount there too.
//!
//! A tmpfs the new spec has and the checkpoint did not (containerd's `/run`) is dropped: CRIU
//! restores the checkpoint's mount tree anyway, and runc would not make the mountpoints below it.
//! runc also makes the cgroup mount itself (on cgroup v1 as one external bind per subsystem), so a
//! checkpoint with one needs one in the new spec: it is added, read-only.
//!
//! For each bind mount, a placeholder is made in the new container's OCI bundle directory and bound at the
//! same destination in its `config.json` (replacing a non-bind mount there, such as containerd's
//! `/dev/shm` tmpfs). Sources named by the checkpoint's `spec.dump` are never used: they are paths on
//! the node that wrote it, and a hostile archive could name any. The placeholder takes the kind the
//! destination has in the new rootfs (the writable layer already applied), else a file for the
//! well-known file mounts and a directory otherwise; the host files get minimal content, `/dev/shm`
//! Podman's saved contents (`devshm-checkpoint.tar`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::bundle::SPEC_DUMP;
use crate::error::{Error, Result};

/// Directory under the new container's OCI bundle that holds the placeholders.
pub const PLACEHOLDER_DIR: &str = "kybernate-mounts";
/// Podman's copy of the container's `/dev/shm`, beside `spec.dump` in its export.
pub const DEVSHM_TAR: &str = "devshm-checkpoint.tar";
/// Mounts that are files in every engine that makes them.
const FILE_MOUNTS: [&str; 5] =
    ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv", "/dev/termination-log"];
/// More bind mounts than this in one checkpoint's spec is not a container's spec.
const MAX_MAPPED: usize = 64;

/// One destination bound to a placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedMount {
    /// Where the checkpointed container had a bind mount.
    pub destination: String,
    /// The placeholder bound there now.
    pub source: PathBuf,
}

/// Binds a placeholder (made under `oci_bundle`) at every bind-mount destination of the
/// checkpoint's `spec.dump` (in `checkpoint`, the bundle directory) that the new container's spec
/// `config` (its rootfs at `rootfs`) does not bind, adds a read-only cgroup mount where the
/// checkpoint had one and `config` has none, and drops a tmpfs the checkpoint did not have. Nothing
/// is done without a `spec.dump`. Returns the placeholders bound.
pub(crate) fn add_expected_mounts(
    checkpoint: &Path,
    config: &mut Value,
    oci_bundle: &Path,
    rootfs: &Path,
) -> Result<Vec<MappedMount>> {
    let dump = checkpoint.join(SPEC_DUMP);
    if !dump.is_file() {
        return Ok(Vec::new());
    }
    let refuse = |reason: String| Error::Bundle { path: checkpoint.to_path_buf(), reason };
    let old = read_json(&dump)?;
    let wanted: Vec<String> = mounts(&old).filter(|m| is_bind(m)).filter_map(destination).collect();
    if wanted.len() > MAX_MAPPED {
        return Err(refuse(format!(
            "{SPEC_DUMP} names {} bind mounts (at most {MAX_MAPPED} are mapped)",
            wanted.len()
        )));
    }
    // runc makes a cgroup mount itself (on cgroup v1 as external binds, keyed by subsystem): the new
    // spec needs one where the checkpoint had one, read-only whatever the checkpoint says.
    let present: Vec<String> = mounts(config).filter_map(destination).collect();
    let cgroups: Vec<Value> = mounts(&old)
        .filter(|m| m.get("type").and_then(Value::as_str) == Some("cgroup"))
        .filter(|m| destination(m).is_some_and(|d| clean_destination(&d).is_some() && !present.contains(&d)))
        .map(|m| {
            let mut options: Vec<&str> = m
                .get("options")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter(|o| *o != "rw" && *o != "ro")
                .collect();
            options.push("ro");
            serde_json::json!({"destination": destination(m), "type": "cgroup", "source": "cgroup", "options": options})
        })
        .collect();
    let bound: Vec<String> = mounts(config).filter(|m| is_bind(m)).filter_map(destination).collect();
    let missing = wanted
        .iter()
        .filter(|d| !bound.contains(d))
        .map(|dest| match clean_destination(dest) {
            Some(inside) => Ok((dest, inside)),
            None => Err(refuse(format!("{SPEC_DUMP} has a mount at {dest:?}, which is not a clean absolute path"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut mapped = Vec::new();
    for (dest, inside) in missing {
        let source = oci_bundle.join(PLACEHOLDER_DIR).join(mapped.len().to_string());
        make_placeholder(checkpoint, dest, &rootfs.join(&inside), &source, config)?;
        mapped.push(MappedMount { destination: dest.clone(), source });
    }
    // CRIU restores the checkpoint's mount tree, not the new spec's; but runc skips making the
    // mountpoints below the spec's tmpfs mounts (CRIU restores a tmpfs's content). A tmpfs the
    // checkpoint did not have (containerd's `/run`) would hide the mountpoints its binds need.
    let had: Vec<String> = mounts(&old).filter_map(destination).collect();
    let stray_tmpfs = |m: &Value| {
        m.get("type").and_then(Value::as_str) == Some("tmpfs") && destination(m).is_some_and(|d| !had.contains(&d))
    };
    let strays = mounts(config).filter(|m| stray_tmpfs(m)).count();
    if mapped.is_empty() && cgroups.is_empty() && strays == 0 {
        return Ok(mapped);
    }
    let list = config
        .get_mut("mounts")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| refuse("the new container's spec has no mounts list".into()))?;
    list.retain(|m| !stray_tmpfs(m) && !destination(m).is_some_and(|d| mapped.iter().any(|x| x.destination == d)));
    list.extend(cgroups);
    for m in &mapped {
        let mut options = vec!["rbind", "rprivate"];
        if m.destination == "/dev/shm" {
            options.extend(["nosuid", "noexec", "nodev"]);
        }
        list.push(serde_json::json!({
            "destination": m.destination, "type": "bind", "source": m.source, "options": options,
        }));
    }
    tracing::info!(binds = ?mapped.iter().map(|m| &m.destination).collect::<Vec<_>>(), "mounts the checkpointed container had added to the new spec");
    Ok(mapped)
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let bytes = fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Bundle {
        path: path.to_path_buf(),
        reason: format!("it is not JSON ({e}); the checkpoint or the new spec is corrupt"),
    })
}

/// Writes `spec` as the OCI bundle's `config.json`, atomically (runc reads it at create or restore).
pub(crate) fn write_spec(oci_bundle: &Path, spec: &Value) -> Result<()> {
    let text = serde_json::to_vec_pretty(spec).map_err(|e| Error::Bundle {
        path: oci_bundle.join("config.json"),
        reason: format!("encoding the new spec: {e}"),
    })?;
    crate::bundle::write_atomically(oci_bundle, "config.json", &text, crate::bundle::Durability::Unsynced)
}

fn mounts(spec: &Value) -> impl Iterator<Item = &Value> {
    spec.get("mounts").and_then(Value::as_array).into_iter().flatten()
}

fn destination(mount: &Value) -> Option<String> {
    let d = mount.get("destination")?.as_str()?;
    Some(if d.len() > 1 { d.trim_end_matches('/').to_string() } else { d.to_string() })
}

/// A bind mount by type or by option, as runc decides.
fn is_bind(mount: &Value) -> bool {
    let options = mount.get("options").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str);
    mount.get("type").and_then(Value::as_str) == Some("bind")
        || options.into_iter().any(|o| o == "bind" || o == "rbind")
}

/// `dest` relative to the rootfs, if it is absolute and has only normal components.
fn clean_destination(dest: &str) -> Option<PathBuf> {
    let path = Path::new(dest);
    let mut parts = path.components();
    if parts.next() != Some(Component::RootDir) {
        return None;
    }
    let rel: PathBuf = parts.clone().collect();
    (parts.all(|c| matches!(c, Component::Normal(_))) && !rel.as_os_str().is_empty()).then_some(rel)
}

/// Makes the placeholder for `dest` at `source`: the kind `in_rootfs` has, else a file for the
/// well-known file mounts and a directory otherwise, with the content a runtime would give it.
fn make_placeholder(checkpoint: &Path, dest: &str, in_rootfs: &Path, source: &Path, config: &Value) -> Result<()> {
    let io = |what: &str, e| Error::io(format!("{what} {}", source.display()), e);
    let parent = source.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(|e| io("creating the directory of", e))?;
    let is_file = match fs::symlink_metadata(in_rootfs) {
        Ok(meta) => !meta.is_dir(),
        Err(_) => FILE_MOUNTS.contains(&dest),
    };
    if !is_file {
        fs::create_dir(source).map_err(|e| io("creating", e))?;
        let saved = checkpoint.join(DEVSHM_TAR);
        if dest == "/dev/shm" && saved.is_file() {
            crate::rootfs::unpack_layer(&saved, source, &BTreeMap::new())?;
        }
        return Ok(());
    }
    let hostname = config.get("hostname").and_then(Value::as_str).unwrap_or("localhost");
    let content = match dest {
        "/etc/hosts" => {
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n")
        }
        "/etc/hostname" => format!("{hostname}\n"),
        "/etc/resolv.conf" => fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        _ => String::new(),
    };
    fs::write(source, content).map_err(|e| io("writing", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mounts: Value) -> Value {
        serde_json::json!({ "hostname": "web-0", "mounts": mounts })
    }

    fn setup(old: Value, new: Value) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (checkpoint, oci, rootfs) = (dir.path().join("ck"), dir.path().join("oci"), dir.path().join("oci/rootfs"));
        fs::create_dir_all(&checkpoint).unwrap();
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(checkpoint.join(SPEC_DUMP), old.to_string()).unwrap();
        fs::write(oci.join("config.json"), new.to_string()).unwrap();
        (dir, checkpoint, oci, rootfs)
    }

    /// The function on `oci/config.json`, written back as the shim's caller does.
    fn add_expected_mounts(checkpoint: &Path, oci: &Path, rootfs: &Path) -> Result<Vec<MappedMount>> {
        let mut config = read_json(&oci.join("config.json")).unwrap();
        let mapped = super::add_expected_mounts(checkpoint, &mut config, oci, rootfs)?;
        fs::write(oci.join("config.json"), config.to_string()).unwrap();
        Ok(mapped)
    }

    #[test]
    fn podmans_bind_mounts_get_placeholders_in_a_ctr_spec() {
        let old = spec(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/run/containers/x/hosts", "options": ["bind", "rprivate"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/var/lib/containers/x/shm", "options": ["bind"]},
            {"destination": "/run/.containerenv", "type": "bind", "source": "/run/x/.containerenv", "options": ["bind"]},
            {"destination": "/data/", "type": "none", "source": "/srv/data", "options": ["rbind"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "rw"]},
        ]));
        let new = spec(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        ]));
        let (_dir, checkpoint, oci, rootfs) = setup(old, new);
        let mut shm = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o4755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        shm.append_data(&mut h, "sem.counter", &b"abc"[..]).unwrap();
        fs::write(checkpoint.join(DEVSHM_TAR), shm.into_inner().unwrap()).unwrap();

        let mapped = add_expected_mounts(&checkpoint, &oci, &rootfs).unwrap();
        let dests: Vec<&str> = mapped.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(dests, ["/etc/hosts", "/dev/shm", "/run/.containerenv", "/data"]);
        for m in &mapped {
            assert!(m.source.starts_with(oci.join(PLACEHOLDER_DIR)), "{m:?}");
        }
        assert!(fs::read_to_string(&mapped[0].source).unwrap().contains("127.0.1.1\tweb-0"));
        assert_eq!(fs::read(mapped[1].source.join("sem.counter")).unwrap(), b"abc");
        assert_eq!(fs::metadata(mapped[1].source.join("sem.counter")).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(fs::read(&mapped[2].source).unwrap(), b"");
        assert!(mapped[3].source.is_dir());

        let config = read_json(&oci.join("config.json")).unwrap();
        let binds: Vec<(String, String)> =
            mounts(&config).map(|m| (destination(m).unwrap(), m["type"].as_str().unwrap().to_string())).collect();
        assert_eq!(
            binds,
            [
                ("/proc", "proc"),
                ("/sys/fs/cgroup", "cgroup"),
                ("/etc/hosts", "bind"),
                ("/dev/shm", "bind"),
                ("/run/.containerenv", "bind"),
                ("/data", "bind")
            ]
            .map(|(d, t)| (d.to_string(), t.to_string()))
        );
        assert_eq!(mounts(&config).nth(1).unwrap()["options"], serde_json::json!(["nosuid", "ro"]), "read-only");
        assert_eq!(add_expected_mounts(&checkpoint, &oci, &rootfs).unwrap(), [], "a second pass finds all bound");
        assert_eq!(read_json(&oci.join("config.json")).unwrap(), config, "and changes nothing");
    }

    #[test]
    fn a_destination_already_bound_is_kept_and_the_rootfs_decides_the_kind() {
        let old = spec(serde_json::json!([
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/a", "options": ["bind"]},
            {"destination": "/etc/app.conf", "type": "bind", "source": "/b", "options": ["bind"]},
        ]));
        let new = spec(serde_json::json!([
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/sandbox/resolv.conf", "options": ["rbind"]},
        ]));
        let (_dir, checkpoint, oci, rootfs) = setup(old, new);
        fs::write(rootfs.join("etc/app.conf"), "x").unwrap();
        let mapped = add_expected_mounts(&checkpoint, &oci, &rootfs).unwrap();
        assert_eq!(mapped.len(), 1);
        assert_eq!(mapped[0].destination, "/etc/app.conf");
        assert!(mapped[0].source.is_file(), "a file in the rootfs gets a file");
        let config = read_json(&oci.join("config.json")).unwrap();
        assert_eq!(mounts(&config).next().unwrap()["source"], "/sandbox/resolv.conf", "the new spec's own bind kept");
    }

    #[test]
    fn hostile_destinations_and_too_many_mounts_are_refused_and_nothing_changes() {
        for dest in ["etc/hosts", "/etc/../../x", "/", ""] {
            let old =
                spec(serde_json::json!([{"destination": dest, "type": "bind", "source": "/", "options": ["bind"]}]));
            let new = spec(serde_json::json!([]));
            let (_dir, checkpoint, oci, rootfs) = setup(old, new.clone());
            let err = add_expected_mounts(&checkpoint, &oci, &rootfs).unwrap_err().to_string();
            assert!(err.contains("not a clean absolute path"), "{dest}: {err}");
            assert_eq!(read_json(&oci.join("config.json")).unwrap(), new);
            assert!(!oci.join(PLACEHOLDER_DIR).exists());
        }
        let many: Vec<Value> = (0..=MAX_MAPPED)
            .map(|i| serde_json::json!({"destination": format!("/m{i}"), "type": "bind", "source": "/", "options": []}))
            .collect();
        let (_dir, checkpoint, oci, rootfs) = setup(spec(Value::Array(many)), spec(serde_json::json!([])));
        let err = add_expected_mounts(&checkpoint, &oci, &rootfs).unwrap_err().to_string();
        assert!(err.contains("at most 64 are mapped"), "{err}");
        assert!(!oci.join(PLACEHOLDER_DIR).exists());
    }

    #[test]
    fn without_a_spec_dump_nothing_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let config = spec(serde_json::json!([{"destination": "/run", "type": "tmpfs", "source": "tmpfs"}]));
        fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        assert_eq!(add_expected_mounts(dir.path(), dir.path(), dir.path()).unwrap(), []);
        assert_eq!(read_json(&dir.path().join("config.json")).unwrap(), config);
    }

    use std::os::unix::fs::PermissionsExt;
}
