//! `kybernate-sidecar`: ship checkpoint bundles to a store and fetch them back.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use kybernate_sidecar::archive::{content_size, Progress};
use kybernate_sidecar::config::{FileConfig, Overrides, Settings, DEFAULT_CONFIG_PATH};
use kybernate_sidecar::crypt::write_new_key;
use kybernate_sidecar::daemon::{Daemon, DaemonConfig};
use kybernate_sidecar::fetch::{fetch_object, open_pod_reference, open_reference, parse_cli_reference, FetchOptions};
use kybernate_sidecar::gc::{gc, GcPolicy};
use kybernate_sidecar::ship::{ship_bundle, ShipOptions, ShipOutcome, StateDir};
use kybernate_sidecar::{Error, NOT_COVERED_EXIT};

#[derive(Parser)]
#[command(
    name = "kybernate-sidecar",
    version,
    about = "Ship Kybernate checkpoint bundles to a store and fetch them back"
)]
struct Cli {
    /// Config file (every key optional; a missing default file is fine).
    #[arg(long, global = true, env = "KYBERNATE_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Archive one complete bundle directory and upload it.
    Push {
        /// The bundle directory (must contain COMPLETE).
        bundle: PathBuf,
        /// Store key without suffix (default: the bundle's path relative to --checkpoint-dir).
        #[arg(long)]
        key: Option<String>,
        /// Upload even if the bundle was already shipped.
        #[arg(long)]
        force: bool,
    },
    /// Download, verify and extract a bundle to DEST (which must not exist).
    Pull {
        /// file:///path/to/archive, a path to an archive (relative to the working directory or
        /// absolute), or s3://bucket/key; with --container, a pod's prefix (s3://bucket/<ns>/<pod>,
        /// or its directory in a filesystem store), optionally #<time> to pin a pod checkpoint.
        reference: String,
        /// Take this container's bundle from the pod checkpoint REFERENCE names (the newest one,
        /// unless it ends in #<time>). Exits with status 3 when the pod checkpoint does not cover it.
        #[arg(long)]
        container: Option<String>,
        /// Directory to create.
        dest: PathBuf,
        /// Skip the bundle's manifest pass (re-reading every extracted file to check its sealed
        /// sha256). The archive's checksum recorded at upload is still checked as it streams, and
        /// COMPLETE must be present. The shim passes this: it verifies the manifest itself right
        /// before the restore, so the bundle is hashed once, before anything reaches CRIU.
        #[arg(long)]
        skip_manifest_check: bool,
        /// For a remote lazy restore: serve the bundle's pages to CRIU's lazy-pages daemon on the
        /// connected socket inherited as this descriptor, print DEST as soon as the bundle can be
        /// restored (before its memory is downloaded), and exit once every page is on disk and the
        /// daemon has every page (the shim runs this; docs/sidecar.md).
        #[arg(long, value_name = "FD", requires = "criu_version")]
        serve_pages: Option<i32>,
        /// The version of the CRIU that asks for pages (its request layout differs across versions).
        #[arg(long, value_name = "X.Y.Z")]
        criu_version: Option<String>,
    },
    /// List the archives in the store.
    Ls {
        /// Only keys starting with this.
        prefix: Option<String>,
    },
    /// Delete one archive (and its record) from the store.
    Rm {
        /// The key as shown by `ls`.
        key: String,
    },
    /// Apply retention per container (<namespace>/<pod>/<container>).
    Gc {
        /// Always keep the newest N archives of each container.
        #[arg(long)]
        keep_last: Option<usize>,
        /// Delete (unprotected) archives older than this, e.g. 7d, 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_age: Option<std::time::Duration>,
        /// Only consider keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Show what would be deleted without deleting.
        #[arg(long)]
        dry_run: bool,
    },
    /// Watch the checkpoint directory and ship every bundle whose COMPLETE appears.
    Daemon,
    /// Write a new random key to a file (mode 0600; never replaces an existing file): a store
    /// encryption key, or with `--signing` a node's ed25519 signing key (its public half beside it,
    /// `<out>.pub` with the extension replaced).
    Keygen {
        /// The key file to create.
        #[arg(long)]
        out: PathBuf,
        /// An ed25519 signing key (PKCS#8 PEM) for the shim's `signing_key`, or a grant key.
        #[arg(long)]
        signing: bool,
    },
    /// Issue a restore grant (what the operator does): containers of tenant `--to` may restore
    /// bundles of tenant `--from`. Prints the token for the pod annotation kybernate.io/restore-grant;
    /// nodes accept it when `--key`'s public half is in their `grant_keys`.
    Grant {
        /// The grant signing key (PKCS#8 PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Whose bundles: `k8s/<namespace>` or `containerd/<namespace>`.
        #[arg(long)]
        from: String,
        /// Who may restore them.
        #[arg(long)]
        to: String,
        /// Only a restore from exactly this reference.
        #[arg(long)]
        reference: Option<String>,
        /// How long the grant is valid (`1h`, `30m`); forever when absent.
        #[arg(long, value_parser = humantime::parse_duration)]
        valid_for: Option<std::time::Duration>,
    },
}

/// Transfer buffers (parts, ranges) are MiB-sized and short-lived. glibc raises its mmap threshold
/// each time such a buffer is freed, after which they come from per-thread heaps that keep the memory:
/// a pull of 2 GiB peaked at 244 MiB RSS. A fixed threshold keeps every large buffer mmapped, so
/// memory goes back to the kernel as soon as a buffer is dropped and RSS stays at what is in flight.
fn keep_large_buffers_mmapped() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
}

fn main() -> ExitCode {
    keep_large_buffers_mmapped();
    let cli = Cli::parse();
    // The daemon logs its work; one-shot commands print their result and log only problems.
    let default_level = if matches!(cli.command, Command::Daemon) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kybernate-sidecar: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kybernate-sidecar: error: {e:#}");
            match e.downcast_ref::<Error>() {
                Some(Error::NotCovered { .. }) => ExitCode::from(NOT_COVERED_EXIT),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn progress_bar(total: u64, verb: &str) -> Option<(ProgressBar, Progress)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(verb.to_string());
    let b = bar.clone();
    Some((bar, Arc::new(move |n| b.inc(n))))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Keygen { out, signing: false } => {
            let id = write_new_key(out)?;
            println!("wrote a new encryption key to {} (key id {id})", out.display());
            return Ok(());
        }
        Command::Keygen { out, signing: true } => {
            let key = checkpoint_core::trust::SigningKey::generate()?;
            let public = out.with_extension("pub");
            key.write(out, &public)?;
            println!(
                "wrote a new signing key to {} and its public half to {} (key id {})",
                out.display(),
                public.display(),
                key.id()
            );
            return Ok(());
        }
        Command::Grant { key, from, to, reference, valid_for } => {
            let key = checkpoint_core::trust::SigningKey::load(key)?;
            let not_after =
                valid_for.map(|d| humantime::format_rfc3339_seconds(std::time::SystemTime::now() + d).to_string());
            let grant = checkpoint_core::tenant::Grant {
                from: checkpoint_core::tenant::Tenant::parse(from)?,
                to: checkpoint_core::tenant::Tenant::parse(to)?,
                reference: reference.clone(),
                not_after,
            };
            println!("{}", grant.issue(&key));
            return Ok(());
        }
        _ => {}
    }
    let (path, required) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let overrides = cli.overrides.with_key_from_env()?;
    let settings = Settings::resolve(FileConfig::load(&path, required)?, &overrides)?;
    match cli.command {
        Command::Push { bundle, key, force } => push(&settings, &bundle, key, force).await,
        Command::Pull { reference, container, dest, skip_manifest_check, serve_pages, criu_version } => {
            let (store, info) = match &container {
                None => open_reference(&parse_cli_reference(&reference)?, &settings.s3).await?,
                Some(name) => {
                    let (reference, at) = checkpoint_core::pod::split_time(&reference);
                    open_pod_reference(&parse_cli_reference(reference)?, name, at, &settings.s3).await?
                }
            };
            let bar = progress_bar(info.meta.size, "pull");
            let opts = FetchOptions {
                s3: settings.s3.clone(),
                limits: settings.limits,
                range_size: settings.s3.part_size,
                concurrency: settings.s3.concurrency,
                progress: bar.as_ref().map(|(_, p)| p.clone()),
                skip_manifest_check,
                keys: settings.keys.clone(),
            };
            let result = match serve_pages {
                None => fetch_object(store, &info, &dest, &opts).await,
                Some(fd) => {
                    let serve = serve_pages_on(fd, criu_version.as_deref().unwrap_or_default())?;
                    let ready = |dir: &std::path::Path| {
                        println!("{}", dir.display());
                        let _ = std::io::Write::flush(&mut std::io::stdout());
                    };
                    kybernate_sidecar::lazy::fetch_serving_pages(store, &info, &dest, &opts, serve, ready).await
                }
            };
            if let Some((bar, _)) = bar {
                bar.finish_and_clear();
            }
            let dir = result?;
            if serve_pages.is_none() {
                println!("{}", dir.display());
            }
            Ok(())
        }
        Command::Ls { prefix } => {
            let store = settings.store.open(&settings.s3).await?;
            for o in store.list(prefix.as_deref().unwrap_or("")).await? {
                println!(
                    "{}\t{}\t{}\t{}",
                    o.key,
                    HumanBytes(o.meta.size),
                    o.meta.stored_at,
                    &o.meta.sha256[..o.meta.sha256.len().min(16)]
                );
            }
            Ok(())
        }
        Command::Rm { key } => {
            let store = settings.store.open(&settings.s3).await?;
            store.delete(&key).await?;
            println!("deleted {key} from {}", store.location());
            Ok(())
        }
        Command::Gc { keep_last, max_age, prefix, dry_run } => {
            let store = settings.store.open(&settings.s3).await?;
            let plan = gc(store.as_ref(), &prefix, &GcPolicy { keep_last, max_age }, dry_run).await?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            for o in &plan.delete {
                println!("{verb}\t{}", o.key);
            }
            println!("{verb} {}, kept {}", plan.delete.len(), plan.keep.len());
            Ok(())
        }
        Command::Daemon => {
            let store = settings.store.open(&settings.s3).await?;
            let listener = tokio::net::TcpListener::bind(settings.metrics_addr).await.with_context(|| {
                format!("cannot listen on {} for /metrics; pick another --metrics-addr", settings.metrics_addr)
            })?;
            let config = DaemonConfig {
                ship: ShipOptions {
                    archive: settings.archive.clone(),
                    state: StateDir::for_checkpoint_dir(&settings.checkpoint_dir),
                    force: false,
                    progress: None,
                    keys: settings.keys.clone(),
                },
                checkpoint_dir: settings.checkpoint_dir.clone(),
                rescan_interval: settings.rescan_interval,
                drain_timeout: settings.drain_timeout,
                backoff: settings.backoff,
                max_depth: 6,
            };
            Daemon::new(config, store).run(Some(listener), shutdown_signal()).await?;
            Ok(())
        }
        Command::Keygen { .. } | Command::Grant { .. } => {
            unreachable!("keygen and grant return before the settings are resolved")
        }
    }
}

async fn push(settings: &Settings, bundle: &Path, key: Option<String>, force: bool) -> anyhow::Result<()> {
    let bundle = std::path::absolute(bundle)?;
    let rel = match key {
        Some(k) => k,
        None => {
            let root = std::path::absolute(&settings.checkpoint_dir)?;
            match bundle.strip_prefix(&root).ok().and_then(|r| r.to_str()) {
                Some(r) if !r.is_empty() => r.to_string(),
                _ => bail!(
                    "{} is not inside the checkpoint directory {}; pass --key <namespace>/<pod>/<container>/<time> \
                     or --checkpoint-dir",
                    bundle.display(),
                    root.display()
                ),
            }
        }
    };
    let store = settings.store.open(&settings.s3).await?;
    let bar = progress_bar(content_size(&bundle)?, "push");
    let opts = ShipOptions {
        archive: settings.archive.clone(),
        state: StateDir::for_checkpoint_dir(&settings.checkpoint_dir),
        force,
        progress: bar.as_ref().map(|(_, p)| p.clone()),
        keys: settings.keys.clone(),
    };
    let result = ship_bundle(store.as_ref(), &bundle, &rel, &opts).await;
    if let Some((bar, _)) = bar {
        bar.finish_and_clear();
    }
    match result? {
        ShipOutcome::Shipped { object, seconds, reused_bytes } => println!(
            "shipped {} to {}/{} ({}, {:.1}s, {} resumed, sha256 {}{})",
            bundle.display(),
            store.location(),
            object.key,
            HumanBytes(object.meta.size),
            seconds,
            HumanBytes(reused_bytes),
            object.meta.sha256,
            object.meta.encryption.map(|e| format!(", encrypted with key id {}", e.key_id)).unwrap_or_default()
        ),
        ShipOutcome::AlreadyShipped(r) => {
            println!("already shipped to {}/{} at {} (use --force to upload again)", r.location, r.key, r.shipped_at)
        }
        ShipOutcome::AlreadyInStore(o) => {
            println!("already in {}/{} (same bundle); recorded as shipped", store.location(), o.key)
        }
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

/// The page server of a remote lazy restore: the socket inherited as `fd`, and the request layout of
/// CRIU `version`.
fn serve_pages_on(fd: i32, version: &str) -> anyhow::Result<kybernate_sidecar::lazy::ServePages> {
    use std::os::fd::FromRawFd;
    let version = checkpoint_core::CriuVersion::parse(&format!("Version: {version}"))
        .ok_or_else(|| anyhow::anyhow!("--criu-version {version:?} is not a version such as 4.1.1"))?;
    // SAFETY: the caller hands this process the descriptor for this use only (`--serve-pages`).
    let socket = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    socket.peer_addr().map_err(|e| anyhow::anyhow!("--serve-pages {fd} is not a connected Unix socket: {e}"))?;
    Ok(kybernate_sidecar::lazy::ServePages {
        socket,
        framing: checkpoint_core::criu::page_server::Framing::of(version),
    })
}
