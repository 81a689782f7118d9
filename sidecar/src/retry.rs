//! Retries with jittered exponential backoff for operations whose errors are transient.

use std::future::Future;
use std::time::Duration;

use crate::error::Result;

/// How often and how patiently to retry a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay before the second attempt (doubled each time, then jittered).
    pub base_delay: Duration,
    /// Upper bound of any single delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 6, base_delay: Duration::from_millis(200), max_delay: Duration::from_secs(20) }
    }
}

impl RetryPolicy {
    /// Delay after failed attempt `attempt` (1-based): "equal jitter", i.e. uniformly random in
    /// `[d/2, d]` with `d = min(max_delay, base_delay * 2^(attempt-1))`, so that parallel part
    /// uploads do not retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = exp.min(self.max_delay);
        let half = d / 2;
        half + d.mul_f64(0.5 * fastrand::f64())
    }

    /// Runs `op(attempt)` until it succeeds, fails with a non-transient error
    /// ([`crate::Error::is_transient`]), or `max_attempts` is reached.
    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < self.max_attempts.max(1) => {
                    let delay = self.delay(attempt);
                    tracing::warn!(
                        %what, attempt, max_attempts = self.max_attempts,
                        retry_in_ms = delay.as_millis() as u64, error = %e,
                        "transient failure, retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn delay_is_jittered_and_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        for attempt in 1..12 {
            let full = (100u64 << (attempt - 1)).min(1000);
            let d = p.delay(attempt).as_millis() as u64;
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d}ms not in [{}, {full}]", full / 2);
        }
    }

    fn transient() -> Error {
        Error::S3 {
            operation: "UploadPart",
            bucket: "b".into(),
            key: "k".into(),
            attempts: 1,
            message: "connection reset".into(),
            transient: true,
        }
    }

    #[tokio::test]
    async fn retries_transient_until_success_and_stops_on_permanent() {
        let p =
            RetryPolicy { max_attempts: 5, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(2) };
        let calls = AtomicU32::new(0);
        let v = p
            .run("op", |attempt| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if attempt < 3 {
                        Err(transient())
                    } else {
                        Ok(attempt)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(v, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let calls = AtomicU32::new(0);
        let err = p
            .run("op", |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(Error::NotFound { location: "x".into(), key: "k".into() }) }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let calls = AtomicU32::new(0);
        let err = p
            .run("op", |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(transient()) }
            })
            .await
            .unwrap_err();
        assert!(err.is_transient());
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }
}
