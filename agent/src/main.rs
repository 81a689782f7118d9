//! `kybernate-agent`: the node agent's command line; the work is in the `kybernate_agent` library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kybernate_agent::metrics::Metrics;
use kybernate_agent::push::Sidecar;
use kybernate_agent::server::DEFAULT_SOCKET;
use kybernate_agent::{AgentConfig, AgentService, TlsError};
use kybernate_shim::config::{ShimConfig, DEFAULT_CONFIG_PATH};

/// Kybernate's node agent: checkpoints this node's containers through the Kybernate shim, and lists
/// and deletes its bundles, over gRPC on a Unix socket (and, with --listen-tcp, on TCP with mutual TLS).
#[derive(Parser)]
#[command(name = "kybernate-agent", version)]
struct Cli {
    /// The Unix socket to serve on (created mode 0600; a stale one is replaced).
    #[arg(long, env = "KYBERNATE_AGENT_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Also serve on this TCP address, with mutual TLS (needs --tls-cert, --tls-key and --tls-client-ca).
    #[arg(long, env = "KYBERNATE_AGENT_LISTEN_TCP")]
    listen_tcp: Option<SocketAddr>,
    /// The agent's PEM certificate chain (leaf first) for --listen-tcp.
    #[arg(long, env = "KYBERNATE_AGENT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "KYBERNATE_AGENT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The PEM CA bundle that clients' certificates must chain to; other clients are refused.
    #[arg(long, env = "KYBERNATE_AGENT_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// containerd's gRPC socket.
    #[arg(long, env = "KYBERNATE_CONTAINERD_SOCKET", default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
    /// containerd's state directory (its `state` setting), where the shims' addresses are.
    #[arg(long, env = "KYBERNATE_CONTAINERD_STATE", default_value = "/run/containerd")]
    containerd_state: PathBuf,
    /// The shim config whose checkpoint_dir, criu_binary and sidecar_binary the agent uses.
    #[arg(long, env = "KYBERNATE_SHIM_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    shim_config: PathBuf,
    /// The kybernate-sidecar binary that pushes bundles (default: the shim config's sidecar_binary).
    #[arg(long, env = "KYBERNATE_SIDECAR_BINARY")]
    sidecar_binary: Option<PathBuf>,
    /// The sidecar's config file (default: the sidecar's own default).
    #[arg(long, env = "KYBERNATE_SIDECAR_CONFIG")]
    sidecar_config: Option<PathBuf>,
    /// Push every checkpoint to this store (file:///path or s3://bucket/prefix) unless the request names one.
    #[arg(long, env = "KYBERNATE_AGENT_STORE")]
    store: Option<String>,
    /// The node's name, for Status (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// How long one checkpoint through the shim may take.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    checkpoint_timeout: Duration,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long, env = "KYBERNATE_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// A tracing filter for the agent's log.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?)
        .with_writer(std::io::stderr)
        .init();
    // Mutual TLS is set up before anything else, so that a bad certificate stops the agent at once.
    let tcp = match cli.listen_tcp {
        Some(addr) => {
            let need = |file: Option<PathBuf>, flag, env| file.ok_or(TlsError::MissingFlag { addr, flag, env });
            let cert = need(cli.tls_cert, "--tls-cert", "KYBERNATE_AGENT_TLS_CERT")?;
            let key = need(cli.tls_key, "--tls-key", "KYBERNATE_AGENT_TLS_KEY")?;
            let client_ca = need(cli.tls_client_ca, "--tls-client-ca", "KYBERNATE_AGENT_TLS_CLIENT_CA")?;
            Some((addr, kybernate_agent::tls::acceptor(&cert, &key, &client_ca)?))
        }
        None => {
            if cli.tls_cert.is_some() || cli.tls_key.is_some() || cli.tls_client_ca.is_some() {
                tracing::warn!("--tls-cert, --tls-key and --tls-client-ca do nothing without --listen-tcp");
            }
            None
        }
    };
    let shim = ShimConfig::load(&cli.shim_config, cli.shim_config != std::path::Path::new(DEFAULT_CONFIG_PATH))
        .with_context(|| format!("reading the shim config {}", cli.shim_config.display()))?;
    let node_name = match cli.node_name {
        Some(name) => name,
        None => {
            std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?.trim().to_string()
        }
    };
    let config = AgentConfig {
        node_name,
        containerd_state: cli.containerd_state,
        checkpoint_dir: shim.checkpoint_dir.clone(),
        criu_binary: shim.criu_binary.clone().unwrap_or_else(|| "criu".into()),
        sidecar: Sidecar { binary: cli.sidecar_binary.unwrap_or(shim.sidecar_binary), config: cli.sidecar_config },
        store: cli.store,
        checkpoint_timeout: cli.checkpoint_timeout,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let metrics = Metrics::new()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        if let Some(addr) = cli.metrics_listen {
            let listener = kybernate_agent::metrics::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}; pick another --metrics-listen"))?;
            tracing::info!(addr = %listener.local_addr()?, "serving metrics at /metrics");
            let mut stopped = stopped.clone();
            tokio::spawn(metrics.clone().serve(listener, async move { drop(stopped.wait_for(|s| *s).await) }));
        }
        let channel = kybernate_agent::resolve::containerd_channel(&cli.containerd_socket)?;
        let service = AgentService::new(config, channel, metrics);
        let listener = kybernate_agent::server::bind(&cli.socket).await?;
        let tcp = async {
            let Some((addr, acceptor)) = tcp else { return Ok(()) };
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}; pick another --listen-tcp"))?;
            let mut stopped = stopped.clone();
            let shutdown = async move { drop(stopped.wait_for(|s| *s).await) };
            kybernate_agent::tls::serve(listener, acceptor, service.clone(), shutdown)
                .await
                .with_context(|| format!("serving on {addr}"))
        };
        let shutdown = async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            let _ = stop.send(true);
        };
        let unix = async {
            kybernate_agent::server::serve(listener, cli.socket.clone(), service.clone(), shutdown)
                .await
                .with_context(|| format!("serving on {}", cli.socket.display()))
        };
        tokio::try_join!(unix, tcp).map(drop)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
