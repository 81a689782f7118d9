//! The seat model: how GPUs are split into seats, seat ids, allocation and preferred allocation.
//!
//! A seat is a share of one GPU. A GPU with `n` seats is advertised to the kubelet as `n` devices
//! with ids `<gpu-uuid>::seat-0` … `<gpu-uuid>::seat-<n-1>`; each seat stands for
//! `memory / n` bytes of that GPU's memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

pub use crate::config::SEAT_SEPARATOR;
use crate::config::{MultiSeatPolicy, SeatsConfig, MAX_SEATS_PER_GPU};
use crate::inventory::{GpuInfo, Health};

/// Env var with the comma-separated UUIDs of the GPUs a container may use.
pub const ENV_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
/// Env var with the number of seats per visible GPU, in the order of `NVIDIA_VISIBLE_DEVICES`.
pub const ENV_GPU_SEATS: &str = "KYBERNATE_GPU_SEATS";
/// Env var with the bytes of GPU memory the container may use per visible GPU, in the order of
/// `NVIDIA_VISIBLE_DEVICES`.
pub const ENV_SEAT_VRAM_BYTES: &str = "KYBERNATE_SEAT_VRAM_BYTES";
/// Longest device id the kubelet accepts.
const MAX_DEVICE_ID_LEN: usize = 63;
const GIB: f64 = (1u64 << 30) as f64;

/// The id of one seat: a GPU UUID and a seat number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeatId {
    /// UUID of the GPU the seat belongs to.
    pub gpu_uuid: String,
    /// Seat number on that GPU, from 0.
    pub seat: u32,
}

impl SeatId {
    /// A seat id for seat `seat` of GPU `gpu_uuid`.
    pub fn new(gpu_uuid: impl Into<String>, seat: u32) -> Self {
        SeatId { gpu_uuid: gpu_uuid.into(), seat }
    }
}

impl fmt::Display for SeatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{SEAT_SEPARATOR}{}", self.gpu_uuid, self.seat)
    }
}

/// A device id that is not of the form `<gpu-uuid>::seat-<k>`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("device id `{0}` is not a Kybernate seat id (expected `<gpu-uuid>::seat-<k>`)")]
pub struct SeatIdError(pub String);

impl FromStr for SeatId {
    type Err = SeatIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SeatIdError(s.to_owned());
        let (uuid, seat) = s.rsplit_once(SEAT_SEPARATOR).ok_or_else(bad)?;
        if uuid.is_empty() || seat.is_empty() || !seat.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(SeatId { gpu_uuid: uuid.to_owned(), seat: seat.parse().map_err(|_| bad())? })
    }
}

impl SeatsConfig {
    /// Number of seats for a GPU: its `per_gpu` entry, else one per `vram_gib_per_seat` GiB of its
    /// memory (rounded down, at least 1), else `default_per_gpu`.
    pub fn seats_for(&self, gpu: &GpuInfo) -> u32 {
        if let Some(&n) = self.per_gpu.get(&gpu.uuid) {
            return n;
        }
        match self.vram_gib_per_seat {
            Some(gib) => {
                let n = (gpu.memory_bytes as f64 / (gib * GIB)).floor();
                (n as u32).clamp(1, MAX_SEATS_PER_GPU)
            }
            None => self.default_per_gpu,
        }
    }
}

/// One GPU and the number of seats it is split into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSeats {
    /// The GPU.
    pub gpu: GpuInfo,
    /// How many seats it has.
    pub seats: u32,
}

impl GpuSeats {
    /// Bytes of GPU memory one seat stands for.
    pub fn seat_vram_bytes(&self) -> u64 {
        self.gpu.memory_bytes / u64::from(self.seats.max(1))
    }

    /// The ids of all seats of this GPU, in seat order.
    pub fn seat_ids(&self) -> impl Iterator<Item = SeatId> + '_ {
        (0..self.seats).map(|k| SeatId::new(self.gpu.uuid.clone(), k))
    }
}

/// What `Allocate` gives one container: per GPU, how many of its seats and how much memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The GPUs, in node order (NVML index), each with the seats taken on it.
    pub gpus: Vec<AllocatedGpu>,
}

/// One GPU's part of an [`Allocation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedGpu {
    /// GPU UUID.
    pub uuid: String,
    /// Seats of this GPU given to the container.
    pub seats: u32,
    /// Bytes of this GPU's memory the container may use (`seats` × seat size).
    pub vram_bytes: u64,
}

impl Allocation {
    /// The env vars the container gets: `NVIDIA_VISIBLE_DEVICES`, `KYBERNATE_GPU_SEATS` and
    /// `KYBERNATE_SEAT_VRAM_BYTES` (the last two are per GPU, comma-separated, in the same order).
    pub fn envs(&self) -> HashMap<String, String> {
        let join = |f: &dyn Fn(&AllocatedGpu) -> String| self.gpus.iter().map(f).collect::<Vec<_>>().join(",");
        HashMap::from([
            (ENV_VISIBLE_DEVICES.to_owned(), join(&|g| g.uuid.clone())),
            (ENV_GPU_SEATS.to_owned(), join(&|g| g.seats.to_string())),
            (ENV_SEAT_VRAM_BYTES.to_owned(), join(&|g| g.vram_bytes.to_string())),
        ])
    }

    /// Fully qualified CDI device names (`<kind>=<gpu-uuid>`) for the allocated GPUs.
    pub fn cdi_devices(&self, kind: &str) -> Vec<String> {
        self.gpus.iter().map(|g| format!("{kind}={}", g.uuid)).collect()
    }

    /// Total number of seats in the allocation.
    pub fn seat_count(&self) -> u32 {
        self.gpus.iter().map(|g| g.seats).sum()
    }
}

/// Why an `Allocate` request for one container cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllocationError {
    /// The request lists no device.
    #[error("the allocation request lists no devices")]
    Empty,
    /// A device id is malformed or names a GPU this plugin does not have.
    #[error("device `{id}` is not a seat advertised by this plugin (expected `<gpu-uuid>::seat-<k>` for a GPU on this node); the kubelet gets the current list over ListAndWatch")]
    UnknownDevice {
        /// The id as received.
        id: String,
    },
    /// The same device is listed twice.
    #[error("device `{id}` is listed more than once in one container's request")]
    Duplicate {
        /// The repeated id.
        id: String,
    },
    /// A seat is on a GPU that is unhealthy now.
    #[error("seat `{id}` is on GPU {gpu}, which is unhealthy ({reason}); the pod needs a seat on a healthy GPU")]
    Unhealthy {
        /// The seat id.
        id: String,
        /// The GPU UUID.
        gpu: String,
        /// Why the GPU is unhealthy.
        reason: String,
    },
    /// Several seats were requested while the policy is `refuse`.
    #[error("{count} seats requested for one container, but multi_seat = \"refuse\" allows one seat per container; request 1 seat, or set multi_seat to \"pack\" or \"single-gpu\"")]
    MultiSeatRefused {
        /// Seats requested.
        count: usize,
    },
    /// The seats span several GPUs while the policy is `single-gpu`.
    #[error("the {count} requested seats are on {} GPUs ({}), but multi_seat = \"single-gpu\" needs all seats of a container on one GPU; request at most as many seats as one GPU has, or set multi_seat to \"pack\"", gpus.len(), gpus.join(", "))]
    SpansGpus {
        /// Seats requested.
        count: usize,
        /// The GPUs they are on.
        gpus: Vec<String>,
    },
}

/// All GPUs of the node with their seats, in NVML index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatLayout {
    gpus: Vec<GpuSeats>,
}

impl SeatLayout {
    /// Splits `gpus` into seats according to `config`.
    pub fn new(gpus: &[GpuInfo], config: &SeatsConfig) -> Self {
        let mut gpus: Vec<GpuSeats> =
            gpus.iter().map(|g| GpuSeats { gpu: g.clone(), seats: config.seats_for(g) }).collect();
        gpus.sort_by_key(|g| g.gpu.index);
        SeatLayout { gpus }
    }

    /// The GPUs with their seat counts.
    pub fn gpus(&self) -> &[GpuSeats] {
        &self.gpus
    }

    /// Every seat with the health of its GPU, GPU by GPU.
    pub fn seats(&self) -> impl Iterator<Item = (SeatId, &Health)> + '_ {
        self.gpus.iter().flat_map(|g| g.seat_ids().map(move |id| (id, &g.gpu.health)))
    }

    /// Number of seats on all GPUs.
    pub fn total_seats(&self) -> u32 {
        self.gpus.iter().map(|g| g.seats).sum()
    }

    /// Number of seats on healthy GPUs.
    pub fn healthy_seats(&self) -> u32 {
        self.gpus.iter().filter(|g| g.gpu.health.is_healthy()).map(|g| g.seats).sum()
    }

    /// Device ids longer than the kubelet accepts (63 characters); empty for real GPU UUIDs.
    pub fn overlong_ids(&self) -> Vec<String> {
        self.seats().map(|(id, _)| id.to_string()).filter(|id| id.len() > MAX_DEVICE_ID_LEN).collect()
    }

    fn position(&self, id: &SeatId) -> Option<usize> {
        self.gpus.iter().position(|g| g.gpu.uuid == id.gpu_uuid && id.seat < g.seats)
    }

    /// Resolves the seats of one container's `Allocate` request under `policy`.
    pub fn allocate(&self, ids: &[String], policy: MultiSeatPolicy) -> Result<Allocation, AllocationError> {
        if ids.is_empty() {
            return Err(AllocationError::Empty);
        }
        if ids.len() > 1 && policy == MultiSeatPolicy::Refuse {
            return Err(AllocationError::MultiSeatRefused { count: ids.len() });
        }
        let mut seen = BTreeSet::new();
        let mut per_gpu: BTreeMap<usize, u32> = BTreeMap::new();
        for raw in ids {
            let unknown = || AllocationError::UnknownDevice { id: raw.clone() };
            let id: SeatId = raw.parse().map_err(|_| unknown())?;
            let pos = self.position(&id).ok_or_else(unknown)?;
            if !seen.insert(id) {
                return Err(AllocationError::Duplicate { id: raw.clone() });
            }
            let gpu = &self.gpus[pos].gpu;
            if let Health::Unhealthy { reason } = &gpu.health {
                return Err(AllocationError::Unhealthy {
                    id: raw.clone(),
                    gpu: gpu.uuid.clone(),
                    reason: reason.clone(),
                });
            }
            *per_gpu.entry(pos).or_default() += 1;
        }
        if per_gpu.len() > 1 && policy == MultiSeatPolicy::SingleGpu {
            return Err(AllocationError::SpansGpus {
                count: ids.len(),
                gpus: per_gpu.keys().map(|&p| self.gpus[p].gpu.uuid.clone()).collect(),
            });
        }
        let gpus = per_gpu
            .into_iter()
            .map(|(pos, seats)| {
                let g = &self.gpus[pos];
                AllocatedGpu { uuid: g.gpu.uuid.clone(), seats, vram_bytes: g.seat_vram_bytes() * u64::from(seats) }
            })
            .collect();
        Ok(Allocation { gpus })
    }

    /// Chooses `size` devices out of `available`, always including `must_include`, so that the
    /// seats land on as few GPUs as possible.
    ///
    /// GPUs that already hold a `must_include` seat are filled first; then, while seats are
    /// missing, the GPU with the fewest free seats that still covers the rest is taken (keeping
    /// big holes for big requests), or if none covers it, the GPU with the most free seats. Ids
    /// that are not healthy seats of this node are never chosen (except via `must_include`).
    /// Returns fewer than `size` ids when not enough are available.
    pub fn preferred(&self, available: &[String], must_include: &[String], size: usize) -> Vec<String> {
        let mut chosen: Vec<String> = Vec::new();
        for id in must_include {
            if !chosen.contains(id) {
                chosen.push(id.clone());
            }
        }
        // Free healthy seats per GPU position, in seat order.
        let mut free: BTreeMap<usize, Vec<SeatId>> = BTreeMap::new();
        for raw in available {
            if chosen.contains(raw) {
                continue;
            }
            let Ok(id) = raw.parse::<SeatId>() else {
                continue;
            };
            let Some(pos) = self.position(&id) else {
                continue;
            };
            if self.gpus[pos].gpu.health.is_healthy() {
                free.entry(pos).or_default().push(id);
            }
        }
        for seats in free.values_mut() {
            seats.sort();
            seats.dedup();
        }
        let mut need = size.saturating_sub(chosen.len());
        let used: BTreeSet<usize> = must_include
            .iter()
            .filter_map(|raw| raw.parse::<SeatId>().ok())
            .filter_map(|id| self.position(&id))
            .collect();
        for pos in used {
            if need == 0 {
                break;
            }
            need -= take_seats(&mut free, pos, need, &mut chosen);
        }
        while need > 0 && !free.is_empty() {
            let best_fit = free
                .iter()
                .filter(|(_, seats)| seats.len() >= need)
                .min_by_key(|(&pos, seats)| (seats.len(), pos))
                .map(|(&pos, _)| pos);
            let pos = best_fit.unwrap_or_else(|| {
                free.iter()
                    .max_by_key(|(&pos, seats)| (seats.len(), std::cmp::Reverse(pos)))
                    .map(|(&pos, _)| pos)
                    .expect("free is not empty")
            });
            need -= take_seats(&mut free, pos, need, &mut chosen);
        }
        chosen
    }
}

/// Moves up to `need` seats of GPU position `pos` from `free` into `chosen`; returns how many.
fn take_seats(free: &mut BTreeMap<usize, Vec<SeatId>>, pos: usize, need: usize, chosen: &mut Vec<String>) -> usize {
    let seats = free.remove(&pos).unwrap_or_default();
    let n = need.min(seats.len());
    chosen.extend(seats[..n].iter().map(ToString::to_string));
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB_U64: u64 = 1 << 30;

    fn gpu(index: u32, uuid: &str, gib: u64) -> GpuInfo {
        GpuInfo::healthy(index, uuid, "Test GPU", gib * GIB_U64)
    }

    fn config(per_gpu: u32) -> SeatsConfig {
        SeatsConfig { default_per_gpu: per_gpu, ..SeatsConfig::default() }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn seat_id_round_trips_and_rejects_garbage() {
        let id = SeatId::new("GPU-0b9c1a2e-1111-2222-3333-444455556666", 3);
        let text = id.to_string();
        assert_eq!(text, "GPU-0b9c1a2e-1111-2222-3333-444455556666::seat-3");
        assert_eq!(text.parse::<SeatId>().unwrap(), id);
        for bad in ["GPU-1", "GPU-1::seat-", "::seat-1", "GPU-1::seat-x", "GPU-1::seat--1"] {
            assert!(bad.parse::<SeatId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn seats_per_gpu_precedence() {
        let mut cfg = config(2);
        let a = gpu(0, "GPU-a", 80);
        let b = gpu(1, "GPU-b", 24);
        assert_eq!(cfg.seats_for(&a), 2);
        cfg.vram_gib_per_seat = Some(10.0);
        assert_eq!(cfg.seats_for(&a), 8);
        assert_eq!(cfg.seats_for(&b), 2, "24 GiB / 10 GiB rounds down");
        cfg.vram_gib_per_seat = Some(100.0);
        assert_eq!(cfg.seats_for(&b), 1, "at least one seat");
        cfg.per_gpu.insert("GPU-a".into(), 3);
        assert_eq!(cfg.seats_for(&a), 3);
    }

    #[test]
    fn layout_lists_seats_in_gpu_order_with_health() {
        let mut b = gpu(1, "GPU-b", 16);
        b.health = Health::Unhealthy { reason: "XID 79".into() };
        let layout = SeatLayout::new(&[b, gpu(0, "GPU-a", 16)], &config(2));
        let seats: Vec<(String, bool)> = layout.seats().map(|(id, h)| (id.to_string(), h.is_healthy())).collect();
        assert_eq!(
            seats,
            vec![
                ("GPU-a::seat-0".to_string(), true),
                ("GPU-a::seat-1".to_string(), true),
                ("GPU-b::seat-0".to_string(), false),
                ("GPU-b::seat-1".to_string(), false),
            ]
        );
        assert_eq!(layout.total_seats(), 4);
        assert_eq!(layout.healthy_seats(), 2);
        assert!(layout.overlong_ids().is_empty());
    }

    #[test]
    fn allocate_one_and_several_seats() {
        let layout = SeatLayout::new(&[gpu(0, "GPU-a", 16), gpu(1, "GPU-b", 8)], &config(4));
        let one = layout.allocate(&ids(&["GPU-a::seat-2"]), MultiSeatPolicy::Pack).unwrap();
        assert_eq!(one.gpus, vec![AllocatedGpu { uuid: "GPU-a".into(), seats: 1, vram_bytes: 4 * GIB_U64 }]);
        let envs = one.envs();
        assert_eq!(envs[ENV_VISIBLE_DEVICES], "GPU-a");
        assert_eq!(envs[ENV_GPU_SEATS], "1");
        assert_eq!(envs[ENV_SEAT_VRAM_BYTES], (4 * GIB_U64).to_string());

        let many =
            layout.allocate(&ids(&["GPU-b::seat-0", "GPU-a::seat-0", "GPU-a::seat-1"]), MultiSeatPolicy::Pack).unwrap();
        assert_eq!(many.seat_count(), 3);
        let envs = many.envs();
        assert_eq!(envs[ENV_VISIBLE_DEVICES], "GPU-a,GPU-b");
        assert_eq!(envs[ENV_GPU_SEATS], "2,1");
        assert_eq!(envs[ENV_SEAT_VRAM_BYTES], format!("{},{}", 8 * GIB_U64, 2 * GIB_U64));
        assert_eq!(many.cdi_devices("nvidia.com/gpu"), vec!["nvidia.com/gpu=GPU-a", "nvidia.com/gpu=GPU-b"]);
    }

    #[test]
    fn allocate_policies_and_errors() {
        let mut b = gpu(1, "GPU-b", 8);
        b.health = Health::Unhealthy { reason: "XID 48".into() };
        let layout = SeatLayout::new(&[gpu(0, "GPU-a", 16), b], &config(2));
        let both = ids(&["GPU-a::seat-0", "GPU-a::seat-1"]);
        assert!(layout.allocate(&both, MultiSeatPolicy::SingleGpu).is_ok());
        assert_eq!(
            layout.allocate(&both, MultiSeatPolicy::Refuse).unwrap_err(),
            AllocationError::MultiSeatRefused { count: 2 }
        );
        assert!(layout.allocate(&ids(&["GPU-a::seat-0"]), MultiSeatPolicy::Refuse).is_ok());
        assert_eq!(layout.allocate(&[], MultiSeatPolicy::Pack).unwrap_err(), AllocationError::Empty);
        let err = layout.allocate(&ids(&["GPU-a::seat-2"]), MultiSeatPolicy::Pack).unwrap_err();
        assert!(matches!(err, AllocationError::UnknownDevice { .. }), "{err}");
        let err = layout.allocate(&ids(&["GPU-z::seat-0"]), MultiSeatPolicy::Pack).unwrap_err();
        assert!(matches!(err, AllocationError::UnknownDevice { .. }), "{err}");
        let err = layout.allocate(&ids(&["GPU-a::seat-0", "GPU-a::seat-0"]), MultiSeatPolicy::Pack).unwrap_err();
        assert!(matches!(err, AllocationError::Duplicate { .. }), "{err}");
        let err = layout.allocate(&ids(&["GPU-b::seat-1"]), MultiSeatPolicy::Pack).unwrap_err();
        assert!(err.to_string().contains("unhealthy (XID 48)"), "{err}");

        let healthy = SeatLayout::new(&[gpu(0, "GPU-a", 16), gpu(1, "GPU-b", 8)], &config(2));
        let err = healthy.allocate(&ids(&["GPU-a::seat-0", "GPU-b::seat-0"]), MultiSeatPolicy::SingleGpu).unwrap_err();
        assert_eq!(err, AllocationError::SpansGpus { count: 2, gpus: vec!["GPU-a".into(), "GPU-b".into()] });
        assert!(err.to_string().contains("single-gpu"));
    }

    fn all_ids(layout: &SeatLayout) -> Vec<String> {
        layout.seats().map(|(id, _)| id.to_string()).collect()
    }

    fn gpus_of(chosen: &[String]) -> BTreeSet<String> {
        chosen.iter().map(|s| s.parse::<SeatId>().unwrap().gpu_uuid).collect()
    }

    #[test]
    fn preferred_packs_onto_fewest_gpus_best_fit() {
        let layout = SeatLayout::new(&[gpu(0, "GPU-a", 16), gpu(1, "GPU-b", 16), gpu(2, "GPU-c", 16)], &config(4));
        // GPU-a has 4 free, GPU-b 2 free, GPU-c 3 free.
        let available: Vec<String> = all_ids(&layout)
            .into_iter()
            .filter(|id| !matches!(id.as_str(), "GPU-b::seat-0" | "GPU-b::seat-1" | "GPU-c::seat-0"))
            .collect();
        let two = layout.preferred(&available, &[], 2);
        assert_eq!(two, ids(&["GPU-b::seat-2", "GPU-b::seat-3"]), "best fit is GPU-b");
        let three = layout.preferred(&available, &[], 3);
        assert_eq!(gpus_of(&three), BTreeSet::from(["GPU-c".to_string()]));
        let four = layout.preferred(&available, &[], 4);
        assert_eq!(gpus_of(&four), BTreeSet::from(["GPU-a".to_string()]));
        let six = layout.preferred(&available, &[], 6);
        assert_eq!(six.len(), 6);
        assert_eq!(gpus_of(&six).len(), 2, "6 seats fit on two GPUs: {six:?}");
        let all = layout.preferred(&available, &[], 100);
        assert_eq!(all.len(), available.len(), "returns what exists when short");
    }

    #[test]
    fn preferred_honours_must_include_and_fills_its_gpu_first() {
        let layout = SeatLayout::new(&[gpu(0, "GPU-a", 16), gpu(1, "GPU-b", 16)], &config(4));
        let available = all_ids(&layout);
        let must = ids(&["GPU-b::seat-3"]);
        let chosen = layout.preferred(&available, &must, 3);
        assert_eq!(chosen, ids(&["GPU-b::seat-3", "GPU-b::seat-0", "GPU-b::seat-1"]));
        let only_must = layout.preferred(&available, &ids(&["GPU-a::seat-0", "GPU-b::seat-0"]), 1);
        assert_eq!(only_must, ids(&["GPU-a::seat-0", "GPU-b::seat-0"]));
    }

    #[test]
    fn preferred_skips_unhealthy_and_foreign_ids() {
        let mut a = gpu(0, "GPU-a", 16);
        a.health = Health::Unhealthy { reason: "lost".into() };
        let layout = SeatLayout::new(&[a, gpu(1, "GPU-b", 16)], &config(2));
        let mut available = all_ids(&layout);
        available.push("something-else".into());
        let chosen = layout.preferred(&available, &[], 3);
        assert_eq!(chosen, ids(&["GPU-b::seat-0", "GPU-b::seat-1"]));
    }
}
