//! Container statistics: runc's `events --stats` snapshot (which reads cgroup v1 or v2 for us),
//! converted into containerd's `io.containerd.cgroups.v1.Metrics`.

use std::collections::BTreeMap;

use containerd_shim::protos::cgroups::metrics::{
    BlkIOEntry, BlkIOStat, CPUStat, CPUUsage, HugetlbStat, MemoryEntry, MemoryStat, Metrics, PidsStat, Throttle,
};
use containerd_shim::protos::protobuf::MessageField;
use serde::Deserialize;

use crate::error::{Result, ShimError};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Stats {
    cpu: Cpu,
    memory: Memory,
    pids: Pids,
    blkio: Blkio,
    hugetlb: BTreeMap<String, Hugetlb>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Cpu {
    usage: CpuUsage,
    throttling: Throttling,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CpuUsage {
    total: u64,
    percpu: Vec<u64>,
    kernel: u64,
    user: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Throttling {
    periods: u64,
    throttled_periods: u64,
    throttled_time: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Memory {
    usage: MemEntry,
    swap: MemEntry,
    kernel: MemEntry,
    #[serde(rename = "kernelTCP")]
    kernel_tcp: MemEntry,
    raw: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MemEntry {
    limit: u64,
    usage: u64,
    max: u64,
    failcnt: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Pids {
    current: u64,
    limit: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Blkio {
    io_service_bytes_recursive: Vec<BlkEntry>,
    io_serviced_recursive: Vec<BlkEntry>,
    io_queue_recursive: Vec<BlkEntry>,
    io_service_time_recursive: Vec<BlkEntry>,
    io_wait_time_recursive: Vec<BlkEntry>,
    io_merged_recursive: Vec<BlkEntry>,
    io_time_recursive: Vec<BlkEntry>,
    sectors_recursive: Vec<BlkEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BlkEntry {
    major: u64,
    minor: u64,
    op: String,
    value: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Hugetlb {
    usage: u64,
    max: u64,
    failcnt: u64,
}

fn entry(m: &MemEntry) -> MessageField<MemoryEntry> {
    MessageField::some(MemoryEntry {
        limit: m.limit,
        usage: m.usage,
        max: m.max,
        failcnt: m.failcnt,
        ..Default::default()
    })
}

fn blk(entries: &[BlkEntry]) -> Vec<BlkIOEntry> {
    entries
        .iter()
        .map(|e| BlkIOEntry { op: e.op.clone(), major: e.major, minor: e.minor, value: e.value, ..Default::default() })
        .collect()
}

/// Converts the `data` of a runc stats event into containerd's metrics.
pub fn metrics(data: serde_json::Value) -> Result<Metrics> {
    let s: Stats = serde_json::from_value(data)
        .map_err(|e| ShimError::Internal(format!("runc's statistics have an unexpected shape: {e}")))?;
    let raw = |k: &str| s.memory.raw.get(k).copied().unwrap_or(0);
    let memory = MemoryStat {
        cache: raw("cache"),
        rss: raw("rss"),
        rss_huge: raw("rss_huge"),
        mapped_file: raw("mapped_file"),
        dirty: raw("dirty"),
        writeback: raw("writeback"),
        pg_pg_in: raw("pgpgin"),
        pg_pg_out: raw("pgpgout"),
        pg_fault: raw("pgfault"),
        pg_maj_fault: raw("pgmajfault"),
        inactive_anon: raw("inactive_anon"),
        active_anon: raw("active_anon"),
        inactive_file: raw("inactive_file"),
        active_file: raw("active_file"),
        unevictable: raw("unevictable"),
        hierarchical_memory_limit: raw("hierarchical_memory_limit"),
        hierarchical_swap_limit: raw("hierarchical_memsw_limit"),
        total_cache: raw("total_cache"),
        total_rss: raw("total_rss"),
        total_rss_huge: raw("total_rss_huge"),
        total_mapped_file: raw("total_mapped_file"),
        total_dirty: raw("total_dirty"),
        total_writeback: raw("total_writeback"),
        total_pg_pg_in: raw("total_pgpgin"),
        total_pg_pg_out: raw("total_pgpgout"),
        total_pg_fault: raw("total_pgfault"),
        total_pg_maj_fault: raw("total_pgmajfault"),
        total_inactive_anon: raw("total_inactive_anon"),
        total_active_anon: raw("total_active_anon"),
        total_inactive_file: raw("total_inactive_file"),
        total_active_file: raw("total_active_file"),
        total_unevictable: raw("total_unevictable"),
        usage: entry(&s.memory.usage),
        swap: entry(&s.memory.swap),
        kernel: entry(&s.memory.kernel),
        kernel_tcp: entry(&s.memory.kernel_tcp),
        ..Default::default()
    };
    let cpu = CPUStat {
        usage: MessageField::some(CPUUsage {
            total: s.cpu.usage.total,
            kernel: s.cpu.usage.kernel,
            user: s.cpu.usage.user,
            per_cpu: s.cpu.usage.percpu.clone(),
            ..Default::default()
        }),
        throttling: MessageField::some(Throttle {
            periods: s.cpu.throttling.periods,
            throttled_periods: s.cpu.throttling.throttled_periods,
            throttled_time: s.cpu.throttling.throttled_time,
            ..Default::default()
        }),
        ..Default::default()
    };
    let blkio = BlkIOStat {
        io_service_bytes_recursive: blk(&s.blkio.io_service_bytes_recursive),
        io_serviced_recursive: blk(&s.blkio.io_serviced_recursive),
        io_queued_recursive: blk(&s.blkio.io_queue_recursive),
        io_service_time_recursive: blk(&s.blkio.io_service_time_recursive),
        io_wait_time_recursive: blk(&s.blkio.io_wait_time_recursive),
        io_merged_recursive: blk(&s.blkio.io_merged_recursive),
        io_time_recursive: blk(&s.blkio.io_time_recursive),
        sectors_recursive: blk(&s.blkio.sectors_recursive),
        ..Default::default()
    };
    let hugetlb = s
        .hugetlb
        .iter()
        .map(|(size, h)| HugetlbStat {
            usage: h.usage,
            max: h.max,
            failcnt: h.failcnt,
            pagesize: size.clone(),
            ..Default::default()
        })
        .collect();
    Ok(Metrics {
        hugetlb,
        pids: MessageField::some(PidsStat { current: s.pids.current, limit: s.pids.limit, ..Default::default() }),
        cpu: MessageField::some(cpu),
        memory: MessageField::some(memory),
        blkio: MessageField::some(blkio),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_stats_convert() {
        let data = serde_json::json!({
            "cpu": {"usage": {"total": 1000, "percpu": [600, 400], "kernel": 10, "user": 20},
                    "throttling": {"periods": 3}},
            "memory": {"usage": {"usage": 4096, "limit": 8192, "max": 5000, "failcnt": 1},
                       "raw": {"rss": 1024, "total_cache": 77}, "kernelTCP": {"usage": 5}},
            "pids": {"current": 2, "limit": 100},
            "blkio": {"ioServiceBytesRecursive": [{"major": 8, "minor": 0, "op": "Read", "value": 42}]},
            "hugetlb": {"2MB": {"usage": 1, "max": 2, "failcnt": 3}},
            "intel_rdt": {}
        });
        let m = metrics(data).unwrap();
        assert_eq!(m.cpu.usage.total, 1000);
        assert_eq!(m.cpu.usage.per_cpu, vec![600, 400]);
        assert_eq!(m.cpu.throttling.periods, 3);
        assert_eq!((m.memory.usage.usage, m.memory.usage.limit), (4096, 8192));
        assert_eq!((m.memory.rss, m.memory.total_cache, m.memory.kernel_tcp.usage), (1024, 77, 5));
        assert_eq!((m.pids.current, m.pids.limit), (2, 100));
        assert_eq!(m.blkio.io_service_bytes_recursive[0].value, 42);
        assert_eq!(m.hugetlb[0].pagesize, "2MB");
        assert!(metrics(serde_json::json!({"cpu": 5})).is_err());
    }
}
