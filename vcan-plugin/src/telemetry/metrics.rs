//! Prometheus metrics.
//!
//! Request counters and latency histograms live in a registry for the process's lifetime. Everything
//! describing current state — devices, served pods and the per-pod CAN traffic — is built afresh at
//! each scrape from the live sources, so a pod's series disappear with the pod.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    Opts, Registry, TextEncoder,
};

/// How long each part of a PreStart took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PreStartTimings {
    /// Finding the pod in PodResources.
    pub pod_lookup: Duration,
    /// Finding its sandbox and namespace in the runtime.
    pub namespace_lookup: Duration,
    /// Creating the links (and, for buses, the rules).
    pub link_creation: Duration,
    /// Attaching the frame counters.
    pub bpf_attach: Duration,
}

/// Prefix of every metric.
pub const PREFIX: &str = "vcan_plugin";

/// Latency buckets in seconds, from 100 µs (Allocate) to the kubelet's 30 s PreStart timeout.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Whether a request succeeded, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Success,
    /// It failed.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
        }
    }
}

/// One interface's CAN traffic counters, as a scrape reads them; rendered as 32 series (per
/// direction: frames and bytes of 7 kinds, frames of 2 identifier formats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficSample {
    /// Kubernetes namespace of the pod.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Interface name inside the pod.
    pub interface: String,
    /// Both directions' counters.
    pub counters: crate::ebpf::CountersSnapshot,
}

impl TrafficSample {
    /// The sample of `pod`'s `interface` with `counters`.
    pub fn new(
        namespace: &str,
        pod: &str,
        interface: &str,
        counters: crate::ebpf::CountersSnapshot,
    ) -> Self {
        TrafficSample {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            interface: interface.to_string(),
            counters,
        }
    }
}

/// The node's current state, gathered for one scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every resource served (private vcans and each bus).
    pub resources: Vec<ResourceSample>,
    /// Whether the node can create vcan interfaces.
    pub vcan_supported: bool,
    /// CAN traffic per pod, interface, direction and kind.
    pub traffic: Vec<TrafficSample>,
    /// Shared buses: members and can-gw's counters.
    pub buses: Vec<BusSample>,
    /// Physical CAN controllers: where they are and their state.
    pub controllers: Vec<ControllerSample>,
    /// Tunnels of buses that span nodes.
    pub tunnels: Vec<TunnelSample>,
    /// The buses' socketcand endpoints.
    pub socketcand: Vec<SocketcandSample>,
    /// Timed buses: load, shares, waits, faults.
    pub timed_buses: Vec<super::bus_load::TimedBusSample>,
    /// The in-memory index of the runtime's pod sandboxes, if the runtime has an event stream.
    pub sandbox_index: Option<SandboxIndexSample>,
}

/// The index of pod sandboxes that PreStart reads instead of asking the runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxIndexSample {
    /// Whether it follows the runtime's events now (lookups are answered from memory).
    pub synced: bool,
    /// Ready sandboxes it knows.
    pub sandboxes: u64,
    /// Lookups answered from memory.
    pub hits: u64,
    /// Lookups that asked the runtime.
    pub misses: u64,
    /// Full listings of the runtime's sandboxes (each time the event stream opened).
    pub resyncs: u64,
    /// Sandboxes described from containerd's container record.
    pub described_by_record: u64,
    /// Sandboxes described by the CRI's verbose status.
    pub described_by_cri: u64,
}

/// One bus's socketcand endpoint for a scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SocketcandSample {
    /// The bus.
    pub bus: String,
    /// Clients connected now.
    pub clients: u64,
    /// Connections served since start.
    pub accepted: u64,
    /// Connections refused for the client limit.
    pub refused: u64,
    /// Frames written to clients (one per client).
    pub frames_to_clients: u64,
    /// Frames clients sent that went onto the bus.
    pub frames_from_clients: u64,
    /// Protocol bytes written to clients.
    pub bytes_to_clients: u64,
    /// Protocol bytes read from clients.
    pub bytes_from_clients: u64,
    /// Commands refused, by kind.
    pub protocol_errors: Vec<(&'static str, u64)>,
    /// Clients gone, by reason.
    pub disconnects: Vec<(&'static str, u64)>,
    /// Frames not passed on, by reason.
    pub dropped: Vec<(&'static str, u64)>,
}

/// One bus tunnel's counts for a scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TunnelSample {
    /// The bus.
    pub bus: String,
    /// Its current peers.
    pub peers: Vec<TunnelPeerSample>,
    /// Packets or frames dropped, by reason.
    pub dropped: Vec<(&'static str, u64)>,
}

/// Traffic with one tunnel peer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TunnelPeerSample {
    /// The peer's address and port.
    pub peer: String,
    /// `instance` (the plugin on another node) or `external`.
    pub kind: &'static str,
    /// Frames, payload bytes and packets sent to the peer.
    pub tx: (u64, u64, u64),
    /// Frames, payload bytes and packets received from it.
    pub rx: (u64, u64, u64),
    /// Its packets missing from the sequence.
    pub lost: u64,
    /// Its packets that arrived late.
    pub reordered: u64,
    /// When its last packet arrived (Unix seconds), if ever.
    pub last_seen: Option<f64>,
}

/// The controller states, as the `state` label says them.
pub const CONTROLLER_STATES: [&str; 6] = [
    "error_active",
    "error_warning",
    "error_passive",
    "bus_off",
    "stopped",
    "sleeping",
];

/// The controller events the kernel counts, as the `event` label says them.
pub const CONTROLLER_EVENTS: [&str; 6] = [
    "bus_error",
    "error_warning",
    "error_passive",
    "bus_off",
    "arbitration_lost",
    "restarts",
];

/// One physical CAN controller's state for a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControllerSample {
    /// The interface's name in the hardware configuration.
    pub controller: String,
    /// The netdev's current name.
    pub interface: String,
    /// Namespace of the pod holding it ("" when on the node or a bus).
    pub namespace: String,
    /// Pod holding it ("").
    pub pod: String,
    /// Bus using it as its uplink ("").
    pub bus: String,
    /// One of [`CONTROLLER_STATES`], if the driver reports a state.
    pub state: Option<&'static str>,
    /// The transmit and receive error counters, if reported.
    pub error_counters: Option<(u16, u16)>,
    /// Counts of [`CONTROLLER_EVENTS`], in that order, if reported.
    pub events: Option<[u64; 6]>,
}

/// One resource's state for a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceSample {
    /// The extended resource.
    pub resource: String,
    /// Devices advertised.
    pub devices: usize,
    /// Devices advertised healthy.
    pub healthy: usize,
    /// Devices held by pods.
    pub allocated: usize,
    /// Pods whose interfaces the plugin created or adopted.
    pub pods_served: usize,
    /// Whether the kubelet accepted the current registration.
    pub registered: bool,
    /// PreStart's pod lookups answered by the listing made after the Allocate.
    pub pod_lookups_remembered: u64,
    /// PreStart's pod lookups that listed the pods themselves.
    pub pod_lookups_listed: u64,
}

/// One shared bus's state for a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusSample {
    /// The bus's name.
    pub bus: String,
    /// Member pods.
    pub members: usize,
    /// Frames forwarded and dropped by the bus's can-gw rules; `None` when they could not be
    /// read, so the series are left out rather than reported as 0 (which reads as a reset).
    pub frames: Option<BusFrames>,
}

/// A bus's frame totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusFrames {
    /// Frames forwarded by the bus's can-gw rules.
    pub forwarded: u64,
    /// Frames the rules could not forward.
    pub dropped: u64,
}

/// The plugin's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    allocate_requests: IntCounterVec,
    prestart_requests: IntCounterVec,
    allocate_duration: Histogram,
    prestart_duration: Histogram,
    prestart_phase: HistogramVec,
    reconcile_passes: IntCounter,
}

pub(super) fn name(suffix: &str) -> String {
    format!("{PREFIX}_{suffix}")
}

impl Metrics {
    /// Metrics for `resources`, with build information (`attach_mode` of the eBPF program).
    pub fn new(resources: &[String], attach_mode: &str) -> Self {
        let registry = Registry::new();
        let allocate_requests = IntCounterVec::new(
            Opts::new(
                name("allocate_requests_total"),
                "Allocate calls from the kubelet, by outcome.",
            ),
            &["resource", "outcome"],
        )
        .expect("valid metric");
        let prestart_requests = IntCounterVec::new(
            Opts::new(
                name("prestart_requests_total"),
                "PreStartContainer calls from the kubelet, by outcome. Errors fail the container's start.",
            ),
            &["resource", "outcome"],
        )
        .expect("valid metric");
        let allocate_duration = Histogram::with_opts(
            HistogramOpts::new(
                name("allocate_duration_seconds"),
                "Time to answer Allocate.",
            )
            .buckets(BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let prestart_duration = Histogram::with_opts(
            HistogramOpts::new(
                name("prestart_duration_seconds"),
                "Time to answer PreStartContainer: until the pod's interfaces are up.",
            )
            .buckets(BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let prestart_phase = HistogramVec::new(
            HistogramOpts::new(
                name("prestart_phase_duration_seconds"),
                "Parts of PreStartContainer: pod_lookup (PodResources), namespace_lookup (runtime), \
                 link_creation (netlink), bpf_attach (counters).",
            )
            .buckets(BUCKETS.to_vec()),
            &["phase"],
        )
        .expect("valid metric");
        let reconcile_passes = IntCounter::with_opts(Opts::new(
            name("reconcile_passes_total"),
            "Finished reconcile passes (every 10 s): released pods whose sandbox is gone, adopted \
             running pods, returned physical interfaces.",
        ))
        .expect("valid metric");
        let build_info = GaugeVec::new(
            Opts::new(
                name("build_info"),
                "Build and node information; the value is always 1.",
            ),
            &["version", "kernel", "attach_mode"],
        )
        .expect("valid metric");
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), kernel.as_str(), attach_mode])
            .set(1.0);
        for c in [
            Box::new(allocate_requests.clone()) as Box<dyn Collector>,
            Box::new(prestart_requests.clone()),
            Box::new(allocate_duration.clone()),
            Box::new(prestart_duration.clone()),
            Box::new(prestart_phase.clone()),
            Box::new(reconcile_passes.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Known label values start at zero so rates and alerts work before the first event.
        for resource in resources {
            for outcome in [Outcome::Success, Outcome::Error] {
                allocate_requests.with_label_values(&[resource.as_str(), outcome.label()]);
                prestart_requests.with_label_values(&[resource.as_str(), outcome.label()]);
            }
        }
        for phase in [
            "pod_lookup",
            "namespace_lookup",
            "link_creation",
            "bpf_attach",
        ] {
            prestart_phase.with_label_values(&[phase]);
        }
        Metrics {
            registry,
            allocate_requests,
            prestart_requests,
            allocate_duration,
            prestart_duration,
            prestart_phase,
            reconcile_passes,
        }
    }

    /// Records a finished reconcile pass over every resource.
    pub fn reconcile_pass(&self) {
        self.reconcile_passes.inc();
    }

    /// Records an Allocate call for `resource`.
    pub fn allocate(&self, resource: &str, outcome: Outcome, took: Duration) {
        self.allocate_requests
            .with_label_values(&[resource, outcome.label()])
            .inc();
        self.allocate_duration.observe(took.as_secs_f64());
    }

    /// Records a PreStartContainer call for `resource` and, when it got that far, its parts.
    pub fn prestart(
        &self,
        resource: &str,
        outcome: Outcome,
        took: Duration,
        timings: Option<&PreStartTimings>,
    ) {
        self.prestart_requests
            .with_label_values(&[resource, outcome.label()])
            .inc();
        self.prestart_duration.observe(took.as_secs_f64());
        if let Some(t) = timings {
            for (phase, d) in [
                ("pod_lookup", t.pod_lookup),
                ("namespace_lookup", t.namespace_lookup),
                ("link_creation", t.link_creation),
                ("bpf_attach", t.bpf_attach),
            ] {
                self.prestart_phase
                    .with_label_values(&[phase])
                    .observe(d.as_secs_f64());
            }
        }
    }

    /// The Prometheus text exposition of everything, with `now` as the current state.
    pub fn render(&self, now: &Snapshot) -> String {
        let mut families = self.registry.gather();
        families.extend(state_families(now));
        // The text encoder refuses a family without series, failing the whole scrape.
        families.retain(|f| !f.get_metric().is_empty());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        let mut text = String::from_utf8(out).unwrap_or_default();
        write_traffic(&mut text, &now.traffic);
        text
    }
}

/// The sandbox index's series.
fn sandbox_index_families(index: &SandboxIndexSample) -> Vec<prometheus::proto::MetricFamily> {
    let synced = Gauge::with_opts(Opts::new(
        name("sandbox_index_synced"),
        "1 while the index of pod sandboxes follows the runtime's events, so that PreStart finds \
         a pod's namespace in memory; 0 while the stream is being (re)opened.",
    ))
    .expect("valid metric");
    synced.set(f64::from(u8::from(index.synced)));
    let sandboxes = Gauge::with_opts(Opts::new(
        name("sandbox_index_sandboxes"),
        "Ready pod sandboxes in the index.",
    ))
    .expect("valid metric");
    sandboxes.set(index.sandboxes as f64);
    let resyncs = IntCounter::with_opts(Opts::new(
        name("sandbox_index_resyncs_total"),
        "Full listings of the runtime's sandboxes: one each time its event stream opened.",
    ))
    .expect("valid metric");
    resyncs.inc_by(index.resyncs);
    let lookups = IntCounterVec::new(
        Opts::new(
            name("sandbox_lookups_total"),
            "Sandbox lookups of PreStart, by where the answer came from: index (memory) or \
             runtime (CRI calls: the pod was not indexed yet or the index was out of step).",
        ),
        &["source"],
    )
    .expect("valid metric");
    lookups.with_label_values(&["index"]).inc_by(index.hits);
    lookups.with_label_values(&["runtime"]).inc_by(index.misses);
    let descriptions = IntCounterVec::new(
        Opts::new(
            name("sandbox_descriptions_total"),
            "Sandboxes the index described, by how: record (containerd's container record, one \
             metadata read) or cri (the CRI's verbose status, when the record could not be read).",
        ),
        &["source"],
    )
    .expect("valid metric");
    descriptions
        .with_label_values(&["record"])
        .inc_by(index.described_by_record);
    descriptions
        .with_label_values(&["cri"])
        .inc_by(index.described_by_cri);
    let mut families = Vec::new();
    families.extend(synced.collect());
    families.extend(sandboxes.collect());
    families.extend(resyncs.collect());
    families.extend(lookups.collect());
    families.extend(descriptions.collect());
    families
}

/// Help text of the traffic families, in output order.
const TRAFFIC_FAMILIES: &[(&str, &str, &str)] = &[
    (
        "can_bytes_total",
        "kind",
        "CAN payload bytes (data length, not frame overhead) through a pod's interface; rx \
         includes vcan's echo of the pod's own frames.",
    ),
    (
        "can_frames_total",
        "kind",
        "CAN frames through a pod's interface, counted at tc egress (tx) and ingress (rx). vcan \
         echoes every frame a pod sends back to the pod's own sockets, so each sent frame also \
         counts once as rx.",
    ),
    (
        "can_id_format_frames_total",
        "id_format",
        "Classic, remote and FD frames through a pod's interface by identifier format: standard \
         (11-bit) or extended (29-bit); rx includes vcan's echo.",
    ),
];

/// Escapes a label value for the text format.
fn escape(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Appends the per-pod traffic families in the text format.
///
/// With a thousand interfaces these are tens of thousands of series per scrape: building them
/// through the client library's metric vectors cost ~100× more than writing the lines directly,
/// and the label values are escaped once per interface rather than once per line.
fn write_traffic(out: &mut String, traffic: &[TrafficSample]) {
    use std::fmt::Write;
    if traffic.is_empty() {
        return;
    }
    // What follows the first two labels of every line of an interface.
    let tails: Vec<String> = traffic
        .iter()
        .map(|s| {
            let mut tail = String::with_capacity(64);
            tail.push_str("\",interface=\"");
            escape(&s.interface, &mut tail);
            tail.push_str("\",namespace=\"");
            escape(&s.namespace, &mut tail);
            tail.push_str("\",pod=\"");
            escape(&s.pod, &mut tail);
            tail.push_str("\"} ");
            tail
        })
        .collect();
    out.reserve(traffic.len() * 32 * 128);
    for (index, (suffix, label, help)) in TRAFFIC_FAMILIES.iter().enumerate() {
        let metric = name(suffix);
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} counter");
        for (s, tail) in traffic.iter().zip(&tails) {
            for (direction, d) in [("tx", &s.counters.egress), ("rx", &s.counters.ingress)] {
                let mut line = |value_label: &str, value: u64| {
                    out.push_str(&metric);
                    out.push_str("{direction=\"");
                    out.push_str(direction);
                    out.push_str("\",");
                    out.push_str(label);
                    out.push_str("=\"");
                    out.push_str(value_label);
                    out.push_str(tail);
                    push_u64(out, value);
                    out.push('\n');
                };
                match index {
                    0 | 1 => {
                        for (kind, k) in d.kinds() {
                            // The label says what a user sees in candump: a remote transmission
                            // request.
                            let kind = if kind == "rtr" { "remote" } else { kind };
                            line(kind, if index == 0 { k.bytes } else { k.frames });
                        }
                    }
                    _ => {
                        line("standard", d.std_id);
                        line("extended", d.ext_id);
                    }
                }
            }
        }
    }
}

/// Appends `value` in decimal (`write!` costs several times more per number, and a scrape of a
/// thousand interfaces writes 32 000 of them).
fn push_u64(out: &mut String, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for d in &digits[at..] {
        out.push(char::from(*d));
    }
}

fn gauge(suffix: &str, help: &str, value: f64) -> Vec<prometheus::proto::MetricFamily> {
    let g = Gauge::with_opts(Opts::new(name(suffix), help)).expect("valid metric");
    g.set(value);
    g.collect()
}

/// The physical controllers' families: where each is, its state, its error counters and the
/// kernel's event counts.
fn controller_families(controllers: &[ControllerSample]) -> Vec<prometheus::proto::MetricFamily> {
    if controllers.is_empty() {
        return Vec::new();
    }
    let info = GaugeVec::new(
        Opts::new(
            name("can_controller_info"),
            "1 per physical CAN controller: its netdev's current name and who holds it (pod, or \
             the bus it is the uplink of; empty on the node).",
        ),
        &["controller", "interface", "namespace", "pod", "bus"],
    )
    .expect("valid metric");
    let state = GaugeVec::new(
        Opts::new(
            name("can_controller_state"),
            "1 for the controller's current state (error_active, error_warning, error_passive, \
             bus_off, stopped, sleeping), 0 for the others.",
        ),
        &["controller", "state"],
    )
    .expect("valid metric");
    let errors = GaugeVec::new(
        Opts::new(
            name("can_controller_error_level"),
            "The controller's transmit/receive error counter (error-passive from 128, bus-off \
             at transmit 256).",
        ),
        &["controller", "direction"],
    )
    .expect("valid metric");
    let events = IntCounterVec::new(
        Opts::new(
            name("can_controller_events_total"),
            "Controller events counted by the kernel since the driver loaded: bus errors, \
             entries to error-warning, error-passive and bus-off, lost arbitrations and restarts.",
        ),
        &["controller", "event"],
    )
    .expect("valid metric");
    for c in controllers {
        info.with_label_values(&[
            c.controller.as_str(),
            c.interface.as_str(),
            c.namespace.as_str(),
            c.pod.as_str(),
            c.bus.as_str(),
        ])
        .set(1.0);
        if let Some(now) = c.state {
            for s in CONTROLLER_STATES {
                state
                    .with_label_values(&[c.controller.as_str(), s])
                    .set(f64::from(u8::from(s == now)));
            }
        }
        if let Some((tx, rx)) = c.error_counters {
            errors
                .with_label_values(&[c.controller.as_str(), "tx"])
                .set(f64::from(tx));
            errors
                .with_label_values(&[c.controller.as_str(), "rx"])
                .set(f64::from(rx));
        }
        if let Some(counts) = c.events {
            for (event, count) in CONTROLLER_EVENTS.iter().zip(counts) {
                events
                    .with_label_values(&[c.controller.as_str(), event])
                    .inc_by(count);
            }
        }
    }
    let mut families = info.collect();
    for (present, family) in [
        (
            controllers.iter().any(|c| c.state.is_some()),
            state.collect(),
        ),
        (
            controllers.iter().any(|c| c.error_counters.is_some()),
            errors.collect(),
        ),
        (
            controllers.iter().any(|c| c.events.is_some()),
            events.collect(),
        ),
    ] {
        if present {
            families.extend(family);
        }
    }
    families
}

/// The bus tunnels' families: per bus and peer, traffic both ways, losses and when the peer was
/// last heard from; per bus, what was dropped and why.
fn tunnel_families(tunnels: &[TunnelSample]) -> Vec<prometheus::proto::MetricFamily> {
    if tunnels.is_empty() {
        return Vec::new();
    }
    let per_peer = ["bus", "peer", "kind"];
    let directed = ["bus", "peer", "kind", "direction"];
    let counter = |suffix: &str, help: &str, labels: &[&str]| {
        IntCounterVec::new(Opts::new(name(suffix), help), labels).expect("valid metric")
    };
    let frames = counter(
        "tunnel_frames_total",
        "CAN frames carried by a bus's tunnel, per peer and direction.",
        &directed,
    );
    let bytes = counter(
        "tunnel_bytes_total",
        "Payload bytes of the CAN frames carried by a bus's tunnel, per peer and direction.",
        &directed,
    );
    let packets = counter(
        "tunnel_packets_total",
        "UDP packets of a bus's tunnel, per peer and direction (heartbeats included).",
        &directed,
    );
    let lost = counter(
        "tunnel_packets_lost_total",
        "Packets of a peer missing from its sequence numbers when a later one arrived (those \
         that arrive after all are counted in tunnel_packets_reordered_total too).",
        &per_peer,
    );
    let reordered = counter(
        "tunnel_packets_reordered_total",
        "Packets of a peer that arrived after a later one.",
        &per_peer,
    );
    let dropped = counter(
        "tunnel_packets_dropped_total",
        "Packets (frames, for queue_full) a bus's tunnel dropped, by reason: malformed packets \
         by what is wrong, unknown_peer, unauthenticated (an instance's packet without a valid \
         tag), duplicate (delivered before: a network copy or a replay), queue_full.",
        &["bus", "reason"],
    );
    let last_seen = GaugeVec::new(
        Opts::new(
            name("tunnel_peer_last_seen_timestamp_seconds"),
            "When the last packet of a tunnel peer arrived (Unix time); the plugin's instances \
             send a heartbeat every second.",
        ),
        &per_peer,
    )
    .expect("valid metric");
    let peers = GaugeVec::new(
        Opts::new(name("tunnel_peers"), "Current peers of a bus's tunnel."),
        &["bus"],
    )
    .expect("valid metric");
    for t in tunnels {
        peers
            .with_label_values(&[t.bus.as_str()])
            .set(t.peers.len() as f64);
        for (reason, count) in &t.dropped {
            dropped
                .with_label_values(&[t.bus.as_str(), reason])
                .inc_by(*count);
        }
        for p in &t.peers {
            let id = [t.bus.as_str(), p.peer.as_str(), p.kind];
            for (direction, (f, b, n)) in [("tx", p.tx), ("rx", p.rx)] {
                let l = [t.bus.as_str(), p.peer.as_str(), p.kind, direction];
                frames.with_label_values(&l).inc_by(f);
                bytes.with_label_values(&l).inc_by(b);
                packets.with_label_values(&l).inc_by(n);
            }
            lost.with_label_values(&id).inc_by(p.lost);
            reordered.with_label_values(&id).inc_by(p.reordered);
            if let Some(at) = p.last_seen {
                last_seen.with_label_values(&id).set(at);
            }
        }
    }
    let mut families = peers.collect();
    for vec in [&frames, &bytes, &packets, &lost, &reordered, &dropped] {
        families.extend(vec.collect());
    }
    families.extend(last_seen.collect());
    // A tunnel without peers (yet), or peers never heard from, leave families without series,
    // which the text encoder refuses (the whole scrape would fail).
    families.retain(|f| !f.get_metric().is_empty());
    families
}

/// The socketcand endpoints' families, per bus.
fn socketcand_families(endpoints: &[SocketcandSample]) -> Vec<prometheus::proto::MetricFamily> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let counter = |suffix: &str, help: &str, labels: &[&str]| {
        IntCounterVec::new(Opts::new(name(suffix), help), labels).expect("valid metric")
    };
    let clients = GaugeVec::new(
        Opts::new(
            name("socketcand_clients"),
            "Clients connected to a bus's socketcand endpoint.",
        ),
        &["bus"],
    )
    .expect("valid metric");
    let connections = counter(
        "socketcand_connections_total",
        "Connections to a bus's socketcand endpoint: accepted, or refused for the client limit.",
        &["bus", "result"],
    );
    let frames = counter(
        "socketcand_frames_total",
        "CAN frames through a bus's socketcand endpoint: to_clients counts one per client, \
         from_clients the frames clients put on the bus.",
        &["bus", "direction"],
    );
    let bytes = counter(
        "socketcand_bytes_total",
        "Protocol bytes exchanged with a bus's socketcand clients.",
        &["bus", "direction"],
    );
    let errors = counter(
        "socketcand_protocol_errors_total",
        "Commands of socketcand clients answered with an error, by kind.",
        &["bus", "kind"],
    );
    let disconnects = counter(
        "socketcand_disconnects_total",
        "socketcand clients gone, by reason: closed (by the client), slow_client (stopped \
         reading), protocol_error, handshake_timeout, wrong_bus, shutdown.",
        &["bus", "reason"],
    );
    let dropped = counter(
        "socketcand_frames_dropped_total",
        "Frames a bus's socketcand endpoint did not pass on, by reason: fd_frame and \
         remote_frame (the protocol cannot carry them), bus_not_connected, bus_full.",
        &["bus", "reason"],
    );
    for e in endpoints {
        let bus = e.bus.as_str();
        clients.with_label_values(&[bus]).set(e.clients as f64);
        connections
            .with_label_values(&[bus, "accepted"])
            .inc_by(e.accepted);
        connections
            .with_label_values(&[bus, "refused"])
            .inc_by(e.refused);
        for (direction, f, b) in [
            ("to_clients", e.frames_to_clients, e.bytes_to_clients),
            ("from_clients", e.frames_from_clients, e.bytes_from_clients),
        ] {
            frames.with_label_values(&[bus, direction]).inc_by(f);
            bytes.with_label_values(&[bus, direction]).inc_by(b);
        }
        for (vec, counts) in [
            (&errors, &e.protocol_errors),
            (&disconnects, &e.disconnects),
            (&dropped, &e.dropped),
        ] {
            for (label, n) in counts {
                vec.with_label_values(&[bus, label]).inc_by(*n);
            }
        }
    }
    let mut families = clients.collect();
    for vec in [
        &connections,
        &frames,
        &bytes,
        &errors,
        &disconnects,
        &dropped,
    ] {
        families.extend(vec.collect());
    }
    // Families without series (no errors yet) would fail the whole scrape in the text encoder.
    families.retain(|f| !f.get_metric().is_empty());
    families
}

/// Families describing the current state; built per scrape.
fn state_families(now: &Snapshot) -> Vec<prometheus::proto::MetricFamily> {
    let mut families = Vec::new();
    type Field = fn(&ResourceSample) -> f64;
    let per_resource: [(&str, &str, Field); 5] = [
        ("devices", "Devices advertised to the kubelet.", |r| {
            r.devices as f64
        }),
        (
            "devices_healthy",
            "Devices advertised healthy (0 when the node cannot create the resource's interfaces).",
            |r| r.healthy as f64,
        ),
        (
            "devices_allocated",
            "Devices held by pods according to the kubelet.",
            |r| r.allocated as f64,
        ),
        (
            "pods_served",
            "Pods whose interfaces the plugin created or adopted.",
            |r| r.pods_served as f64,
        ),
        (
            "registered",
            "1 while the kubelet has accepted the plugin's registration of the resource.",
            |r| f64::from(u8::from(r.registered)),
        ),
    ];
    for (suffix, help, field) in per_resource {
        if now.resources.is_empty() {
            continue;
        }
        let g = GaugeVec::new(Opts::new(name(suffix), help), &["resource"]).expect("valid metric");
        for r in &now.resources {
            g.with_label_values(&[r.resource.as_str()]).set(field(r));
        }
        families.extend(g.collect());
    }
    if !now.resources.is_empty() {
        let lookups = IntCounterVec::new(
            Opts::new(
                name("pod_lookups_total"),
                "PreStart's lookups of the pod holding its devices, by the PodResources listing \
                 used: memory (made after the devices' Allocate) or kubelet (made for the \
                 PreStart: the plugin did not see the Allocate, or the listing after it came \
                 too early).",
            ),
            &["resource", "source"],
        )
        .expect("valid metric");
        for r in &now.resources {
            lookups
                .with_label_values(&[r.resource.as_str(), "memory"])
                .inc_by(r.pod_lookups_remembered);
            lookups
                .with_label_values(&[r.resource.as_str(), "kubelet"])
                .inc_by(r.pod_lookups_listed);
        }
        families.extend(lookups.collect());
    }
    if !now.buses.is_empty() {
        let members = GaugeVec::new(
            Opts::new(
                name("bus_members"),
                "Pods that are members of a shared CAN bus.",
            ),
            &["bus"],
        )
        .expect("valid metric");
        let forwarded = IntCounterVec::new(
            Opts::new(
                name("bus_frames_forwarded_total"),
                "Frames the kernel's CAN gateway forwarded between members of a shared bus (one \
                 per receiving member), summed over the bus's rules.",
            ),
            &["bus"],
        )
        .expect("valid metric");
        let dropped = IntCounterVec::new(
            Opts::new(
                name("bus_frames_dropped_total"),
                "Frames the kernel's CAN gateway failed to forward to a member of a shared bus \
                 (member's interface down or its queue full), summed over the bus's rules.",
            ),
            &["bus"],
        )
        .expect("valid metric");
        for b in &now.buses {
            members.with_label_values(&[&b.bus]).set(b.members as f64);
            if let Some(frames) = b.frames {
                forwarded
                    .with_label_values(&[&b.bus])
                    .inc_by(frames.forwarded);
                dropped.with_label_values(&[&b.bus]).inc_by(frames.dropped);
            }
        }
        families.extend(members.collect());
        if now.buses.iter().any(|b| b.frames.is_some()) {
            families.extend(forwarded.collect());
            families.extend(dropped.collect());
        }
    }
    families.extend(controller_families(&now.controllers));
    families.extend(tunnel_families(&now.tunnels));
    families.extend(socketcand_families(&now.socketcand));
    families.extend(super::bus_load::families(&now.timed_buses));
    if let Some(index) = &now.sandbox_index {
        families.extend(sandbox_index_families(index));
    }
    families.extend(gauge(
        "vcan_supported",
        "1 if this node can create vcan interfaces (vcan module present).",
        f64::from(u8::from(now.vcan_supported)),
    ));
    families
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::bus_load::{FaultSample, MemberLabels, SenderSample, TimedBusSample};

    #[test]
    fn requests_and_state_are_rendered_with_units_and_help() {
        let m = Metrics::new(
            &[
                "socketcan.io/vcan".into(),
                "socketcan.io/bus-powertrain".into(),
            ],
            "clsact",
        );
        m.allocate(
            "socketcan.io/vcan",
            Outcome::Success,
            Duration::from_micros(80),
        );
        m.allocate(
            "socketcan.io/bus-powertrain",
            Outcome::Success,
            Duration::from_micros(80),
        );
        m.prestart(
            "socketcan.io/vcan",
            Outcome::Error,
            Duration::from_millis(3),
            Some(&PreStartTimings::default()),
        );
        m.reconcile_pass();
        m.reconcile_pass();
        let text = m.render(&Snapshot {
            resources: vec![
                ResourceSample {
                    resource: "socketcan.io/vcan".into(),
                    devices: 100,
                    healthy: 100,
                    allocated: 2,
                    pods_served: 1,
                    registered: true,
                    pod_lookups_remembered: 5,
                    pod_lookups_listed: 1,
                },
                ResourceSample {
                    resource: "socketcan.io/bus-powertrain".into(),
                    devices: 32,
                    healthy: 32,
                    allocated: 3,
                    pods_served: 3,
                    registered: true,
                    ..Default::default()
                },
            ],
            vcan_supported: true,
            buses: vec![BusSample {
                bus: "powertrain".into(),
                members: 3,
                frames: Some(BusFrames {
                    forwarded: 12,
                    dropped: 1,
                }),
            }],
            traffic: vec![TrafficSample::new("default", "ecu", "vcan0", {
                let mut c = crate::ebpf::CountersSnapshot::default();
                c.egress.classic.frames = 3;
                c.egress.classic.bytes = 24;
                c.ingress.ext_id = 2;
                c.ingress.rtr.frames = 1;
                c
            })],
            tunnels: vec![TunnelSample {
                bus: "powertrain".into(),
                peers: vec![TunnelPeerSample {
                    peer: "10.0.0.2:20000".into(),
                    kind: "instance",
                    tx: (10, 80, 4),
                    rx: (7, 56, 9),
                    lost: 1,
                    reordered: 2,
                    last_seen: Some(1_700_000_000.5),
                }],
                dropped: vec![("truncated", 3), ("unknown_peer", 1)],
            }],
            socketcand: vec![SocketcandSample {
                bus: "powertrain".into(),
                clients: 2,
                accepted: 5,
                refused: 1,
                frames_to_clients: 40,
                frames_from_clients: 3,
                bytes_to_clients: 1200,
                bytes_from_clients: 90,
                protocol_errors: vec![("bad_arguments", 2)],
                disconnects: vec![("closed", 2), ("slow_client", 1)],
                dropped: vec![("fd_frame", 4)],
            }],
            timed_buses: vec![TimedBusSample {
                bus: "chassis".into(),
                bitrate: 500_000,
                busy_seconds: 0.25,
                bits: 125_000,
                frames: 1000,
                senders: vec![SenderSample {
                    member: MemberLabels {
                        namespace: "default".into(),
                        pod: "ecu".into(),
                    },
                    frames: 1000,
                    busy_seconds: 0.25,
                    refused: 7,
                }],
                wait_buckets: vec![(0.001, 900), (0.01, 1000)],
                wait_count: 1000,
                wait_sum: 0.5,
                dropped: vec![("queue_full", 0), ("fault", 2)],
                faults_active: vec![("bus_off", 1)],
                faults: vec![FaultSample {
                    member: MemberLabels {
                        namespace: "default".into(),
                        pod: "ecu".into(),
                    },
                    kind: "bus_off",
                    injected: 1,
                    frames: 5,
                }],
            }],
            sandbox_index: Some(SandboxIndexSample {
                synced: true,
                sandboxes: 3,
                hits: 40,
                misses: 2,
                resyncs: 1,
                described_by_record: 7,
                described_by_cri: 1,
            }),
            controllers: vec![
                ControllerSample {
                    controller: "bench".into(),
                    interface: "can0".into(),
                    namespace: "default".into(),
                    pod: "ecu".into(),
                    bus: String::new(),
                    state: Some("bus_off"),
                    error_counters: Some((256, 17)),
                    events: Some([40, 3, 2, 1, 5, 1]),
                },
                ControllerSample {
                    controller: "wire".into(),
                    interface: "uplink".into(),
                    bus: "plant".into(),
                    ..ControllerSample::default()
                },
            ],
        });
        for expected in [
            "vcan_plugin_allocate_requests_total{outcome=\"success\",resource=\"socketcan.io/vcan\"} 1",
            "vcan_plugin_prestart_requests_total{outcome=\"error\",resource=\"socketcan.io/vcan\"} 1",
            "vcan_plugin_devices_allocated{resource=\"socketcan.io/vcan\"} 2",
            "vcan_plugin_pod_lookups_total{resource=\"socketcan.io/vcan\",source=\"memory\"} 5",
            "vcan_plugin_pod_lookups_total{resource=\"socketcan.io/vcan\",source=\"kubelet\"} 1",
            "vcan_plugin_reconcile_passes_total 2",
            "vcan_plugin_socketcand_clients{bus=\"powertrain\"} 2",
            "vcan_plugin_socketcand_connections_total{bus=\"powertrain\",result=\"refused\"} 1",
            "vcan_plugin_socketcand_frames_total{bus=\"powertrain\",direction=\"to_clients\"} 40",
            "vcan_plugin_socketcand_bytes_total{bus=\"powertrain\",direction=\"from_clients\"} 90",
            "vcan_plugin_socketcand_protocol_errors_total{bus=\"powertrain\",kind=\"bad_arguments\"} 2",
            "vcan_plugin_socketcand_disconnects_total{bus=\"powertrain\",reason=\"slow_client\"} 1",
            "vcan_plugin_socketcand_frames_dropped_total{bus=\"powertrain\",reason=\"fd_frame\"} 4",
            "vcan_plugin_bus_bitrate{bus=\"chassis\"} 500000",
            "vcan_plugin_bus_busy_seconds_total{bus=\"chassis\"} 0.25",
            "vcan_plugin_bus_wire_bit_times_total{bus=\"chassis\"} 125000",
            "vcan_plugin_bus_member_busy_seconds_total{bus=\"chassis\",namespace=\"default\",pod=\"ecu\"} 0.25",
            "vcan_plugin_bus_tx_refused_total{bus=\"chassis\",namespace=\"default\",pod=\"ecu\"} 7",
            "vcan_plugin_bus_queue_wait_seconds_bucket{bus=\"chassis\",le=\"0.001\"} 900",
            "vcan_plugin_bus_queue_wait_seconds_bucket{bus=\"chassis\",le=\"+Inf\"} 1000",
            "vcan_plugin_bus_queue_wait_seconds_sum{bus=\"chassis\"} 0.5",
            "# TYPE vcan_plugin_bus_queue_wait_seconds histogram",
            "vcan_plugin_bus_scheduler_dropped_total{bus=\"chassis\",reason=\"queue_full\"} 0",
            "vcan_plugin_bus_faults_active{bus=\"chassis\",kind=\"bus_off\"} 1",
            "vcan_plugin_bus_faults_injected_total{bus=\"chassis\",kind=\"bus_off\",namespace=\"default\",pod=\"ecu\"} 1",
            "vcan_plugin_bus_fault_frames_total{bus=\"chassis\",kind=\"bus_off\",namespace=\"default\",pod=\"ecu\"} 5",
            "# TYPE vcan_plugin_reconcile_passes_total counter",
            "vcan_plugin_sandbox_index_synced 1",
            "vcan_plugin_sandbox_index_sandboxes 3",
            "vcan_plugin_sandbox_index_resyncs_total 1",
            "vcan_plugin_sandbox_lookups_total{source=\"index\"} 40",
            "vcan_plugin_sandbox_lookups_total{source=\"runtime\"} 2",
            "vcan_plugin_sandbox_descriptions_total{source=\"record\"} 7",
            "vcan_plugin_sandbox_descriptions_total{source=\"cri\"} 1",
            "vcan_plugin_devices_allocated{resource=\"socketcan.io/bus-powertrain\"} 3",
            "vcan_plugin_pods_served{resource=\"socketcan.io/bus-powertrain\"} 3",
            "vcan_plugin_allocate_requests_total{outcome=\"success\",resource=\"socketcan.io/bus-powertrain\"} 1",
            "vcan_plugin_prestart_requests_total{outcome=\"error\",resource=\"socketcan.io/bus-powertrain\"} 0",
            "vcan_plugin_can_frames_total{direction=\"tx\",kind=\"classic\",interface=\"vcan0\",namespace=\"default\",pod=\"ecu\"} 3",
            "vcan_plugin_can_bytes_total{direction=\"tx\",kind=\"classic\",interface=\"vcan0\",namespace=\"default\",pod=\"ecu\"} 24",
            "vcan_plugin_can_id_format_frames_total{direction=\"rx\",id_format=\"extended\",interface=\"vcan0\",namespace=\"default\",pod=\"ecu\"} 2",
            "vcan_plugin_can_frames_total{direction=\"rx\",kind=\"remote\",interface=\"vcan0\",namespace=\"default\",pod=\"ecu\"} 1",
            "vcan_plugin_can_bytes_total{direction=\"rx\",kind=\"xl\",interface=\"vcan0\",namespace=\"default\",pod=\"ecu\"} 0",
            "# TYPE vcan_plugin_can_bytes_total counter",
            "vcan_plugin_prestart_phase_duration_seconds_bucket{phase=\"bpf_attach\",le=\"0.0001\"} 1",
            "# HELP vcan_plugin_can_frames_total",
            "# TYPE vcan_plugin_prestart_duration_seconds histogram",
            "attach_mode=\"clsact\"",
            "vcan_plugin_bus_members{bus=\"powertrain\"} 3",
            "vcan_plugin_bus_frames_forwarded_total{bus=\"powertrain\"} 12",
            "vcan_plugin_bus_frames_dropped_total{bus=\"powertrain\"} 1",
            "# TYPE vcan_plugin_bus_frames_forwarded_total counter",
            "vcan_plugin_can_controller_info{bus=\"\",controller=\"bench\",interface=\"can0\",namespace=\"default\",pod=\"ecu\"} 1",
            "vcan_plugin_can_controller_info{bus=\"plant\",controller=\"wire\",interface=\"uplink\",namespace=\"\",pod=\"\"} 1",
            "vcan_plugin_can_controller_state{controller=\"bench\",state=\"bus_off\"} 1",
            "vcan_plugin_can_controller_state{controller=\"bench\",state=\"error_active\"} 0",
            "vcan_plugin_can_controller_error_level{controller=\"bench\",direction=\"tx\"} 256",
            "vcan_plugin_can_controller_error_level{controller=\"bench\",direction=\"rx\"} 17",
            "vcan_plugin_can_controller_events_total{controller=\"bench\",event=\"bus_error\"} 40",
            "vcan_plugin_can_controller_events_total{controller=\"bench\",event=\"restarts\"} 1",
            "# TYPE vcan_plugin_can_controller_events_total counter",
            "vcan_plugin_tunnel_peers{bus=\"powertrain\"} 1",
            "vcan_plugin_tunnel_frames_total{bus=\"powertrain\",direction=\"tx\",kind=\"instance\",peer=\"10.0.0.2:20000\"} 10",
            "vcan_plugin_tunnel_bytes_total{bus=\"powertrain\",direction=\"rx\",kind=\"instance\",peer=\"10.0.0.2:20000\"} 56",
            "vcan_plugin_tunnel_packets_total{bus=\"powertrain\",direction=\"rx\",kind=\"instance\",peer=\"10.0.0.2:20000\"} 9",
            "vcan_plugin_tunnel_packets_lost_total{bus=\"powertrain\",kind=\"instance\",peer=\"10.0.0.2:20000\"} 1",
            "vcan_plugin_tunnel_packets_reordered_total{bus=\"powertrain\",kind=\"instance\",peer=\"10.0.0.2:20000\"} 2",
            "vcan_plugin_tunnel_packets_dropped_total{bus=\"powertrain\",reason=\"truncated\"} 3",
            "vcan_plugin_tunnel_peer_last_seen_timestamp_seconds{bus=\"powertrain\",kind=\"instance\",peer=\"10.0.0.2:20000\"} 1700000000.5",
        ] {
            assert!(text.contains(expected), "missing {expected} in\n{text}");
        }
        // A driver that reports no state gets no state series (rather than a made-up one).
        assert!(!text.contains("vcan_plugin_can_controller_state{controller=\"wire\""));
    }

    #[test]
    fn a_tunnel_without_peers_still_renders() {
        let m = Metrics::new(&["socketcan.io/bus-x".into()], "clsact");
        let text = m.render(&Snapshot {
            tunnels: vec![
                TunnelSample {
                    bus: "x".into(),
                    ..TunnelSample::default()
                },
                TunnelSample {
                    bus: "y".into(),
                    peers: vec![TunnelPeerSample {
                        peer: "10.0.0.2:20000".into(),
                        kind: "instance",
                        ..TunnelPeerSample::default()
                    }],
                    dropped: vec![("truncated", 0)],
                },
            ],
            ..Snapshot::default()
        });
        assert!(
            text.contains("vcan_plugin_tunnel_peers{bus=\"x\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("vcan_plugin_tunnel_peer_last_seen_timestamp_seconds{"),
            "a peer never heard from has no last-seen series:\n{text}"
        );
    }

    #[test]
    fn a_bus_whose_counters_could_not_be_read_has_no_frame_series() {
        let m = Metrics::new(&["socketcan.io/bus-a".into()], "clsact");
        let text = m.render(&Snapshot {
            buses: vec![BusSample {
                bus: "a".into(),
                members: 2,
                frames: None,
            }],
            ..Snapshot::default()
        });
        assert!(
            text.contains("vcan_plugin_bus_members{bus=\"a\"} 2"),
            "{text}"
        );
        assert!(!text.contains("bus_frames_forwarded_total{"), "{text}");
        assert!(!text.contains("bus_frames_dropped_total{"), "{text}");
    }

    #[test]
    fn a_pods_series_vanish_with_it() {
        let m = Metrics::new(&["socketcan.io/vcan".into()], "clsact");
        let text = m.render(&Snapshot::default());
        assert!(!text.contains("can_frames_total"));
    }
}
