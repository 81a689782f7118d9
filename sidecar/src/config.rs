//! Configuration: `/etc/kybernate/sidecar.toml` (every key optional), overridden by flags and
//! their environment variables. Defaults work with no file at all.
//!
//! ```toml
//! checkpoint_dir = "/var/lib/kybernate/checkpoints"
//! store = "file:///var/lib/kybernate/store"      # or "s3://bucket/prefix"
//! compression = "zstd"                           # or "none"
//! zstd_level = 3
//! zstd_threads = 0                               # 0: one per core
//! chunk_size_kib = 1024
//! metrics_addr = "127.0.0.1:9464"
//! rescan_interval = "60s"
//! drain_timeout = "0s"                           # daemon: on SIGTERM, keep shipping this long
//! retry_base = "5s"                              # daemon: backoff between attempts per bundle
//! retry_max = "5m"
//! encryption_key_file = "/etc/kybernate/archive.key"   # encrypt every archive (mode 0600)
//! decryption_key_files = ["/etc/kybernate/archive-2024.key"]  # older keys, still read
//! require_encryption = false                     # true: refuse to pull unencrypted archives
//!
//! [s3]
//! endpoint = "http://minio.example:9000"         # S3-compatible servers
//! region = "us-east-1"
//! force_path_style = true                        # default: true when endpoint is set
//! part_size_mib = 16
//! concurrency = 4
//! max_attempts = 6
//! attempt_timeout = "5m"
//!
//! [limits]                                       # extraction (pull / restore)
//! max_unpacked_gib = 1024
//! max_entries = 100000
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::archive::{ArchiveOptions, Compression};
use crate::crypt::{Key, Keyring};
use crate::error::{Error, Result};
use crate::extract::ExtractLimits;
use crate::retry::RetryPolicy;
use crate::store::{S3Options, StoreLocation};

/// Default location of the config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kybernate/sidecar.toml";
/// Default node checkpoint directory (the one the shim writes bundles to).
pub const DEFAULT_CHECKPOINT_DIR: &str = checkpoint_core::bundle::DEFAULT_CHECKPOINT_ROOT;
/// Default store.
pub const DEFAULT_STORE: &str = "file:///var/lib/kybernate/store";
/// Default metrics address (localhost only).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// The TOML file, as written (every key optional).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Node checkpoint directory.
    pub checkpoint_dir: Option<PathBuf>,
    /// Store URL.
    pub store: Option<String>,
    /// `none` or `zstd`.
    pub compression: Option<Compression>,
    /// zstd level.
    pub zstd_level: Option<i32>,
    /// zstd worker threads (0: per core).
    pub zstd_threads: Option<u32>,
    /// Size of the chunks between archiver and uploader, KiB.
    pub chunk_size_kib: Option<usize>,
    /// Address of the metrics/healthz endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Full rescan interval (humantime, e.g. `60s`).
    pub rescan_interval: Option<String>,
    /// How long the daemon keeps shipping queued bundles after SIGTERM (humantime).
    pub drain_timeout: Option<String>,
    /// First backoff after a failed shipment (humantime).
    pub retry_base: Option<String>,
    /// Longest backoff between shipments of a failing bundle (humantime).
    pub retry_max: Option<String>,
    /// File holding the key every archive is encrypted with (64 hex digits or 44 base64
    /// characters; mode 0600 or 0400). Pulls accept it too.
    pub encryption_key_file: Option<PathBuf>,
    /// Files of older keys that pulls still accept (during a key rotation).
    pub decryption_key_files: Option<Vec<PathBuf>>,
    /// Refuse to pull unencrypted archives (needs an encryption key).
    pub require_encryption: Option<bool>,
    /// S3 settings.
    #[serde(default)]
    pub s3: S3File,
    /// Extraction limits.
    #[serde(default)]
    pub limits: LimitsFile,
}

/// The `[s3]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3File {
    /// Custom endpoint URL.
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Path-style addressing.
    pub force_path_style: Option<bool>,
    /// Multipart part size, MiB.
    pub part_size_mib: Option<u64>,
    /// Parallel parts / ranges.
    pub concurrency: Option<usize>,
    /// Attempts per request.
    pub max_attempts: Option<u32>,
    /// Time limit per request attempt (humantime).
    pub attempt_timeout: Option<String>,
}

/// The `[limits]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Most bytes of file contents a fetched bundle may unpack to, GiB.
    pub max_unpacked_gib: Option<u64>,
    /// Most entries a fetched bundle may have.
    pub max_entries: Option<u64>,
}

impl FileConfig {
    /// Reads `path`. A missing file is an error only when `required`.
    pub fn load(path: &Path, required: bool) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Self::default()),
            Err(e) => return Err(Error::io("read config file", path, e)),
        };
        toml::from_str(&text).map_err(|e| Error::Config { key: path.display().to_string(), reason: e.to_string() })
    }
}

/// Settings given on the command line (or in the matching environment variables); they win over
/// the file.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Node checkpoint directory.
    #[arg(long, global = true, env = "KYBERNATE_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Store: file:///dir (default file:///var/lib/kybernate/store) or s3://bucket/prefix.
    #[arg(long, global = true, env = "KYBERNATE_SIDECAR_STORE")]
    pub store: Option<String>,
    /// Custom S3 endpoint (S3-compatible servers).
    #[arg(long, global = true, env = "KYBERNATE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, global = true, env = "KYBERNATE_S3_REGION")]
    pub s3_region: Option<String>,
    /// Path-style S3 addressing (default: on when an endpoint is set).
    #[arg(long, global = true, env = "KYBERNATE_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: Option<bool>,
    /// Multipart part size in MiB (5..=5120).
    #[arg(long, global = true, env = "KYBERNATE_S3_PART_SIZE_MIB")]
    pub s3_part_size_mib: Option<u64>,
    /// Parallel part uploads / ranged downloads.
    #[arg(long, global = true, env = "KYBERNATE_S3_CONCURRENCY")]
    pub s3_concurrency: Option<usize>,
    /// Attempts per S3 request.
    #[arg(long, global = true, env = "KYBERNATE_S3_MAX_ATTEMPTS")]
    pub s3_max_attempts: Option<u32>,
    /// Archive compression.
    #[arg(long, global = true, value_enum, env = "KYBERNATE_SIDECAR_COMPRESSION")]
    pub compression: Option<CompressionArg>,
    /// zstd level (1..=22).
    #[arg(long, global = true, env = "KYBERNATE_SIDECAR_ZSTD_LEVEL")]
    pub zstd_level: Option<i32>,
    /// zstd worker threads (0: one per core).
    #[arg(long, global = true, env = "KYBERNATE_SIDECAR_ZSTD_THREADS")]
    pub zstd_threads: Option<u32>,
    /// Address of /metrics and /healthz in daemon mode.
    #[arg(long, global = true, env = "KYBERNATE_SIDECAR_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Daemon: on SIGTERM, keep shipping queued bundles for up to this long (e.g. 5m; default 0).
    #[arg(long, global = true, env = "KYBERNATE_SIDECAR_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Encrypt every archive with the key in this file (hex or base64, mode 0600); pulls accept it.
    /// KYBERNATE_ENCRYPTION_KEY may hold the key itself instead.
    #[arg(long, global = true, env = "KYBERNATE_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// An older key that pulls still accept (repeatable; replaces decryption_key_files).
    #[arg(long = "decryption-key-file", global = true, env = "KYBERNATE_DECRYPTION_KEY_FILES", value_delimiter = ',')]
    pub decryption_key_files: Vec<PathBuf>,
    /// Refuse to pull unencrypted archives (needs an encryption key).
    #[arg(long, global = true, env = "KYBERNATE_REQUIRE_ENCRYPTION")]
    pub require_encryption: Option<bool>,
    /// The encryption key itself, from [`ENCRYPTION_KEY_ENV`] ([`Overrides::with_key_from_env`]).
    /// Never a flag: a command line is visible to every user of the node.
    #[arg(skip)]
    pub encryption_key: Option<Arc<Key>>,
}

/// Environment variable that may hold the encryption key itself (hex or base64), e.g. from a
/// Kubernetes Secret through `secretKeyRef`; an alternative to `encryption_key_file`.
pub const ENCRYPTION_KEY_ENV: &str = "KYBERNATE_ENCRYPTION_KEY";

impl Overrides {
    /// Takes the encryption key from [`ENCRYPTION_KEY_ENV`] when that is set.
    pub fn with_key_from_env(mut self) -> Result<Self> {
        self.encryption_key = Key::from_env(ENCRYPTION_KEY_ENV)?.map(Arc::new);
        Ok(self)
    }
}

/// `--compression` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressionArg {
    /// Plain tar.
    None,
    /// zstd-compressed tar.
    Zstd,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::None => Compression::None,
            CompressionArg::Zstd => Compression::Zstd,
        }
    }
}

/// Everything resolved: file, then flags/env on top, then defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Node checkpoint directory.
    pub checkpoint_dir: PathBuf,
    /// Store location.
    pub store: StoreLocation,
    /// Archive settings.
    pub archive: ArchiveOptions,
    /// S3 settings.
    pub s3: S3Options,
    /// Extraction limits.
    pub limits: ExtractLimits,
    /// Metrics endpoint address.
    pub metrics_addr: SocketAddr,
    /// Daemon rescan interval.
    pub rescan_interval: Duration,
    /// Daemon: how long to keep shipping after a shutdown signal.
    pub drain_timeout: Duration,
    /// Daemon backoff between attempts of a failing bundle.
    pub backoff: RetryPolicy,
    /// Encryption and decryption keys.
    pub keys: Keyring,
}

fn duration(key: &str, value: Option<&String>, default: Duration) -> Result<Duration> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v)
            .map_err(|e| Error::Config { key: key.into(), reason: format!("`{v}`: {e} (use e.g. 30s, 5m, 1h)") }),
    }
}

/// Loads the keys: the encryption key from the flag, the environment or the file (one of them),
/// the older keys from the flags or the file.
fn keyring(file: &FileConfig, flags: &Overrides) -> Result<Keyring> {
    let encryption = match (&flags.encryption_key_file, &flags.encryption_key) {
        (Some(_), Some(_)) => {
            return Err(Error::Config {
                key: "encryption_key_file".into(),
                reason: format!("both --encryption-key-file and {ENCRYPTION_KEY_ENV} are set; set one of them"),
            })
        }
        (Some(path), None) => Some(Arc::new(Key::load(path)?)),
        (None, Some(key)) => Some(key.clone()),
        (None, None) => file.encryption_key_file.as_deref().map(Key::load).transpose()?.map(Arc::new),
    };
    let older = if flags.decryption_key_files.is_empty() {
        file.decryption_key_files.as_deref().unwrap_or_default()
    } else {
        &flags.decryption_key_files
    };
    let older = older.iter().map(|p| Key::load(p).map(Arc::new)).collect::<Result<Vec<_>>>()?;
    let require = flags.require_encryption.or(file.require_encryption).unwrap_or(false);
    if require && encryption.is_none() {
        return Err(Error::Config {
            key: "require_encryption".into(),
            reason: format!(
                "it needs an encryption key: set encryption_key_file (or --encryption-key-file, or {ENCRYPTION_KEY_ENV})"
            ),
        });
    }
    Ok(Keyring::new(encryption, older, require))
}

impl Settings {
    /// Resolves `file` with `flags` on top.
    pub fn resolve(file: FileConfig, flags: &Overrides) -> Result<Self> {
        let keys = keyring(&file, flags)?;
        let store_url = flags.store.clone().or(file.store).unwrap_or_else(|| DEFAULT_STORE.to_string());
        let store = StoreLocation::parse(&store_url)?;

        let level = flags.zstd_level.or(file.zstd_level).unwrap_or(3);
        if !(1..=22).contains(&level) {
            return Err(Error::Config {
                key: "zstd_level".into(),
                reason: format!("{level} is outside zstd's range 1..=22"),
            });
        }
        let archive = ArchiveOptions {
            compression: flags.compression.map(Compression::from).or(file.compression).unwrap_or(Compression::Zstd),
            zstd_level: level,
            zstd_threads: flags.zstd_threads.or(file.zstd_threads).unwrap_or(0),
            chunk_size: file.chunk_size_kib.unwrap_or(1024).clamp(4, 64 << 10) << 10,
            ..ArchiveOptions::default()
        };

        let endpoint = flags.s3_endpoint.clone().or(file.s3.endpoint);
        let defaults = S3Options::default();
        let s3 = S3Options {
            force_path_style: flags.s3_force_path_style.or(file.s3.force_path_style).unwrap_or(endpoint.is_some()),
            endpoint,
            region: flags.s3_region.clone().or(file.s3.region),
            part_size: flags.s3_part_size_mib.or(file.s3.part_size_mib).map_or(defaults.part_size, |m| m << 20),
            concurrency: flags.s3_concurrency.or(file.s3.concurrency).unwrap_or(defaults.concurrency),
            retry: RetryPolicy {
                max_attempts: flags
                    .s3_max_attempts
                    .or(file.s3.max_attempts)
                    .unwrap_or(defaults.retry.max_attempts)
                    .max(1),
                ..defaults.retry
            },
            attempt_timeout: duration(
                "s3.attempt_timeout",
                file.s3.attempt_timeout.as_ref(),
                defaults.attempt_timeout,
            )?,
            credentials: None,
        };
        if matches!(store, StoreLocation::S3 { .. }) {
            s3.validate()?;
        }

        let limit_defaults = ExtractLimits::default();
        let limits = ExtractLimits {
            max_unpacked_bytes: file
                .limits
                .max_unpacked_gib
                .map_or(limit_defaults.max_unpacked_bytes, |g| g.saturating_mul(1 << 30)),
            max_entries: file.limits.max_entries.unwrap_or(limit_defaults.max_entries),
        };

        Ok(Settings {
            checkpoint_dir: flags
                .checkpoint_dir
                .clone()
                .or(file.checkpoint_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CHECKPOINT_DIR)),
            store,
            archive,
            s3,
            limits,
            metrics_addr: flags
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().expect("default address parses")),
            rescan_interval: duration("rescan_interval", file.rescan_interval.as_ref(), Duration::from_secs(60))?,
            drain_timeout: match flags.drain_timeout {
                Some(d) => d,
                None => duration("drain_timeout", file.drain_timeout.as_ref(), Duration::ZERO)?,
            },
            backoff: RetryPolicy {
                max_attempts: u32::MAX,
                base_delay: duration("retry_base", file.retry_base.as_ref(), Duration::from_secs(5))?,
                max_delay: duration("retry_max", file.retry_max.as_ref(), Duration::from_secs(300))?,
            },
            keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_without_a_file() {
        let file = FileConfig::load(Path::new("/nonexistent/sidecar.toml"), false).unwrap();
        let s = Settings::resolve(file, &Overrides::default()).unwrap();
        assert_eq!(s.checkpoint_dir, PathBuf::from(DEFAULT_CHECKPOINT_DIR));
        assert_eq!(s.store, StoreLocation::Fs("/var/lib/kybernate/store".into()));
        assert_eq!(s.archive.compression, Compression::Zstd);
        assert_eq!(s.metrics_addr.to_string(), DEFAULT_METRICS_ADDR);
        assert!(!s.s3.force_path_style);
        assert!(FileConfig::load(Path::new("/nonexistent/sidecar.toml"), true).is_err());
    }

    #[test]
    fn flags_override_file_and_bad_values_are_named() {
        let file: FileConfig = toml::from_str(
            r#"
            store = "s3://bucket/pre"
            compression = "none"
            rescan_interval = "10s"
            drain_timeout = "2m"
            [s3]
            endpoint = "http://127.0.0.1:9000"
            part_size_mib = 8
            [limits]
            max_entries = 7
            "#,
        )
        .unwrap();
        let flags =
            Overrides { s3_part_size_mib: Some(6), compression: Some(CompressionArg::Zstd), ..Overrides::default() };
        let s = Settings::resolve(file.clone(), &flags).unwrap();
        assert_eq!(s.store, StoreLocation::S3 { bucket: "bucket".into(), prefix: "pre".into() });
        assert_eq!(s.s3.part_size, 6 << 20);
        assert!(s.s3.force_path_style, "defaults to path style with a custom endpoint");
        assert_eq!(s.archive.compression, Compression::Zstd);
        assert_eq!(s.limits.max_entries, 7);
        assert_eq!(s.rescan_interval, Duration::from_secs(10));
        assert_eq!(s.drain_timeout, Duration::from_secs(120));

        let tiny = Overrides { s3_part_size_mib: Some(1), ..Overrides::default() };
        let err = Settings::resolve(file, &tiny).unwrap_err().to_string();
        assert!(err.contains("s3.part_size_mib"), "{err}");

        let err = toml::from_str::<FileConfig>("stroe = 1").unwrap_err().to_string();
        assert!(err.contains("stroe"), "{err}");
    }
}
