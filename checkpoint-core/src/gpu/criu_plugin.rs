//! CRIU's own CUDA plugin, and the choice of who does the GPU steps.
//!
//! CRIU loads every plugin in its plugin directory; its `cuda_plugin.so` locks and checkpoints CUDA
//! processes inside `criu dump` and restores and unlocks them inside `criu restore`. Kybernate
//! detects it so that GPU work is not done twice or fought over, and picks one backend: the driver
//! API, the `cuda-checkpoint` utility, CRIU's plugin, or none (see [`GpuBackendChoice`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CudaCheckpointCli, CudaCheckpointDriver, DriverApi};
use crate::criu::Criu;
use crate::exec::Spawner;

/// File name of CRIU's CUDA plugin.
pub const CUDA_PLUGIN: &str = "cuda_plugin.so";
/// CRIU's plugin directory when neither its build nor its caller says otherwise.
pub const CRIU_DEFAULT_PLUGIN_DIR: &str = "/usr/lib/criu";
/// Environment variable that moves CRIU's plugin directory (CRIU inherits this process's value).
pub const CRIU_LIBS_DIR_ENV: &str = "CRIU_LIBS_DIR";

/// Where the plugin directory setting came from, in CRIU's order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginDirSource {
    /// An explicit `--libdir`.
    Libdir,
    /// The `CRIU_LIBS_DIR` environment variable.
    Environment,
    /// The default compiled into the CRIU binary (read from `criu --help`).
    CompiledIn,
    /// [`CRIU_DEFAULT_PLUGIN_DIR`], because the binary's own default could not be read.
    Default,
}

/// The directory CRIU loads plugins from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuPluginDir {
    /// The directory.
    pub path: PathBuf,
    /// Why this one.
    pub source: PluginDirSource,
}

/// The compiled-in plugin directory, from the `--libdir` line of `criu --help`
/// (`path to a plugin directory (by default /usr/lib/criu/)`).
fn help_default(help: &str) -> Option<PathBuf> {
    let line = help.lines().find(|l| l.contains("--libdir"))?;
    let rest = &line[line.find("by default ")? + "by default ".len()..];
    let dir = rest[..rest.find(')')?].trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

impl CriuPluginDir {
    /// Resolves the directory as CRIU does: an explicit `libdir`, else `CRIU_LIBS_DIR` (`env`), else
    /// the default printed by `criu --help` (`help`), else [`CRIU_DEFAULT_PLUGIN_DIR`].
    pub fn resolve(libdir: Option<&Path>, env: Option<OsString>, help: Option<&str>) -> Self {
        if let Some(dir) = libdir {
            return CriuPluginDir { path: dir.to_path_buf(), source: PluginDirSource::Libdir };
        }
        if let Some(dir) = env.filter(|d| !d.is_empty()) {
            return CriuPluginDir { path: dir.into(), source: PluginDirSource::Environment };
        }
        match help.and_then(help_default) {
            Some(path) => CriuPluginDir { path, source: PluginDirSource::CompiledIn },
            None => CriuPluginDir { path: CRIU_DEFAULT_PLUGIN_DIR.into(), source: PluginDirSource::Default },
        }
    }

    /// The directory `criu` will use when run by this process, with `libdir` if one is passed.
    pub fn for_criu(criu: &Criu, libdir: Option<&Path>) -> Self {
        let help = criu.spawner().output(criu.command().arg("--help")).ok().map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text
        });
        Self::resolve(libdir, std::env::var_os(CRIU_LIBS_DIR_ENV), help.as_deref())
    }

    /// CRIU's CUDA plugin, when this directory holds it (and CRIU will therefore load it).
    pub fn cuda_plugin(&self) -> Option<PathBuf> {
        Some(self.path.join(CUDA_PLUGIN)).filter(|p| p.is_file())
    }
}

/// Which backend does the GPU steps: the configuration knob (`gpu_backend` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuBackendChoice {
    /// The first usable of: driver API, `cuda-checkpoint`, CRIU's plugin; none when nothing is usable.
    #[default]
    Auto,
    /// The CUDA driver API (`cuCheckpointProcess*` in libcuda, driver >= 570).
    DriverApi,
    /// NVIDIA's `cuda-checkpoint` utility.
    #[serde(rename = "cuda-checkpoint")]
    Cli,
    /// CRIU's `cuda_plugin.so`, inside `criu dump` / `criu restore`.
    CriuPlugin,
    /// No GPU checkpointing: containers using a GPU are not checkpointed.
    Off,
}

impl GpuBackendChoice {
    /// The name used in the config file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            GpuBackendChoice::Auto => "auto",
            GpuBackendChoice::DriverApi => "driver-api",
            GpuBackendChoice::Cli => "cuda-checkpoint",
            GpuBackendChoice::CriuPlugin => "criu-plugin",
            GpuBackendChoice::Off => "off",
        }
    }
}

/// The backend in use on this node.
pub enum GpuBackend {
    /// Kybernate orders the GPU steps itself through `driver`.
    Driver {
        /// The driver API or the `cuda-checkpoint` utility.
        driver: Box<dyn CudaCheckpointDriver>,
        /// CRIU's CUDA plugin, when CRIU will load it too: at dump it leaves processes that are
        /// already checkpointed alone, but at restore it restores and unlocks them itself, onto the
        /// checkpoint's own GPUs.
        criu_plugin: Option<PathBuf>,
    },
    /// CRIU's plugin does the GPU steps inside the dump and restore; Kybernate does none.
    CriuPlugin {
        /// The plugin file.
        plugin: PathBuf,
    },
    /// No GPU checkpointing.
    Off {
        /// Why (switched off, or what each backend lacked).
        reason: String,
    },
}

impl GpuBackend {
    /// The backend's name as recorded in the manifest (`driver-api`, `cuda-checkpoint`,
    /// `criu-plugin`, `off`).
    pub fn name(&self) -> &str {
        match self {
            GpuBackend::Driver { driver, .. } => driver.name(),
            GpuBackend::CriuPlugin { .. } => GpuBackendChoice::CriuPlugin.as_str(),
            GpuBackend::Off { .. } => GpuBackendChoice::Off.as_str(),
        }
    }
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuBackend::Driver { driver, criu_plugin } => {
                f.debug_struct("Driver").field("driver", &driver.name()).field("criu_plugin", criu_plugin).finish()
            }
            GpuBackend::CriuPlugin { plugin } => f.debug_struct("CriuPlugin").field("plugin", plugin).finish(),
            GpuBackend::Off { reason } => f.debug_struct("Off").field("reason", reason).finish(),
        }
    }
}

/// What each backend needs, looked for only when asked. [`NodeProbe`] looks on this node; tests use
/// fakes.
pub trait BackendProbe {
    /// The driver API, or why it is unusable.
    fn driver_api(&self) -> Result<Box<dyn CudaCheckpointDriver>, String>;
    /// The `cuda-checkpoint` utility, or why it is unusable.
    fn cli(&self) -> Result<Box<dyn CudaCheckpointDriver>, String>;
    /// CRIU's CUDA plugin, or why there is none.
    fn criu_plugin(&self) -> Result<PathBuf, String>;
}

/// Probes this node: `libcuda.so.1`, `cuda-checkpoint` on `PATH`, and CRIU's plugin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeProbe {
    /// Where CRIU looks for plugins.
    pub plugin_dir: CriuPluginDir,
    /// How `cuda-checkpoint` is spawned (as CRIU is).
    pub spawner: Spawner,
}

impl NodeProbe {
    /// Probes for `criu`: its plugin directory, and its way of spawning children for `cuda-checkpoint`.
    pub fn for_criu(criu: &Criu) -> Self {
        NodeProbe { plugin_dir: CriuPluginDir::for_criu(criu, None), spawner: criu.spawner().clone() }
    }
}

impl BackendProbe for NodeProbe {
    fn driver_api(&self) -> Result<Box<dyn CudaCheckpointDriver>, String> {
        DriverApi::open().map(|d| Box::new(d) as Box<dyn CudaCheckpointDriver>).map_err(|e| e.to_string())
    }

    fn cli(&self) -> Result<Box<dyn CudaCheckpointDriver>, String> {
        CudaCheckpointCli::from_path(self.spawner.clone())
            .map(|c| Box::new(c) as Box<dyn CudaCheckpointDriver>)
            .ok_or_else(|| "cuda-checkpoint not found on PATH".to_string())
    }

    fn criu_plugin(&self) -> Result<PathBuf, String> {
        self.plugin_dir.cuda_plugin().ok_or_else(|| {
            format!(
                "no {CUDA_PLUGIN} in CRIU's plugin directory {} ({:?})",
                self.plugin_dir.path.display(),
                self.plugin_dir.source
            )
        })
    }
}

/// A backend chosen explicitly is not usable on this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("GPU backend {} was chosen but cannot be used on this node: {reason}; {fix}", .choice.as_str())]
pub struct BackendError {
    /// The configured choice.
    pub choice: GpuBackendChoice,
    /// What is missing.
    pub reason: String,
    /// What to do.
    pub fix: &'static str,
}

/// Picks the backend for `choice`. An explicit choice that is unusable is an error (never a silent
/// fallback); `Auto` takes the driver API, else `cuda-checkpoint`, else CRIU's plugin, else
/// [`GpuBackend::Off`] with every reason.
pub fn select_backend(choice: GpuBackendChoice, probe: &dyn BackendProbe) -> Result<GpuBackend, BackendError> {
    let driver = |driver| GpuBackend::Driver { driver, criu_plugin: probe.criu_plugin().ok() };
    let unusable = |reason, fix| BackendError { choice, reason, fix };
    match choice {
        GpuBackendChoice::Off => Ok(GpuBackend::Off { reason: "GPU checkpointing is switched off (gpu_backend = off)".into() }),
        GpuBackendChoice::DriverApi => probe.driver_api().map(driver).map_err(|r| {
            unusable(r, "install NVIDIA driver 570 or newer, or set gpu_backend to auto or cuda-checkpoint")
        }),
        GpuBackendChoice::Cli => probe.cli().map(driver).map_err(|r| {
            unusable(r, "install NVIDIA's cuda-checkpoint utility on PATH, or set gpu_backend to auto or driver-api")
        }),
        GpuBackendChoice::CriuPlugin => probe.criu_plugin().map(|plugin| GpuBackend::CriuPlugin { plugin }).map_err(|r| {
            unusable(r, "install CRIU's cuda_plugin.so into that directory (or point CRIU_LIBS_DIR at it), or set gpu_backend to auto")
        }),
        GpuBackendChoice::Auto => {
            let api = match probe.driver_api() {
                Ok(d) => return Ok(driver(d)),
                Err(e) => e,
            };
            let cli = match probe.cli() {
                Ok(d) => return Ok(driver(d)),
                Err(e) => e,
            };
            match probe.criu_plugin() {
                Ok(plugin) => Ok(GpuBackend::CriuPlugin { plugin }),
                Err(plugin) => Ok(GpuBackend::Off {
                    reason: format!(
                        "no GPU checkpoint backend on this node: driver-api: {api}; cuda-checkpoint: {cli}; criu-plugin: {plugin}"
                    ),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP: &str = "  -j|--shell-job        allow one to dump and restore shell jobs\n  \
                        -L|--libdir           path to a plugin directory (by default /usr/lib/criu/)\n";

    #[test]
    fn plugin_dir_follows_criu_precedence() {
        let explicit = CriuPluginDir::resolve(Some(Path::new("/x")), Some("/env".into()), Some(HELP));
        assert_eq!(explicit, CriuPluginDir { path: "/x".into(), source: PluginDirSource::Libdir });
        let env = CriuPluginDir::resolve(None, Some("/env".into()), Some(HELP));
        assert_eq!(env, CriuPluginDir { path: "/env".into(), source: PluginDirSource::Environment });
        let compiled = CriuPluginDir::resolve(None, Some("".into()), Some(HELP));
        assert_eq!(compiled, CriuPluginDir { path: "/usr/lib/criu/".into(), source: PluginDirSource::CompiledIn });
        let fallback = CriuPluginDir::resolve(None, None, Some("no such line"));
        assert_eq!(fallback, CriuPluginDir { path: CRIU_DEFAULT_PLUGIN_DIR.into(), source: PluginDirSource::Default });
    }

    #[test]
    fn choices_have_config_names() {
        for choice in [
            GpuBackendChoice::Auto,
            GpuBackendChoice::DriverApi,
            GpuBackendChoice::Cli,
            GpuBackendChoice::CriuPlugin,
            GpuBackendChoice::Off,
        ] {
            let json = serde_json::to_string(&choice).unwrap();
            assert_eq!(json, format!("\"{}\"", choice.as_str()));
            assert_eq!(serde_json::from_str::<GpuBackendChoice>(&json).unwrap(), choice);
        }
    }
}
