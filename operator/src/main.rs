//! `kybernate-operator`: serves the mutating admission webhook over HTTPS, with the cluster's
//! CheckpointPolicies from the API server, and its metrics over plain HTTP; with `--controllers`,
//! also runs the Checkpoint, CheckpointPolicy and Restore controllers in the replica that holds the
//! leader Lease (docs/operator.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kybernate_operator::agents::{AgentAddresses, AgentTls, GrpcAgents, DEFAULT_ADDRESS_TEMPLATE};
use kybernate_operator::leader::{LeaderElector, LeaseConfig};
use kybernate_operator::metrics::Metrics;
use kybernate_operator::policies;
use kybernate_operator::store_index::StoreIndex;
use kybernate_operator::webhook_server::{self, Webhook, MAX_BODY};
use kybernate_operator::{checkpoint_controller, policy_controller, restore_controller};
use kybernate_sidecar::store::S3Options;
use tokio::net::TcpListener;

/// How long one S3 request of the store index may take: the API server waits 5 s for the webhook
/// (`timeoutSeconds`), then admits the pod unchanged.
const STORE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Kybernate's admission webhook (docs/kubernetes.md) and, with `--controllers`, its controllers
/// (docs/operator.md).
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
    /// Also run the Checkpoint, CheckpointPolicy and Restore controllers, in whichever replica holds
    /// the leader Lease (`kybernate-operator` in the operator's namespace).
    #[arg(long, alias = "checkpoint-controller", env = "KYBERNATE_OPERATOR_CONTROLLERS")]
    controllers: bool,
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
    let endpoint = args.s3_endpoint.clone();
    let s3 = S3Options {
        force_path_style: args.s3_force_path_style.unwrap_or(endpoint.is_some()),
        endpoint,
        region: args.s3_region.clone(),
        ..S3Options::default()
    };
    let controllers =
        if args.controllers { Some(tokio::spawn(lead(client.clone(), &args, s3.clone())?)) } else { None };
    let (policies, reflect) = policies::watch(client);
    tokio::spawn(reflect);
    tracing::info!("listing CheckpointPolicies");
    policies.ready().await?;

    // The webhook answers within the API server's 5 s, so its store requests are bounded tighter.
    let s3 = S3Options { attempt_timeout: STORE_ATTEMPT_TIMEOUT, ..s3 };
    let webhook =
        Webhook::new(Arc::new(policies), Arc::new(StoreIndex { s3 }), metrics).with_max_body(args.max_body_bytes);
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding --listen {}", args.listen))?;
    tracing::info!(addr = %args.listen, "serving the admission webhook");
    let served = webhook_server::serve(listener, tls, Arc::new(webhook), shutdown());
    if let Some(mut controllers) = controllers {
        tokio::pin!(served);
        tokio::select! {
            () = &mut served => controllers.await.context("the controllers")??,
            // Before a shutdown signal only a lost lease ends them: then stop serving too, and exit
            // non-zero so that the pod restarts as a candidate.
            done = &mut controllers => {
                done.context("the controllers")??;
                served.await;
            }
        }
    } else {
        served.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The controllers, run while this replica holds the leader Lease (in the operator's namespace: in a
/// pod, its service account's): waits for the Lease, runs the three controllers until shutdown, and
/// releases it. Resolves with an error when the Lease is lost (the controllers are stopped first).
fn lead(
    client: kube::Client,
    args: &Args,
    s3: S3Options,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static> {
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
    let agents = Arc::new(agents);
    let checkpoints = Arc::new(checkpoint_controller::Context::new(client.clone(), agents.clone()));
    let stores = Arc::new(StoreIndex { s3 });
    let policies = Arc::new(policy_controller::Context::new(client.clone(), agents, stores));
    let restores = Arc::new(restore_controller::Context::new(client.clone()));
    let elector =
        LeaderElector::new(client.clone(), LeaseConfig::new(client.default_namespace())).context("leader election")?;
    let agent_address = args.agent_address.clone();
    Ok(async move {
        tracing::info!(identity = elector.identity(), "waiting for the lease to run the controllers");
        tokio::select! {
            () = elector.acquire() => {}
            () = shutdown() => return Ok(()),
        }
        tracing::info!(agents = %agent_address, "leading: running the Checkpoint, CheckpointPolicy and Restore controllers");
        let run = async {
            tokio::join!(
                checkpoint_controller::run(checkpoints, shutdown()),
                policy_controller::run(policies, shutdown()),
                restore_controller::run(restores, shutdown()),
            )
        };
        tokio::select! {
            // Dropping the controllers stops them before another replica can take the lease over.
            lost = elector.hold() => Err(anyhow::Error::new(lost).context("leading the controllers")),
            _ = run => {
                if let Err(e) = elector.release().await {
                    tracing::warn!(error = %e, "releasing the lease failed; the next leader waits for it to expire");
                }
                Ok(())
            }
        }
    })
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
