//! A workload with state worth keeping: it fills a buffer with a known pattern, counts, and keeps
//! writing `counter=<n> checksum=<hex> mem_ok=<0|1> pid=<pid>` to a state file (atomically, by rename).
//! After a restore the counter must continue and the buffer must still match its pattern.
//!
//! Usage: kybernate-test-workload STATE_FILE [MEM_MIB]

use std::time::Duration;

fn checksum(buf: &[u64]) -> u64 {
    buf.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, w| (h ^ w).wrapping_mul(0x100_0000_01b3))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let state = std::path::PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!("usage: STATE_FILE [MEM_MIB]"))?);
    let mem_mib: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let buf: Vec<u64> = (0..mem_mib * 1024 * 1024 / 8)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect();
    let expected = checksum(&buf);
    let tmp = state.with_extension("tmp");
    let mut counter: u64 = 0;
    loop {
        counter += 1;
        let mem_ok = checksum(&buf) == expected;
        std::fs::write(
            &tmp,
            format!(
                "counter={counter} checksum={expected:016x} mem_ok={} pid={}\n",
                u8::from(mem_ok),
                std::process::id()
            ),
        )?;
        std::fs::rename(&tmp, &state)?;
        std::thread::sleep(Duration::from_millis(50));
    }
}
