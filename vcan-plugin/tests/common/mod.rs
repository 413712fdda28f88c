//! The host tests' runtime double and plugin harness; the kubelet's part is the project's one
//! stand-in, `vcan_test_support::kubelet`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vcan_plugin::api::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use vcan_plugin::kubelet::registration::Registrar;
use vcan_plugin::pod::resources::{self, PodRef};
use vcan_plugin::pod::runtime::{RuntimeError, Sandbox, SandboxLookup};
use vcan_plugin::resource::{DeviceSet, ResourceName};
use vcan_plugin::serve::ResourceServer;
use vcan_plugin::serve::private::PrivateVcans;
use vcan_plugin::telemetry::health::Health;
use vcan_plugin::telemetry::metrics::Metrics;
use vcan_plugin::uds;
use vcan_test_support::kubelet::Kubelet;

/// The resource the host tests' plugin serves.
pub const RESOURCE: &str = "example.com/vcan";

/// Generous: on a loaded machine an event can take long; a timeout only says a test failed.
pub const WAIT: Duration = Duration::from_secs(60);

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

/// Everything a plugin test needs: a temp kubelet directory, the runtime double and the
/// plugin's server. The kubelet stand-in is started separately ([`Harness::start_kubelet`]), so
/// a test can run the plugin before any kubelet exists.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub runtime: Arc<FakeRuntime>,
    pub server: Arc<ResourceServer>,
    pub metrics: Arc<Metrics>,
    pub health: watch::Sender<Health>,
    devices: usize,
}

impl Harness {
    pub fn new(devices: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = Arc::new(FakeRuntime::default());
        let (health, _) = watch::channel(Health::Healthy);
        let server = Arc::new(new_server(dir.path(), runtime.clone(), devices));
        Harness {
            dir,
            runtime,
            server,
            metrics: Arc::new(Metrics::new(&[RESOURCE.to_string()], "none")),
            health,
            devices,
        }
    }

    /// Starts the kubelet stand-in on this harness's directories.
    pub async fn start_kubelet(&self) -> Kubelet {
        Kubelet::start(self.dir.path(), &pod_resources_socket(self.dir.path()))
            .await
            .expect("kubelet stand-in starts")
    }

    /// A server with nothing in memory, as a restarted plugin process has.
    pub fn fresh_server(&self) -> ResourceServer {
        new_server(self.dir.path(), self.runtime.clone(), self.devices)
    }

    /// Starts the registrar in the background; returns its stop token and its registered flag.
    pub fn start_registrar(&self) -> (CancellationToken, Arc<AtomicBool>) {
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

    /// A device-plugin client on the plugin's socket, once the plugin serves it.
    pub async fn client(&self) -> DevicePluginClient<tonic::transport::Channel> {
        let path = self.dir.path().join("example.com-vcan.sock");
        // The socket's accepting a connection is the event; nothing announces it sooner.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match uds::connect(&path).await {
                Ok(channel) => return DevicePluginClient::new(channel),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    panic!("plugin socket {} never answered: {e}", path.display())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

/// Where the kubelet stand-in serves PodResources: in a subdirectory, as on a node, so the
/// kubelet's clean-up of the device-plugin directory leaves it alone.
fn pod_resources_socket(dir: &Path) -> PathBuf {
    dir.join("pod-resources/kubelet.sock")
}

fn new_server(dir: &Path, runtime: Arc<FakeRuntime>, devices: usize) -> ResourceServer {
    let resource: ResourceName = RESOURCE.parse().expect("resource");
    ResourceServer::new(
        resource.clone(),
        DeviceSet::new(&resource, devices),
        resources::PodResources::new(&pod_resources_socket(dir)),
        runtime,
        None,
        Arc::new(PrivateVcans),
    )
}

/// Waits until the plugin's registrar marks itself registered (it has no event to wait on).
pub async fn wait_registered(flag: &AtomicBool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !flag.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked registered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
