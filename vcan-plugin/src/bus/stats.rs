//! A bus's frame totals, summed from can-gw's per-rule 32-bit counters across wrap-arounds and
//! across rules deleted with leaving members.

use std::collections::HashMap;

use crate::kernel::cangw::{ListedRule, Rule};

use super::BusError;

/// A bus's members and frame totals, read now ([`crate::bus::Bus::stats`]).
#[derive(Debug)]
pub struct BusStats {
    /// Members known to the plugin; known even when the counters cannot be read.
    pub members: usize,
    /// The frame totals, or why they could not be read. There is deliberately no default: zeros
    /// standing in for a failed read would look like a counter reset to Prometheus.
    pub frames: Result<FrameTotals, BusError>,
}

/// Frames a bus's rules have forwarded and dropped since the plugin started, current rules and
/// rules since deleted together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTotals {
    /// Rules in the bus namespace.
    pub rules: usize,
    /// Frames forwarded (can-gw's 32-bit counters, widened).
    pub forwarded: u64,
    /// Frames dropped.
    pub dropped: u64,
}
/// See [`Bus::stats`].
#[derive(Debug, Default)]
pub(super) struct Counted {
    pub(super) last_seen: HashMap<Rule, Seen>,
    pub(super) retired: (u64, u64),
}

impl Counted {
    /// Records the rules' counters as read now. With `complete`, `listed` is every rule of the
    /// bus, and rules seen before but missing now (deleted, by the plugin or by the kernel with
    /// their interface) have their last counts added to the retired sums.
    pub(super) fn note(&mut self, listed: &[ListedRule], complete: bool) {
        let now: HashMap<Rule, (u32, u32)> = listed
            .iter()
            .filter(|l| !l.foreign)
            .map(|l| (l.rule, (l.counters.handled, l.counters.dropped)))
            .collect();
        if complete {
            let retired = &mut self.retired;
            self.last_seen.retain(|rule, seen| {
                let keep = now.contains_key(rule);
                if !keep {
                    retired.0 += seen.total.0;
                    retired.1 += seen.total.1;
                }
                keep
            });
        }
        for (rule, raw) in now {
            self.last_seen
                .entry(rule)
                .and_modify(|seen| seen.advance(raw))
                .or_insert_with(|| Seen::new(raw));
        }
    }

    pub(super) fn totals(&self) -> FrameTotals {
        let mut totals = FrameTotals {
            rules: self.last_seen.len(),
            forwarded: self.retired.0,
            dropped: self.retired.1,
        };
        for seen in self.last_seen.values() {
            totals.forwarded += seen.total.0;
            totals.dropped += seen.total.1;
        }
        totals
    }
}

/// One rule's counters: the kernel's 32-bit values as last read, and the 64-bit totals they add
/// up to across wrap-arounds (a busy bus passes 2^32 frames in days).
#[derive(Debug, Clone, Copy)]
pub(super) struct Seen {
    raw: (u32, u32),
    total: (u64, u64),
}

impl Seen {
    fn new(raw: (u32, u32)) -> Self {
        Seen {
            raw,
            total: (u64::from(raw.0), u64::from(raw.1)),
        }
    }

    /// Advances to `raw`; a value below the last one has wrapped.
    fn advance(&mut self, raw: (u32, u32)) {
        self.total.0 += u64::from(raw.0.wrapping_sub(self.raw.0));
        self.total.1 += u64::from(raw.1.wrapping_sub(self.raw.1));
        self.raw = raw;
    }
}

/// A listed rule of ours with these counters, for tests.
#[cfg(test)]
pub(super) fn listed(rule: Rule, handled: u32, dropped: u32) -> ListedRule {
    ListedRule {
        rule,
        counters: crate::kernel::cangw::Counters {
            handled,
            dropped,
            deleted: 0,
        },
        foreign: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_counters_keep_counting_across_the_kernels_32_bit_wrap() {
        let mut seen = Seen::new((u32::MAX - 1, 5));
        seen.advance((3, 5));
        assert_eq!(seen.total, (u64::from(u32::MAX) + 4, 5));
        seen.advance((10, 7));
        assert_eq!(seen.total, (u64::from(u32::MAX) + 11, 7));
    }

    #[test]
    fn deleted_rules_keep_counting_in_the_totals() {
        let (a, b) = (Rule::classic(2, 3), Rule::classic(3, 2));
        let mut counted = Counted::default();
        counted.note(&[listed(a, 10, 1), listed(b, 5, 0)], true);
        assert_eq!(
            counted.totals(),
            FrameTotals {
                rules: 2,
                forwarded: 15,
                dropped: 1
            }
        );
        // A leave reads b's final counts, then b is deleted.
        counted.note(&[listed(a, 11, 1), listed(b, 7, 0)], false);
        counted.note(&[listed(a, 12, 1)], true);
        assert_eq!(
            counted.totals(),
            FrameTotals {
                rules: 1,
                forwarded: 19,
                dropped: 1
            }
        );
        let foreign = ListedRule {
            foreign: true,
            ..listed(Rule::classic(4, 2), 1000, 0)
        };
        counted.note(&[listed(a, 12, 1), foreign], true);
        assert_eq!(counted.totals().forwarded, 19);
    }
}
