//! Samples of one measurement and their median, minimum and maximum.

use std::collections::BTreeMap;

/// One measured operation of one side at one size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// Workload memory in MiB (0 for size-independent figures).
    pub mib: u64,
    /// The operation, e.g. `checkpoint to durable`.
    pub op: &'static str,
    /// Who did it, e.g. `raw criu dump`.
    pub side: &'static str,
}

/// The median, minimum and maximum of some samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// How many samples.
    pub runs: usize,
    /// Their median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Summary {
    /// The summary of `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Summary { runs: n, median, min: v[0], max: v[n - 1] })
    }
}

/// Every sample taken, by what was measured, in the order [`Key`] sorts.
#[derive(Debug, Default)]
pub struct Results {
    samples: BTreeMap<Key, Vec<f64>>,
    order: Vec<Key>,
}

impl Results {
    /// Records one sample.
    pub fn add(&mut self, mib: u64, op: &'static str, side: &'static str, value: f64) {
        let key = Key { mib, op, side };
        if !self.samples.contains_key(&key) {
            self.order.push(key.clone());
        }
        self.samples.entry(key).or_default().push(value);
    }

    /// The summary of one measurement, if it was taken.
    pub fn get(&self, mib: u64, op: &str, side: &str) -> Option<Summary> {
        self.samples
            .iter()
            .find(|(k, _)| k.mib == mib && k.op == op && k.side == side)
            .and_then(|(_, v)| Summary::of(v))
    }

    /// Every measurement with its summary, by size, then operation and side in the order each was
    /// first measured.
    pub fn all(&self) -> Vec<(Key, Summary)> {
        let op_rank = |k: &Key| self.order.iter().position(|o| o.mib == k.mib && o.op == k.op);
        let side_rank = |k: &Key| self.order.iter().position(|o| o.mib == k.mib && o.side == k.side);
        let mut keys = self.order.clone();
        keys.sort_by_key(|k| (k.mib, op_rank(k), side_rank(k)));
        keys.into_iter().filter_map(|k| Summary::of(&self.samples[&k]).map(|s| (k, s))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        assert_eq!(Summary::of(&[3.0, 1.0, 2.0]), Some(Summary { runs: 3, median: 2.0, min: 1.0, max: 3.0 }));
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn results_come_by_size_then_operation_then_side_as_first_measured() {
        let mut r = Results::default();
        r.add(256, "ckpt", "raw", 1.0);
        r.add(256, "restore", "raw", 2.0);
        r.add(256, "ckpt", "ours", 3.0);
        r.add(64, "ckpt", "ours", 4.0);
        r.add(256, "ckpt", "raw", 5.0);
        let keys: Vec<_> = r.all().into_iter().map(|(k, s)| (k.mib, k.op, k.side, s.median)).collect();
        assert_eq!(
            keys,
            [
                (64, "ckpt", "ours", 4.0),
                (256, "ckpt", "raw", 3.0),
                (256, "ckpt", "ours", 3.0),
                (256, "restore", "raw", 2.0)
            ]
        );
    }
}
