//! Putting a peer's packets back in the order it sent them.
//!
//! UDP may reorder packets; on one host it does so when a sending thread moves between CPUs
//! (each CPU's backlog is processed independently). A bus must deliver each sender's frames in
//! the order they were sent, so a packet that arrives ahead of the one expected next is held, at
//! most [`HOLD`], until the missing ones arrive; then whatever is held goes out in sequence order
//! and the missing ones are given up as lost (the sequence tracker counts them).
//!
//! A packet that arrives again (UDP may duplicate) is delivered once: the numbers delivered
//! behind the expected one are remembered. Two such repeats with consecutive numbers mean the
//! peer started its numbering again without a pause (a pause is handled by its owner calling
//! [`Reorder::reset`]): the second is delivered and followed.

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
    /// Bit `i` set: number `next - 1 - i` was delivered.
    delivered: u128,
    /// The previous arrival's number, if it was a repeat (see the module's restart rule).
    last_repeat: Option<u8>,
}

/// How far behind the expected number a packet counts as late or repeated rather than the
/// start of a new numbering.
const LATE: u8 = 64;

/// What [`Reorder::push`] made of a packet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Packets to deliver now, in order.
    pub ready: Vec<Vec<u8>>,
    /// The packet had been delivered already and was dropped.
    pub duplicate: bool,
}

impl Reorder {
    /// A packet numbered `seq` arrived at `now`: returns the packets to deliver now, in order.
    pub fn push(&mut self, seq: u8, packet: Vec<u8>, now: Instant) -> Vec<Vec<u8>> {
        self.push_checked(seq, packet, now).ready
    }

    /// Like [`Reorder::push`], also saying whether the packet was a duplicate.
    pub fn push_checked(&mut self, seq: u8, packet: Vec<u8>, now: Instant) -> Pushed {
        let last_repeat = self.last_repeat.take();
        let Some(next) = self.next else {
            self.start(seq);
            return Pushed {
                ready: vec![packet],
                duplicate: false,
            };
        };
        let ahead = seq.wrapping_sub(next);
        if ahead == 0 {
            let mut out = vec![packet];
            self.advance(seq);
            self.release_in_order(&mut out);
            return Pushed {
                ready: out,
                duplicate: false,
            };
        }
        if ahead < 128 {
            self.held.insert(seq, packet);
            self.since.get_or_insert(now);
            if self.held.len() > MAX_HELD {
                return Pushed {
                    ready: self.flush(),
                    duplicate: false,
                };
            }
            return Pushed::default();
        }
        let behind = next.wrapping_sub(seq);
        if behind > LATE {
            // Far behind: the peer started its numbering again; follow it.
            return self.restart_at(seq, packet);
        }
        let bit = 1u128 << (behind - 1);
        if self.delivered & bit == 0 {
            // Late, after it was given up: deliver it now rather than never.
            self.delivered |= bit;
            return Pushed {
                ready: vec![packet],
                duplicate: false,
            };
        }
        if last_repeat == Some(seq.wrapping_sub(1)) {
            // Repeats in sequence: a peer numbering again from a little behind.
            return self.restart_at(seq, packet);
        }
        self.last_repeat = Some(seq);
        Pushed {
            ready: Vec::new(),
            duplicate: true,
        }
    }

    /// Forgets the peer's numbering (it was silent long enough to have restarted); nothing is
    /// held after a flush, so nothing is lost.
    pub fn reset(&mut self) -> Vec<Vec<u8>> {
        let out = self.flush();
        *self = Reorder::default();
        out
    }

    /// The peer numbers again from `seq`: whatever is held goes out first, then `packet`.
    fn restart_at(&mut self, seq: u8, packet: Vec<u8>) -> Pushed {
        let mut ready = self.flush();
        self.start(seq);
        ready.push(packet);
        Pushed {
            ready,
            duplicate: false,
        }
    }

    fn start(&mut self, seq: u8) {
        self.next = Some(seq.wrapping_add(1));
        self.delivered = 1;
        self.held.clear();
        self.since = None;
    }

    /// `seq`, the number expected, was delivered.
    fn advance(&mut self, seq: u8) {
        self.next = Some(seq.wrapping_add(1));
        self.delivered = (self.delivered << 1) | 1;
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
            // Everything up to the last held one is behind now: the held ones delivered, the
            // missing ones not.
            let mut expected = next;
            for (seq, _) in &held {
                while expected != *seq {
                    self.delivered <<= 1;
                    expected = expected.wrapping_add(1);
                }
                self.advance(*seq);
                expected = seq.wrapping_add(1);
            }
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
            self.advance(next);
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
    fn duplicates_are_delivered_once() {
        let now = Instant::now();
        let mut r = Reorder::default();
        assert_eq!(seqs(r.push(10, p(10), now)), [10]);
        assert!(r.push_checked(10, p(10), now).duplicate);
        assert_eq!(seqs(r.push(12, p(12), now)), Vec::<u8>::new());
        assert!(r.push(12, p(12), now).is_empty(), "held once");
        assert_eq!(seqs(r.push(11, p(11), now)), [11, 12]);
        // (Repeats with consecutive numbers would be a restart: see the next test.)
        for s in [12, 10] {
            let pushed = r.push_checked(s, p(s), now);
            assert!(pushed.duplicate && pushed.ready.is_empty(), "{s}");
        }
        // Given up, then late: delivered once.
        assert!(r.push(15, p(15), now).is_empty());
        assert_eq!(seqs(r.flush()), [15]);
        assert_eq!(seqs(r.push(13, p(13), now)), [13]);
        assert!(r.push_checked(13, p(13), now).duplicate);
        assert!(r.push_checked(15, p(15), now).duplicate);
        assert_eq!(seqs(r.push(16, p(16), now)), [16]);
    }

    #[test]
    fn a_peer_restarting_a_little_behind_is_followed_in_order() {
        let now = Instant::now();
        let mut r = Reorder::default();
        for s in 0..30u8 {
            r.push(s, p(s), now);
        }
        // Numbering again from 0 without a pause: 0 looks like a duplicate, 1 shows the restart.
        assert!(r.push_checked(0, p(0), now).duplicate);
        assert_eq!(seqs(r.push(1, p(1), now)), [1]);
        assert_eq!(seqs(r.push(3, p(3), now)), Vec::<u8>::new());
        assert_eq!(seqs(r.push(2, p(2), now)), [2, 3], "in order");
        // After a pause the owner resets: nothing is taken for a duplicate.
        let mut r = Reorder::default();
        for s in 0..30u8 {
            r.push(s, p(s), now);
        }
        assert!(r.reset().is_empty());
        assert_eq!(seqs(r.push(0, p(0), now)), [0]);
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
