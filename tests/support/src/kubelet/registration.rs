//! The device manager's Registration server: dials back into each plugin that registers, reads
//! its options and consumes its ListAndWatch stream, like the kubelet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use vcan_plugin::api::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use vcan_plugin::api::deviceplugin::v1beta1::registration_server::Registration;
use vcan_plugin::api::deviceplugin::v1beta1::{
    DevicePluginOptions, Empty, ListAndWatchResponse, RegisterRequest,
};
use vcan_plugin::uds;

use super::Shared;

/// How long the kubelet's blocking dial back into a registering plugin may take.
const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the dial back is retried while the plugin's socket cannot be connected to.
const DIAL_BACK_RETRY: Duration = Duration::from_millis(50);

/// What one accepted registration delivered, for tests that assert on the plugin's requests and
/// snapshots themselves.
#[derive(Debug)]
pub struct Registered {
    /// The plugin's request.
    pub request: RegisterRequest,
    /// What the plugin's `GetDevicePluginOptions` answered on the dial back.
    pub options: DevicePluginOptions,
    /// Every ListAndWatch snapshot of this registration's stream, in order; closed when the
    /// stream ends (or the kubelet dies).
    pub snapshots: mpsc::UnboundedReceiver<ListAndWatchResponse>,
}

/// A registered plugin as the device manager sees it.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    /// The socket file name the plugin registered.
    pub(super) endpoint: String,
    pub(super) client: DevicePluginClient<Channel>,
    pub(super) options: DevicePluginOptions,
    /// Device ID → healthy, from the latest ListAndWatch snapshot.
    pub(super) devices: BTreeMap<String, bool>,
    /// Bumped on every registration, so a stale stream never overwrites a newer one.
    pub(super) generation: u64,
}

#[derive(Clone)]
pub(super) struct RegistrationService {
    pub(super) dir: PathBuf,
    pub(super) shared: Arc<Shared>,
    /// This kubelet process's life: a new one per restart.
    pub(super) life: CancellationToken,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        // A kubelet that dies mid-call drops the connection: the call fails at once.
        tokio::select! {
            () = self.life.cancelled() => Err(Status::unavailable("the kubelet stopped")),
            answer = self.register_now(request.into_inner()) => answer,
        }
    }
}

impl RegistrationService {
    async fn register_now(&self, request: RegisterRequest) -> Result<Response<Empty>, Status> {
        if request.version != "v1beta1" {
            return Err(Status::invalid_argument(format!(
                "unsupported version {}",
                request.version
            )));
        }
        // Like the kubelet: dial back into the plugin before answering (a blocking dial,
        // retried while the socket cannot be connected to), read its options, then consume
        // ListAndWatch in the background.
        let path = self.dir.join(&request.endpoint);
        let deadline = tokio::time::Instant::now() + DIAL_BACK_TIMEOUT;
        let channel = loop {
            match uds::connect(&path).await {
                Ok(channel) => break channel,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::unavailable(format!(
                        "cannot connect to plugin endpoint {}: {e}",
                        path.display()
                    )));
                }
                Err(_) => tokio::time::sleep(DIAL_BACK_RETRY).await,
            }
        };
        let mut client = DevicePluginClient::new(channel);
        let options = client
            .get_device_plugin_options(Empty {})
            .await?
            .into_inner();
        let mut stream = client.list_and_watch(Empty {}).await?.into_inner();
        let resource = request.resource_name.clone();
        let life = &self.life;
        let generation = self.shared.update(|state| {
            // Checked under the lock a restart clears the endpoints under (after ending this
            // life): a registration that lost that race must not outlive its kubelet.
            if life.is_cancelled() {
                return None;
            }
            state.generation += 1;
            state.endpoints.insert(
                resource.clone(),
                Endpoint {
                    endpoint: request.endpoint.clone(),
                    client,
                    options,
                    devices: BTreeMap::new(),
                    generation: state.generation,
                },
            );
            Some(state.generation)
        });
        let Some(generation) = generation else {
            return Err(Status::unavailable("the kubelet stopped"));
        };
        let (snapshots_tx, snapshots) = mpsc::unbounded_channel();
        let shared = self.shared.clone();
        let life = self.life.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = life.cancelled() => return,
                    next = stream.next() => next,
                };
                let Some(Ok(snapshot)) = next else { break };
                let current = shared.update(|state| {
                    let Some(endpoint) = state.endpoints.get_mut(&resource) else {
                        return false;
                    };
                    if endpoint.generation != generation {
                        return false;
                    }
                    endpoint.devices = snapshot
                        .devices
                        .iter()
                        .map(|d| (d.id.clone(), d.health == "Healthy"))
                        .collect();
                    true
                });
                if !current {
                    return;
                }
                // Nobody may be reading (the e2e tests watch the device manager's state).
                let _ = snapshots_tx.send(snapshot);
            }
            // Stream ended: the kubelet marks every device unhealthy.
            shared.update(|state| {
                if let Some(endpoint) = state.endpoints.get_mut(&resource)
                    && endpoint.generation == generation
                {
                    endpoint.devices.values_mut().for_each(|h| *h = false);
                }
            });
        });
        tracing::info!(resource = %request.resource_name, endpoint = %request.endpoint, "plugin registered");
        // Nobody may be reading (the e2e tests watch the device manager's state).
        let _ = self.shared.registered.send(Registered {
            request,
            options,
            snapshots,
        });
        Ok(Response::new(Empty {}))
    }
}
