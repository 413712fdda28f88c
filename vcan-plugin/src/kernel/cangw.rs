//! The kernel's CAN gateway (can-gw): frame forwarding rules between the CAN interfaces of one
//! network namespace, managed over rtnetlink (what `cangw` from can-utils does, without the binary).
//!
//! A shared CAN bus between pods is built from [`crate::kernel::vxcan`] pairs whose bus ends live in a
//! namespace the plugin owns per bus; [`Gateway`] manages the rules in that namespace that forward
//! every frame arriving on one bus end out of the others ([`mesh`]).
//!
//! can-gw speaks rtnetlink with family `AF_CAN`: `RTM_NEWROUTE` adds a rule, `RTM_DELROUTE` deletes
//! the first identical one (or all of them when both interface indexes are 0), and an
//! `RTM_GETROUTE` dump lists them with their frame counters. Rules are per namespace and refer to
//! interfaces by index; when an interface goes away the kernel drops the rules that use it.
//!
//! Kernel behaviour this module is shaped by (net/can/gw.c):
//! - can-gw is never loaded on demand: without the module every request fails with EOPNOTSUPP,
//!   and a dump silently falls back to listing every other family's routes. [`Gateway::open`]
//!   therefore probes for it and reports [`GatewayError::NotLoaded`].
//! - Adding a rule never checks for duplicates, and a duplicate forwards every frame twice, so
//!   [`Gateway::add`] lists first and adds only what is missing.
//! - A rule handles either classic frames or CAN FD frames ([`Rule::fd`]), never both: an FD bus
//!   needs one rule of each kind per direction.
//!
//! Listing and then changing is not atomic, and this module holds no lock of its own: whoever
//! changes one namespace's rules from several threads must serialise those changes for that
//! namespace ([`crate::bus`] holds one lock per bus). A process-wide lock here would make every bus
//! wait for every other bus's joins and leaves.

use std::collections::HashSet;
use std::fmt;
use std::io;

use crate::kernel::link::CanMtu;
use crate::kernel::netlink::{self, Message, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, Socket};
use crate::kernel::netns::{self, Netns, NetnsError};

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
/// `AF_CAN`, the family of can-gw's messages.
const AF_CAN: u8 = 29;
/// `CGW_TYPE_UNSPEC`: rejected by can-gw with EINVAL, which makes it a harmless probe.
const CGW_TYPE_UNSPEC: u8 = 0;
/// `CGW_TYPE_CAN_CAN`: CAN to CAN forwarding, the only type there is.
const CGW_TYPE_CAN_CAN: u8 = 1;

const CGW_HANDLED: u16 = 7;
const CGW_DROPPED: u16 = 8;
const CGW_SRC_IF: u16 = 9;
const CGW_DST_IF: u16 = 10;
const CGW_FILTER: u16 = 11;
const CGW_DELETED: u16 = 12;

const CGW_FLAGS_CAN_ECHO: u16 = 0x01;
const CGW_FLAGS_CAN_SRC_TSTAMP: u16 = 0x02;
const CGW_FLAGS_CAN_IIF_TX_OK: u16 = 0x04;
const CGW_FLAGS_CAN_FD: u16 = 0x08;
const KNOWN_FLAGS: u16 =
    CGW_FLAGS_CAN_ECHO | CGW_FLAGS_CAN_SRC_TSTAMP | CGW_FLAGS_CAN_IIF_TX_OK | CGW_FLAGS_CAN_FD;

/// A receive filter on the source interface (`struct can_filter`): a frame is forwarded when
/// `frame_id & mask == id & mask`. `CAN_INV_FILTER` in `id` inverts it, and the flag bits
/// (`CAN_EFF_FLAG`, `CAN_RTR_FLAG`) take part when they are in `mask`, as for CAN_RAW sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Filter {
    /// The identifier (with optional flag bits).
    pub id: u32,
    /// Which bits of the identifier must match.
    pub mask: u32,
}

/// One can-gw rule: forward frames received on `src_ifindex` out of `dst_ifindex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Interface index of the source, in the gateway's namespace.
    pub src_ifindex: u32,
    /// Interface index of the destination, in the gateway's namespace.
    pub dst_ifindex: u32,
    /// Forward CAN FD frames (`CGW_FLAGS_CAN_FD`) instead of classic ones: a rule handles one kind
    /// only.
    pub fd: bool,
    /// Skip can-gw's "never send a frame back out of the interface it came in on" check
    /// (`CGW_FLAGS_CAN_IIF_TX_OK`). The plugin always sets it: the check compares the ifindex of the
    /// interface the frame was *first sent on* — recorded by the sending socket in the pod's
    /// namespace and carried unchanged through vxcan — with the destination's ifindex in the bus
    /// namespace. Indexes of two namespaces are unrelated numbers (a pod's first interface is
    /// usually 2, and so is the bus namespace's first bus end), so without the flag frames are
    /// dropped whenever they happen to collide — silently, not even counted as dropped. Turning
    /// the check off is safe: the plugin's rules never have `src == dst`, and without
    /// [`Rule::echo`] a frame sent out of a bus end goes only to the member behind it, never back
    /// into the bus namespace, so no frame can return to its sender.
    pub iif_tx_ok: bool,
    /// Also deliver the forwarded frame to listeners on the destination in the gateway's namespace
    /// (`CGW_FLAGS_CAN_ECHO`, what `cangw -e` recommends for vcan). The plugin leaves it off: on a
    /// bus end those listeners are the end's own rules, which would take the echoed frame for new
    /// input and forward it again — only can-gw's `max_hops` (1 by default, module-wide) stops it,
    /// counting it as [`Counters::deleted`]; with a higher `max_hops` frames would return to their
    /// sender.
    pub echo: bool,
    /// Keep the source's receive timestamp on the forwarded frame (`CGW_FLAGS_CAN_SRC_TSTAMP`).
    pub src_tstamp: bool,
    /// Forward only frames that pass this filter; `None` forwards every frame (as does a filter
    /// with `id` and `mask` both 0, which the kernel does not distinguish from none).
    pub filter: Option<Filter>,
}

impl Rule {
    /// A rule forwarding classic CAN frames from `src` to `dst`, as the plugin makes them.
    pub const fn classic(src_ifindex: u32, dst_ifindex: u32) -> Self {
        Rule {
            src_ifindex,
            dst_ifindex,
            fd: false,
            iif_tx_ok: true,
            echo: false,
            src_tstamp: false,
            filter: None,
        }
    }

    /// A rule forwarding CAN FD frames from `src` to `dst`, as the plugin makes them.
    pub const fn can_fd(src_ifindex: u32, dst_ifindex: u32) -> Self {
        Rule {
            fd: true,
            ..Rule::classic(src_ifindex, dst_ifindex)
        }
    }

    /// This rule with a receive filter.
    pub const fn with_filter(self, id: u32, mask: u32) -> Self {
        Rule {
            filter: Some(Filter { id, mask }),
            ..self
        }
    }

    fn flags(&self) -> u16 {
        let mut flags = 0;
        for (on, bit) in [
            (self.echo, CGW_FLAGS_CAN_ECHO),
            (self.src_tstamp, CGW_FLAGS_CAN_SRC_TSTAMP),
            (self.iif_tx_ok, CGW_FLAGS_CAN_IIF_TX_OK),
            (self.fd, CGW_FLAGS_CAN_FD),
        ] {
            if on {
                flags |= bit;
            }
        }
        flags
    }

    /// The filter as the kernel keeps it: `{0, 0}` is stored and reported as no filter.
    fn effective_filter(&self) -> Option<Filter> {
        self.filter.filter(|f| f.id != 0 || f.mask != 0)
    }

    /// The rule as the kernel compares it: two rules are identical (as `RTM_DELROUTE` matches)
    /// exactly when their keys are equal, so keys can go in hash sets.
    fn key(&self) -> Rule {
        Rule {
            filter: self.effective_filter(),
            ..*self
        }
    }

    /// Whether the kernel would consider the two rules identical.
    fn same_as(&self, other: &Rule) -> bool {
        self.key() == other.key()
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ifindex {} -> ifindex {} ({}",
            self.src_ifindex,
            self.dst_ifindex,
            if self.fd { "CAN FD" } else { "classic" }
        )?;
        for (on, name) in [
            (self.iif_tx_ok, "iif-tx-ok"),
            (self.echo, "echo"),
            (self.src_tstamp, "src-tstamp"),
        ] {
            if on {
                write!(f, ", {name}")?;
            }
        }
        if let Some(filter) = self.effective_filter() {
            write!(f, ", filter {:03X}:{:X}", filter.id, filter.mask)?;
        }
        write!(f, ")")
    }
}

/// A rule's frame counters, as the kernel reports them (32 bits, wrapping).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Counters {
    /// Frames forwarded.
    pub handled: u32,
    /// Frames that could not be forwarded (destination down, out of memory, rejected by the
    /// destination — e.g. an FD frame to a classic-MTU interface).
    pub dropped: u32,
    /// Frames discarded because they had already been routed `max_hops` times (a routing loop).
    pub deleted: u32,
}

/// A rule listed by [`Gateway::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRule {
    /// The rule.
    pub rule: Rule,
    /// Its counters.
    pub counters: Counters,
    /// The rule also has settings [`Rule`] cannot express (frame modifications, checksums, hop
    /// limit, a modification uid, or unknown flags): someone other than the plugin made it, and
    /// [`Gateway::add`] and [`Gateway::delete`] never treat it as one of theirs.
    pub foreign: bool,
}

/// What went wrong managing can-gw rules, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The can-gw module is not loaded.
    #[error(
        "the kernel's CAN gateway is not loaded, so CAN buses between pods cannot be joined: load \
         it on the node with `modprobe can-gw` (the kernel never loads it on demand)"
    )]
    NotLoaded,
    /// The kernel refused for lack of privilege.
    #[error(
        "{what} in {ns} was refused: managing CAN gateway rules needs CAP_NET_ADMIN in the node's \
         initial user namespace"
    )]
    PermissionDenied {
        /// What was attempted.
        what: String,
        /// The namespace.
        ns: String,
    },
    /// An interface of the rule does not exist in the namespace or is not a CAN interface.
    #[error(
        "cannot add CAN gateway rule {rule} in {ns}: ifindex {} or {} is not a CAN interface there",
        rule.src_ifindex,
        rule.dst_ifindex
    )]
    NoSuchInterface {
        /// The rule.
        rule: Rule,
        /// The namespace.
        ns: String,
    },
    /// Any other netlink failure (EINVAL for a rule the kernel rejects, such as — on kernels newer
    /// than 6.1 — `src == dst` without `iif_tx_ok`).
    #[error("{what} in {ns} failed: {source}")]
    Netlink {
        /// What was attempted.
        what: String,
        /// The namespace.
        ns: String,
        /// The kernel's error.
        source: io::Error,
    },
}

/// The rules that join `bus_ends` (interface indexes in the bus namespace) into one bus: every end
/// forwards to every other end, classic frames always and CAN FD frames too when `mtu` is FD.
///
/// A full mesh rather than a hub: with a hub interface every frame would take two hops (more than
/// can-gw's default `max_hops` of 1, a module-wide setting the plugin cannot change per bus) and
/// the hub's rules would send each frame back to its sender too, since can-gw cannot tell which
/// member a frame came from once it is on the hub. In the mesh each frame is routed exactly once,
/// directly to every other member and never to its sender; a member joining or leaving touches only
/// its own 2·(n−1) rules (twice that on an FD bus). n·(n−1) rules is little for the handful to tens
/// of pods that share a bus on one node.
pub fn mesh(bus_ends: &[u32], mtu: CanMtu) -> Vec<Rule> {
    let mut rules = Vec::new();
    for &src in bus_ends {
        for &dst in bus_ends {
            if src == dst {
                continue;
            }
            rules.push(Rule::classic(src, dst));
            if mtu == CanMtu::Fd {
                rules.push(Rule::can_fd(src, dst));
            }
        }
    }
    rules
}

/// The fixed `struct rtcanmsg` header.
fn rtcanmsg(gwtype: u8, flags: u16) -> [u8; 4] {
    let f = flags.to_ne_bytes();
    [AF_CAN, gwtype, f[0], f[1]]
}

/// The attributes that describe `rule` to can-gw. No filter is sent for "forward everything": the
/// kernel zeroes an absent filter, and deletion compares filters byte for byte.
fn rule_attrs(rule: &Rule) -> Vec<(u16, Vec<u8>)> {
    let mut attrs = Vec::new();
    if let Some(filter) = rule.effective_filter() {
        // struct can_filter { canid_t can_id; canid_t can_mask; }
        let mut payload = filter.id.to_ne_bytes().to_vec();
        payload.extend_from_slice(&filter.mask.to_ne_bytes());
        attrs.push((CGW_FILTER, payload));
    }
    attrs.push((CGW_SRC_IF, rule.src_ifindex.to_ne_bytes().to_vec()));
    attrs.push((CGW_DST_IF, rule.dst_ifindex.to_ne_bytes().to_vec()));
    attrs
}

/// The request for `rule` (`RTM_NEWROUTE` or `RTM_DELROUTE`).
fn rule_message(kind: u16, flags: u16, rule: &Rule) -> Message {
    let mut msg = Message::new(kind, flags, &rtcanmsg(CGW_TYPE_CAN_CAN, rule.flags()));
    for (attr, payload) in rule_attrs(rule) {
        msg.attr(attr, &payload);
    }
    msg
}

/// Parses one dumped rule; `None` for anything that is not a CAN-to-CAN rule (such as the other
/// families' routes a dump returns when can-gw is not loaded).
fn parse_rule(payload: &[u8]) -> Option<ListedRule> {
    let header = payload.get(..4)?;
    if header[0] != AF_CAN || header[1] != CGW_TYPE_CAN_CAN {
        return None;
    }
    let flags = u16::from_ne_bytes([header[2], header[3]]);
    let mut rule = Rule {
        src_ifindex: 0,
        dst_ifindex: 0,
        fd: flags & CGW_FLAGS_CAN_FD != 0,
        iif_tx_ok: flags & CGW_FLAGS_CAN_IIF_TX_OK != 0,
        echo: flags & CGW_FLAGS_CAN_ECHO != 0,
        src_tstamp: flags & CGW_FLAGS_CAN_SRC_TSTAMP != 0,
        filter: None,
    };
    let mut counters = Counters::default();
    let mut foreign = flags & !KNOWN_FLAGS != 0;
    for (kind, data) in netlink::attrs(&payload[4..]) {
        let value = netlink::attr_u32(data).unwrap_or(0);
        match kind {
            CGW_SRC_IF => rule.src_ifindex = value,
            CGW_DST_IF => rule.dst_ifindex = value,
            CGW_HANDLED => counters.handled = value,
            CGW_DROPPED => counters.dropped = value,
            CGW_DELETED => counters.deleted = value,
            CGW_FILTER => {
                rule.filter = Some(Filter {
                    id: value,
                    mask: netlink::attr_u32(data.get(4..).unwrap_or_default()).unwrap_or(0),
                });
            }
            // Modifications, checksums, hop limit, uid: settings the plugin never makes.
            _ => foreign = true,
        }
    }
    Some(ListedRule {
        rule,
        counters,
        foreign,
    })
}

/// The rules of `wanted` that `listed` lacks, each once, in `wanted`'s order. Foreign rules do not
/// count as present: deleting or changing them is not the plugin's business, and they may forward
/// differently.
///
/// Hash sets rather than comparing every wanted rule with every listed one: a member joining a bus
/// of n members with f filters each wants up to 4·(n−1)·f rules on a namespace holding n²·f or
/// so, which a pairwise scan would turn into billions of comparisons on a large bus.
fn missing(listed: &[ListedRule], wanted: &[Rule]) -> Vec<Rule> {
    let mut present: HashSet<Rule> = listed
        .iter()
        .filter(|l| !l.foreign)
        .map(|l| l.rule.key())
        .collect();
    wanted
        .iter()
        .filter(|rule| present.insert(rule.key()))
        .copied()
        .collect()
}

/// The rules of `listed` that forward from or to `ifindex` and are the plugin's, once per listed
/// copy (each `RTM_DELROUTE` removes one copy, and a duplicate must go too).
fn touching(listed: &[ListedRule], ifindex: u32) -> Vec<Rule> {
    listed
        .iter()
        .filter(|l| !l.foreign && (l.rule.src_ifindex == ifindex || l.rule.dst_ifindex == ifindex))
        .map(|l| l.rule)
        .collect()
}

/// The can-gw rules of one network namespace.
#[derive(Debug)]
pub struct Gateway {
    sock: Socket,
    ns: String,
}

impl Gateway {
    /// Opens a handle on the rules of `ns` (for the plugin, a bus namespace): a route socket opened
    /// inside it, so every request acts on that namespace whichever thread sends it.
    ///
    /// Fails with [`GatewayError::NotLoaded`] when the kernel has no can-gw.
    pub fn open(ns: &Netns) -> Result<Self, GatewayError> {
        let name = ns.to_string();
        let sock = netns::run(ns, || Socket::open(libc::NETLINK_ROUTE))?.map_err(|source| {
            GatewayError::Netlink {
                what: "opening a route socket".into(),
                ns: name.clone(),
                source,
            }
        })?;
        let mut gw = Gateway { sock, ns: name };
        gw.probe()?;
        Ok(gw)
    }

    /// Checks that can-gw is there with a request it rejects before doing anything: a rule of
    /// type CGW_TYPE_UNSPEC gets EINVAL from can-gw and EOPNOTSUPP from a kernel without it.
    fn probe(&mut self) -> Result<(), GatewayError> {
        let mut msg = Message::new(
            RTM_NEWROUTE,
            NLM_F_ACK,
            &rtcanmsg(CGW_TYPE_UNSPEC, CGW_FLAGS_CAN_IIF_TX_OK),
        );
        match self.sock.transact(&mut msg) {
            Ok(_) => Ok(()),
            Err(e) if netlink::errno(&e) == Some(libc::EINVAL) => Ok(()),
            // Without CAP_NET_ADMIN the kernel refuses before it looks for can-gw: leave it to the
            // first change to report, so that listing still works.
            Err(e) if netlink::errno(&e) == Some(libc::EPERM) => Ok(()),
            Err(e) => Err(self.error("checking for can-gw".into(), e, None)),
        }
    }

    fn error(&self, what: String, e: io::Error, rule: Option<&Rule>) -> GatewayError {
        match (netlink::errno(&e), rule) {
            (Some(libc::EOPNOTSUPP), _) => GatewayError::NotLoaded,
            (Some(libc::EPERM), _) => GatewayError::PermissionDenied {
                what,
                ns: self.ns.clone(),
            },
            (Some(libc::ENODEV), Some(rule)) => GatewayError::NoSuchInterface {
                rule: *rule,
                ns: self.ns.clone(),
            },
            _ => GatewayError::Netlink {
                what,
                ns: self.ns.clone(),
                source: e,
            },
        }
    }

    /// Every rule in the namespace, with its counters.
    pub fn list(&mut self) -> Result<Vec<ListedRule>, GatewayError> {
        let mut msg = Message::new(RTM_GETROUTE, NLM_F_DUMP, &rtcanmsg(0, 0));
        let replies = self
            .sock
            .transact(&mut msg)
            .map_err(|e| self.error("listing CAN gateway rules".into(), e, None))?;
        Ok(replies
            .iter()
            .filter(|r| r.kind == RTM_NEWROUTE)
            .filter_map(|r| parse_rule(&r.payload))
            .collect())
    }

    /// How many rules identical to `rule` exist.
    fn count(&mut self, rule: &Rule) -> Result<usize, GatewayError> {
        Ok(self
            .list()?
            .iter()
            .filter(|l| !l.foreign && l.rule.same_as(rule))
            .count())
    }

    /// Adds `rule` unless an identical one exists; returns whether it was added.
    ///
    /// Not atomic: see the module documentation on serialising changes.
    pub fn add(&mut self, rule: &Rule) -> Result<bool, GatewayError> {
        Ok(self.add_missing(std::slice::from_ref(rule))? == 1)
    }

    /// Adds each of `rules` that has no identical rule yet, listing the namespace's rules once
    /// rather than once per rule (a member joining a bus of n adds 2·(n−1) rules or more); returns
    /// how many were added.
    ///
    /// Not atomic: see the module documentation on serialising changes.
    pub fn add_missing(&mut self, rules: &[Rule]) -> Result<usize, GatewayError> {
        let listed = self.list()?;
        let to_add = missing(&listed, rules);
        for rule in &to_add {
            let mut msg = rule_message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_ACK, rule);
            self.sock.transact(&mut msg).map_err(|e| {
                self.error(format!("adding CAN gateway rule {rule}"), e, Some(rule))
            })?;
        }
        Ok(to_add.len())
    }

    /// Deletes every rule identical to `rule`; returns whether there was one.
    ///
    /// Not atomic: see the module documentation on serialising changes.
    pub fn delete(&mut self, rule: &Rule) -> Result<bool, GatewayError> {
        let present = self.count(rule)?;
        let mut deleted = 0;
        for _ in 0..present {
            if self.delete_one(rule)? {
                deleted += 1;
            }
        }
        Ok(deleted > 0)
    }

    /// Sends one `RTM_DELROUTE`, which removes the first identical rule; false if there was none
    /// (can-gw answers EINVAL, not ENOENT, when nothing matches).
    fn delete_one(&mut self, rule: &Rule) -> Result<bool, GatewayError> {
        let mut msg = rule_message(RTM_DELROUTE, NLM_F_ACK, rule);
        match self.sock.transact(&mut msg) {
            Ok(_) => Ok(true),
            Err(e) if netlink::errno(&e) == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(self.error(format!("deleting CAN gateway rule {rule}"), e, None)),
        }
    }

    /// Deletes every rule that forwards from or to `ifindex` (a member leaving the bus); returns how
    /// many were deleted. Rules the plugin did not make ([`ListedRule::foreign`]) are left alone.
    ///
    /// Deleting the interface itself has the same effect, done by the kernel. Not atomic: see the
    /// module documentation on serialising changes.
    pub fn delete_interface(&mut self, ifindex: u32) -> Result<usize, GatewayError> {
        let listed = self.list()?;
        let mut deleted = 0;
        for rule in touching(&listed, ifindex) {
            if self.delete_one(&rule)? {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes every rule in the namespace, including ones the plugin did not make.
    pub fn flush(&mut self) -> Result<(), GatewayError> {
        // Both interface indexes 0 is can-gw's "remove all" request.
        let mut msg = rule_message(RTM_DELROUTE, NLM_F_ACK, &Rule::classic(0, 0));
        self.sock
            .transact(&mut msg)
            .map(|_| ())
            .map_err(|e| self.error("flushing CAN gateway rules".into(), e, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CGW_LIM_HOPS`, which the plugin never sets.
    const CGW_LIM_HOPS: u16 = 13;

    /// Encodes a dumped rule the way can-gw's cgw_put_job does.
    fn dumped(flags: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut payload = rtcanmsg(CGW_TYPE_CAN_CAN, flags).to_vec();
        for (kind, data) in attrs {
            payload.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            payload.extend_from_slice(&kind.to_ne_bytes());
            payload.extend_from_slice(data);
            payload.resize((payload.len() + 3) & !3, 0);
        }
        payload
    }

    #[test]
    fn the_plugins_rules_set_iif_tx_ok_and_nothing_else() {
        assert_eq!(Rule::classic(2, 3).flags(), CGW_FLAGS_CAN_IIF_TX_OK);
        assert_eq!(
            Rule::can_fd(2, 3).flags(),
            CGW_FLAGS_CAN_IIF_TX_OK | CGW_FLAGS_CAN_FD
        );
        let rule = Rule {
            echo: true,
            src_tstamp: true,
            ..Rule::classic(2, 3)
        };
        assert_eq!(rule.flags(), KNOWN_FLAGS & !CGW_FLAGS_CAN_FD);
    }

    #[test]
    fn a_rule_request_round_trips_through_the_dump_parser() {
        let rule = Rule::can_fd(4, 7).with_filter(0x123, 0x7FF);
        let attrs = rule_attrs(&rule);
        assert_eq!(
            attrs,
            [
                (
                    CGW_FILTER,
                    [0x123u32.to_ne_bytes(), 0x7FFu32.to_ne_bytes()].concat()
                ),
                (CGW_SRC_IF, 4u32.to_ne_bytes().to_vec()),
                (CGW_DST_IF, 7u32.to_ne_bytes().to_vec()),
            ]
        );
        let listed = parse_rule(&dumped(rule.flags(), &attrs)).expect("parses");
        assert_eq!(listed.rule, rule);
        assert!(!listed.foreign);
        assert_eq!(listed.counters, Counters::default());
    }

    #[test]
    fn dumped_rules_report_counters_and_foreign_settings() {
        let listed = parse_rule(&dumped(
            CGW_FLAGS_CAN_IIF_TX_OK,
            &[
                (CGW_HANDLED, 5u32.to_ne_bytes().to_vec()),
                (CGW_DROPPED, 1u32.to_ne_bytes().to_vec()),
                (CGW_SRC_IF, 2u32.to_ne_bytes().to_vec()),
                (CGW_DST_IF, 3u32.to_ne_bytes().to_vec()),
            ],
        ))
        .expect("parses");
        assert_eq!(listed.rule, Rule::classic(2, 3));
        assert_eq!(
            listed.counters,
            Counters {
                handled: 5,
                dropped: 1,
                deleted: 0
            }
        );
        assert!(!listed.foreign);

        let hops = parse_rule(&dumped(
            CGW_FLAGS_CAN_IIF_TX_OK,
            &[
                (CGW_LIM_HOPS, vec![1]),
                (CGW_SRC_IF, 2u32.to_ne_bytes().to_vec()),
                (CGW_DST_IF, 3u32.to_ne_bytes().to_vec()),
            ],
        ))
        .expect("parses");
        assert!(hops.foreign, "a hop limit is not the plugin's");
        let unknown_flag = parse_rule(&dumped(0x40, &[])).expect("parses");
        assert!(unknown_flag.foreign);
    }

    #[test]
    fn other_families_routes_are_not_rules() {
        // What a dump returns for AF_INET when can-gw is missing: struct rtmsg, family 2.
        assert!(parse_rule(&[2, 32, 0, 0, 254, 0, 1, 0, 0, 0, 0, 0]).is_none());
        assert!(parse_rule(&[AF_CAN]).is_none());
    }

    #[test]
    fn a_zero_filter_is_no_filter() {
        let plain = Rule::classic(2, 3);
        assert!(plain.same_as(&plain.with_filter(0, 0)));
        assert!(!plain.same_as(&plain.with_filter(0x123, 0x7FF)));
        assert!(!plain.same_as(&Rule::can_fd(2, 3)));
        assert!(
            rule_attrs(&plain.with_filter(0, 0))
                .iter()
                .all(|(kind, _)| *kind != CGW_FILTER)
        );
    }

    fn listed(rule: Rule, foreign: bool) -> ListedRule {
        ListedRule {
            rule,
            counters: Counters::default(),
            foreign,
        }
    }

    #[test]
    fn only_missing_rules_are_added_and_each_once() {
        let present = [
            listed(Rule::classic(2, 3), false),
            // Stored by the kernel without a filter: the same rule as a zero filter.
            listed(Rule::classic(2, 4), false),
            // Someone else's: the plugin's own rule is still missing.
            listed(Rule::classic(3, 2), true),
        ];
        let wanted = [
            Rule::classic(2, 3),
            Rule::classic(2, 4).with_filter(0, 0),
            Rule::classic(3, 2),
            Rule::can_fd(2, 3),
            Rule::classic(3, 2),
            Rule::classic(4, 2).with_filter(0x123, 0x7FF),
            Rule::classic(4, 2).with_filter(0x123, 0x7FF),
            Rule::classic(4, 2).with_filter(0x124, 0x7FF),
        ];
        assert_eq!(
            missing(&present, &wanted),
            [
                Rule::classic(3, 2),
                Rule::can_fd(2, 3),
                Rule::classic(4, 2).with_filter(0x123, 0x7FF),
                Rule::classic(4, 2).with_filter(0x124, 0x7FF),
            ]
        );
        assert!(missing(&present, &[]).is_empty());
    }

    #[test]
    fn missing_rules_of_a_large_bus_are_found_in_linear_time() {
        // 300 members with 8 filters each: 717,600 rules on the bus, of which a joining member
        // wants 2·299·8 = 4,784. A pairwise scan would make 3.4·10^9 comparisons (over a minute
        // in a debug build); the hash sets take about a second there.
        let ends: Vec<u32> = (2..302).collect();
        let filters: Vec<Filter> = (0..8)
            .map(|i| Filter {
                id: 0x100 + i,
                mask: 0x7FF,
            })
            .collect();
        let with_filters = |rules: Vec<Rule>| -> Vec<Rule> {
            rules
                .into_iter()
                .flat_map(|r| filters.iter().map(move |f| r.with_filter(f.id, f.mask)))
                .collect()
        };
        let all = with_filters(mesh(&ends, CanMtu::Classic));
        let newcomer = 301;
        let (wanted, present): (Vec<Rule>, Vec<Rule>) = all
            .into_iter()
            .partition(|r| r.src_ifindex == newcomer || r.dst_ifindex == newcomer);
        let present: Vec<ListedRule> = present.into_iter().map(|r| listed(r, false)).collect();
        let started = std::time::Instant::now();
        let to_add = missing(&present, &wanted);
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
        assert_eq!(to_add, wanted);
        let everything: Vec<Rule> = present.iter().map(|l| l.rule).collect();
        assert!(missing(&present, &everything).is_empty());
    }

    #[test]
    fn a_leaving_interface_takes_every_copy_of_its_own_rules_only() {
        let present = [
            listed(Rule::classic(2, 3), false),
            listed(Rule::classic(2, 3), false),
            listed(Rule::classic(3, 4), false),
            listed(Rule::can_fd(4, 2).with_filter(0x123, 0x7FF), false),
            listed(Rule::classic(4, 2), true),
        ];
        assert_eq!(
            touching(&present, 2),
            [
                Rule::classic(2, 3),
                Rule::classic(2, 3),
                Rule::can_fd(4, 2).with_filter(0x123, 0x7FF)
            ]
        );
        assert!(touching(&present, 9).is_empty());
    }

    #[test]
    fn a_mesh_joins_every_end_to_every_other_once_per_frame_kind() {
        let classic = mesh(&[2, 3, 4], CanMtu::Classic);
        assert_eq!(classic.len(), 6);
        assert!(classic.iter().all(|r| r.src_ifindex != r.dst_ifindex));
        assert!(classic.iter().all(|r| r.iif_tx_ok && !r.fd && !r.echo));
        let fd = mesh(&[2, 3, 4], CanMtu::Fd);
        assert_eq!(fd.len(), 12);
        assert_eq!(fd.iter().filter(|r| r.fd).count(), 6);
        assert!(mesh(&[2], CanMtu::Fd).is_empty());
    }

    #[test]
    fn rules_read_well_in_messages() {
        assert_eq!(
            Rule::can_fd(2, 3).with_filter(0x123, 0x7FF).to_string(),
            "ifindex 2 -> ifindex 3 (CAN FD, iif-tx-ok, filter 123:7FF)"
        );
        assert!(
            GatewayError::NotLoaded
                .to_string()
                .contains("modprobe can-gw")
        );
    }

    #[test]
    fn without_can_gw_opening_says_to_load_it() {
        // Development hosts have no CAN in their kernel; where can-gw is loaded, opening works.
        match Gateway::open(&Netns::Pid(std::process::id())) {
            Err(GatewayError::NotLoaded) => {}
            Ok(mut gw) => {
                gw.list().expect("list");
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
