//! Faults injected into a timed bus (see [`crate::control`] for how they are asked for): what
//! each does to the frames a member sends and receives, and the error frames a member's
//! applications see when its controller goes bus-off and restarts.
//!
//! A fault aimed at every member applies to the members present when it is injected. The error
//! frames are those a SocketCAN driver sends (`linux/can/error.h`): a controller problem for
//! error-warning and error-passive with the error counters, bus-off, restarted, and back to
//! error-active. They reach the member's sockets that asked for error frames (`candump -e`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::control::request::{ActiveFault, FaultKind, Target};
use crate::kernel::frame::{CAN_ERR_FLAG, CAN_MTU};
use crate::pod::resources::PodRef;

use super::schedule::Frame;

/// `CAN_ERR_CRTL`: controller problem, details in data[1].
const CAN_ERR_CRTL: u32 = 0x0004;
/// `CAN_ERR_BUSOFF`.
const CAN_ERR_BUSOFF: u32 = 0x0040;
/// `CAN_ERR_RESTARTED`: the controller restarted after bus-off.
const CAN_ERR_RESTARTED: u32 = 0x0100;
/// `CAN_ERR_CNT`: data[6] and data[7] hold the TX and RX error counters.
const CAN_ERR_CNT: u32 = 0x0200;
/// `CAN_ERR_CRTL_TX_WARNING`.
const CRTL_TX_WARNING: u8 = 0x08;
/// `CAN_ERR_CRTL_TX_PASSIVE`.
const CRTL_TX_PASSIVE: u8 = 0x20;
/// `CAN_ERR_CRTL_ACTIVE`: back to error-active.
const CRTL_ACTIVE: u8 = 0x40;
/// Time between the error-warning, error-passive and bus-off frames: a controller whose
/// transmissions fail passes the three thresholds (TEC 96, 128, 256) within a few frames.
const ERROR_STEP: Duration = Duration::from_millis(1);

/// What happens to one frame a member sends or receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It goes as it is.
    Pass,
    /// It is lost, because of a fault of this kind.
    Drop(&'static str),
    /// Payload bit `bit` (modulo the payload's bits) is flipped.
    Corrupt(usize),
    /// It arrives this much later.
    Delay(Duration),
}

/// An error frame due for a member.
#[derive(Debug, Clone)]
pub struct ErrorFrame {
    /// The member's bus end.
    pub end: u32,
    /// The member.
    pub pod: PodRef,
    /// The frame.
    pub frame: Frame,
}

#[derive(Debug, Clone)]
struct Active {
    end: u32,
    pod: PodRef,
    kind: FaultKind,
    /// Injected for every member (one of the copies).
    for_all: bool,
    /// For bus-off, when the controller is off the bus.
    off_from: Instant,
    until: Instant,
    /// Bus-off only: error frames still to deliver, by due time.
    errors: VecDeque<(Instant, Frame)>,
}

/// The faults of one bus.
#[derive(Debug)]
pub struct Faults {
    active: Vec<Active>,
    rng: u64,
}

impl Default for Faults {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64);
        Faults {
            active: Vec::new(),
            rng: seed | 1,
        }
    }
}

fn error_frame(class: u32, controller: u8, tx_errors: u8, rx_errors: u8) -> Frame {
    let mut raw = [0u8; CAN_MTU];
    raw[..4].copy_from_slice(&(CAN_ERR_FLAG | class | CAN_ERR_CNT).to_ne_bytes());
    raw[4] = 8;
    raw[9] = controller;
    raw[14] = tx_errors;
    raw[15] = rx_errors;
    // A 16-byte buffer is a classic frame.
    Frame::from_raw(&raw).unwrap_or_else(|| unreachable!("a 16-byte frame"))
}

impl Faults {
    /// Starts `kind` on each of `members` (bus end, pod) at `now`, injected for `target`.
    pub fn inject(
        &mut self,
        members: &[(u32, PodRef)],
        target: &Target,
        kind: &FaultKind,
        now: Instant,
    ) {
        for (end, pod) in members {
            let (off_from, until, errors) = match kind {
                FaultKind::BusOff { restart } => {
                    let off = now + 2 * ERROR_STEP;
                    let errors = VecDeque::from([
                        (now, error_frame(CAN_ERR_CRTL, CRTL_TX_WARNING, 96, 0)),
                        (
                            now + ERROR_STEP,
                            error_frame(CAN_ERR_CRTL, CRTL_TX_PASSIVE, 128, 0),
                        ),
                        (off, error_frame(CAN_ERR_BUSOFF, 0, 255, 0)),
                        (off + *restart, error_frame(CAN_ERR_RESTARTED, 0, 0, 0)),
                        (off + *restart, error_frame(CAN_ERR_CRTL, CRTL_ACTIVE, 0, 0)),
                    ]);
                    (off, off + *restart, errors)
                }
                FaultKind::Disconnect { duration }
                | FaultKind::Drop { duration, .. }
                | FaultKind::Corrupt { duration, .. }
                | FaultKind::Delay { duration, .. } => (now, now + *duration, VecDeque::new()),
            };
            self.active.push(Active {
                end: *end,
                pod: pod.clone(),
                kind: kind.clone(),
                for_all: *target == Target::All,
                off_from,
                until,
                errors,
            });
        }
    }

    /// Ends faults at once: every one for `None`, those injected for all members for
    /// `Some(Target::All)`, a pod's own for `Some(Target::Pod)`; returns how many ended. A member
    /// taken out of bus-off this way gets no restart frames.
    pub fn clear(&mut self, target: Option<&Target>) -> usize {
        let before = self.active.len();
        self.active.retain(|a| match target {
            None => false,
            Some(Target::All) => !a.for_all,
            Some(Target::Pod { namespace, name }) => {
                a.for_all || a.pod.namespace != *namespace || a.pod.name != *name
            }
        });
        before - self.active.len()
    }

    /// Forgets the faults of a member that left.
    pub fn remove(&mut self, end: u32) {
        self.active.retain(|a| a.end != end);
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: enough for fault probabilities, no dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn chance(&mut self, probability: f64) -> bool {
        ((self.random() >> 11) as f64 / (1u64 << 53) as f64) < probability
    }

    /// What happens to a frame the member on `end` sends at `now`.
    pub fn sending(&mut self, end: u32, now: Instant) -> Verdict {
        self.judge(end, now, false)
    }

    /// What happens to a frame delivered to the member on `end` at `now`.
    pub fn receiving(&mut self, end: u32, now: Instant) -> Verdict {
        self.judge(end, now, true)
    }

    fn judge(&mut self, end: u32, now: Instant, receiving: bool) -> Verdict {
        let mut verdict = Verdict::Pass;
        for i in 0..self.active.len() {
            let a = &self.active[i];
            if a.end != end || now >= a.until || now < a.off_from {
                continue;
            }
            let kind = a.kind.clone();
            match kind {
                FaultKind::BusOff { .. } | FaultKind::Disconnect { .. } => {
                    return Verdict::Drop(kind.label());
                }
                FaultKind::Drop { probability, .. } => {
                    if self.chance(probability) {
                        return Verdict::Drop(kind.label());
                    }
                }
                FaultKind::Corrupt { probability, .. } => {
                    if self.chance(probability) {
                        verdict = Verdict::Corrupt(self.random() as usize);
                    }
                }
                FaultKind::Delay {
                    latency, jitter, ..
                } if receiving => {
                    let jitter_ns = jitter.as_nanos() as u64;
                    let delay = if jitter_ns == 0 {
                        latency
                    } else {
                        let offset = self.random() % (2 * jitter_ns + 1);
                        (latency + Duration::from_nanos(offset)).saturating_sub(jitter)
                    };
                    verdict = Verdict::Delay(delay);
                }
                FaultKind::Delay { .. } => {}
            }
        }
        verdict
    }

    /// The error frames due by `now`, in order.
    pub fn due_error_frames(&mut self, now: Instant) -> Vec<ErrorFrame> {
        let mut due = Vec::new();
        for a in &mut self.active {
            while a.errors.front().is_some_and(|(at, _)| *at <= now) {
                if let Some((at, frame)) = a.errors.pop_front() {
                    // restart-ms counts from the bus-off the member saw: a bus-off frame that
                    // went out late moves the restart (and the end of the silence) with it.
                    let late = now.saturating_duration_since(at);
                    if frame.can_id() & CAN_ERR_BUSOFF != 0 && !late.is_zero() {
                        for (later, _) in &mut a.errors {
                            *later += late;
                        }
                        a.until += late;
                    }
                    due.push(ErrorFrame {
                        end: a.end,
                        pod: a.pod.clone(),
                        frame,
                    });
                }
            }
        }
        due
    }

    /// Drops the faults that are over (bus-off ones once their restart frames went out).
    pub fn expire(&mut self, now: Instant) {
        self.active
            .retain(|a| now < a.until || !a.errors.is_empty());
    }

    /// The next moment something changes by itself: an error frame falls due or a fault ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.active
            .iter()
            .flat_map(|a| {
                a.errors
                    .front()
                    .map(|(at, _)| *at)
                    .into_iter()
                    .chain([a.until])
            })
            .min()
    }

    /// The faults in force, for a listing.
    pub fn listing(&self, bus: &str, now: Instant) -> Vec<ActiveFault> {
        self.active
            .iter()
            .map(|a| ActiveFault {
                bus: bus.to_string(),
                target: Target::Pod {
                    namespace: a.pod.namespace.clone(),
                    name: a.pod.name.clone(),
                },
                kind: a.kind.clone(),
                remaining: a.until.saturating_duration_since(now),
            })
            .collect()
    }

    /// Faults in force by kind label.
    pub fn active_by_kind(&self, now: Instant) -> Vec<(&'static str, u64)> {
        FaultKind::LABELS
            .iter()
            .map(|label| {
                let n = self
                    .active
                    .iter()
                    .filter(|a| a.kind.label() == *label && now < a.until)
                    .count();
                (*label, n as u64)
            })
            .collect()
    }
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
    fn bus_off_sends_the_error_frames_a_driver_would_and_silences_the_member() {
        let t0 = Instant::now();
        let mut f = Faults::default();
        let restart = Duration::from_millis(100);
        f.inject(
            &[(5, pod("ecu"))],
            &Target::All,
            &FaultKind::BusOff { restart },
            t0,
        );
        let first = f.due_error_frames(t0);
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[0].frame.can_id(),
            CAN_ERR_FLAG | CAN_ERR_CRTL | CAN_ERR_CNT
        );
        assert_eq!(first[0].frame.data()[1], CRTL_TX_WARNING);
        assert_eq!(first[0].frame.data()[6], 96);
        assert_eq!(f.sending(5, t0), Verdict::Pass, "still error-active");
        let off = t0 + 2 * ERROR_STEP;
        let next: Vec<u32> = f
            .due_error_frames(off)
            .iter()
            .map(|e| e.frame.can_id() & !CAN_ERR_FLAG)
            .collect();
        assert_eq!(
            next,
            [CAN_ERR_CRTL | CAN_ERR_CNT, CAN_ERR_BUSOFF | CAN_ERR_CNT]
        );
        assert_eq!(f.sending(5, off), Verdict::Drop("bus_off"));
        assert_eq!(f.receiving(5, off), Verdict::Drop("bus_off"));
        assert_eq!(f.sending(6, off), Verdict::Pass, "others unaffected");
        assert_eq!(f.next_deadline(), Some(off + restart));
        let back = f.due_error_frames(off + restart);
        assert_eq!(back.len(), 2);
        assert_eq!(
            back[0].frame.can_id(),
            CAN_ERR_FLAG | CAN_ERR_RESTARTED | CAN_ERR_CNT
        );
        assert_eq!(back[1].frame.data()[1], CRTL_ACTIVE);
        assert_eq!(f.sending(5, off + restart), Verdict::Pass);
        f.expire(off + restart);
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn a_bus_off_frame_sent_late_moves_the_restart_with_it() {
        let t0 = Instant::now();
        let mut f = Faults::default();
        let restart = Duration::from_millis(300);
        f.inject(
            &[(5, pod("ecu"))],
            &Target::All,
            &FaultKind::BusOff { restart },
            t0,
        );
        let off = t0 + 2 * ERROR_STEP;
        let late = Duration::from_millis(40);
        assert_eq!(f.due_error_frames(off + late).len(), 3);
        assert_eq!(f.next_deadline(), Some(off + late + restart));
        assert!(f.due_error_frames(off + restart).is_empty());
        assert_eq!(
            f.sending(5, off + restart),
            Verdict::Drop("bus_off"),
            "still off the bus: restart-ms has not passed since the bus-off frame"
        );
        assert_eq!(f.due_error_frames(off + late + restart).len(), 2);
        assert_eq!(f.sending(5, off + late + restart), Verdict::Pass);
    }

    #[test]
    fn disconnect_drop_and_delay_last_their_time() {
        let t0 = Instant::now();
        let mut f = Faults::default();
        let d = Duration::from_millis(50);
        f.inject(
            &[(1, pod("a"))],
            &Target::All,
            &FaultKind::Disconnect { duration: d },
            t0,
        );
        f.inject(
            &[(2, pod("b"))],
            &Target::Pod {
                namespace: "default".into(),
                name: "b".into(),
            },
            &FaultKind::Drop {
                probability: 1.0,
                duration: d,
            },
            t0,
        );
        f.inject(
            &[(3, pod("c"))],
            &Target::All,
            &FaultKind::Delay {
                latency: Duration::from_millis(10),
                jitter: Duration::from_millis(2),
                duration: d,
            },
            t0,
        );
        assert_eq!(f.sending(1, t0), Verdict::Drop("disconnect"));
        assert_eq!(f.receiving(2, t0), Verdict::Drop("drop"));
        assert_eq!(f.sending(3, t0), Verdict::Pass, "delay applies to delivery");
        for _ in 0..100 {
            match f.receiving(3, t0) {
                Verdict::Delay(d) => assert!(
                    (Duration::from_millis(8)..=Duration::from_millis(12)).contains(&d),
                    "{d:?}"
                ),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(f.active_by_kind(t0)[1], ("disconnect", 1));
        assert_eq!(f.sending(1, t0 + d), Verdict::Pass);
        assert_eq!(
            f.clear(Some(&Target::Pod {
                namespace: "default".into(),
                name: "b".into()
            })),
            1
        );
        assert_eq!(f.receiving(2, t0), Verdict::Pass);
        // Clearing the faults injected for all members ends a's and c's.
        assert_eq!(f.clear(Some(&Target::All)), 2);
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn a_probability_is_roughly_kept() {
        let t0 = Instant::now();
        let mut f = Faults::default();
        f.inject(
            &[(1, pod("a"))],
            &Target::All,
            &FaultKind::Drop {
                probability: 0.25,
                duration: Duration::from_secs(1),
            },
            t0,
        );
        let dropped = (0..10_000)
            .filter(|_| f.sending(1, t0) != Verdict::Pass)
            .count();
        assert!((2_000..3_000).contains(&dropped), "{dropped}");
    }
}
