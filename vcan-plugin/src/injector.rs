//! Putting a pod's vcan interfaces into its network namespace.
//!
//! PreStartContainer carries only device IDs. The injector finds the pod holding them (PodResources),
//! its sandbox (the runtime), reads its annotations and creates every interface of the pod in the
//! sandbox's namespace. All containers of a pod share that namespace, so any container's PreStart
//! creates the pod's whole set, and repeating it (container restarts, sibling containers) finds the
//! interfaces already there. Nothing here holds a lock across slow work, so pods never wait on each
//! other.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Code;

use crate::bus::{self, Bus, BusError, MemberConfigError};
use crate::ebpf::{Attachment, Counters, EbpfError};
use crate::link::{LinkError, LinkInfo, Links, VcanSpec};
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::pod_config::{self, PodConfigError};
use crate::podresources::{self, PodDevices, PodRef, PodResources, PodResourcesError};
use crate::resource::{DeviceSet, ResourceName};
use crate::runtime::{RuntimeError, SandboxLookup};

/// The environment variable that lists a container's interface names.
pub const INTERFACES_ENV: &str = "VCAN_INTERFACES";

/// A pod whose interfaces the plugin created or adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedPod {
    /// The pod.
    pub pod: PodRef,
    /// The runtime's sandbox ID.
    pub sandbox: String,
    /// The sandbox's network namespace.
    pub netns: PathBuf,
    /// The interfaces, as created.
    pub interfaces: Vec<LinkInfo>,
    /// Frame counters attached to the interfaces (empty when counting is unavailable).
    pub attachments: Vec<Attachment>,
}

/// How long each part of a PreStart took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PreStartTimings {
    /// Finding the pod in PodResources.
    pub pod_lookup: Duration,
    /// Finding its sandbox and namespace in the runtime.
    pub namespace_lookup: Duration,
    /// Creating the links.
    pub link_creation: Duration,
    /// Attaching the frame counters.
    pub bpf_attach: Duration,
}

/// Why a PreStart (or Allocate) failed; the message is what the pod's events show.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
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
        "pod {0} uses hostNetwork: vcan interfaces are per pod and the plugin never creates them \
         in the node's namespace; remove hostNetwork: true or do not request the resource"
    )]
    HostNetwork(PodRef),
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
    /// Creating an interface failed.
    #[error("pod {pod}: {source}")]
    Link {
        /// The pod.
        pod: PodRef,
        /// What failed.
        source: Box<LinkError>,
    },
}

impl InjectError {
    /// The gRPC status code the kubelet should see.
    pub fn code(&self) -> Code {
        match self {
            InjectError::InvalidIds(_) => Code::InvalidArgument,
            InjectError::PodResources(PodResourcesError::NotFound { .. }) => Code::NotFound,
            InjectError::PodResources(PodResourcesError::Ambiguous { .. }) => {
                Code::FailedPrecondition
            }
            InjectError::PodResources(_)
            | InjectError::Runtime(RuntimeError::Unavailable { .. }) => Code::Unavailable,
            InjectError::Runtime(_) => Code::NotFound,
            InjectError::HostNetwork(_)
            | InjectError::PodConfig { .. }
            | InjectError::BusMember { .. } => Code::FailedPrecondition,
            InjectError::Link { .. } | InjectError::Counters { .. } | InjectError::Bus { .. } => {
                Code::Internal
            }
        }
    }
}

impl From<InjectError> for tonic::Status {
    fn from(e: InjectError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// Creates pods' interfaces and remembers which pods it served.
pub struct Injector {
    resource: ResourceName,
    devices: DeviceSet,
    pod_resources: PodResources,
    runtime: Arc<dyn SandboxLookup>,
    /// Served pods by sandbox ID. Held only for map updates, never across I/O.
    served: Mutex<HashMap<String, ServedPod>>,
    /// Devices held by pods at the last look at PodResources.
    allocated: AtomicUsize,
    metrics: Arc<Metrics>,
    counters: Option<Arc<Counters>>,
    /// Set when the resource is a shared bus rather than private vcans.
    bus: Option<Arc<Bus>>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("resource", &self.resource)
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl Injector {
    /// An injector for `resource`'s `devices`.
    pub fn new(
        resource: ResourceName,
        devices: DeviceSet,
        pod_resources: PodResources,
        runtime: Arc<dyn SandboxLookup>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Injector {
            resource,
            devices,
            pod_resources,
            runtime,
            served: Mutex::new(HashMap::new()),
            allocated: AtomicUsize::new(0),
            metrics,
            counters: None,
            bus: None,
        }
    }

    /// Serves the shared bus `bus` instead of private vcans: each pod holding the resource joins
    /// the bus with one interface.
    pub fn with_bus(mut self, bus: Arc<Bus>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// The shared bus served, if the resource is one.
    pub fn bus(&self) -> Option<&Arc<Bus>> {
        self.bus.as_ref()
    }

    /// Attaches frame counters to every interface created from now on.
    pub fn with_counters(mut self, counters: Arc<Counters>) -> Self {
        self.counters = Some(counters);
        self
    }

    /// The frame counters, if counting is available.
    pub fn counters(&self) -> Option<&Arc<Counters>> {
        self.counters.as_ref()
    }

    /// The metrics requests are recorded in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Devices held by pods, as of the last PodResources query.
    pub fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    fn note_allocations(&self, pods: &[PodDevices]) {
        self.allocated.store(
            pods.iter().map(|p| p.device_ids.len()).sum(),
            Ordering::Relaxed,
        );
    }

    /// The resource served.
    pub fn resource(&self) -> &ResourceName {
        &self.resource
    }

    /// The advertised devices.
    pub fn devices(&self) -> &DeviceSet {
        &self.devices
    }

    /// Rejects empty, unknown or repeated device IDs.
    pub fn check_ids(&self, ids: &[String]) -> Result<(), InjectError> {
        if ids.is_empty() {
            return Err(InjectError::InvalidIds(format!(
                "no device IDs given for {}",
                self.resource
            )));
        }
        let mut seen = HashSet::new();
        for id in ids {
            if !self.devices.contains(id) {
                return Err(InjectError::InvalidIds(format!(
                    "unknown device ID {id:?} for {}",
                    self.resource
                )));
            }
            if !seen.insert(id) {
                return Err(InjectError::InvalidIds(format!(
                    "device ID {id:?} appears more than once"
                )));
            }
        }
        Ok(())
    }

    /// The environment for a container allocated `ids`.
    ///
    /// Allocate runs at admission, before the pod's sandbox exists and without the pod's identity,
    /// so the names are the defaults for a pod whose only requesting container holds these devices;
    /// pods that rename interfaces by annotation already know their names.
    pub fn allocate_env(&self, ids: &[String]) -> Result<HashMap<String, String>, InjectError> {
        self.check_ids(ids)?;
        if let Some(bus) = &self.bus {
            if ids.len() > 1 {
                return Err(InjectError::InvalidIds(format!(
                    "{} devices of {} requested by one container: a pod joins a bus with one \
                     interface, request {}: 1",
                    ids.len(),
                    self.resource,
                    self.resource
                )));
            }
            return Ok(HashMap::from([(
                INTERFACES_ENV.to_string(),
                bus.spec().interface.clone(),
            )]));
        }
        let names: Vec<String> = (0..ids.len()).map(pod_config::default_name).collect();
        Ok(HashMap::from([(
            INTERFACES_ENV.to_string(),
            names.join(","),
        )]))
    }

    /// Creates the interfaces of the pod holding `ids`, returning once they are up.
    pub async fn prestart(
        &self,
        ids: &[String],
    ) -> Result<(ServedPod, PreStartTimings), InjectError> {
        self.check_ids(ids)?;
        let mut timings = PreStartTimings::default();
        let started = Instant::now();
        let resource = self.resource.to_string();
        let pods = self.pod_resources.pods_with(&resource).await?;
        self.note_allocations(&pods);
        let owner = podresources::owner_of(pods, &resource, ids)?;
        timings.pod_lookup = started.elapsed();
        let served = self.inject(owner, &mut timings).await?;
        Ok((served, timings))
    }

    async fn inject(
        &self,
        owner: PodDevices,
        timings: &mut PreStartTimings,
    ) -> Result<ServedPod, InjectError> {
        let started = Instant::now();
        let sandbox = self.runtime.sandbox(&owner.pod).await?;
        timings.namespace_lookup = started.elapsed();
        let netns = sandbox
            .netns
            .clone()
            .ok_or_else(|| InjectError::HostNetwork(owner.pod.clone()))?;
        if let Some(bus) = self.bus.clone() {
            let served = self.join_bus(bus, owner, sandbox, netns, timings).await?;
            self.lock_served()
                .insert(served.sandbox.clone(), served.clone());
            return Ok(served);
        }
        let specs = pod_config::interfaces(
            self.resource.domain(),
            &sandbox.annotations,
            owner.device_ids.len(),
        )
        .map_err(|source| InjectError::PodConfig {
            pod: owner.pod.clone(),
            source,
        })?;

        let target = Netns::Path(netns.clone());
        let counters = self.counters.clone();
        let created =
            tokio::task::spawn_blocking(move || create_and_count(&target, &specs, counters))
                .await
                .map_err(|e| InjectError::Link {
                    pod: owner.pod.clone(),
                    source: Box::new(LinkError::Netns(crate::netns::NetnsError::Thread(
                        e.to_string(),
                    ))),
                })?;
        let (interfaces, attachments) = match created {
            Ok(c) => {
                timings.link_creation = c.link_time;
                timings.bpf_attach = c.bpf_time;
                (c.interfaces, c.attachments)
            }
            Err(CreateError::Link(source)) => {
                return Err(InjectError::Link {
                    pod: owner.pod.clone(),
                    source: Box::new(source),
                });
            }
            Err(CreateError::Counters(source)) => {
                return Err(InjectError::Counters {
                    pod: owner.pod.clone(),
                    source: Box::new(source),
                });
            }
        };

        let served = ServedPod {
            pod: owner.pod,
            sandbox: sandbox.id.clone(),
            netns,
            interfaces,
            attachments,
        };
        self.lock_served().insert(sandbox.id, served.clone());
        Ok(served)
    }

    /// Makes the pod a member of `bus`: its end of a vxcan pair, counted like a private
    /// interface, and the rules joining it to the other members, all in place on return.
    async fn join_bus(
        &self,
        bus: Arc<Bus>,
        owner: PodDevices,
        sandbox: crate::runtime::Sandbox,
        netns: PathBuf,
        timings: &mut PreStartTimings,
    ) -> Result<ServedPod, InjectError> {
        let pod = owner.pod.clone();
        let config = bus::member_config(self.resource.domain(), &sandbox.annotations, bus.spec())
            .map_err(|source| InjectError::BusMember {
            pod: pod.clone(),
            source: Box::new(source),
        })?;
        // A pod whose containers each hold a device joins once, under its lowest device.
        let bus_end = owner
            .device_ids
            .iter()
            .min()
            .and_then(|id| bus::bus_end_name(id))
            .ok_or_else(|| {
                InjectError::InvalidIds(format!("no device of {} for pod {pod}", self.resource))
            })?;
        let started = Instant::now();
        let target = Netns::Path(netns.clone());
        let pair = bus
            .join(&pod, &sandbox.id, &target, &bus_end, &config)
            .await
            .map_err(|source| InjectError::Bus {
                pod: pod.clone(),
                source: Box::new(source),
            })?;
        let link_time = started.elapsed();
        let attachment = match self.counters.clone() {
            Some(counters) => {
                let (ifname, ifindex) = (pair.name.clone(), pair.index);
                let attached = tokio::task::spawn_blocking(move || {
                    counters.attach_index(&target, &ifname, ifindex)
                })
                .await
                .map_err(|e| EbpfError::Attach {
                    ifname: pair.name.clone(),
                    ns: netns.display().to_string(),
                    detail: format!("the attaching thread failed: {e}"),
                })
                .and_then(|r| r);
                Some(attached.map_err(|source| InjectError::Counters {
                    pod: pod.clone(),
                    source: Box::new(source),
                })?)
            }
            None => None,
        };
        timings.link_creation = link_time;
        timings.bpf_attach = started.elapsed().saturating_sub(link_time);
        Ok(ServedPod {
            pod,
            sandbox: sandbox.id,
            netns,
            interfaces: vec![LinkInfo {
                index: pair.index,
                name: pair.name,
                kind: "vxcan".into(),
                mtu: pair.mtu.bytes(),
                up: true,
            }],
            attachments: attachment.into_iter().collect(),
        })
    }

    fn lock_served(&self) -> std::sync::MutexGuard<'_, HashMap<String, ServedPod>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts and
        // removals), so a poisoned lock is still usable.
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pods currently served.
    pub fn served(&self) -> Vec<ServedPod> {
        let mut pods: Vec<ServedPod> = self.lock_served().values().cloned().collect();
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        pods
    }

    /// Rebuilds the served pods from the kubelet and the runtime after a plugin restart.
    ///
    /// Every pod holding devices whose sandbox is running is adopted: its interfaces are ensured
    /// (creating nothing new when they exist), so state never depends on the previous process.
    /// Returns how many pods were adopted.
    pub async fn recover(&self) -> Result<usize, InjectError> {
        let pods = self
            .pod_resources
            .pods_with(&self.resource.to_string())
            .await?;
        self.note_allocations(&pods);
        let mut adopted = 0;
        for owner in pods {
            let pod = owner.pod.clone();
            let mut timings = PreStartTimings::default();
            match self.inject(owner, &mut timings).await {
                Ok(_) => adopted += 1,
                // Pods not started yet get their interfaces from their own PreStart.
                Err(e) => tracing::info!(%pod, reason = %e, "not adopting pod"),
            }
        }
        Ok(adopted)
    }

    /// Forgets pods that no longer hold devices or whose namespace is gone; returns them.
    pub async fn reconcile(&self) -> Result<Vec<ServedPod>, InjectError> {
        let pods = self
            .pod_resources
            .pods_with(&self.resource.to_string())
            .await?;
        self.note_allocations(&pods);
        let holders: HashSet<PodRef> = pods.into_iter().map(|p| p.pod).collect();
        let gone: Vec<ServedPod> = {
            let mut served = self.lock_served();
            let ids: Vec<String> = served
                .iter()
                .filter(|(_, s)| !holders.contains(&s.pod) || !s.netns.exists())
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| served.remove(id)).collect()
        };
        if let Some(bus) = &self.bus {
            let sandboxes: Vec<String> = gone.iter().map(|p| p.sandbox.clone()).collect();
            // Also run with no one gone: it removes a namespace left without members, e.g. by
            // members deleted while the plugin was down.
            match bus.leave(sandboxes).await {
                Ok(left) => {
                    for m in left {
                        tracing::info!(bus = %bus.spec().name, pod = %m.pod, "member left the bus");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "leaving the bus failed"),
            }
        }
        if let Some(counters) = self.counters.clone() {
            let attachments: Vec<Attachment> =
                gone.iter().flat_map(|p| p.attachments.clone()).collect();
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
        Ok(gone)
    }
}

/// What [`create_and_count`] made, and how long each half took.
struct Created {
    interfaces: Vec<LinkInfo>,
    attachments: Vec<Attachment>,
    link_time: Duration,
    bpf_time: Duration,
}

enum CreateError {
    Link(LinkError),
    Counters(EbpfError),
}

/// Creates `specs` in `target` and attaches the counters to each; blocking.
fn create_and_count(
    target: &Netns,
    specs: &[VcanSpec],
    counters: Option<Arc<Counters>>,
) -> Result<Created, CreateError> {
    let started = Instant::now();
    let mut links = Links::open(target).map_err(CreateError::Link)?;
    let interfaces = specs
        .iter()
        .map(|s| links.ensure_vcan(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CreateError::Link)?;
    let link_time = started.elapsed();
    let started = Instant::now();
    // Each attach enters the pod's namespace on a thread of its own and waits for netlink; the
    // interfaces of one pod attach in parallel.
    let attachments = match counters {
        Some(c) => std::thread::scope(|scope| {
            let handles: Vec<_> = interfaces
                .iter()
                .map(|l| {
                    let c = &c;
                    scope.spawn(move || c.attach_index(target, &l.name, l.index))
                })
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
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(CreateError::Counters)?,
        None => Vec::new(),
    };
    Ok(Created {
        interfaces,
        attachments,
        link_time,
        bpf_time: started.elapsed(),
    })
}
