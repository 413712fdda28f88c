//! The wire of a timed bus as a pure state machine: which frame is on the bus, when it ends, and
//! which waiting frame wins the next arbitration. No I/O and no clock of its own: the caller
//! passes the time, so every rule here is tested on the host with made-up times.
//!
//! Time is kept as the wire would: a frame starts when the previous one ends (its length includes
//! the interframe space) or when it arrives at an idle bus, whichever is later, however late the
//! caller comes to look. A late look delays the delivery, never the schedule, so a long burst
//! takes the sum of its frames' bit times.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::bus::config::TimingSpec;
use crate::kernel::frame::{CAN_EFF_FLAG, CAN_EFF_MASK, CAN_RTR_FLAG, CAN_SFF_MASK, CANFD_MTU};

use super::bits::{self, FrameBits, WireFrame};

/// One frame as a CAN_RAW socket reads it (`struct can_frame` or `struct canfd_frame`).
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    raw: [u8; CANFD_MTU],
    len: usize,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}#{:02X?}", self.can_id(), self.data())
    }
}

impl Frame {
    /// The frame in `raw` as read from a socket: `None` unless it is a classic or FD frame.
    pub fn from_raw(raw: &[u8]) -> Option<Frame> {
        if raw.len() != crate::kernel::frame::CAN_MTU && raw.len() != CANFD_MTU {
            return None;
        }
        let mut frame = Frame {
            raw: [0; CANFD_MTU],
            len: raw.len(),
        };
        frame.raw[..raw.len()].copy_from_slice(raw);
        Some(frame)
    }

    /// The frame as a socket writes it.
    pub fn as_raw(&self) -> &[u8] {
        &self.raw[..self.len]
    }

    /// The SocketCAN id word, flags included.
    pub fn can_id(&self) -> u32 {
        u32::from_ne_bytes([self.raw[0], self.raw[1], self.raw[2], self.raw[3]])
    }

    /// Whether it is a CAN FD frame.
    pub fn is_fd(&self) -> bool {
        self.len == CANFD_MTU
    }

    /// The payload (empty for a remote frame).
    pub fn data(&self) -> &[u8] {
        let max = if self.is_fd() { 64 } else { 8 };
        let len = usize::from(self.raw[4]).min(max);
        if !self.is_fd() && self.can_id() & CAN_RTR_FLAG != 0 {
            return &[];
        }
        &self.raw[8..8 + len]
    }

    /// Flips bit `bit` of the payload (modulo its length); a frame without payload is unchanged.
    pub fn flip_bit(&mut self, bit: usize) {
        let len = self.data().len();
        if len == 0 {
            return;
        }
        let bit = bit % (len * 8);
        self.raw[8 + bit / 8] ^= 1 << (bit % 8);
    }

    /// The frame's bits on the wire.
    pub fn bits(&self) -> FrameBits {
        bits::frame_bits(&WireFrame {
            can_id: self.can_id(),
            data: self.data(),
            dlc: self.raw[4].min(if self.is_fd() { 64 } else { 8 }),
            fd: self.is_fd(),
            brs: self.is_fd() && self.raw[5] & crate::kernel::frame::CANFD_BRS != 0,
        })
    }

    /// The frame's arbitration field as a number that orders frames as the wire does: lower
    /// wins. Bits in wire order: the 11-bit base id, then RTR (standard) or SRR (extended,
    /// always recessive), then IDE, then the 18 id extension bits and RTR of an extended frame.
    /// So a standard frame beats an extended one with the same base id, and a data frame a
    /// remote one; CAN FD frames have no remote form (their RRS bit is dominant).
    pub fn arbitration_key(&self) -> u64 {
        let id = self.can_id();
        let remote = u64::from(!self.is_fd() && id & CAN_RTR_FLAG != 0);
        if id & CAN_EFF_FLAG != 0 {
            let id = id & CAN_EFF_MASK;
            let base = u64::from(id >> 18);
            let extension = u64::from(id & 0x3_FFFF);
            (base << 21) | (1 << 20) | (1 << 19) | (extension << 1) | remote
        } else {
            let base = u64::from(id & CAN_SFF_MASK);
            (base << 21) | (remote << 20)
        }
    }
}

/// A frame waiting in a sender's queue.
#[derive(Debug, Clone)]
struct Waiting {
    frame: Frame,
    arrived: Instant,
    seq: u64,
}

/// A frame's time on the wire.
#[derive(Debug, Clone)]
pub struct Transmission {
    /// The bus end it came from.
    pub from: u32,
    /// The frame.
    pub frame: Frame,
    /// When it reached the scheduler.
    pub arrived: Instant,
    /// When its start of frame went on the wire.
    pub started: Instant,
    /// When its interframe space ended: the bus is free again.
    pub ends: Instant,
    /// Its bits.
    pub bits: FrameBits,
    /// How long it occupies a bus of this bitrate (also when frames are not paced).
    pub duration: Duration,
}

/// The wire and the senders' queues of one timed bus.
#[derive(Debug)]
pub struct Schedule {
    timing: TimingSpec,
    /// Each sender's frames in the order written: a controller offers its oldest frame.
    queues: BTreeMap<u32, VecDeque<Waiting>>,
    on_wire: Option<Transmission>,
    /// When the last frame on the wire ended.
    free_at: Option<Instant>,
    seq: u64,
}

impl Schedule {
    /// An idle bus.
    pub fn new(timing: TimingSpec) -> Self {
        Schedule {
            timing,
            queues: BTreeMap::new(),
            on_wire: None,
            free_at: None,
            seq: 0,
        }
    }

    /// Queues `frame`, written by the sender on bus end `from` at `arrived`.
    pub fn push(&mut self, from: u32, frame: Frame, arrived: Instant) {
        self.seq += 1;
        self.queues.entry(from).or_default().push_back(Waiting {
            frame,
            arrived,
            seq: self.seq,
        });
    }

    /// Frames waiting in `from`'s queue (not counting one on the wire).
    pub fn queued(&self, from: u32) -> usize {
        self.queues.get(&from).map_or(0, VecDeque::len)
    }

    /// Forgets the frames of a sender that left; returns how many.
    pub fn remove(&mut self, from: u32) -> usize {
        self.queues.remove(&from).map_or(0, |q| q.len())
    }

    /// When the frame on the wire ends, if one is.
    pub fn deadline(&self) -> Option<Instant> {
        self.on_wire.as_ref().map(|t| t.ends)
    }

    /// The next transmission that has ended by `now`, starting the one after it. Call until
    /// `None` to catch up.
    pub fn next_done(&mut self, now: Instant) -> Option<Transmission> {
        if self.on_wire.is_none() {
            self.start_next();
        }
        let ends = self.on_wire.as_ref()?.ends;
        if ends > now {
            return None;
        }
        let done = self.on_wire.take()?;
        self.free_at = Some(done.ends);
        self.start_next();
        Some(done)
    }

    /// Puts the winner of the arbitration among the queues' oldest frames on the wire. Only
    /// frames that had arrived when the bus became free take part; if none had, the first to
    /// arrive starts the bus, with those arriving at the same time.
    fn start_next(&mut self) {
        let heads = self.queues.values().filter_map(VecDeque::front);
        let Some(first_arrival) = heads.clone().map(|w| w.arrived).min() else {
            return;
        };
        let start = match self.free_at {
            Some(free) if free > first_arrival => free,
            _ => first_arrival,
        };
        let Some((&from, _)) = self
            .queues
            .iter()
            .filter_map(|(from, q)| q.front().map(|w| (from, w)))
            .filter(|(_, w)| w.arrived <= start)
            .min_by_key(|(_, w)| (w.frame.arbitration_key(), w.seq))
        else {
            return;
        };
        let Some(waiting) = self.queues.get_mut(&from).and_then(VecDeque::pop_front) else {
            return;
        };
        if self.queues.get(&from).is_some_and(VecDeque::is_empty) {
            self.queues.remove(&from);
        }
        let frame_bits = waiting.frame.bits();
        let duration = bits::duration(frame_bits, self.timing.bitrate, self.timing.data_bitrate);
        let on_wire = if self.timing.pace {
            duration
        } else {
            Duration::ZERO
        };
        self.on_wire = Some(Transmission {
            from,
            arrived: waiting.arrived,
            started: start,
            ends: start + on_wire,
            bits: frame_bits,
            duration,
            frame: waiting.frame,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(bitrate: u32) -> TimingSpec {
        TimingSpec {
            bitrate,
            data_bitrate: None,
            tx_queue: 10,
            pace: true,
        }
    }

    fn frame(id: u32, data: &[u8]) -> Frame {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&id.to_ne_bytes());
        raw[4] = data.len() as u8;
        raw[8..8 + data.len()].copy_from_slice(data);
        Frame::from_raw(&raw).expect("classic frame")
    }

    fn drain(s: &mut Schedule, now: Instant) -> Vec<Transmission> {
        std::iter::from_fn(|| s.next_done(now)).collect()
    }

    #[test]
    fn back_to_back_frames_take_the_sum_of_their_bit_times() {
        let t0 = Instant::now();
        let mut s = Schedule::new(timing(125_000));
        let mut expected = Duration::ZERO;
        for i in 0..100u8 {
            let f = frame(0x123, &[i; 8]);
            expected += bits::duration(f.bits(), 125_000, None);
            s.push(7, f, t0);
        }
        // Looked at far too late, all at once: the schedule is still the wire's.
        let done = drain(&mut s, t0 + Duration::from_secs(10));
        assert_eq!(done.len(), 100);
        assert_eq!(done[99].ends - t0, expected);
        for pair in done.windows(2) {
            assert_eq!(pair[0].ends, pair[1].started, "no gap, no overlap");
        }
        assert_eq!(
            done[0].frame.data(),
            [0; 8],
            "a sender's frames keep their order"
        );
    }

    #[test]
    fn the_lowest_id_wins_and_can_starve_the_others() {
        let t0 = Instant::now();
        let mut s = Schedule::new(timing(500_000));
        for _ in 0..3 {
            s.push(2, frame(0x200, &[2]), t0);
        }
        for _ in 0..3 {
            s.push(3, frame(0x100, &[1]), t0);
        }
        let order: Vec<u32> = drain(&mut s, t0 + Duration::from_secs(1))
            .iter()
            .map(|t| t.frame.can_id())
            .collect();
        assert_eq!(order, [0x100, 0x100, 0x100, 0x200, 0x200, 0x200]);
    }

    #[test]
    fn a_frame_on_the_wire_is_not_preempted() {
        let t0 = Instant::now();
        let mut s = Schedule::new(timing(125_000));
        s.push(2, frame(0x200, &[2; 8]), t0);
        assert!(s.next_done(t0).is_none(), "on the wire until it ends");
        let first_end = s.deadline().expect("on the wire");
        s.push(3, frame(0x100, &[1; 8]), t0 + Duration::from_micros(10));
        let done = drain(&mut s, first_end + Duration::from_secs(1));
        let ids: Vec<u32> = done.iter().map(|t| t.frame.can_id()).collect();
        assert_eq!(ids, [0x200, 0x100]);
        assert_eq!(done[1].started, first_end);
    }

    #[test]
    fn arbitration_orders_standard_extended_data_and_remote_as_the_wire() {
        let std_data = frame(0x100, &[]);
        let std_remote = frame(0x100 | CAN_RTR_FLAG, &[]);
        let ext_same_base = frame(CAN_EFF_FLAG | (0x100 << 18), &[]);
        let ext_remote = frame(CAN_EFF_FLAG | CAN_RTR_FLAG | (0x100 << 18), &[]);
        let ext_lower_base = frame(CAN_EFF_FLAG | (0x0FF << 18) | 0x3_FFFF, &[]);
        let keys = [
            ext_lower_base.arbitration_key(),
            std_data.arbitration_key(),
            std_remote.arbitration_key(),
            ext_same_base.arbitration_key(),
            ext_remote.arbitration_key(),
        ];
        let mut sorted = keys;
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn an_idle_bus_starts_when_a_frame_arrives_and_later_arrivals_wait() {
        let t0 = Instant::now();
        let mut s = Schedule::new(timing(125_000));
        s.push(2, frame(0x300, &[3]), t0);
        let t1 = t0 + Duration::from_secs(1);
        s.push(3, frame(0x100, &[1]), t1);
        let done = drain(&mut s, t1 + Duration::from_secs(1));
        assert_eq!(done[0].started, t0);
        assert_eq!(done[1].started, t1, "the bus was idle in between");
        // 0x300 had the bus to itself when it arrived, though 0x100 would have won.
        assert_eq!(done[0].frame.can_id(), 0x300);
    }

    #[test]
    fn unpaced_frames_go_at_once_but_count_their_time() {
        let t0 = Instant::now();
        let mut s = Schedule::new(TimingSpec {
            pace: false,
            ..timing(125_000)
        });
        s.push(2, frame(0x1, &[0; 8]), t0);
        s.push(2, frame(0x1, &[0; 8]), t0);
        let done = drain(&mut s, t0);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|t| t.ends == t0));
        assert!(done[0].duration > Duration::from_micros(800));
    }

    #[test]
    fn a_corrupted_bit_stays_in_the_payload() {
        let mut f = frame(0x1, &[0; 2]);
        f.flip_bit(9);
        assert_eq!(f.data(), [0, 2]);
        let mut empty = frame(0x1, &[]);
        empty.flip_bit(3);
        assert_eq!(empty.data(), [] as [u8; 0]);
    }
}
