//! An in-memory [`GpuInventory`] whose GPUs and health are set by the caller (tests, demos).

use tokio::sync::watch;

use super::{GpuInfo, GpuInventory, Health};

/// In-memory GPU inventory; changes made with [`FakeInventory::set_health`] are seen by watchers
/// exactly like NVML health events.
#[derive(Debug)]
pub struct FakeInventory {
    gpus: watch::Sender<Vec<GpuInfo>>,
}

impl FakeInventory {
    /// An inventory holding `gpus`.
    pub fn new(gpus: Vec<GpuInfo>) -> Self {
        FakeInventory { gpus: watch::Sender::new(gpus) }
    }

    /// Sets the health of the GPU with `uuid` and notifies watchers if it changed. Returns false
    /// when no such GPU exists.
    pub fn set_health(&self, uuid: &str, health: Health) -> bool {
        let mut found = false;
        self.gpus.send_if_modified(|gpus| match gpus.iter_mut().find(|g| g.uuid == uuid) {
            Some(gpu) => {
                found = true;
                let changed = gpu.health != health;
                gpu.health = health;
                changed
            }
            None => false,
        });
        found
    }
}

impl GpuInventory for FakeInventory {
    fn list(&self) -> Vec<GpuInfo> {
        self.gpus.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Vec<GpuInfo>> {
        self.gpus.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_health_notifies_only_on_change() {
        let inv = FakeInventory::new(vec![GpuInfo::healthy(0, "GPU-a", "Fake", 1 << 30)]);
        let mut rx = inv.watch();
        rx.mark_unchanged();
        assert!(inv.set_health("GPU-a", Health::Healthy));
        assert!(!rx.has_changed().unwrap(), "same health must not notify");
        let sick = Health::Unhealthy { reason: "test".into() };
        assert!(inv.set_health("GPU-a", sick.clone()));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update()[0].health, sick);
        assert_eq!(inv.list()[0].health, sick);
        assert!(!inv.set_health("GPU-missing", Health::Healthy));
    }
}
