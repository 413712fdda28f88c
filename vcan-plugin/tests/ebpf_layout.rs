//! The Rust mirror of `vcan-ebpf/include/vcan_counters.h` (`vcan_plugin::ebpf::layout`) must
//! match what clang compiled: this reads the BTF of the object embedded in the plugin and
//! compares struct sizes, member names and offsets, member sizes, the maps' key/value types,
//! types and `max_entries`, the program array and the program sections.
//!
//! Runs on the host (no kernel involved): `cargo test -p vcan-plugin --test ebpf_layout`.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};

use object::{Object, ObjectSection};
use vcan_plugin::ebpf::layout::{
    CB_SLOT, COUNT_PROGRAMS, COUNTERS_MAP, DIRECTIONS, EGRESS_PROGRAM, INGRESS_PROGRAM, MAX_SLOTS,
    PROGS_MAP, SLOTS_MAP, TXDONE_MAP, TXQ_MAP, VcanCounters, VcanKey, VcanKind, VcanSlot, VcanTxq,
};

// ─── A minimal BTF reader (see the kernel's Documentation/bpf/btf.rst) ─────────────────────────

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    name: String,
    /// size for INT/STRUCT/UNION/ENUM/DATASEC, referenced type for PTR/TYPEDEF/VAR/modifiers.
    size_or_type: u32,
    members: Vec<Member>,
    /// ARRAY: (element type, number of elements).
    array: Option<(u32, u32)>,
    /// DATASEC: (var type id, offset, size).
    vars: Vec<(u32, u32, u32)>,
}

struct Btf {
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let bytes: [u8; 4] = b
        .get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .unwrap_or_else(|| panic!("BTF truncated at {off}"));
    u32::from_le_bytes(bytes)
}

impl Btf {
    fn parse(data: &[u8]) -> Btf {
        assert_eq!(&data[..2], &0xeb9f_u16.to_le_bytes(), "BTF magic");
        let hdr_len = u32_at(data, 4) as usize;
        let type_off = u32_at(data, 8) as usize;
        let type_len = u32_at(data, 12) as usize;
        let str_off = u32_at(data, 16) as usize;
        let strings = &data[hdr_len + str_off..];
        let name = |off: u32| -> String {
            let s = &strings[off as usize..];
            let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let t = &data[hdr_len + type_off..hdr_len + type_off + type_len];
        let mut types = vec![Type {
            kind: 0,
            name: "void".into(),
            size_or_type: 0,
            members: vec![],
            array: None,
            vars: vec![],
        }];
        let mut pos = 0;
        while pos < t.len() {
            let name_off = u32_at(t, pos);
            let info = u32_at(t, pos + 4);
            let size_or_type = u32_at(t, pos + 8);
            pos += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                kind,
                name: name(name_off),
                size_or_type,
                members: vec![],
                array: None,
                vars: vec![],
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => pos += 4,
                KIND_ARRAY => {
                    ty.array = Some((u32_at(t, pos), u32_at(t, pos + 8)));
                    pos += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let offset = u32_at(t, pos + 8);
                        ty.members.push(Member {
                            name: name(u32_at(t, pos)),
                            type_id: u32_at(t, pos + 4),
                            // With kind_flag set the top 8 bits are a bitfield size.
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                        pos += 12;
                    }
                }
                KIND_ENUM => pos += 8 * vlen,
                KIND_ENUM64 => pos += 12 * vlen,
                KIND_FUNC_PROTO => pos += 8 * vlen,
                KIND_DATASEC => {
                    for _ in 0..vlen {
                        ty.vars
                            .push((u32_at(t, pos), u32_at(t, pos + 4), u32_at(t, pos + 8)));
                        pos += 12;
                    }
                }
                _ => {}
            }
            types.push(ty);
        }
        Btf { types }
    }

    fn get(&self, id: u32) -> &Type {
        &self.types[id as usize]
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        while matches!(
            self.get(id).kind,
            KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
        ) {
            id = self.get(id).size_or_type;
        }
        id
    }

    fn size_of(&self, id: u32) -> usize {
        let ty = self.get(self.resolve(id));
        match ty.kind {
            KIND_ARRAY => {
                let (elem, n) = ty.array.expect("array info");
                self.size_of(elem) * n as usize
            }
            KIND_PTR => 8,
            _ => ty.size_or_type as usize,
        }
    }

    fn find(&self, kind: u32, name: &str) -> u32 {
        let hits: Vec<u32> = (0..self.types.len() as u32)
            .filter(|&i| self.get(i).kind == kind && self.get(i).name == name)
            .collect();
        assert_eq!(hits.len(), 1, "BTF type {name:?} (kind {kind}): {hits:?}");
        hits[0]
    }

    /// `(name, byte offset, byte size)` of each member of struct `name`.
    fn layout(&self, name: &str) -> (usize, Vec<(String, usize, usize)>) {
        let id = self.find(KIND_STRUCT, name);
        let ty = self.get(id);
        let members = ty
            .members
            .iter()
            .map(|m| {
                assert_eq!(m.bit_offset % 8, 0, "{name}.{} is a bitfield", m.name);
                (
                    m.name.clone(),
                    (m.bit_offset / 8) as usize,
                    self.size_of(m.type_id),
                )
            })
            .collect();
        (ty.size_or_type as usize, members)
    }

    /// The members of a BTF-defined map (`struct { __uint(type, ...); ... } name SEC(".maps")`),
    /// by member name: the referenced type of each pointer member.
    fn map_def(&self, map: &str) -> HashMap<String, u32> {
        let var = self.find(KIND_VAR, map);
        let def = self.get(self.resolve(self.get(var).size_or_type));
        assert_eq!(def.kind, KIND_STRUCT, "{map} is not a struct");
        def.members
            .iter()
            .map(|m| {
                let ptr = self.get(m.type_id);
                assert_eq!(ptr.kind, KIND_PTR, "{map}.{} is not a pointer", m.name);
                (m.name.clone(), ptr.size_or_type)
            })
            .collect()
    }

    /// `__uint(field, N)` is encoded as `int (*field)[N]`.
    fn map_uint(&self, def: &HashMap<String, u32>, field: &str) -> u32 {
        let arr = self.get(def[field]);
        assert_eq!(arr.kind, KIND_ARRAY, "{field} is not __uint()");
        arr.array.expect("array").1
    }
}

fn object_btf() -> (Btf, Vec<String>) {
    let obj = object::File::parse(vcan_plugin::ebpf::object()).expect("the embedded object is ELF");
    let btf = obj
        .section_by_name(".BTF")
        .expect("the object has BTF (compiled with -g)")
        .data()
        .expect(".BTF data");
    let sections = obj
        .sections()
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect();
    (Btf::parse(btf), sections)
}

// ─── The Rust side ─────────────────────────────────────────────────────────────────────────────

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

macro_rules! fields {
    ($t:ty: $($f:ident),+ $(,)?) => {
        vec![$((stringify!($f).to_string(), offset_of!($t, $f), field_size(|s: &$t| &s.$f))),+]
    };
}

fn assert_same(name: &str, btf: &Btf, rust_size: usize, rust: Vec<(String, usize, usize)>) {
    let (size, members) = btf.layout(name);
    assert_eq!(
        (size, &members),
        (rust_size, &rust),
        "struct {name}: (size, [(member, offset, size)]) in the object's BTF vs the Rust mirror"
    );
}

#[test]
fn structs_match_the_objects_btf() {
    let (btf, _) = object_btf();
    assert_same(
        "vcan_key",
        &btf,
        size_of::<VcanKey>(),
        fields!(VcanKey: slot, dir),
    );
    assert_same(
        "vcan_kind",
        &btf,
        size_of::<VcanKind>(),
        fields!(VcanKind: frames, bytes),
    );
    assert_same(
        "vcan_counters",
        &btf,
        size_of::<VcanCounters>(),
        fields!(VcanCounters: classic, rtr, err, fd, fd_brs, xl, other, std_id, ext_id),
    );
    assert_same(
        "vcan_slot",
        &btf,
        size_of::<VcanSlot>(),
        fields!(VcanSlot: netns_ino, ifindex, mode, prog_id, tc_handle, tc_priority, reserved, ifname),
    );
    assert_same(
        "vcan_txq",
        &btf,
        size_of::<VcanTxq>(),
        fields!(VcanTxq: sent, refused, limit, reserved),
    );
}

#[test]
fn maps_use_the_mirrored_types_and_limits() {
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
    const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
    const BPF_F_NO_PREALLOC: u32 = 1;
    const LIBBPF_PIN_BY_NAME: u32 = 1;
    let (btf, _) = object_btf();

    let counters = btf.map_def(COUNTERS_MAP);
    assert_eq!(btf.map_uint(&counters, "type"), BPF_MAP_TYPE_PERCPU_HASH);
    assert_eq!(
        btf.map_uint(&counters, "max_entries"),
        MAX_SLOTS * DIRECTIONS
    );
    assert_eq!(btf.map_uint(&counters, "map_flags"), BPF_F_NO_PREALLOC);
    assert_eq!(btf.map_uint(&counters, "pinning"), LIBBPF_PIN_BY_NAME);
    assert_eq!(btf.get(btf.resolve(counters["key"])).name, "vcan_key");
    assert_eq!(
        btf.get(btf.resolve(counters["value"])).name,
        "vcan_counters"
    );

    let slots = btf.map_def(SLOTS_MAP);
    assert_eq!(btf.map_uint(&slots, "type"), BPF_MAP_TYPE_HASH);
    assert_eq!(btf.map_uint(&slots, "max_entries"), MAX_SLOTS);
    assert_eq!(btf.map_uint(&slots, "map_flags"), BPF_F_NO_PREALLOC);
    assert_eq!(btf.map_uint(&slots, "pinning"), LIBBPF_PIN_BY_NAME);
    assert_eq!(btf.size_of(slots["key"]), size_of::<u32>());
    assert_eq!(btf.get(btf.resolve(slots["value"])).name, "vcan_slot");

    // The entry programs tail-call through it by direction.
    let progs = btf.map_def(PROGS_MAP);
    assert_eq!(btf.map_uint(&progs, "type"), BPF_MAP_TYPE_PROG_ARRAY);
    assert_eq!(btf.map_uint(&progs, "max_entries"), DIRECTIONS);
    assert_eq!(btf.map_uint(&progs, "pinning"), LIBBPF_PIN_BY_NAME);
    assert_eq!(btf.size_of(progs["key"]), size_of::<u32>());
    assert_eq!(btf.size_of(progs["value"]), size_of::<u32>());

    let txq = btf.map_def(TXQ_MAP);
    assert_eq!(btf.map_uint(&txq, "type"), BPF_MAP_TYPE_HASH);
    assert_eq!(btf.map_uint(&txq, "max_entries"), MAX_SLOTS);
    assert_eq!(btf.map_uint(&txq, "map_flags"), BPF_F_NO_PREALLOC);
    assert_eq!(btf.map_uint(&txq, "pinning"), LIBBPF_PIN_BY_NAME);
    assert_eq!(btf.size_of(txq["key"]), size_of::<u32>());
    assert_eq!(btf.get(btf.resolve(txq["value"])).name, "vcan_txq");
    let done = btf.map_def(TXDONE_MAP);
    assert_eq!(btf.map_uint(&done, "type"), BPF_MAP_TYPE_HASH);
    assert_eq!(btf.map_uint(&done, "max_entries"), MAX_SLOTS);
    assert_eq!(btf.map_uint(&done, "pinning"), LIBBPF_PIN_BY_NAME);
    assert_eq!(btf.size_of(done["key"]), size_of::<u32>());
    assert_eq!(btf.size_of(done["value"]), size_of::<u64>());
    assert!(TXQ_MAP.len() <= 15 && TXDONE_MAP.len() <= 15);

    // Kernel map names are at most 15 bytes (BPF_OBJ_NAME_LEN - 1).
    assert!(COUNTERS_MAP.len() <= 15 && SLOTS_MAP.len() <= 15 && PROGS_MAP.len() <= 15);
}

#[test]
fn counting_programs_are_classifiers_and_the_slot_travels_in_cb() {
    let (btf, sections) = object_btf();
    // aya recognises tc programs only in `classifier` / `classifier/<name>` sections.
    for program in COUNT_PROGRAMS {
        let section = format!("classifier/{program}");
        assert!(
            sections.contains(&section),
            "no section {section}: {sections:?}"
        );
    }
    // Kernel program names are 15 bytes max: the counting programs' and the entry programs'.
    for name in COUNT_PROGRAMS
        .into_iter()
        .chain([INGRESS_PROGRAM, EGRESS_PROGRAM])
    {
        assert!(name.len() <= 15, "{name} is longer than 15 bytes");
    }
    // `cb` is `__u32 cb[5]` in struct __sk_buff; the entry programs store the slot in one word.
    let skb = btf.find(KIND_STRUCT, "__sk_buff");
    let cb = btf
        .get(skb)
        .members
        .iter()
        .find(|m| m.name == "cb")
        .expect("__sk_buff has cb");
    assert_eq!(
        cb.bit_offset,
        48 * 8,
        "cb is at the offset the entry programs write"
    );
    let (_, words) = btf
        .get(btf.resolve(cb.type_id))
        .array
        .expect("cb is an array");
    assert!(CB_SLOT < words as usize);
}
