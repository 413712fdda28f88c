//! Loading the counter object with aya, and attaching an interface's entry programs inside that
//! interface's network namespace.
//!
//! [`open`] loads the object once per process: it opens (creating and pinning on first use) the
//! three maps under the bpffs directory, loads the two counting programs and puts them into the
//! pinned program array, replacing those of an earlier run, whose entry programs from then on
//! tail-call into this run's. An attachment is then two tiny entry programs ([`super::entry`])
//! plus their tc hooks. After attaching, the loader keeps no file descriptor of them: a clsact
//! filter or a pinned TCX link holds each entry program, which therefore lives exactly as long as
//! the attachment (or the interface) does. That is what makes liveness checkable after a restart
//! (see [`attachment_alive`]).

use std::error::Error as StdError;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapType, PerCpuHashMap, ProgramArray};
use aya::programs::SchedClassifier;
use aya::programs::tc;
use aya::{Ebpf, EbpfLoader};

use super::EbpfError;
use super::entry;
use super::layout::{
    COUNT_PROGRAMS, COUNTERS_MAP, DIR_EGRESS, DIR_INGRESS, DIRECTIONS, EGRESS_PROGRAM,
    INGRESS_PROGRAM, MAX_SLOTS, MODE_CLSACT, MODE_TCX, PROGS_MAP, SLOTS_MAP, TXDONE_MAP, TXQ_MAP,
    VcanCounters, VcanKey, VcanSlot, VcanTxq,
};
use super::sys;
use crate::kernel::netlink::Socket;
use crate::kernel::netns::{self, Netns, NetnsError};
use crate::kernel::tc::{add_filter, delete_filter};

/// The compiled counter program (`vcan-ebpf/src/vcan_count.bpf.c`, built by `build.rs`).
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vcan_count.bpf.o"));

/// The two pinned maps, typed.
pub(super) type CountersMap = PerCpuHashMap<MapData, VcanKey, VcanCounters>;
/// The slot registry, typed.
pub(super) type SlotsMap = BpfHashMap<MapData, u32, VcanSlot>;
/// Timed-bus members' transmit queues, typed.
pub(super) type TxqMap = BpfHashMap<MapData, u32, VcanTxq>;
/// Frames of each transmit queue that left the bus, typed.
pub(super) type TxDoneMap = BpfHashMap<MapData, u32, u64>;

/// The pinned maps, opened and checked.
pub(super) struct Maps {
    /// The counters.
    pub counters: CountersMap,
    /// The slot registry.
    pub slots: SlotsMap,
    /// Transmit queues.
    pub txq: TxqMap,
    /// Frames done per transmit queue.
    pub txdone: TxDoneMap,
}

/// How programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttachMode {
    /// cls_bpf filters on a clsact qdisc, attached over netlink (what kernels before 6.6 have).
    Clsact,
    /// TCX links (kernel 6.6 and later), pinned in bpffs so they survive a plugin restart.
    Tcx,
}

impl AttachMode {
    /// `"clsact"` or `"tcx"`, for build info and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            AttachMode::Clsact => "clsact",
            AttachMode::Tcx => "tcx",
        }
    }

    pub(super) const fn code(self) -> u32 {
        match self {
            AttachMode::Clsact => MODE_CLSACT,
            AttachMode::Tcx => MODE_TCX,
        }
    }

    pub(super) const fn from_code(code: u32) -> Option<Self> {
        match code {
            MODE_CLSACT => Some(AttachMode::Clsact),
            MODE_TCX => Some(AttachMode::Tcx),
            _ => None,
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The mode this kernel supports best: TCX from 6.6 on (as aya's own default), else clsact.
pub fn attach_mode() -> AttachMode {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
        _ => AttachMode::Clsact,
    }
}

/// The error's message followed by those of its sources (aya's messages alone often say only
/// which syscall failed, not why).
pub(super) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// The OS error number somewhere in the error's chain, if any.
pub(super) fn errno(err: &(dyn StdError + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(code) = e
            .downcast_ref::<io::Error>()
            .and_then(crate::kernel::netlink::errno)
        {
            return Some(code);
        }
        if let Some(code) = e
            .downcast_ref::<aya::sys::NetlinkError>()
            .and_then(aya::sys::NetlinkError::raw_os_error)
        {
            return Some(code);
        }
        cur = e.source();
    }
    None
}

/// Wraps a loader failure, recognising missing privileges.
pub(super) fn load_error(what: &str, err: &(dyn StdError + 'static)) -> EbpfError {
    match errno(err) {
        Some(libc::EPERM) | Some(libc::EACCES) => EbpfError::NoPermission {
            what: what.to_string(),
            detail: chain(err),
        },
        _ => EbpfError::Load {
            what: what.to_string(),
            detail: chain(err),
        },
    }
}

/// Checks that `dir` is (or can be created) on bpffs, creating it if needed.
pub(super) fn prepare_pin_dir(dir: &Path) -> Result<(), EbpfError> {
    // Walk up to the nearest existing ancestor: creating directories below /sys/fs/bpf when no
    // bpffs is mounted there would fail with a confusing EPERM from sysfs.
    let mut existing = dir;
    while !existing.exists() {
        existing = match existing.parent() {
            Some(p) => p,
            None => break,
        };
    }
    let on_bpffs = |p: &Path| {
        sys::is_bpffs(p).map_err(|source| EbpfError::PinDir {
            dir: dir.to_path_buf(),
            source,
        })
    };
    if !on_bpffs(existing)? {
        return Err(EbpfError::BpffsNotMounted {
            dir: dir.to_path_buf(),
        });
    }
    for d in [dir.to_path_buf(), dir.join("links")] {
        std::fs::create_dir_all(&d).map_err(|source| EbpfError::PinDir {
            dir: d.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Where the TCX link of `slot` in direction `dir` is pinned.
pub(super) fn link_pin(pin_dir: &Path, slot: u32, dir: u32) -> PathBuf {
    let name = if dir == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    };
    pin_dir.join("links").join(format!("{slot:08x}-{name}"))
}

/// The counting programs of this process and the program array the entry programs tail-call
/// through. Dropping it closes this process's references; the pinned array keeps the programs.
pub(super) struct Programs {
    /// Owns the counting programs' fds.
    _object: Ebpf,
    /// `vcan_progs_v1`: its fd is baked into every entry program.
    array: Map,
}

impl Programs {
    fn array_fd(&self) -> Result<BorrowedFd<'_>, EbpfError> {
        match &self.array {
            Map::ProgramArray(data) => Ok(data.fd().as_fd()),
            _ => Err(EbpfError::Load {
                what: format!("opening map {PROGS_MAP}"),
                detail: "not a program array".into(),
            }),
        }
    }
}

/// Opens the three pinned maps, checking that they have the layout this build expects, loads
/// the counting programs and points the program array at them.
pub(super) fn open(pin_dir: &Path) -> Result<(Maps, Programs), EbpfError> {
    let mut ebpf = EbpfLoader::new()
        // The programs need no CO-RE relocations; skipping the kernel's BTF saves parsing
        // several MiB of /sys/kernel/btf/vmlinux.
        .btf(None)
        .default_map_pin_directory(pin_dir)
        .load(OBJECT)
        .map_err(|e| load_error("opening the pinned maps", &e))?;
    let counters = take_checked(
        &mut ebpf,
        pin_dir,
        COUNTERS_MAP,
        MapType::PerCpuHash,
        std::mem::size_of::<VcanKey>(),
        std::mem::size_of::<VcanCounters>(),
        MAX_SLOTS * DIRECTIONS,
    )?;
    let slots = take_checked(
        &mut ebpf,
        pin_dir,
        SLOTS_MAP,
        MapType::Hash,
        std::mem::size_of::<u32>(),
        std::mem::size_of::<VcanSlot>(),
        MAX_SLOTS,
    )?;
    let txq = take_checked(
        &mut ebpf,
        pin_dir,
        TXQ_MAP,
        MapType::Hash,
        std::mem::size_of::<u32>(),
        std::mem::size_of::<VcanTxq>(),
        MAX_SLOTS,
    )?;
    let txdone = take_checked(
        &mut ebpf,
        pin_dir,
        TXDONE_MAP,
        MapType::Hash,
        std::mem::size_of::<u32>(),
        std::mem::size_of::<u64>(),
        MAX_SLOTS,
    )?;
    let mut array = take_checked(
        &mut ebpf,
        pin_dir,
        PROGS_MAP,
        MapType::ProgramArray,
        std::mem::size_of::<u32>(),
        std::mem::size_of::<u32>(),
        DIRECTIONS,
    )?;
    let counters =
        CountersMap::try_from(counters).map_err(|e| load_error("opening the counters map", &e))?;
    let slots =
        SlotsMap::try_from(slots).map_err(|e| load_error("opening the slot registry", &e))?;
    let txq = TxqMap::try_from(txq).map_err(|e| load_error("opening the transmit queues", &e))?;
    let txdone = TxDoneMap::try_from(txdone)
        .map_err(|e| load_error("opening the transmit queues' counts", &e))?;
    {
        let mut jump = ProgramArray::try_from(&mut array)
            .map_err(|e| load_error("opening the program array", &e))?;
        for (dir, name) in [DIR_INGRESS, DIR_EGRESS].into_iter().zip(COUNT_PROGRAMS) {
            let prog = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|e| load_error(&format!("loading program {name}"), &e))?;
            let fd = prog
                .fd()
                .map_err(|e| load_error(&format!("loading program {name}"), &e))?;
            // Replaces an earlier run's program atomically: entry programs already attached
            // count on without a gap.
            jump.set(dir, fd, 0)
                .map_err(|e| load_error(&format!("installing program {name}"), &e))?;
        }
    }
    Ok((
        Maps {
            counters,
            slots,
            txq,
            txdone,
        },
        Programs {
            _object: ebpf,
            array,
        },
    ))
}

fn take_checked(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    name: &str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
) -> Result<Map, EbpfError> {
    let map = ebpf.take_map(name).ok_or_else(|| EbpfError::Load {
        what: format!("opening map {name}"),
        detail: "the embedded object has no such map".into(),
    })?;
    let data = match &map {
        Map::PerCpuHashMap(d) | Map::HashMap(d) | Map::ProgramArray(d) => d,
        _ => {
            return Err(EbpfError::Load {
                what: format!("opening map {name}"),
                detail: "unexpected map type in the embedded object".into(),
            });
        }
    };
    let info = data
        .info()
        .map_err(|e| load_error(&format!("inspecting map {name}"), &e))?;
    // aya reuses whatever is pinned under the name without comparing definitions; a map left by
    // an incompatible build must not be written with this build's layout.
    let found = (
        info.map_type().ok(),
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries(),
    );
    if found != (Some(map_type), key_size, value_size, max_entries) {
        return Err(EbpfError::IncompatiblePin {
            path: pin_dir.join(name),
            detail: format!(
                "type {:?}, key {} B, value {} B, max_entries {}; expected {map_type:?}, key \
                 {key_size} B, value {value_size} B, max_entries {max_entries}",
                found.0, found.1, found.2, found.3
            ),
        });
    }
    Ok(map)
}

/// Loads the entry programs for `slot` and attaches them to `ifname` (index `ifindex`) in `ns`;
/// returns the registry record describing the attachment.
pub(super) fn load_and_attach(
    pin_dir: &Path,
    programs: &Programs,
    mode: AttachMode,
    ns: &Netns,
    ifname: &str,
    ifindex: u32,
    slot: u32,
) -> Result<VcanSlot, EbpfError> {
    let mut record = VcanSlot {
        ifindex,
        mode: mode.code(),
        ..VcanSlot::default()
    };
    record.set_ifname(ifname);
    let array = programs.array_fd()?;
    let mut entries = Vec::with_capacity(2);
    for (dir, name) in [(DIR_INGRESS, INGRESS_PROGRAM), (DIR_EGRESS, EGRESS_PROGRAM)] {
        let what = || format!("loading program {name}");
        let fd = entry::load(slot, dir, array, name).map_err(|e| io_error(&what(), e))?;
        record.prog_id[dir as usize] = sys::prog_id(&fd).map_err(|e| io_error(&what(), e))?;
        entries.push(fd);
    }
    let pins = [
        link_pin(pin_dir, slot, DIR_INGRESS),
        link_pin(pin_dir, slot, DIR_EGRESS),
    ];
    let name = ifname.to_string();
    let ns_name = ns.to_string();
    // Hooks are addressed by ifindex in the calling thread's namespace, so the attach itself
    // runs on a thread inside the pod's namespace.
    let attached = netns::run(ns, move || {
        attach_here(entries, &name, ifindex, mode, &pins)
    })
    .map_err(|e| EbpfError::Attach {
        ifname: ifname.to_string(),
        ns: ns_name.clone(),
        detail: e.to_string(),
    })??;
    if let Some((handles, priorities)) = attached {
        record.tc_handle = handles;
        record.tc_priority = priorities;
    }
    Ok(record)
}

fn io_error(what: &str, e: io::Error) -> EbpfError {
    match crate::kernel::netlink::errno(&e) {
        Some(libc::EPERM) => EbpfError::NoPermission {
            what: what.to_string(),
            detail: e.to_string(),
        },
        _ => EbpfError::Load {
            what: what.to_string(),
            detail: e.to_string(),
        },
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, EbpfError> {
    ebpf.program_mut(name)
        .ok_or_else(|| EbpfError::Load {
            what: format!("finding program {name}"),
            detail: "the embedded object has no such program".into(),
        })?
        .try_into()
        .map_err(|e| load_error(&format!("finding program {name}"), &e))
}

/// The clsact filters' handles and priorities, when attached that way.
type NlPlacement = Option<([u32; 2], [u16; 2])>;

/// `BPF_TCX_INGRESS` and `BPF_TCX_EGRESS`, by direction.
const TCX_ATTACH_TYPE: [u32; 2] = [46, 47];

/// Runs inside the target namespace. On failure, whatever was attached is removed again.
fn attach_here(
    entries: Vec<OwnedFd>,
    ifname: &str,
    ifindex: u32,
    mode: AttachMode,
    pins: &[PathBuf; 2],
) -> Result<NlPlacement, EbpfError> {
    let fail = |detail: String| EbpfError::Attach {
        ifname: ifname.to_string(),
        ns: "its namespace".into(),
        detail,
    };
    // The index was looked up earlier on another socket; make sure the name still means the
    // same interface, or the counts would be recorded under the wrong identity.
    match index_of(ifname) {
        Some(i) if i == ifindex => {}
        other => {
            return Err(fail(format!(
                "the interface changed while attaching (index {ifindex} expected, found {other:?})"
            )));
        }
    }
    let names = [INGRESS_PROGRAM, EGRESS_PROGRAM];
    match mode {
        AttachMode::Clsact => {
            // Adding clsact when one exists fails with EEXIST: that is the expected case for an
            // interface someone else (or an earlier attach) already prepared, and checking
            // first would only add a race.
            if let Err(e) = tc::qdisc_add_clsact(ifname)
                && errno(&e) != Some(libc::EEXIST)
            {
                return Err(fail(format!("adding the clsact qdisc: {}", chain(&e))));
            }
            let mut sock = Socket::open(libc::NETLINK_ROUTE)
                .map_err(|e| fail(format!("opening a netlink socket: {e}")))?;
            let mut placement = ([0u32; 2], [0u16; 2]);
            for (dir, fd) in [DIR_INGRESS, DIR_EGRESS].into_iter().zip(&entries) {
                match add_filter(&mut sock, ifindex, dir, fd, names[dir as usize]) {
                    Ok((handle, priority)) => {
                        placement.0[dir as usize] = handle;
                        placement.1[dir as usize] = priority;
                    }
                    Err(e) => {
                        if dir == DIR_EGRESS {
                            let _ = delete_filter(
                                &mut sock,
                                ifindex,
                                DIR_INGRESS,
                                placement.1[0],
                                placement.0[0],
                            );
                        }
                        return Err(match crate::kernel::netlink::errno(&e) {
                            Some(libc::EPERM) => EbpfError::NoPermission {
                                what: format!("attaching {} to {ifname}", names[dir as usize]),
                                detail: e.to_string(),
                            },
                            _ => fail(format!("adding the {} filter: {e}", names[dir as usize])),
                        });
                    }
                }
            }
            Ok(Some(placement))
        }
        AttachMode::Tcx => {
            for (dir, fd) in [DIR_INGRESS, DIR_EGRESS].into_iter().zip(&entries) {
                let pin = &pins[dir as usize];
                if let Err(e) =
                    sys::tcx_attach_and_pin(fd, ifindex, TCX_ATTACH_TYPE[dir as usize], pin)
                {
                    // Unpinning releases the link, which detaches it.
                    let _ = std::fs::remove_file(&pins[0]);
                    return Err(fail(format!(
                        "attaching {} as a TCX link: {e}",
                        names[dir as usize]
                    )));
                }
            }
            Ok(None)
        }
    }
}

/// The index of `name` in the calling thread's namespace.
fn index_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// The name of interface `index` in the calling thread's namespace.
fn name_of(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Whether the attachment a registry record describes still exists in the kernel.
///
/// clsact: the loader holds no program fds, so a program id that still resolves is held by a
/// filter; the kernel frees the programs when their interface (or namespace) goes away. TCX: the
/// pinned links live on after the device is gone, but the kernel clears their ifindex then.
pub(super) fn attachment_alive(pin_dir: &Path, slot: u32, record: &VcanSlot) -> io::Result<bool> {
    match AttachMode::from_code(record.mode) {
        Some(AttachMode::Clsact) => {
            Ok(sys::prog_exists(record.prog_id[0])? && sys::prog_exists(record.prog_id[1])?)
        }
        Some(AttachMode::Tcx) => {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                if sys::tcx_link_ifindex(&link_pin(pin_dir, slot, dir))? != Some(record.ifindex) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Removes an attachment from the kernel. `ns` is where its interface lives; `None` (or a
/// namespace that no longer exists) means the interface is known to be gone, so only pins are
/// cleaned up.
pub(super) fn detach_kernel(
    pin_dir: &Path,
    ns: Option<&Netns>,
    slot: u32,
    record: &VcanSlot,
) -> Result<(), EbpfError> {
    let ifname = record.ifname();
    match AttachMode::from_code(record.mode) {
        Some(AttachMode::Tcx) => {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                // Unpinning drops the last reference to the link, which detaches it (TCX links
                // are fds and detach from any namespace).
                match std::fs::remove_file(link_pin(pin_dir, slot, dir)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(EbpfError::Detach {
                            ifname,
                            detail: format!("removing the TCX link pin: {e}"),
                        });
                    }
                }
            }
            Ok(())
        }
        Some(AttachMode::Clsact) => {
            let alive = sys::prog_exists(record.prog_id[0]).unwrap_or(true)
                || sys::prog_exists(record.prog_id[1]).unwrap_or(true);
            let Some(ns) = ns.filter(|_| alive) else {
                return Ok(());
            };
            let rec = *record;
            // Netlink filters are addressed by ifindex in the caller's namespace: delete them
            // from inside the pod's namespace.
            match netns::run(ns, move || detach_filters_here(&rec)) {
                Ok(result) => result,
                // The namespace is gone, and with it the interface and its filters.
                Err(NetnsError::NotFound(_)) => Ok(()),
                Err(e) => Err(EbpfError::Detach {
                    ifname,
                    detail: e.to_string(),
                }),
            }
        }
        None => Ok(()),
    }
}

fn detach_filters_here(record: &VcanSlot) -> Result<(), EbpfError> {
    if name_of(record.ifindex).is_none() {
        return Ok(()); // the interface is gone, its filters with it
    }
    let fail = |detail: String| EbpfError::Detach {
        ifname: record.ifname(),
        detail,
    };
    let mut sock = Socket::open(libc::NETLINK_ROUTE)
        .map_err(|e| fail(format!("opening a netlink socket: {e}")))?;
    for dir in [DIR_INGRESS, DIR_EGRESS] {
        let i = dir as usize;
        match delete_filter(
            &mut sock,
            record.ifindex,
            dir,
            record.tc_priority[i],
            record.tc_handle[i],
        ) {
            Ok(()) => {}
            // Already deleted (by someone running `tc filter del`, or with the qdisc): fine.
            Err(e)
                if matches!(
                    crate::kernel::netlink::errno(&e),
                    Some(libc::ENOENT) | Some(libc::ENODEV)
                ) => {}
            Err(e) => return Err(fail(format!("deleting the filter: {e}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_is_embedded_and_is_bpf() {
        // ELF magic, 64-bit, and e_machine EM_BPF (247).
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        assert_eq!(OBJECT[4], 2);
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }

    #[test]
    fn modes_round_trip_through_their_codes() {
        for m in [AttachMode::Clsact, AttachMode::Tcx] {
            assert_eq!(AttachMode::from_code(m.code()), Some(m));
        }
        assert_eq!(AttachMode::from_code(0), None);
        assert_eq!(AttachMode::Clsact.to_string(), "clsact");
        assert_eq!(AttachMode::Tcx.as_str(), "tcx");
    }

    #[test]
    fn errno_is_found_in_the_chain() {
        let e = aya::sys::SyscallError {
            call: "bpf_map_create",
            io_error: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(errno(&e), Some(libc::EPERM));
        assert!(matches!(
            load_error("x", &e),
            EbpfError::NoPermission { .. }
        ));
        assert!(chain(&e).contains("bpf_map_create"), "{}", chain(&e));
    }

    #[test]
    fn a_directory_outside_bpffs_is_refused_with_advice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = prepare_pin_dir(&dir.path().join("vcan-plugin")).expect_err("tmp is not bpffs");
        assert!(matches!(err, EbpfError::BpffsNotMounted { .. }), "{err}");
        assert!(err.to_string().contains("mount -t bpf"), "{err}");
    }
}
