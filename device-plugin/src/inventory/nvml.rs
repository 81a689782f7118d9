//! [`GpuInventory`] backed by NVML, loaded at run time so that the binary starts on nodes without
//! the NVIDIA driver (and then says so clearly).
//!
//! A dedicated thread owns the NVML handle. It waits for critical XID events and polls every GPU at
//! `poll_interval`; health changes are published on a `watch` channel.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{GpuInfo, GpuInventory, Health};
use crate::config::Config;

/// The library loaded when no path is configured.
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";
/// Longest time the health thread blocks before it checks whether it should stop.
const STOP_CHECK: Duration = Duration::from_secs(1);

/// Why the NVML inventory could not be opened.
#[derive(Debug, Error)]
pub enum InventoryError {
    /// The NVML shared library could not be loaded.
    #[error("NVML not found: is the NVIDIA driver installed? (could not load {library}: {detail}); install the NVIDIA driver on this node, or point nvml_library / --nvml-library at libnvidia-ml.so.1")]
    NvmlNotFound {
        /// The library path or name that was tried.
        library: String,
        /// The loader's message.
        detail: String,
    },
    /// The library loaded but the kernel driver is not running.
    #[error("NVIDIA driver not loaded: {library} is present but the kernel driver is not running; load it (modprobe nvidia) and check that nvidia-smi works")]
    DriverNotLoaded {
        /// The library that was loaded.
        library: String,
    },
    /// NVML refused access to the driver.
    #[error("no permission to talk to the NVIDIA driver through NVML; run the plugin as root (a privileged pod) with the /dev/nvidia* devices present")]
    NoPermission,
    /// Any other NVML failure.
    #[error("NVML call {call} failed: {source}; check that nvidia-smi works on this node")]
    Nvml {
        /// The NVML function that failed.
        call: &'static str,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
    /// The health thread could not be started.
    #[error("cannot start the NVML health thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// How the NVML inventory is opened and how it checks health.
#[derive(Debug, Clone, PartialEq)]
pub struct NvmlOptions {
    /// Library path or name; `None` loads [`DEFAULT_NVML_LIBRARY`].
    pub library: Option<PathBuf>,
    /// Interval between queries of every GPU.
    pub poll_interval: Duration,
    /// Listen for critical XID events.
    pub xid_events: bool,
    /// XIDs that do not make a GPU unhealthy.
    pub ignored_xids: Vec<u64>,
    /// How long a GPU stays unhealthy after a critical XID.
    pub xid_recovery: Duration,
}

impl NvmlOptions {
    /// The options a validated [`Config`] asks for.
    pub fn from_config(config: &Config) -> Self {
        NvmlOptions {
            library: config.nvml_library.clone(),
            poll_interval: Duration::from_secs_f64(config.health.poll_interval_secs),
            xid_events: config.health.xid_events,
            ignored_xids: config.health.ignored_xids.clone(),
            xid_recovery: Duration::from_secs_f64(config.health.xid_recovery_secs),
        }
    }

    fn library_name(&self) -> String {
        self.library.as_ref().map_or_else(|| DEFAULT_NVML_LIBRARY.to_owned(), |p| p.display().to_string())
    }
}

/// GPU inventory read from NVML, kept current by a health thread.
#[derive(Debug)]
pub struct NvmlInventory {
    gpus: watch::Receiver<Vec<GpuInfo>>,
    stop: Arc<AtomicBool>,
}

impl NvmlInventory {
    /// Loads NVML, lists the GPUs and starts health checking.
    pub fn open(options: NvmlOptions) -> Result<Self, InventoryError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("nvml-health".to_owned())
            .spawn(move || health_thread(options, ready_tx, thread_stop))
            .map_err(InventoryError::Thread)?;
        let gpus = ready_rx
            .recv()
            .map_err(|_| InventoryError::Thread(std::io::Error::other("the NVML thread ended during start-up")))??;
        Ok(NvmlInventory { gpus, stop })
    }
}

impl Drop for NvmlInventory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl GpuInventory for NvmlInventory {
    fn list(&self) -> Vec<GpuInfo> {
        self.gpus.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Vec<GpuInfo>> {
        self.gpus.clone()
    }
}

type Ready = Result<watch::Receiver<Vec<GpuInfo>>, InventoryError>;

fn health_thread(options: NvmlOptions, ready: mpsc::Sender<Ready>, stop: Arc<AtomicBool>) {
    let nvml = match init(&options) {
        Ok(nvml) => nvml,
        Err(e) => {
            // The receiver only disappears if open() itself is gone; nothing to report to then.
            let _ = ready.send(Err(e));
            return;
        }
    };
    let devices = match discover(&nvml) {
        Ok(devices) => devices,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let infos: Vec<GpuInfo> = devices.iter().map(|(_, info)| info.clone()).collect();
    for gpu in &infos {
        info!(index = gpu.index, uuid = %gpu.uuid, name = %gpu.name, memory_bytes = gpu.memory_bytes, "found GPU");
    }
    let (tx, rx) = watch::channel(infos);
    if ready.send(Ok(rx)).is_err() {
        return;
    }
    let devices: Vec<(Device<'_>, String)> = devices.into_iter().map(|(device, info)| (device, info.uuid)).collect();
    let events = if options.xid_events { xid_event_set(&nvml, &devices) } else { None };
    let mut states = vec![HealthState::default(); devices.len()];
    let mut next_poll = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_poll {
            for ((device, _), state) in devices.iter().zip(&mut states) {
                state.on_query(device.memory_info().map(drop).map_err(|e| e.to_string()));
            }
            next_poll = now + options.poll_interval;
        }
        publish(&tx, &states, now, options.xid_recovery);
        let wait = next_poll.saturating_duration_since(Instant::now()).min(STOP_CHECK);
        let Some(set) = &events else {
            thread::sleep(wait);
            continue;
        };
        // Whole milliseconds, at least 1: 0 would mean "do not wait" to NVML.
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1);
        match set.wait(wait_ms) {
            Ok(event) => on_event(&event, &devices, &mut states, &options),
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                warn!(error = %e, "waiting for NVML events failed; checking health by polling");
                thread::sleep(wait);
            }
        }
    }
    debug!("NVML health thread stopped");
}

fn init(options: &NvmlOptions) -> Result<Nvml, InventoryError> {
    let result = match &options.library {
        Some(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
        None => Nvml::init(),
    };
    result.map_err(|e| match e {
        NvmlError::LibloadingError(ref loader) => {
            InventoryError::NvmlNotFound { library: options.library_name(), detail: loader.to_string() }
        }
        NvmlError::LibraryNotFound => {
            InventoryError::NvmlNotFound { library: options.library_name(), detail: e.to_string() }
        }
        NvmlError::DriverNotLoaded => InventoryError::DriverNotLoaded { library: options.library_name() },
        NvmlError::NoPermission => InventoryError::NoPermission,
        source => InventoryError::Nvml { call: "nvmlInit_v2", source },
    })
}

fn nvml_error(call: &'static str) -> impl Fn(NvmlError) -> InventoryError {
    move |source| InventoryError::Nvml { call, source }
}

fn discover(nvml: &Nvml) -> Result<Vec<(Device<'_>, GpuInfo)>, InventoryError> {
    let count = nvml.device_count().map_err(nvml_error("nvmlDeviceGetCount_v2"))?;
    if count == 0 {
        warn!("NVML reports no GPUs on this node; advertising no seats");
    }
    (0..count)
        .map(|index| {
            let device = nvml.device_by_index(index).map_err(nvml_error("nvmlDeviceGetHandleByIndex_v2"))?;
            let info = GpuInfo {
                index,
                uuid: device.uuid().map_err(nvml_error("nvmlDeviceGetUUID"))?,
                name: device.name().map_err(nvml_error("nvmlDeviceGetName"))?,
                memory_bytes: device.memory_info().map_err(nvml_error("nvmlDeviceGetMemoryInfo"))?.total,
                health: Health::Healthy,
            };
            Ok((device, info))
        })
        .collect()
}

/// An event set with critical-XID events of every GPU that supports them, or `None` (polling only).
fn xid_event_set<'n>(nvml: &'n Nvml, devices: &[(Device<'n>, String)]) -> Option<EventSet<'n>> {
    let mut usable: Vec<usize> = devices
        .iter()
        .enumerate()
        .filter(|(_, (device, uuid))| {
            let supported =
                device.supported_event_types().is_ok_and(|types| types.contains(EventTypes::CRITICAL_XID_ERROR));
            if !supported {
                warn!(gpu = %uuid, "GPU does not report XID events; its health is checked by polling only");
            }
            supported
        })
        .map(|(i, _)| i)
        .collect();
    // A failed registration releases the whole set, so start over without the failing GPU.
    while !usable.is_empty() {
        match register_xid_events(nvml, devices, &usable) {
            Ok(set) => return Some(set),
            Err(RegisterFailure::Set(e)) => {
                warn!(error = %e, "cannot create an NVML event set; checking health by polling only");
                return None;
            }
            Err(RegisterFailure::Device(i, e)) => {
                warn!(gpu = %devices[i].1, error = %e, "cannot register for XID events; this GPU is checked by polling only");
                usable.retain(|&j| j != i);
            }
        }
    }
    None
}

enum RegisterFailure {
    Set(NvmlError),
    Device(usize, String),
}

fn register_xid_events<'n>(
    nvml: &'n Nvml,
    devices: &[(Device<'n>, String)],
    which: &[usize],
) -> Result<EventSet<'n>, RegisterFailure> {
    let mut set = nvml.create_event_set().map_err(RegisterFailure::Set)?;
    for &i in which {
        set = devices[i]
            .0
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .map_err(|e| RegisterFailure::Device(i, e.to_string()))?;
    }
    Ok(set)
}

fn on_event(
    event: &nvml_wrapper::struct_wrappers::event::EventData<'_>,
    devices: &[(Device<'_>, String)],
    states: &mut [HealthState],
    options: &NvmlOptions,
) {
    if !event.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
        return;
    }
    let xid = match event.event_data {
        Some(XidError::Value(v)) => Some(v),
        _ => None,
    };
    if xid.is_some_and(|x| options.ignored_xids.contains(&x)) {
        info!(xid, "ignoring XID caused by an application (health.ignored_xids)");
        return;
    }
    let now = Instant::now();
    match event.device.uuid().ok().and_then(|u| devices.iter().position(|(_, d)| *d == u)) {
        Some(i) => {
            warn!(gpu = %devices[i].1, xid, "critical XID error: marking the GPU unhealthy");
            states[i].on_xid(xid, now);
        }
        None => {
            warn!(xid, "critical XID error on an unidentified GPU: marking all GPUs unhealthy");
            for state in states.iter_mut() {
                state.on_xid(xid, now);
            }
        }
    }
}

fn publish(tx: &watch::Sender<Vec<GpuInfo>>, states: &[HealthState], now: Instant, recovery: Duration) {
    tx.send_if_modified(|gpus| {
        let mut changed = false;
        for (gpu, state) in gpus.iter_mut().zip(states) {
            let health = state.health(now, recovery);
            if gpu.health != health {
                match &health {
                    Health::Healthy => info!(gpu = %gpu.uuid, "GPU is healthy again"),
                    Health::Unhealthy { reason } => {
                        warn!(gpu = %gpu.uuid, %reason, "GPU is unhealthy")
                    }
                }
                gpu.health = health;
                changed = true;
            }
        }
        changed
    });
}

/// Health bookkeeping of one GPU: the last query result and the last critical XID.
#[derive(Debug, Clone, Default, PartialEq)]
struct HealthState {
    query_error: Option<String>,
    last_xid: Option<(Option<u64>, Instant)>,
}

impl HealthState {
    fn on_query(&mut self, result: Result<(), String>) {
        self.query_error = result.err();
    }

    fn on_xid(&mut self, xid: Option<u64>, at: Instant) {
        self.last_xid = Some((xid, at));
    }

    /// Unhealthy while the last query failed or within `recovery` of the last critical XID.
    fn health(&self, now: Instant, recovery: Duration) -> Health {
        if let Some(error) = &self.query_error {
            return Health::Unhealthy { reason: format!("NVML query failed: {error}") };
        }
        match self.last_xid {
            Some((xid, at)) if now.saturating_duration_since(at) < recovery => Health::Unhealthy {
                reason: match xid {
                    Some(x) => format!("critical XID {x}"),
                    None => "critical XID (unknown code)".to_owned(),
                },
            },
            _ => Health::Healthy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_queries_and_xid_recovery() {
        let t0 = Instant::now();
        let recovery = Duration::from_secs(60);
        let mut state = HealthState::default();
        assert_eq!(state.health(t0, recovery), Health::Healthy);

        state.on_xid(Some(79), t0);
        assert_eq!(
            state.health(t0 + Duration::from_secs(59), recovery),
            Health::Unhealthy { reason: "critical XID 79".into() }
        );
        assert_eq!(state.health(t0 + Duration::from_secs(60), recovery), Health::Healthy);

        state.on_query(Err("GPU is lost".into()));
        assert_eq!(
            state.health(t0 + Duration::from_secs(120), recovery),
            Health::Unhealthy { reason: "NVML query failed: GPU is lost".into() }
        );
        state.on_query(Ok(()));
        assert_eq!(state.health(t0 + Duration::from_secs(120), recovery), Health::Healthy);

        state.on_xid(None, t0 + Duration::from_secs(200));
        assert_eq!(
            state.health(t0 + Duration::from_secs(200), recovery),
            Health::Unhealthy { reason: "critical XID (unknown code)".into() }
        );
    }

    #[test]
    fn options_come_from_config() {
        let mut config = Config::default();
        config.health.poll_interval_secs = 0.5;
        config.nvml_library = Some("/opt/nvidia/libnvidia-ml.so.1".into());
        let options = NvmlOptions::from_config(&config);
        assert_eq!(options.poll_interval, Duration::from_millis(500));
        assert_eq!(options.xid_recovery, Duration::from_secs(60));
        assert_eq!(options.library_name(), "/opt/nvidia/libnvidia-ml.so.1");
        assert_eq!(NvmlOptions::from_config(&Config::default()).library_name(), DEFAULT_NVML_LIBRARY);
    }
}
