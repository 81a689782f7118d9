//! The shim's runc and CRIU: checkpoint-core's clients, with the global flags containerd's runc shim
//! uses (`--root <runc_root>/<namespace> --log <bundle>/log.json --log-format json`, and
//! `--systemd-cgroup` when configured) and every run inside a span of the shim's reaper.

use std::path::Path;
use std::sync::Arc;

use checkpoint_core::{Criu, Runc, SpawnHook};

use crate::config::ShimConfig;
use crate::reaper::Reaper;

/// Name of runc's JSON log in the bundle.
pub const LOG_FILE: &str = "log.json";

/// runc as configured for containers of `namespace`, logging into `bundle`, each lifecycle command
/// bounded by `runc_timeout`.
pub fn runc_for(config: &ShimConfig, namespace: &str, bundle: &Path, reaper: &Arc<Reaper>) -> Runc {
    Runc::new(&config.runc_binary, Some(config.runc_root.join(namespace)))
        .with_log(bundle.join(LOG_FILE))
        .with_systemd_cgroup(config.systemd_cgroup)
        .with_timeout(config.runc_timeout())
        .with_spawn_hook(Arc::clone(reaper) as Arc<dyn SpawnHook>)
}

/// CRIU as configured (`criu_binary`, else `criu` on `PATH`).
pub fn criu_for(config: &ShimConfig, reaper: &Arc<Reaper>) -> Criu {
    config
        .criu_binary
        .clone()
        .map(Criu::new)
        .unwrap_or_else(Criu::from_path)
        .with_spawn_hook(Arc::clone(reaper) as Arc<dyn SpawnHook>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_carries_the_configured_global_flags() {
        let config = ShimConfig { systemd_cgroup: true, ..Default::default() };
        let runc = runc_for(&config, "k8s.io", Path::new("/b"), &Reaper::inert());
        assert_eq!(runc.root(), Some(Path::new("/run/containerd/runc/k8s.io")));
        assert_eq!(runc.log(), Some(Path::new("/b/log.json")));
        assert!(runc.systemd_cgroup());
    }
}
