//! Pod checkpoints on stop: the containers of one pod that are checkpointed as the pod stops share one
//! pod checkpoint, whose time every one of their bundles takes as its directory name
//! (`<namespace>/<pod>/<container>/<time>/`), so a pod-level restore takes a consistent set
//! (`checkpoint_core::pod`).
//!
//! kubelet stops a pod's containers independently (in parallel, each with its own StopContainer), and
//! there is no freeze across containers: each is dumped on its own stop signal. So a pod checkpoint is
//! opened by the first container checkpointed on stop and joined by every other container of the pod
//! checkpointed within `pod_checkpoint_window` of it; a container already in it, or one stopped later
//! (a restart inside the pod), opens a new one. One shim serves all containers of a pod, so this state
//! lives in the shim.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// The pod checkpoints this shim has open, by pod.
#[derive(Debug, Default)]
pub struct PodCheckpoints {
    open: Mutex<HashMap<String, Open>>,
}

#[derive(Debug)]
struct Open {
    at: SystemTime,
    opened: Instant,
    members: HashSet<String>,
}

impl PodCheckpoints {
    /// The time of the pod checkpoint that `container` of `pod` (namespace/name) joins now: the open
    /// one if it was opened within `window` and does not hold this container yet, else a new one.
    pub fn join(&self, pod: &str, container: &str, window: Duration) -> SystemTime {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        match open.get_mut(pod) {
            Some(current) if current.opened.elapsed() <= window && !current.members.contains(container) => {
                current.members.insert(container.to_string());
                current.at
            }
            _ => {
                let at = SystemTime::now();
                let members = HashSet::from([container.to_string()]);
                open.insert(pod.to_string(), Open { at, opened: Instant::now(), members });
                at
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_containers_share_a_pod_checkpoint_until_one_repeats_or_the_window_closes() {
        let pods = PodCheckpoints::default();
        let window = Duration::from_secs(30);
        let first = pods.join("ns/p", "app", window);
        assert_eq!(pods.join("ns/p", "side", window), first, "another container of the pod joins");
        assert_ne!(pods.join("ns/q", "app", window), first, "another pod has its own");
        let again = pods.join("ns/p", "app", window);
        assert_ne!(again, first, "a container stopped a second time opens a new pod checkpoint");
        assert_eq!(pods.join("ns/p", "side", window), again);
        assert_ne!(pods.join("ns/p", "other", Duration::ZERO), again, "after the window a new one opens");
    }
}
