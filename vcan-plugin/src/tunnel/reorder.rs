//! Putting a peer's packets back in the order it sent them.
//!
//! UDP may reorder packets; on one host it does so when a sending thread moves between CPUs
//! (each CPU's backlog is processed independently). A bus must deliver each sender's frames in
//! the order they were sent, so a packet that arrives ahead of the one expected next is held, at
//! most [`HOLD`], until the missing ones arrive; then whatever is held goes out in sequence order
//! and the missing ones are given up as lost (the sequence tracker counts them).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The longest a packet waits for earlier ones: long enough for a reordering inside one host or
/// network path, short next to the heartbeat interval and a control loop's period.
pub const HOLD: Duration = Duration::from_millis(5);
/// Packets held at most; beyond that the gap is taken as loss at once.
const MAX_HELD: usize = 64;

/// One peer's packets in flight out of order.
#[derive(Debug, Default)]
pub struct Reorder {
    /// The sequence number expected next; `None` before the first packet.
    next: Option<u8>,
    /// Packets that arrived ahead of `next`, by sequence number.
    held: BTreeMap<u8, Vec<u8>>,
    /// When the oldest held packet arrived.
    since: Option<Instant>,
}

impl Reorder {
    /// A packet numbered `seq` arrived at `now`: returns the packets to deliver now, in order.
    pub fn push(&mut self, seq: u8, packet: Vec<u8>, now: Instant) -> Vec<Vec<u8>> {
        let Some(next) = self.next else {
            self.next = Some(seq.wrapping_add(1));
            return vec![packet];
        };
        let ahead = seq.wrapping_sub(next);
        if ahead == 0 {
            let mut out = vec![packet];
            self.next = Some(seq.wrapping_add(1));
            self.release_in_order(&mut out);
            return out;
        }
        if ahead < 128 {
            self.held.insert(seq, packet);
            self.since.get_or_insert(now);
            if self.held.len() > MAX_HELD {
                return self.flush();
            }
            return Vec::new();
        }
        // Behind what is expected: a late packet already given up (deliver it now rather than
        // never), or a peer that started its numbering again (follow it).
        let behind = next.wrapping_sub(seq);
        let mut out = Vec::new();
        if usize::from(behind) > MAX_HELD {
            out = self.flush();
            self.next = Some(seq.wrapping_add(1));
        }
        out.push(packet);
        out
    }

    /// When the held packets must go out even if the missing ones never arrive.
    pub fn deadline(&self) -> Option<Instant> {
        self.since.map(|t| t + HOLD)
    }

    /// Gives up on the missing packets: everything held, in order.
    pub fn flush(&mut self) -> Vec<Vec<u8>> {
        let Some(next) = self.next else {
            return Vec::new();
        };
        let mut held: Vec<(u8, Vec<u8>)> = std::mem::take(&mut self.held).into_iter().collect();
        held.sort_by_key(|(seq, _)| seq.wrapping_sub(next));
        if let Some((last, _)) = held.last() {
            self.next = Some(last.wrapping_add(1));
        }
        self.since = None;
        held.into_iter().map(|(_, p)| p).collect()
    }

    fn release_in_order(&mut self, out: &mut Vec<Vec<u8>>) {
        while let Some(next) = self.next
            && let Some(p) = self.held.remove(&next)
        {
            out.push(p);
            self.next = Some(next.wrapping_add(1));
        }
        if self.held.is_empty() {
            self.since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(seq: u8) -> Vec<u8> {
        vec![seq]
    }

    fn seqs(out: Vec<Vec<u8>>) -> Vec<u8> {
        out.into_iter().map(|p| p[0]).collect()
    }

    #[test]
    fn a_swapped_pair_is_put_back_in_order() {
        let now = Instant::now();
        let mut r = Reorder::default();
        assert_eq!(seqs(r.push(10, p(10), now)), [10]);
        assert_eq!(seqs(r.push(12, p(12), now)), Vec::<u8>::new());
        assert_eq!(r.deadline(), Some(now + HOLD));
        assert_eq!(seqs(r.push(11, p(11), now)), [11, 12]);
        assert_eq!(r.deadline(), None);
        assert_eq!(seqs(r.push(13, p(13), now)), [13]);
    }

    #[test]
    fn a_lost_packet_holds_the_rest_until_the_deadline() {
        let now = Instant::now();
        let mut r = Reorder::default();
        r.push(254, p(254), now);
        // 255 is lost; 0 and 1 (across the wrap) wait, then go out in order.
        assert!(r.push(1, p(1), now).is_empty());
        assert!(r.push(0, p(0), now).is_empty());
        assert_eq!(seqs(r.flush()), [0, 1]);
        assert_eq!(seqs(r.push(2, p(2), now)), [2]);
        // 255 arriving now is late: delivered rather than dropped.
        assert_eq!(seqs(r.push(255, p(255), now)), [255]);
        assert_eq!(seqs(r.push(3, p(3), now)), [3]);
    }

    #[test]
    fn a_restarted_peer_is_followed() {
        let now = Instant::now();
        let mut r = Reorder::default();
        for s in 100..=200u8 {
            assert_eq!(seqs(r.push(s, p(s), now)), [s]);
        }
        // Far behind what is expected: the peer started again.
        assert_eq!(seqs(r.push(120, p(120), now)), [120]);
        assert_eq!(seqs(r.push(121, p(121), now)), [121]);
        // A restart that lands ahead looks like a gap: held once, for HOLD at most.
        let mut r = Reorder::default();
        r.push(200, p(200), now);
        assert!(r.push(0, p(0), now).is_empty());
        assert_eq!(seqs(r.flush()), [0]);
        assert_eq!(seqs(r.push(1, p(1), now)), [1]);
    }

    #[test]
    fn too_many_held_packets_are_released_at_once() {
        let now = Instant::now();
        let mut r = Reorder::default();
        r.push(0, p(0), now);
        let mut out = Vec::new();
        for s in 2..=(MAX_HELD as u8 + 2) {
            out.extend(seqs(r.push(s, p(s), now)));
        }
        let expected: Vec<u8> = (2..=(MAX_HELD as u8 + 2)).collect();
        assert_eq!(out, expected);
        assert_eq!(r.deadline(), None);
    }
}
