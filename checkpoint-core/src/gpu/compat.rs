//! Whether a checkpoint's GPU state can be restored on this node, and onto which GPUs.
//!
//! NVIDIA's restore needs, for every checkpointed GPU, a GPU of the same chip with enough memory, and
//! the same driver (the restored process brings its user-space driver with it). The check compares
//! the manifest's GPU section with the node's inventory before anything is changed, lists every
//! problem at once, and otherwise returns the old → new GPU assignment for the restore step.

use std::collections::{BTreeMap, BTreeSet};

use super::discovery::{GpuInfo, GpuInventory, InventoryError};
use super::GpuPair;
use crate::bundle::{GpuDevice, GpuSection};

/// How a GPU of this node must resemble a checkpointed GPU to take over its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuMatch {
    /// The same marketing name (`NVIDIA H100 80GB HBM3`): the same chip and memory size, which is
    /// what NVIDIA's restore requires.
    #[default]
    SameName,
    /// The same compute capability. Looser: GPUs of one capability may still be different chips
    /// (an A100 and an A30 are both 8.0), and then the driver's restore fails. Use it only where the
    /// names differ for GPUs of one chip (SXM and PCIe boards of the same GPU).
    SameComputeCapability,
}

impl GpuMatch {
    fn matches(self, old: &GpuDevice, new: &GpuInfo) -> bool {
        match self {
            GpuMatch::SameName => old.name == new.name,
            GpuMatch::SameComputeCapability => old.compute_capability == new.compute_capability,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            GpuMatch::SameName => "of that model",
            GpuMatch::SameComputeCapability => "of that compute capability",
        }
    }
}

/// One difference between the checkpoint's GPUs and this node's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuMismatch {
    /// The node runs another NVIDIA driver version.
    #[error(
        "driver: the checkpoint was taken with NVIDIA driver {checkpoint}, this node runs {here}; restore on a \
         node with driver {checkpoint} (the restored process keeps the user-space driver it was checkpointed with)"
    )]
    DriverVersion {
        /// The driver at checkpoint time.
        checkpoint: String,
        /// The driver here.
        here: String,
    },
    /// Fewer GPUs of a kind than the checkpoint used.
    #[error(
        "GPU count: the checkpoint used {needed} {kind} GPU(s), this node has {available}; restore on a node \
         with at least {needed} of them free for this workload"
    )]
    TooFewGpus {
        /// The model (or compute capability) concerned.
        kind: String,
        /// How many the checkpoint used.
        needed: usize,
        /// How many this node has.
        available: usize,
    },
    /// No GPU of this node can take over a checkpointed GPU.
    #[error(
        "GPU {uuid} ({name}, compute capability {compute_capability}): this node has no GPU {wanted} \
         (it has: {available}); restore on a node that has a GPU {wanted}"
    )]
    NoMatchingGpu {
        /// UUID of the checkpointed GPU.
        uuid: String,
        /// Its name.
        name: String,
        /// Its compute capability.
        compute_capability: String,
        /// What was required (`of that model`).
        wanted: &'static str,
        /// The GPUs of this node, in words.
        available: String,
    },
    /// Matching GPUs exist but none has enough free memory.
    #[error(
        "GPU {uuid} ({name}): the checkpointed processes held {needed} on it, but the matching GPU with the most \
         free memory here, GPU {index} ({target_uuid}), has only {free} free; stop other work on that GPU or \
         restore on a node with {needed} free"
    )]
    NotEnoughMemory {
        /// UUID of the checkpointed GPU.
        uuid: String,
        /// Its name.
        name: String,
        /// Memory its processes held.
        needed: Bytes,
        /// Index of the best candidate here.
        index: u32,
        /// UUID of the best candidate here.
        target_uuid: String,
        /// Its free memory.
        free: Bytes,
    },
    /// The manifest holds something that is not a GPU UUID.
    #[error(
        "GPU UUID {uuid:?} in the manifest is not of the form GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (MIG \
         instances cannot be checkpointed); the bundle is damaged or was not written by Kybernate"
    )]
    BadUuid {
        /// The text found.
        uuid: String,
    },
}

/// A byte count that prints as GiB/MiB with the exact number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: f64 = 1024.0 * 1024.0;
        let mib = self.0 as f64 / MIB;
        if mib >= 1024.0 {
            write!(f, "{:.1} GiB ({} bytes)", mib / 1024.0, self.0)
        } else {
            write!(f, "{mib:.1} MiB ({} bytes)", self.0)
        }
    }
}

/// Why a checkpoint's GPU state cannot be restored here.
#[derive(Debug, thiserror::Error)]
pub enum GpuCompatError {
    /// The node's GPUs could not be listed.
    #[error("cannot check whether this node's GPUs can take the checkpoint's GPU state: {0}")]
    Inventory(#[from] InventoryError),
    /// The GPUs differ; every difference is listed.
    #[error("the checkpoint's GPU state cannot be restored on this node: {}", list(.0))]
    Mismatch(Vec<GpuMismatch>),
}

fn list(problems: &[GpuMismatch]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// A checkpointed GPU and the GPU of this node that takes over its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuAssignment {
    /// UUID at checkpoint time.
    pub old_uuid: String,
    /// UUID of the GPU here.
    pub new_uuid: String,
    /// Index of the GPU here.
    pub new_index: u32,
    /// The same, as the driver takes it.
    pub pair: GpuPair,
}

/// Where each checkpointed GPU goes on restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuMapping {
    /// One entry per checkpointed GPU.
    pub assignments: Vec<GpuAssignment>,
}

impl GpuMapping {
    /// Whether every GPU is restored onto itself.
    pub fn is_identity(&self) -> bool {
        self.assignments.iter().all(|a| a.old_uuid == a.new_uuid)
    }

    /// The pairs to hand to the driver's restore: none when every GPU is restored onto itself,
    /// otherwise one for every checkpointed GPU (the driver requires all of them).
    pub fn gpu_pairs(&self) -> Vec<GpuPair> {
        if self.is_identity() {
            Vec::new()
        } else {
            self.assignments.iter().map(|a| a.pair).collect()
        }
    }
}

/// Parses `GPU-12345678-9abc-def0-0123-456789abcdef` into the driver's 16 bytes.
pub fn parse_gpu_uuid(text: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = text.strip_prefix("GPU-")?.split('-').collect();
    if groups.iter().map(|g| g.len()).ne([8, 4, 4, 4, 12]) {
        return None;
    }
    let hex = groups.concat();
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut raw = [0u8; 16];
    for (i, byte) in raw.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(raw)
}

/// Checks that this node can take the GPU state described by `section` (see the module docs) and
/// returns where each GPU goes. Prefers each GPU's own UUID when it is here and has room, so a
/// restore on the checkpoint's node needs no remapping.
pub fn check_restore(
    section: &GpuSection,
    inventory: &dyn GpuInventory,
    matching: GpuMatch,
) -> Result<GpuMapping, GpuCompatError> {
    let mut problems = Vec::new();
    if let Some(checkpoint) = &section.driver_version {
        let here = inventory.driver_version()?;
        if *checkpoint != here {
            problems.push(GpuMismatch::DriverVersion { checkpoint: checkpoint.clone(), here });
        }
    }
    let gpus = inventory.gpus()?;
    if section.devices.is_empty() {
        // Discovered without NVML: which GPUs were used is unknown, but there must be one.
        if !section.processes.is_empty() && gpus.is_empty() {
            problems.push(GpuMismatch::TooFewGpus { kind: "NVIDIA".into(), needed: 1, available: 0 });
        }
        return if problems.is_empty() { Ok(GpuMapping::default()) } else { Err(GpuCompatError::Mismatch(problems)) };
    }

    let mut need: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &section.processes {
        if let Some(uuid) = &p.gpu_uuid {
            *need.entry(uuid.as_str()).or_default() += p.memory_bytes.unwrap_or(0);
        }
    }
    let needed = |uuid: &str| need.get(uuid).copied().unwrap_or(0);

    // Too few GPUs of a kind is one problem for the kind, not one per device.
    let kind = |d: &GpuDevice| match matching {
        GpuMatch::SameName => d.name.clone(),
        GpuMatch::SameComputeCapability => format!("compute capability {}", d.compute_capability),
    };
    let mut short_kinds = BTreeSet::new();
    for d in &section.devices {
        let k = kind(d);
        let wanted = section.devices.iter().filter(|o| kind(o) == k).count();
        let available = gpus.iter().filter(|g| matching.matches(d, g)).count();
        if available > 0 && available < wanted && short_kinds.insert(k.clone()) {
            problems.push(GpuMismatch::TooFewGpus { kind: k, needed: wanted, available });
        }
    }

    // Largest need first: the GPUs with room for a larger need also have room for every smaller
    // one, so taking any of them never starves a later device.
    let mut order: Vec<&GpuDevice> = section.devices.iter().collect();
    order.sort_by_key(|d| std::cmp::Reverse(needed(&d.uuid)));
    let mut taken = BTreeSet::new();
    let mut assignments = Vec::new();
    for old in order {
        let Some(old_raw) = parse_gpu_uuid(&old.uuid) else {
            problems.push(GpuMismatch::BadUuid { uuid: old.uuid.clone() });
            continue;
        };
        let need = needed(&old.uuid);
        let candidates: Vec<&GpuInfo> = gpus.iter().filter(|g| matching.matches(old, g)).collect();
        if candidates.is_empty() {
            problems.push(GpuMismatch::NoMatchingGpu {
                uuid: old.uuid.clone(),
                name: old.name.clone(),
                compute_capability: old.compute_capability.clone(),
                wanted: matching.describe(),
                available: describe_gpus(&gpus),
            });
            continue;
        }
        let free: Vec<&GpuInfo> = candidates.into_iter().filter(|g| !taken.contains(&g.index)).collect();
        let fits = free.iter().filter(|g| g.memory_free >= need);
        let choice = fits
            .clone()
            .find(|g| g.uuid == old.uuid)
            .or_else(|| fits.min_by_key(|g| (g.memory_free, g.index)))
            .copied();
        match choice {
            Some(gpu) => {
                let Some(new_raw) = parse_gpu_uuid(&gpu.uuid) else {
                    problems.push(GpuMismatch::BadUuid { uuid: gpu.uuid.clone() });
                    continue;
                };
                taken.insert(gpu.index);
                assignments.push(GpuAssignment {
                    old_uuid: old.uuid.clone(),
                    new_uuid: gpu.uuid.clone(),
                    new_index: gpu.index,
                    pair: GpuPair { old_uuid: old_raw, new_uuid: new_raw },
                });
            }
            // Every matching GPU is taken: already reported as too few of the kind.
            None if free.is_empty() => {}
            None => {
                let best = free.iter().max_by_key(|g| (g.memory_free, std::cmp::Reverse(g.index))).copied();
                if let Some(best) = best {
                    problems.push(GpuMismatch::NotEnoughMemory {
                        uuid: old.uuid.clone(),
                        name: old.name.clone(),
                        needed: Bytes(need),
                        index: best.index,
                        target_uuid: best.uuid.clone(),
                        free: Bytes(best.memory_free),
                    });
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(GpuCompatError::Mismatch(problems));
    }
    // Back in the manifest's order, for logs and the driver.
    assignments.sort_by_key(|a| section.devices.iter().position(|d| d.uuid == a.old_uuid));
    Ok(GpuMapping { assignments })
}

fn describe_gpus(gpus: &[GpuInfo]) -> String {
    if gpus.is_empty() {
        return "no GPUs".into();
    }
    gpus.iter()
        .map(|g| format!("GPU {} {} (compute capability {})", g.index, g.name, g.compute_capability))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_parse_into_the_driver_bytes() {
        assert_eq!(
            parse_gpu_uuid("GPU-12345678-9abc-def0-0123-456789abcdef"),
            Some([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef])
        );
        for bad in ["", "GPU-", "MIG-12345678-9abc-def0-0123-456789abcdef", "GPU-12345678-9abc-def0-0123-456789abcdeg"]
        {
            assert_eq!(parse_gpu_uuid(bad), None, "{bad}");
        }
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(Bytes(3 << 30).to_string(), "3.0 GiB (3221225472 bytes)");
        assert_eq!(Bytes(512 << 20).to_string(), "512.0 MiB (536870912 bytes)");
    }
}
