//! The per-attachment entry program: what is actually attached to an interface's tc hook.
//!
//! It is eight instructions, built here rather than compiled, because it differs per attachment
//! only in two constants: it stores the attachment's slot in `skb->cb[CB_SLOT]` and tail-calls
//! the counting program for its direction (`vcan_progs_v1[dir]`, loaded once per process by
//! [`super::loader`]). The counting program reads the slot back from `cb`. Verifying eight
//! instructions is nearly free, where loading the counting program for every attachment cost
//! most of a PreStart; and each attachment still has a program of its own, whose id tells the
//! loader after a restart whether the attachment still exists.
//!
//! When the tail call finds no program (the array was never filled, or is being refilled by a
//! restarting plugin) the entry program falls through and returns `TC_ACT_UNSPEC`: the packet
//! is not counted, and never dropped.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use super::layout::CB_SLOT;
use super::sys;

/// `offsetof(struct __sk_buff, cb)`: 13 u32 fields precede it.
const SKB_CB_OFFSET: i16 = 48;
/// `BPF_FUNC_tail_call`.
const FUNC_TAIL_CALL: i32 = 12;
/// `BPF_PSEUDO_MAP_FD`: the 64-bit immediate is a map fd, which the kernel resolves at load.
const PSEUDO_MAP_FD: u8 = 1;
/// `TC_ACT_UNSPEC`.
const TC_ACT_UNSPEC: i32 = -1;

// Opcodes (linux/bpf_common.h, linux/bpf.h).
/// `BPF_ALU64 | BPF_MOV | BPF_K`: dst = imm (sign-extended).
const MOV64_IMM: u8 = 0xb7;
/// `BPF_STX | BPF_MEM | BPF_W`: *(u32 *)(dst + off) = src.
const STX_MEM_W: u8 = 0x63;
/// `BPF_LD | BPF_IMM | BPF_DW`: a two-slot 64-bit immediate load.
const LD_IMM64: u8 = 0x18;
/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// `BPF_JMP | BPF_EXIT`.
const EXIT: u8 = 0x95;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;

/// One `struct bpf_insn`: opcode, dst and src registers (low and high nibble), offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

/// The instructions of the entry program for `slot` and direction `dir`, tail-calling through
/// the program array `progs`.
pub(super) fn instructions(slot: u32, dir: u32, progs: BorrowedFd<'_>) -> Vec<[u8; 8]> {
    let cb_slot = SKB_CB_OFFSET + 4 * CB_SLOT as i16;
    vec![
        // r1 is the skb; it stays the context argument of the tail call.
        insn(MOV64_IMM, R2, 0, 0, slot as i32),
        // Only the low 32 bits are stored, so the sign extension above does not matter.
        insn(STX_MEM_W, R1, R2, cb_slot, 0),
        insn(LD_IMM64, R2, PSEUDO_MAP_FD, 0, progs.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_IMM, R3, 0, 0, dir as i32),
        insn(CALL, 0, 0, 0, FUNC_TAIL_CALL),
        // Reached only when the tail call did not happen.
        insn(MOV64_IMM, R0, 0, 0, TC_ACT_UNSPEC),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// Loads the entry program of `slot` for direction `dir`, named `name`.
pub(super) fn load(slot: u32, dir: u32, progs: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    // Dual-licensed like the counting programs; bpf_tail_call is not GPL-only.
    sys::load_classifier(&instructions(slot, dir, progs), name, "Dual MIT/GPL")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn instructions_encode_slot_direction_and_map() {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let fd = file.as_fd();
        let insns = instructions(0xdead_beef, 1, fd);
        assert_eq!(insns.len(), 8);
        // mov r2, slot: the slot's bits survive as the immediate.
        assert_eq!(insns[0][0], 0xb7);
        assert_eq!(insns[0][1], 0x02);
        assert_eq!(
            u32::from_le_bytes(insns[0][4..8].try_into().expect("imm")),
            0xdead_beef
        );
        // stxw [r1 + 48], r2: dst r1 in the low nibble, src r2 in the high one.
        assert_eq!(insns[1][..4], [0x63, 0x21, 48, 0]);
        // ld_imm64 r2, map fd (src = BPF_PSEUDO_MAP_FD), second half zero.
        assert_eq!(insns[2][..2], [0x18, 0x12]);
        assert_eq!(
            i32::from_le_bytes(insns[2][4..8].try_into().expect("imm")),
            fd.as_raw_fd()
        );
        assert_eq!(insns[3], [0; 8]);
        assert_eq!(insns[4][1], 0x03);
        assert_eq!(
            i32::from_le_bytes(insns[4][4..8].try_into().expect("imm")),
            1
        );
        assert_eq!(insns[5][0], 0x85);
        assert_eq!(
            i32::from_le_bytes(insns[5][4..8].try_into().expect("imm")),
            12
        );
        assert_eq!(
            i32::from_le_bytes(insns[6][4..8].try_into().expect("imm")),
            -1
        );
        assert_eq!(insns[7][0], 0x95);
    }
}
