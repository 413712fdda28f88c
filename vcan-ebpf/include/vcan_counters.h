/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * The data layout shared by the vcan counter program (vcan_count.bpf.c) and its loader, the
 * vcan-plugin's `ebpf` module. This header is the single definition: the Rust side mirrors it
 * with #[repr(C)] structs in vcan-plugin/src/ebpf/layout.rs, and the host test
 * vcan-plugin/tests/ebpf_layout.rs compares that mirror with the BTF of the compiled object
 * (sizes, member offsets, map key/value types and max_entries). Change both together, and bump
 * the map names' `_vN` suffix whenever a layout changes: the maps are pinned and outlive the
 * plugin, so a new layout must never reopen an old map.
 */
#ifndef VCAN_COUNTERS_H
#define VCAN_COUNTERS_H

#include <linux/types.h>

/* Attachments the maps can hold at once (the counters map holds two entries per attachment).
 * A slot is a random non-zero 32-bit id the loader picks per attachment, never a small index:
 * ids are not reused, so an entry program left behind by a crash can never count into the entry
 * of a later attachment. Slot 0 is never handed out: a packet that reaches the counting
 * programs without an entry program's slot is not counted. */
#define VCAN_MAX_SLOTS 4096

/* The skb->cb[] word in which an attachment's entry program passes its slot to the counting
 * programs (cb survives the tail call; tc leaves it to the programs). */
#define VCAN_CB_SLOT 0

/* Directions, the second half of the key, and the indexes of vcan_progs_v1. */
#define VCAN_DIR_INGRESS 0
#define VCAN_DIR_EGRESS 1
#define VCAN_DIRECTIONS 2

/* How a slot's programs are attached (struct vcan_slot.mode). */
#define VCAN_MODE_CLSACT 1 /* netlink cls_bpf filters on a clsact qdisc (kernels < 6.6) */
#define VCAN_MODE_TCX 2    /* TCX links, pinned in bpffs (kernels >= 6.6) */

/* CAN ethertypes (skb->protocol, big endian); <linux/if_ether.h> has them since 6.0. */
#ifndef ETH_P_CAN
#define ETH_P_CAN 0x000C
#endif
#ifndef ETH_P_CANFD
#define ETH_P_CANFD 0x000D
#endif
#ifndef ETH_P_CANXL
#define ETH_P_CANXL 0x000E
#endif

/* Key of the counters map: one entry per attachment and direction. */
struct vcan_key {
	__u32 slot; /* non-zero id chosen by the loader per attachment */
	__u32 dir;  /* VCAN_DIR_INGRESS or VCAN_DIR_EGRESS */
};

/* Frames of one kind and the payload bytes they carried. */
struct vcan_kind {
	__u64 frames;
	__u64 bytes;
};

/*
 * Value of the counters map (per CPU). The kinds are disjoint: every frame the program sees is
 * counted in exactly one of them, so their sum is the interface's frame total.
 */
struct vcan_counters {
	struct vcan_kind classic; /* ETH_P_CAN data frames (neither RTR nor ERR flag) */
	struct vcan_kind rtr;     /* ETH_P_CAN remote frames; they carry no payload: bytes stay 0 */
	struct vcan_kind err;     /* ETH_P_CAN error frames (CAN_ERR_FLAG); bytes = len (8) */
	struct vcan_kind fd;      /* ETH_P_CANFD frames without bit-rate switch */
	struct vcan_kind fd_brs;  /* ETH_P_CANFD frames with CANFD_BRS */
	struct vcan_kind xl;      /* ETH_P_CANXL frames */
	struct vcan_kind other;   /* anything else or too short to parse; bytes = skb->len */
	__u64 std_id;             /* classic, RTR and FD frames with an 11-bit id */
	__u64 ext_id;             /* classic, RTR and FD frames with a 29-bit id (CAN_EFF_FLAG) */
};

/*
 * Value of the slot registry map (not per CPU, never touched by the program): which interface a
 * slot counts, so that a restarted plugin can re-adopt its attachments and notice dead ones.
 */
struct vcan_slot {
	__u64 netns_ino;      /* inode of the interface's network namespace (nsfs) */
	__u32 ifindex;        /* interface index inside that namespace */
	__u32 mode;           /* VCAN_MODE_* */
	__u32 prog_id[2];     /* kernel ids of the attached entry programs, by direction */
	__u32 tc_handle[2];   /* clsact: the filters' handles, by direction */
	__u16 tc_priority[2]; /* clsact: the filters' priorities, by direction */
	__u32 reserved;       /* zero; keeps the layout free of implicit padding */
	char ifname[16];      /* interface name when attached (IFNAMSIZ), NUL-padded */
};

/*
 * Transmit queue of a member of a timed bus (vcan-plugin/src/bus/timing): how many of its frames
 * may wait for the bus. The egress program lets a frame through while sent - done < limit and
 * otherwise refuses it (TC_ACT_SHOT: the writer gets ENOBUFS, as from a controller whose queue is
 * full). The program only adds to sent and refused; done lives in vcan_txdone_v1 because the
 * scheduler writes it with map updates, which replace a whole value.
 */
struct vcan_txq {
	__u64 sent;     /* frames let through at egress */
	__u64 refused;  /* writes refused because the queue was full */
	__u32 limit;    /* frames that may wait; 0: no limit */
	__u32 reserved; /* zero; keeps the layout free of implicit padding */
};

#endif /* VCAN_COUNTERS_H */
