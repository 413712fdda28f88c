//! The kubelet stand-in: the kubelet's part, played through the kubelet's own APIs, for the host
//! tests and the end-to-end tests alike.
//!
//! - the device manager: a Registration server on `kubelet.sock` that dials back into each plugin
//!   before answering, reads its options and consumes its ListAndWatch stream (each accepted
//!   registration is a [`Registered`]); Allocate at admission and PreStartContainer with the
//!   kubelet's timeout, in the kubelet's order;
//! - the PodResources v1 server, listing the admitted pods;
//! - the kubelet's restart behaviour: the process dies (every plugin connection closes), the new
//!   one deletes every file in the device-plugin directory and serves a fresh `kubelet.sock`.
//!
//! Tests wait on its events ([`Kubelet::next_registration`], [`Kubelet::wait_until`]), never on
//! fixed sleeps.
//!
//! ```no_run
//! # async fn demo(dir: &std::path::Path) -> anyhow::Result<()> {
//! use std::time::Duration;
//! use vcan_test_support::kubelet::Kubelet;
//!
//! let mut kubelet = Kubelet::start(dir, &dir.join("pod-resources/kubelet.sock")).await?;
//! // ... start the plugin with `dir` as its device-plugin directory ...
//! let registered = kubelet.next_registration(Duration::from_secs(60)).await?;
//! assert_eq!(registered.request.version, "v1beta1");
//! kubelet
//!     .wait_for_resource("socketcan.io/vcan", 4, Duration::from_secs(60))
//!     .await?;
//! let pod = kubelet
//!     .admit("default", "app", &[("main".into(), "socketcan.io/vcan".into(), 2)])
//!     .await?;
//! kubelet.prestart(&pod.containers[0]).await?;
//! # Ok(())
//! # }
//! ```

mod pod_resources;
mod registration;

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::{Request, Status};
use vcan_plugin::api::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use vcan_plugin::api::deviceplugin::v1beta1::registration_server::RegistrationServer;
use vcan_plugin::api::deviceplugin::v1beta1::{
    AllocateRequest, ContainerAllocateRequest, DevicePluginOptions, Empty, PreStartContainerRequest,
};
use vcan_plugin::api::podresources::v1::pod_resources_lister_server::PodResourcesListerServer;
use vcan_plugin::uds;

use self::pod_resources::PodResourcesService;
pub use self::registration::Registered;
use self::registration::{Endpoint, RegistrationService};

/// The kubelet's PreStartContainer timeout (`KubeletPreStartContainerRPCTimeoutInSecs`).
pub const PRESTART_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Per container and resource, in spec order.
    pub containers: Vec<ContainerAllocation>,
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<String, Endpoint>,
    pods: Vec<PodAllocation>,
    /// Registrations accepted so far.
    generation: u64,
    /// While set, PodResources lists no pod, as a restarted kubelet does until it re-syncs.
    listing_empty: bool,
    /// How many of the next `List` calls are refused with ResourceExhausted.
    refused_lists: u32,
    /// `List` calls received so far, refused ones included.
    list_calls: u64,
}

/// What the servers and the [`Kubelet`] share.
struct Shared {
    state: Mutex<State>,
    /// Bumped after every change of `state`: what waiters wake on.
    changed: watch::Sender<u64>,
    /// Every accepted registration, for [`Kubelet::next_registration`].
    registered: mpsc::UnboundedSender<Registered>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; later readers may
        // still want to report what they see.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock())
    }

    /// Changes the state and wakes every waiter.
    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        out
    }
}

/// The kubelet stand-in; dropping it stops it like a killed kubelet.
pub struct Kubelet {
    dir: PathBuf,
    pod_resources_socket: PathBuf,
    shared: Arc<Shared>,
    registrations: mpsc::UnboundedReceiver<Registered>,
    /// The current kubelet process's life: cancelling it stops its servers and closes every
    /// ListAndWatch stream and pending registration.
    life: CancellationToken,
    /// The kubelet admits pods one at a time (its pod-add loop); concurrent admissions here
    /// would hand the same free devices to two pods.
    admission: tokio::sync::Mutex<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.life.cancel();
    }
}

/// What the kubelet's device manager does on start: remove every file in its directory.
fn remove_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

impl Kubelet {
    /// Starts serving `dir/kubelet.sock` and the PodResources socket, deleting every file in
    /// `dir` first as the kubelet does on start (directories, e.g. one holding the PodResources
    /// socket, are left alone).
    pub async fn start(dir: &Path, pod_resources_socket: &Path) -> Result<Self> {
        let (registered, registrations) = mpsc::unbounded_channel();
        let kubelet = Kubelet {
            dir: dir.to_path_buf(),
            pod_resources_socket: pod_resources_socket.to_path_buf(),
            shared: Arc::new(Shared {
                state: Mutex::default(),
                changed: watch::Sender::new(0),
                registered,
            }),
            registrations,
            life: CancellationToken::new(),
            admission: tokio::sync::Mutex::new(()),
        };
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        if let Some(parent) = pod_resources_socket.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        remove_files(dir)?;
        kubelet.listen()?;
        Ok(kubelet)
    }

    /// The device-plugin directory (`kubelet.sock` and the plugins' sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The PodResources socket.
    pub fn pod_resources_socket(&self) -> &Path {
        &self.pod_resources_socket
    }

    /// Serves `kubelet.sock` and the PodResources socket for the current life.
    fn listen(&self) -> Result<()> {
        // A socket file left by the previous life (outside `dir`, so not cleaned up) would make
        // bind fail.
        let _ = std::fs::remove_file(&self.pod_resources_socket);
        let registration =
            UnixListener::bind(self.dir.join("kubelet.sock")).context("bind kubelet.sock")?;
        let pod_resources = UnixListener::bind(&self.pod_resources_socket)
            .with_context(|| format!("bind {}", self.pod_resources_socket.display()))?;
        let service = RegistrationService {
            dir: self.dir.clone(),
            shared: self.shared.clone(),
            life: self.life.clone(),
        };
        let life = self.life.clone();
        tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(registration),
                    life.cancelled_owned(),
                )
                .await;
        });
        let service = PodResourcesService {
            shared: self.shared.clone(),
        };
        let life = self.life.clone();
        tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(PodResourcesListerServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(pod_resources),
                    life.cancelled_owned(),
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
        self.life.cancel();
        self.life = CancellationToken::new();
        self.shared.update(|state| state.endpoints.clear());
        remove_files(&self.dir)?;
        // Not synchronisation: the window a plugin may notice the clean-up in before the new
        // `kubelet.sock` exists.
        tokio::time::sleep(gap).await;
        self.listen()
    }

    /// Waits for the next registration the kubelet accepted (after dialling the plugin back and
    /// opening its ListAndWatch stream), failing after `timeout`. Registrations are kept across
    /// restarts until taken here.
    pub async fn next_registration(&mut self, timeout: Duration) -> Result<Registered> {
        match tokio::time::timeout(timeout, self.registrations.recv()).await {
            Ok(Some(registered)) => Ok(registered),
            Ok(None) => bail!("the kubelet stand-in stopped"),
            Err(_) => bail!("no registration within {timeout:?}"),
        }
    }

    /// The next accepted registration not yet taken, if any.
    pub fn try_next_registration(&mut self) -> Option<Registered> {
        self.registrations.try_recv().ok()
    }

    /// Waits until `done` holds, re-checking it after every change of the stand-in's state
    /// (registrations, snapshots, admissions, PodResources calls, restarts); fails after
    /// `timeout` saying `what` was awaited.
    pub async fn wait_until(
        &self,
        what: impl Display,
        timeout: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<()> {
        // Subscribing before the first check: a change in between wakes the loop at once.
        let mut changes = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(self) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self.shared`, so this cannot happen while `self` exists.
                Ok(Err(_)) => bail!("{what}: the kubelet stand-in stopped"),
                Err(_) => bail!("{what}: not within {timeout:?}"),
            }
        }
    }

    /// While `empty`, PodResources lists no pod at all (a kubelet re-syncing after a restart, or
    /// with its API server unreachable); allocations are kept.
    pub fn set_listing_empty(&self, empty: bool) {
        self.shared.update(|state| state.listing_empty = empty);
    }

    /// Refuses the next `calls` PodResources `List` calls with ResourceExhausted, like the
    /// kubelet's rate limiter.
    pub fn refuse_lists(&self, calls: u32) {
        self.shared.update(|state| state.refused_lists = calls);
    }

    /// How many PodResources `List` calls the kubelet received so far, refused ones included.
    pub fn list_calls(&self) -> u64 {
        self.shared.read(|state| state.list_calls)
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
        self.shared.read(|state| state.generation)
    }

    /// Whether `resource` is registered with a stream that delivered its devices.
    pub fn is_registered(&self, resource: &str) -> bool {
        self.shared.read(|state| {
            state
                .endpoints
                .get(resource)
                .is_some_and(|e| !e.devices.is_empty())
        })
    }

    /// Waits until `resource` is registered with at least `healthy` healthy devices.
    pub async fn wait_for_resource(
        &self,
        resource: &str,
        healthy: usize,
        timeout: Duration,
    ) -> Result<()> {
        self.wait_until(
            format_args!("{resource}: {healthy} healthy devices"),
            timeout,
            |kubelet| kubelet.healthy_devices(resource) >= healthy,
        )
        .await
        .with_context(|| format!("{resource}: {} healthy now", self.healthy_devices(resource)))
    }

    /// How many healthy devices `resource` advertises now.
    pub fn healthy_devices(&self, resource: &str) -> usize {
        self.shared.read(|state| {
            state
                .endpoints
                .get(resource)
                .map(|e| e.devices.values().filter(|h| **h).count())
                .unwrap_or(0)
        })
    }

    /// Whether the plugin for `resource` asked for PreStartContainer calls.
    pub fn prestart_required(&self, resource: &str) -> bool {
        self.shared.read(|state| {
            state
                .endpoints
                .get(resource)
                .is_some_and(|e| e.options.pre_start_required)
        })
    }

    fn endpoint(&self, resource: &str) -> Result<Endpoint> {
        self.shared
            .read(|state| state.endpoints.get(resource).cloned())
            .with_context(|| format!("endpoint stopped: no plugin registered for {resource}"))
    }

    /// Admits a pod: picks free healthy devices for each (container, resource, count) request
    /// and calls Allocate per container, recording the allocation (what PodResources then
    /// reports).
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
            let (ids, mut client) = self.shared.read(|state| {
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
                Ok((free, endpoint.client.clone()))
            })?;
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
        self.shared.update(|state| state.pods.push(pod.clone()));
        Ok(pod)
    }

    /// Records a pod as admitted with exactly these devices per (container, resource, IDs),
    /// without calling Allocate, replacing any pod of that name: for tests that choose the IDs
    /// themselves (the kubelet lists pods restored from its checkpoint the same way).
    pub fn record_pod(&self, namespace: &str, name: &str, containers: &[(&str, &str, &[&str])]) {
        let pod = PodAllocation {
            namespace: namespace.to_string(),
            name: name.to_string(),
            containers: containers
                .iter()
                .map(|(container, resource, ids)| ContainerAllocation {
                    container: container.to_string(),
                    resource: resource.to_string(),
                    ids: ids.iter().map(|id| id.to_string()).collect(),
                    envs: HashMap::new(),
                })
                .collect(),
        };
        self.shared.update(|state| {
            state
                .pods
                .retain(|p| !(p.namespace == namespace && p.name == name));
            state.pods.push(pod);
        });
    }

    /// Calls PreStartContainer for one container's devices, with the kubelet's timeout (not at
    /// all if the plugin did not ask for it).
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
        self.shared.update(|state| {
            state
                .pods
                .retain(|p| !(p.namespace == namespace && p.name == name));
        });
    }

    /// The admitted pods.
    pub fn pods(&self) -> Vec<PodAllocation> {
        self.shared.read(|state| state.pods.clone())
    }
}
