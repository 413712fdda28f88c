//! Loading the counter object with aya and attaching it to one interface, inside that
//! interface's network namespace.
//!
//! Every attachment is its own load of the object: the slot is a `.rodata` constant, frozen at
//! load time, so two attachments cannot share program instances. The maps are pinned by name
//! under the bpffs directory, so every load opens the same two maps instead of creating new ones.
//! After attaching, the loader keeps no file descriptors: a clsact filter or a pinned TCX link
//! holds the programs, which therefore live exactly as long as the attachment (or the
//! interface) does. That is what makes liveness checkable after a restart (see
//! [`attachment_alive`]).

use std::error::Error as StdError;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapType, PerCpuHashMap};
use aya::programs::links::FdLink;
use aya::programs::tc::{
    self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle,
};
use aya::programs::{Link, LinkOrder, SchedClassifier};
use aya::{Ebpf, EbpfLoader};

use super::EbpfError;
use super::layout::{
    COUNTERS_MAP, DIR_EGRESS, DIR_INGRESS, DIRECTIONS, EGRESS_PROGRAM, INGRESS_PROGRAM, MAX_SLOTS,
    MODE_CLSACT, MODE_TCX, SLOT_GLOBAL, SLOTS_MAP, VcanCounters, VcanKey, VcanSlot,
};
use super::sys;
use crate::netns::{self, Netns, NetnsError};

/// The compiled counter program (`vcan-ebpf/src/vcan_count.bpf.c`, built by `build.rs`).
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vcan_count.bpf.o"));

/// The two pinned maps, typed.
pub(super) type CountersMap = PerCpuHashMap<MapData, VcanKey, VcanCounters>;
/// The slot registry, typed.
pub(super) type SlotsMap = BpfHashMap<MapData, u32, VcanSlot>;

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
            .and_then(io::Error::raw_os_error)
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

/// Parses the object and opens (creating and pinning on first use) its maps, without loading
/// any program.
fn load_object(pin_dir: &Path, slot: u32) -> Result<Ebpf, EbpfError> {
    EbpfLoader::new()
        // The program needs no CO-RE relocations; skipping the kernel's BTF saves parsing
        // several MiB of /sys/kernel/btf/vmlinux on every attach.
        .btf(None)
        .default_map_pin_directory(pin_dir)
        .override_global(SLOT_GLOBAL, &slot, true)
        .load(OBJECT)
        .map_err(|e| load_error("opening the pinned maps", &e))
}

/// Opens the two pinned maps and checks that they have the layout this build expects.
pub(super) fn open_maps(pin_dir: &Path) -> Result<(CountersMap, SlotsMap), EbpfError> {
    let mut ebpf = load_object(pin_dir, 0)?;
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
    let counters =
        CountersMap::try_from(counters).map_err(|e| load_error("opening the counters map", &e))?;
    let slots =
        SlotsMap::try_from(slots).map_err(|e| load_error("opening the slot registry", &e))?;
    Ok((counters, slots))
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
        Map::PerCpuHashMap(d) | Map::HashMap(d) => d,
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

/// Loads the object for `slot` and attaches both programs to `ifname` (index `ifindex`) in
/// `ns`; returns the registry record describing the attachment.
pub(super) fn load_and_attach(
    pin_dir: &Path,
    mode: AttachMode,
    ns: &Netns,
    ifname: &str,
    ifindex: u32,
    slot: u32,
) -> Result<VcanSlot, EbpfError> {
    let mut ebpf = load_object(pin_dir, slot)?;
    let mut record = VcanSlot {
        ifindex,
        mode: mode.code(),
        ..VcanSlot::default()
    };
    record.set_ifname(ifname);
    for (dir, name) in [(DIR_INGRESS, INGRESS_PROGRAM), (DIR_EGRESS, EGRESS_PROGRAM)] {
        let prog = program(&mut ebpf, name)?;
        prog.load()
            .map_err(|e| load_error(&format!("loading program {name}"), &e))?;
        let info = prog
            .info()
            .map_err(|e| load_error(&format!("inspecting program {name}"), &e))?;
        record.prog_id[dir as usize] = info.id();
    }
    let pins = [
        link_pin(pin_dir, slot, DIR_INGRESS),
        link_pin(pin_dir, slot, DIR_EGRESS),
    ];
    let name = ifname.to_string();
    let ns_name = ns.to_string();
    // aya attaches in the calling thread's namespace (ifindex lookup, netlink socket, TCX link
    // target), so the attach itself runs on a thread inside the pod's namespace.
    let attached = netns::run(ns, move || attach_here(ebpf, &name, ifindex, mode, &pins))
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

/// Runs inside the target namespace. On failure the `Ebpf` is dropped here, which detaches
/// whatever was attached (in this namespace, where the filters are).
fn attach_here(
    mut ebpf: Ebpf,
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
    if mode == AttachMode::Clsact {
        // Adding clsact when one exists fails with EEXIST: that is the expected case for an
        // interface someone else (or an earlier attach) already prepared, and checking first
        // would only add a race.
        if let Err(e) = tc::qdisc_add_clsact(ifname)
            && errno(&e) != Some(libc::EEXIST)
        {
            return Err(fail(format!("adding the clsact qdisc: {}", chain(&e))));
        }
    }
    let mut ids = Vec::with_capacity(2);
    for (name, attach_type) in [
        (INGRESS_PROGRAM, TcAttachType::Ingress),
        (EGRESS_PROGRAM, TcAttachType::Egress),
    ] {
        let options = match mode {
            AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
            AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
        };
        let prog = program(&mut ebpf, name)?;
        let id = prog
            .attach_with_options(ifname, attach_type, options)
            .map_err(|e| match load_error("", &e) {
                EbpfError::NoPermission { detail, .. } => EbpfError::NoPermission {
                    what: format!("attaching {name} to {ifname}"),
                    detail,
                },
                _ => fail(format!("attaching {name}: {}", chain(&e))),
            })?;
        ids.push((name, id));
    }
    // Both attached: take the links out of aya's care so that dropping `ebpf` keeps them.
    let mut placement = ([0u32; 2], [0u16; 2]);
    let mut pinned: Vec<PathBuf> = Vec::new();
    for (i, (name, id)) in ids.into_iter().enumerate() {
        let link = program(&mut ebpf, name)?
            .take_link(id)
            .map_err(|e| fail(format!("taking the link of {name}: {}", chain(&e))))?;
        match mode {
            AttachMode::Clsact => {
                let (Ok(priority), Ok(handle)) = (link.priority(), link.handle()) else {
                    return Err(fail("aya reported no filter priority or handle".into()));
                };
                placement.0[i] = u32::from(handle);
                placement.1[i] = priority;
                // A netlink link is just (ifindex, parent, priority, handle): forgetting it
                // leaks no resource, and keeps its Drop from deleting the filter.
                std::mem::forget(link);
            }
            AttachMode::Tcx => {
                let result = FdLink::try_from(link)
                    .map_err(|e| chain(&e))
                    .and_then(|fd| fd.pin(&pins[i]).map_err(|e| chain(&e)));
                match result {
                    // Dropping the PinnedLink closes our fd; the pin keeps the link attached.
                    Ok(_pinned) => pinned.push(pins[i].clone()),
                    Err(e) => {
                        for p in &pinned {
                            let _ = std::fs::remove_file(p);
                        }
                        return Err(fail(format!("pinning the TCX link of {name}: {e}")));
                    }
                }
            }
        }
    }
    Ok((mode == AttachMode::Clsact).then_some(placement))
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
    // Look the name up by index: the interface may have been renamed since it was attached.
    let Some(name) = name_of(record.ifindex) else {
        return Ok(()); // the interface is gone, its filters with it
    };
    for (i, attach_type) in [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .enumerate()
    {
        let link = SchedClassifierLink::attached(
            &name,
            attach_type,
            record.tc_priority[i],
            TcHandle::from(record.tc_handle[i]),
            None,
        )
        .map_err(|e| EbpfError::Detach {
            ifname: name.clone(),
            detail: e.to_string(),
        })?;
        if let Err(e) = link.detach() {
            // Already deleted (by someone running `tc filter del`, or with the qdisc): fine.
            if !matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ENODEV)) {
                return Err(EbpfError::Detach {
                    ifname: name.clone(),
                    detail: format!("deleting the {attach_type:?} filter: {}", chain(&e)),
                });
            }
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
