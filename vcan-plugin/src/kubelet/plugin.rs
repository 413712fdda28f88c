//! The `v1beta1.DevicePlugin` service the kubelet calls.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::api::deviceplugin::v1beta1::device_plugin_server::DevicePlugin;
use crate::api::deviceplugin::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, Device, DevicePluginOptions, Empty, ListAndWatchResponse,
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
};
use crate::serve::ResourceServer;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{Metrics, Outcome};

/// `Device.health` for usable devices.
pub const HEALTHY: &str = "Healthy";
/// `Device.health` for unusable devices.
pub const UNHEALTHY: &str = "Unhealthy";

/// The options the plugin announces: the kubelet must call PreStartContainer.
pub fn options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: true,
        get_preferred_allocation_available: false,
    }
}

/// The ListAndWatch streams of one resource, numbered as they open, and the highest number of
/// one the kubelet closed: a registration only cares about streams opened after it started.
#[derive(Debug)]
pub struct Streams {
    opened: AtomicU64,
    lost: watch::Sender<u64>,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            opened: AtomicU64::new(0),
            lost: watch::Sender::new(0),
        }
    }
}

impl Streams {
    /// The number of the last stream opened so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }

    /// Watches the highest number of a stream the kubelet closed.
    pub fn lost(&self) -> watch::Receiver<u64> {
        self.lost.subscribe()
    }

    fn open(&self) -> u64 {
        self.opened.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn close(&self, id: u64) {
        self.lost
            .send_modify(|highest| *highest = (*highest).max(id));
    }
}

/// The device-plugin service of one served socket; it records its own calls in the metrics.
///
/// Each socket gets a fresh `stop` token: cancelling it ends the ListAndWatch streams so the old
/// server can shut down. When the kubelet closes a stream (it went away), `streams` records it
/// so the registration loop checks for a restart at once.
#[derive(Debug, Clone)]
pub struct PluginService {
    server: Arc<ResourceServer>,
    metrics: Arc<Metrics>,
    health: watch::Receiver<Health>,
    stop: CancellationToken,
    streams: Arc<Streams>,
}

impl PluginService {
    /// A service backed by `server`, advertising devices as `health` says.
    pub fn new(
        server: Arc<ResourceServer>,
        metrics: Arc<Metrics>,
        health: watch::Receiver<Health>,
        stop: CancellationToken,
        streams: Arc<Streams>,
    ) -> Self {
        PluginService {
            server,
            metrics,
            health,
            stop,
            streams,
        }
    }

    fn snapshot(&self, health: &Health) -> ListAndWatchResponse {
        let state = if health.is_healthy() {
            HEALTHY
        } else {
            UNHEALTHY
        };
        ListAndWatchResponse {
            devices: self
                .server
                .devices()
                .ids()
                .map(|id| Device {
                    id,
                    health: state.to_string(),
                    topology: None,
                })
                .collect(),
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for PluginService {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = SnapshotStream;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        let id = self.streams.open();
        let mut health = self.health.clone();
        tokio::spawn(async move {
            loop {
                let snapshot = service.snapshot(&health.borrow_and_update().clone());
                tracing::debug!(
                    devices = snapshot.devices.len(),
                    "sending ListAndWatch snapshot"
                );
                if tx.send(Ok(snapshot)).await.is_err() {
                    service.streams.close(id);
                    return;
                }
                tokio::select! {
                    changed = health.changed() => if changed.is_err() { return },
                    () = service.stop.cancelled() => return,
                    () = tx.closed() => {
                        tracing::debug!(resource = %service.server.resource(), "the kubelet closed ListAndWatch");
                        service.streams.close(id);
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        // Devices are interchangeable; the kubelet's own choice is as good as any.
        Ok(Response::new(PreferredAllocationResponse {
            container_responses: vec![ContainerPreferredAllocationResponse::default()],
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let started = Instant::now();
        let resource = self.server.resource().to_string();
        let requests = request.into_inner().container_requests;
        if requests.is_empty() {
            return Err(Status::invalid_argument(
                "Allocate without container requests",
            ));
        }
        let mut responses = Vec::with_capacity(requests.len());
        for container in &requests {
            let envs = match self.server.allocate_env(&container.devices_ids) {
                Ok(envs) => envs,
                Err(e) => {
                    tracing::warn!(ids = ?container.devices_ids, error = %e, "Allocate refused");
                    self.metrics
                        .allocate(&resource, Outcome::Error, started.elapsed());
                    return Err(e.into());
                }
            };
            responses.push(ContainerAllocateResponse {
                envs,
                ..Default::default()
            });
        }
        for container in &requests {
            self.server.note_allocate(&container.devices_ids);
        }
        self.metrics
            .allocate(&resource, Outcome::Success, started.elapsed());
        tracing::debug!(containers = requests.len(), elapsed = ?started.elapsed(), "Allocate");
        Ok(Response::new(AllocateResponse {
            container_responses: responses,
        }))
    }

    async fn pre_start_container(
        &self,
        request: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        let ids = request.into_inner().devices_ids;
        let started = Instant::now();
        let resource = self.server.resource().to_string();
        match self.server.prestart(&ids).await {
            Ok((served, timings)) => {
                let names: Vec<&str> = served.interfaces.iter().map(|l| l.name.as_str()).collect();
                tracing::info!(
                    %resource,
                    pod = %served.pod,
                    netns = %served.netns.display(),
                    interfaces = ?names,
                    elapsed = ?started.elapsed(),
                    pod_lookup = ?timings.pod_lookup,
                    namespace_lookup = ?timings.namespace_lookup,
                    link_creation = ?timings.link_creation,
                    bpf_attach = ?timings.bpf_attach,
                    "PreStartContainer: interfaces up"
                );
                self.metrics.prestart(
                    &resource,
                    Outcome::Success,
                    started.elapsed(),
                    Some(&timings),
                );
                Ok(Response::new(PreStartContainerResponse {}))
            }
            Err(e) => {
                tracing::warn!(%resource, ?ids, error = %e, "PreStartContainer failed");
                self.metrics
                    .prestart(&resource, Outcome::Error, started.elapsed(), None);
                Err(e.into())
            }
        }
    }
}
