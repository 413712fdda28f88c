//! The node's live state as the outside sees it: what `/metrics` renders at each scrape and what
//! `/readyz` answers, read from the resource servers, the buses and the device health.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::bus::Bus;
use crate::bus::timing::load::{DROP_REASONS, WAIT_BUCKETS};
use crate::control::request::FaultKind;
use crate::hardware::Controller;
use crate::pod::sandbox_index::SandboxIndex;
use crate::serve::ResourceServer;
use crate::socketcand::server::Endpoint;
use crate::telemetry::bus_load::{FaultSample, MemberLabels, SenderSample, TimedBusSample};
use crate::telemetry::health::Health;
use crate::telemetry::http::StateSource;
use crate::telemetry::metrics::{
    BusFrames, BusSample, ResourceSample, SandboxIndexSample, Snapshot, TrafficSample,
    TunnelPeerSample, TunnelSample,
};
use crate::tunnel::endpoint::Tunnel;

/// One served resource with its registration flag and the health its devices are advertised with.
#[derive(Debug, Clone)]
pub struct ServedResource {
    /// The resource's server.
    pub server: Arc<ResourceServer>,
    /// True while the kubelet has accepted the resource's registration.
    pub registered: Arc<AtomicBool>,
    /// The health of its devices.
    pub health: watch::Receiver<Health>,
}

/// Everything a scrape or a readiness probe reads.
#[derive(Debug)]
pub struct NodeState {
    resources: Vec<ServedResource>,
    buses: Vec<Arc<Bus>>,
    controllers: Vec<Arc<Controller>>,
    tunnels: Vec<Arc<Tunnel>>,
    socketcand: Vec<Arc<Endpoint>>,
    sandbox_index: Option<Arc<SandboxIndex>>,
    vcan_health: watch::Receiver<Health>,
}

impl NodeState {
    /// The state of `resources`, `buses`, physical `controllers` (those passed through and the
    /// buses' uplinks) and bus `tunnels`; `vcan_health` says whether vcan can be created.
    pub fn new(
        resources: Vec<ServedResource>,
        buses: Vec<Arc<Bus>>,
        controllers: Vec<Arc<Controller>>,
        tunnels: Vec<Arc<Tunnel>>,
        vcan_health: watch::Receiver<Health>,
    ) -> Self {
        NodeState {
            resources,
            buses,
            controllers,
            tunnels,
            socketcand: Vec::new(),
            sandbox_index: None,
            vcan_health,
        }
    }

    /// The state with the buses' socketcand `endpoints` too.
    pub fn with_socketcand(mut self, endpoints: Vec<Arc<Endpoint>>) -> Self {
        self.socketcand = endpoints;
        self
    }

    /// The state with the index of the runtime's sandboxes too.
    pub fn with_sandbox_index(mut self, index: Arc<SandboxIndex>) -> Self {
        self.sandbox_index = Some(index);
        self
    }

    /// Every served pod's counters, read now; pods that went away have no series.
    pub fn traffic(&self) -> Vec<TrafficSample> {
        let mut samples = Vec::new();
        for r in &self.resources {
            let Some(counters) = r.server.counters() else {
                continue;
            };
            let served = r.server.served();
            let attachments: Vec<_> = served
                .iter()
                .flat_map(|pod| pod.attachments.iter().map(move |a| (pod, a)))
                .collect();
            let refs: Vec<_> = attachments.iter().map(|(_, a)| *a).collect();
            for ((pod, attachment), read) in attachments.iter().zip(counters.read_many(&refs)) {
                match read {
                    Ok(snapshot) => samples.push(TrafficSample::new(
                        &pod.pod.namespace,
                        &pod.pod.name,
                        &attachment.info.ifname,
                        snapshot,
                    )),
                    Err(e) => {
                        tracing::debug!(pod = %pod.pod, error = %e, "reading counters failed")
                    }
                }
            }
        }
        samples
    }

    /// Every bus's members and can-gw totals, read now; totals that could not be read are left
    /// out.
    pub fn buses(&self) -> Vec<BusSample> {
        self.buses
            .iter()
            .map(|bus| {
                let stats = bus.stats();
                if let Err(e) = &stats.frames {
                    tracing::debug!(bus = %bus.spec().name, error = %e, "reading bus counters failed");
                }
                BusSample {
                    bus: bus.spec().name.clone(),
                    members: stats.members,
                    frames: stats.frames.ok().map(|s| BusFrames {
                        forwarded: s.forwarded,
                        dropped: s.dropped,
                    }),
                }
            })
            .collect()
    }

    /// Every bus tunnel's counts, per peer.
    pub fn tunnels(&self) -> Vec<TunnelSample> {
        self.tunnels
            .iter()
            .map(|t| {
                let stats = t.stats();
                TunnelSample {
                    bus: t.bus().to_string(),
                    peers: stats
                        .peers
                        .iter()
                        .map(|(addr, p)| {
                            let seq = p.sequence.stats();
                            TunnelPeerSample {
                                peer: addr.to_string(),
                                kind: p.kind.label(),
                                tx: (p.tx_frames, p.tx_bytes, p.tx_packets),
                                rx: (p.rx_frames, p.rx_bytes, seq.received),
                                // Packets that arrived late were counted lost first and taken back: the
                                // sum only grows, as a counter must.
                                lost: seq.lost + seq.reordered,
                                reordered: seq.reordered,
                                last_seen: p.last_seen.and_then(|t| {
                                    t.duration_since(std::time::UNIX_EPOCH)
                                        .ok()
                                        .map(|d| d.as_secs_f64())
                                }),
                            }
                        })
                        .collect(),
                    dropped: stats.dropped.into_iter().collect(),
                }
            })
            .collect()
    }

    /// Every timed bus's load, shares and faults; every member and fault kind from zero.
    fn timed_buses(&self) -> Vec<TimedBusSample> {
        let counters = self.resources.iter().find_map(|r| r.server.counters());
        self.buses
            .iter()
            .filter_map(|bus| {
                let timed = bus.timed()?;
                let load = timed.load();
                let labels = |pod: &crate::pod::resources::PodRef| MemberLabels {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                };
                let mut ends: Vec<_> = timed.ends().into_values().collect();
                ends.sort_by(|a, b| a.pod.cmp(&b.pod));
                let senders = ends
                    .iter()
                    .map(|e| {
                        let share = load.senders.get(&e.pod).cloned().unwrap_or_default();
                        SenderSample {
                            member: labels(&e.pod),
                            frames: share.frames,
                            busy_seconds: share.busy.as_secs_f64(),
                            refused: match (counters, e.slot) {
                                (Some(c), Some(slot)) => c.tx_refused(slot),
                                _ => 0,
                            },
                        }
                    })
                    .collect();
                let faults = ends
                    .iter()
                    .filter(|e| !e.pod.namespace.is_empty())
                    .flat_map(|e| {
                        FaultKind::LABELS.iter().map(|kind| {
                            let key = (e.pod.clone(), *kind);
                            FaultSample {
                                member: labels(&e.pod),
                                kind,
                                injected: load.faults_injected.get(&key).copied().unwrap_or(0),
                                frames: load.fault_frames.get(&key).copied().unwrap_or(0),
                            }
                        })
                    })
                    .collect();
                let mut cumulative = 0;
                let wait_buckets = WAIT_BUCKETS
                    .iter()
                    .zip(load.wait_buckets)
                    .map(|(le, n)| {
                        cumulative += n;
                        (*le, cumulative)
                    })
                    .collect();
                Some(TimedBusSample {
                    bus: bus.spec().name.clone(),
                    bitrate: timed.timing().bitrate,
                    busy_seconds: load.busy.as_secs_f64(),
                    bits: load.bits,
                    frames: load.frames,
                    senders,
                    wait_buckets,
                    wait_count: cumulative + load.wait_over,
                    wait_sum: load.wait_sum.as_secs_f64(),
                    dropped: DROP_REASONS.iter().copied().zip(load.dropped).collect(),
                    faults_active: timed.faults_by_kind(),
                    faults,
                })
            })
            .collect()
    }

    fn resource_samples(&self) -> Vec<ResourceSample> {
        self.resources
            .iter()
            .map(|r| {
                let devices = r.server.devices().len();
                let (remembered, listed) = r.server.pod_lookups();
                ResourceSample {
                    resource: r.server.resource().to_string(),
                    devices,
                    healthy: if r.health.borrow().is_healthy() {
                        devices
                    } else {
                        0
                    },
                    allocated: r.server.allocated(),
                    pods_served: r.server.served().len(),
                    registered: r.registered.load(Ordering::SeqCst),
                    pod_lookups_remembered: remembered,
                    pod_lookups_listed: listed,
                }
            })
            .collect()
    }
}

impl StateSource for NodeState {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            resources: self.resource_samples(),
            vcan_supported: self.vcan_health.borrow().is_healthy(),
            traffic: self.traffic(),
            buses: self.buses(),
            controllers: self.controllers.iter().filter_map(|c| c.sample()).collect(),
            tunnels: self.tunnels(),
            socketcand: self.socketcand.iter().map(|e| e.sample()).collect(),
            timed_buses: self.timed_buses(),
            sandbox_index: self.sandbox_index.as_ref().map(|index| {
                let s = index.sample();
                SandboxIndexSample {
                    synced: s.synced,
                    sandboxes: s.sandboxes as u64,
                    hits: s.hits,
                    misses: s.misses,
                    resyncs: s.resyncs,
                    described_by_record: s.described_by_record,
                    described_by_cri: s.described_by_cri,
                }
            }),
        }
    }

    fn readiness(&self) -> (bool, bool) {
        (
            self.resources
                .iter()
                .all(|r| r.registered.load(Ordering::SeqCst)),
            self.vcan_health.borrow().is_healthy(),
        )
    }
}
