//! GPU discovery and health: the [`GpuInventory`] trait, the NVML implementation and an in-memory
//! fake for tests.

use tokio::sync::watch;

pub mod fake;
pub mod nvml;

pub use fake::FakeInventory;
pub use nvml::{InventoryError, NvmlInventory, NvmlOptions};

/// Whether a GPU can be handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Usable.
    Healthy,
    /// Not usable; its seats are reported `Unhealthy` to the kubelet.
    Unhealthy {
        /// Why, for logs and error messages (e.g. "critical XID 79").
        reason: String,
    },
}

impl Health {
    /// True for [`Health::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// One physical GPU as discovered on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML index (the order `nvidia-smi` lists GPUs in).
    pub index: u32,
    /// GPU UUID, `GPU-…`.
    pub uuid: String,
    /// Product name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Total memory in bytes as NVML reports it.
    pub memory_bytes: u64,
    /// Current health.
    pub health: Health,
}

impl GpuInfo {
    /// A healthy GPU.
    pub fn healthy(index: u32, uuid: impl Into<String>, name: impl Into<String>, memory_bytes: u64) -> Self {
        GpuInfo { index, uuid: uuid.into(), name: name.into(), memory_bytes, health: Health::Healthy }
    }
}

/// A source of the node's GPUs and their health.
pub trait GpuInventory: Send + Sync {
    /// The GPUs as known now, with their current health.
    fn list(&self) -> Vec<GpuInfo>;

    /// A receiver that holds the current list and is notified whenever a GPU's health (or the
    /// list) changes. The sender lives as long as the inventory.
    fn watch(&self) -> watch::Receiver<Vec<GpuInfo>>;
}
