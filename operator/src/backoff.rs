//! How long a controller waits before it tries an object again after a retryable failure.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How long an object waits before its next try after a retryable failure: `base`, doubled at each
/// consecutive failure, at most `max`; a success or a final failure starts it over.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Starting at `base`, never longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max, failures: Mutex::new(HashMap::new()) }
    }

    /// The wait after one more failure of `key`.
    pub fn next(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        let delay = self.base.saturating_mul(2u32.saturating_pow(*n)).min(self.max);
        *n = n.saturating_add(1);
        delay
    }

    /// Forgets the failures of `key`.
    pub fn reset(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

impl Default for Backoff {
    /// 5 s, 10 s, 20 s, … up to 5 minutes.
    fn default() -> Self {
        Backoff::new(Duration::from_secs(5), Duration::from_secs(300))
    }
}
