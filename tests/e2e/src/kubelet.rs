//! The kubelet's part, played through the kubelet's own APIs: the device manager (Registration
//! server, ListAndWatch consumer, Allocate and PreStartContainer caller) and the PodResources
//! server, with the kubelet's restart behaviour (delete every socket in the device-plugin directory,
//! serve a fresh `kubelet.sock`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use vcan_plugin::api::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use vcan_plugin::api::deviceplugin::v1beta1::registration_server::{
    Registration, RegistrationServer,
};
use vcan_plugin::api::deviceplugin::v1beta1::{
    AllocateRequest, ContainerAllocateRequest, DevicePluginOptions, Empty,
    PreStartContainerRequest, RegisterRequest,
};
use vcan_plugin::api::podresources::v1::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use vcan_plugin::api::podresources::v1::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use vcan_plugin::uds;

/// The kubelet's PreStartContainer timeout (`KubeletPreStartContainerRPCTimeoutInSecs`).
pub const PRESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// A registered plugin as the device manager sees it.
#[derive(Debug, Clone)]
struct Endpoint {
    /// The socket file name the plugin registered.
    endpoint: String,
    client: DevicePluginClient<Channel>,
    options: DevicePluginOptions,
    /// Device ID → healthy, from the latest ListAndWatch snapshot.
    devices: BTreeMap<String, bool>,
    /// Bumped on every registration, so a stale stream never overwrites a newer one.
    generation: u64,
}

/// One container's devices of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerAllocation {
    /// Container name.
    pub container: String,
    /// Resource name.
    pub resource: String,
    /// Device IDs.
    pub ids: Vec<String>,
    /// Environment from the plugin's Allocate response.
    pub envs: HashMap<String, String>,
}

/// An admitted pod's allocations (the kubelet's checkpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAllocation {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Per container, in spec order.
    pub containers: Vec<ContainerAllocation>,
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<String, Endpoint>,
    pods: Vec<PodAllocation>,
    generation: u64,
    /// While set, PodResources lists no pod, as a restarted kubelet does until it re-syncs.
    listing_empty: bool,
    /// Cancelled when the kubelet process "dies": every ListAndWatch stream closes with it.
    life: CancellationToken,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
struct RegistrationService {
    dir: PathBuf,
    state: Shared,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        // A kubelet that dies mid-call drops the connection: the call fails at once.
        let life = lock(&self.state).life.clone();
        tokio::select! {
            () = life.cancelled() => Err(Status::unavailable("the kubelet stopped")),
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
        // Like the kubelet: dial back into the plugin before answering (a blocking dial with a
        // 10 s timeout, retried while the socket file is missing), read its options, then
        // consume ListAndWatch in the background.
        let path = self.dir.join(&request.endpoint);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let channel = loop {
            match uds::connect(&path).await {
                Ok(channel) => break channel,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::unavailable(format!(
                        "cannot connect to plugin endpoint {}: {e}",
                        path.display()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let mut client = DevicePluginClient::new(channel);
        let options = client
            .get_device_plugin_options(Empty {})
            .await?
            .into_inner();
        let mut stream = client.list_and_watch(Empty {}).await?.into_inner();
        let generation = {
            let mut state = lock(&self.state);
            state.generation += 1;
            let generation = state.generation;
            state.endpoints.insert(
                request.resource_name.clone(),
                Endpoint {
                    endpoint: request.endpoint.clone(),
                    client,
                    options,
                    devices: BTreeMap::new(),
                    generation,
                },
            );
            generation
        };
        let state = self.state.clone();
        let resource = request.resource_name.clone();
        let life = lock(&self.state).life.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = life.cancelled() => return,
                    next = stream.next() => next,
                };
                let Some(Ok(snapshot)) = next else { break };
                let mut state = lock(&state);
                let Some(endpoint) = state.endpoints.get_mut(&resource) else {
                    return;
                };
                if endpoint.generation != generation {
                    return;
                }
                endpoint.devices = snapshot
                    .devices
                    .into_iter()
                    .map(|d| (d.id, d.health == "Healthy"))
                    .collect();
            }
            // Stream ended: the kubelet marks every device unhealthy.
            let mut state = lock(&state);
            if let Some(endpoint) = state.endpoints.get_mut(&resource)
                && endpoint.generation == generation
            {
                endpoint.devices.values_mut().for_each(|h| *h = false);
            }
        });
        tracing::info!(resource = %request.resource_name, endpoint = %request.endpoint, "plugin registered");
        Ok(Response::new(Empty {}))
    }
}

#[derive(Clone)]
struct PodResourcesService {
    state: Shared,
}

#[tonic::async_trait]
impl PodResourcesLister for PodResourcesService {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        let state = lock(&self.state);
        let listed: &[PodAllocation] = if state.listing_empty {
            &[]
        } else {
            &state.pods
        };
        let pod_resources = listed
            .iter()
            .map(|p| PodResources {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                containers: p
                    .containers
                    .iter()
                    .map(|c| ContainerResources {
                        name: c.container.clone(),
                        devices: vec![ContainerDevices {
                            resource_name: c.resource.clone(),
                            device_ids: c.ids.clone(),
                            topology: None,
                        }],
                        ..Default::default()
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListPodResourcesResponse { pod_resources }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Ok(Response::new(AllocatableResourcesResponse::default()))
    }

    async fn get(
        &self,
        _: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("Get is not served by the stand-in"))
    }
}

/// The kubelet stand-in.
pub struct Kubelet {
    dir: PathBuf,
    pod_resources_socket: PathBuf,
    state: Shared,
    stop: CancellationToken,
    /// The kubelet admits pods one at a time (its pod-add loop); concurrent admissions here
    /// would hand the same free devices to two pods.
    admission: tokio::sync::Mutex<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the kubelet's device manager does on start: remove every file in its directory.
fn remove_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

impl Kubelet {
    /// Starts serving `dir/kubelet.sock` and the PodResources socket, deleting every socket in
    /// `dir` first as the kubelet does on start.
    pub async fn start(dir: &Path, pod_resources_socket: &Path) -> Result<Self> {
        let kubelet = Kubelet {
            dir: dir.to_path_buf(),
            pod_resources_socket: pod_resources_socket.to_path_buf(),
            state: Arc::default(),
            stop: CancellationToken::new(),
            admission: tokio::sync::Mutex::new(()),
        };
        kubelet.serve()?;
        Ok(kubelet)
    }

    fn serve(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        if let Some(parent) = self.pod_resources_socket.parent() {
            std::fs::create_dir_all(parent)?;
        }
        remove_files(&self.dir)?;
        self.listen()
    }

    /// Serves `kubelet.sock` and the PodResources socket.
    fn listen(&self) -> Result<()> {
        let _ = std::fs::remove_file(&self.pod_resources_socket);
        let registration =
            UnixListener::bind(self.dir.join("kubelet.sock")).context("bind kubelet.sock")?;
        let pod_resources =
            UnixListener::bind(&self.pod_resources_socket).context("bind pod-resources socket")?;
        let stop = self.stop.clone();
        let service = RegistrationService {
            dir: self.dir.clone(),
            state: self.state.clone(),
        };
        tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(registration),
                    stop.cancelled_owned(),
                )
                .await;
        });
        let stop = self.stop.clone();
        let service = PodResourcesService {
            state: self.state.clone(),
        };
        tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(PodResourcesListerServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(pod_resources),
                    stop.cancelled_owned(),
                )
                .await;
        });
        Ok(())
    }

    /// Restarts like the kubelet: the process dies (its servers stop, every plugin connection
    /// closes), the new one deletes every file in the device-plugin directory and serves anew.
    /// Admitted pods (the checkpoint) are kept.
    pub async fn restart(&mut self) -> Result<()> {
        self.restart_with_gap(Duration::ZERO).await
    }

    /// Like [`Kubelet::restart`], with `gap` between the clean-up of the directory and the new
    /// `kubelet.sock` (a real kubelet does other start-up work in between).
    pub async fn restart_with_gap(&mut self, gap: Duration) -> Result<()> {
        self.stop.cancel();
        {
            let mut state = lock(&self.state);
            state.life.cancel();
            state.life = CancellationToken::new();
            state.endpoints.clear();
        }
        self.stop = CancellationToken::new();
        remove_files(&self.dir)?;
        tokio::time::sleep(gap).await;
        self.listen()
    }

    /// While `empty`, PodResources lists no pod at all (a kubelet re-syncing after a restart, or
    /// with its API server unreachable); allocations are kept.
    pub fn set_listing_empty(&self, empty: bool) {
        lock(&self.state).listing_empty = empty;
    }

    /// Dials `resource`'s registered endpoint afresh, as the kubelet does after a restart of its
    /// own, and reads its options.
    pub async fn dial(&self, resource: &str) -> Result<DevicePluginOptions> {
        let endpoint = self.endpoint(resource)?.endpoint;
        let channel = uds::connect(&self.dir.join(&endpoint))
            .await
            .with_context(|| format!("dial {endpoint}"))?;
        Ok(DevicePluginClient::new(channel)
            .get_device_plugin_options(Empty {})
            .await
            .with_context(|| format!("GetDevicePluginOptions on {endpoint}"))?
            .into_inner())
    }

    /// How many registrations the kubelet has accepted so far (from any plugin).
    pub fn registrations(&self) -> u64 {
        lock(&self.state).generation
    }

    /// Whether `resource` is registered with a stream that delivered its devices.
    pub fn is_registered(&self, resource: &str) -> bool {
        lock(&self.state)
            .endpoints
            .get(resource)
            .is_some_and(|e| !e.devices.is_empty())
    }

    /// Waits until `resource` is registered with at least `healthy` healthy devices.
    pub async fn wait_for_resource(
        &self,
        resource: &str,
        healthy: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let count = self.healthy_devices(resource);
            if count >= healthy {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{resource}: {count} healthy devices after {timeout:?}, wanted {healthy}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many healthy devices `resource` advertises now.
    pub fn healthy_devices(&self, resource: &str) -> usize {
        lock(&self.state)
            .endpoints
            .get(resource)
            .map(|e| e.devices.values().filter(|h| **h).count())
            .unwrap_or(0)
    }

    /// Whether the plugin for `resource` asked for PreStartContainer calls.
    pub fn prestart_required(&self, resource: &str) -> bool {
        lock(&self.state)
            .endpoints
            .get(resource)
            .is_some_and(|e| e.options.pre_start_required)
    }

    fn endpoint(&self, resource: &str) -> Result<Endpoint> {
        lock(&self.state)
            .endpoints
            .get(resource)
            .cloned()
            .with_context(|| format!("endpoint stopped: no plugin registered for {resource}"))
    }

    /// Admits a pod: picks free healthy devices for each container's request and calls Allocate
    /// per container, recording the allocation (what PodResources then reports).
    pub async fn admit(
        &self,
        namespace: &str,
        name: &str,
        requests: &[(String, String, usize)],
    ) -> Result<PodAllocation> {
        let _admitting = self.admission.lock().await;
        let mut containers = Vec::new();
        for (container, resource, count) in requests {
            if *count == 0 {
                continue;
            }
            let ids = {
                let state = lock(&self.state);
                let taken: HashSet<&String> = state
                    .pods
                    .iter()
                    .flat_map(|p| &p.containers)
                    .filter(|c| &c.resource == resource)
                    .flat_map(|c| &c.ids)
                    .chain(containers.iter().flat_map(|c: &ContainerAllocation| &c.ids))
                    .collect();
                let endpoint = state
                    .endpoints
                    .get(resource)
                    .with_context(|| format!("no plugin registered for {resource}"))?;
                let free: Vec<String> = endpoint
                    .devices
                    .iter()
                    .filter(|(id, healthy)| **healthy && !taken.contains(id))
                    .map(|(id, _)| id.clone())
                    .take(*count)
                    .collect();
                if free.len() < *count {
                    bail!(
                        "UnexpectedAdmissionError: {resource}: requested {count}, {} available",
                        free.len()
                    );
                }
                free
            };
            let mut client = self.endpoint(resource)?.client;
            let response = client
                .allocate(AllocateRequest {
                    container_requests: vec![ContainerAllocateRequest {
                        devices_ids: ids.clone(),
                    }],
                })
                .await
                .with_context(|| format!("Allocate for container {container}"))?
                .into_inner();
            let envs = response
                .container_responses
                .into_iter()
                .next()
                .map(|r| r.envs)
                .unwrap_or_default();
            containers.push(ContainerAllocation {
                container: container.clone(),
                resource: resource.clone(),
                ids,
                envs,
            });
        }
        let pod = PodAllocation {
            namespace: namespace.to_string(),
            name: name.to_string(),
            containers,
        };
        lock(&self.state).pods.push(pod.clone());
        Ok(pod)
    }

    /// Calls PreStartContainer for one container's devices, with the kubelet's timeout.
    pub async fn prestart(&self, allocation: &ContainerAllocation) -> Result<(), Status> {
        let mut endpoint = self
            .endpoint(&allocation.resource)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !endpoint.options.pre_start_required {
            return Ok(());
        }
        let mut request = Request::new(PreStartContainerRequest {
            devices_ids: allocation.ids.clone(),
        });
        request.set_timeout(PRESTART_TIMEOUT);
        endpoint.client.pre_start_container(request).await?;
        Ok(())
    }

    /// Forgets a deleted pod's allocation.
    pub fn forget(&self, namespace: &str, name: &str) {
        lock(&self.state)
            .pods
            .retain(|p| !(p.namespace == namespace && p.name == name));
    }

    /// The admitted pods.
    pub fn pods(&self) -> Vec<PodAllocation> {
        lock(&self.state).pods.clone()
    }
}
