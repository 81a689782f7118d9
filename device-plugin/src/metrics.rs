//! Prometheus metrics and the small HTTP server that serves them as text (`GET /metrics`).

use std::future::Future;
use std::net::SocketAddr;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use thiserror::Error;
use tokio::net::TcpListener;

/// Errors of the metrics registry and endpoint.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// A metric could not be created or registered.
    #[error("cannot set up metric: {0}")]
    Registry(#[from] prometheus::Error),
    /// The listen address could not be bound.
    #[error("cannot serve metrics on {addr}: {source}; pick a free port with metrics.listen / --metrics-listen, or disable metrics with --metrics false")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// The plugin's metrics. Cheap to clone; all clones update the same values.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    allocations: IntCounterVec,
    registrations: IntCounterVec,
    seats_total: IntGauge,
    seats_healthy: IntGauge,
}

impl Metrics {
    /// Creates the metrics in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let allocations = IntCounterVec::new(
            Opts::new(
                "kybernate_device_plugin_allocations_total",
                "Container allocations answered, by result (ok or error).",
            ),
            &["result"],
        )?;
        let registrations = IntCounterVec::new(
            Opts::new(
                "kybernate_device_plugin_registrations_total",
                "Registration attempts with the kubelet, by result (ok or error).",
            ),
            &["result"],
        )?;
        let seats_total = IntGauge::new("kybernate_device_plugin_seats_total", "GPU seats advertised to the kubelet.")?;
        let seats_healthy = IntGauge::new("kybernate_device_plugin_seats_healthy", "GPU seats on healthy GPUs.")?;
        registry.register(Box::new(allocations.clone()))?;
        registry.register(Box::new(registrations.clone()))?;
        registry.register(Box::new(seats_total.clone()))?;
        registry.register(Box::new(seats_healthy.clone()))?;
        Ok(Metrics { registry, allocations, registrations, seats_total, seats_healthy })
    }

    /// Counts one container allocation.
    pub fn record_allocation(&self, ok: bool) {
        self.allocations.with_label_values(&[result_label(ok)]).inc();
    }

    /// Counts one registration attempt.
    pub fn record_registration(&self, ok: bool) {
        self.registrations.with_label_values(&[result_label(ok)]).inc();
    }

    /// Sets the seat gauges.
    pub fn set_seats(&self, total: u32, healthy: u32) {
        self.seats_total.set(i64::from(total));
        self.seats_healthy.set(i64::from(healthy));
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        kybernate_metrics::render(&self.registry)
    }
}

fn result_label(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "error"
    }
}

/// A bound metrics endpoint, not yet serving.
pub struct MetricsServer {
    listener: TcpListener,
    metrics: Metrics,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port; see [`MetricsServer::local_addr`]).
    pub async fn bind(addr: SocketAddr, metrics: Metrics) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(MetricsServer { listener, metrics })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `GET /metrics` until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        kybernate_metrics::serve(self.metrics.registry, self.listener, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn render_contains_values() {
        let m = Metrics::new().unwrap();
        m.record_allocation(true);
        m.record_allocation(true);
        m.record_allocation(false);
        m.record_registration(true);
        m.set_seats(8, 6);
        let text = m.render();
        assert!(text.contains("kybernate_device_plugin_allocations_total{result=\"ok\"} 2"), "{text}");
        assert!(text.contains("kybernate_device_plugin_allocations_total{result=\"error\"} 1"), "{text}");
        assert!(text.contains("kybernate_device_plugin_registrations_total{result=\"ok\"} 1"), "{text}");
        assert!(text.contains("kybernate_device_plugin_seats_total 8"), "{text}");
        assert!(text.contains("kybernate_device_plugin_seats_healthy 6"), "{text}");
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let m = Metrics::new().unwrap();
        m.set_seats(4, 4);
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), m).await.unwrap();
        let addr = server.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stop_rx.await;
        }));
        let ok = tokio::time::timeout(std::time::Duration::from_secs(10), get(addr, "/metrics")).await.unwrap();
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("kybernate_device_plugin_seats_total 4"), "{ok}");
        let missing = get(addr, "/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        stop_tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bind_error_names_address_and_fix() {
        let first = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), Metrics::new().unwrap()).await.unwrap();
        let addr = first.local_addr().unwrap();
        let err = MetricsServer::bind(addr, Metrics::new().unwrap()).await.err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains(&addr.to_string()) && msg.contains("--metrics-listen"), "{msg}");
    }
}
