//! The shim's configuration file and the runtime options containerd passes with each task.
//!
//! The file is TOML; every key is optional and the defaults work with no file at all:
//!
//! ```toml
//! runc_binary = "runc"                 # looked up on PATH unless absolute
//! criu_binary = "/usr/local/sbin/criu" # default: `criu` on PATH
//! runc_root = "/run/containerd/runc"   # the containerd namespace is appended
//! log_level = "info"                   # a tracing filter: "debug", "kybernate_shim=trace", ...
//! systemd_cgroup = false
//! runc_timeout = "60s"                 # a runc lifecycle command (create, kill, state, …) that hangs is killed
//! restore_timeout_secs = 600           # a hung CRIU restore is killed after this long
//! checkpoint_on_stop = false           # checkpoint every container of this runtime when stopped
//! checkpoint_dir = "/var/lib/kybernate/checkpoints"  # node checkpoint directory
//! checkpoint_mode = "disk"             # disk | diskless (into memory, then straight to the store)
//! diskless_dir = "/dev/shm/kybernate"  # the memory (tmpfs) a diskless checkpoint is written into
//! checkpoint_budget = "2m"             # a checkpoint on stop that takes longer is abandoned
//! pod_checkpoint_window = "30s"        # stops of a pod's containers this close share a pod checkpoint
//! keep_bundles = 3                     # sealed bundles kept per container in checkpoint_dir
//! failed_bundle_grace = "24h"          # FAILED bundles are removed this long after they failed
//! restore_dir = "/var/lib/kybernate/restore"  # where remote bundles are fetched for a restore
//! sidecar_binary = "kybernate-sidecar" # fetches remote bundles (`kybernate-sidecar pull`)
//! fetch_timeout = "10m"                # a fetch that takes longer is killed and the Create fails
//! gpu_backend = "auto"                 # auto | driver-api | cuda-checkpoint | criu-plugin | off
//! signing_key = "/etc/kybernate/keys/signing.key"   # signs every manifest this node seals
//! trusted_keys = ["/etc/kybernate/keys/trusted"]    # public keys (files, or directories of *.pub)
//! allow_unsigned = false               # restore bundles that no trusted key signed
//! restore_roots = ["/var/lib/kybernate/checkpoints", "file:///var/lib/kybernate/store"]
//! tenant_grants = []                   # [{ from = "k8s/a", to = "k8s/b" }]
//! grant_keys = []                      # public keys whose restore grants are accepted (the operator's)
//! ```
//!
//! Its path is the `ConfigPath` of the runtime options (`runtimeoptions.v1.Options`, as CRI and
//! `ctr run --runtime-config-path` send them), or [`DEFAULT_CONFIG_PATH`]. containerd's runc options
//! (`containerd.runc.v1.Options`) are understood too and override the file where they are set.

use std::path::{Path, PathBuf};
use std::time::Duration;

use checkpoint_core::gpu::GpuBackendChoice;
use checkpoint_core::roots::RestoreRoots;
use checkpoint_core::tenant::Tenant;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message as _;
use containerd_shim::protos::shim::oci::Options as RuncOptions;
use serde::Deserialize;

use crate::error::{Result, ShimError};

/// Where the configuration is read from when the runtime options name no file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kybernate/config.toml";
/// runc's state root when neither the file nor the runtime options set one (as containerd's runc shim).
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";
/// Where diskless checkpoints are written unless the file says otherwise (tmpfs on Linux).
pub const DEFAULT_DISKLESS_DIR: &str = "/dev/shm/kybernate";
/// Where remote bundles are fetched for a restore unless the file says otherwise.
pub const DEFAULT_RESTORE_DIR: &str = "/var/lib/kybernate/restore";
/// The time budget of a checkpoint on stop unless the file says otherwise.
pub const DEFAULT_CHECKPOINT_BUDGET: Duration = Duration::from_secs(120);
/// How long a pod checkpoint stays open unless the file says otherwise.
pub const DEFAULT_POD_CHECKPOINT_WINDOW: Duration = Duration::from_secs(30);
/// How long a fetch may take unless the file says otherwise.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a FAILED bundle stays unless the file says otherwise.
pub const DEFAULT_FAILED_BUNDLE_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Every value `gpu_backend` accepts.
pub const GPU_BACKENDS: [GpuBackendChoice; 5] = [
    GpuBackendChoice::Auto,
    GpuBackendChoice::DriverApi,
    GpuBackendChoice::Cli,
    GpuBackendChoice::CriuPlugin,
    GpuBackendChoice::Off,
];

/// The configuration file, with defaults for every key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    /// The runc binary (a bare name is looked up on PATH).
    pub runc_binary: PathBuf,
    /// The CRIU binary; `None` uses `criu` from PATH.
    pub criu_binary: Option<PathBuf>,
    /// runc's state root; the containerd namespace is appended.
    pub runc_root: PathBuf,
    /// A `tracing` filter directive for the shim's log.
    pub log_level: String,
    /// Let runc manage cgroups through systemd.
    pub systemd_cgroup: bool,
    /// How long a runc lifecycle command (`create`, `start`, `kill`, `state`, `delete`, …) may run
    /// before it is killed and the request fails naming it.
    pub runc_timeout: String,
    /// Seconds after which a CRIU restore that has not finished is killed.
    pub restore_timeout_secs: u64,
    /// Checkpoint every container of this runtime handler when it is stopped, unless its
    /// `kybernate.io/checkpoint-on-stop` annotation says `"false"`.
    pub checkpoint_on_stop: bool,
    /// The node checkpoint directory where checkpoints on stop are written.
    pub checkpoint_dir: PathBuf,
    /// Where checkpoints on stop go unless a container's `kybernate.io/checkpoint-mode` says
    /// otherwise: `disk` (sealed and fsynced in `checkpoint_dir`, shipped later by the sidecar) or
    /// `diskless` (sealed in `diskless_dir`, in memory, and pushed to the store by the sidecar before
    /// the stop returns; kept in `checkpoint_dir` when the push fails).
    pub checkpoint_mode: CheckpointMode,
    /// A memory-backed directory (tmpfs) diskless checkpoints are written into and pushed from.
    pub diskless_dir: PathBuf,
    /// How long a checkpoint on stop may take (a duration such as `90s` or `2m`); a slower one is
    /// abandoned and the container stops as it would have without Kybernate.
    pub checkpoint_budget: String,
    /// How long after the first container of a pod is checkpointed on stop the stops of its other
    /// containers still join that pod checkpoint (share its time); a later stop starts a new one.
    pub pod_checkpoint_window: String,
    /// How many sealed bundles `checkpoint_dir` keeps per container (older ones are removed after each
    /// checkpoint on stop; `PARTIAL` ones are never removed).
    pub keep_bundles: usize,
    /// How long a `FAILED` bundle (its reason) stays before it is removed.
    pub failed_bundle_grace: String,
    /// Where bundles named by a remote `kybernate.io/restore-from` reference are fetched to.
    pub restore_dir: PathBuf,
    /// The sidecar binary that fetches remote bundles (a bare name is looked up on PATH).
    pub sidecar_binary: PathBuf,
    /// How long fetching a remote bundle may take before the sidecar is killed and Create fails.
    pub fetch_timeout: String,
    /// Who checkpoints and restores the GPU state of containers that use a GPU: `auto`, `driver-api`,
    /// `cuda-checkpoint`, `criu-plugin` or `off` (see `docs/gpu.md`).
    pub gpu_backend: String,
    /// The node's ed25519 private key (PKCS#8 PEM, mode 0600) that signs every manifest it seals; its
    /// public half is trusted on this node.
    pub signing_key: PathBuf,
    /// Public keys (SPKI PEM) whose signed bundles this node restores: files, or directories whose
    /// `*.pub`/`*.pem` files are read; a path that does not exist holds none.
    pub trusted_keys: Vec<PathBuf>,
    /// Restore bundles no trusted key signed (and containerd task images without a manifest).
    pub allow_unsigned: bool,
    /// How restores go unless a container's `kybernate.io/restore-mode` says otherwise: `full`
    /// (memory restored before the container runs) or `lazy` (it runs at once while its memory is
    /// copied in; see docs/shim.md).
    pub restore_mode: RestoreMode,
    /// Where `kybernate.io/restore-from` may point: absolute directories, `file:///…` and
    /// `s3://bucket[/prefix]`. When unset: `checkpoint_dir` and the sidecar's default store.
    pub restore_roots: Option<Vec<String>>,
    /// Pairs of tenants (`k8s/<namespace>` or `containerd/<namespace>`) whose bundles may be restored
    /// across: containers of `to` may restore bundles of `from`.
    pub tenant_grants: Vec<TenantGrant>,
    /// Public keys whose restore grants (`kybernate.io/restore-grant`) are accepted: the operator's.
    pub grant_keys: Vec<PathBuf>,
}

/// Where a checkpoint on stop is written, and when it counts as done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointMode {
    /// Sealed and fsynced in the node checkpoint directory: done once it is on the node's disk.
    #[default]
    Disk,
    /// Sealed in memory (`diskless_dir`) and pushed from there to the store: done once the store
    /// holds it. Nothing is written to the node's disk unless the push fails; then the bundle is
    /// kept in the checkpoint directory, as a `disk` one, for the sidecar to ship later.
    Diskless,
}

/// How a container's memory is restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Every page is in before the container runs.
    #[default]
    Full,
    /// The container runs as soon as its processes exist; CRIU's lazy-pages daemon copies each page
    /// in when it is first touched and the rest in the background. Falls back to `Full`, with the
    /// reason logged, where the kernel lacks userfaultfd or the bundle holds GPU state.
    Lazy,
}

/// One `tenant_grants` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantGrant {
    /// Whose bundles (`k8s/<namespace>` or `containerd/<namespace>`).
    pub from: String,
    /// Who may restore them.
    pub to: String,
}

/// The node's signing key unless the file says otherwise.
pub const DEFAULT_SIGNING_KEY: &str = "/etc/kybernate/keys/signing.key";
/// The directory of trusted public keys unless the file says otherwise.
pub const DEFAULT_TRUSTED_KEYS: &str = "/etc/kybernate/keys/trusted";
/// The store the sidecar ships to unless its own config says otherwise, a restore root by default.
pub const DEFAULT_STORE: &str = "file:///var/lib/kybernate/store";

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            runc_binary: PathBuf::from("runc"),
            criu_binary: None,
            runc_root: PathBuf::from(DEFAULT_RUNC_ROOT),
            log_level: "info".into(),
            systemd_cgroup: false,
            runc_timeout: "60s".into(),
            restore_timeout_secs: checkpoint_core::DEFAULT_RESTORE_TIMEOUT.as_secs(),
            checkpoint_on_stop: false,
            checkpoint_dir: PathBuf::from(checkpoint_core::bundle::DEFAULT_CHECKPOINT_ROOT),
            checkpoint_mode: CheckpointMode::Disk,
            diskless_dir: PathBuf::from(DEFAULT_DISKLESS_DIR),
            checkpoint_budget: "2m".into(),
            pod_checkpoint_window: "30s".into(),
            keep_bundles: 3,
            failed_bundle_grace: "24h".into(),
            restore_dir: PathBuf::from(DEFAULT_RESTORE_DIR),
            sidecar_binary: PathBuf::from("kybernate-sidecar"),
            fetch_timeout: "10m".into(),
            gpu_backend: GpuBackendChoice::Auto.as_str().into(),
            signing_key: PathBuf::from(DEFAULT_SIGNING_KEY),
            trusted_keys: vec![PathBuf::from(DEFAULT_TRUSTED_KEYS)],
            allow_unsigned: false,
            restore_mode: RestoreMode::Full,
            restore_roots: None,
            tenant_grants: Vec::new(),
            grant_keys: Vec::new(),
        }
    }
}

impl ShimConfig {
    /// Parses the text of a configuration file; `path` only appears in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        let config: ShimConfig = toml::from_str(text).map_err(|e| {
            ShimError::InvalidArgument(format!(
                "invalid shim config {}: {}; every key is optional, see docs/shim.md for the keys",
                path.display(),
                e.message()
            ))
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Reads the file at `path`. A missing file yields the defaults unless `required` (a path named
    /// explicitly in the runtime options must exist).
    pub fn load(path: &Path, required: bool) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => ShimConfig::from_toml(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(ShimConfig::default()),
            Err(e) => Err(ShimError::InvalidArgument(format!(
                "cannot read shim config {}: {e}; create it or fix ConfigPath in the runtime options",
                path.display()
            ))),
        }
    }

    /// How long a restore may take.
    pub fn restore_timeout(&self) -> Duration {
        Duration::from_secs(self.restore_timeout_secs)
    }

    /// How long a checkpoint on stop may take (validated when the file was read).
    pub fn checkpoint_budget(&self) -> Duration {
        humantime::parse_duration(&self.checkpoint_budget).unwrap_or(DEFAULT_CHECKPOINT_BUDGET)
    }

    /// How long a pod checkpoint stays open for the stops of the pod's other containers (validated
    /// when the file was read).
    pub fn pod_checkpoint_window(&self) -> Duration {
        humantime::parse_duration(&self.pod_checkpoint_window).unwrap_or(DEFAULT_POD_CHECKPOINT_WINDOW)
    }

    /// How long a runc lifecycle command may take (validated when the file was read).
    pub fn runc_timeout(&self) -> Duration {
        humantime::parse_duration(&self.runc_timeout).unwrap_or(checkpoint_core::runc::DEFAULT_COMMAND_TIMEOUT)
    }

    /// How long a fetch may take (validated when the file was read).
    pub fn fetch_timeout(&self) -> Duration {
        humantime::parse_duration(&self.fetch_timeout).unwrap_or(DEFAULT_FETCH_TIMEOUT)
    }

    /// How long a FAILED bundle stays (validated when the file was read).
    pub fn failed_bundle_grace(&self) -> Duration {
        humantime::parse_duration(&self.failed_bundle_grace).unwrap_or(DEFAULT_FAILED_BUNDLE_GRACE)
    }

    /// Where restores may come from: `restore_roots`, or `checkpoint_dir` and the default store
    /// (validated when the file was read).
    pub fn restore_roots(&self) -> RestoreRoots {
        let roots = match &self.restore_roots {
            Some(roots) => roots.clone(),
            None => vec![self.checkpoint_dir.display().to_string(), DEFAULT_STORE.to_string()],
        };
        RestoreRoots::parse(&roots).unwrap_or_default()
    }

    /// The configured tenant grants, parsed (validated when the file was read).
    pub fn tenant_grants(&self) -> Vec<(Tenant, Tenant)> {
        self.tenant_grants
            .iter()
            .filter_map(|g| Some((Tenant::parse(&g.from).ok()?, Tenant::parse(&g.to).ok()?)))
            .collect()
    }

    /// The GPU backend choice (validated when the file was read).
    pub fn gpu_backend(&self) -> GpuBackendChoice {
        GPU_BACKENDS.into_iter().find(|c| c.as_str() == self.gpu_backend).unwrap_or_default()
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let invalid =
            |what: String| ShimError::InvalidArgument(format!("invalid shim config {}: {what}", path.display()));
        if self.runc_binary.as_os_str().is_empty() {
            return Err(invalid("runc_binary is empty; remove the key to use runc from PATH".into()));
        }
        if self.runc_root.is_relative() {
            return Err(invalid(format!("runc_root {:?} must be an absolute path", self.runc_root)));
        }
        if self.restore_timeout_secs == 0 {
            return Err(invalid("restore_timeout_secs must be at least 1".into()));
        }
        match humantime::parse_duration(&self.checkpoint_budget) {
            Ok(d) if d.is_zero() => return Err(invalid(
                "checkpoint_budget must be longer than zero; set checkpoint_on_stop = false to turn checkpoints off"
                    .into(),
            )),
            Ok(_) => {}
            Err(e) => {
                return Err(invalid(format!(
                    "checkpoint_budget {:?} is not a duration ({e}); write it like \"90s\" or \"2m\"",
                    self.checkpoint_budget
                )))
            }
        }
        for (key, value) in [
            ("pod_checkpoint_window", &self.pod_checkpoint_window),
            ("failed_bundle_grace", &self.failed_bundle_grace),
            ("fetch_timeout", &self.fetch_timeout),
            ("runc_timeout", &self.runc_timeout),
        ] {
            if let Err(e) = humantime::parse_duration(value) {
                return Err(invalid(format!(
                    "{key} {value:?} is not a duration ({e}); write it like \"30s\" or \"24h\""
                )));
            }
        }
        if self.keep_bundles == 0 {
            return Err(invalid(
                "keep_bundles must be at least 1: the newest bundle is the one a restore takes".into(),
            ));
        }
        for (key, path) in [("checkpoint_dir", &self.checkpoint_dir), ("restore_dir", &self.restore_dir)] {
            if path.is_relative() {
                return Err(invalid(format!("{key} {path:?} must be an absolute path")));
            }
        }
        if !GPU_BACKENDS.iter().any(|c| c.as_str() == self.gpu_backend) {
            let names: Vec<&str> = GPU_BACKENDS.iter().map(|c| c.as_str()).collect();
            return Err(invalid(format!(
                "gpu_backend {:?} is not a GPU backend; use one of {}",
                self.gpu_backend,
                names.join(", ")
            )));
        }
        if let Err(e) = RestoreRoots::parse(self.restore_roots.as_deref().unwrap_or_default()) {
            return Err(invalid(format!("restore_roots: {e}")));
        }
        for grant in &self.tenant_grants {
            for tenant in [&grant.from, &grant.to] {
                Tenant::parse(tenant).map_err(|e| invalid(format!("tenant_grants: {e}")))?;
            }
        }
        for (key, path) in [("signing_key", &self.signing_key)]
            .into_iter()
            .chain(self.trusted_keys.iter().map(|p| ("trusted_keys", p)))
            .chain(self.grant_keys.iter().map(|p| ("grant_keys", p)))
        {
            if path.is_relative() {
                return Err(invalid(format!("{key} {path:?} must be an absolute path")));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .map_err(|e| invalid(format!("log_level {:?} is not a tracing filter: {e}", self.log_level)))?;
        Ok(())
    }
}

/// `runtimeoptions.v1.Options`: what CRI and `ctr --runtime-config-path` send to non-runc runtimes.
#[derive(Clone, PartialEq, prost::Message)]
struct GenericRuntimeOptions {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(string, tag = "2")]
    config_path: String,
}

/// The runtime options of one task, decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeOptions {
    /// Configuration file named by the options (must exist when named).
    pub config_path: Option<PathBuf>,
    /// containerd's runc options, when those were sent.
    pub runc: Option<RuncOptions>,
}

impl RuntimeOptions {
    /// Decodes the `options` of a CreateTaskRequest (absent options are fine).
    pub fn decode(any: Option<&Any>) -> Result<Self> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
            return Ok(RuntimeOptions::default());
        };
        let name = type_name(&any.type_url);
        match name {
            "runtimeoptions.v1.Options" => {
                let opts = <GenericRuntimeOptions as prost::Message>::decode(any.value.as_slice())
                    .map_err(|e| ShimError::InvalidArgument(format!("runtime options {name} do not decode: {e}")))?;
                let config_path = (!opts.config_path.is_empty()).then(|| PathBuf::from(opts.config_path));
                Ok(RuntimeOptions { config_path, runc: None })
            }
            "containerd.runc.v1.Options" => {
                let opts = RuncOptions::parse_from_bytes(&any.value)
                    .map_err(|e| ShimError::InvalidArgument(format!("runtime options {name} do not decode: {e}")))?;
                Ok(RuntimeOptions { config_path: None, runc: Some(opts) })
            }
            other => Err(ShimError::InvalidArgument(format!(
                "runtime options of type {other:?} are not understood by io.containerd.kybernate.v1: \
                 send runtimeoptions.v1.Options (ConfigPath) or containerd.runc.v1.Options"
            ))),
        }
    }

    /// The configuration these options select: the file they name (which must exist) or the default
    /// file (which may be absent), with the runc options applied on top.
    pub fn config(&self) -> Result<ShimConfig> {
        let mut config = match &self.config_path {
            Some(path) => ShimConfig::load(path, true)?,
            None => ShimConfig::load(Path::new(DEFAULT_CONFIG_PATH), false)?,
        };
        if let Some(runc) = &self.runc {
            if !runc.binary_name.is_empty() {
                config.runc_binary = PathBuf::from(&runc.binary_name);
            }
            if !runc.root.is_empty() {
                config.runc_root = PathBuf::from(&runc.root);
            }
            config.systemd_cgroup |= runc.systemd_cgroup;
        }
        Ok(config)
    }
}

/// The message name of a type URL (`type.googleapis.com/a.b.C` and `a.b.C` both give `a.b.C`).
pub fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        Any { type_url: type_url.into(), value, ..Default::default() }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = ShimConfig::from_toml("", Path::new("x.toml")).unwrap();
        assert_eq!(config, ShimConfig::default());
        assert_eq!(config.runc_root, Path::new(DEFAULT_RUNC_ROOT));
        assert_eq!(config.restore_timeout(), checkpoint_core::DEFAULT_RESTORE_TIMEOUT);
        assert_eq!(config.gpu_backend(), GpuBackendChoice::Auto);
    }

    #[test]
    fn keys_are_read_and_unknown_ones_refused() {
        let text =
            "runc_binary = \"/opt/runc\"\ncriu_binary = \"/opt/criu\"\nrunc_root = \"/run/k\"\nlog_level = \"debug\"\n\
                    systemd_cgroup = true\nrestore_timeout_secs = 5\n";
        let config = ShimConfig::from_toml(text, Path::new("x.toml")).unwrap();
        assert_eq!(config.runc_binary, Path::new("/opt/runc"));
        assert_eq!(config.criu_binary.as_deref(), Some(Path::new("/opt/criu")));
        assert!(config.systemd_cgroup);
        assert_eq!(config.restore_timeout(), Duration::from_secs(5));
        assert_eq!(config.checkpoint_budget(), DEFAULT_CHECKPOINT_BUDGET);

        let config = ShimConfig::from_toml(
            "checkpoint_on_stop = true\ncheckpoint_budget = \"250ms\"\ncheckpoint_dir = \"/c\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert!(config.checkpoint_on_stop);
        assert_eq!(config.checkpoint_budget(), Duration::from_millis(250));
        assert_eq!(config.checkpoint_dir, Path::new("/c"));
        for choice in GPU_BACKENDS {
            let config =
                ShimConfig::from_toml(&format!("gpu_backend = \"{}\"", choice.as_str()), Path::new("x.toml")).unwrap();
            assert_eq!(config.gpu_backend(), choice);
        }
        let err = ShimConfig::from_toml("gpu_backend = \"nvidia\"", Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("gpu_backend") && err.contains("driver-api, cuda-checkpoint"), "{err}");
        let config = ShimConfig::from_toml("pod_checkpoint_window = \"5s\"", Path::new("x.toml")).unwrap();
        assert_eq!(config.pod_checkpoint_window(), Duration::from_secs(5));
        assert_eq!(ShimConfig::default().pod_checkpoint_window(), DEFAULT_POD_CHECKPOINT_WINDOW);
        for bad in [
            "checkpoint_budget = \"soon\"",
            "checkpoint_budget = \"0s\"",
            "restore_dir = \"rel\"",
            "pod_checkpoint_window = \"later\"",
            "failed_bundle_grace = \"never\"",
            "runc_timeout = \"forever\"",
            "keep_bundles = 0",
            "restore_roots = [\"relative\"]",
            "tenant_grants = [{ from = \"team-a\", to = \"k8s/b\" }]",
            "signing_key = \"key.pem\"",
        ] {
            let err = ShimConfig::from_toml(bad, Path::new("x.toml")).unwrap_err().to_string();
            assert!(err.contains(bad.split(' ').next().unwrap()), "{bad}: {err}");
        }

        let err = ShimConfig::from_toml("runc_bin = \"x\"", Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("runc_bin") && err.contains("x.toml"), "{err}");
        let err = ShimConfig::from_toml("runc_root = \"rel\"", Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("absolute"), "{err}");
        let err = ShimConfig::from_toml("log_level = \"=[\"", Path::new("x.toml")).unwrap_err().to_string();
        assert!(err.contains("log_level"), "{err}");
    }

    #[test]
    fn restore_roots_default_to_the_checkpoint_dir_and_store_and_grants_parse() {
        use checkpoint_core::roots::Root;
        let config = ShimConfig::from_toml("checkpoint_dir = \"/c\"", Path::new("x.toml")).unwrap();
        let store = Root::Dir("/var/lib/kybernate/store".into());
        assert_eq!(config.restore_roots(), RestoreRoots(vec![Root::Dir("/c".into()), store]));
        let text = "restore_roots = [\"s3://b/p\"]\ntenant_grants = [{ from = \"k8s/a\", to = \"containerd/b\" }]\n";
        let config = ShimConfig::from_toml(text, Path::new("x.toml")).unwrap();
        assert_eq!(config.restore_roots(), RestoreRoots(vec![Root::S3 { bucket: "b".into(), prefix: "p".into() }]));
        let grant = (Tenant::Kubernetes("a".into()), Tenant::Containerd("b".into()));
        assert_eq!(config.tenant_grants(), vec![grant]);
    }

    #[test]
    fn the_shipped_example_lists_the_defaults() {
        let text = include_str!("../../deploy/containerd/config.toml");
        let config = ShimConfig::from_toml(text, Path::new("deploy/containerd/config.toml")).unwrap();
        assert_eq!(config, ShimConfig::default());
    }

    #[test]
    fn missing_file_is_fine_unless_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        assert_eq!(ShimConfig::load(&path, false).unwrap(), ShimConfig::default());
        assert!(matches!(ShimConfig::load(&path, true), Err(ShimError::InvalidArgument(_))));
    }

    #[test]
    fn runtime_options_decode() {
        assert_eq!(RuntimeOptions::decode(None).unwrap(), RuntimeOptions::default());

        let generic = GenericRuntimeOptions { type_url: String::new(), config_path: "/etc/k.toml".into() };
        let value = prost::Message::encode_to_vec(&generic);
        let opts = RuntimeOptions::decode(Some(&any("runtimeoptions.v1.Options", value))).unwrap();
        assert_eq!(opts.config_path.as_deref(), Some(Path::new("/etc/k.toml")));

        let runc = RuncOptions { binary_name: "/usr/bin/runc".into(), root: "/run/r".into(), ..Default::default() };
        let value = runc.write_to_bytes().unwrap();
        let opts = RuntimeOptions::decode(Some(&any("type.googleapis.com/containerd.runc.v1.Options", value))).unwrap();
        let config =
            ShimConfig { runc_binary: "/usr/bin/runc".into(), runc_root: "/run/r".into(), ..Default::default() };
        // the default file may exist on a developer machine; only compare what the options set
        let effective = opts.config().unwrap();
        assert_eq!((effective.runc_binary, effective.runc_root), (config.runc_binary, config.runc_root));

        let err = RuntimeOptions::decode(Some(&any("foo.Bar", vec![1]))).unwrap_err();
        assert!(err.to_string().contains("foo.Bar"));
    }
}
