//! The families of timed buses (`vcan_plugin_bus_busy_seconds_total` and friends): load, shares,
//! queue waits, refused writes and injected faults, built per scrape from what the schedulers
//! counted.

use prometheus::core::Collector;
use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{CounterVec, GaugeVec, IntCounterVec, Opts};

use super::metrics::name;

/// One member (or fixed end) of a timed bus, as labelled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemberLabels {
    /// The pod's namespace (empty for the tunnel's and socketcand's ends).
    pub namespace: String,
    /// The pod's name (or the fixed end's).
    pub pod: String,
}

/// One sender's share of a timed bus.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SenderSample {
    /// Who.
    pub member: MemberLabels,
    /// Frames it put on the bus.
    pub frames: u64,
    /// Seconds its frames occupied the bus.
    pub busy_seconds: f64,
    /// Writes refused because its transmit queue was full.
    pub refused: u64,
}

/// Counts of one fault kind at one member.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultSample {
    /// Who.
    pub member: MemberLabels,
    /// The kind's label.
    pub kind: &'static str,
    /// Faults started.
    pub injected: u64,
    /// Frames dropped, changed or delayed, error frames delivered.
    pub frames: u64,
}

/// One timed bus for a scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimedBusSample {
    /// The bus.
    pub bus: String,
    /// Nominal bitrate, bit/s.
    pub bitrate: u32,
    /// Seconds the bus carried frames.
    pub busy_seconds: f64,
    /// Bits on the wire.
    pub bits: u64,
    /// Frames carried.
    pub frames: u64,
    /// Per sender (every member, from zero).
    pub senders: Vec<SenderSample>,
    /// Queue wait histogram: (upper bound, cumulative count), ascending.
    pub wait_buckets: Vec<(f64, u64)>,
    /// Waits counted.
    pub wait_count: u64,
    /// Sum of the waits, seconds.
    pub wait_sum: f64,
    /// Frames the scheduler dropped, by reason (every reason, from zero).
    pub dropped: Vec<(&'static str, u64)>,
    /// Faults in force, by kind (every kind).
    pub faults_active: Vec<(&'static str, u64)>,
    /// Per member and kind (every pair, from zero).
    pub faults: Vec<FaultSample>,
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

/// The queue wait histograms, one series per bus.
fn wait_family(buses: &[TimedBusSample]) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name("bus_queue_wait_seconds"));
    family.set_help(
        "Time a frame waited between reaching a timed bus and winning its arbitration.".into(),
    );
    family.set_field_type(MetricType::HISTOGRAM);
    family.set_metric(
        buses
            .iter()
            .map(|b| {
                let mut h = Histogram::default();
                h.set_sample_count(b.wait_count);
                h.set_sample_sum(b.wait_sum);
                h.set_bucket(
                    b.wait_buckets
                        .iter()
                        .map(|(le, n)| {
                            let mut bucket = Bucket::default();
                            bucket.set_upper_bound(*le);
                            bucket.set_cumulative_count(*n);
                            bucket
                        })
                        .collect(),
                );
                let mut m = Metric::default();
                m.set_label(vec![label("bus", &b.bus)]);
                m.set_histogram(h);
                m
            })
            .collect(),
    );
    family
}

/// The families of every timed bus.
pub(super) fn families(buses: &[TimedBusSample]) -> Vec<MetricFamily> {
    if buses.is_empty() {
        return Vec::new();
    }
    let int_counter = |suffix: &str, help: &str, labels: &[&str]| {
        IntCounterVec::new(Opts::new(name(suffix), help), labels).expect("valid metric")
    };
    let counter = |suffix: &str, help: &str, labels: &[&str]| {
        CounterVec::new(Opts::new(name(suffix), help), labels).expect("valid metric")
    };
    let gauge = |suffix: &str, help: &str, labels: &[&str]| {
        GaugeVec::new(Opts::new(name(suffix), help), labels).expect("valid metric")
    };
    let member = ["bus", "namespace", "pod"];
    let member_kind = ["bus", "namespace", "pod", "kind"];
    let bitrate = gauge(
        "bus_bitrate",
        "Nominal bitrate of a timed bus, in bits per second.",
        &["bus"],
    );
    let busy = counter(
        "bus_busy_seconds_total",
        "Time a timed bus carried frames (the sum of their exact bit times); its rate is the \
         bus load, as canbusload computes it.",
        &["bus"],
    );
    // "bit times", not "bits": promtool's lint wants information in bytes, which wire bits
    // (stuffed, not byte-aligned) are not.
    let bits = int_counter(
        "bus_wire_bit_times_total",
        "Bit times a timed bus carried: its bits on the wire, stuff bits and interframe space \
         included.",
        &["bus"],
    );
    let frames = int_counter(
        "bus_wire_frames_total",
        "Frames a timed bus carried.",
        &["bus"],
    );
    let member_frames = int_counter(
        "bus_member_frames_total",
        "Frames a member (or the tunnel or socketcand end) put on a timed bus.",
        &member,
    );
    let member_busy = counter(
        "bus_member_busy_seconds_total",
        "Time a member's frames occupied a timed bus.",
        &member,
    );
    let refused = int_counter(
        "bus_tx_refused_total",
        "Writes of a member refused with ENOBUFS because its transmit queue (tx_queue) was full.",
        &member,
    );
    let dropped = int_counter(
        "bus_scheduler_dropped_total",
        "Frames a timed bus's scheduler dropped: queue_full (a fixed end's queue, or a leaving \
         member's), fault (an injected fault), delivery_failed.",
        &["bus", "reason"],
    );
    let active = gauge(
        "bus_faults_active",
        "Injected faults in force on a timed bus, per affected member.",
        &["bus", "kind"],
    );
    let injected = int_counter(
        "bus_faults_injected_total",
        "Faults injected into a timed bus, per affected member and kind.",
        &member_kind,
    );
    let fault_frames = int_counter(
        "bus_fault_frames_total",
        "Frames a fault dropped, corrupted or delayed, and error frames it delivered, per member \
         and kind.",
        &member_kind,
    );
    for b in buses {
        let bus = b.bus.as_str();
        bitrate.with_label_values(&[bus]).set(f64::from(b.bitrate));
        busy.with_label_values(&[bus]).inc_by(b.busy_seconds);
        bits.with_label_values(&[bus]).inc_by(b.bits);
        frames.with_label_values(&[bus]).inc_by(b.frames);
        for s in &b.senders {
            let l = [bus, s.member.namespace.as_str(), s.member.pod.as_str()];
            member_frames.with_label_values(&l).inc_by(s.frames);
            member_busy.with_label_values(&l).inc_by(s.busy_seconds);
            refused.with_label_values(&l).inc_by(s.refused);
        }
        for (reason, n) in &b.dropped {
            dropped.with_label_values(&[bus, reason]).inc_by(*n);
        }
        for (kind, n) in &b.faults_active {
            active.with_label_values(&[bus, kind]).set(*n as f64);
        }
        for f in &b.faults {
            let l = [
                bus,
                f.member.namespace.as_str(),
                f.member.pod.as_str(),
                f.kind,
            ];
            injected.with_label_values(&l).inc_by(f.injected);
            fault_frames.with_label_values(&l).inc_by(f.frames);
        }
    }
    let mut families = Vec::new();
    families.extend(bitrate.collect());
    families.extend(busy.collect());
    families.extend(bits.collect());
    families.extend(frames.collect());
    families.extend(member_frames.collect());
    families.extend(member_busy.collect());
    families.extend(refused.collect());
    families.push(wait_family(buses));
    families.extend(dropped.collect());
    families.extend(active.collect());
    families.extend(injected.collect());
    families.extend(fault_frames.collect());
    // A bus without members yet has no member series; the text encoder refuses empty families.
    families.retain(|f| !f.get_metric().is_empty());
    families
}
