//! The Kubernetes path for the end-to-end tests: a private containerd with the CRI plugin and the
//! `kybernate` handler (configured by `deploy/containerd/cri-kybernate.toml`), a CRI v1 gRPC client on
//! its socket, and helpers for pods, containers, their logs, and the checkpoint bundles they leave.
//!
//! No registry and no CNI are needed: the pause and workload images are built from busybox-static and
//! imported into the `k8s.io` namespace, and every pod uses the host's network.

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, ImageStatusRequest, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StatusRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    busybox_oci_image_running, kybernate_shim_binary, kybernate_sidecar_binary, wait_for, Containerd,
    ContainerdOptions, BUSYBOX_IMAGE, KYBERNATE_RUNTIME,
};

/// The CRI runtime handler (RuntimeClass handler) that selects Kybernate's shim.
pub const CRI_HANDLER: &str = "kybernate";
/// The containerd namespace the CRI plugin keeps its containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The pod sandbox ("pause") image, built locally: busybox sleeping until it is killed.
pub const PAUSE_IMAGE: &str = "docker.io/kybernate/pause:test";
/// The deployable containerd snippet that registers the handler; the harness starts containerd with it.
pub const CRI_SNIPPET: &str = include_str!("../../deploy/containerd/cri-kybernate.toml");
/// The TOML path of the CRI plugin in a containerd config (version 2).
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";

/// Annotation that opts a pod or container in to checkpoint on stop.
pub const CHECKPOINT_ON_STOP: &str = "kybernate.io/checkpoint-on-stop";
/// Annotation naming the bundle a container is restored from at start.
pub const RESTORE_FROM: &str = "kybernate.io/restore-from";
/// Annotation choosing what happens when the bundle cannot be restored (`fail` or `fallback-fresh`).
pub const RESTORE_POLICY: &str = "kybernate.io/restore-policy";

/// A counter for CRI containers: writes `$TOKEN` to `/state/token` once, then prints an incrementing
/// counter to stdout and into `/state/counter` ten times a second. The counter lives only in the
/// shell's memory, so a restored container continues it and a fresh one starts at 1.
pub const CRI_COUNTER_SCRIPT: &str =
    "echo \"$TOKEN\" > /state/token; i=0; while :; do i=$((i+1)); echo $i; echo $i > /state/counter.new; mv /state/counter.new /state/counter; sleep 0.1; done";

/// How long one CRI call may take unless the caller says otherwise.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A private containerd with the CRI plugin serving the `kybernate` handler, and a CRI client.
///
/// Each instance has its own checkpoint directory and pod log directory, and a Kubernetes namespace of
/// its own for its pods. On drop, every pod it ran and not yet removed is stopped and removed through
/// CRI, then containerd is stopped and everything left over is cleaned up (see [`Containerd`]).
pub struct Cri {
    /// The shim's `checkpoint_dir`: where checkpoint on stop writes bundles.
    pub checkpoint_dir: PathBuf,
    /// Where pods' container logs are written (one directory per pod).
    pub log_dir: PathBuf,
    /// The sidecar binary; the shim runs it through a wrapper that adds [`Cri::set_sidecar_env`].
    pub sidecar: PathBuf,
    /// The environment file the shim's sidecar wrapper sources.
    sidecar_env: PathBuf,
    /// The Kubernetes namespace of this instance's pods.
    pub k8s_namespace: String,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    rt: tokio::runtime::Runtime,
    pods: Mutex<Vec<String>>,
    /// The containerd serving CRI (namespace [`CRI_NAMESPACE`]). Dropped after the pods.
    pub containerd: Containerd,
    /// The cgroup parent of this instance's pods, removed after containerd is gone.
    cgroup_parent: CgroupParent,
}

/// A cgroup (a path below the root of each hierarchy) that the pods of one [`Cri`] live under, as the
/// kubelet's `kubepods` does; on drop it is removed from every hierarchy, once runc removed the
/// containers' cgroups below it.
struct CgroupParent(String);

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let root = Path::new("/sys/fs/cgroup");
        let hierarchies = fs::read_dir(root).into_iter().flatten().flatten().map(|e| e.path());
        for dir in hierarchies.chain([root.to_path_buf()]).map(|h| h.join(self.0.trim_start_matches('/'))) {
            let mut dirs: Vec<PathBuf> = dirs_under(&dir);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                if let Err(e) = fs::remove_dir(&d) {
                    eprintln!("cleanup: removing cgroup {}: {e}", d.display());
                }
            }
        }
    }
}

/// `dir` and every directory below it (empty when `dir` does not exist).
fn dirs_under(dir: &Path) -> Vec<PathBuf> {
    if !dir.is_dir() {
        return Vec::new();
    }
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let subdirs =
            fs::read_dir(&out[i]).into_iter().flatten().flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir()));
        let subdirs: Vec<PathBuf> = subdirs.map(|e| e.path()).collect();
        out.extend(subdirs);
        i += 1;
    }
    out
}

/// A pod sandbox that [`Cri::run_pod`] started.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The sandbox id CRI returned.
    pub id: String,
    /// The pod's (unique) name.
    pub name: String,
    /// The pod's Kubernetes namespace.
    pub namespace: String,
    /// The configuration it was run with (CreateContainer repeats it).
    pub config: PodSandboxConfig,
}

/// One line of a CRI container log (`<RFC 3339 time> <stream> <tag> <message>`, as the kubelet reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// When the runtime received the output.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `F` (a full line) or `P` (part of a line that continues in the next entry).
    pub tag: String,
    /// The output, without the newline.
    pub message: String,
}

/// Parses a CRI container log; fails on a line that is not in the kubelet's format.
pub fn parse_cri_log(text: &str) -> Result<Vec<LogLine>> {
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
                bail!("CRI log line {line:?} is not `<time> <stream> <tag> <message>`");
            };
            ensure!(time.contains('T'), "CRI log line {line:?} does not start with an RFC 3339 time");
            ensure!(matches!(stream, "stdout" | "stderr"), "CRI log line {line:?} names no stream");
            ensure!(matches!(tag.split(':').next(), Some("F" | "P")), "CRI log line {line:?} has no F/P tag");
            Ok(LogLine {
                time: time.into(),
                stream: stream.into(),
                tag: tag.into(),
                message: parts.next().unwrap_or_default().into(),
            })
        })
        .collect()
}

/// The whole lines a container wrote to `stream`, its partial entries joined.
pub fn log_messages(lines: &[LogLine], stream: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut partial = String::new();
    for line in lines.iter().filter(|l| l.stream == stream) {
        partial.push_str(&line.message);
        if !line.tag.starts_with('P') {
            out.push(std::mem::take(&mut partial));
        }
    }
    out
}

/// The numbers a [`CRI_COUNTER_SCRIPT`] container printed, in order.
pub fn counter_values(lines: &[LogLine]) -> Vec<u64> {
    log_messages(lines, "stdout").iter().filter_map(|m| m.trim().parse().ok()).collect()
}

/// Every file under `dir`, recursively (an empty list when `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Unique suffixes for pod names and uids within this test process.
fn next_serial() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The containerd config (version 2) tables of the CRI plugin: the deployable snippet, with
/// `ConfigPath` pointing at `shim_config`, plus what a private instance needs (local sandbox image,
/// no OOM score below containerd's, no AppArmor, an ephemeral stream port, CNI dirs of its own, and
/// the handler as the default, as no other runtime is configured).
fn cri_plugin_config(dir: &Path, shim_config: &Path) -> Result<String> {
    let mut config: toml::Table =
        toml::from_str(CRI_SNIPPET).context("parsing deploy/containerd/cri-kybernate.toml")?;
    ensure!(
        config.remove("version").and_then(|v| v.as_integer()) == Some(2),
        "the CRI snippet is not config version 2"
    );
    let cri = config
        .get_mut("plugins")
        .and_then(|p| p.get_mut(CRI_PLUGIN))
        .and_then(toml::Value::as_table_mut)
        .context("the CRI snippet has no [plugins.\"io.containerd.grpc.v1.cri\"] tables")?;
    let handler = cri
        .get_mut("containerd")
        .and_then(|c| c.get_mut("runtimes"))
        .and_then(|r| r.get_mut(CRI_HANDLER))
        .and_then(toml::Value::as_table_mut)
        .with_context(|| format!("the CRI snippet registers no handler {CRI_HANDLER}"))?;
    ensure!(
        handler.get("runtime_type").and_then(toml::Value::as_str) == Some(KYBERNATE_RUNTIME),
        "the CRI snippet's handler {CRI_HANDLER} does not use {KYBERNATE_RUNTIME}"
    );
    let options = handler
        .get_mut("options")
        .and_then(toml::Value::as_table_mut)
        .context("the CRI snippet's handler has no options table")?;
    ensure!(options.contains_key("ConfigPath"), "the CRI snippet's handler options have no ConfigPath");
    options.insert("ConfigPath".into(), shim_config.display().to_string().into());

    let cni = dir.join("cni");
    let extra: toml::Table = toml::from_str(&format!(
        "sandbox_image = {PAUSE_IMAGE:?}\n\
         # no CAP_SYS_RESOURCE here: never ask for an OOM score below containerd's own\n\
         restrict_oom_score_adj = true\n\
         disable_apparmor = true\n\
         stream_server_address = \"127.0.0.1\"\n\
         stream_server_port = \"0\"\n\
         [cni]\n  bin_dir = {bin:?}\n  conf_dir = {conf:?}\n",
        bin = cni.join("bin").display().to_string(),
        conf = cni.join("conf").display().to_string(),
    ))?;
    for (key, value) in extra {
        cri.insert(key, value);
    }
    // CRI refuses to load when its default runtime (runc) is not among the configured ones.
    let containerd = cri.get_mut("containerd").and_then(toml::Value::as_table_mut).context("checked above")?;
    containerd.insert("default_runtime_name".into(), CRI_HANDLER.into());
    Ok(toml::to_string(&config)?)
}

impl Cri {
    /// Builds the shim, starts containerd with the CRI plugin and the `kybernate` handler, imports the
    /// pause and busybox images into [`CRI_NAMESPACE`], and waits until CRI serves requests and sees
    /// both images. Fails (never skips) when containerd, runc or CRIU are missing.
    pub fn start() -> Result<Self> {
        let shim = kybernate_shim_binary()?;
        let dir = tempfile::Builder::new().prefix("kt-").tempdir_in("/tmp")?;
        let d = dir.path().to_path_buf();
        let checkpoint_dir = d.join("checkpoints");
        let log_dir = d.join("pods");
        for sub in [&checkpoint_dir, &log_dir, &d.join("restore"), &d.join("cni/bin"), &d.join("cni/conf")] {
            fs::create_dir_all(sub)?;
        }
        // The shim fetches remote bundles with the sidecar; the wrapper gives it the test's store settings.
        let sidecar = kybernate_sidecar_binary()?;
        let sidecar_env = d.join("sidecar.env");
        let wrapper = d.join("kybernate-sidecar");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\n[ -f {env} ] && . {env}\nexec {bin} \"$@\"\n",
                env = sidecar_env.display(),
                bin = sidecar.display()
            ),
        )?;
        fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let options = ContainerdOptions {
            namespace: Some(CRI_NAMESPACE.into()),
            // the path Containerd::start_with gives the shim config
            cri_plugin: Some(cri_plugin_config(&d, &d.join("kybernate.toml"))?),
            shim_config: format!(
                "checkpoint_dir = {:?}\nrestore_dir = {:?}\nsidecar_binary = {:?}\nrestore_roots = [{:?}, \"s3://{}\"]\n",
                checkpoint_dir.display().to_string(),
                d.join("restore").display().to_string(),
                wrapper.display().to_string(),
                d.display().to_string(),
                crate::s3::BUCKET,
            ),
        };
        let suffix = d.file_name().and_then(|n| n.to_str()).unwrap_or("x").trim_start_matches("kt-").to_lowercase();
        let containerd = Containerd::start_with(dir, &shim, &options)?;
        ensure!(
            containerd.shim_config == d.join("kybernate.toml"),
            "the shim config is at {}, not where the CRI config names it",
            containerd.shim_config.display()
        );
        for (name, cmd) in [(PAUSE_IMAGE, &["sleep", "2147483647"][..]), (BUSYBOX_IMAGE, &["sh"][..])] {
            let tar = d.join(format!("{}.tar", name.rsplit('/').next().unwrap_or("image").replace(':', "-")));
            fs::write(&tar, busybox_oci_image_running(name, cmd)?)?;
            containerd.ctr_ok(&["images", "import", tar.to_str().context("temp path")?])?;
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let socket = containerd.socket.clone();
        // The URI is a placeholder that tonic requires; the connector dials the unix socket.
        let channel = rt
            .block_on(Endpoint::try_from("http://[::]:50051")?.connect_with_connector(tower::service_fn(
                move |_: Uri| {
                    let socket = socket.clone();
                    async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
                },
            )))
            .context("connecting to containerd's CRI socket")?;
        let cri = Cri {
            checkpoint_dir,
            log_dir,
            sidecar,
            sidecar_env,
            k8s_namespace: format!("kt-{suffix}"),
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            rt,
            pods: Mutex::new(Vec::new()),
            containerd,
            cgroup_parent: CgroupParent(format!("/kt-{suffix}")),
        };
        let ready = wait_for("CRI to report the runtime ready and both images", Duration::from_secs(60), || {
            let status = cri
                .call("Status", Duration::from_secs(5), |mut c| async move {
                    c.status(StatusRequest { verbose: false }).await
                })
                .ok()?;
            let runtime_ready = status.status?.conditions.iter().any(|c| c.r#type == "RuntimeReady" && c.status);
            let images = [PAUSE_IMAGE, BUSYBOX_IMAGE].iter().all(|image| {
                let mut client = cri.images.clone();
                let request = ImageStatusRequest {
                    image: Some(ImageSpec { image: image.to_string(), ..Default::default() }),
                    verbose: false,
                };
                cri.rt
                    .block_on(async move {
                        tokio::time::timeout(Duration::from_secs(5), client.image_status(request)).await
                    })
                    .is_ok_and(|r| r.is_ok_and(|r| r.into_inner().image.is_some()))
            });
            (runtime_ready && images).then_some(())
        });
        ready.with_context(|| format!("containerd log:\n{}", cri.containerd.log_tail(40)))?;
        Ok(cri)
    }

    /// The last `n` lines of containerd's log (with the shims' logs), for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.containerd.log_tail(n)
    }

    /// Sends one RuntimeService request and waits at most `timeout` for the answer.
    fn call<T, F>(
        &self,
        what: &str,
        timeout: Duration,
        request: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T>
    where
        F: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.runtime.clone();
        match self.rt.block_on(async move { tokio::time::timeout(timeout, request(client)).await }) {
            Err(_) => bail!("CRI {what} did not answer within {timeout:?}"),
            Ok(Err(status)) => bail!("CRI {what} failed ({:?}): {}", status.code(), status.message()),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }

    /// Runs a pod sandbox with the `kybernate` handler on the host's network, named `<name>-<n>` (unique
    /// in this test process) in this instance's namespace and cgroup parent, with `annotations`. The
    /// pod is stopped and removed on drop unless [`Cri::remove_pod`] did it before.
    pub fn run_pod(&self, name: &str, annotations: &[(&str, &str)]) -> Result<Pod> {
        self.run_pod_exactly(&format!("{name}-{}", next_serial()), annotations)
    }

    /// Like [`Cri::run_pod`], named exactly `name` in [`Cri::k8s_namespace`], as a StatefulSet names
    /// its pods (the same name on every node, a new uid each time).
    pub fn run_pod_exactly(&self, name: &str, annotations: &[(&str, &str)]) -> Result<Pod> {
        let name = name.to_string();
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), next_serial());
        let log_directory = self.log_dir.join(format!("{}_{name}_{uid}", self.k8s_namespace));
        fs::create_dir_all(&log_directory)?;
        let namespaces = NamespaceOption {
            network: NamespaceMode::Node as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        };
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.clone(),
                uid,
                namespace: self.k8s_namespace.clone(),
                attempt: 0,
            }),
            log_directory: log_directory.display().to_string(),
            annotations: to_map(annotations),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.0.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: CRI_HANDLER.into() };
        let id = self
            .call("RunPodSandbox", CALL_TIMEOUT, |mut c| async move { c.run_pod_sandbox(request).await })?
            .pod_sandbox_id;
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).push(id.clone());
        Ok(Pod { id, name, namespace: self.k8s_namespace.clone(), config })
    }

    /// Stops the pod (its containers are killed) and removes it with its containers.
    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        self.remove_pod_id(&pod.id)?;
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).retain(|id| *id != pod.id);
        Ok(())
    }

    fn remove_pod_id(&self, id: &str) -> Result<()> {
        let stop = StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.call("StopPodSandbox", CALL_TIMEOUT, |mut c| async move { c.stop_pod_sandbox(stop).await })?;
        let remove = RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.call("RemovePodSandbox", CALL_TIMEOUT, |mut c| async move { c.remove_pod_sandbox(remove).await })?;
        Ok(())
    }

    /// Creates container `name` in `pod` from the busybox image, running `command`, with `annotations`
    /// and environment `envs`, in the pod's namespaces; its log is `<pod log dir>/<name>.log`.
    pub fn create_container(
        &self,
        pod: &Pod,
        name: &str,
        command: &[&str],
        annotations: &[(&str, &str)],
        envs: &[(&str, &str)],
    ) -> Result<String> {
        let namespaces = pod
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(ImageSpec { image: BUSYBOX_IMAGE.into(), ..Default::default() }),
            command: command.iter().map(|s| s.to_string()).collect(),
            envs: envs.iter().map(|(k, v)| KeyValue { key: k.to_string(), value: v.to_string() }).collect(),
            annotations: to_map(annotations),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: namespaces,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        Ok(self
            .call("CreateContainer", CALL_TIMEOUT, |mut c| async move { c.create_container(request).await })?
            .container_id)
    }

    /// Starts a created container.
    pub fn start_container(&self, id: &str) -> Result<()> {
        let request = StartContainerRequest { container_id: id.into() };
        self.call("StartContainer", CALL_TIMEOUT, |mut c| async move { c.start_container(request).await })?;
        Ok(())
    }

    /// Stops a container as the kubelet does: its stop signal, then SIGKILL after `grace` (whole
    /// seconds). Returns once the container has exited.
    pub fn stop_container(&self, id: &str, grace: Duration) -> Result<()> {
        let request = StopContainerRequest { container_id: id.into(), timeout: grace.as_secs() as i64 };
        self.call("StopContainer", grace + CALL_TIMEOUT, |mut c| async move { c.stop_container(request).await })?;
        Ok(())
    }

    /// Removes a container (it must not be running).
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let request = RemoveContainerRequest { container_id: id.into() };
        self.call("RemoveContainer", CALL_TIMEOUT, |mut c| async move { c.remove_container(request).await })?;
        Ok(())
    }

    /// The CRI status of a container.
    pub fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        let request = ContainerStatusRequest { container_id: id.into(), verbose: false };
        self.call("ContainerStatus", CALL_TIMEOUT, |mut c| async move { c.container_status(request).await })?
            .status
            .with_context(|| format!("CRI ContainerStatus of {id} returned no status"))
    }

    /// The state of a container.
    pub fn container_state(&self, id: &str) -> Result<ContainerState> {
        let status = self.container_status(id)?;
        ContainerState::try_from(status.state).with_context(|| format!("container {id} has state {}", status.state))
    }

    /// The container's CRI log file, parsed (empty while the file does not exist yet).
    pub fn container_log(&self, id: &str) -> Result<Vec<LogLine>> {
        let path = PathBuf::from(self.container_status(id)?.log_path);
        match fs::read_to_string(&path) {
            Ok(text) => parse_cri_log(&text).with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Waits until a [`CRI_COUNTER_SCRIPT`] container has logged a value above `min`; returns its
    /// logged values.
    pub fn wait_counter_past(&self, id: &str, min: u64) -> Result<Vec<u64>> {
        wait_for(&format!("container {id} to log a counter above {min}"), Duration::from_secs(60), || {
            let values = counter_values(&self.container_log(id).ok()?);
            values.iter().any(|v| *v > min).then_some(values)
        })
    }

    /// The file `path` (absolute inside the container) in a running container's root filesystem, seen
    /// from the host through the rootfs the shim mounted.
    pub fn container_file(&self, id: &str, path: &str) -> PathBuf {
        self.containerd.bundle(id).join("rootfs").join(path.trim_start_matches('/'))
    }

    /// Sets the environment of the sidecar the shim runs (e.g. an S3 server's
    /// [`crate::s3::S3Server::sidecar_env`]).
    pub fn set_sidecar_env(&self, vars: &[(&str, String)]) -> Result<()> {
        let text: String = vars.iter().map(|(k, v)| format!("export {k}='{v}'\n")).collect();
        fs::write(&self.sidecar_env, text).with_context(|| format!("writing {}", self.sidecar_env.display()))
    }

    /// The bundle directories checkpoint on stop wrote for `container` of `pod`:
    /// `<checkpoint_dir>/<namespace>/<pod>/<container>/<time>/`, oldest first.
    pub fn bundles(&self, pod: &Pod, container: &str) -> Vec<PathBuf> {
        let dir = self.checkpoint_dir.join(&pod.namespace).join(&pod.name).join(container);
        let mut bundles: Vec<PathBuf> =
            fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
        bundles.sort();
        bundles
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        let pods = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|e| e.into_inner()));
        for id in pods {
            if let Err(e) = self.remove_pod_id(&id) {
                eprintln!("cleanup: removing pod sandbox {id}: {e:#}");
            }
        }
    }
}

fn to_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}
