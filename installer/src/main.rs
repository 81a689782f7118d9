//! `kybernate-install`: the command line of the node installer; the work is in the
//! `kybernate_install` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use kybernate_install::{install, ConfigVersion, Options, SHIM_NAME};

/// Installs Kybernate's containerd shim and the containerd config drop-in for the runtime handler
/// `kybernate` on this node (run with the host's /usr/local/bin and /etc/containerd mounted). Files
/// are written atomically, and only when they differ; every file is reported as created, updated or
/// unchanged. containerd is not restarted.
#[derive(Parser)]
#[command(name = "kybernate-install", version)]
struct Cli {
    /// The host's binary directory, as mounted here (containerd finds the shim on its PATH).
    #[arg(long, env = "KYBERNATE_HOST_BIN_DIR", default_value = "/host/usr/local/bin")]
    host_bin_dir: PathBuf,
    /// The host's containerd directory (/etc/containerd), as mounted here; the drop-in goes to its
    /// conf.d/kybernate-runtime.toml.
    #[arg(long, env = "KYBERNATE_HOST_CONTAINERD_DIR", default_value = "/host/etc/containerd")]
    host_containerd_dir: PathBuf,
    /// The shim binary to install.
    #[arg(long, env = "KYBERNATE_SHIM", default_value_t = format!("/usr/local/bin/{SHIM_NAME}"))]
    shim: String,
    /// containerd's config version: 2 (containerd 1.6 / 1.7) or 3 (containerd 2.x).
    #[arg(long, env = "KYBERNATE_CONTAINERD_CONFIG_VERSION", value_enum, default_value = "2")]
    containerd_config_version: Version,
}

#[derive(Clone, Copy, ValueEnum)]
enum Version {
    #[value(name = "2")]
    V2,
    #[value(name = "3")]
    V3,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = Options {
        shim: PathBuf::from(cli.shim),
        host_bin_dir: cli.host_bin_dir,
        host_containerd_dir: cli.host_containerd_dir,
        config_version: match cli.containerd_config_version {
            Version::V2 => ConfigVersion::V2,
            Version::V3 => ConfigVersion::V3,
        },
    };
    match install(&options) {
        Ok(report) => {
            for (path, outcome) in &report.files {
                println!("{outcome} {}", path.display());
            }
            for warning in &report.warnings {
                eprintln!("warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kybernate-install: {e:#}");
            ExitCode::FAILURE
        }
    }
}
