//! Timed buses: a bus with a `bitrate` carries one frame at a time, each for its exact bit time,
//! the waiting frames arbitrated by identifier as on a wire.
//!
//! can-gw forwards at memory speed and in arrival order, so a timed bus has no can-gw rules.
//! One CAN_RAW socket bound to every interface of the bus namespace reads each frame with the
//! bus end it came from; [`schedule`] decides when it goes on the wire and who wins; when its
//! time is over the frame is written out of every other bus end (honouring the members'
//! receive filters and the [`faults`] injected). [`load`] counts what the wire carried.
//!
//! A member's transmit queue is bounded like a controller's: the member's counting program (see
//! `vcan-ebpf`) refuses a write with ENOBUFS while `tx_queue` of its frames wait here, and the
//! scheduler gives the credit back when a frame has left the wire (see [`TxCredits`]).
//!
//! The scheduler runs on a thread of its own and sleeps until the frame on the wire ends, the
//! next error frame falls due or a frame arrives.

pub mod bits;
pub mod faults;
pub mod load;
pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bus::config::TimingSpec;
use crate::control::request::{ActiveFault, FaultKind, Target};
use crate::kernel::can_raw::{CanRawError, RawCanSocket};
use crate::kernel::cangw::Filter;
use crate::kernel::frame::{CAN_ERR_FLAG, CANFD_MTU};
use crate::kernel::netns::Netns;
use crate::pod::resources::PodRef;

use faults::{Faults, Verdict};
use load::Load;
use schedule::{Frame, Schedule, Transmission};

/// Frames one bus end may have waiting in the scheduler. Members are held to the bus's
/// `tx_queue` before their frames get here; this bounds the tunnel's and the socketcand
/// endpoint's ends, which have queues of their own in front.
const QUEUE_LIMIT: usize = 1024;
/// Longest sleep without a reason to wake: the stop flag is looked at this often.
const IDLE_WAKE: Duration = Duration::from_millis(500);
/// Longest sleep when the scheduler cannot be woken (no eventfd).
const NO_WAKE_POLL: Duration = Duration::from_millis(5);

/// Gives a member's transmit-queue credit back when its frame has left the scheduler.
pub trait TxCredits: Send + Sync + std::fmt::Debug {
    /// `frames` frames of the member whose counters have `slot` are done.
    fn release(&self, slot: u32, frames: u64);
}

impl TxCredits for crate::ebpf::Counters {
    fn release(&self, slot: u32, frames: u64) {
        self.tx_done(slot, frames);
    }
}

/// Why the scheduler could not run.
#[derive(Debug, thiserror::Error)]
pub enum TimingError {
    /// The bus namespace's socket could not be opened.
    #[error("bus {bus}: {source}")]
    Socket {
        /// The bus.
        bus: String,
        /// What failed.
        source: CanRawError,
    },
    /// Waiting for frames failed.
    #[error("bus {bus}: the scheduler failed: {source}")]
    Io {
        /// The bus.
        bus: String,
        /// What failed.
        source: std::io::Error,
    },
}

/// One end of a timed bus: a member or a fixed end (tunnel, socketcand endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// The member (a fixed end's namespace is empty and its name the end's).
    pub pod: PodRef,
    /// Receive filters; none passes everything.
    pub filters: Vec<Filter>,
    /// The member's counter slot, whose transmit queue the counting program bounds.
    pub slot: Option<u32>,
}

impl End {
    fn accepts(&self, can_id: u32) -> bool {
        self.filters.is_empty()
            || self
                .filters
                .iter()
                .any(|f| can_id & f.mask == f.id & f.mask)
    }
}

/// The scheduler of one timed bus, shared by the bus (ends joining and leaving), the control
/// socket (faults) and the scrape (load).
#[derive(Debug)]
pub struct TimedBus {
    name: String,
    timing: TimingSpec,
    ends: Mutex<HashMap<u32, End>>,
    version: AtomicU64,
    load: Mutex<Load>,
    faults: Mutex<Faults>,
    stop: AtomicBool,
    /// Wakes the scheduler when ends or faults change (without it, the scheduler looks every
    /// [`NO_WAKE_POLL`]).
    wake: Option<OwnedFd>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update here is a single insert or increment: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TimedBus {
    /// The scheduler of bus `name` (not running yet: see [`TimedBus::run`]).
    pub fn new(name: &str, timing: TimingSpec) -> Arc<Self> {
        // SAFETY: plain eventfd(2); the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        let wake = if fd < 0 {
            tracing::warn!(bus = name, error = %std::io::Error::last_os_error(), "no eventfd: the timed bus's scheduler polls for changes");
            None
        } else {
            // SAFETY: fd is a fresh descriptor owned by nobody else.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Arc::new(TimedBus {
            name: name.to_string(),
            timing,
            ends: Mutex::new(HashMap::new()),
            version: AtomicU64::new(0),
            load: Mutex::new(Load::default()),
            faults: Mutex::new(Faults::default()),
            stop: AtomicBool::new(false),
            wake,
        })
    }

    /// The bus's timing.
    pub fn timing(&self) -> &TimingSpec {
        &self.timing
    }

    fn poke(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
        if let Some(wake) = &self.wake {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a u64 to our eventfd. A full counter only means a
            // wake-up is already pending.
            unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Adds or updates the end with interface index `ifindex` in the bus namespace.
    pub fn set_end(&self, ifindex: u32, end: End) {
        let changed = lock(&self.ends).insert(ifindex, end.clone()) != Some(end);
        if changed {
            self.poke();
        }
    }

    /// Sets the counter slot of the member `pod` (whose counters were attached after it joined).
    pub fn set_slot(&self, pod: &PodRef, slot: u32) {
        let mut ends = lock(&self.ends);
        for end in ends.values_mut().filter(|e| e.pod == *pod) {
            end.slot = Some(slot);
        }
        drop(ends);
        self.poke();
    }

    /// Removes an end that left; its waiting frames and faults go with it.
    pub fn remove_end(&self, ifindex: u32) {
        let removed = lock(&self.ends).remove(&ifindex);
        if let Some(end) = removed {
            lock(&self.faults).remove(ifindex);
            lock(&self.load).forget(&end.pod);
            self.poke();
        }
    }

    /// The ends, by interface index in the bus namespace.
    pub fn ends(&self) -> HashMap<u32, End> {
        lock(&self.ends).clone()
    }

    /// The counts so far.
    pub fn load(&self) -> Load {
        lock(&self.load).clone()
    }

    /// Starts fault `kind` on `target`; returns the members affected, or why not.
    pub fn inject(&self, target: &Target, kind: &FaultKind) -> Result<Vec<PodRef>, String> {
        let members: Vec<(u32, PodRef)> = lock(&self.ends)
            .iter()
            .filter(|(_, e)| !e.pod.namespace.is_empty())
            .filter(|(_, e)| match target {
                Target::All => true,
                Target::Pod { namespace, name } => {
                    e.pod.namespace == *namespace && e.pod.name == *name
                }
            })
            .map(|(i, e)| (*i, e.pod.clone()))
            .collect();
        if members.is_empty() {
            return Err(match target {
                Target::All => format!("bus {} has no members on this node", self.name),
                Target::Pod { .. } => format!(
                    "pod {target} is not a member of bus {} on this node: run the command in \
                     the plugin pod of the node where the pod runs",
                    self.name
                ),
            });
        }
        lock(&self.faults).inject(&members, target, kind, Instant::now());
        {
            let mut load = lock(&self.load);
            for (_, pod) in &members {
                *load
                    .faults_injected
                    .entry((pod.clone(), kind.label()))
                    .or_default() += 1;
            }
        }
        self.poke();
        Ok(members.into_iter().map(|(_, p)| p).collect())
    }

    /// Ends the faults of `target` (all of them if `None`); returns how many.
    pub fn clear(&self, target: Option<&Target>) -> usize {
        let n = lock(&self.faults).clear(target);
        self.poke();
        n
    }

    /// The faults in force.
    pub fn faults(&self) -> Vec<ActiveFault> {
        lock(&self.faults).listing(&self.name, Instant::now())
    }

    /// Faults in force by kind.
    pub fn faults_by_kind(&self) -> Vec<(&'static str, u64)> {
        lock(&self.faults).active_by_kind(Instant::now())
    }

    /// Stops [`TimedBus::run`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.poke();
    }

    /// Runs the scheduler on the calling thread until [`TimedBus::stop`] (blocking).
    pub fn run(
        self: &Arc<Self>,
        ns: &Netns,
        credits: Option<Arc<dyn TxCredits>>,
    ) -> Result<(), TimingError> {
        let socket =
            RawCanSocket::open_every_interface(ns).map_err(|source| TimingError::Socket {
                bus: self.name.clone(),
                source,
            })?;
        tracing::info!(bus = %self.name, bitrate = self.timing.bitrate, pace = self.timing.pace, "timed bus scheduling frames");
        let mut run = Run {
            bus: self.clone(),
            socket,
            credits,
            schedule: Schedule::new(self.timing),
            ends: HashMap::new(),
            seen: u64::MAX,
            delayed: BTreeMap::new(),
            seq: 0,
            released: HashMap::new(),
        };
        while !self.stop.load(Ordering::SeqCst) {
            run.step().map_err(|source| TimingError::Io {
                bus: self.name.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The scheduler thread's state.
struct Run {
    bus: Arc<TimedBus>,
    socket: RawCanSocket,
    credits: Option<Arc<dyn TxCredits>>,
    schedule: Schedule,
    /// The ends as of version `seen`.
    ends: HashMap<u32, End>,
    seen: u64,
    /// Frames delivered late by a delay fault: (due, seq) → (end, frame).
    delayed: BTreeMap<(Instant, u64), (u32, Frame)>,
    seq: u64,
    /// Credits to give back at the end of the step, by slot: one map update per member and
    /// step rather than per frame.
    released: HashMap<u32, u64>,
}

impl Run {
    fn step(&mut self) -> std::io::Result<()> {
        let version = self.bus.version.load(Ordering::SeqCst);
        if version != self.seen {
            self.seen = version;
            let ends = lock(&self.bus.ends).clone();
            for gone in self.ends.keys().filter(|i| !ends.contains_key(i)) {
                let dropped = self.schedule.remove(*gone);
                for _ in 0..dropped {
                    lock(&self.bus.load).dropped("queue_full");
                }
            }
            self.ends = ends;
        }
        // One clock read per step: on emulated hardware (HPET) each read is a slow system call,
        // and the schedule needs no finer stamps than the step's.
        let now = Instant::now();
        self.read_frames(now)?;
        while let Some(done) = self.schedule.next_done(now) {
            self.finish(&done, now);
        }
        self.fault_timers(now);
        if let Some(credits) = &self.credits {
            for (slot, frames) in self.released.drain() {
                credits.release(slot, frames);
            }
        }
        let deadline = [
            self.schedule.deadline(),
            lock(&self.bus.faults).next_deadline(),
            self.delayed.keys().next().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min();
        let longest = if self.bus.wake.is_some() {
            IDLE_WAKE
        } else {
            NO_WAKE_POLL
        };
        let timeout = deadline.map_or(longest, |d| d.saturating_duration_since(now).min(longest));
        self.wait(timeout)
    }

    /// Sleeps until a frame arrives, the bus is poked or `timeout` passes.
    fn wait(&self, timeout: Duration) -> std::io::Result<()> {
        let mut fds = [
            libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.bus.wake.as_ref().map_or(-1, |w| w.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: fds and ts are valid for the call; no signal mask is changed.
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if let Some(wake) = &self.bus.wake
            && fds[1].revents & libc::POLLIN != 0
        {
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into a u64 from our eventfd.
            unsafe { libc::read(wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
        }
        Ok(())
    }

    fn release(&mut self, from: u32) {
        if self.credits.is_some()
            && let Some(slot) = self.ends.get(&from).and_then(|e| e.slot)
        {
            *self.released.entry(slot).or_default() += 1;
        }
    }

    fn pod(&self, end: u32) -> PodRef {
        self.ends.get(&end).map_or_else(
            || PodRef {
                namespace: String::new(),
                name: format!("ifindex-{end}"),
            },
            |e| e.pod.clone(),
        )
    }

    /// Reads the frames waiting, as arrived at `now`.
    fn read_frames(&mut self, now: Instant) -> std::io::Result<()> {
        let mut raw = [0u8; CANFD_MTU];
        loop {
            let (n, from) = match self.socket.recv_from(&mut raw) {
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A bus end that vanished between the kernel queueing a frame and our read.
                Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => continue,
                Err(e) => return Err(e),
            };
            let Some(mut frame) = Frame::from_raw(&raw[..n]) else {
                self.release(from);
                continue;
            };
            // Error frames describe a controller; they never travel on a bus.
            if frame.can_id() & CAN_ERR_FLAG != 0 {
                self.release(from);
                continue;
            }
            let verdict = lock(&self.bus.faults).sending(from, now);
            match verdict {
                Verdict::Drop(kind) => {
                    let pod = self.pod(from);
                    let mut load = lock(&self.bus.load);
                    load.fault_frame(&pod, kind);
                    load.dropped("fault");
                    drop(load);
                    self.release(from);
                    continue;
                }
                Verdict::Corrupt(bit) => {
                    frame.flip_bit(bit);
                    lock(&self.bus.load).fault_frame(&self.pod(from), "corrupt");
                }
                Verdict::Pass | Verdict::Delay(_) => {}
            }
            if self.schedule.queued(from) >= QUEUE_LIMIT {
                lock(&self.bus.load).dropped("queue_full");
                self.release(from);
                continue;
            }
            self.schedule.push(from, frame, now);
        }
    }

    /// A frame left the wire: counted, its credit given back, delivered to every other end.
    fn finish(&mut self, done: &Transmission, now: Instant) {
        match self.ends.get(&done.from) {
            Some(end) => lock(&self.bus.load).carried(&end.pod, done),
            None => lock(&self.bus.load).carried(&self.pod(done.from), done),
        }
        self.release(done.from);
        let can_id = done.frame.can_id();
        let mut faults = lock(&self.bus.faults);
        let mut delivered = 0;
        let mut affected: Vec<(PodRef, &'static str)> = Vec::new();
        let mut failed = 0;
        for (&end, info) in &self.ends {
            if end == done.from || !info.accepts(can_id) {
                continue;
            }
            let mut frame = done.frame.clone();
            match faults.receiving(end, now) {
                Verdict::Pass => {}
                Verdict::Drop(kind) => {
                    affected.push((info.pod.clone(), kind));
                    continue;
                }
                Verdict::Corrupt(bit) => {
                    frame.flip_bit(bit);
                    affected.push((info.pod.clone(), "corrupt"));
                }
                Verdict::Delay(by) => {
                    affected.push((info.pod.clone(), "delay"));
                    self.seq += 1;
                    self.delayed.insert((now + by, self.seq), (end, frame));
                    continue;
                }
            }
            match self.socket.send_to(frame.as_raw(), end) {
                Ok(()) => delivered += 1,
                Err(e) => {
                    failed += 1;
                    tracing::debug!(bus = %self.bus.name, end, error = %e, "delivery failed");
                }
            }
        }
        drop(faults);
        let mut load = lock(&self.bus.load);
        load.delivered += delivered;
        for (pod, kind) in &affected {
            load.fault_frame(pod, kind);
            if *kind != "delay" && *kind != "corrupt" {
                load.dropped("fault");
            }
        }
        for _ in 0..failed {
            load.dropped("delivery_failed");
        }
    }

    /// Error frames and delayed frames that are due, and faults that are over.
    fn fault_timers(&mut self, now: Instant) {
        let due = {
            let mut faults = lock(&self.bus.faults);
            let due = faults.due_error_frames(now);
            faults.expire(now);
            due
        };
        for e in due {
            if let Err(err) = self.socket.send_to(e.frame.as_raw(), e.end) {
                tracing::debug!(bus = %self.bus.name, end = e.end, error = %err, "error frame not delivered");
                continue;
            }
            lock(&self.bus.load).fault_frame(&e.pod, "bus_off");
        }
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (end, frame) = entry.remove();
            if self.ends.contains_key(&end) && self.socket.send_to(frame.as_raw(), end).is_ok() {
                lock(&self.bus.load).delivered += 1;
            }
        }
    }
}
