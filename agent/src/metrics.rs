//! Prometheus metrics of the agent's checkpoints, and the small HTTP server that serves them as text
//! (`GET /metrics`), as the device plugin does.

use std::future::Future;
use std::net::SocketAddr;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the checkpoint-duration histogram buckets.
const DURATION_BUCKETS: [f64; 9] = [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// How a checkpoint request ended, the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sealed (and pushed, when asked).
    Ok,
    /// Refused: a checkpoint of the container was already running.
    Busy,
    /// Refused before anything was written (unknown container, wrong runtime, no running task).
    Refused,
    /// The checkpoint or the push failed.
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Busy => "busy",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// The agent's metrics. Cheap to clone; all clones update the same values.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    checkpoints: IntCounterVec,
    duration: Histogram,
    in_flight: IntGauge,
}

impl Metrics {
    /// Creates the metrics in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let checkpoints = IntCounterVec::new(
            Opts::new(
                "kybernate_agent_checkpoints_total",
                "Checkpoint requests, by outcome (ok, busy, refused, failed).",
            ),
            &["outcome"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "kybernate_agent_checkpoint_duration_seconds",
                "Time from a checkpoint request to its sealed (and pushed) bundle, for successful checkpoints.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        let in_flight = IntGauge::new("kybernate_agent_checkpoints_in_flight", "Checkpoints running now.")?;
        registry.register(Box::new(checkpoints.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(Metrics { registry, checkpoints, duration, in_flight })
    }

    /// Counts one checkpoint request; a successful one's `seconds` go into the histogram.
    pub fn record(&self, outcome: Outcome, seconds: f64) {
        self.checkpoints.with_label_values(&[outcome.label()]).inc();
        if outcome == Outcome::Ok {
            self.duration.observe(seconds);
        }
    }

    /// One more checkpoint running; it ends when the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        kybernate_metrics::render(&self.registry)
    }

    /// Serves `GET /metrics` on `listener` until `shutdown` completes.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        kybernate_metrics::serve(self.registry, listener, shutdown).await
    }
}

/// A running checkpoint, counted in the in-flight gauge while it lives.
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Binds the metrics address (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_and_serves() {
        let m = Metrics::new().unwrap();
        m.record(Outcome::Ok, 1.5);
        m.record(Outcome::Busy, 0.0);
        m.record(Outcome::Ok, 0.2);
        let guard = m.in_flight();
        let text = m.render();
        assert!(text.contains("kybernate_agent_checkpoints_total{outcome=\"ok\"} 2"), "{text}");
        assert!(text.contains("kybernate_agent_checkpoints_total{outcome=\"busy\"} 1"), "{text}");
        assert!(text.contains("kybernate_agent_checkpoint_duration_seconds_count 2"), "{text}");
        assert!(text.contains("kybernate_agent_checkpoint_duration_seconds_bucket{le=\"0.5\"} 1"), "{text}");
        assert!(text.contains("kybernate_agent_checkpoints_in_flight 1"), "{text}");
        drop(guard);
        assert!(m.render().contains("kybernate_agent_checkpoints_in_flight 0"));

        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(m.clone().serve(listener, async move { drop(stopped.await) }));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200") && page.contains("kybernate_agent_checkpoints_total"), "{page}");
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
