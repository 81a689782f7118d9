//! `kybernate-device-plugin`: flags and config, logging, NVML discovery, then the plugin until
//! SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kybernate_device_plugin::cli::Cli;
use kybernate_device_plugin::config::{Config, LogFormat};
use kybernate_device_plugin::inventory::{NvmlInventory, NvmlOptions};
use kybernate_device_plugin::metrics::{Metrics, MetricsServer};
use kybernate_device_plugin::Daemon;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain on one line, without a backtrace: these are user-facing errors.
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> anyhow::Result<()> {
    let config = Cli::parse().load_config()?;
    init_logging(&config);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(config))
}

fn init_logging(config: &Config) {
    // RUST_LOG wins over log.level; log.level was validated with the config.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping");
        stop_tx.send_replace(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // An error means the signal task is gone, which only happens at exit.
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let inventory = NvmlInventory::open(NvmlOptions::from_config(&config)).context("GPU discovery failed")?;
    let metrics = Metrics::new()?;
    if config.metrics.enabled {
        let server = MetricsServer::bind(config.metrics.listen, metrics.clone()).await?;
        tracing::info!(addr = %server.local_addr()?, "serving metrics at /metrics");
        tokio::spawn(server.serve(stopped(stop_rx.clone())));
    }
    Daemon::new(config, Arc::new(inventory), metrics).run(stopped(stop_rx)).await?;
    Ok(())
}
