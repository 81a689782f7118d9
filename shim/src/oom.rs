//! OOM notification: one thread per container watches its memory cgroup and sends an `Oom` event
//! whenever the kernel's OOM killer acts in it. cgroup v1 uses `cgroup.event_control` with an
//! eventfd; cgroup v2 watches `memory.events` with inotify. The thread ends when the cgroup is removed.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::error::{Result, ShimError};
use crate::events::{Events, TaskEvent};

/// A memory cgroup directory and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MemoryCgroup {
    V1(PathBuf),
    V2(PathBuf),
}

/// Finds the memory cgroup of `pid` from `/proc/<pid>/cgroup` and this process's mount table.
fn memory_cgroup(pid: i32) -> Result<MemoryCgroup> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| ShimError::io(format!("reading the cgroups of pid {pid}"), e))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| ShimError::io("reading /proc/self/mountinfo", e))?;
    find_memory_cgroup(&cgroups, &mountinfo)
        .ok_or_else(|| ShimError::Internal(format!("pid {pid} has no memory cgroup that this shim can see")))
}

fn find_memory_cgroup(cgroups: &str, mountinfo: &str) -> Option<MemoryCgroup> {
    // mountinfo: id parent major:minor root mountpoint options... - fstype source superoptions
    let mounts: Vec<(&str, &str, &str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some((*pre.get(3)?, *pre.get(4)?, *post.first()?, *post.get(2)?))
        })
        .collect();
    let join = |mount_root: &str, mount_point: &str, path: &str| {
        let rel = path.strip_prefix(mount_root).unwrap_or(path).trim_start_matches('/');
        Path::new(mount_point).join(rel)
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            let (root, point, _, _) = mounts
                .iter()
                .find(|(_, _, fstype, opts)| *fstype == "cgroup" && opts.split(',').any(|o| o == "memory"))?;
            return Some(MemoryCgroup::V1(join(root, point, path)));
        }
    }
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let (root, point, _, _) = mounts.iter().find(|(_, _, fstype, _)| *fstype == "cgroup2")?;
    Some(MemoryCgroup::V2(join(root, point, path)))
}

/// Starts watching the memory cgroup of `pid` (the init process of container `id`).
pub fn watch(id: &str, pid: i32, events: Events) -> Result<()> {
    let cgroup = memory_cgroup(pid)?;
    let id = id.to_string();
    let spawn = |f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(format!("oom-{id}"))
            .stack_size(64 * 1024)
            .spawn(f)
            .map(drop)
            .map_err(|e| ShimError::io("starting the OOM watcher", e))
    };
    match cgroup {
        MemoryCgroup::V1(dir) => {
            let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
                .map_err(|e| ShimError::io("creating an eventfd", e.into()))?;
            let control = File::open(dir.join("memory.oom_control"))
                .map_err(|e| ShimError::io(format!("opening {}/memory.oom_control", dir.display()), e))?;
            std::fs::write(
                dir.join("cgroup.event_control"),
                format!("{} {}", efd.as_fd().as_raw_fd(), control.as_raw_fd()),
            )
            .map_err(|e| ShimError::io(format!("registering for OOM events in {}", dir.display()), e))?;
            let id = id.clone();
            spawn(Box::new(move || {
                let _control = control;
                // Fires on every OOM, and once more when the cgroup is removed.
                while efd.read().is_ok() {
                    if !dir.join("memory.oom_control").exists() {
                        break;
                    }
                    tracing::info!(id, "OOM in the container's memory cgroup");
                    events.send(TaskEvent::Oom { container_id: id.clone() });
                }
            }))
        }
        MemoryCgroup::V2(dir) => {
            let file = dir.join("memory.events");
            let inotify =
                Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| ShimError::io("creating an inotify", e.into()))?;
            inotify
                .add_watch(&file, AddWatchFlags::IN_MODIFY)
                .map_err(|e| ShimError::io(format!("watching {}", file.display()), e.into()))?;
            let mut seen = oom_kills(&file).unwrap_or(0);
            let id = id.clone();
            spawn(Box::new(move || {
                while let Ok(events_read) = inotify.read_events() {
                    if events_read.iter().any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED)) {
                        break;
                    }
                    let Some(now) = oom_kills(&file) else { break };
                    if now > seen {
                        tracing::info!(id, "OOM in the container's memory cgroup");
                        events.send(TaskEvent::Oom { container_id: id.clone() });
                    }
                    seen = now;
                }
            }))
        }
    }
}

/// The `oom_kill` counter of a cgroup v2 `memory.events` file.
fn oom_kills(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn v1_memory_cgroup_is_found() {
        let cgroups = "6:freezer:/default/c1\n4:memory:/default/c1\n0::/default/c1\n";
        assert_eq!(
            find_memory_cgroup(cgroups, MOUNTINFO),
            Some(MemoryCgroup::V1("/sys/fs/cgroup/memory/default/c1".into()))
        );
    }

    #[test]
    fn v2_memory_cgroup_is_found() {
        let mountinfo = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            find_memory_cgroup("0::/k8s/pod1/c1\n", mountinfo),
            Some(MemoryCgroup::V2("/sys/fs/cgroup/k8s/pod1/c1".into()))
        );
        // a mount of a sub-tree (inside a container) is resolved against its root
        let nested = "30 23 0:27 /k8s /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_memory_cgroup("0::/k8s/pod1\n", nested), Some(MemoryCgroup::V2("/sys/fs/cgroup/pod1".into())));
    }

    #[test]
    fn oom_kill_counter_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.events");
        std::fs::write(&f, "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n").unwrap();
        assert_eq!(oom_kills(&f), Some(2));
    }
}
