//! Daemon metrics in the Prometheus text format, and a minimal HTTP endpoint serving them with
//! `/healthz`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Upper bounds (seconds) of the ship-duration histogram buckets.
const DURATION_BUCKETS: [f64; 8] = [1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0];

/// Counters and gauges of the shipping daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    bytes_shipped: AtomicU64,
    bundles_shipped: AtomicU64,
    already_in_store: AtomicU64,
    reused_bytes: AtomicU64,
    failures: AtomicU64,
    queue_length: AtomicU64,
    in_flight: AtomicU64,
    last_success_unix: AtomicU64,
    durations: Mutex<Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    /// Records a shipped bundle of `bytes` archive bytes that took `seconds`.
    pub fn shipped(&self, bytes: u64, seconds: f64) {
        self.bytes_shipped.fetch_add(bytes, Ordering::Relaxed);
        self.bundles_shipped.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
        self.last_success_unix.store(now, Ordering::Relaxed);
        let mut h = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Records bytes an interrupted upload had already stored and that were not sent again.
    pub fn reused(&self, bytes: u64) {
        self.reused_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records a bundle found already in the store (only its record was written).
    pub fn already_in_store(&self) {
        self.already_in_store.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a failed shipping attempt.
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the number of bundles waiting (queued or waiting to be retried).
    pub fn set_queue_length(&self, n: usize) {
        self.queue_length.store(n as u64, Ordering::Relaxed);
    }

    /// Sets the number of uploads running.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Ordering::Relaxed);
    }

    /// Bundles waiting (queued or waiting to be retried) now.
    pub fn queue_length(&self) -> u64 {
        self.queue_length.load(Ordering::Relaxed)
    }

    /// Uploads running now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Bundles shipped so far.
    pub fn bundles_shipped(&self) -> u64 {
        self.bundles_shipped.load(Ordering::Relaxed)
    }

    /// Bundles found already in the store so far.
    pub fn bundles_already_in_store(&self) -> u64 {
        self.already_in_store.load(Ordering::Relaxed)
    }

    /// Failed attempts so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The metrics in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "kybernate_sidecar_shipped_bytes_total",
            "counter",
            "Archive bytes committed to the store.",
            get(&self.bytes_shipped),
        );
        metric(
            "kybernate_sidecar_bundles_shipped_total",
            "counter",
            "Bundles uploaded and committed.",
            get(&self.bundles_shipped),
        );
        metric(
            "kybernate_sidecar_bundles_already_in_store_total",
            "counter",
            "Bundles found already committed in the store (not uploaded again).",
            get(&self.already_in_store),
        );
        metric(
            "kybernate_sidecar_resumed_bytes_total",
            "counter",
            "Archive bytes not sent again because a resumed upload already had them.",
            get(&self.reused_bytes),
        );
        metric(
            "kybernate_sidecar_ship_failures_total",
            "counter",
            "Failed shipping attempts (each is retried later; the bundle is kept).",
            get(&self.failures),
        );
        metric(
            "kybernate_sidecar_queue_length",
            "gauge",
            "Complete bundles waiting to be shipped or retried.",
            get(&self.queue_length),
        );
        metric(
            "kybernate_sidecar_uploads_in_flight",
            "gauge",
            "Bundles being shipped right now.",
            get(&self.in_flight),
        );
        metric(
            "kybernate_sidecar_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last committed shipment (0: none yet).",
            get(&self.last_success_unix),
        );
        let h = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        let name = "kybernate_sidecar_ship_duration_seconds";
        let _ = writeln!(out, "# HELP {name} Time to archive and upload one bundle.\n# TYPE {name} histogram");
        for (bound, count) in DURATION_BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", h.sum);
        let _ = writeln!(out, "{name}_count {}", h.count);
        out
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, &metrics).await {
                tracing::debug!(error = %e, "metrics endpoint: connection failed");
            }
        });
    }
}

async fn handle(mut conn: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read_head = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timeout"))??;
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".into()),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found\n".into()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "method not allowed\n".into()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    conn.write_all(&response).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.shipped(1000, 2.0);
        m.shipped(24, 100.0);
        m.failed();
        m.set_queue_length(3);
        let text = m.render();
        assert!(text.contains("kybernate_sidecar_shipped_bytes_total 1024\n"), "{text}");
        assert!(text.contains("kybernate_sidecar_bundles_shipped_total 2\n"));
        assert!(text.contains("kybernate_sidecar_ship_failures_total 1\n"));
        assert!(text.contains("kybernate_sidecar_queue_length 3\n"));
        assert!(text.contains("kybernate_sidecar_ship_duration_seconds_bucket{le=\"1\"} 0\n"));
        assert!(text.contains("kybernate_sidecar_ship_duration_seconds_bucket{le=\"5\"} 1\n"));
        assert!(text.contains("kybernate_sidecar_ship_duration_seconds_bucket{le=\"300\"} 2\n"));
        assert!(text.contains("kybernate_sidecar_ship_duration_seconds_count 2\n"));
        assert!(text.contains("kybernate_sidecar_ship_duration_seconds_sum 102\n"));
    }
}
