//! vcan interfaces inside a network namespace, managed over rtnetlink.
//!
//! [`Links`] holds a route socket opened inside the target namespace (see [`crate::kernel::netns`]); every
//! request on it acts on that namespace only, whichever thread sends it.

use std::fmt;
use std::io;

use crate::kernel::netlink::{
    self, IFF_UP, IFLA_IFNAME, IFLA_INFO_KIND, IFLA_LINKINFO, IFLA_MTU, Message, NLM_F_ACK,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, RTM_DELLINK, RTM_GETLINK, RTM_NEWLINK, Socket,
};
use crate::kernel::netns::{self, Netns, NetnsError};

/// Longest interface name the kernel accepts (IFNAMSIZ minus the terminating NUL).
pub const MAX_NAME_LEN: usize = 15;

/// The MTU of a vcan interface, which decides the frames it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CanMtu {
    /// Classic CAN only: `struct can_frame`, 16 bytes.
    Classic,
    /// CAN FD capable (classic frames too): `struct canfd_frame`, 72 bytes.
    Fd,
}

impl CanMtu {
    /// The MTU in bytes.
    pub const fn bytes(self) -> u32 {
        match self {
            CanMtu::Classic => 16,
            CanMtu::Fd => 72,
        }
    }

    /// The mode an MTU stands for, if it is one of the two vcan accepts.
    pub const fn from_bytes(mtu: u32) -> Option<Self> {
        match mtu {
            16 => Some(CanMtu::Classic),
            72 => Some(CanMtu::Fd),
            _ => None,
        }
    }
}

impl fmt::Display for CanMtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CanMtu::Classic => write!(f, "classic CAN (MTU 16)"),
            CanMtu::Fd => write!(f, "CAN FD (MTU 72)"),
        }
    }
}

/// A vcan interface to create.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VcanSpec {
    /// Interface name inside the namespace.
    pub name: String,
    /// Classic or FD.
    pub mtu: CanMtu,
}

/// An interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index, unique only within its namespace.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Link kind (`vcan`, `veth`, …), empty for links without one such as `lo`.
    pub kind: String,
    /// MTU in bytes.
    pub mtu: u32,
    /// Whether the interface is administratively up.
    pub up: bool,
}

/// What went wrong managing links, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The interface name is not one the kernel accepts.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The kernel has no vcan driver.
    #[error(
        "this kernel cannot create vcan interfaces: load the module on the node with `modprobe vcan` \
         (on Ubuntu it ships in linux-modules-extra-$(uname -r))"
    )]
    VcanUnsupported,
    /// The name belongs to an interface that is not a vcan.
    #[error("interface name {name:?} is taken by a {kind} interface in {ns}: choose another name")]
    NameTaken {
        /// The name.
        name: String,
        /// The kind of the existing interface.
        kind: String,
        /// The namespace.
        ns: String,
    },
    /// A vcan of that name exists with another MTU.
    #[error(
        "vcan {name:?} already exists in {ns} as {existing} but {wanted} was requested: delete it or \
         request the same mode"
    )]
    Conflict {
        /// The name.
        name: String,
        /// The namespace.
        ns: String,
        /// What exists, e.g. `MTU 16`.
        existing: String,
        /// What was asked for.
        wanted: CanMtu,
    },
    /// Any other netlink failure.
    #[error("{op} {name:?} in {ns} failed: {source}")]
    Netlink {
        /// The operation.
        op: &'static str,
        /// The interface name.
        name: String,
        /// The namespace.
        ns: String,
        /// The kernel's error.
        source: io::Error,
    },
}

/// Checks `name` against the kernel's rules for interface names (`dev_valid_name`).
pub fn validate_name(name: &str) -> Result<(), LinkError> {
    let invalid = |reason| {
        Err(LinkError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("it is longer than 15 bytes (IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return invalid("`.` and `..` are reserved");
    }
    if name.contains('%') {
        return invalid("`%` would make the kernel pick the name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return invalid("it contains `/`, `:`, whitespace or a control character");
    }
    if !name.is_ascii() {
        return invalid("it contains non-ASCII characters");
    }
    Ok(())
}

/// The fixed `struct ifinfomsg` header.
pub(crate) fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0] = libc::AF_UNSPEC as u8;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

fn parse_link(payload: &[u8]) -> Option<LinkInfo> {
    parse_link_with(payload, |_, _| {})
}

/// Parses an `RTM_NEWLINK` payload, handing every attribute it does not read itself to `other`
/// (for link kinds with attributes of their own, such as vxcan's peer).
pub(crate) fn parse_link_with(
    payload: &[u8],
    mut other: impl FnMut(u16, &[u8]),
) -> Option<LinkInfo> {
    let header = payload.get(..16)?;
    let index = u32::from_ne_bytes(header[4..8].try_into().ok()?);
    let flags = u32::from_ne_bytes(header[8..12].try_into().ok()?);
    let mut info = LinkInfo {
        index,
        name: String::new(),
        kind: String::new(),
        mtu: 0,
        up: flags & IFF_UP != 0,
    };
    for (kind, data) in netlink::attrs(&payload[16..]) {
        match kind {
            IFLA_IFNAME => info.name = netlink::attr_string(data),
            IFLA_MTU => info.mtu = netlink::attr_u32(data).unwrap_or(0),
            IFLA_LINKINFO => {
                for (k, d) in netlink::attrs(data) {
                    if k == IFLA_INFO_KIND {
                        info.kind = netlink::attr_string(d);
                    }
                }
            }
            _ => other(kind, data),
        }
    }
    Some(info)
}

/// The links of one network namespace.
#[derive(Debug)]
pub struct Links {
    sock: Socket,
    ns: String,
}

impl Links {
    /// Opens a handle on the links of `ns`.
    pub fn open(ns: &Netns) -> Result<Self, LinkError> {
        let name = ns.to_string();
        let sock = netns::run(ns, || Socket::open(libc::NETLINK_ROUTE))?.map_err(|source| {
            LinkError::Netlink {
                op: "opening a route socket",
                name: String::new(),
                ns: name.clone(),
                source,
            }
        })?;
        Ok(Links { sock, ns: name })
    }

    /// Opens a handle on the calling thread's own namespace (for inspection, e.g. in tests).
    pub fn current() -> Result<Self, LinkError> {
        let sock = Socket::open(libc::NETLINK_ROUTE).map_err(|source| LinkError::Netlink {
            op: "opening a route socket",
            name: String::new(),
            ns: "the current namespace".into(),
            source,
        })?;
        Ok(Links {
            sock,
            ns: "the current namespace".into(),
        })
    }

    fn error(&self, op: &'static str, name: &str, source: io::Error) -> LinkError {
        LinkError::Netlink {
            op,
            name: name.to_string(),
            ns: self.ns.clone(),
            source,
        }
    }

    /// Every interface in the namespace.
    pub fn list(&mut self) -> Result<Vec<LinkInfo>, LinkError> {
        let mut msg = Message::new(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0));
        let replies = self
            .sock
            .transact(&mut msg)
            .map_err(|e| self.error("listing links", "", e))?;
        Ok(replies
            .iter()
            .filter(|r| r.kind == RTM_NEWLINK)
            .filter_map(|r| parse_link(&r.payload))
            .collect())
    }

    /// The vcan interfaces in the namespace.
    pub fn list_vcan(&mut self) -> Result<Vec<LinkInfo>, LinkError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|l| l.kind == "vcan")
            .collect())
    }

    /// The interface called `name`, if there is one.
    pub fn get(&mut self, name: &str) -> Result<Option<LinkInfo>, LinkError> {
        validate_name(name)?;
        let mut msg = Message::new(RTM_GETLINK, NLM_F_ACK, &ifinfomsg(0, 0, 0));
        msg.attr_str(IFLA_IFNAME, name);
        match self.sock.transact(&mut msg) {
            Ok(replies) => Ok(replies
                .iter()
                .filter(|r| r.kind == RTM_NEWLINK)
                .find_map(|r| parse_link(&r.payload))),
            Err(e) if netlink::errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.error("looking up", name, e)),
        }
    }

    /// Creates the vcan `spec` and brings it up; succeeds if an identical one exists.
    pub fn ensure_vcan(&mut self, spec: &VcanSpec) -> Result<LinkInfo, LinkError> {
        validate_name(&spec.name)?;
        if let Some(existing) = self.get(&spec.name)? {
            return self.adopt(existing, spec);
        }
        let mut msg = Message::new(
            RTM_NEWLINK,
            NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
            &ifinfomsg(0, IFF_UP, IFF_UP),
        );
        msg.attr_str(IFLA_IFNAME, &spec.name)
            .attr_u32(IFLA_MTU, spec.mtu.bytes())
            .begin_nest(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "vcan")
            .end_nest();
        match self.sock.transact(&mut msg) {
            Ok(_) => {}
            // Another request created it between our lookup and our create.
            Err(e) if netlink::errno(&e) == Some(libc::EEXIST) => {}
            Err(e) if netlink::errno(&e) == Some(libc::EOPNOTSUPP) => {
                return Err(LinkError::VcanUnsupported);
            }
            Err(e) => return Err(self.error("creating vcan", &spec.name, e)),
        }
        match self.get(&spec.name)? {
            Some(link) => self.adopt(link, spec),
            None => Err(self.error(
                "creating vcan",
                &spec.name,
                io::Error::other("the interface vanished right after it was created"),
            )),
        }
    }

    /// Accepts an existing interface as `spec` if it matches, bringing it up if needed.
    fn adopt(&mut self, link: LinkInfo, spec: &VcanSpec) -> Result<LinkInfo, LinkError> {
        if link.kind != "vcan" {
            return Err(LinkError::NameTaken {
                name: spec.name.clone(),
                kind: if link.kind.is_empty() {
                    "non-vcan".into()
                } else {
                    link.kind
                },
                ns: self.ns.clone(),
            });
        }
        if link.mtu != spec.mtu.bytes() {
            return Err(LinkError::Conflict {
                name: spec.name.clone(),
                ns: self.ns.clone(),
                existing: CanMtu::from_bytes(link.mtu)
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| format!("MTU {}", link.mtu)),
                wanted: spec.mtu,
            });
        }
        if !link.up {
            let mut msg = Message::new(
                RTM_NEWLINK,
                NLM_F_ACK,
                &ifinfomsg(link.index, IFF_UP, IFF_UP),
            );
            self.sock
                .transact(&mut msg)
                .map_err(|e| self.error("bringing up", &spec.name, e))?;
            return Ok(LinkInfo { up: true, ..link });
        }
        Ok(link)
    }

    /// Deletes the vcan `name`; returns whether it existed. Refuses to delete other kinds of link.
    pub fn delete_vcan(&mut self, name: &str) -> Result<bool, LinkError> {
        let Some(link) = self.get(name)? else {
            return Ok(false);
        };
        if link.kind != "vcan" {
            return Err(LinkError::NameTaken {
                name: name.to_string(),
                kind: link.kind,
                ns: self.ns.clone(),
            });
        }
        let mut msg = Message::new(RTM_DELLINK, NLM_F_ACK, &ifinfomsg(link.index, 0, 0));
        match self.sock.transact(&mut msg) {
            Ok(_) => Ok(true),
            Err(e) if netlink::errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(self.error("deleting", name, e)),
        }
    }
}

/// Access for sibling modules ([`crate::kernel::vxcan`]) that send their own rtnetlink requests in the
/// namespace this handle was opened in.
impl Links {
    /// The route socket and the namespace's name (for error messages).
    pub(crate) fn raw(&mut self) -> (&mut Socket, &str) {
        (&mut self.sock, &self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernels_rules() {
        for ok in ["vcan0", "can0", "a", "x123456789abcde", "bus-powertrain"] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "x123456789abcdef",
            "a/b",
            "a:b",
            "a b",
            "can%d",
            "é",
        ] {
            let err = validate_name(bad).expect_err(bad);
            assert!(matches!(err, LinkError::InvalidName { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("invalid interface name"));
        }
    }

    #[test]
    fn mtu_modes_map_to_the_kernels_sizes() {
        assert_eq!(CanMtu::Classic.bytes(), 16);
        assert_eq!(CanMtu::Fd.bytes(), 72);
        assert_eq!(CanMtu::from_bytes(72), Some(CanMtu::Fd));
        assert_eq!(CanMtu::from_bytes(1500), None);
    }

    #[test]
    fn the_current_namespace_has_a_loopback() {
        let mut links = Links::current().expect("route socket");
        let all = links.list().expect("dump");
        let lo = all.iter().find(|l| l.name == "lo").expect("lo is listed");
        assert_eq!(lo.index, 1);
        assert!(links.get("lo").expect("get").is_some());
        assert!(links.get("nosuchif0").expect("get").is_none());
    }

    #[test]
    fn deleting_refuses_other_kinds_and_ignores_missing() {
        let mut links = Links::current().expect("route socket");
        assert!(!links.delete_vcan("nosuchif0").expect("missing is fine"));
        let err = links.delete_vcan("lo").expect_err("lo is not a vcan");
        assert!(matches!(err, LinkError::NameTaken { .. }), "{err}");
    }
}
