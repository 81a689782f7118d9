//! `kybernate-operator`: serves the mutating admission webhook over HTTPS, with the cluster's
//! CheckpointPolicies from the API server, and its metrics over plain HTTP; with
//! `--checkpoint-controller`, also runs the Checkpoint controller (docs/operator.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kybernate_operator::agents::{AgentAddresses, AgentTls, GrpcAgents, DEFAULT_ADDRESS_TEMPLATE};
use kybernate_operator::checkpoint_controller;
use kybernate_operator::metrics::Metrics;
use kybernate_operator::policies;
use kybernate_operator::store_index::StoreIndex;
use kybernate_operator::webhook_server::{self, Webhook, MAX_BODY};
use kybernate_sidecar::store::S3Options;
use tokio::net::TcpListener;

/// How long one S3 request of the store index may take: the API server waits 5 s for the webhook
/// (`timeoutSeconds`), then admits the pod unchanged.
const STORE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Kybernate's admission webhook (docs/kubernetes.md) and, with `--checkpoint-controller`, its
/// Checkpoint controller (docs/operator.md).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Where the webhook serves HTTPS (`POST /mutate`, `GET /healthz`).
    #[arg(long, env = "KYBERNATE_OPERATOR_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// The webhook's certificate chain (PEM, leaf first), read once at start.
    #[arg(long, env = "KYBERNATE_OPERATOR_TLS_CERT", default_value = "/etc/kybernate/webhook/tls.crt")]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "KYBERNATE_OPERATOR_TLS_KEY", default_value = "/etc/kybernate/webhook/tls.key")]
    tls_key: PathBuf,
    /// Serve `GET /metrics` (plain HTTP) there.
    #[arg(long, env = "KYBERNATE_OPERATOR_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// The largest AdmissionReview accepted, in bytes.
    #[arg(long, default_value_t = MAX_BODY)]
    max_body_bytes: usize,
    /// Custom S3 endpoint of the policies' stores (S3-compatible servers).
    #[arg(long, env = "KYBERNATE_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "KYBERNATE_S3_REGION")]
    s3_region: Option<String>,
    /// Path-style S3 addressing (default: on when an endpoint is set).
    #[arg(long, env = "KYBERNATE_S3_FORCE_PATH_STYLE")]
    s3_force_path_style: Option<bool>,
    /// Also run the Checkpoint controller (no leader election: run one replica with it).
    #[arg(long, env = "KYBERNATE_OPERATOR_CHECKPOINT_CONTROLLER")]
    checkpoint_controller: bool,
    /// Where every node's agent listens (`host:port` or a URI); `{node}` is the node's name.
    #[arg(long, env = "KYBERNATE_AGENT_ADDRESS", default_value = DEFAULT_ADDRESS_TEMPLATE)]
    agent_address: String,
    /// One node's agent elsewhere, as `NODE=HOST:PORT` (repeat for more nodes).
    #[arg(long = "agent-node-address", value_name = "NODE=ADDRESS", value_parser = node_address)]
    agent_node_addresses: Vec<(String, String)>,
    /// Seconds to wait for an agent's connection.
    #[arg(long, default_value_t = 5)]
    agent_connect_timeout_secs: u64,
    /// Seconds one checkpoint may take on the agent (dump and upload) before it counts as failed.
    #[arg(long, default_value_t = 900)]
    agent_timeout_secs: u64,
    /// The CA bundle (PEM) the agents' certificates chain to: with --agent-tls-cert and
    /// --agent-tls-key, the agents are dialed over mutual TLS (their `--listen-tcp`).
    #[arg(long, env = "KYBERNATE_AGENT_TLS_CA", requires_all = ["agent_tls_cert", "agent_tls_key"])]
    agent_tls_ca: Option<PathBuf>,
    /// The operator's client certificate chain (PEM) for the agents.
    #[arg(long, env = "KYBERNATE_AGENT_TLS_CERT", requires = "agent_tls_ca")]
    agent_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "KYBERNATE_AGENT_TLS_KEY", requires = "agent_tls_ca")]
    agent_tls_key: Option<PathBuf>,
    /// A `tracing` filter; the log goes to stderr.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log_level).context("--log-level")?)
        .with_writer(std::io::stderr)
        .init();
    // kube's client builds its TLS from the process's default provider.
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();

    let tls = webhook_server::load_tls_config(&args.tls_cert, &args.tls_key).context("the webhook's TLS")?;
    let metrics = Metrics::new().context("creating the metrics")?;
    if let Some(addr) = args.metrics_listen {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding --metrics-listen {addr}"))?;
        tracing::info!(%addr, "serving metrics");
        tokio::spawn(metrics.clone().serve(listener, std::future::pending()));
    }

    let client = kube::Client::try_default().await.context("connecting to the API server")?;
    let controller = args.checkpoint_controller.then(|| {
        let mut addresses = AgentAddresses::new(&args.agent_address);
        for (node, address) in &args.agent_node_addresses {
            addresses = addresses.with_node(node, address);
        }
        let mut agents = GrpcAgents::new(
            addresses,
            Duration::from_secs(args.agent_connect_timeout_secs),
            Duration::from_secs(args.agent_timeout_secs),
        );
        if let (Some(ca), Some(cert), Some(key)) = (&args.agent_tls_ca, &args.agent_tls_cert, &args.agent_tls_key) {
            agents = agents.with_tls(AgentTls { ca: ca.clone(), cert: cert.clone(), key: key.clone() });
        }
        let ctx = Arc::new(checkpoint_controller::Context::new(client.clone(), Arc::new(agents)));
        tracing::info!(agents = %args.agent_address, "running the Checkpoint controller");
        tokio::spawn(checkpoint_controller::run(ctx, shutdown()))
    });
    let (policies, reflect) = policies::watch(client);
    tokio::spawn(reflect);
    tracing::info!("listing CheckpointPolicies");
    policies.ready().await?;

    let endpoint = args.s3_endpoint;
    let s3 = S3Options {
        force_path_style: args.s3_force_path_style.unwrap_or(endpoint.is_some()),
        endpoint,
        region: args.s3_region,
        attempt_timeout: STORE_ATTEMPT_TIMEOUT,
        ..S3Options::default()
    };
    let webhook =
        Webhook::new(Arc::new(policies), Arc::new(StoreIndex { s3 }), metrics).with_max_body(args.max_body_bytes);
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding --listen {}", args.listen))?;
    tracing::info!(addr = %args.listen, "serving the admission webhook");
    webhook_server::serve(listener, tls, Arc::new(webhook), shutdown()).await;
    if let Some(controller) = controller {
        controller.await.context("the Checkpoint controller")?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// `NODE=ADDRESS` of `--agent-node-address`.
fn node_address(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((node, address)) if !node.is_empty() && !address.is_empty() => Ok((node.to_string(), address.to_string())),
        _ => Err(format!("{arg:?} is not NODE=HOST:PORT")),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "SIGTERM cannot be caught; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
