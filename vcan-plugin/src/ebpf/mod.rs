//! Per-interface CAN frame counters, kept by an eBPF tc program (`vcan-ebpf/`).
//!
//! [`Counters`] owns the three maps the programs share across all attachments, pinned under a
//! bpffs directory (default [`DEFAULT_BPFFS_DIR`]):
//! - `vcan_cnt_v1`, per-CPU counters keyed by *slot* and direction;
//! - `vcan_slots_v1`, the slot registry: which interface (namespace inode + ifindex) each slot
//!   counts, how it is attached, and the ids of its entry programs;
//! - `vcan_progs_v1`, the counting programs, loaded once per process, by direction.
//!
//! A slot is a random non-zero 32-bit id the loader picks per attachment (ifindex alone cannot
//! be the key: it repeats across namespaces, and the program cannot learn its namespace on the
//! kernels we support). What is attached to an interface is a pair of eight-instruction entry
//! programs (`entry.rs`) that pass the slot to the counting programs in `skb->cb` through a tail
//! call. Ids are not reused, so a stale entry program can never count into someone else's entry.
//!
//! The maps and the attachments themselves live in the kernel, not in this process: after a
//! plugin restart, [`Counters::open`] finds the registry again, drops records whose interface
//! is gone ([`Counters::sweep`]), and [`Counters::attach`] (or [`Counters::adopt`]) returns the
//! existing attachment for a live interface, whose counters simply continue.
//!
//! Attaching happens inside the pod's namespace via [`crate::kernel::netns::run`]; everything here is
//! blocking (call it from `spawn_blocking` in async code).

mod entry;
mod loader;
mod sys;

pub mod layout;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};

use aya::maps::{MapError, PerCpuValues};

pub use loader::{AttachMode, attach_mode};

use crate::kernel::link::{LinkError, Links};
use crate::kernel::netns::{self, Netns, NetnsError};
use layout::{
    DIR_EGRESS, DIR_INGRESS, MAX_SLOTS, VcanCounters, VcanKey, VcanKind, VcanSlot, VcanTxq,
};
use loader::{CountersMap, Programs, SlotsMap};

/// Where the maps and TCX links are pinned unless configured otherwise.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/vcan-plugin";

/// The compiled counter program, as embedded in this binary (for inspection and tests).
pub fn object() -> &'static [u8] {
    loader::OBJECT
}

/// Why counting could not be set up or read; messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The pin directory is not on a bpffs mount.
    #[error(
        "{dir} is not on a bpf filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` (in a \
         pod, mount the node's /sys/fs/bpf as a hostPath volume with Bidirectional propagation) \
         or choose another pin directory on bpffs"
    )]
    BpffsNotMounted {
        /// The configured directory.
        dir: PathBuf,
    },
    /// The pin directory could not be inspected or created.
    #[error("cannot prepare the bpffs pin directory {dir}: {source}")]
    PinDir {
        /// The directory.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel refused for lack of privileges.
    #[error(
        "{what}: permission denied ({detail}); the plugin needs CAP_BPF and CAP_NET_ADMIN \
         (CAP_SYS_ADMIN on kernels before 5.8) — run it privileged"
    )]
    NoPermission {
        /// What was being done.
        what: String,
        /// The kernel's error chain.
        detail: String,
    },
    /// Loading the object, its maps or programs failed.
    #[error("eBPF counters: {what} failed: {detail}")]
    Load {
        /// What was being done.
        what: String,
        /// The error chain (for verifier rejections, the verifier log).
        detail: String,
    },
    /// A pinned map exists with another layout.
    #[error(
        "the pinned map {path} has an incompatible layout ({detail}); it was left by another \
         vcan-plugin version: remove the pin (`rm {path}`) and restart the plugin"
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
    /// The namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The interface could not be looked up.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// No interface of that name in the namespace.
    #[error("no interface {ifname:?} in network namespace {ns}: create it before attaching")]
    InterfaceNotFound {
        /// The name.
        ifname: String,
        /// The namespace.
        ns: String,
    },
    /// Every slot is in use.
    #[error(
        "all {max} counter slots are in use: detach interfaces of pods that are gone (or run \
         Counters::sweep)"
    )]
    NoFreeSlot {
        /// The limit.
        max: u32,
    },
    /// Attaching to the interface failed.
    #[error("attaching the CAN counters to {ifname:?} in {ns} failed: {detail}")]
    Attach {
        /// The interface.
        ifname: String,
        /// The namespace.
        ns: String,
        /// What went wrong.
        detail: String,
    },
    /// Detaching failed; the slot stays registered so that nothing counts into a reused id.
    #[error("detaching the CAN counters from {ifname:?} failed: {detail}")]
    Detach {
        /// The interface.
        ifname: String,
        /// What went wrong.
        detail: String,
    },
    /// A map operation failed.
    #[error("eBPF counters: {op} failed: {detail}")]
    Map {
        /// The operation.
        op: &'static str,
        /// The error chain.
        detail: String,
    },
    /// The attachment was detached (or swept) since it was handed out.
    #[error("the counters of {ifname:?} (slot {slot:#x}) are no longer attached")]
    Stale {
        /// The interface.
        ifname: String,
        /// Its former slot.
        slot: u32,
    },
}

fn map_error(op: &'static str, e: &MapError) -> EbpfError {
    match loader::load_error(op, e) {
        e @ EbpfError::NoPermission { .. } => e,
        _ => EbpfError::Map {
            op,
            detail: loader::chain(e),
        },
    }
}

/// Settings for [`Counters::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// bpffs directory for the pinned maps (and TCX links); created if missing.
    pub bpffs_dir: PathBuf,
    /// How to attach; `None` picks the best this kernel supports ([`attach_mode`]).
    pub mode: Option<AttachMode>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            mode: None,
        }
    }
}

/// What a slot counts: an interface, identified the way the kernel allows across namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotInfo {
    /// The slot (the program's key), a random non-zero id.
    pub slot: u32,
    /// Inode of the interface's network namespace.
    pub netns_ino: u64,
    /// Interface index inside that namespace.
    pub ifindex: u32,
    /// Interface name when attached.
    pub ifname: String,
    /// How the programs are attached.
    pub mode: AttachMode,
}

impl SlotInfo {
    fn from_record(slot: u32, r: &VcanSlot) -> Self {
        SlotInfo {
            slot,
            netns_ino: r.netns_ino,
            ifindex: r.ifindex,
            ifname: r.ifname(),
            mode: AttachMode::from_code(r.mode).unwrap_or(AttachMode::Clsact),
        }
    }
}

/// Counters attached to one interface of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The namespace the interface lives in (needed to detach clsact filters).
    pub netns: Netns,
    /// The slot and interface.
    pub info: SlotInfo,
}

/// Frames of one kind and their payload bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// Frames.
    pub frames: u64,
    /// Payload bytes (the frames' data length; 0 for remote frames).
    pub bytes: u64,
}

impl KindCounts {
    fn add(self, other: KindCounts) -> KindCounts {
        KindCounts {
            frames: self.frames.wrapping_add(other.frames),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

impl From<VcanKind> for KindCounts {
    fn from(k: VcanKind) -> Self {
        KindCounts {
            frames: k.frames,
            bytes: k.bytes,
        }
    }
}

/// One direction's counters. The kinds are disjoint: each frame is in exactly one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionCounts {
    /// Classic data frames.
    pub classic: KindCounts,
    /// Classic remote (RTR) frames.
    pub rtr: KindCounts,
    /// Error frames.
    pub err: KindCounts,
    /// CAN FD frames without bit-rate switch.
    pub fd: KindCounts,
    /// CAN FD frames with bit-rate switch.
    pub fd_brs: KindCounts,
    /// CAN XL frames.
    pub xl: KindCounts,
    /// Frames the program could not classify.
    pub other: KindCounts,
    /// Classic, RTR and FD frames with an 11-bit id.
    pub std_id: u64,
    /// Classic, RTR and FD frames with a 29-bit id.
    pub ext_id: u64,
}

impl DirectionCounts {
    /// Every kind with a stable name (`classic`, `rtr`, `error`, `fd`, `fd_brs`, `xl`, `other`),
    /// e.g. for metric labels.
    pub fn kinds(&self) -> [(&'static str, KindCounts); 7] {
        [
            ("classic", self.classic),
            ("rtr", self.rtr),
            ("error", self.err),
            ("fd", self.fd),
            ("fd_brs", self.fd_brs),
            ("xl", self.xl),
            ("other", self.other),
        ]
    }

    /// All frames and bytes, whatever their kind.
    pub fn total(&self) -> KindCounts {
        self.kinds()
            .iter()
            .fold(KindCounts::default(), |acc, (_, k)| acc.add(*k))
    }

    /// All CAN FD frames, with and without bit-rate switch.
    pub fn fd_all(&self) -> KindCounts {
        self.fd.add(self.fd_brs)
    }

    /// Sums the per-CPU values the kernel keeps.
    fn sum(values: &[VcanCounters]) -> Self {
        values
            .iter()
            .fold(Self::default(), |acc, v| DirectionCounts {
                classic: acc.classic.add(v.classic.into()),
                rtr: acc.rtr.add(v.rtr.into()),
                err: acc.err.add(v.err.into()),
                fd: acc.fd.add(v.fd.into()),
                fd_brs: acc.fd_brs.add(v.fd_brs.into()),
                xl: acc.xl.add(v.xl.into()),
                other: acc.other.add(v.other.into()),
                std_id: acc.std_id.wrapping_add(v.std_id),
                ext_id: acc.ext_id.wrapping_add(v.ext_id),
            })
    }
}

/// Both directions of one attachment, summed over CPUs. Monotonic while the attachment lives,
/// across plugin restarts included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Frames the interface received (on vcan: the local echo of every frame sent).
    pub ingress: DirectionCounts,
    /// Frames sent on the interface.
    pub egress: DirectionCounts,
}

/// A plain-data value of type `T` from the start of `bytes` (at least its size; any alignment).
fn bytemuck_read<T: Copy + Default + aya::Pod>(bytes: &[u8]) -> T {
    let mut value = T::default();
    let size = std::mem::size_of::<T>().min(bytes.len());
    // SAFETY: T is Pod (any bit pattern is a valid value) and `size` bytes fit both buffers.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut value as *mut T).cast::<u8>(), size);
    }
    value
}

/// An interface: namespace inode and ifindex.
type IfKey = (u64, u32);

struct Inner {
    counters: CountersMap,
    slots: SlotsMap,
    /// The registry's contents (this process is its only writer).
    records: BTreeMap<u32, VcanSlot>,
    /// Interfaces with an attach or detach in flight: others wait rather than race.
    busy: HashSet<IfKey>,
    /// Slots handed out to attaches in flight, not yet in `records`.
    reserved: HashSet<u32>,
}

impl Inner {
    fn find(&self, key: IfKey) -> Option<(u32, VcanSlot)> {
        self.records
            .iter()
            .find(|(_, r)| (r.netns_ino, r.ifindex) == key)
            .map(|(s, r)| (*s, *r))
    }

    fn allocate(&mut self) -> Result<u32, EbpfError> {
        if self.records.len() + self.reserved.len() >= MAX_SLOTS as usize {
            return Err(EbpfError::NoFreeSlot { max: MAX_SLOTS });
        }
        loop {
            let slot = random_u32()?;
            if slot != 0 && !self.records.contains_key(&slot) && !self.reserved.contains(&slot) {
                self.reserved.insert(slot);
                return Ok(slot);
            }
        }
    }

    fn zero_entries(&mut self, slot: u32, ncpus: usize) -> Result<(), EbpfError> {
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let zero =
                PerCpuValues::try_from(vec![VcanCounters::default(); ncpus]).map_err(|e| {
                    EbpfError::Map {
                        op: "preparing zeroed counters",
                        detail: e.to_string(),
                    }
                })?;
            self.counters
                .insert(VcanKey { slot, dir }, zero, 0)
                .map_err(|e| map_error("creating a counters entry", &e))?;
        }
        Ok(())
    }

    fn remove_entries(&mut self, slot: u32) {
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            // Missing entries are fine: this also cleans up after half-done attaches.
            let _ = self.counters.remove(&VcanKey { slot, dir });
        }
    }

    /// Forgets a slot entirely: registry record and counters (the caller forgets its transmit
    /// queue).
    fn release(&mut self, slot: u32) -> Result<(), EbpfError> {
        self.remove_entries(slot);
        match self.slots.remove(&slot) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_error("removing a slot record", &e)),
        }
        self.records.remove(&slot);
        Ok(())
    }
}

fn random_u32() -> Result<u32, EbpfError> {
    let mut b = [0u8; 4];
    // SAFETY: b is a writable 4-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 4 {
        return Err(EbpfError::Map {
            op: "picking a slot id",
            detail: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(u32::from_ne_bytes(b))
}

/// The CAN frame counters of every interface the plugin serves.
///
/// Cheap to share (`Arc<Counters>`); all methods take `&self`. Attaching different interfaces
/// proceeds in parallel; attach and detach of the *same* interface are serialised.
pub struct Counters {
    pin_dir: PathBuf,
    mode: AttachMode,
    ncpus: usize,
    programs: Programs,
    inner: Mutex<Inner>,
    idle: Condvar,
    /// Timed-bus transmit queues; a lock of their own, taken per frame by the schedulers.
    queues: Mutex<Queues>,
}

/// The transmit queues of timed-bus members (see `struct vcan_txq`).
struct Queues {
    txq: loader::TxqMap,
    txdone: loader::TxDoneMap,
    /// Frames done per slot, as last written to `txdone` (this process is its only writer).
    done: HashMap<u32, u64>,
}

impl Queues {
    fn forget(&mut self, slot: u32) {
        // Missing entries are fine: only members of timed buses have them.
        let _ = self.txq.remove(&slot);
        let _ = self.txdone.remove(&slot);
        self.done.remove(&slot);
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("pin_dir", &self.pin_dir)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Counters {
    /// Opens (creating on first use) the pinned maps under `config.bpffs_dir`, re-reads the slot
    /// registry left by an earlier run, and releases the slots whose interfaces are gone.
    pub fn open(config: &Config) -> Result<Self, EbpfError> {
        loader::prepare_pin_dir(&config.bpffs_dir)?;
        let (
            loader::Maps {
                counters,
                slots,
                txq,
                txdone,
            },
            programs,
        ) = loader::open(&config.bpffs_dir)?;
        let ncpus = aya::util::nr_cpus().map_err(|(path, e)| EbpfError::Load {
            what: "counting the possible CPUs".into(),
            detail: format!("{path}: {e}"),
        })?;
        let mut records = BTreeMap::new();
        for entry in slots.iter() {
            let (slot, record) = entry.map_err(|e| map_error("reading the slot registry", &e))?;
            records.insert(slot, record);
        }
        let counters = Counters {
            pin_dir: config.bpffs_dir.clone(),
            mode: config.mode.unwrap_or_else(attach_mode),
            ncpus,
            programs,
            queues: Mutex::new(Queues {
                txq,
                txdone,
                done: HashMap::new(),
            }),
            inner: Mutex::new(Inner {
                counters,
                slots,
                records,
                busy: HashSet::new(),
                reserved: HashSet::new(),
            }),
            idle: Condvar::new(),
        };
        let released = counters.sweep()?;
        tracing::info!(
            dir = %config.bpffs_dir.display(),
            mode = counters.mode.as_str(),
            adopted = counters.list().len(),
            released = released.len(),
            "eBPF CAN counters ready"
        );
        Ok(counters)
    }

    /// How new attachments are made: `clsact` or `tcx`.
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    fn lock_queues(&self) -> MutexGuard<'_, Queues> {
        // Each update is one map write and one insert: a poisoned lock is still consistent.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bounds the transmit queue of the interface counted in `slot` (a member of a timed bus) to
    /// `limit` frames waiting for the bus: its egress program refuses more with ENOBUFS. Called
    /// again for the same slot (a restarted plugin adopting the member), it starts the queue
    /// empty: the frames that were waiting went with the previous scheduler.
    pub fn set_tx_queue(&self, slot: u32, limit: u32) -> Result<(), EbpfError> {
        let mut q = self.lock_queues();
        let existing = q.txq.get(&slot, 0).ok();
        match existing {
            Some(txq) if txq.limit == limit => {
                q.txdone
                    .insert(slot, txq.sent, 0)
                    .map_err(|e| map_error("resetting a transmit queue", &e))?;
                q.done.insert(slot, txq.sent);
            }
            _ => {
                // The program only adds to `sent`, so the new queue's count starts from zero
                // with `done` at zero; a frame let through in between is counted either way.
                q.txdone
                    .insert(slot, 0, 0)
                    .map_err(|e| map_error("creating a transmit queue", &e))?;
                q.done.insert(slot, 0);
                q.txq
                    .insert(
                        slot,
                        VcanTxq {
                            limit,
                            ..VcanTxq::default()
                        },
                        0,
                    )
                    .map_err(|e| map_error("creating a transmit queue", &e))?;
            }
        }
        Ok(())
    }

    /// Counts `frames` more frames of the transmit queue of `slot` as having left the bus, making
    /// room for as many (a slot without a queue is ignored).
    pub fn tx_done(&self, slot: u32, frames: u64) {
        let mut q = self.lock_queues();
        let Some(done) = q.done.get_mut(&slot) else {
            return;
        };
        *done += frames;
        let done = *done;
        if let Err(e) = q.txdone.insert(slot, done, 0) {
            tracing::debug!(slot, error = %e, "a transmit queue's room was not given back");
        }
    }

    /// Writes refused because the transmit queue of `slot` was full.
    pub fn tx_refused(&self, slot: u32) -> u64 {
        self.lock_queues()
            .txq
            .get(&slot, 0)
            .map_or(0, |q| q.refused)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the in-memory view at worst a step behind the
        // maps; carrying on beats poisoning every later call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks, once no attach or detach of `key` is in flight.
    fn lock_idle(&self, key: IfKey) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        while inner.busy.contains(&key) {
            inner = self.idle.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner
    }

    /// The namespace inode and interface index of `ifname` in `ns`.
    fn identify(&self, ns: &Netns, ifname: &str) -> Result<IfKey, EbpfError> {
        let ino = Self::netns_inode(ns)?;
        let link = Links::open(ns)?
            .get(ifname)?
            .ok_or_else(|| EbpfError::InterfaceNotFound {
                ifname: ifname.to_string(),
                ns: ns.to_string(),
            })?;
        Ok((ino, link.index))
    }

    fn netns_inode(ns: &Netns) -> Result<u64, EbpfError> {
        netns::inode(&ns.path()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                EbpfError::Netns(NetnsError::NotFound(ns.to_string()))
            } else {
                EbpfError::Netns(NetnsError::Open {
                    ns: ns.to_string(),
                    source: e,
                })
            }
        })
    }

    /// A live registered attachment for `key`; dead ones found on the way are released.
    fn adopt_locked(
        &self,
        inner: &mut Inner,
        ns: &Netns,
        key: IfKey,
    ) -> Result<Option<Attachment>, EbpfError> {
        let Some((slot, record)) = inner.find(key) else {
            return Ok(None);
        };
        let alive =
            loader::attachment_alive(&self.pin_dir, slot, &record).map_err(|e| EbpfError::Map {
                op: "checking whether an attachment is still in the kernel",
                detail: e.to_string(),
            })?;
        if alive {
            return Ok(Some(Attachment {
                netns: ns.clone(),
                info: SlotInfo::from_record(slot, &record),
            }));
        }
        // Registered but gone from the kernel (the interface was recreated with the same index,
        // or a TCX link lost its device): clean up so a fresh attach can follow.
        loader::detach_kernel(&self.pin_dir, None, slot, &record)?;
        inner.release(slot)?;
        self.lock_queues().forget(slot);
        Ok(None)
    }

    /// The existing attachment of `ifname` in `ns`, e.g. one made before a plugin restart, if
    /// its programs are still attached. Never attaches anything.
    pub fn adopt(&self, ns: &Netns, ifname: &str) -> Result<Option<Attachment>, EbpfError> {
        let key = self.identify(ns, ifname)?;
        let mut inner = self.lock_idle(key);
        self.adopt_locked(&mut inner, ns, key)
    }

    /// Starts counting the frames of `ifname` in `ns`, or returns the existing attachment if
    /// it is already counted (by this process or an earlier run of the plugin): repeating it is
    /// harmless and never resets counters.
    pub fn attach(&self, ns: &Netns, ifname: &str) -> Result<Attachment, EbpfError> {
        let key = self.identify(ns, ifname)?;
        self.attach_key(ns, ifname, key)
    }

    /// [`Counters::attach`] for an interface whose index the caller already knows, e.g. from
    /// creating it: saves entering the namespace once more to look it up. The attach checks,
    /// inside the namespace, that `ifname` still has index `ifindex`, and fails otherwise.
    pub fn attach_index(
        &self,
        ns: &Netns,
        ifname: &str,
        ifindex: u32,
    ) -> Result<Attachment, EbpfError> {
        let key = (Self::netns_inode(ns)?, ifindex);
        self.attach_key(ns, ifname, key)
    }

    fn attach_key(&self, ns: &Netns, ifname: &str, key: IfKey) -> Result<Attachment, EbpfError> {
        let slot = {
            let mut inner = self.lock_idle(key);
            if let Some(existing) = self.adopt_locked(&mut inner, ns, key)? {
                return Ok(existing);
            }
            let slot = inner.allocate()?;
            // The entries exist before the programs do: the program only looks entries up, so
            // counting starts with the first frame.
            if let Err(e) = inner.zero_entries(slot, self.ncpus) {
                inner.remove_entries(slot);
                inner.reserved.remove(&slot);
                return Err(e);
            }
            inner.busy.insert(key);
            slot
        };
        // Loading and netlink run without the lock, so that interfaces attach in parallel.
        let result = loader::load_and_attach(
            &self.pin_dir,
            &self.programs,
            self.mode,
            ns,
            ifname,
            key.1,
            slot,
        );
        let mut inner = self.lock();
        inner.busy.remove(&key);
        inner.reserved.remove(&slot);
        self.idle.notify_all();
        let record = match result {
            Ok(mut record) => {
                record.netns_ino = key.0;
                record
            }
            Err(e) => {
                inner.remove_entries(slot);
                return Err(e);
            }
        };
        if let Err(e) = inner.slots.insert(slot, record, 0) {
            // Unrecorded attachments could never be detached or re-adopted: undo it.
            let err = map_error("recording the slot", &e);
            let _ = loader::detach_kernel(&self.pin_dir, Some(ns), slot, &record);
            inner.remove_entries(slot);
            return Err(err);
        }
        inner.records.insert(slot, record);
        tracing::debug!(slot, ifname, ns = %ns, mode = self.mode.as_str(), "counters attached");
        Ok(Attachment {
            netns: ns.clone(),
            info: SlotInfo::from_record(slot, &record),
        })
    }

    /// Stops counting and frees the slot: removes the tc filters (or TCX links), the counters
    /// entries and the registry record. Detaching something already detached is a no-op; an
    /// interface or namespace that is already gone is fine too.
    pub fn detach(&self, attachment: &Attachment) -> Result<(), EbpfError> {
        let key = (attachment.info.netns_ino, attachment.info.ifindex);
        let slot = attachment.info.slot;
        let record = {
            let mut inner = self.lock_idle(key);
            match inner.records.get(&slot) {
                Some(r) if (r.netns_ino, r.ifindex) == key => {
                    let r = *r;
                    inner.busy.insert(key);
                    r
                }
                _ => return Ok(()),
            }
        };
        let result = loader::detach_kernel(&self.pin_dir, Some(&attachment.netns), slot, &record);
        let mut inner = self.lock();
        inner.busy.remove(&key);
        self.idle.notify_all();
        // On failure the record stays: the programs may still run, and must keep their slot.
        result?;
        inner.release(slot)?;
        self.lock_queues().forget(slot);
        tracing::debug!(slot, ifname = %attachment.info.ifname, "counters detached");
        Ok(())
    }

    /// Reads an attachment's counters, summed over CPUs.
    pub fn read(&self, attachment: &Attachment) -> Result<CountersSnapshot, EbpfError> {
        let inner = self.lock();
        Self::check_current(&inner, attachment)?;
        Self::read_slot(&inner, attachment.info.slot)
    }

    /// Reads the counters of each of `attachments` (in order), with a few batched reads of the
    /// whole counters map rather than two lookups per attachment; the same results as
    /// [`Counters::read`] for each.
    pub fn read_many(
        &self,
        attachments: &[&Attachment],
    ) -> Vec<Result<CountersSnapshot, EbpfError>> {
        let inner = self.lock();
        let all = match self.read_all(&inner) {
            Ok(all) => all,
            // The kernel may not offer batch reads of this map type: one attachment at a time.
            Err(e) => {
                tracing::debug!(error = %e, "batched counter read failed; reading one by one");
                return attachments
                    .iter()
                    .map(|a| {
                        Self::check_current(&inner, a)?;
                        Self::read_slot(&inner, a.info.slot)
                    })
                    .collect();
            }
        };
        attachments
            .iter()
            .map(|a| {
                Self::check_current(&inner, a)?;
                let dir = |d| all.get(&(a.info.slot, d)).copied().unwrap_or_default();
                Ok(CountersSnapshot {
                    ingress: dir(DIR_INGRESS),
                    egress: dir(DIR_EGRESS),
                })
            })
            .collect()
    }

    /// Every entry of the counters map, summed over CPUs, by (slot, direction).
    fn read_all(
        &self,
        inner: &Inner,
    ) -> Result<std::collections::HashMap<(u32, u32), DirectionCounts>, EbpfError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        const BATCH: usize = 256;
        let key_size = std::mem::size_of::<VcanKey>();
        let per_cpu = std::mem::size_of::<VcanCounters>().next_multiple_of(8);
        let value_size = per_cpu * self.ncpus;
        let mut keys = vec![0u8; BATCH * key_size];
        let mut values = vec![0u8; BATCH * value_size];
        let fd = inner.counters.map().fd().as_fd();
        let mut all = std::collections::HashMap::with_capacity(inner.records.len() * 2);
        let mut position = None;
        let mut cpus: Vec<VcanCounters> = Vec::with_capacity(self.ncpus);
        loop {
            let (read, next) =
                sys::lookup_batch(fd, position, &mut keys, key_size, &mut values, value_size)
                    .map_err(|e| EbpfError::Map {
                        op: "reading the counters in batches",
                        detail: e.to_string(),
                    })?;
            for i in 0..read {
                let key: VcanKey = bytemuck_read(&keys[i * key_size..(i + 1) * key_size]);
                cpus.clear();
                cpus.extend((0..self.ncpus).map(|c| {
                    let at = i * value_size + c * per_cpu;
                    bytemuck_read::<VcanCounters>(
                        &values[at..at + std::mem::size_of::<VcanCounters>()],
                    )
                }));
                all.insert((key.slot, key.dir), DirectionCounts::sum(&cpus));
            }
            match next {
                Some(p) => position = Some(p),
                None => return Ok(all),
            }
        }
    }

    fn check_current(inner: &Inner, attachment: &Attachment) -> Result<(), EbpfError> {
        let info = &attachment.info;
        match inner.records.get(&info.slot) {
            Some(r) if (r.netns_ino, r.ifindex) == (info.netns_ino, info.ifindex) => Ok(()),
            _ => Err(EbpfError::Stale {
                ifname: info.ifname.clone(),
                slot: info.slot,
            }),
        }
    }

    fn read_slot(inner: &Inner, slot: u32) -> Result<CountersSnapshot, EbpfError> {
        let read = |dir| -> Result<DirectionCounts, EbpfError> {
            match inner.counters.get(&VcanKey { slot, dir }, 0) {
                Ok(values) => Ok(DirectionCounts::sum(&values)),
                // Only possible for a half-done attach; nothing was counted.
                Err(MapError::KeyNotFound) => Ok(DirectionCounts::default()),
                Err(e) => Err(map_error("reading counters", &e)),
            }
        };
        Ok(CountersSnapshot {
            ingress: read(DIR_INGRESS)?,
            egress: read(DIR_EGRESS)?,
        })
    }

    /// Every registered attachment.
    pub fn list(&self) -> Vec<SlotInfo> {
        let inner = self.lock();
        inner
            .records
            .iter()
            .map(|(s, r)| SlotInfo::from_record(*s, r))
            .collect()
    }

    /// Releases the slots whose attachments the kernel no longer has (their interface or
    /// namespace was deleted without a detach, e.g. while the plugin was down), and removes
    /// counters entries that belong to no slot (left by an attach interrupted by a crash).
    /// Returns what was released. [`Counters::open`] runs it; call it periodically or when pods
    /// go away.
    pub fn sweep(&self) -> Result<Vec<SlotInfo>, EbpfError> {
        let mut inner = self.lock();
        let dead: Vec<(u32, VcanSlot)> = inner
            .records
            .iter()
            .filter(|(s, r)| {
                !inner.busy.contains(&(r.netns_ino, r.ifindex))
                    && !loader::attachment_alive(&self.pin_dir, **s, r).unwrap_or(true)
            })
            .map(|(s, r)| (*s, *r))
            .collect();
        let mut released = Vec::with_capacity(dead.len());
        for (slot, record) in dead {
            loader::detach_kernel(&self.pin_dir, None, slot, &record)?;
            inner.release(slot)?;
            self.lock_queues().forget(slot);
            released.push(SlotInfo::from_record(slot, &record));
        }
        let orphans: Vec<u32> = inner
            .counters
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.slot)
            .filter(|s| !inner.records.contains_key(s) && !inner.reserved.contains(s))
            .collect::<HashSet<u32>>()
            .into_iter()
            .collect();
        for slot in orphans {
            inner.remove_entries(slot);
        }
        Ok(released)
    }

    /// How many entries the counters map and the registry hold (two counters entries per
    /// attachment): what a leak check compares against.
    pub fn map_entries(&self) -> (usize, usize) {
        let inner = self.lock();
        (
            inner.counters.keys().filter_map(Result::ok).count(),
            inner.slots.keys().filter_map(Result::ok).count(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(frames: u64, bytes: u64) -> VcanKind {
        VcanKind { frames, bytes }
    }

    #[test]
    fn per_cpu_values_are_summed_kind_by_kind() {
        let a = VcanCounters {
            classic: kind(1, 8),
            rtr: kind(2, 0),
            fd_brs: kind(3, 192),
            std_id: 3,
            ext_id: 3,
            ..VcanCounters::default()
        };
        let b = VcanCounters {
            classic: kind(10, 80),
            err: kind(1, 8),
            xl: kind(1, 100),
            std_id: 10,
            ..VcanCounters::default()
        };
        let sum = DirectionCounts::sum(&[a, b]);
        assert_eq!(
            sum.classic,
            KindCounts {
                frames: 11,
                bytes: 88
            }
        );
        assert_eq!(sum.rtr.frames, 2);
        assert_eq!(
            sum.err,
            KindCounts {
                frames: 1,
                bytes: 8
            }
        );
        assert_eq!(
            sum.fd_all(),
            KindCounts {
                frames: 3,
                bytes: 192
            }
        );
        assert_eq!((sum.std_id, sum.ext_id), (13, 3));
        assert_eq!(
            sum.total(),
            KindCounts {
                frames: 18,
                bytes: 388
            }
        );
        let names: Vec<&str> = sum.kinds().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["classic", "rtr", "error", "fd", "fd_brs", "xl", "other"]
        );
    }

    #[test]
    fn counters_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Counters>();
    }

    #[test]
    fn default_config_pins_under_sys_fs_bpf() {
        let c = Config::default();
        assert_eq!(c.bpffs_dir, std::path::Path::new("/sys/fs/bpf/vcan-plugin"));
        assert_eq!(c.mode, None);
    }

    #[test]
    fn slot_ids_are_random_and_non_zero_in_practice() {
        let ids: HashSet<u32> = (0..64).filter_map(|_| random_u32().ok()).collect();
        assert!(ids.len() > 60, "{ids:?}");
    }
}
