//! Traffic-control requests over rtnetlink: the direct-action `cls_bpf` filters that run the
//! frame counters on an interface's clsact hook ([`crate::ebpf`] loads the programs; this module
//! only places and removes them).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::kernel::netlink::{Message, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, Socket};

const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
/// `NLM_F_ECHO`: the kernel sends the created filter back, with the priority and handle it chose.
const NLM_F_ECHO: u16 = 0x8;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
/// `TCA_BPF_FLAG_ACT_DIRECT`: the program's return value is the action.
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)` and `..._EGRESS`, by direction.
const CLSACT_PARENT: [u32; 2] = [0xffff_fff2, 0xffff_fff3];
/// `ETH_P_ALL` in network byte order, the filters' protocol.
const ETH_P_ALL_BE: u32 = 0x0003_u16.to_be() as u32;

/// `struct tcmsg` for a filter on interface `ifindex`.
fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    // family AF_UNSPEC and padding stay 0.
    h[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    h[8..12].copy_from_slice(&handle.to_ne_bytes());
    h[12..16].copy_from_slice(&parent.to_ne_bytes());
    h[16..20].copy_from_slice(&info.to_ne_bytes());
    h
}

/// Adds a direct-action cls_bpf filter running `prog` on the clsact hook of direction `dir` (0
/// ingress, 1 egress); returns the handle and priority the kernel chose.
pub fn add_filter(
    sock: &mut Socket,
    ifindex: u32,
    dir: u32,
    prog: &OwnedFd,
    name: &str,
) -> io::Result<(u32, u16)> {
    let header = tcmsg(ifindex, 0, CLSACT_PARENT[dir as usize], ETH_P_ALL_BE);
    let mut msg = Message::new(
        RTM_NEWTFILTER,
        NLM_F_ACK | NLM_F_ECHO | NLM_F_CREATE | NLM_F_EXCL,
        &header,
    );
    msg.attr(TCA_KIND, b"bpf\0")
        .begin_nest(TCA_OPTIONS)
        .attr_u32(TCA_BPF_FD, prog.as_raw_fd() as u32)
        .attr_str(TCA_BPF_NAME, name)
        .attr_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT)
        .end_nest();
    let replies = sock.transact(&mut msg)?;
    replies
        .iter()
        .filter(|r| r.kind == RTM_NEWTFILTER && r.payload.len() >= 20)
        .map(|r| {
            let word = |at: usize| {
                u32::from_ne_bytes([
                    r.payload[at],
                    r.payload[at + 1],
                    r.payload[at + 2],
                    r.payload[at + 3],
                ])
            };
            (word(8), (word(16) >> 16) as u16)
        })
        .next()
        .ok_or_else(|| io::Error::other("the kernel did not echo the new filter"))
}

/// Deletes the filter at (`dir`, `priority`, `handle`) of interface `ifindex`.
pub fn delete_filter(
    sock: &mut Socket,
    ifindex: u32,
    dir: u32,
    priority: u16,
    handle: u32,
) -> io::Result<()> {
    let info = (u32::from(priority) << 16) | ETH_P_ALL_BE;
    let header = tcmsg(ifindex, handle, CLSACT_PARENT[dir as usize], info);
    let mut msg = Message::new(RTM_DELTFILTER, NLM_F_ACK, &header);
    msg.attr(TCA_KIND, b"bpf\0");
    sock.transact(&mut msg).map(|_| ())
}
