//! vxcan pairs: virtual CAN tunnels between two network namespaces, managed over rtnetlink.
//!
//! A vxcan pair is two CAN interfaces joined back to back: a frame sent on one end is received on
//! the other end (and, as on any CAN interface, once by listeners on the sending end as the local
//! echo). For a CAN bus shared between pods, each member pod gets one end of a pair and the other
//! end lives in a namespace the plugin owns per bus, where [`crate::kernel::cangw`] rules join the bus
//! ends.
//!
//! Both ends are created by a single `RTM_NEWLINK` sent in the first end's namespace whose
//! `VXCAN_INFO_PEER` names the peer, its MTU and its namespace (`IFLA_NET_NS_FD`), so a pair never
//! exists half-made. Deleting either end deletes both (the driver's dellink unregisters the peer),
//! and so does destroying either namespace — a pod that goes away takes its bus end with it, and
//! the kernel drops every can-gw rule that used that interface.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::kernel::link::{self, CanMtu, LinkError, Links, ifinfomsg, validate_name};
use crate::kernel::netlink::{
    self, IFF_UP, IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND, IFLA_LINK, IFLA_LINK_NETNSID,
    IFLA_LINKINFO, IFLA_MTU, IFLA_NET_NS_FD, Message, NETNSA_FD, NETNSA_NSID, NLM_F_ACK,
    NLM_F_CREATE, NLM_F_EXCL, RTM_DELLINK, RTM_GETLINK, RTM_GETNSID, RTM_NEWLINK, RTM_NEWNSID,
    Socket, VXCAN_INFO_PEER,
};
use crate::kernel::netns::{self, Netns, NetnsError};

const KIND: &str = "vxcan";

/// A vxcan pair to create: `name` in the namespace the request is made for, `peer_name` in the
/// peer namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VxcanSpec {
    /// Name of the end in the first namespace (e.g. the pod's `can0`).
    pub name: String,
    /// Name of the end in the peer namespace (e.g. the bus namespace's `busA1`).
    pub peer_name: String,
    /// Classic or FD, applied to both ends.
    pub mtu: CanMtu,
}

/// A pair as it exists after [`ensure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxcanPair {
    /// Name of the first end.
    pub name: String,
    /// Interface index of the first end, in its namespace.
    pub index: u32,
    /// Name of the peer end.
    pub peer_name: String,
    /// Interface index of the peer end, in the peer namespace (what can-gw rules there use).
    pub peer_index: u32,
    /// The MTU both ends have.
    pub mtu: CanMtu,
}

/// One vxcan end as its own namespace reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxcanEnd {
    /// Interface index, unique only within its namespace.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Link kind; `vxcan` for an end ([`find`] returns other kinds too, so callers can tell a name
    /// clash from a missing interface).
    pub kind: String,
    /// MTU in bytes.
    pub mtu: u32,
    /// Whether the interface is administratively up.
    pub up: bool,
    /// The peer's interface index, in the peer's namespace (`IFLA_LINK`).
    pub peer_index: Option<u32>,
    /// The peer's namespace as this namespace numbers it (`IFLA_LINK_NETNSID`); `None` when the
    /// peer is in the same namespace.
    pub peer_netnsid: Option<i32>,
}

/// What went wrong managing vxcan pairs, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VxcanError {
    /// A namespace could not be entered, a name is invalid or taken, or a netlink request failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The kernel has no vxcan driver.
    #[error(
        "this kernel cannot create vxcan interfaces: load the module on the node with `modprobe \
         vxcan` (on Ubuntu it ships in linux-modules-extra-$(uname -r))"
    )]
    VxcanUnsupported,
    /// Both ends were asked for in the same namespace.
    #[error(
        "both ends of vxcan {name:?} would be in {ns}: a pair joins two different network \
         namespaces"
    )]
    SameNamespace {
        /// The first end's name.
        name: String,
        /// The namespace.
        ns: String,
    },
    /// The first end's name belongs to another interface in its namespace: a link of another kind
    /// (such as a private vcan) or a vxcan pair leading elsewhere (such as another bus's). Unlike
    /// [`VxcanError::Conflict`], nothing about the requested pair exists there.
    #[error(
        "interface name {name:?} in {ns} is taken by {holder}, not by the requested pair: choose \
         another name"
    )]
    NameInUse {
        /// The first end's name.
        name: String,
        /// The first end's namespace.
        ns: String,
        /// What holds the name, e.g. "a vcan interface".
        holder: String,
    },
    /// The requested pair exists but differs (MTU, the peer's name): a vxcan of that name whose
    /// peer is in the requested namespace.
    #[error(
        "vxcan {name:?} already exists in {ns} but {reason}: delete it (deleting one end deletes \
         both) or request the pair as it is"
    )]
    Conflict {
        /// The first end's name.
        name: String,
        /// The first end's namespace.
        ns: String,
        /// How the existing pair differs.
        reason: String,
    },
}

impl From<NetnsError> for VxcanError {
    fn from(e: NetnsError) -> Self {
        VxcanError::Link(LinkError::Netns(e))
    }
}

fn netlink_error(op: &'static str, name: &str, ns: &str, source: io::Error) -> LinkError {
    LinkError::Netlink {
        op,
        name: name.to_string(),
        ns: ns.to_string(),
        source,
    }
}

/// Appends one attribute to a raw byte buffer (for `VXCAN_INFO_PEER`, whose payload starts with a
/// fixed header that [`Message`] cannot nest).
fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize((buf.len() + 3) & !3, 0);
}

/// The `VXCAN_INFO_PEER` payload: the peer's ifinfomsg, name, MTU and namespace.
///
/// The peer's ifinfomsg carries no IFF_UP: the driver configures the peer before it cross-links the
/// two ends, so opening the peer at that point fails with ENOTCONN and the whole request with it.
/// The peer is brought up by a second request in its own namespace.
fn peer_info(peer_name: &str, mtu: CanMtu, peer_ns_fd: i32) -> Vec<u8> {
    let mut buf = ifinfomsg(0, 0, 0).to_vec();
    let mut name = peer_name.as_bytes().to_vec();
    name.push(0);
    push_attr(&mut buf, IFLA_IFNAME, &name);
    push_attr(&mut buf, IFLA_MTU, &mtu.bytes().to_ne_bytes());
    push_attr(&mut buf, IFLA_NET_NS_FD, &(peer_ns_fd as u32).to_ne_bytes());
    buf
}

fn parse_end(payload: &[u8]) -> Option<VxcanEnd> {
    let (mut peer_index, mut peer_netnsid) = (None, None);
    let link = link::parse_link_with(payload, |kind, data| match kind {
        IFLA_LINK => peer_index = netlink::attr_u32(data),
        IFLA_LINK_NETNSID => peer_netnsid = netlink::attr_u32(data).map(|v| v as i32),
        _ => {}
    })?;
    Some(VxcanEnd {
        index: link.index,
        name: link.name,
        kind: link.kind,
        mtu: link.mtu,
        up: link.up,
        peer_index,
        peer_netnsid,
    })
}

/// Looks an interface up by name (`index == 0`) or by index.
fn lookup(
    sock: &mut Socket,
    ns: &str,
    name: &str,
    index: u32,
) -> Result<Option<VxcanEnd>, LinkError> {
    let mut msg = Message::new(RTM_GETLINK, NLM_F_ACK, &ifinfomsg(index, 0, 0));
    if index == 0 {
        msg.attr_str(IFLA_IFNAME, name);
    }
    match sock.transact(&mut msg) {
        Ok(replies) => Ok(replies
            .iter()
            .filter(|r| r.kind == RTM_NEWLINK)
            .find_map(|r| parse_end(&r.payload))),
        Err(e) if netlink::errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink_error("looking up", name, ns, e)),
    }
}

/// The id this socket's namespace gives the namespace open as `file`, if it has given it one.
fn nsid_of(sock: &mut Socket, ns: &str, file: &File) -> Result<Option<i32>, LinkError> {
    // struct rtgenmsg: one family byte, padded to 4 by Message.
    let mut msg = Message::new(RTM_GETNSID, NLM_F_ACK, &[libc::AF_UNSPEC as u8]);
    msg.attr_u32(NETNSA_FD, file.as_raw_fd() as u32);
    let replies = sock
        .transact(&mut msg)
        .map_err(|e| netlink_error("looking up the peer namespace's id", "", ns, e))?;
    Ok(replies
        .iter()
        .filter(|r| r.kind == RTM_NEWNSID)
        .flat_map(|r| netlink::attrs(r.payload.get(4..).unwrap_or_default()))
        .find(|(kind, _)| *kind == NETNSA_NSID)
        .and_then(|(_, data)| netlink::attr_u32(data))
        .map(|v| v as i32)
        .filter(|id| *id >= 0))
}

fn set_up(sock: &mut Socket, ns: &str, end: &VxcanEnd) -> Result<(), LinkError> {
    let mut msg = Message::new(
        RTM_NEWLINK,
        NLM_F_ACK,
        &ifinfomsg(end.index, IFF_UP, IFF_UP),
    );
    sock.transact(&mut msg)
        .map(|_| ())
        .map_err(|e| netlink_error("bringing up", &end.name, ns, e))
}

fn open_ns_file(ns: &Netns) -> Result<File, NetnsError> {
    File::open(ns.path()).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            NetnsError::NotFound(ns.to_string())
        } else {
            NetnsError::Open {
                ns: ns.to_string(),
                source,
            }
        }
    })
}

fn mtu_name(mtu: u32) -> String {
    CanMtu::from_bytes(mtu)
        .map(|m| m.to_string())
        .unwrap_or_else(|| format!("MTU {mtu}"))
}

/// Returns the interface `name` in `ns` (of any kind: check [`VxcanEnd::kind`]), if there is one.
pub fn find(ns: &Netns, name: &str) -> Result<Option<VxcanEnd>, VxcanError> {
    validate_name(name)?;
    let mut links = Links::open(ns)?;
    let (sock, ns_name) = links.raw();
    Ok(lookup(sock, ns_name, name, 0)?)
}

/// Creates the vxcan pair `spec` — `spec.name` in `ns`, `spec.peer_name` in `peer_ns` — and brings
/// both ends up; succeeds without changes if exactly that pair exists.
///
/// An existing pair is accepted only if its first end is a vxcan whose peer is `spec.peer_name` in
/// `peer_ns` and both ends have the requested MTU; anything else is an error rather than a
/// silent repair, because the kernel changes a vxcan's MTU only while the end is down, which would
/// interrupt the pod using it. When `spec.name` in `ns` is some other interface altogether (not a
/// vxcan, or one whose peer is not in `peer_ns`) the error is [`VxcanError::NameInUse`], so callers
/// can tell the user to pick another name.
pub fn ensure(ns: &Netns, peer_ns: &Netns, spec: &VxcanSpec) -> Result<VxcanPair, VxcanError> {
    validate_name(&spec.name)?;
    validate_name(&spec.peer_name)?;
    // Opening both first reports a missing namespace by its path before anything is created.
    let mut here = Links::open(ns)?;
    let mut there = Links::open(peer_ns)?;
    let peer_file = open_ns_file(peer_ns)?;
    let same = netns::inode(&ns.path())
        .and_then(|a| Ok(a == netns::inode(&peer_ns.path())?))
        .map_err(|source| NetnsError::Open {
            ns: peer_ns.to_string(),
            source,
        })?;
    if same {
        return Err(VxcanError::SameNamespace {
            name: spec.name.clone(),
            ns: ns.to_string(),
        });
    }

    let (sock, ns_name) = here.raw();
    let existing = lookup(sock, ns_name, &spec.name, 0)?;
    let end = match existing {
        Some(end) => end,
        None => {
            check_peer_name_free(&mut there, spec)?;
            let mut msg = new_pair(spec, peer_file.as_raw_fd());
            match sock.transact(&mut msg) {
                Ok(_) => {}
                // Someone created one of the names between our lookups and our request; what
                // exists now is judged below like any existing interface.
                Err(e) if netlink::errno(&e) == Some(libc::EEXIST) => {}
                Err(e) if netlink::errno(&e) == Some(libc::EOPNOTSUPP) => {
                    return Err(VxcanError::VxcanUnsupported);
                }
                Err(e) => {
                    return Err(netlink_error("creating vxcan pair", &spec.name, ns_name, e).into());
                }
            }
            match lookup(sock, ns_name, &spec.name, 0)? {
                Some(end) => end,
                None => {
                    // EEXIST without our name here: the peer's name was taken meanwhile.
                    check_peer_name_free(&mut there, spec)?;
                    return Err(netlink_error(
                        "creating vxcan pair",
                        &spec.name,
                        ns_name,
                        io::Error::other("the interface vanished right after it was created"),
                    )
                    .into());
                }
            }
        }
    };
    adopt(&mut here, &mut there, peer_ns, &peer_file, end, spec)
}

/// The `RTM_NEWLINK` request for pair `spec`, its peer going to the namespace `peer_ns_fd`; the
/// first end comes up with it (see [`peer_info`] for the peer).
fn new_pair(spec: &VxcanSpec, peer_ns_fd: i32) -> Message {
    let mut msg = Message::new(
        RTM_NEWLINK,
        NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
        &ifinfomsg(0, IFF_UP, IFF_UP),
    );
    msg.attr_str(IFLA_IFNAME, &spec.name)
        .attr_u32(IFLA_MTU, spec.mtu.bytes())
        .begin_nest(IFLA_LINKINFO)
        .attr_str(IFLA_INFO_KIND, KIND)
        .begin_nest(IFLA_INFO_DATA)
        .attr(
            VXCAN_INFO_PEER,
            &peer_info(&spec.peer_name, spec.mtu, peer_ns_fd),
        )
        .end_nest()
        .end_nest();
    msg
}

/// The error for `name` being an interface of another kind.
fn not_vxcan(name: &str, kind: String, ns: &str) -> VxcanError {
    LinkError::NameTaken {
        name: name.to_string(),
        kind: if kind.is_empty() {
            "non-CAN".into()
        } else {
            kind
        },
        ns: ns.to_string(),
    }
    .into()
}

/// Describes an interface of link kind `kind` for [`VxcanError::NameInUse`].
fn holder_of_kind(kind: &str) -> String {
    match kind {
        "" => "an interface of unknown kind".into(),
        "vcan" => "a vcan interface".into(),
        other => format!("a {other} interface"),
    }
}

/// Whether this node can create vxcan pairs at all (module loaded or loadable, permissions):
/// creates one with both ends in a new, empty namespace that is thrown away with it.
pub fn probe() -> Result<(), VxcanError> {
    netns::run_in_new(|| -> Result<(), VxcanError> {
        let ns_name = "a throw-away namespace";
        // The peer goes to this same namespace: the fd of the calling thread's namespace.
        let own = File::open("/proc/thread-self/ns/net").map_err(|source| NetnsError::Open {
            ns: ns_name.into(),
            source,
        })?;
        let mut sock = Socket::open(libc::NETLINK_ROUTE)
            .map_err(|e| netlink_error("probing", "", ns_name, e))?;
        let spec = VxcanSpec {
            name: "vxprobe0".into(),
            peer_name: "vxprobe1".into(),
            mtu: CanMtu::Fd,
        };
        match sock.transact(&mut new_pair(&spec, own.as_raw_fd())) {
            Ok(_) => Ok(()),
            Err(e) if netlink::errno(&e) == Some(libc::EOPNOTSUPP) => {
                Err(VxcanError::VxcanUnsupported)
            }
            Err(e) => Err(netlink_error("creating a vxcan pair", "vxprobe0", ns_name, e).into()),
        }
    })?
}

/// Fails if the peer's name is taken in the peer namespace (creating would fail with a bare
/// EEXIST that does not say which of the two names clashed).
fn check_peer_name_free(there: &mut Links, spec: &VxcanSpec) -> Result<(), VxcanError> {
    let (sock, ns_name) = there.raw();
    match lookup(sock, ns_name, &spec.peer_name, 0)? {
        None => Ok(()),
        Some(other) => Err(LinkError::NameTaken {
            name: spec.peer_name.clone(),
            kind: if other.kind.is_empty() {
                "non-CAN".into()
            } else {
                other.kind
            },
            ns: ns_name.to_string(),
        }
        .into()),
    }
}

/// Accepts an existing first end if it is exactly the requested pair, bringing both ends up.
fn adopt(
    here: &mut Links,
    there: &mut Links,
    peer_ns: &Netns,
    peer_file: &File,
    end: VxcanEnd,
    spec: &VxcanSpec,
) -> Result<VxcanPair, VxcanError> {
    let (sock, ns_name) = here.raw();
    let conflict = |reason: String| VxcanError::Conflict {
        name: spec.name.clone(),
        ns: ns_name.to_string(),
        reason,
    };
    let in_use = |holder: String| VxcanError::NameInUse {
        name: spec.name.clone(),
        ns: ns_name.to_string(),
        holder,
    };
    if end.kind != KIND {
        return Err(in_use(holder_of_kind(&end.kind)));
    }
    // Interface indexes repeat across namespaces, so the peer's index alone does not identify it:
    // the end's IFLA_LINK_NETNSID must be the id this namespace gives the requested peer namespace.
    // (Reporting the end allocated that id if it had none, so asking now finds it.)
    let expected_nsid = nsid_of(sock, ns_name, peer_file)?;
    match (end.peer_netnsid, expected_nsid) {
        (Some(have), Some(want)) if have == want => {}
        (None, _) => {
            return Err(in_use(
                "a vxcan pair whose other end is in the same namespace".into(),
            ));
        }
        _ => {
            return Err(in_use(format!(
                "a vxcan pair whose other end is in another namespace, not {peer_ns}"
            )));
        }
    }
    let Some(peer_index) = end.peer_index else {
        return Err(conflict("it has no peer".into()));
    };
    let (peer_sock, peer_ns_name) = there.raw();
    let peer = lookup(peer_sock, peer_ns_name, "", peer_index)?;
    let peer = match peer {
        Some(p)
            if p.name == spec.peer_name && p.kind == KIND && p.peer_index == Some(end.index) =>
        {
            p
        }
        Some(p) => {
            return Err(conflict(format!(
                "its peer in {peer_ns} is {:?}, not {:?}",
                p.name, spec.peer_name
            )));
        }
        None => return Err(conflict(format!("its peer is missing from {peer_ns}"))),
    };
    let wanted = spec.mtu.bytes();
    if end.mtu != wanted || peer.mtu != wanted {
        return Err(conflict(format!(
            "its ends are {} and {} while {} was requested (a vxcan's MTU changes only while it \
             is down)",
            mtu_name(end.mtu),
            mtu_name(peer.mtu),
            spec.mtu
        )));
    }
    if !end.up {
        set_up(sock, ns_name, &end)?;
    }
    if !peer.up {
        set_up(peer_sock, peer_ns_name, &peer)?;
    }
    Ok(VxcanPair {
        name: end.name,
        index: end.index,
        peer_name: peer.name,
        peer_index: peer.index,
        mtu: spec.mtu,
    })
}

/// Deletes the vxcan end `name` in `ns` — and with it its peer, wherever that is; returns whether
/// it existed. Refuses to delete other kinds of link.
pub fn delete(ns: &Netns, name: &str) -> Result<bool, VxcanError> {
    validate_name(name)?;
    let mut links = Links::open(ns)?;
    let (sock, ns_name) = links.raw();
    let Some(end) = lookup(sock, ns_name, name, 0)? else {
        return Ok(false);
    };
    if end.kind != KIND {
        return Err(not_vxcan(name, end.kind, ns_name));
    }
    let mut msg = Message::new(RTM_DELLINK, NLM_F_ACK, &ifinfomsg(end.index, 0, 0));
    match sock.transact(&mut msg) {
        Ok(_) => Ok(true),
        // Deleted meanwhile, for instance through its peer.
        Err(e) if netlink::errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(netlink_error("deleting vxcan", name, ns_name, e).into()),
    }
}

impl fmt::Display for VxcanPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vxcan {} (ifindex {}) <-> {} (ifindex {}), {}",
            self.name, self.index, self.peer_name, self.peer_index, self.mtu
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::mpsc;

    /// A thread parked in a fresh network namespace, named by its /proc path; the namespace goes
    /// away when the thread exits (on drop).
    struct ThreadNetns {
        ns: Netns,
        stop: mpsc::Sender<()>,
        handle: Option<std::thread::JoinHandle<()>>,
    }

    impl ThreadNetns {
        fn new() -> Self {
            let (ready_tx, ready_rx) = mpsc::channel();
            let (stop, stop_rx) = mpsc::channel::<()>();
            let handle = std::thread::spawn(move || {
                // SAFETY: unshare only changes this thread's network namespace.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                ready_tx
                    .send((rc, tid))
                    .expect("the test waits for the thread");
                let _ = stop_rx.recv();
            });
            let (rc, tid) = ready_rx.recv().expect("thread reports");
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET) needs root");
            ThreadNetns {
                ns: Netns::Path(PathBuf::from(format!(
                    "/proc/{}/task/{tid}/ns/net",
                    std::process::id()
                ))),
                stop,
                handle: Some(handle),
            }
        }
    }

    impl Drop for ThreadNetns {
        fn drop(&mut self) {
            let _ = self.stop.send(());
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }

    fn spec() -> VxcanSpec {
        VxcanSpec {
            name: "can0".into(),
            peer_name: "busA1".into(),
            mtu: CanMtu::Fd,
        }
    }

    #[test]
    fn the_peer_payload_is_an_ifinfomsg_followed_by_attributes() {
        let buf = peer_info("busA1", CanMtu::Classic, 7);
        assert_eq!(&buf[..16], &ifinfomsg(0, 0, 0));
        let attrs: Vec<(u16, Vec<u8>)> = netlink::attrs(&buf[16..])
            .map(|(k, d)| (k, d.to_vec()))
            .collect();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[0].0, IFLA_IFNAME);
        assert_eq!(netlink::attr_string(&attrs[0].1), "busA1");
        assert_eq!(
            (attrs[1].0, netlink::attr_u32(&attrs[1].1)),
            (IFLA_MTU, Some(16))
        );
        assert_eq!(
            (attrs[2].0, netlink::attr_u32(&attrs[2].1)),
            (IFLA_NET_NS_FD, Some(7))
        );
    }

    #[test]
    fn an_end_reports_its_peer() {
        let mut payload = ifinfomsg(4, IFF_UP, 0).to_vec();
        push_attr(&mut payload, IFLA_IFNAME, b"can0\0");
        push_attr(&mut payload, IFLA_MTU, &72u32.to_ne_bytes());
        push_attr(&mut payload, IFLA_LINK, &9u32.to_ne_bytes());
        push_attr(&mut payload, IFLA_LINK_NETNSID, &3i32.to_ne_bytes());
        let mut kind = Vec::new();
        push_attr(&mut kind, IFLA_INFO_KIND, b"vxcan\0");
        push_attr(&mut payload, IFLA_LINKINFO, &kind);
        let end = parse_end(&payload).expect("parses");
        assert_eq!(
            end,
            VxcanEnd {
                index: 4,
                name: "can0".into(),
                kind: "vxcan".into(),
                mtu: 72,
                up: true,
                peer_index: Some(9),
                peer_netnsid: Some(3),
            }
        );
    }

    #[test]
    fn a_name_held_by_another_interface_says_by_what() {
        assert_eq!(holder_of_kind("vcan"), "a vcan interface");
        assert_eq!(holder_of_kind("dummy"), "a dummy interface");
        assert_eq!(holder_of_kind(""), "an interface of unknown kind");
        let err = VxcanError::NameInUse {
            name: "can0".into(),
            ns: "/proc/1/ns/net".into(),
            holder: holder_of_kind("vcan"),
        };
        assert_eq!(
            err.to_string(),
            "interface name \"can0\" in /proc/1/ns/net is taken by a vcan interface, not by the \
             requested pair: choose another name"
        );
    }

    #[test]
    fn a_name_taken_by_another_kind_of_interface_is_in_use() {
        // Found before any pair is made, so this needs no vxcan driver.
        let a = ThreadNetns::new();
        let b = ThreadNetns::new();
        let lo = VxcanSpec {
            name: "lo".into(),
            ..spec()
        };
        let err = ensure(&a.ns, &b.ns, &lo).expect_err("lo is taken");
        assert!(
            matches!(&err, VxcanError::NameInUse { name, holder, .. }
                if name == "lo" && holder == "an interface of unknown kind"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_namespace_is_reported_by_path() {
        let err = ensure(
            &Netns::Path("/var/run/netns/does-not-exist".into()),
            &Netns::Pid(std::process::id()),
            &spec(),
        )
        .expect_err("missing namespace");
        assert!(
            matches!(
                err,
                VxcanError::Link(LinkError::Netns(NetnsError::NotFound(_)))
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("/var/run/netns/does-not-exist"));
    }

    #[test]
    fn bad_names_and_a_single_namespace_are_refused() {
        let own = Netns::Pid(std::process::id());
        let mut bad = spec();
        bad.peer_name = "x123456789abcdef".into();
        let err = ensure(&own, &own, &bad).expect_err("long name");
        assert!(
            matches!(err, VxcanError::Link(LinkError::InvalidName { .. })),
            "{err}"
        );
        let err = ensure(&own, &own, &spec()).expect_err("same namespace");
        assert!(matches!(err, VxcanError::SameNamespace { .. }), "{err}");
    }

    #[test]
    fn without_the_driver_the_error_says_to_load_it() {
        // Development hosts have no CAN in their kernel; on a kernel with vxcan the pair is made.
        let a = ThreadNetns::new();
        let b = ThreadNetns::new();
        match ensure(&a.ns, &b.ns, &spec()) {
            Err(VxcanError::VxcanUnsupported) => {
                let msg = VxcanError::VxcanUnsupported.to_string();
                assert!(msg.contains("modprobe vxcan"), "{msg}");
            }
            Ok(pair) => assert_eq!((pair.name.as_str(), pair.mtu), ("can0", CanMtu::Fd)),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn deleting_refuses_other_kinds_and_ignores_missing() {
        let a = ThreadNetns::new();
        assert!(!delete(&a.ns, "can0").expect("missing is fine"));
        let err = delete(&a.ns, "lo").expect_err("lo is not a vxcan");
        assert!(
            matches!(err, VxcanError::Link(LinkError::NameTaken { .. })),
            "{err}"
        );
        assert!(find(&a.ns, "lo").expect("find").is_some());
    }
}
