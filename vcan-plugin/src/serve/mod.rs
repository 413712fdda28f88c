//! Serving one extended resource: from the device IDs the kubelet hands over to interfaces in the
//! owning pod's network namespace, and back when the pod is gone.
//!
//! [`ResourceServer`] does what every resource needs — checking IDs, finding the owning pod
//! (PodResources) and its sandbox (the runtime), refusing the node's own namespace, counting
//! frames on what it created, remembering served pods and releasing them only once their sandbox
//! is gone — and leaves what the pod's interfaces are to a [`Provision`]: private vcans
//! ([`private::PrivateVcans`]) or membership of a shared bus ([`bus_member::BusMembership`]) or a physical
//! interface ([`passthrough::Passthrough`]).

pub mod bus_member;
pub mod passthrough;
pub mod private;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tonic::Code;

use crate::bus::{BusError, MemberConfigError};
use crate::ebpf::{Attachment, Counters, EbpfError};
use crate::kernel::link::{LinkError, LinkInfo};
use crate::kernel::netns::{self, Netns};
use crate::pod::annotations::PodConfigError;
use crate::pod::resources::{OwnerSource, PodDevices, PodRef, PodResources, PodResourcesError};
use crate::pod::runtime::{RuntimeError, Sandbox, SandboxLookup};
use crate::resource::{DeviceSet, ResourceName};
pub use crate::telemetry::metrics::PreStartTimings;

/// The environment variable that lists a container's interface names.
pub const INTERFACES_ENV: &str = "VCAN_INTERFACES";

/// A pod whose interfaces the plugin created or adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedPod {
    /// The pod.
    pub pod: PodRef,
    /// The pod's UID, as the runtime labels its sandbox.
    pub uid: String,
    /// The runtime's sandbox ID.
    pub sandbox: String,
    /// The sandbox's network namespace.
    pub netns: PathBuf,
    /// The interfaces, as created.
    pub interfaces: Vec<LinkInfo>,
    /// Frame counters attached to the interfaces (empty when counting is unavailable).
    pub attachments: Vec<Attachment>,
}

/// Why a PreStart (or Allocate) failed; the message is what the pod's events show.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The kubelet sent device IDs that make no sense.
    #[error("{0}")]
    InvalidIds(String),
    /// The owning pod could not be found.
    #[error(transparent)]
    PodResources(#[from] PodResourcesError),
    /// The pod's sandbox could not be found.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The pod shares the node's network namespace.
    #[error(
        "pod {0} uses hostNetwork: CAN interfaces are per pod and the plugin never creates them \
         in the node's namespace; remove hostNetwork: true or do not request the resource"
    )]
    HostNetwork(PodRef),
    /// The runtime named a namespace that is the node's (or the plugin's) own.
    #[error(
        "pod {pod}: the runtime reports network namespace {netns}, which is the node's own \
         namespace; refusing to create interfaces there (is the pod hostNetwork, or is the \
         runtime's state inconsistent?)"
    )]
    NodeNamespace {
        /// The pod.
        pod: PodRef,
        /// The namespace file.
        netns: String,
    },
    /// The pod's annotations are invalid.
    #[error("pod {pod}: {source}")]
    PodConfig {
        /// The pod.
        pod: PodRef,
        /// What is wrong.
        source: PodConfigError,
    },
    /// Attaching the frame counters failed.
    #[error("pod {pod}: attaching the CAN frame counters failed: {source}")]
    Counters {
        /// The pod.
        pod: PodRef,
        /// What failed.
        source: Box<EbpfError>,
    },
    /// The pod's annotations for a shared bus are invalid.
    #[error("pod {pod}: {source}")]
    BusMember {
        /// The pod.
        pod: PodRef,
        /// What is wrong.
        source: Box<MemberConfigError>,
    },
    /// Joining a shared bus failed.
    #[error("pod {pod}: {source}")]
    Bus {
        /// The pod.
        pod: PodRef,
        /// What failed.
        source: Box<BusError>,
    },
    /// Lending a physical interface failed.
    #[error("pod {pod}: {source}")]
    Hardware {
        /// The pod.
        pod: PodRef,
        /// What failed.
        source: Box<crate::hardware::HardwareError>,
    },
    /// Creating an interface failed.
    #[error("pod {pod}: {source}")]
    Link {
        /// The pod.
        pod: PodRef,
        /// What failed.
        source: Box<LinkError>,
    },
}

impl ServeError {
    /// The gRPC status code the kubelet should see.
    pub fn code(&self) -> Code {
        match self {
            ServeError::InvalidIds(_) => Code::InvalidArgument,
            ServeError::PodResources(PodResourcesError::NotFound { .. }) => Code::NotFound,
            ServeError::PodResources(PodResourcesError::Ambiguous { .. })
            | ServeError::Runtime(RuntimeError::Ambiguous { .. }) => Code::FailedPrecondition,
            ServeError::PodResources(_) | ServeError::Runtime(RuntimeError::Unavailable { .. }) => {
                Code::Unavailable
            }
            ServeError::Runtime(_) => Code::NotFound,
            ServeError::HostNetwork(_)
            | ServeError::NodeNamespace { .. }
            | ServeError::PodConfig { .. }
            | ServeError::BusMember { .. }
            | ServeError::Hardware { .. } => Code::FailedPrecondition,
            ServeError::Link { .. } | ServeError::Counters { .. } | ServeError::Bus { .. } => {
                Code::Internal
            }
        }
    }
}

impl From<ServeError> for tonic::Status {
    fn from(e: ServeError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// What a resource's interfaces are: the part that differs between private vcans, bus
/// membership and, later, other kinds of CAN interface.
#[async_trait::async_trait]
pub trait Provision: Send + Sync + 'static {
    /// The environment of a container allocated `ids` (already checked to be valid devices).
    fn allocate_env(
        &self,
        resource: &ResourceName,
        ids: &[String],
    ) -> Result<HashMap<String, String>, ServeError>;

    /// Makes `owner`'s interfaces in its sandbox's namespace `netns` (idempotent: a second call
    /// for the same pod finds them in place). Returns them as made.
    async fn provision(
        &self,
        resource: &ResourceName,
        owner: &PodDevices,
        sandbox: &Sandbox,
        netns: &Netns,
    ) -> Result<Vec<LinkInfo>, ServeError>;

    /// Called once the interfaces [`Provision::provision`] made are counted (`attachments`),
    /// before PreStart returns. The default does nothing.
    async fn counted(
        &self,
        _owner: &PodDevices,
        _attachments: &[Attachment],
        _counters: &Arc<Counters>,
    ) -> Result<(), ServeError> {
        Ok(())
    }

    /// Releases what `gone` pods held beyond their own namespace (which took their links with
    /// it). Called for every reconcile pass, also with none gone.
    async fn release(&self, gone: &[ServedPod]);

    /// Undoes what [`Provision::provision`] lent `owner`'s sandbox when a later step of serving
    /// it failed, so that nothing stays recorded for a pod that is not served. What a pod's own
    /// namespace holds needs no undoing (the next attempt finds it in place): the default does
    /// nothing.
    async fn abandon(&self, _owner: &PodDevices, _sandbox: &Sandbox) {}
}

/// The outcome of one [`ResourceServer::reconcile`] pass.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Pods whose sandbox is gone, now released.
    pub released: Vec<ServedPod>,
    /// Pods holding devices that were served for the first time by this pass.
    pub adopted: Vec<PodRef>,
    /// Why the PodResources listing could not be used this time, if it could not.
    pub listing_error: Option<String>,
}

/// A served pod and the pass that last confirmed it, so a release never removes an entry that a
/// PreStart refreshed in the meantime.
#[derive(Debug, Clone)]
struct Entry {
    pod: ServedPod,
    epoch: u64,
}

/// One extended resource: its devices, the pods served and how their interfaces are made.
pub struct ResourceServer {
    resource: ResourceName,
    devices: DeviceSet,
    pod_resources: PodResources,
    runtime: Arc<dyn SandboxLookup>,
    counters: Option<Arc<Counters>>,
    provision: Arc<dyn Provision>,
    /// Served pods by sandbox ID. Held only for map updates, never across I/O.
    served: Mutex<HashMap<String, Entry>>,
    epoch: AtomicU64,
    /// Devices held by pods at the last look at PodResources.
    allocated: AtomicUsize,
    /// PreStart's pod lookups answered by a listing made after the Allocate, and by a listing
    /// of their own.
    owners_remembered: AtomicU64,
    owners_listed: AtomicU64,
    /// Why each pod that could not be adopted was not, so the log says it once.
    not_adopted: Mutex<HashMap<PodRef, String>>,
}

impl std::fmt::Debug for ResourceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceServer")
            .field("resource", &self.resource)
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl ResourceServer {
    /// A server for `resource`'s `devices`, making interfaces with `provision`.
    pub fn new(
        resource: ResourceName,
        devices: DeviceSet,
        pod_resources: PodResources,
        runtime: Arc<dyn SandboxLookup>,
        counters: Option<Arc<Counters>>,
        provision: Arc<dyn Provision>,
    ) -> Self {
        ResourceServer {
            resource,
            devices,
            pod_resources,
            runtime,
            counters,
            provision,
            served: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            allocated: AtomicUsize::new(0),
            owners_remembered: AtomicU64::new(0),
            owners_listed: AtomicU64::new(0),
            not_adopted: Mutex::new(HashMap::new()),
        }
    }

    /// The resource served.
    pub fn resource(&self) -> &ResourceName {
        &self.resource
    }

    /// The advertised devices.
    pub fn devices(&self) -> &DeviceSet {
        &self.devices
    }

    /// The frame counters, if counting is available.
    pub fn counters(&self) -> Option<&Arc<Counters>> {
        self.counters.as_ref()
    }

    /// Devices held by pods, as of the last PodResources listing.
    pub fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    /// PreStart's pod lookups: (answered by the listing made after the Allocate, by a listing of
    /// their own).
    pub fn pod_lookups(&self) -> (u64, u64) {
        (
            self.owners_remembered.load(Ordering::Relaxed),
            self.owners_listed.load(Ordering::Relaxed),
        )
    }

    fn note_allocations(&self, pods: &[PodDevices]) {
        self.allocated.store(
            pods.iter().map(|p| p.device_ids.len()).sum(),
            Ordering::Relaxed,
        );
    }

    /// Rejects empty, unknown or repeated device IDs.
    pub fn check_ids(&self, ids: &[String]) -> Result<(), ServeError> {
        if ids.is_empty() {
            return Err(ServeError::InvalidIds(format!(
                "no device IDs given for {}",
                self.resource
            )));
        }
        let mut seen = HashSet::new();
        for id in ids {
            if !self.devices.contains(id) {
                return Err(ServeError::InvalidIds(format!(
                    "unknown device ID {id:?} for {}",
                    self.resource
                )));
            }
            if !seen.insert(id) {
                return Err(ServeError::InvalidIds(format!(
                    "device ID {id:?} appears more than once"
                )));
            }
        }
        Ok(())
    }

    /// The environment for a container allocated `ids`.
    pub fn allocate_env(&self, ids: &[String]) -> Result<HashMap<String, String>, ServeError> {
        self.check_ids(ids)?;
        self.provision.allocate_env(&self.resource, ids)
    }

    /// Notes that the kubelet allocated `ids` (checked by [`ResourceServer::allocate_env`]), so
    /// that the owner is listed before the container's PreStart asks for it.
    pub fn note_allocate(&self, ids: &[String]) {
        self.pod_resources
            .allocated(&self.resource.to_string(), ids);
    }

    /// Makes the interfaces of the pod holding `ids`, returning once they are up.
    #[tracing::instrument(name = "prestart", skip_all, fields(resource = %self.resource, devices = ids.len()))]
    pub async fn prestart(
        &self,
        ids: &[String],
    ) -> Result<(ServedPod, PreStartTimings), ServeError> {
        self.check_ids(ids)?;
        let mut timings = PreStartTimings::default();
        let started = Instant::now();
        let resource = self.resource.to_string();
        let found = self.pod_resources.owner(&resource, ids).await?;
        self.note_allocations(&found.pods);
        match found.source {
            OwnerSource::Remembered => &self.owners_remembered,
            OwnerSource::Listed => &self.owners_listed,
        }
        .fetch_add(1, Ordering::Relaxed);
        timings.pod_lookup = started.elapsed();
        let served = self.serve(found.owner, &mut timings).await?;
        Ok((served, timings))
    }

    #[tracing::instrument(skip_all, fields(pod = %owner.pod))]
    async fn serve(
        &self,
        owner: PodDevices,
        timings: &mut PreStartTimings,
    ) -> Result<ServedPod, ServeError> {
        let started = Instant::now();
        let sandbox = self.runtime.sandbox(&owner.pod).await?;
        timings.namespace_lookup = started.elapsed();
        let path = sandbox
            .netns
            .clone()
            .ok_or_else(|| ServeError::HostNetwork(owner.pod.clone()))?;
        if netns::is_node_namespace(&path) {
            return Err(ServeError::NodeNamespace {
                pod: owner.pod.clone(),
                netns: path.display().to_string(),
            });
        }
        let target = Netns::Path(path.clone());
        let started = Instant::now();
        let interfaces = self
            .provision
            .provision(&self.resource, &owner, &sandbox, &target)
            .await?;
        timings.link_creation = started.elapsed();
        let started = Instant::now();
        let attachments = match self.counters.clone() {
            Some(counters) => {
                let links = interfaces.clone();
                let ns = target.clone();
                let attached =
                    tokio::task::spawn_blocking(move || attach_all(&counters, &ns, &links))
                        .await
                        .unwrap_or_else(|e| {
                            Err(EbpfError::Attach {
                                ifname: String::new(),
                                ns: target.to_string(),
                                detail: format!("the attaching thread failed: {e}"),
                            })
                        });
                match attached {
                    Ok(a) => {
                        if let Some(counters) = &self.counters
                            && let Err(e) = self.provision.counted(&owner, &a, counters).await
                        {
                            self.provision.abandon(&owner, &sandbox).await;
                            return Err(e);
                        }
                        a
                    }
                    Err(source) => {
                        // The pod is not served: what was lent to it must not stay recorded.
                        self.provision.abandon(&owner, &sandbox).await;
                        return Err(ServeError::Counters {
                            pod: owner.pod.clone(),
                            source: Box::new(source),
                        });
                    }
                }
            }
            None => Vec::new(),
        };
        timings.bpf_attach = started.elapsed();
        let served = ServedPod {
            pod: owner.pod,
            uid: sandbox.uid,
            sandbox: sandbox.id,
            netns: path,
            interfaces,
            attachments,
        };
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.lock_served().insert(
            served.sandbox.clone(),
            Entry {
                pod: served.clone(),
                epoch,
            },
        );
        Ok(served)
    }

    fn lock_served(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // Single inserts and removals cannot leave the map half-updated: a poisoned lock is usable.
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pods currently served.
    pub fn served(&self) -> Vec<ServedPod> {
        let mut pods: Vec<ServedPod> = self.lock_served().values().map(|e| e.pod.clone()).collect();
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        pods
    }

    /// Whether the sandbox of a served pod is gone: its namespace file no longer exists, or the
    /// runtime's `ready` sandboxes (`None`: the runtime cannot answer, which proves nothing) do
    /// not include it.
    fn is_gone(pod: &ServedPod, ready: Option<&HashSet<String>>) -> bool {
        !pod.netns.exists() || ready.is_some_and(|ready| !ready.contains(&pod.sandbox))
    }

    /// One pass: releases pods whose sandbox is gone, then serves pods that hold devices but are
    /// not served yet (after a plugin restart, or whose earlier adoption failed).
    ///
    /// Only the sandbox decides that a pod is gone; PodResources, which can be empty or
    /// unavailable for minutes after a kubelet restart, is used only to find pods to adopt.
    #[tracing::instrument(name = "reconcile", skip_all, fields(resource = %self.resource))]
    pub async fn reconcile(&self) -> Reconciled {
        let mut report = Reconciled::default();
        let snapshot: Vec<Entry> = self.lock_served().values().cloned().collect();
        let ready = if snapshot.is_empty() {
            None
        } else {
            self.runtime
                .ready_sandboxes()
                .await
                .inspect_err(|e| tracing::debug!(resource = %self.resource, error = %e, "sandbox states unknown; keeping every pod"))
                .ok()
        };
        let gone: Vec<Entry> = snapshot
            .into_iter()
            .filter(|e| Self::is_gone(&e.pod, ready.as_ref()))
            .collect();
        let released: Vec<ServedPod> = {
            let mut served = self.lock_served();
            let mut released = Vec::new();
            for e in gone {
                // A PreStart that refreshed the entry meanwhile found the sandbox alive.
                if served
                    .get(&e.pod.sandbox)
                    .is_some_and(|now| now.epoch == e.epoch)
                    && let Some(entry) = served.remove(&e.pod.sandbox)
                {
                    released.push(entry.pod);
                }
            }
            released
        };
        self.provision.release(&released).await;
        if let Some(counters) = self.counters.clone() {
            let attachments: Vec<Attachment> = released
                .iter()
                .flat_map(|p| p.attachments.clone())
                .collect();
            // Detaching enters namespaces and sweeping reads the kernel: blocking work.
            let _ = tokio::task::spawn_blocking(move || {
                for a in &attachments {
                    if let Err(e) = counters.detach(a) {
                        tracing::warn!(ifname = %a.info.ifname, error = %e, "detaching counters failed");
                    }
                }
                if let Err(e) = counters.sweep() {
                    tracing::warn!(error = %e, "sweeping counters failed");
                }
            })
            .await;
        }
        report.released = released;

        match self
            .pod_resources
            .pods_with(&self.resource.to_string())
            .await
        {
            Ok(pods) => {
                self.note_allocations(&pods);
                let served: HashSet<PodRef> = self
                    .lock_served()
                    .values()
                    .map(|e| e.pod.pod.clone())
                    .collect();
                let listed: HashSet<PodRef> = pods.iter().map(|p| p.pod.clone()).collect();
                prune_not_adopted(&mut self.lock_not_adopted(), &listed, &served);
                for owner in pods.into_iter().filter(|p| !served.contains(&p.pod)) {
                    let pod = owner.pod.clone();
                    let mut timings = PreStartTimings::default();
                    match self.serve(owner, &mut timings).await {
                        Ok(_) => {
                            self.lock_not_adopted().remove(&pod);
                            report.adopted.push(pod);
                        }
                        Err(e) => {
                            let reason = e.to_string();
                            let mut not_adopted = self.lock_not_adopted();
                            if not_adopted.get(&pod) != Some(&reason) {
                                // Pods not started yet get their interfaces from their PreStart.
                                tracing::info!(resource = %self.resource, %pod, %reason, "not adopting pod yet");
                                not_adopted.insert(pod, reason);
                            }
                        }
                    }
                }
            }
            Err(e) => report.listing_error = Some(e.to_string()),
        }
        report
    }

    fn lock_not_adopted(&self) -> std::sync::MutexGuard<'_, HashMap<PodRef, String>> {
        self.not_adopted.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps the reasons of pods that are still listed and still not served, so the map does not
/// grow with pod churn (a pod deleted before it was adopted is never listed again).
fn prune_not_adopted(
    not_adopted: &mut HashMap<PodRef, String>,
    listed: &HashSet<PodRef>,
    served: &HashSet<PodRef>,
) {
    not_adopted.retain(|pod, _| listed.contains(pod) && !served.contains(pod));
}

/// Attaches the counters to every link; each attach enters the namespace on a thread of its own
/// and waits for netlink, so one pod's interfaces attach in parallel.
fn attach_all(
    counters: &Counters,
    target: &Netns,
    links: &[LinkInfo],
) -> Result<Vec<Attachment>, EbpfError> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = links
            .iter()
            .map(|l| scope.spawn(move || counters.attach_index(target, &l.name, l.index)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(EbpfError::Attach {
                        ifname: String::new(),
                        ns: target.to_string(),
                        detail: "the attaching thread panicked".into(),
                    })
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn not_adopted_keeps_only_pods_still_listed_and_unserved() {
        let mut not_adopted: HashMap<PodRef, String> = ["gone", "waiting", "served-since"]
            .into_iter()
            .map(|n| (pod(n), "no ready sandbox".to_string()))
            .collect();
        let listed: HashSet<PodRef> = [pod("waiting"), pod("served-since"), pod("new")].into();
        let served: HashSet<PodRef> = [pod("served-since")].into();
        prune_not_adopted(&mut not_adopted, &listed, &served);
        assert_eq!(not_adopted.keys().collect::<Vec<_>>(), [&pod("waiting")]);
    }
}
