//! Mounting the container's root filesystem from the mounts containerd's snapshotter describes
//! (overlay, bind) into `<bundle>/rootfs`, and unmounting it again.
//!
//! Unmounting uses containerd-shim's `umount_recursive`. Mounting does not use its `mount_rootfs`:
//! that one forks a child per mount and waits for it through containerd-shim's process monitor, which
//! is fed by containerd-shim's own reaper — and this shim reaps for itself (`reaper.rs`), so the wait
//! would never return. Here a thread with a working directory of its own (`unshare(CLONE_FS)`) makes
//! the mount, with the same option table and the same lowerdir compaction for long overlay options.

use std::path::{Path, PathBuf};

use containerd_shim::mount::umount_recursive;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Result, ShimError};

/// One mount as containerd sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Filesystem type (`overlay`, `bind`, ...).
    pub kind: String,
    /// Source device or directory.
    pub source: String,
    /// `mount -o` style options.
    pub options: Vec<String>,
}

/// Options that are mount flags rather than filesystem data: `(name, clear, flags)`.
const FLAG_OPTIONS: &[(&str, bool, MsFlags)] = &[
    ("async", true, MsFlags::MS_SYNCHRONOUS),
    ("atime", true, MsFlags::MS_NOATIME),
    ("bind", false, MsFlags::MS_BIND),
    ("defaults", false, MsFlags::empty()),
    ("dev", true, MsFlags::MS_NODEV),
    ("diratime", true, MsFlags::MS_NODIRATIME),
    ("dirsync", false, MsFlags::MS_DIRSYNC),
    ("exec", true, MsFlags::MS_NOEXEC),
    ("mand", false, MsFlags::MS_MANDLOCK),
    ("noatime", false, MsFlags::MS_NOATIME),
    ("nodev", false, MsFlags::MS_NODEV),
    ("nodiratime", false, MsFlags::MS_NODIRATIME),
    ("noexec", false, MsFlags::MS_NOEXEC),
    ("nomand", true, MsFlags::MS_MANDLOCK),
    ("norelatime", true, MsFlags::MS_RELATIME),
    ("nostrictatime", true, MsFlags::MS_STRICTATIME),
    ("nosuid", false, MsFlags::MS_NOSUID),
    ("rbind", false, MsFlags::MS_BIND.union(MsFlags::MS_REC)),
    ("relatime", false, MsFlags::MS_RELATIME),
    ("remount", false, MsFlags::MS_REMOUNT),
    ("ro", false, MsFlags::MS_RDONLY),
    ("rw", true, MsFlags::MS_RDONLY),
    ("strictatime", false, MsFlags::MS_STRICTATIME),
    ("suid", true, MsFlags::MS_NOSUID),
    ("sync", false, MsFlags::MS_SYNCHRONOUS),
];

/// Propagation options, applied with a second mount call.
const PROPAGATION_OPTIONS: &[(&str, MsFlags)] = &[
    ("private", MsFlags::MS_PRIVATE),
    ("rprivate", MsFlags::MS_PRIVATE.union(MsFlags::MS_REC)),
    ("shared", MsFlags::MS_SHARED),
    ("rshared", MsFlags::MS_SHARED.union(MsFlags::MS_REC)),
    ("slave", MsFlags::MS_SLAVE),
    ("rslave", MsFlags::MS_SLAVE.union(MsFlags::MS_REC)),
    ("unbindable", MsFlags::MS_UNBINDABLE),
    ("runbindable", MsFlags::MS_UNBINDABLE.union(MsFlags::MS_REC)),
];

/// The kernel copies at most one page of mount data.
const MAX_DATA: usize = 4096;

/// How one mount call is made.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    flags: MsFlags,
    propagation: MsFlags,
    data: String,
    /// Directory to mount from (overlay lowerdirs made relative to fit in one page).
    chdir: Option<PathBuf>,
}

fn plan(spec: &MountSpec) -> Result<Plan> {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for opt in &spec.options {
        if let Some((_, clear, f)) = FLAG_OPTIONS.iter().find(|(name, _, _)| name == opt) {
            if *clear {
                flags.remove(*f);
            } else {
                flags.insert(*f);
            }
        } else if let Some((_, f)) = PROPAGATION_OPTIONS.iter().find(|(name, _)| name == opt) {
            propagation.insert(*f);
        } else {
            data.push(opt.clone());
        }
    }
    if spec.kind == "bind" {
        flags.insert(MsFlags::MS_BIND);
    }
    let mut chdir = None;
    if spec.kind == "overlay" && data.join(",").len() >= MAX_DATA - 512 {
        if let Some((dir, compacted)) = compact_lowerdirs(&data) {
            chdir = Some(dir);
            data = compacted;
        }
    }
    let data = data.join(",");
    if data.len() >= MAX_DATA {
        return Err(ShimError::InvalidArgument(format!(
            "mount options of {} are {} bytes, more than the kernel accepts ({MAX_DATA})",
            spec.source,
            data.len()
        )));
    }
    Ok(Plan { flags, propagation, data, chdir })
}

/// Rewrites `lowerdir=` relative to the parent of the layers' common directory, as containerd does.
fn compact_lowerdirs(data: &[String]) -> Option<(PathBuf, Vec<String>)> {
    let idx = data.iter().position(|o| o.starts_with("lowerdir="))?;
    let dirs: Vec<&str> = data[idx]["lowerdir=".len()..].split(':').collect();
    if dirs.len() < 2 {
        return None;
    }
    let first = dirs[0];
    let mut common = first.len();
    for d in &dirs[1..] {
        common = common.min(first.bytes().zip(d.bytes()).take_while(|(a, b)| a == b).count());
    }
    // The directory part of the common prefix: the layers are `<snapshots>/<id>/fs`.
    let common = &first[..common];
    let base = Path::new(&common[..common.rfind('/')?]);
    if base == Path::new("/") || base.as_os_str().is_empty() {
        return None;
    }
    let base_str = format!("{}/", base.display());
    let relative: Option<Vec<&str>> = dirs.iter().map(|d| d.strip_prefix(&base_str)).collect();
    let mut out = data.to_vec();
    out[idx] = format!("lowerdir={}", relative?.join(":"));
    Some((base.to_path_buf(), out))
}

fn mount_one(spec: &MountSpec, target: &Path) -> Result<()> {
    let plan = plan(spec)?;
    let fail = |e: nix::Error| {
        ShimError::io(format!("mounting {} ({}) on {}", spec.source, spec.kind, target.display()), e.into())
    };
    let source = (!spec.source.is_empty()).then_some(spec.source.as_str());
    let fstype = (!spec.kind.is_empty() && spec.kind != "bind").then_some(spec.kind.as_str());
    let data = (!plan.data.is_empty()).then_some(plan.data.as_str());
    let target = target.to_path_buf();
    let do_mount = move || -> Result<()> {
        // Bind mounts ignore MS_RDONLY on the first call; flags other than propagation apply here.
        mount(source, &target, fstype, plan.flags, data).map_err(fail)?;
        if plan.flags.contains(MsFlags::MS_BIND) && plan.flags.contains(MsFlags::MS_RDONLY) {
            mount(None::<&str>, &target, None::<&str>, plan.flags | MsFlags::MS_REMOUNT, None::<&str>).map_err(fail)?;
        }
        if !plan.propagation.is_empty() {
            mount(None::<&str>, &target, None::<&str>, plan.propagation, None::<&str>).map_err(fail)?;
        }
        Ok(())
    };
    match plan.chdir {
        None => do_mount(),
        // A thread with its own working directory (unshare(CLONE_FS)) mounts the relative lowerdirs.
        Some(dir) => std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                    .map_err(|e| ShimError::io("unsharing the working directory for a long overlay mount", e.into()))?;
                nix::unistd::chdir(&dir).map_err(|e| ShimError::io(format!("chdir {}", dir.display()), e.into()))?;
                do_mount()
            })
            .join()
            .unwrap_or_else(|_| Err(ShimError::Internal("the mount thread panicked".into())))
        }),
    }
}

/// Mounts `mounts` in order on `target` (created if needed); on failure, unmounts what was mounted.
pub fn mount_rootfs(mounts: &[MountSpec], target: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .create(target)
        .map_err(|e| ShimError::io(format!("creating rootfs directory {}", target.display()), e))?;
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(m, target) {
            for _ in 0..i {
                let _ = umount2(target, MntFlags::MNT_DETACH);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts everything mounted on or below `target` (a rootfs the shim mounted) with containerd-shim's
/// `umount_recursive`; a mount that is still busy is detached instead, so Delete does not fail on it.
/// Absent mounts are fine.
pub fn unmount_all(target: &Path) -> Result<()> {
    let path =
        target.to_str().ok_or_else(|| ShimError::InvalidArgument(format!("{} is not UTF-8", target.display())))?;
    umount_recursive(Some(path), 0)
        .or_else(|_| umount_recursive(Some(path), MntFlags::MNT_DETACH.bits()))
        .map_err(|e| ShimError::Internal(format!("unmounting rootfs {}: {e}", target.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str, options: &[&str]) -> MountSpec {
        MountSpec { kind: kind.into(), source: "src".into(), options: options.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let p = plan(&spec("overlay", &["ro", "nosuid", "rprivate", "lowerdir=/a:/b", "upperdir=/u"])).unwrap();
        assert_eq!(p.flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(p.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(p.data, "lowerdir=/a:/b,upperdir=/u");
        assert_eq!(p.chdir, None);
        let p = plan(&spec("bind", &["rbind", "ro", "rw"])).unwrap();
        assert_eq!(p.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
    }

    #[test]
    fn long_overlay_lowerdirs_are_made_relative() {
        let root = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots";
        let lower: Vec<String> = (100..200).map(|i| format!("{root}/{i}/fs")).collect();
        let opts = [
            "index=off".to_string(),
            format!("lowerdir={}", lower.join(":")),
            format!("upperdir={root}/7/fs"),
            format!("workdir={root}/7/work"),
        ];
        let refs: Vec<&str> = opts.iter().map(String::as_str).collect();
        let p = plan(&spec("overlay", &refs)).unwrap();
        assert_eq!(p.chdir.as_deref(), Some(Path::new(root)));
        assert!(p.data.contains("lowerdir=100/fs:101/fs:") && p.data.contains(&format!("upperdir={root}/7/fs")));
        assert!(p.data.len() < MAX_DATA);
    }
}
