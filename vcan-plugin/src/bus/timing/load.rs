//! What a timed bus carried: busy time, bits and frames, per sender too, how long frames waited
//! for the bus, and what faults and full queues cost. Kept by the scheduler, read per scrape.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::pod::resources::PodRef;

use super::schedule::Transmission;

/// Upper bounds of the queue wait histogram's buckets, seconds.
pub const WAIT_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Why the scheduler dropped a frame (`vcan_plugin_bus_scheduler_dropped_total{reason}`).
pub const DROP_REASONS: [&str; 3] = ["queue_full", "fault", "delivery_failed"];

/// One sender's share.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SenderLoad {
    /// Frames it put on the bus.
    pub frames: u64,
    /// Time its frames occupied the bus.
    pub busy: Duration,
}

/// The counts of one timed bus since the plugin started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    /// Time the bus carried frames.
    pub busy: Duration,
    /// Bits on the wire, stuff bits and interframe space included.
    pub bits: u64,
    /// Frames carried.
    pub frames: u64,
    /// Copies delivered to the other ends.
    pub delivered: u64,
    /// Per sender.
    pub senders: BTreeMap<PodRef, SenderLoad>,
    /// Queue wait: counts per bucket of [`WAIT_BUCKETS`] (not cumulative), then the sum, seconds.
    pub wait_buckets: [u64; WAIT_BUCKETS.len()],
    /// Waits above the last bucket.
    pub wait_over: u64,
    /// Sum of the waits.
    pub wait_sum: Duration,
    /// Frames dropped by the scheduler, by [`DROP_REASONS`] index.
    pub dropped: [u64; DROP_REASONS.len()],
    /// Faults started, by member and kind.
    pub faults_injected: BTreeMap<(PodRef, &'static str), u64>,
    /// Frames a fault dropped, changed or delayed, and error frames delivered, by member and kind.
    pub fault_frames: BTreeMap<(PodRef, &'static str), u64>,
}

impl Load {
    /// Counts a transmission by `sender`.
    pub fn carried(&mut self, sender: &PodRef, t: &Transmission) {
        self.busy += t.duration;
        self.bits += u64::from(t.bits.nominal) + u64::from(t.bits.data);
        self.frames += 1;
        // Looked up before inserting: the key's strings are cloned once per sender, not per frame.
        match self.senders.get_mut(sender) {
            Some(s) => {
                s.frames += 1;
                s.busy += t.duration;
            }
            None => {
                self.senders.insert(
                    sender.clone(),
                    SenderLoad {
                        frames: 1,
                        busy: t.duration,
                    },
                );
            }
        }
        let waited = t.started.saturating_duration_since(t.arrived).as_secs_f64();
        self.wait_sum += t.started.saturating_duration_since(t.arrived);
        match WAIT_BUCKETS.iter().position(|b| waited <= *b) {
            Some(i) => self.wait_buckets[i] += 1,
            None => self.wait_over += 1,
        }
    }

    /// Counts a dropped frame.
    pub fn dropped(&mut self, reason: &'static str) {
        if let Some(i) = DROP_REASONS.iter().position(|r| *r == reason) {
            self.dropped[i] += 1;
        }
    }

    /// Counts a frame a fault of `kind` affected at `member`.
    pub fn fault_frame(&mut self, member: &PodRef, kind: &'static str) {
        *self.fault_frames.entry((member.clone(), kind)).or_default() += 1;
    }

    /// Forgets a member that left, so its series go with it.
    pub fn forget(&mut self, member: &PodRef) {
        self.senders.remove(member);
        self.faults_injected.retain(|(p, _), _| p != member);
        self.fault_frames.retain(|(p, _), _| p != member);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::timing::bits::FrameBits;
    use crate::bus::timing::schedule::Frame;
    use std::time::Instant;

    #[test]
    fn waits_fall_into_buckets_and_senders_get_their_share() {
        let t0 = Instant::now();
        let frame = Frame::from_raw(&[0u8; 16]).expect("frame");
        let pod = PodRef {
            namespace: "d".into(),
            name: "a".into(),
        };
        let mut load = Load::default();
        for wait_us in [50, 700, 2_000_000] {
            load.carried(
                &pod,
                &Transmission {
                    from: 2,
                    frame: frame.clone(),
                    arrived: t0,
                    started: t0 + Duration::from_micros(wait_us),
                    ends: t0,
                    bits: FrameBits {
                        nominal: 100,
                        data: 0,
                    },
                    duration: Duration::from_micros(200),
                },
            );
        }
        assert_eq!(load.wait_buckets[0], 1);
        assert_eq!(load.wait_buckets[3], 1);
        assert_eq!(load.wait_over, 1);
        assert_eq!(load.bits, 300);
        assert_eq!(load.senders[&pod].busy, Duration::from_micros(600));
        load.forget(&pod);
        assert!(load.senders.is_empty());
        assert_eq!(load.frames, 3, "bus totals stay");
    }
}
