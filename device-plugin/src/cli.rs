//! Command-line flags. Every flag overrides the config-file key of the same meaning.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::config::{Config, ConfigError, LogFormat, MultiSeatPolicy, DEFAULT_CONFIG_PATH};

/// Kubernetes device plugin advertising NVIDIA GPUs as Kybernate GPU seats.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "kybernate-device-plugin", version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML); without this flag /etc/kybernate/device-plugin.toml is read if it exists.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Extended resource name to advertise [key: resource_name].
    #[arg(long, value_name = "DOMAIN/NAME")]
    pub resource_name: Option<String>,
    /// The kubelet's device-plugin directory [key: device_plugin_dir].
    #[arg(long, value_name = "DIR")]
    pub device_plugin_dir: Option<PathBuf>,
    /// File name of the kubelet's socket in that directory [key: kubelet_socket].
    #[arg(long, value_name = "NAME")]
    pub kubelet_socket: Option<String>,
    /// File name of this plugin's socket in that directory [key: socket_name].
    #[arg(long, value_name = "NAME")]
    pub socket_name: Option<String>,
    /// Seconds between checks of the kubelet socket [key: kubelet_poll_interval_secs].
    #[arg(long, value_name = "SECS")]
    pub kubelet_poll_interval_secs: Option<f64>,
    /// Requests for more than one seat per container [key: multi_seat].
    #[arg(long, value_enum, value_name = "POLICY")]
    pub multi_seat: Option<MultiSeatPolicy>,
    /// Seats per GPU [key: seats.default_per_gpu].
    #[arg(long, value_name = "N")]
    pub seats_per_gpu: Option<u32>,
    /// One seat per this many GiB of GPU memory [key: seats.vram_gib_per_seat].
    #[arg(long, value_name = "GIB")]
    pub vram_gib_per_seat: Option<f64>,
    /// Seats of one GPU, repeatable; added to the file's entries [key: seats.per_gpu].
    #[arg(long = "gpu-seats", value_name = "UUID=N", value_parser = parse_gpu_seats)]
    pub gpu_seats: Vec<(String, u32)>,
    /// Put CDI device names into Allocate responses [key: cdi.enabled].
    #[arg(long, value_name = "BOOL")]
    pub cdi: Option<bool>,
    /// CDI kind of the GPU devices [key: cdi.kind].
    #[arg(long, value_name = "VENDOR/CLASS")]
    pub cdi_kind: Option<String>,
    /// Seconds between NVML health queries [key: health.poll_interval_secs].
    #[arg(long, value_name = "SECS")]
    pub health_poll_interval_secs: Option<f64>,
    /// Listen for NVML critical XID events [key: health.xid_events].
    #[arg(long, value_name = "BOOL")]
    pub xid_events: Option<bool>,
    /// Serve Prometheus metrics [key: metrics.enabled].
    #[arg(long, value_name = "BOOL")]
    pub metrics: Option<bool>,
    /// Address of the metrics endpoint [key: metrics.listen].
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Path of libnvidia-ml.so.1 [key: nvml_library].
    #[arg(long, value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
    /// Log line format [key: log.format].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or kybernate_device_plugin=debug; RUST_LOG wins [key: log.level].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

fn parse_gpu_seats(value: &str) -> Result<(String, u32), String> {
    let (uuid, seats) = value.split_once('=').ok_or_else(|| format!("`{value}` is not UUID=N (e.g. GPU-8f3c…=4)"))?;
    let seats = seats.trim().parse().map_err(|_| format!("`{seats}` in `{value}` is not a whole number of seats"))?;
    Ok((uuid.trim().to_owned(), seats))
}

impl Cli {
    /// Reads the config file, applies the flags on top and validates the result.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path, true)?,
            None => Config::from_file(Path::new(DEFAULT_CONFIG_PATH), false)?,
        };
        self.apply(&mut config);
        config.validate()?;
        Ok(config)
    }

    /// Overrides the keys of `config` for which a flag was given.
    pub fn apply(&self, config: &mut Config) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        set(&mut config.resource_name, &self.resource_name);
        set(&mut config.device_plugin_dir, &self.device_plugin_dir);
        set(&mut config.kubelet_socket, &self.kubelet_socket);
        set(&mut config.socket_name, &self.socket_name);
        set(&mut config.kubelet_poll_interval_secs, &self.kubelet_poll_interval_secs);
        set(&mut config.multi_seat, &self.multi_seat);
        set(&mut config.seats.default_per_gpu, &self.seats_per_gpu);
        if self.vram_gib_per_seat.is_some() {
            config.seats.vram_gib_per_seat = self.vram_gib_per_seat;
        }
        config.seats.per_gpu.extend(self.gpu_seats.iter().cloned());
        set(&mut config.cdi.enabled, &self.cdi);
        set(&mut config.cdi.kind, &self.cdi_kind);
        set(&mut config.health.poll_interval_secs, &self.health_poll_interval_secs);
        set(&mut config.health.xid_events, &self.xid_events);
        set(&mut config.metrics.enabled, &self.metrics);
        set(&mut config.metrics.listen, &self.metrics_listen);
        if self.nvml_library.is_some() {
            config.nvml_library = self.nvml_library.clone();
        }
        set(&mut config.log.format, &self.log_format);
        set(&mut config.log.level, &self.log_level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("kybernate-device-plugin").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dp.toml");
        std::fs::write(
            &path,
            "resource_name = \"example.com/seat\"\nmulti_seat = \"refuse\"\n[seats]\ndefault_per_gpu = 2\nper_gpu = { \"GPU-a\" = 3 }\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let from_file = cli(&["--config", p]).load_config().unwrap();
        assert_eq!(from_file.resource_name, "example.com/seat");
        assert_eq!(from_file.seats.default_per_gpu, 2);

        let merged = cli(&[
            "--config",
            p,
            "--seats-per-gpu",
            "4",
            "--multi-seat",
            "single-gpu",
            "--gpu-seats",
            "GPU-b=5",
            "--cdi",
            "true",
            "--metrics-listen",
            "127.0.0.1:9999",
        ])
        .load_config()
        .unwrap();
        assert_eq!(merged.resource_name, "example.com/seat", "file value kept");
        assert_eq!(merged.seats.default_per_gpu, 4);
        assert_eq!(merged.multi_seat, MultiSeatPolicy::SingleGpu);
        assert_eq!(merged.seats.per_gpu.get("GPU-a"), Some(&3));
        assert_eq!(merged.seats.per_gpu.get("GPU-b"), Some(&5));
        assert!(merged.cdi.enabled);
        assert_eq!(merged.metrics.listen.port(), 9999);
    }

    #[test]
    fn bad_flag_values_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = cli(&["--config", dir.path().join("absent.toml").to_str().unwrap()]).load_config().unwrap_err();
        assert!(err.to_string().contains("cannot read config file"), "{err}");

        let empty = dir.path().join("empty.toml");
        std::fs::write(&empty, "").unwrap();
        let err =
            cli(&["--config", empty.to_str().unwrap(), "--seats-per-gpu", "0"]).load_config().unwrap_err().to_string();
        assert!(err.contains("seats.default_per_gpu (--seats-per-gpu)"), "{err}");

        let parse = Cli::try_parse_from(["x", "--gpu-seats", "GPU-a"]).unwrap_err().to_string();
        assert!(parse.contains("UUID=N"), "{parse}");
        let parse = Cli::try_parse_from(["x", "--multi-seat", "sometimes"]).unwrap_err().to_string();
        assert!(parse.contains("pack") && parse.contains("single-gpu"), "{parse}");
    }
}
