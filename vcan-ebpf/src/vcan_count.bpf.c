// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * vcan_count: a tc classifier that counts the CAN frames crossing one interface, per direction
 * and kind. See ../README.md for the design (why a slot, why entry programs and tail calls,
 * why TC_ACT_UNSPEC).
 *
 * Built by vcan-plugin/build.rs:
 *   clang-19 -target bpf -O2 -g -I../include -I/usr/include/<multiarch> -c vcan_count.bpf.c
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/can.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "vcan_counters.h"

/*
 * Which attachment a packet is counted for. ifindex repeats across network namespaces (every
 * pod's first vcan is typically index 2), and on the kernels we support a tc program cannot
 * learn its namespace, so every attachment has its own slot. The counting programs below are
 * loaded once per plugin process; what is attached to an interface is a per-attachment entry
 * program of a few instructions, built by the loader (vcan-plugin/src/ebpf/entry.rs), that
 * stores its slot in skb->cb[VCAN_CB_SLOT] and tail-calls vcan_progs_v1[direction]. A program
 * that small costs almost nothing to verify, so attaching is cheap, and it still gives each
 * attachment a program id of its own, which is how the loader tells live attachments from
 * dead ones after a restart.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, VCAN_DIRECTIONS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vcan_progs_v1 SEC(".maps");

/* Counters of every attachment, shared by all loads through the bpffs pin. Entries are created
 * (zeroed) by the loader before it attaches and deleted when it detaches; the program only
 * looks them up, so it never allocates and a late packet cannot resurrect a deleted entry. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, VCAN_MAX_SLOTS * VCAN_DIRECTIONS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vcan_key);
	__type(value, struct vcan_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vcan_cnt_v1 SEC(".maps");

/* Slot registry, used by the loader only (see struct vcan_slot). Defined here so that it is
 * pinned next to the counters, with the same lifetime, and its layout is in this object's BTF. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VCAN_MAX_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct vcan_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vcan_slots_v1 SEC(".maps");

/* Transmit queues of timed-bus members by slot (see struct vcan_txq); created by the loader when
 * a member joins a timed bus, deleted with the slot. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VCAN_MAX_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct vcan_txq);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vcan_txq_v1 SEC(".maps");

/* Frames of each queue that have left the bus, written by the timed bus's scheduler. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VCAN_MAX_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vcan_txdone_v1 SEC(".maps");

/* Whether a frame leaving a timed-bus member may join its transmit queue. Two CPUs may both let
 * the last free place's frame through: the bound is the limit plus the CPUs, never unbounded. */
static __always_inline int queue_full(__u32 slot)
{
	struct vcan_txq *q = bpf_map_lookup_elem(&vcan_txq_v1, &slot);
	__u64 *done;

	if (!q || q->limit == 0)
		return 0;
	done = bpf_map_lookup_elem(&vcan_txdone_v1, &slot);
	/* Signed: a count reset ahead of sent must read as an empty queue, not a full one. */
	if ((__s64)(q->sent - (done ? *done : 0)) >= (__s64)q->limit) {
		__sync_fetch_and_add(&q->refused, 1);
		return 1;
	}
	__sync_fetch_and_add(&q->sent, 1);
	return 0;
}

/* Largest payloads, to keep a corrupt length from inflating the byte counters. */
#define CLASSIC_MAX_LEN 8
#define FD_MAX_LEN 64
#define XL_MAX_LEN 2048

static __always_inline void add(struct vcan_kind *k, __u64 bytes)
{
	/* Per-CPU values: tc runs with migration disabled and never nests on a CPU for one
	 * device, so plain increments are safe. */
	k->frames += 1;
	k->bytes += bytes;
}

static __always_inline void count_id(struct vcan_counters *c, __u32 can_id)
{
	if (can_id & CAN_EFF_FLAG)
		c->ext_id += 1;
	else
		c->std_id += 1;
}

static __always_inline int count(struct __sk_buff *skb, __u32 dir)
{
	struct vcan_key key = { .slot = skb->cb[VCAN_CB_SLOT], .dir = dir };
	struct vcan_counters *c;
	__u8 head[8];
	__u32 can_id;
	__u16 xl_len;
	__u8 len;

	if (key.slot == 0)
		return TC_ACT_UNSPEC; /* not entered through an attachment's entry program */
	/* A refused frame was never sent: not counted, and the writer learns it (ENOBUFS). */
	if (dir == VCAN_DIR_EGRESS && queue_full(key.slot))
		return TC_ACT_SHOT;
	c = bpf_map_lookup_elem(&vcan_cnt_v1, &key);
	if (!c)
		return TC_ACT_UNSPEC; /* detached, or not set up yet: count nothing */

	/* CAN skbs have no link-layer header: the frame starts at offset 0. Every layout keeps
	 * what we need in its first 8 bytes. */
	if (bpf_skb_load_bytes(skb, 0, head, sizeof(head)) < 0) {
		add(&c->other, skb->len);
		return TC_ACT_UNSPEC;
	}
	/* Frames are in host byte order (struct can_frame is CPU-endian). */
	__builtin_memcpy(&can_id, head, sizeof(can_id));
	len = head[4];

	switch (bpf_ntohs(skb->protocol)) {
	case ETH_P_CAN:
		/* struct can_frame: can_id @0, len @4 */
		if (can_id & CAN_ERR_FLAG) {
			add(&c->err, len > CLASSIC_MAX_LEN ? CLASSIC_MAX_LEN : len);
			break;
		}
		if (can_id & CAN_RTR_FLAG)
			add(&c->rtr, 0);
		else
			add(&c->classic, len > CLASSIC_MAX_LEN ? CLASSIC_MAX_LEN : len);
		count_id(c, can_id);
		break;
	case ETH_P_CANFD:
		/* struct canfd_frame: can_id @0, len @4, flags @5 */
		if (head[5] & CANFD_BRS)
			add(&c->fd_brs, len > FD_MAX_LEN ? FD_MAX_LEN : len);
		else
			add(&c->fd, len > FD_MAX_LEN ? FD_MAX_LEN : len);
		count_id(c, can_id);
		break;
	case ETH_P_CANXL:
		/* struct canxl_frame: prio @0, flags @4, sdt @5, len (u16) @6 */
		__builtin_memcpy(&xl_len, head + 6, sizeof(xl_len));
		add(&c->xl, xl_len > XL_MAX_LEN ? XL_MAX_LEN : xl_len);
		break;
	default:
		add(&c->other, skb->len);
		break;
	}
	/* UNSPEC (== TCX_NEXT): never decide the packet's fate, let later programs run. */
	return TC_ACT_UNSPEC;
}

/* Tail-call targets, vcan_progs_v1[VCAN_DIR_*]; never attached themselves. */
SEC("classifier/vcan_cnt_in")
int vcan_cnt_in(struct __sk_buff *skb)
{
	return count(skb, VCAN_DIR_INGRESS);
}

SEC("classifier/vcan_cnt_eg")
int vcan_cnt_eg(struct __sk_buff *skb)
{
	return count(skb, VCAN_DIR_EGRESS);
}

/* Only GPL-compatible-agnostic helpers are used; dual licence keeps both options open. */
char _license[] SEC("license") = "Dual MIT/GPL";
