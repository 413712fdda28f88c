//! The Rust mirror of `vcan-ebpf/include/vcan_counters.h`, the one definition of the data the
//! counter program and the loader share.
//!
//! Every type here is `#[repr(C)]` with the header's field order and types; the host test
//! `tests/ebpf_layout.rs` checks sizes, member offsets, map key/value types and `max_entries`
//! against the BTF of the compiled object, so a change to one side without the other fails the
//! build's tests instead of silently corrupting counters.

/// Attachments the maps can hold at once (`VCAN_MAX_SLOTS`). Slots are random non-zero ids.
pub const MAX_SLOTS: u32 = 4096;
/// Directions per attachment (`VCAN_DIRECTIONS`).
pub const DIRECTIONS: u32 = 2;
/// `VCAN_DIR_INGRESS`.
pub const DIR_INGRESS: u32 = 0;
/// `VCAN_DIR_EGRESS`.
pub const DIR_EGRESS: u32 = 1;
/// `VCAN_MODE_CLSACT`: cls_bpf filters on a clsact qdisc, attached over netlink.
pub const MODE_CLSACT: u32 = 1;
/// `VCAN_MODE_TCX`: TCX links pinned in bpffs.
pub const MODE_TCX: u32 = 2;

/// Name of the per-CPU counters map, also its pin name in the bpffs directory.
pub const COUNTERS_MAP: &str = "vcan_cnt_v1";
/// Name of the slot registry map, also its pin name in the bpffs directory.
pub const SLOTS_MAP: &str = "vcan_slots_v1";
/// Name of the program array the entry programs tail-call into (`vcan_progs_v1`), indexed by
/// direction; also its pin name.
pub const PROGS_MAP: &str = "vcan_progs_v1";

/// Name of the timed-bus transmit queues map (`struct vcan_txq` by slot); also its pin name.
pub const TXQ_MAP: &str = "vcan_txq_v1";
/// Name of the map of frames each transmit queue has seen leave the bus (`u64` by slot).
pub const TXDONE_MAP: &str = "vcan_txdone_v1";

/// `VCAN_CB_SLOT`: the `skb->cb[]` word that carries the slot from an entry program to the
/// counting programs.
pub const CB_SLOT: usize = 0;

/// The counting programs (tail-call targets, loaded once per process), by direction.
pub const COUNT_PROGRAMS: [&str; 2] = ["vcan_cnt_in", "vcan_cnt_eg"];

/// Name of the per-attachment entry program on an interface's ingress hook (as `bpftool prog`
/// and `tc filter show` list it).
pub const INGRESS_PROGRAM: &str = "vcan_ingress";

/// Name of the per-attachment entry program on an interface's egress hook.
pub const EGRESS_PROGRAM: &str = "vcan_egress";

/// `struct vcan_key`: the counters map's key.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct VcanKey {
    /// Attachment slot: a random non-zero id.
    pub slot: u32,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u32,
}

/// `struct vcan_kind`: frames of one kind and their payload bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcanKind {
    /// Frames.
    pub frames: u64,
    /// Payload bytes (the frames' `len`).
    pub bytes: u64,
}

/// `struct vcan_counters`: the counters map's (per-CPU) value. The kinds are disjoint.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcanCounters {
    /// Classic data frames.
    pub classic: VcanKind,
    /// Classic remote (RTR) frames; no payload.
    pub rtr: VcanKind,
    /// Error frames (`CAN_ERR_FLAG`).
    pub err: VcanKind,
    /// CAN FD frames without bit-rate switch.
    pub fd: VcanKind,
    /// CAN FD frames with bit-rate switch (`CANFD_BRS`).
    pub fd_brs: VcanKind,
    /// CAN XL frames.
    pub xl: VcanKind,
    /// Anything else, or too short to parse; bytes are the skb length.
    pub other: VcanKind,
    /// Classic, RTR and FD frames with an 11-bit identifier.
    pub std_id: u64,
    /// Classic, RTR and FD frames with a 29-bit identifier.
    pub ext_id: u64,
}

/// `struct vcan_slot`: the slot registry's value, written and read by the loader only.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcanSlot {
    /// Inode of the interface's network namespace.
    pub netns_ino: u64,
    /// Interface index inside that namespace.
    pub ifindex: u32,
    /// [`MODE_CLSACT`] or [`MODE_TCX`].
    pub mode: u32,
    /// Kernel ids of the attached entry programs, by direction.
    pub prog_id: [u32; 2],
    /// clsact: the filters' handles, by direction.
    pub tc_handle: [u32; 2],
    /// clsact: the filters' priorities, by direction.
    pub tc_priority: [u16; 2],
    /// Zero.
    pub reserved: u32,
    /// Interface name when attached, NUL-padded.
    pub ifname: [u8; 16],
}

/// `struct vcan_txq`: a timed-bus member's transmit queue.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcanTxq {
    /// Frames let through at egress (the program adds).
    pub sent: u64,
    /// Writes refused because the queue was full (the program adds).
    pub refused: u64,
    /// Frames that may wait; 0: no limit.
    pub limit: u32,
    /// Zero.
    pub reserved: u32,
}

impl VcanSlot {
    /// The recorded interface name.
    pub fn ifname(&self) -> String {
        let end = self
            .ifname
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.ifname.len());
        String::from_utf8_lossy(&self.ifname[..end]).into_owned()
    }

    /// Stores `name`, truncated to 15 bytes (the kernel's limit, so never in practice).
    pub fn set_ifname(&mut self, name: &str) {
        self.ifname = [0; 16];
        let bytes = name.as_bytes();
        let n = bytes.len().min(15);
        self.ifname[..n].copy_from_slice(&bytes[..n]);
    }
}

// SAFETY: all four are #[repr(C)] aggregates of integers with no padding (checked by the sizes
// below and by tests/ebpf_layout.rs against the object's BTF), so every bit pattern is valid.
unsafe impl aya::Pod for VcanKey {}
// SAFETY: as above.
unsafe impl aya::Pod for VcanKind {}
// SAFETY: as above.
unsafe impl aya::Pod for VcanCounters {}
// SAFETY: as above.
unsafe impl aya::Pod for VcanSlot {}
// SAFETY: as above.
unsafe impl aya::Pod for VcanTxq {}

// No implicit padding: the sizes are the sums of the fields.
const _: () = assert!(std::mem::size_of::<VcanKey>() == 8);
const _: () = assert!(std::mem::size_of::<VcanTxq>() == 24);
const _: () = assert!(std::mem::size_of::<VcanKind>() == 16);
const _: () = assert!(std::mem::size_of::<VcanCounters>() == 7 * 16 + 2 * 8);
const _: () = assert!(std::mem::size_of::<VcanSlot>() == 8 + 4 + 4 + 8 + 8 + 4 + 4 + 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_round_trips_and_is_bounded() {
        let mut s = VcanSlot::default();
        s.set_ifname("vcan0");
        assert_eq!(s.ifname(), "vcan0");
        s.set_ifname("a-name-far-too-long-for-linux");
        assert_eq!(s.ifname(), "a-name-far-too-");
        assert_eq!(s.ifname[15], 0);
    }
}
