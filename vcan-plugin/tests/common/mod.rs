//! Test doubles that play the kubelet's and the runtime's parts through the real gRPC APIs.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use vcan_plugin::api::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use vcan_plugin::api::deviceplugin::v1beta1::registration_server::{
    Registration, RegistrationServer,
};
use vcan_plugin::api::deviceplugin::v1beta1::{
    DevicePluginOptions, Empty, ListAndWatchResponse, RegisterRequest,
};
use vcan_plugin::api::podresources::v1::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use vcan_plugin::api::podresources::v1::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use vcan_plugin::kubelet::registration::Registrar;
use vcan_plugin::pod::resources::{self, PodRef};
use vcan_plugin::pod::runtime::{RuntimeError, Sandbox, SandboxLookup};
use vcan_plugin::resource::{DeviceSet, ResourceName};
use vcan_plugin::serve::ResourceServer;
use vcan_plugin::serve::private::PrivateVcans;
use vcan_plugin::telemetry::health::Health;
use vcan_plugin::telemetry::metrics::Metrics;
use vcan_plugin::uds;

pub const RESOURCE: &str = "example.com/vcan";

/// What the fake kubelet saw of one registration.
#[derive(Debug)]
pub struct Registered {
    pub request: RegisterRequest,
    pub options: DevicePluginOptions,
    pub snapshots: mpsc::UnboundedReceiver<ListAndWatchResponse>,
}

/// A kubelet Registration server that, like the real one, dials back into the plugin and reads
/// its options and ListAndWatch stream.
#[derive(Clone)]
struct FakeKubelet {
    dir: PathBuf,
    registered: mpsc::UnboundedSender<Registered>,
    /// Cancelled when this kubelet "dies": its ListAndWatch streams close with it.
    life: CancellationToken,
}

#[tonic::async_trait]
impl Registration for FakeKubelet {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let request = request.into_inner();
        // Like the kubelet: a blocking dial with a 10 s timeout, retried while the file is missing.
        let path = self.dir.join(&request.endpoint);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let channel = loop {
            match uds::connect(&path).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::unavailable(format!("dial back: {e}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let mut client = DevicePluginClient::new(channel);
        let options = client
            .get_device_plugin_options(Empty {})
            .await?
            .into_inner();
        let mut stream = client.list_and_watch(Empty {}).await?.into_inner();
        let (tx, snapshots) = mpsc::unbounded_channel();
        let life = self.life.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = life.cancelled() => return,
                    next = stream.next() => next,
                };
                let Some(Ok(snapshot)) = next else { return };
                if tx.send(snapshot).is_err() {
                    return;
                }
            }
        });
        let _ = self.registered.send(Registered {
            request,
            options,
            snapshots,
        });
        Ok(Response::new(Empty {}))
    }
}

/// A running fake kubelet; dropping it stops it.
pub struct KubeletHandle {
    pub registrations: mpsc::UnboundedReceiver<Registered>,
    stop: CancellationToken,
}

impl Drop for KubeletHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a fake kubelet on `dir/kubelet.sock`, replacing any previous socket file (as a kubelet
/// restart does).
pub fn start_kubelet(dir: &Path) -> KubeletHandle {
    let path = dir.join("kubelet.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind kubelet.sock");
    let (tx, registrations) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let service = FakeKubelet {
        dir: dir.to_path_buf(),
        registered: tx,
        life: stop.clone(),
    };
    let token = stop.clone();
    tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(RegistrationServer::new(service))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(listener),
                token.cancelled_owned(),
            )
            .await;
    });
    KubeletHandle {
        registrations,
        stop,
    }
}

/// Restarts the kubelet the way the real one does: it dies (closing every plugin connection),
/// the new process deletes every file in the device-plugin directory, and after `gap` listens on
/// a new `kubelet.sock`. The test's PodResources socket, kept in the same directory, stays.
pub async fn restart_kubelet(dir: &Path, old: KubeletHandle, gap: Duration) -> KubeletHandle {
    drop(old);
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        if entry.file_name() != "pod-resources.sock" {
            std::fs::remove_file(entry.path()).expect("remove file");
        }
    }
    tokio::time::sleep(gap).await;
    start_kubelet(dir)
}

/// A PodResources server with a settable pod list that can refuse the next calls with
/// ResourceExhausted, like the kubelet's rate limiter.
#[derive(Clone, Default)]
pub struct FakePodResources {
    pub pods: Arc<Mutex<Vec<PodResources>>>,
    pub exhausted: Arc<AtomicU32>,
    pub calls: Arc<AtomicU32>,
}

impl FakePodResources {
    pub fn set_pod(&self, namespace: &str, name: &str, containers: &[(&str, &[&str])]) {
        let pod = PodResources {
            name: name.into(),
            namespace: namespace.into(),
            containers: containers
                .iter()
                .map(|(c, ids)| ContainerResources {
                    name: (*c).into(),
                    devices: vec![ContainerDevices {
                        resource_name: RESOURCE.into(),
                        device_ids: ids.iter().map(|s| s.to_string()).collect(),
                        topology: None,
                    }],
                    ..Default::default()
                })
                .collect(),
        };
        let mut pods = self.pods.lock().expect("lock");
        pods.retain(|p| !(p.name == name && p.namespace == namespace));
        pods.push(pod);
    }

    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.pods
            .lock()
            .expect("lock")
            .retain(|p| !(p.name == name && p.namespace == namespace));
    }
}

#[tonic::async_trait]
impl PodResourcesLister for FakePodResources {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .exhausted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Status::resource_exhausted("rate limited"));
        }
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: self.pods.lock().expect("lock").clone(),
        }))
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
        Err(Status::unimplemented("not used by the plugin"))
    }
}

/// Serves `fake` on `path`.
pub fn start_pod_resources(path: &Path, fake: FakePodResources) {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).expect("bind pod-resources socket");
    tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(PodResourcesListerServer::new(fake))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
    });
}

/// A runtime whose sandboxes are set by the test; their namespaces are real.
#[derive(Default)]
pub struct FakeRuntime {
    pub sandboxes: Mutex<HashMap<PodRef, Sandbox>>,
}

#[async_trait::async_trait]
impl SandboxLookup for FakeRuntime {
    async fn sandbox(&self, pod: &PodRef) -> Result<Sandbox, RuntimeError> {
        self.sandboxes
            .lock()
            .expect("lock")
            .get(pod)
            .cloned()
            .ok_or_else(|| RuntimeError::NoSandbox(pod.clone()))
    }

    async fn ready_sandboxes(&self) -> Result<std::collections::HashSet<String>, RuntimeError> {
        Ok(self
            .sandboxes
            .lock()
            .expect("lock")
            .values()
            .map(|s| s.id.clone())
            .collect())
    }
}

impl FakeRuntime {
    pub fn remove(&self, namespace: &str, name: &str) {
        self.sandboxes
            .lock()
            .expect("lock")
            .remove(&pod(namespace, name));
    }

    pub fn add(
        &self,
        namespace: &str,
        name: &str,
        netns: Option<PathBuf>,
        annotations: &[(&str, &str)],
    ) {
        self.sandboxes.lock().expect("lock").insert(
            pod(namespace, name),
            Sandbox {
                id: format!("sandbox-{namespace}-{name}"),
                uid: format!("uid-{name}"),
                netns,
                annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        );
    }
}

pub fn pod(namespace: &str, name: &str) -> PodRef {
    PodRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// Everything a plugin test needs: a temp kubelet directory, fakes and the plugin's server.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub pod_resources: FakePodResources,
    pub runtime: Arc<FakeRuntime>,
    pub server: Arc<ResourceServer>,
    pub metrics: Arc<Metrics>,
    pub health: watch::Sender<Health>,
    devices: usize,
}

impl Harness {
    pub fn new(devices: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = FakePodResources::default();
        let pr_path = dir.path().join("pod-resources.sock");
        start_pod_resources(&pr_path, fake.clone());
        let runtime = Arc::new(FakeRuntime::default());
        let (health, _) = watch::channel(Health::Healthy);
        let mut h = Harness {
            server: Arc::new(new_server(dir.path(), runtime.clone(), devices)),
            dir,
            pod_resources: fake,
            runtime,
            metrics: Arc::new(Metrics::new(&[RESOURCE.to_string()], "none")),
            health,
            devices,
        };
        h.server = Arc::new(h.fresh_server());
        h
    }

    /// A server with nothing in memory, as a restarted plugin process has.
    pub fn fresh_server(&self) -> ResourceServer {
        new_server(self.dir.path(), self.runtime.clone(), self.devices)
    }

    /// Starts the registrar in the background; returns its stop token.
    pub fn start_registrar(&self) -> (CancellationToken, Arc<std::sync::atomic::AtomicBool>) {
        let registrar = Registrar::new(
            self.dir.path(),
            self.server.clone(),
            self.metrics.clone(),
            self.health.subscribe(),
        );
        let flag = registrar.registered_flag();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move { registrar.run(token).await });
        (stop, flag)
    }

    /// A device-plugin client on the plugin's socket.
    pub async fn client(&self) -> DevicePluginClient<tonic::transport::Channel> {
        let path = self.dir.path().join("example.com-vcan.sock");
        for _ in 0..100 {
            if let Ok(channel) = uds::connect(&path).await {
                return DevicePluginClient::new(channel);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("plugin socket {} never answered", path.display());
    }
}

fn new_server(dir: &Path, runtime: Arc<FakeRuntime>, devices: usize) -> ResourceServer {
    let resource: ResourceName = RESOURCE.parse().expect("resource");
    ResourceServer::new(
        resource.clone(),
        DeviceSet::new(&resource, devices),
        resources::PodResources::new(&dir.join("pod-resources.sock")),
        runtime,
        None,
        Arc::new(PrivateVcans),
    )
}

/// Waits for the next registration, failing after `timeout`.
pub async fn next_registration(kubelet: &mut KubeletHandle, timeout: Duration) -> Registered {
    tokio::time::timeout(timeout, kubelet.registrations.recv())
        .await
        .expect("no registration in time")
        .expect("kubelet stopped")
}
