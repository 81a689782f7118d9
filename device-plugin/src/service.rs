//! The `DevicePlugin` gRPC service the kubelet calls: ListAndWatch, Allocate,
//! GetPreferredAllocation, GetDevicePluginOptions and PreStartContainer.

use std::sync::Arc;

use kybernate_proto::deviceplugin::v1beta1::{
    device_plugin_server::DevicePlugin, AllocateRequest, AllocateResponse, CdiDevice, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, Device, DevicePluginOptions, Empty, ListAndWatchResponse,
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest, PreferredAllocationResponse,
    HEALTHY, UNHEALTHY,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::inventory::GpuInventory;
use crate::metrics::Metrics;
use crate::registration::plugin_options;
use crate::seats::{AllocationError, SeatLayout};

/// The device list as the kubelet sees it: one device per seat, healthy when its GPU is.
pub fn device_list(layout: &SeatLayout) -> Vec<Device> {
    layout
        .seats()
        .map(|(id, health)| Device {
            id: id.to_string(),
            health: if health.is_healthy() { HEALTHY } else { UNHEALTHY }.to_owned(),
            topology: None,
        })
        .collect()
}

/// Implementation of the kubelet's `DevicePlugin` service for GPU seats.
pub struct SeatService {
    config: Arc<Config>,
    inventory: Arc<dyn GpuInventory>,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
}

impl SeatService {
    /// A service answering from `inventory` under `config`. ListAndWatch streams end when `stop`
    /// becomes true (or its sender is dropped), so that a graceful server shutdown completes.
    pub fn new(
        config: Arc<Config>,
        inventory: Arc<dyn GpuInventory>,
        metrics: Metrics,
        stop: watch::Receiver<bool>,
    ) -> Self {
        SeatService { config, inventory, metrics, stop }
    }

    fn layout(&self) -> SeatLayout {
        SeatLayout::new(&self.inventory.list(), &self.config.seats)
    }
}

impl From<AllocationError> for Status {
    fn from(e: AllocationError) -> Self {
        match e {
            AllocationError::Unhealthy { .. } => Status::failed_precondition(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl DevicePlugin for SeatService {
    async fn get_device_plugin_options(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(plugin_options()))
    }

    type ListAndWatchStream = ReceiverStream<Result<ListAndWatchResponse, Status>>;

    async fn list_and_watch(&self, _request: Request<Empty>) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut gpus = self.inventory.watch();
        let mut stop = self.stop.clone();
        let config = Arc::clone(&self.config);
        info!("kubelet opened ListAndWatch");
        tokio::spawn(async move {
            let mut last: Option<Vec<Device>> = None;
            loop {
                let devices = device_list(&SeatLayout::new(&gpus.borrow_and_update(), &config.seats));
                if last.as_ref() != Some(&devices) {
                    let healthy = devices.iter().filter(|d| d.health == HEALTHY).count();
                    debug!(devices = devices.len(), healthy, "sending device list");
                    let response = ListAndWatchResponse { devices: devices.clone() };
                    if tx.send(Ok(response)).await.is_err() {
                        break;
                    }
                    last = Some(devices);
                }
                tokio::select! {
                    changed = gpus.changed() => if changed.is_err() { break },
                    _ = stop.wait_for(|stopped| *stopped) => break,
                    _ = tx.closed() => break,
                }
            }
            debug!("ListAndWatch stream ended");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let layout = self.layout();
        let mut container_responses = Vec::new();
        for req in request.into_inner().container_requests {
            let Ok(size) = usize::try_from(req.allocation_size) else {
                return Err(Status::invalid_argument(format!("allocation_size {} is negative", req.allocation_size)));
            };
            let device_i_ds = layout.preferred(&req.available_device_i_ds, &req.must_include_device_i_ds, size);
            debug!(size, preferred = ?device_i_ds, "preferred allocation");
            container_responses.push(ContainerPreferredAllocationResponse { device_i_ds });
        }
        Ok(Response::new(PreferredAllocationResponse { container_responses }))
    }

    async fn allocate(&self, request: Request<AllocateRequest>) -> Result<Response<AllocateResponse>, Status> {
        let layout = self.layout();
        let mut container_responses = Vec::new();
        for req in request.into_inner().container_requests {
            let allocation = match layout.allocate(&req.devices_ids, self.config.multi_seat) {
                Ok(allocation) => allocation,
                Err(e) => {
                    self.metrics.record_allocation(false);
                    warn!(devices = ?req.devices_ids, error = %e, "allocation refused");
                    return Err(e.into());
                }
            };
            self.metrics.record_allocation(true);
            let gpus: Vec<&str> = allocation.gpus.iter().map(|g| g.uuid.as_str()).collect();
            info!(seats = allocation.seat_count(), ?gpus, devices = ?req.devices_ids, "allocated seats");
            let cdi_devices = if self.config.cdi.enabled {
                allocation.cdi_devices(&self.config.cdi.kind).into_iter().map(|name| CdiDevice { name }).collect()
            } else {
                Vec::new()
            };
            container_responses.push(ContainerAllocateResponse {
                envs: allocation.envs(),
                cdi_devices,
                ..Default::default()
            });
        }
        Ok(Response::new(AllocateResponse { container_responses }))
    }

    async fn pre_start_container(
        &self,
        request: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        // Announced as not required; nothing needs resetting before a container starts.
        debug!(devices = ?request.into_inner().devices_ids, "PreStartContainer");
        Ok(Response::new(PreStartContainerResponse {}))
    }
}
