//! How a controller retries an object after a retryable failure (its backoff), and the loop that drives
//! a controller and logs each reconcile.

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

impl Backoff {
    /// The Action after a failed reconcile of the object `key` (`namespace/name`): try again after
    /// its next wait. The failure is logged with the wait.
    pub fn retry(&self, key: &str, error: &dyn std::fmt::Display) -> kube::runtime::controller::Action {
        let delay = self.next(key);
        tracing::warn!(object = %key, error = %error, ?delay, "retrying");
        kube::runtime::controller::Action::requeue(delay)
    }
}

/// The key of `object` in a backoff table: `namespace/name`.
pub fn key<K: kube::ResourceExt + ?Sized>(object: &K) -> String {
    format!("{}/{}", object.namespace().unwrap_or_default(), object.name_any())
}

/// Drives a controller's stream of reconcile results until it ends, logging each: a success at
/// debug level, a failure as a warning naming `kind`.
pub async fn drive<S, T, E>(results: S, kind: &'static str)
where
    S: futures_util::Stream<Item = Result<T, E>>,
    T: std::fmt::Debug,
    E: std::fmt::Display,
{
    use futures_util::StreamExt as _;
    results
        .for_each(|result| async move {
            match result {
                Ok(reconciled) => tracing::debug!(?reconciled, "reconciled a {kind}"),
                Err(e) => tracing::warn!(error = %e, "reconciling a {kind} failed"),
            }
        })
        .await;
}
