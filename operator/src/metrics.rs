//! Prometheus metrics of the webhook's admissions, and the small plain-HTTP server that serves them
//! as text (`GET /metrics`), apart from the webhook's TLS port, as the agent and the device plugin do.

use std::future::Future;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::net::TcpListener;

/// How one `POST /mutate` ended, the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted with a JSON patch.
    Patched,
    /// Admitted as it is.
    Unchanged,
    /// Refused as a bad request (not an AdmissionReview, too large, unreadable); the API server
    /// admits the pod anyway (`failurePolicy: Ignore`).
    Error,
}

impl Outcome {
    /// Every outcome, so that each one's counter exists from the start.
    const ALL: [Outcome; 3] = [Outcome::Patched, Outcome::Unchanged, Outcome::Error];

    fn label(self) -> &'static str {
        match self {
            Outcome::Patched => "patched",
            Outcome::Unchanged => "unchanged",
            Outcome::Error => "error",
        }
    }
}

/// The webhook's metrics. Cheap to clone; all clones update the same values.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    admissions: IntCounterVec,
}

impl Metrics {
    /// Creates the metrics in a fresh registry, every outcome at 0.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let admissions = IntCounterVec::new(
            Opts::new(
                "kybernate_operator_admissions_total",
                "AdmissionReviews answered by the webhook, by outcome (patched, unchanged, error).",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(admissions.clone()))?;
        for outcome in Outcome::ALL {
            admissions.with_label_values(&[outcome.label()]);
        }
        Ok(Metrics { registry, admissions })
    }

    /// Counts one admission.
    pub fn record(&self, outcome: Outcome) {
        self.admissions.with_label_values(&[outcome.label()]).inc();
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        kybernate_metrics::render(&self.registry)
    }

    /// Serves `GET /metrics` on `listener` (plain HTTP/1.1) until `shutdown` completes.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        kybernate_metrics::serve(self.registry, listener, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_counted_from_zero() {
        let metrics = Metrics::new().unwrap();
        let text = metrics.render();
        for outcome in ["patched", "unchanged", "error"] {
            assert!(
                text.contains(&format!("kybernate_operator_admissions_total{{outcome=\"{outcome}\"}} 0")),
                "{text}"
            );
        }
        metrics.record(Outcome::Patched);
        metrics.record(Outcome::Patched);
        assert!(metrics.render().contains("kybernate_operator_admissions_total{outcome=\"patched\"} 2"));
    }
}
