//! Receive accounting for one peer from the sequence numbers of its packets.
//!
//! cannelloni numbers its packets with a u8 that starts at 0 and wraps; it never retransmits,
//! so a missing number is a lost packet and a number seen before is a duplicate. With only 256
//! numbers, every arrival is ambiguous; [`SequenceTracker::record`] reads it by these rules,
//! relative to the number expected next (`next`, one after the newest number seen):
//!
//! - `seq == next`: in order.
//! - `seq` ahead of `next` by 1..=127 (less than half the space): a gap; the numbers skipped
//!   are counted lost.
//! - `seq` behind `next` by 1..=[`LATE_WINDOW`]: a late arrival. If its number was skipped by
//!   a gap it is *reordered*, and no longer lost; if it was seen already it is a *duplicate*.
//! - `seq` behind by more than [`LATE_WINDOW`] (up to 128): no network reorders that far, so
//!   the peer restarted (its numbering began again at 0): the tracker starts over from `seq`,
//!   counting a restart instead of a reorder, loss or duplicate.
//! - Two duplicates in a row with consecutive numbers are a restart too: a peer that restarted
//!   shortly after its numbering began, or a little behind where it was, sends numbers that
//!   were seen already, in order. The tracker starts over at the second one, and the first is
//!   no longer counted a duplicate.
//!
//! What these rules cannot see: a restart that lands ahead of `next` counts as a gap (up to 127
//! lost), and 256 or more packets lost in a row look like fewer (or none). The tracker knows no
//! time; its owner should [`SequenceTracker::reset`] it when the peer was silent long enough
//! for its numbers to wrap, or when it knows the peer restarted (e.g. its source port changed).

/// How far behind the expected number an arrival still counts as late rather than a sign the
/// peer restarted: far beyond what UDP reorders on the links a CAN tunnel spans, and half of
/// the numbers behind, so that the rest mean a restart.
pub const LATE_WINDOW: u8 = 64;

/// How far ahead of the expected number an arrival counts as a gap (half the space, less one):
/// an arrival further ahead is closer behind.
const MAX_GAP: u8 = 127;

/// Bits of the history of numbers seen behind `next`.
const HISTORY: u8 = 128;

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The first packet from the peer (or the first since [`SequenceTracker::reset`]).
    First,
    /// The number expected.
    InOrder,
    /// Ahead of the number expected; this many packets before it are missing.
    Gap(u8),
    /// Late, filling a gap counted lost before.
    Reordered,
    /// Late, with a number seen already.
    Duplicate,
    /// The peer started its numbering again; the tracker followed.
    Restart,
}

/// Totals over a peer's packets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequenceStats {
    /// Every packet recorded.
    pub received: u64,
    /// Packets whose numbers were skipped and have not arrived since.
    pub lost: u64,
    /// Packets that arrived after a higher number.
    pub reordered: u64,
    /// Packets whose number had arrived already.
    pub duplicates: u64,
    /// Times the peer started its numbering again.
    pub restarts: u64,
}

/// Sequence-number accounting for one peer; see the [module](self) for the rules.
#[derive(Debug, Clone, Default)]
pub struct SequenceTracker {
    /// The number expected next; `None` until the first packet.
    next: Option<u8>,
    /// Bit `i` set: number `next - 1 - i` arrived.
    seen: u128,
    /// How many bits of `seen` describe numbers this run of the peer was expected to send;
    /// numbers behind that were never counted lost, so they cannot be found again either.
    history: u8,
    /// The previous arrival's number, if it was a duplicate (see the restart rule).
    last_duplicate: Option<u8>,
    stats: SequenceStats,
}

impl SequenceTracker {
    /// A tracker that has seen nothing.
    pub fn new() -> SequenceTracker {
        SequenceTracker::default()
    }

    /// The totals so far.
    pub fn stats(&self) -> SequenceStats {
        self.stats
    }

    /// Forgets where the peer's numbering is, keeping the totals: the next packet is
    /// [`Arrival::First`].
    pub fn reset(&mut self) {
        self.next = None;
        self.last_duplicate = None;
    }

    /// Accounts for a packet numbered `seq`.
    pub fn record(&mut self, seq: u8) -> Arrival {
        self.stats.received += 1;
        let last_duplicate = self.last_duplicate.take();
        let Some(next) = self.next else {
            self.start(seq);
            return Arrival::First;
        };
        let ahead = seq.wrapping_sub(next);
        if ahead <= MAX_GAP {
            self.stats.lost += u64::from(ahead);
            self.advance(ahead + 1);
            return if ahead == 0 {
                Arrival::InOrder
            } else {
                Arrival::Gap(ahead)
            };
        }
        // 1..=128, as ahead is 128..=255
        let behind = next.wrapping_sub(seq);
        if behind > LATE_WINDOW {
            return self.restart(seq);
        }
        if behind > self.history {
            // Sent before the first number of this run arrived: late, but never counted lost.
            self.stats.reordered += 1;
            return Arrival::Reordered;
        }
        let bit = 1u128 << (behind - 1);
        if self.seen & bit == 0 {
            self.seen |= bit;
            self.stats.lost = self.stats.lost.saturating_sub(1);
            self.stats.reordered += 1;
            return Arrival::Reordered;
        }
        if last_duplicate == Some(seq.wrapping_sub(1)) {
            // The previous duplicate was this run's first packet.
            self.stats.duplicates = self.stats.duplicates.saturating_sub(1);
            let arrival = self.restart(seq);
            self.seen |= 0b10;
            self.history = 2;
            return arrival;
        }
        self.last_duplicate = Some(seq);
        self.stats.duplicates += 1;
        Arrival::Duplicate
    }

    fn start(&mut self, seq: u8) {
        self.next = Some(seq.wrapping_add(1));
        self.seen = 1;
        self.history = 1;
    }

    fn restart(&mut self, seq: u8) -> Arrival {
        self.stats.restarts += 1;
        self.start(seq);
        Arrival::Restart
    }

    /// Moves `next` on by `by` (1..=128) numbers, the last of which arrived.
    fn advance(&mut self, by: u8) {
        self.seen = self.seen.checked_shl(u32::from(by)).unwrap_or(0) | 1;
        self.history = self.history.saturating_add(by).min(HISTORY);
        self.next = self.next.map(|next| next.wrapping_add(by));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(seqs: &[u8]) -> (Vec<Arrival>, SequenceStats) {
        let mut t = SequenceTracker::new();
        let arrivals = seqs.iter().map(|&s| t.record(s)).collect();
        (arrivals, t.stats())
    }

    fn stats(
        received: u64,
        lost: u64,
        reordered: u64,
        duplicates: u64,
        restarts: u64,
    ) -> SequenceStats {
        SequenceStats {
            received,
            lost,
            reordered,
            duplicates,
            restarts,
        }
    }

    #[test]
    fn in_order_across_the_wrap() {
        let seqs: Vec<u8> = (250..=255).chain(0..5).collect();
        let (arrivals, s) = run(&seqs);
        assert_eq!(arrivals[0], Arrival::First);
        assert!(arrivals[1..].iter().all(|&a| a == Arrival::InOrder));
        assert_eq!(s, stats(11, 0, 0, 0, 0));
    }

    #[test]
    fn gap_counts_lost() {
        let (arrivals, s) = run(&[254, 255, 3]);
        assert_eq!(arrivals[2], Arrival::Gap(3));
        assert_eq!(s, stats(3, 3, 0, 0, 0));
    }

    #[test]
    fn late_arrival_is_reordered_not_lost() {
        let (arrivals, s) = run(&[1, 3, 2, 4]);
        assert_eq!(
            arrivals,
            [
                Arrival::First,
                Arrival::Gap(1),
                Arrival::Reordered,
                Arrival::InOrder
            ]
        );
        assert_eq!(s, stats(4, 0, 1, 0, 0));
    }

    #[test]
    fn duplicate() {
        let (arrivals, s) = run(&[1, 2, 3, 2, 4]);
        assert_eq!(arrivals[3], Arrival::Duplicate);
        assert_eq!(s, stats(5, 0, 0, 1, 0));
    }

    #[test]
    fn reordered_then_duplicated() {
        let (arrivals, s) = run(&[1, 3, 2, 2]);
        assert_eq!(arrivals[3], Arrival::Duplicate);
        assert_eq!(s, stats(4, 0, 1, 1, 0));
    }

    #[test]
    fn large_jump_back_is_a_restart() {
        // 101 behind; 151 behind would be 105 ahead, a gap (see the module).
        let mut seqs: Vec<u8> = (0..=100).collect();
        seqs.extend([0, 1, 2]);
        let (arrivals, s) = run(&seqs);
        assert_eq!(arrivals[101], Arrival::Restart);
        assert_eq!(&arrivals[102..], &[Arrival::InOrder, Arrival::InOrder]);
        assert_eq!(s, stats(104, 0, 0, 0, 1));
    }

    #[test]
    fn edges_of_the_window() {
        let mut t = SequenceTracker::new();
        t.record(100);
        // 127 ahead: a gap; 128 ahead is 128 behind: a restart.
        assert_eq!(t.record(100 + 1 + 127), Arrival::Gap(127));
        let next = 229u8;
        assert_eq!(t.record(next.wrapping_sub(LATE_WINDOW)), Arrival::Reordered);
        assert_eq!(
            t.record(next.wrapping_sub(LATE_WINDOW + 1)),
            Arrival::Restart
        );
        let mut t = SequenceTracker::new();
        t.record(0);
        assert_eq!(t.record(129), Arrival::Restart);
    }

    #[test]
    fn restart_shortly_after_start_is_found_by_consecutive_duplicates() {
        let mut seqs: Vec<u8> = (0..30).collect();
        seqs.extend(0..5);
        let (arrivals, s) = run(&seqs);
        assert_eq!(arrivals[30], Arrival::Duplicate);
        assert_eq!(arrivals[31], Arrival::Restart);
        assert_eq!(&arrivals[32..], &[Arrival::InOrder; 3]);
        assert_eq!(s, stats(35, 0, 0, 0, 1));
        // A late 0 after the restart is a duplicate of the restarted run's first packet.
        let mut t = SequenceTracker::new();
        for &q in &seqs {
            t.record(q);
        }
        assert_eq!(t.record(0), Arrival::Duplicate);
    }

    #[test]
    fn late_from_before_the_first_packet_is_not_lost() {
        let (arrivals, s) = run(&[10, 11, 9]);
        assert_eq!(arrivals[2], Arrival::Reordered);
        assert_eq!(s, stats(3, 0, 1, 0, 0));
    }

    #[test]
    fn reset_keeps_totals() {
        let mut t = SequenceTracker::new();
        t.record(1);
        t.record(5);
        t.reset();
        assert_eq!(t.record(200), Arrival::First);
        assert_eq!(t.stats(), stats(3, 3, 0, 0, 0));
    }

    proptest! {
        #[test]
        fn never_panics(seqs in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (arrivals, s) = run(&seqs);
            prop_assert_eq!(s.received, seqs.len() as u64);
            prop_assert_eq!(arrivals.len(), seqs.len());
        }

        #[test]
        fn local_reordering_loses_nothing(
            start: u8,
            n in 2usize..600,
            swaps in proptest::collection::vec(any::<prop::sample::Index>(), 0..50),
        ) {
            // Swap neighbours of an unbroken run: every packet arrives, some a little late.
            let mut seqs: Vec<u8> = (0..n).map(|i| start.wrapping_add(i as u8)).collect();
            for at in &swaps {
                let i = at.index(n - 1);
                seqs.swap(i, i + 1);
            }
            let (_, s) = run(&seqs);
            prop_assert_eq!(s.duplicates, 0);
            prop_assert_eq!(s.restarts, 0);
            // The first arrival may be late itself; what came before it is then reordered
            // without having been lost.
            prop_assert_eq!(s.lost, 0);
        }

        #[test]
        fn drops_are_counted(
            start: u8,
            keep in proptest::collection::vec(proptest::bool::weighted(0.8), 1..600),
        ) {
            // Loss only, never 128 in a row: lost counts exactly the packets dropped between
            // the first and the last that arrived.
            let mut seqs = Vec::new();
            let mut run_of_drops = 0;
            for (i, &k) in keep.iter().enumerate() {
                if k || run_of_drops == 100 {
                    seqs.push(start.wrapping_add(i as u8));
                    run_of_drops = 0;
                } else {
                    run_of_drops += 1;
                }
            }
            prop_assume!(!seqs.is_empty());
            let (_, s) = run(&seqs);
            // Positions from the first arrival to the last, each step shorter than 128.
            let span = 1 + seqs
                .windows(2)
                .map(|w| u64::from(w[1].wrapping_sub(w[0])))
                .sum::<u64>();
            prop_assert_eq!(s.lost, span - seqs.len() as u64);
            prop_assert_eq!(s.reordered + s.duplicates + s.restarts, 0);
        }
    }
}
