//! Physical CAN controllers: SocketCAN network interfaces of link kind `can` (SJA1000, M_CAN,
//! Kvaser, PEAK, … — whatever driver is behind them), managed over rtnetlink.
//!
//! Unlike vcans, these interfaces are not created: the driver registers one per controller when
//! it probes the device, in the node's namespace, under a name (`can0`, `can1`, …) that follows
//! probe order and therefore says nothing stable about the hardware. The stable identity is the
//! parent device ([`CanLink::parent_dev`], e.g. the PCI address `0000:00:10.0`), which stays the
//! same wherever the interface moves and whatever it is called.
//!
//! A controller is handed to a pod by moving its interface into the pod's namespace, renamed in
//! the same request ([`move_to`]); destroying that namespace returns it to the node's namespace
//! under the name it had inside, which is why callers should look controllers up by parent device
//! ([`find_by_parent`]) and rename them back ([`rename`]).
//!
//! The kernel refuses bit-timing and mode changes while a controller is up; [`configure`] takes it
//! down for the change and restores its previous state.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::kernel::link::{LinkError, Links, ifinfomsg, validate_name};
use crate::kernel::netlink::{
    self, CAN_CTRLMODE_FD, CAN_CTRLMODE_LISTENONLY, IFF_UP, IFLA_CAN_BERR_COUNTER,
    IFLA_CAN_BITTIMING, IFLA_CAN_CLOCK, IFLA_CAN_CTRLMODE, IFLA_CAN_DATA_BITTIMING,
    IFLA_CAN_RESTART_MS, IFLA_CAN_STATE, IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND,
    IFLA_INFO_XSTATS, IFLA_LINKINFO, IFLA_MTU, IFLA_NET_NS_FD, IFLA_OPERSTATE,
    IFLA_PARENT_DEV_BUS_NAME, IFLA_PARENT_DEV_NAME, IFLA_STATS64, Message, NLM_F_ACK, NLM_F_DUMP,
    RTM_GETLINK, RTM_NEWLINK, Socket,
};
use crate::kernel::netns::{self, Netns, NetnsError};

/// The link kind (`IFLA_INFO_KIND`) of CAN controllers driven by the kernel's CAN device layer.
pub const KIND: &str = "can";

/// The state of a CAN controller (`enum can_state`, linux/can/netlink.h), which follows its
/// error counters as ISO 11898-1 defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CanState {
    /// Both error counters below 96: normal operation.
    ErrorActive,
    /// An error counter at 96 or more: still active, but the bus is degrading.
    ErrorWarning,
    /// An error counter at 128 or more: the controller may no longer signal errors actively.
    ErrorPassive,
    /// Transmit error counter past 255: the controller has left the bus until it is restarted
    /// (automatically after `restart-ms`, if set).
    BusOff,
    /// The interface is down.
    Stopped,
    /// The controller is in a low-power state.
    Sleeping,
}

impl CanState {
    /// The state for the kernel's `IFLA_CAN_STATE` value, if it is one this kernel API defines.
    pub const fn from_raw(value: u32) -> Option<Self> {
        Some(match value {
            0 => CanState::ErrorActive,
            1 => CanState::ErrorWarning,
            2 => CanState::ErrorPassive,
            3 => CanState::BusOff,
            4 => CanState::Stopped,
            5 => CanState::Sleeping,
            _ => return None,
        })
    }

    /// A label for metrics and logs: `error_active`, `error_warning`, `error_passive`, `bus_off`,
    /// `stopped` or `sleeping`.
    pub const fn as_label(self) -> &'static str {
        match self {
            CanState::ErrorActive => "error_active",
            CanState::ErrorWarning => "error_warning",
            CanState::ErrorPassive => "error_passive",
            CanState::BusOff => "bus_off",
            CanState::Stopped => "stopped",
            CanState::Sleeping => "sleeping",
        }
    }
}

impl fmt::Display for CanState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

/// The RFC 2863 operational state of an interface (`IFLA_OPERSTATE`, `IF_OPER_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OperState {
    /// `IF_OPER_UNKNOWN`.
    #[default]
    Unknown,
    /// `IF_OPER_NOTPRESENT`.
    NotPresent,
    /// `IF_OPER_DOWN`.
    Down,
    /// `IF_OPER_LOWERLAYERDOWN`.
    LowerLayerDown,
    /// `IF_OPER_TESTING`.
    Testing,
    /// `IF_OPER_DORMANT`.
    Dormant,
    /// `IF_OPER_UP`.
    Up,
}

impl OperState {
    /// The state for the kernel's value; values this API does not know read as `Unknown`.
    pub const fn from_raw(value: u8) -> Self {
        match value {
            1 => OperState::NotPresent,
            2 => OperState::Down,
            3 => OperState::LowerLayerDown,
            4 => OperState::Testing,
            5 => OperState::Dormant,
            6 => OperState::Up,
            _ => OperState::Unknown,
        }
    }

    /// A label as `ip link` prints it, lower-case: `up`, `down`, `unknown`, ….
    pub const fn as_label(self) -> &'static str {
        match self {
            OperState::Unknown => "unknown",
            OperState::NotPresent => "notpresent",
            OperState::Down => "down",
            OperState::LowerLayerDown => "lowerlayerdown",
            OperState::Testing => "testing",
            OperState::Dormant => "dormant",
            OperState::Up => "up",
        }
    }
}

/// The controller's error counters (`struct can_berr_counter`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BerrCounter {
    /// Transmit error counter.
    pub txerr: u16,
    /// Receive error counter.
    pub rxerr: u16,
}

/// The CAN device layer's event counters (`struct can_device_stats`, `IFLA_INFO_XSTATS`), counted
/// since the driver registered the interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CanDeviceStats {
    /// Bus errors seen.
    pub bus_error: u32,
    /// Changes to error-warning state.
    pub error_warning: u32,
    /// Changes to error-passive state.
    pub error_passive: u32,
    /// Changes to bus-off state.
    pub bus_off: u32,
    /// Arbitrations lost.
    pub arbitration_lost: u32,
    /// Restarts after bus-off.
    pub restarts: u32,
}

/// A bit timing (`struct can_bittiming`): what was asked for and what the kernel computed from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Bittiming {
    /// Bit rate in bit/s.
    pub bitrate: u32,
    /// Sample point in tenths of a percent (875 is 87.5 %).
    pub sample_point: u32,
    /// Time quantum in nanoseconds.
    pub tq: u32,
    /// Propagation segment in time quanta.
    pub prop_seg: u32,
    /// Phase buffer segment 1 in time quanta.
    pub phase_seg1: u32,
    /// Phase buffer segment 2 in time quanta.
    pub phase_seg2: u32,
    /// Synchronisation jump width in time quanta.
    pub sjw: u32,
    /// Bit-rate prescaler.
    pub brp: u32,
}

/// An interface's packet counters (the first fields of `struct rtnl_link_stats64`); for a CAN
/// interface a packet is a frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LinkStats {
    /// Frames received.
    pub rx_packets: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Payload bytes received.
    pub rx_bytes: u64,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Frames dropped on receive.
    pub rx_dropped: u64,
    /// Frames dropped on transmit.
    pub tx_dropped: u64,
}

/// A CAN controller's interface as its namespace's kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CanLink {
    /// Interface index, unique only within its namespace (it can change when the link moves).
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Whether the interface is administratively up (`IFF_UP`).
    pub up: bool,
    /// Operational state.
    pub operstate: OperState,
    /// MTU: 16 for classic CAN, 72 with CAN FD enabled.
    pub mtu: u32,
    /// Bus of the device behind the interface (`pci`, `usb`, `platform`, …), if the kernel says.
    pub parent_bus: Option<String>,
    /// The device behind the interface (`0000:00:10.0`, …): its stable identity.
    pub parent_dev: Option<String>,
    /// Controller state; `None` if the driver does not report it.
    pub state: Option<CanState>,
    /// Error counters; `None` if the driver cannot read them.
    pub berr: Option<BerrCounter>,
    /// The CAN device layer's event counters.
    pub device_stats: Option<CanDeviceStats>,
    /// The configured (arbitration-phase) bit timing; `None` until a bitrate is set.
    pub bittiming: Option<Bittiming>,
    /// The CAN FD data-phase bit timing; `None` unless FD is configured.
    pub data_bittiming: Option<Bittiming>,
    /// The controller's clock in Hz, which decides the bitrates it can reach.
    pub clock_hz: Option<u32>,
    /// Delay before an automatic restart after bus-off, in ms; 0 for none.
    pub restart_ms: u32,
    /// Controller mode flags (`CAN_CTRLMODE_*`).
    pub ctrlmode: u32,
    /// Frame and byte counters of the interface.
    pub stats: Option<LinkStats>,
}

impl CanLink {
    /// Whether the controller only listens (`CAN_CTRLMODE_LISTENONLY`): no ACKs, no frames sent.
    pub fn listen_only(&self) -> bool {
        self.ctrlmode & CAN_CTRLMODE_LISTENONLY != 0
    }

    /// Whether CAN FD is enabled (`CAN_CTRLMODE_FD`).
    pub fn fd(&self) -> bool {
        self.ctrlmode & CAN_CTRLMODE_FD != 0
    }
}

/// How to configure a controller with [`configure`]. The kernel computes the bit timing's
/// segments from the bitrate and sample point, as `ip link set … type can bitrate …` has it do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CanSettings {
    /// Bit rate of the arbitration phase (all of a classic frame), in bit/s.
    pub bitrate: u32,
    /// Sample point in tenths of a percent (875 is 87.5 %); `None` lets the kernel choose (CiA's
    /// recommendation for the bitrate).
    pub sample_point: Option<u32>,
    /// CAN FD data-phase bitrate in bit/s; required exactly when `fd` is set.
    pub data_bitrate: Option<u32>,
    /// Data-phase sample point in tenths of a percent; `None` lets the kernel choose.
    pub data_sample_point: Option<u32>,
    /// Delay before an automatic restart after bus-off, in ms; 0 disables it.
    pub restart_ms: u32,
    /// Listen-only mode: the controller never sends, not even ACKs. Cleared when false.
    pub listen_only: bool,
    /// CAN FD mode. Cleared when false.
    pub fd: bool,
}

impl CanSettings {
    /// Classic CAN at `bitrate` with the kernel's sample point and no automatic restart.
    pub fn classic(bitrate: u32) -> Self {
        CanSettings {
            bitrate,
            sample_point: None,
            data_bitrate: None,
            data_sample_point: None,
            restart_ms: 0,
            listen_only: false,
            fd: false,
        }
    }

    /// Why the kernel would refuse these settings on any controller, if it would.
    fn check(&self) -> Result<(), String> {
        if self.bitrate == 0 {
            return Err("the bitrate is 0".into());
        }
        for (what, sp) in [
            ("sample point", self.sample_point),
            ("data sample point", self.data_sample_point),
        ] {
            if let Some(sp) = sp
                && !(1..1000).contains(&sp)
            {
                return Err(format!(
                    "the {what} {sp} is not between 1 and 999 tenths of a percent"
                ));
            }
        }
        match (self.fd, self.data_bitrate) {
            (true, None) => Err("CAN FD needs a data bitrate".into()),
            (false, Some(_)) => Err("a data bitrate needs CAN FD (set fd)".into()),
            (true, Some(0)) => Err("the data bitrate is 0".into()),
            (false, None) if self.data_sample_point.is_some() => {
                Err("a data sample point needs CAN FD and a data bitrate".into())
            }
            _ => Ok(()),
        }
    }
}

/// What went wrong with a CAN controller, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CanError {
    /// A namespace could not be entered, a name is invalid or taken, or a netlink request failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// No interface with that index or name.
    #[error(
        "no network interface {what} in {ns}: it was removed or moved to another namespace (its \
         index can change when it moves); look the controller up again by its parent device"
    )]
    NotFound {
        /// `ifindex N` or the quoted name.
        what: String,
        /// The namespace.
        ns: String,
    },
    /// The interface is not a CAN controller.
    #[error(
        "{name:?} (ifindex {index}) in {ns} is a {kind} interface, not a CAN controller (link kind \
         `can`): pick a controller from the list of CAN links"
    )]
    NotCan {
        /// The interface's name.
        name: String,
        /// Its index.
        index: u32,
        /// Its link kind, or a description when it has none.
        kind: String,
        /// The namespace.
        ns: String,
    },
    /// The settings contradict themselves.
    #[error("invalid CAN settings for {name:?}: {reason}")]
    InvalidSettings {
        /// The controller's interface name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The controller cannot run at the requested bitrate and sample point.
    #[error(
        "CAN controller {name:?} in {ns} cannot run at {bitrate} bit/s{sample_point} ({phase}): \
         {source}; choose a bitrate its {clock} clock divides into closely (the kernel allows 5 % \
         error), e.g. 125000, 250000, 500000 or 1000000, or another sample point"
    )]
    Bitrate {
        /// The controller's interface name.
        name: String,
        /// The namespace.
        ns: String,
        /// `arbitration phase` or `data phase`, whichever is concerned (the kernel checks the
        /// arbitration phase first).
        phase: &'static str,
        /// The requested bitrate of that phase.
        bitrate: u32,
        /// `, sample point 87.5 %` when one was requested.
        sample_point: String,
        /// The controller's clock, e.g. `8000000 Hz`.
        clock: String,
        /// The kernel's errno and message.
        source: io::Error,
    },
    /// The controller does not support a requested mode.
    #[error(
        "CAN controller {name:?} in {ns} refused {what}: {source}; it does not support that mode \
         (`ip -details link show {name}` lists its ctrlmode_supported)"
    )]
    Unsupported {
        /// The controller's interface name.
        name: String,
        /// The namespace.
        ns: String,
        /// The modes asked for, e.g. `CAN FD, listen-only`.
        what: String,
        /// The kernel's errno and message.
        source: io::Error,
    },
    /// The controller cannot come up before it has a bitrate.
    #[error(
        "cannot bring CAN controller {name:?} in {ns} up: {source}; it has no bitrate yet: \
         configure one first"
    )]
    NotConfigured {
        /// The controller's interface name.
        name: String,
        /// The namespace.
        ns: String,
        /// The kernel's errno and message.
        source: io::Error,
    },
    /// The kernel renames an interface only while it is down.
    #[error("cannot rename {name:?} in {ns} to {new_name:?} while it is up: set it down first")]
    RenameWhileUp {
        /// The current name.
        name: String,
        /// The wanted name.
        new_name: String,
        /// The namespace.
        ns: String,
    },
    /// The name was taken in the target namespace after our check, the kernel moved the
    /// interface without renaming it, and moving it back failed too.
    #[error(
        "{name:?} was moved from {from} to {to} but not renamed to {new_name:?} ({source}), and \
         moving it back failed ({restore}): it is in {to} as {name:?}; move it back with \
         `ip link set {name} netns …` there"
    )]
    StrandedInTarget {
        /// The interface's name, in the target namespace now.
        name: String,
        /// The name that was asked for.
        new_name: String,
        /// The source namespace.
        from: String,
        /// The target namespace.
        to: String,
        /// Why the rename failed.
        source: io::Error,
        /// Why moving back failed.
        restore: io::Error,
    },
}

impl From<NetnsError> for CanError {
    fn from(e: NetnsError) -> Self {
        CanError::Link(LinkError::Netns(e))
    }
}

fn netlink_error(op: &'static str, name: &str, ns: &str, source: io::Error) -> CanError {
    CanError::Link(LinkError::Netlink {
        op,
        name: name.to_string(),
        ns: ns.to_string(),
        source,
    })
}

/// Reads a native-endian u32 at `at`, if `data` is long enough.
fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

fn parse_bittiming(data: &[u8]) -> Option<Bittiming> {
    Some(Bittiming {
        bitrate: u32_at(data, 0)?,
        sample_point: u32_at(data, 4)?,
        tq: u32_at(data, 8)?,
        prop_seg: u32_at(data, 12)?,
        phase_seg1: u32_at(data, 16)?,
        phase_seg2: u32_at(data, 20)?,
        sjw: u32_at(data, 24)?,
        brp: u32_at(data, 28)?,
    })
}

fn parse_berr(data: &[u8]) -> Option<BerrCounter> {
    Some(BerrCounter {
        txerr: u16::from_ne_bytes(data.get(0..2)?.try_into().ok()?),
        rxerr: u16::from_ne_bytes(data.get(2..4)?.try_into().ok()?),
    })
}

fn parse_device_stats(data: &[u8]) -> Option<CanDeviceStats> {
    Some(CanDeviceStats {
        bus_error: u32_at(data, 0)?,
        error_warning: u32_at(data, 4)?,
        error_passive: u32_at(data, 8)?,
        bus_off: u32_at(data, 12)?,
        arbitration_lost: u32_at(data, 16)?,
        restarts: u32_at(data, 20)?,
    })
}

fn parse_stats64(data: &[u8]) -> Option<LinkStats> {
    Some(LinkStats {
        rx_packets: u64_at(data, 0)?,
        tx_packets: u64_at(data, 8)?,
        rx_bytes: u64_at(data, 16)?,
        tx_bytes: u64_at(data, 24)?,
        rx_errors: u64_at(data, 32)?,
        tx_errors: u64_at(data, 40)?,
        rx_dropped: u64_at(data, 48)?,
        tx_dropped: u64_at(data, 56)?,
    })
}

/// Parses an `RTM_NEWLINK` payload into the link's kind and, read as a CAN controller, the link.
/// Attributes too short for their type are left out rather than trusted.
fn parse_link(payload: &[u8]) -> Option<(String, CanLink)> {
    let header = payload.get(..16)?;
    let mut link = CanLink {
        index: u32_at(header, 4)?,
        up: u32_at(header, 8)? & IFF_UP != 0,
        ..CanLink::default()
    };
    let mut kind = String::new();
    for (attr, data) in netlink::attrs(&payload[16..]) {
        match attr {
            IFLA_IFNAME => link.name = netlink::attr_string(data),
            IFLA_MTU => link.mtu = netlink::attr_u32(data).unwrap_or(0),
            IFLA_OPERSTATE => {
                link.operstate = data
                    .first()
                    .map_or(OperState::Unknown, |v| OperState::from_raw(*v))
            }
            IFLA_STATS64 => link.stats = parse_stats64(data),
            IFLA_PARENT_DEV_NAME => link.parent_dev = Some(netlink::attr_string(data)),
            IFLA_PARENT_DEV_BUS_NAME => link.parent_bus = Some(netlink::attr_string(data)),
            IFLA_LINKINFO => {
                for (info, d) in netlink::attrs(data) {
                    match info {
                        IFLA_INFO_KIND => kind = netlink::attr_string(d),
                        IFLA_INFO_DATA => parse_can_data(d, &mut link),
                        IFLA_INFO_XSTATS => link.device_stats = parse_device_stats(d),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((kind, link))
}

/// Reads the CAN device layer's `IFLA_INFO_DATA` into `link`.
fn parse_can_data(data: &[u8], link: &mut CanLink) {
    for (attr, d) in netlink::attrs(data) {
        match attr {
            IFLA_CAN_BITTIMING => link.bittiming = parse_bittiming(d),
            IFLA_CAN_DATA_BITTIMING => link.data_bittiming = parse_bittiming(d),
            IFLA_CAN_CLOCK => link.clock_hz = netlink::attr_u32(d),
            IFLA_CAN_STATE => link.state = netlink::attr_u32(d).and_then(CanState::from_raw),
            // struct can_ctrlmode { mask, flags }: in a dump only the flags are filled in.
            IFLA_CAN_CTRLMODE => link.ctrlmode = u32_at(d, 4).unwrap_or(0),
            IFLA_CAN_RESTART_MS => link.restart_ms = netlink::attr_u32(d).unwrap_or(0),
            IFLA_CAN_BERR_COUNTER => link.berr = parse_berr(d),
            _ => {}
        }
    }
}

/// Describes a link kind for [`CanError::NotCan`].
fn kind_name(kind: &str) -> String {
    if kind.is_empty() {
        "kind-less (e.g. loopback)".into()
    } else {
        kind.to_string()
    }
}

/// Looks a link up by index (`index != 0`) or name, whatever its kind.
fn lookup(
    sock: &mut Socket,
    ns: &str,
    index: u32,
    name: &str,
) -> Result<Option<(String, CanLink)>, CanError> {
    let mut msg = Message::new(RTM_GETLINK, NLM_F_ACK, &ifinfomsg(index, 0, 0));
    if index == 0 {
        msg.attr_str(IFLA_IFNAME, name);
    }
    match sock.transact(&mut msg) {
        Ok(replies) => Ok(replies
            .iter()
            .filter(|r| r.kind == RTM_NEWLINK)
            .find_map(|r| parse_link(&r.payload))),
        Err(e) if netlink::errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink_error("looking up", name, ns, e)),
    }
}

/// The CAN controller with index `index` in the socket's namespace; an error if there is none or
/// the interface is of another kind.
fn lookup_can(sock: &mut Socket, ns: &str, index: u32) -> Result<CanLink, CanError> {
    match lookup(sock, ns, index, "")? {
        Some((kind, link)) if kind == KIND => Ok(link),
        Some((kind, link)) => Err(CanError::NotCan {
            name: link.name,
            index,
            kind: kind_name(&kind),
            ns: ns.to_string(),
        }),
        None => Err(CanError::NotFound {
            what: format!("ifindex {index}"),
            ns: ns.to_string(),
        }),
    }
}

fn dump(sock: &mut Socket, ns: &str) -> Result<Vec<CanLink>, CanError> {
    let mut msg = Message::new(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0));
    let replies = sock
        .transact(&mut msg)
        .map_err(|e| netlink_error("listing links", "", ns, e))?;
    Ok(replies
        .iter()
        .filter(|r| r.kind == RTM_NEWLINK)
        .filter_map(|r| parse_link(&r.payload))
        .filter(|(kind, _)| kind == KIND)
        .map(|(_, link)| link)
        .collect())
}

/// Every CAN controller in `ns`, in index order.
pub fn list(ns: &Netns) -> Result<Vec<CanLink>, CanError> {
    let mut links = Links::open(ns)?;
    let (sock, ns_name) = links.raw();
    dump(sock, ns_name)
}

/// The CAN controller called `name` in `ns`; `None` if there is no interface of that name, an
/// error if it is not a CAN controller.
pub fn get(ns: &Netns, name: &str) -> Result<Option<CanLink>, CanError> {
    validate_name(name)?;
    let mut links = Links::open(ns)?;
    let (sock, ns_name) = links.raw();
    match lookup(sock, ns_name, 0, name)? {
        None => Ok(None),
        Some((kind, link)) if kind == KIND => Ok(Some(link)),
        Some((kind, link)) => Err(CanError::NotCan {
            name: link.name,
            index: link.index,
            kind: kind_name(&kind),
            ns: ns_name.to_string(),
        }),
    }
}

/// The CAN controller with interface index `index` in `ns`; `None` if there is no such
/// interface, an error if it is not a CAN controller.
pub fn get_by_index(ns: &Netns, index: u32) -> Result<Option<CanLink>, CanError> {
    let mut links = Links::open(ns)?;
    let (sock, ns_name) = links.raw();
    match lookup_can(sock, ns_name, index) {
        Ok(link) => Ok(Some(link)),
        Err(CanError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The CAN controller in `ns` whose parent device is `parent_dev` (e.g. `0000:00:10.0`), whatever
/// its interface is called.
pub fn find_by_parent(ns: &Netns, parent_dev: &str) -> Result<Option<CanLink>, CanError> {
    Ok(list(ns)?
        .into_iter()
        .find(|l| l.parent_dev.as_deref() == Some(parent_dev)))
}

/// The `RTM_NEWLINK` request that applies `settings` to the CAN controller `index`.
fn configure_request(index: u32, settings: &CanSettings) -> Message {
    /// `struct can_bittiming` with only the bitrate and sample point: zero segments make the
    /// kernel compute them (CONFIG_CAN_CALC_BITTIMING), as iproute2 relies on.
    fn bittiming(bitrate: u32, sample_point: Option<u32>) -> [u8; 32] {
        let mut bt = [0u8; 32];
        bt[0..4].copy_from_slice(&bitrate.to_ne_bytes());
        bt[4..8].copy_from_slice(&sample_point.unwrap_or(0).to_ne_bytes());
        bt
    }
    let mut msg = Message::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(index, 0, 0));
    // Both bits in the mask, so that `false` clears a mode set earlier instead of leaving it.
    let mask = CAN_CTRLMODE_LISTENONLY | CAN_CTRLMODE_FD;
    let mut flags = 0;
    if settings.listen_only {
        flags |= CAN_CTRLMODE_LISTENONLY;
    }
    if settings.fd {
        flags |= CAN_CTRLMODE_FD;
    }
    let mut ctrlmode = [0u8; 8];
    ctrlmode[0..4].copy_from_slice(&mask.to_ne_bytes());
    ctrlmode[4..8].copy_from_slice(&flags.to_ne_bytes());
    msg.begin_nest(IFLA_LINKINFO)
        .attr_str(IFLA_INFO_KIND, KIND)
        .begin_nest(IFLA_INFO_DATA)
        .attr(
            IFLA_CAN_BITTIMING,
            &bittiming(settings.bitrate, settings.sample_point),
        );
    if let Some(data_bitrate) = settings.data_bitrate {
        msg.attr(
            IFLA_CAN_DATA_BITTIMING,
            &bittiming(data_bitrate, settings.data_sample_point),
        );
    }
    msg.attr(IFLA_CAN_CTRLMODE, &ctrlmode)
        .attr_u32(IFLA_CAN_RESTART_MS, settings.restart_ms)
        .end_nest()
        .end_nest();
    msg
}

/// Sets the interface `link` up or down.
fn set_flags(sock: &mut Socket, ns: &str, link: &CanLink, up: bool) -> Result<(), CanError> {
    let flags = if up { IFF_UP } else { 0 };
    let mut msg = Message::new(
        RTM_NEWLINK,
        NLM_F_ACK,
        &ifinfomsg(link.index, flags, IFF_UP),
    );
    match sock.transact(&mut msg) {
        Ok(_) => Ok(()),
        // can_open refuses a controller without bit timing with EINVAL.
        Err(e) if up && netlink::errno(&e) == Some(libc::EINVAL) && link.bittiming.is_none() => {
            Err(CanError::NotConfigured {
                name: link.name.clone(),
                ns: ns.to_string(),
                source: e,
            })
        }
        Err(e) => Err(netlink_error(
            if up { "bringing up" } else { "setting down" },
            &link.name,
            ns,
            e,
        )),
    }
}

fn sample_point_text(sample_point: Option<u32>) -> String {
    sample_point
        .map(|sp| format!(", sample point {}.{} %", sp / 10, sp % 10))
        .unwrap_or_default()
}

/// Explains why the kernel refused `settings` for `link`.
fn configure_error(link: &CanLink, ns: &str, settings: &CanSettings, e: io::Error) -> CanError {
    let name = link.name.clone();
    match netlink::errno(&e) {
        // can_calc_bittiming: EDOM when the nearest bitrate is more than 5 % off, EINVAL when no
        // segment split fits, ERANGE from the prescaler range checks of can_fixup_bittiming.
        Some(libc::EDOM) | Some(libc::EINVAL) | Some(libc::ERANGE) => {
            // The kernel reports no attribute offset here on 6.1, so which phase failed is not
            // known for sure; the arbitration phase is checked first and is the usual culprit.
            let data_phase = settings.data_bitrate.is_some()
                && netlink::kernel_message(&e).is_some_and(|m| m.contains("data"));
            let (phase, bitrate, sample_point) = if data_phase {
                (
                    "data phase",
                    settings.data_bitrate.unwrap_or_default(),
                    settings.data_sample_point,
                )
            } else {
                ("arbitration phase", settings.bitrate, settings.sample_point)
            };
            CanError::Bitrate {
                name,
                ns: ns.to_string(),
                phase,
                bitrate,
                sample_point: sample_point_text(sample_point),
                clock: link
                    .clock_hz
                    .map_or_else(|| "controller's".into(), |hz| format!("{hz} Hz")),
                source: e,
            }
        }
        Some(libc::EOPNOTSUPP) => {
            let mut modes = Vec::new();
            if settings.fd {
                modes.push("CAN FD");
            }
            if settings.listen_only {
                modes.push("listen-only");
            }
            if modes.is_empty() {
                // Clearing both failed: the driver has one of them as a fixed mode.
                modes.push("classic CAN without listen-only (it may be CAN FD only)");
            }
            CanError::Unsupported {
                name,
                ns: ns.to_string(),
                what: modes.join(", "),
                source: e,
            }
        }
        _ => netlink_error("configuring CAN controller", &link.name, ns, e),
    }
}

/// Applies `settings` to the CAN controller with interface index `ifindex` in `ns` and returns
/// it as the kernel then reports it.
///
/// The kernel changes bit timing and modes only while the interface is down: an interface that
/// is up is set down for the change and brought up again afterwards (also when the change fails),
/// which interrupts its traffic briefly. The kernel applies the settings in order (modes, bit
/// timing, restart delay, data bit timing), so a refused bitrate can leave the new modes in place.
pub fn configure(ns: &Netns, ifindex: u32, settings: &CanSettings) -> Result<CanLink, CanError> {
    let mut links = Links::open(ns)?;
    let (sock, ns_name) = links.raw();
    let link = lookup_can(sock, ns_name, ifindex)?;
    settings
        .check()
        .map_err(|reason| CanError::InvalidSettings {
            name: link.name.clone(),
            reason,
        })?;
    if link.up {
        set_flags(sock, ns_name, &link, false)?;
    }
    let result = sock
        .transact(&mut configure_request(ifindex, settings))
        .map_err(|e| configure_error(&link, ns_name, settings, e));
    if link.up {
        // Up again even after a refusal: the old settings still hold and the pod expects traffic.
        let restored = set_flags(sock, ns_name, &link, true);
        result?;
        restored?;
    } else {
        result?;
    }
    lookup_can(sock, ns_name, ifindex)
}

/// Sets the CAN controller with interface index `ifindex` in `ns` up or down.
pub fn set_up(ns: &Netns, ifindex: u32, up: bool) -> Result<(), CanError> {
    let mut links = Links::open(ns)?;
    let (sock, ns_name) = links.raw();
    let link = lookup_can(sock, ns_name, ifindex)?;
    set_flags(sock, ns_name, &link, up)
}

/// Renames the CAN controller with interface index `ifindex` in `ns`, which must be down (the
/// kernel renames only interfaces that are down). Renaming to its current name does nothing.
pub fn rename(ns: &Netns, ifindex: u32, new_name: &str) -> Result<(), CanError> {
    validate_name(new_name)?;
    let mut links = Links::open(ns)?;
    let (sock, ns_name) = links.raw();
    let link = lookup_can(sock, ns_name, ifindex)?;
    if link.name == new_name {
        return Ok(());
    }
    let mut msg = Message::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(ifindex, 0, 0));
    msg.attr_str(IFLA_IFNAME, new_name);
    match sock.transact(&mut msg) {
        Ok(_) => Ok(()),
        Err(e) if netlink::errno(&e) == Some(libc::EBUSY) => Err(CanError::RenameWhileUp {
            name: link.name,
            new_name: new_name.to_string(),
            ns: ns_name.to_string(),
        }),
        Err(e) if netlink::errno(&e) == Some(libc::EEXIST) => {
            Err(name_taken(sock, ns_name, new_name))
        }
        Err(e) => Err(netlink_error("renaming", &link.name, ns_name, e)),
    }
}

/// The error for `name` being taken in the socket's namespace, saying by what kind of interface.
fn name_taken(sock: &mut Socket, ns: &str, name: &str) -> CanError {
    let kind = match lookup(sock, ns, 0, name) {
        Ok(Some((kind, _))) => kind_name(&kind),
        _ => "another".into(),
    };
    LinkError::NameTaken {
        name: name.to_string(),
        kind,
        ns: ns.to_string(),
    }
    .into()
}

/// Moves the CAN controller with interface index `ifindex` from namespace `from` to namespace
/// `to`, named `new_name` there, in one `RTM_NEWLINK` (`IFLA_NET_NS_FD` and `IFLA_IFNAME`), and
/// returns it as `to` reports it: down (the kernel closes an interface to move it), usually with
/// a new index, its CAN settings unchanged.
///
/// Works in both directions: into a pod's namespace, and from a pod's namespace back to the node's
/// (`Netns::Pid(1)`) or the plugin's own (`Netns::Pid(std::process::id())`). Either way the
/// request is made inside `from`, where the interface is, naming `to` by a file descriptor opened
/// by the calling thread.
///
/// A name already taken in `to` is an error ([`LinkError::NameTaken`]) and the controller stays in
/// `from`. (The kernel itself uses the name as a fallback only when the interface's current name
/// clashes in `to`; otherwise it moves the interface first and renames it afterwards, and a clash
/// then leaves it moved under its old name. The name is therefore checked first, and if it is
/// taken between the check and the move, the interface is moved back.)
pub fn move_to(
    from: &Netns,
    ifindex: u32,
    to: &Netns,
    new_name: &str,
) -> Result<CanLink, CanError> {
    validate_name(new_name)?;
    // Both namespace files are opened here, before any thread enters `from`: a path such as
    // /proc/self/ns/net means the caller's namespace only when opened by the caller.
    let to_file = netns::open(to)?;
    let from_file = netns::open(from)?;
    let mut source = Links::open(from)?;
    let mut target = Links::open(to)?;
    let (sock, from_name) = source.raw();
    let link = lookup_can(sock, from_name, ifindex)?;
    let (target_sock, to_name) = target.raw();
    if let Some((kind, other)) = lookup(target_sock, to_name, 0, new_name)? {
        // Moving a controller within one namespace is a rename; the name is then its own.
        if !(kind == KIND && other.parent_dev.is_some() && other.parent_dev == link.parent_dev) {
            return Err(name_taken(target_sock, to_name, new_name));
        }
    }
    let mut msg = move_request(ifindex, &to_file, new_name);
    match sock.transact(&mut msg) {
        Ok(_) => {}
        Err(e) if netlink::errno(&e) == Some(libc::EEXIST) => {
            return Err(undo_partial_move(
                &mut source,
                &mut target,
                &from_file,
                &link,
                new_name,
                e,
            ));
        }
        Err(e) => return Err(netlink_error("moving", &link.name, from_name, e)),
    }
    let (target_sock, to_name) = target.raw();
    match lookup(target_sock, to_name, 0, new_name)? {
        Some((kind, moved)) if kind == KIND => Ok(moved),
        _ => Err(CanError::NotFound {
            what: format!("{new_name:?} (just moved there)"),
            ns: to_name.to_string(),
        }),
    }
}

/// The `RTM_NEWLINK` request that moves interface `index` to the namespace open as `to`, named
/// `name` there.
fn move_request(index: u32, to: &File, name: &str) -> Message {
    let mut msg = Message::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(index, 0, 0));
    msg.attr_u32(IFLA_NET_NS_FD, to.as_raw_fd() as u32)
        .attr_str(IFLA_IFNAME, name);
    msg
}

/// After a move answered EEXIST: if the kernel moved `link` without renaming it (the name was
/// taken in the target meanwhile), moves it back under its own name. Returns the error to report.
fn undo_partial_move(
    source: &mut Links,
    target: &mut Links,
    from_file: &File,
    link: &CanLink,
    new_name: &str,
    err: io::Error,
) -> CanError {
    let (target_sock, to_name) = target.raw();
    let to_name = to_name.to_string();
    let taken = name_taken(target_sock, &to_name, new_name);
    let stranded = match dump(target_sock, &to_name) {
        Ok(links) => links.into_iter().find(|l| match &link.parent_dev {
            Some(parent) => l.parent_dev.as_deref() == Some(parent),
            None => l.name == link.name,
        }),
        Err(_) => None,
    };
    let Some(stranded) = stranded else {
        // Still in the source namespace: the kernel refused before moving anything.
        return taken;
    };
    let mut back = move_request(stranded.index, from_file, &link.name);
    match target_sock.transact(&mut back) {
        Ok(_) => taken,
        Err(restore) => CanError::StrandedInTarget {
            name: stranded.name,
            new_name: new_name.to_string(),
            from: source.raw().1.to_string(),
            to: to_name,
            source: err,
            restore,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends one netlink attribute to `buf`.
    fn nla(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
        buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(payload);
        buf.resize((buf.len() + 3) & !3, 0);
    }

    fn words(values: &[u32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    /// What the kernel sends for one controller (layout of can_fill_info and rtnl_fill_ifinfo).
    struct Dumped {
        state: u32,
        berr: (u16, u16),
        device_stats: [u32; 6],
        ctrlmode: u32,
        with_data_bittiming: bool,
    }

    fn dumped(d: &Dumped) -> Vec<u8> {
        let mut p = ifinfomsg(7, IFF_UP | 0x40 /* IFF_RUNNING */, 0).to_vec();
        nla(&mut p, IFLA_IFNAME, b"can0\0");
        nla(&mut p, IFLA_MTU, &16u32.to_ne_bytes());
        nla(&mut p, IFLA_OPERSTATE, &[6]);
        let stats: Vec<u8> = (1..=24u64).flat_map(|v| (v * 10).to_ne_bytes()).collect();
        nla(&mut p, IFLA_STATS64, &stats);
        let mut data = Vec::new();
        nla(
            &mut data,
            IFLA_CAN_BITTIMING,
            &words(&[500_000, 875, 125, 6, 7, 2, 1, 1]),
        );
        nla(&mut data, IFLA_CAN_CLOCK, &8_000_000u32.to_ne_bytes());
        nla(&mut data, IFLA_CAN_STATE, &d.state.to_ne_bytes());
        nla(&mut data, IFLA_CAN_CTRLMODE, &words(&[0, d.ctrlmode]));
        nla(&mut data, IFLA_CAN_RESTART_MS, &100u32.to_ne_bytes());
        let mut berr = d.berr.0.to_ne_bytes().to_vec();
        berr.extend_from_slice(&d.berr.1.to_ne_bytes());
        nla(&mut data, IFLA_CAN_BERR_COUNTER, &berr);
        if d.with_data_bittiming {
            nla(
                &mut data,
                IFLA_CAN_DATA_BITTIMING,
                &words(&[2_000_000, 750, 25, 5, 5, 3, 1, 1]),
            );
        }
        let mut info = Vec::new();
        nla(&mut info, IFLA_INFO_KIND, b"can\0");
        nla(&mut info, IFLA_INFO_DATA, &data);
        nla(&mut info, IFLA_INFO_XSTATS, &words(&d.device_stats));
        nla(&mut p, IFLA_LINKINFO, &info);
        nla(&mut p, IFLA_PARENT_DEV_NAME, b"0000:00:10.0\0");
        nla(&mut p, IFLA_PARENT_DEV_BUS_NAME, b"pci\0");
        p
    }

    fn healthy() -> Dumped {
        Dumped {
            state: 0,
            berr: (0, 0),
            device_stats: [0; 6],
            ctrlmode: 0,
            with_data_bittiming: false,
        }
    }

    #[test]
    fn a_dumped_controller_is_read_completely() {
        let (kind, link) = parse_link(&dumped(&healthy())).expect("parses");
        assert_eq!(kind, "can");
        assert_eq!(
            link,
            CanLink {
                index: 7,
                name: "can0".into(),
                up: true,
                operstate: OperState::Up,
                mtu: 16,
                parent_bus: Some("pci".into()),
                parent_dev: Some("0000:00:10.0".into()),
                state: Some(CanState::ErrorActive),
                berr: Some(BerrCounter { txerr: 0, rxerr: 0 }),
                device_stats: Some(CanDeviceStats::default()),
                bittiming: Some(Bittiming {
                    bitrate: 500_000,
                    sample_point: 875,
                    tq: 125,
                    prop_seg: 6,
                    phase_seg1: 7,
                    phase_seg2: 2,
                    sjw: 1,
                    brp: 1,
                }),
                data_bittiming: None,
                clock_hz: Some(8_000_000),
                restart_ms: 100,
                ctrlmode: 0,
                stats: Some(LinkStats {
                    rx_packets: 10,
                    tx_packets: 20,
                    rx_bytes: 30,
                    tx_bytes: 40,
                    rx_errors: 50,
                    tx_errors: 60,
                    rx_dropped: 70,
                    tx_dropped: 80,
                }),
            }
        );
        assert!(!link.listen_only() && !link.fd());
    }

    #[test]
    fn every_controller_state_is_read_with_its_label() {
        let expected = [
            (0, CanState::ErrorActive, "error_active"),
            (1, CanState::ErrorWarning, "error_warning"),
            (2, CanState::ErrorPassive, "error_passive"),
            (3, CanState::BusOff, "bus_off"),
            (4, CanState::Stopped, "stopped"),
            (5, CanState::Sleeping, "sleeping"),
        ];
        for (raw, state, label) in expected {
            let (_, link) = parse_link(&dumped(&Dumped {
                state: raw,
                ..healthy()
            }))
            .expect("parses");
            assert_eq!(link.state, Some(state), "raw {raw}");
            assert_eq!(state.as_label(), label);
            assert_eq!(state.to_string(), label);
        }
        // A state a newer kernel might add is not mistaken for one of these.
        let (_, link) = parse_link(&dumped(&Dumped {
            state: 6,
            ..healthy()
        }))
        .expect("parses");
        assert_eq!(link.state, None);
    }

    #[test]
    fn a_bus_off_controller_reports_its_counters_and_history() {
        // What a controller that went bus-off on a broken bus reports (the emulated bus in the
        // test-bed cannot produce this, so this is the coverage for it).
        let (_, link) = parse_link(&dumped(&Dumped {
            state: 3,
            berr: (256, 3),
            device_stats: [1234, 2, 1, 1, 5, 0],
            ctrlmode: 0,
            with_data_bittiming: false,
        }))
        .expect("parses");
        assert_eq!(link.state, Some(CanState::BusOff));
        assert_eq!(
            link.berr,
            Some(BerrCounter {
                txerr: 256,
                rxerr: 3
            })
        );
        assert_eq!(
            link.device_stats,
            Some(CanDeviceStats {
                bus_error: 1234,
                error_warning: 2,
                error_passive: 1,
                bus_off: 1,
                arbitration_lost: 5,
                restarts: 0,
            })
        );
    }

    #[test]
    fn an_error_passive_controller_after_restarts() {
        let (_, link) = parse_link(&dumped(&Dumped {
            state: 2,
            berr: (135, 127),
            device_stats: [u32::MAX, 7, 4, 3, 0, 3],
            ctrlmode: 0,
            with_data_bittiming: false,
        }))
        .expect("parses");
        assert_eq!(link.state, Some(CanState::ErrorPassive));
        assert_eq!(
            link.berr,
            Some(BerrCounter {
                txerr: 135,
                rxerr: 127
            })
        );
        let stats = link.device_stats.expect("xstats");
        assert_eq!(
            (stats.bus_error, stats.error_passive, stats.restarts),
            (u32::MAX, 4, 3)
        );
    }

    #[test]
    fn fd_and_listen_only_controllers_report_their_modes() {
        let (_, link) = parse_link(&dumped(&Dumped {
            ctrlmode: CAN_CTRLMODE_FD | CAN_CTRLMODE_LISTENONLY | 0x10,
            with_data_bittiming: true,
            ..healthy()
        }))
        .expect("parses");
        assert!(link.fd() && link.listen_only());
        let data = link.data_bittiming.expect("data bittiming");
        assert_eq!((data.bitrate, data.sample_point), (2_000_000, 750));
    }

    #[test]
    fn short_attributes_are_left_out_not_trusted() {
        let mut p = ifinfomsg(3, 0, 0).to_vec();
        nla(&mut p, IFLA_IFNAME, b"can9\0");
        nla(&mut p, IFLA_STATS64, &[0u8; 16]);
        let mut data = Vec::new();
        nla(&mut data, IFLA_CAN_BITTIMING, &words(&[500_000, 875]));
        nla(&mut data, IFLA_CAN_BERR_COUNTER, &[1]);
        nla(&mut data, IFLA_CAN_STATE, &[0, 0]);
        let mut info = Vec::new();
        nla(&mut info, IFLA_INFO_KIND, b"can\0");
        nla(&mut info, IFLA_INFO_DATA, &data);
        nla(&mut info, IFLA_INFO_XSTATS, &words(&[1, 2, 3]));
        nla(&mut p, IFLA_LINKINFO, &info);
        let (kind, link) = parse_link(&p).expect("parses");
        assert_eq!((kind.as_str(), link.name.as_str()), ("can", "can9"));
        assert_eq!(
            (
                link.stats,
                link.bittiming,
                link.berr,
                link.state,
                link.device_stats
            ),
            (None, None, None, None, None)
        );
        assert!(!link.up);
        assert_eq!(link.operstate, OperState::Unknown);
        assert!(parse_link(&[0u8; 8]).is_none(), "no ifinfomsg");
    }

    #[test]
    fn a_vcan_is_told_from_a_controller() {
        let mut p = ifinfomsg(2, 0, 0).to_vec();
        nla(&mut p, IFLA_IFNAME, b"vcan0\0");
        let mut info = Vec::new();
        nla(&mut info, IFLA_INFO_KIND, b"vcan\0");
        nla(&mut p, IFLA_LINKINFO, &info);
        let (kind, link) = parse_link(&p).expect("parses");
        assert_eq!(kind, "vcan");
        assert_eq!((link.state, link.parent_dev), (None, None));
    }

    /// The attributes of a finished request, after its netlink header and ifinfomsg.
    fn request_attrs(msg: &mut Message) -> (Vec<u8>, Vec<u8>) {
        let bytes = msg.finish(1).to_vec();
        (bytes[16..32].to_vec(), bytes[32..].to_vec())
    }

    fn find(data: &[u8], kind: u16) -> Vec<u8> {
        netlink::attrs(data)
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| d.to_vec())
            .unwrap_or_else(|| panic!("attribute {kind} missing"))
    }

    #[test]
    fn a_configure_request_carries_bitrate_sample_point_modes_and_restart() {
        let settings = CanSettings {
            sample_point: Some(875),
            restart_ms: 100,
            listen_only: true,
            ..CanSettings::classic(500_000)
        };
        let mut msg = configure_request(5, &settings);
        let bytes = msg.finish(1).to_vec();
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), RTM_NEWLINK);
        let (header, attrs) = request_attrs(&mut msg);
        assert_eq!(header, ifinfomsg(5, 0, 0), "flags untouched");
        let top: Vec<u16> = netlink::attrs(&attrs).map(|(k, _)| k).collect();
        assert_eq!(top, [IFLA_LINKINFO]);
        let info = find(&attrs, IFLA_LINKINFO);
        assert_eq!(netlink::attr_string(&find(&info, IFLA_INFO_KIND)), "can");
        let data = find(&info, IFLA_INFO_DATA);
        let kinds: Vec<u16> = netlink::attrs(&data).map(|(k, _)| k).collect();
        assert_eq!(
            kinds,
            [IFLA_CAN_BITTIMING, IFLA_CAN_CTRLMODE, IFLA_CAN_RESTART_MS]
        );
        let mut bt = words(&[500_000, 875]);
        bt.resize(32, 0);
        assert_eq!(find(&data, IFLA_CAN_BITTIMING), bt);
        assert_eq!(
            find(&data, IFLA_CAN_CTRLMODE),
            words(&[0x22, CAN_CTRLMODE_LISTENONLY])
        );
        assert_eq!(find(&data, IFLA_CAN_RESTART_MS), words(&[100]));
        // The exact bytes of the nest, as the kernel parses them.
        let mut expected = Vec::new();
        nla(&mut expected, IFLA_INFO_KIND, b"can\0");
        let mut can = Vec::new();
        nla(&mut can, IFLA_CAN_BITTIMING, &bt);
        nla(&mut can, IFLA_CAN_CTRLMODE, &words(&[0x22, 0x02]));
        nla(&mut can, IFLA_CAN_RESTART_MS, &words(&[100]));
        nla(&mut expected, IFLA_INFO_DATA | 0x8000, &can);
        assert_eq!(info, expected);
    }

    #[test]
    fn clearing_modes_keeps_them_in_the_mask_and_fd_adds_data_bittiming() {
        let mut msg = configure_request(5, &CanSettings::classic(125_000));
        let (_, attrs) = request_attrs(&mut msg);
        let data = find(&find(&attrs, IFLA_LINKINFO), IFLA_INFO_DATA);
        assert_eq!(find(&data, IFLA_CAN_CTRLMODE), words(&[0x22, 0]));
        let mut bt = words(&[125_000, 0]);
        bt.resize(32, 0);
        assert_eq!(find(&data, IFLA_CAN_BITTIMING), bt, "kernel's sample point");

        let fd = CanSettings {
            data_bitrate: Some(2_000_000),
            data_sample_point: Some(750),
            fd: true,
            ..CanSettings::classic(500_000)
        };
        let mut msg = configure_request(5, &fd);
        let (_, attrs) = request_attrs(&mut msg);
        let data = find(&find(&attrs, IFLA_LINKINFO), IFLA_INFO_DATA);
        let mut dbt = words(&[2_000_000, 750]);
        dbt.resize(32, 0);
        assert_eq!(find(&data, IFLA_CAN_DATA_BITTIMING), dbt);
        assert_eq!(find(&data, IFLA_CAN_CTRLMODE), words(&[0x22, 0x20]));
    }

    #[test]
    fn contradictory_settings_are_refused_before_the_kernel_sees_them() {
        let ok = CanSettings::classic(500_000);
        assert_eq!(ok.check(), Ok(()));
        let cases = [
            (CanSettings::classic(0), "bitrate is 0"),
            (
                CanSettings {
                    sample_point: Some(1000),
                    ..ok
                },
                "sample point 1000",
            ),
            (
                CanSettings { fd: true, ..ok },
                "CAN FD needs a data bitrate",
            ),
            (
                CanSettings {
                    data_bitrate: Some(2_000_000),
                    ..ok
                },
                "needs CAN FD",
            ),
            (
                CanSettings {
                    data_sample_point: Some(800),
                    ..ok
                },
                "data sample point needs",
            ),
        ];
        for (settings, why) in cases {
            let err = settings.check().expect_err(why);
            assert!(err.contains(why), "{err} / {why}");
        }
    }

    #[test]
    fn a_move_request_names_the_target_namespace_and_the_new_name() {
        let file = File::open("/proc/self/ns/net").expect("own namespace");
        let mut msg = move_request(9, &file, "hw0");
        let (header, attrs) = request_attrs(&mut msg);
        assert_eq!(header, ifinfomsg(9, 0, 0));
        assert_eq!(
            netlink::attr_u32(&find(&attrs, IFLA_NET_NS_FD)),
            Some(file.as_raw_fd() as u32)
        );
        assert_eq!(netlink::attr_string(&find(&attrs, IFLA_IFNAME)), "hw0");
    }

    #[test]
    fn an_unreachable_bitrate_names_the_interface_bitrate_and_kernel_reason() {
        let (_, link) = parse_link(&dumped(&healthy())).expect("parses");
        let settings = CanSettings {
            sample_point: Some(875),
            ..CanSettings::classic(3_000_000)
        };
        let err = configure_error(
            &link,
            "pid 1",
            &settings,
            io::Error::from_raw_os_error(libc::EDOM),
        );
        let text = err.to_string();
        for part in [
            "\"can0\"",
            "pid 1",
            "3000000 bit/s",
            "sample point 87.5 %",
            "8000000 Hz",
            "Numerical argument out of domain",
        ] {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
        let err = configure_error(
            &link,
            "pid 1",
            &CanSettings {
                fd: true,
                data_bitrate: Some(2_000_000),
                ..settings
            },
            io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        );
        assert!(
            matches!(&err, CanError::Unsupported { what, .. } if what == "CAN FD"),
            "{err}"
        );
    }

    /// The kernel's half-done move, which [`move_to`]'s check of the name avoids and its undo
    /// repairs when a race gets past the check. Uses the emulated controller 0000:00:13.0, which
    /// the integration tests (another process) leave in the node's namespace as `can3`.
    #[test]
    #[ignore = "needs the CAN test-bed VM"]
    fn a_move_whose_rename_fails_is_undone() {
        vcan_test_support::require_testbed();
        vcan_test_support::run_ok("modprobe", &["kvaser_pci"]);
        const DEV: &str = "0000:00:13.0";
        let node = Netns::Pid(1);
        let started = std::time::Instant::now();
        let can3 = loop {
            if let Some(l) = find_by_parent(&node, DEV).expect("list") {
                break l;
            }
            assert!(started.elapsed().as_secs() < 20, "{DEV} never registered");
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(!can3.up, "{DEV} must be down");
        let fx = vcan_test_support::NetnsFixture::new();
        let pod = Netns::Path(std::path::PathBuf::from("/run/netns").join(fx.name()));
        fx.ip(&["link", "add", "hw3", "type", "dummy"]);

        // What the kernel does with the request alone: moves, then fails the rename.
        let to_file = netns::open(&pod).expect("pod namespace");
        let from_file = netns::open(&node).expect("node namespace");
        let mut source = Links::open(&node).expect("node");
        let mut target = Links::open(&pod).expect("pod");
        let (sock, _) = source.raw();
        let err = sock
            .transact(&mut move_request(can3.index, &to_file, "hw3"))
            .expect_err("hw3 is taken");
        assert_eq!(netlink::errno(&err), Some(libc::EEXIST), "{err}");
        let (target_sock, to_name) = target.raw();
        let stranded = dump(target_sock, to_name).expect("dump");
        assert_eq!(
            stranded
                .iter()
                .map(|l| (l.name.as_str(), l.parent_dev.as_deref()))
                .collect::<Vec<_>>(),
            [(can3.name.as_str(), Some(DEV))],
            "the 6.1 kernel moves first and renames afterwards"
        );

        let err = undo_partial_move(&mut source, &mut target, &from_file, &can3, "hw3", err);
        assert!(
            matches!(&err, CanError::Link(LinkError::NameTaken { name, .. }) if name == "hw3"),
            "{err:?}"
        );
        let back = find_by_parent(&node, DEV)
            .expect("list")
            .expect("moved back");
        assert_eq!(back.name, can3.name);
        assert!(list(&pod).expect("list").is_empty());
    }

    #[test]
    fn the_host_namespace_has_no_controllers_and_lo_is_not_one() {
        // Development hosts have no CAN; in the test-bed this lists the emulated controllers.
        let own = Netns::Pid(std::process::id());
        for link in list(&own).expect("dump") {
            assert!(link.name != "lo");
        }
        let err = get(&own, "lo").expect_err("lo is not a controller");
        assert!(matches!(err, CanError::NotCan { .. }), "{err}");
        assert!(err.to_string().contains("not a CAN controller"), "{err}");
        assert!(get(&own, "nosuchcan0").expect("lookup").is_none());
        let err = configure(&own, 1, &CanSettings::classic(500_000)).expect_err("lo");
        assert!(matches!(err, CanError::NotCan { index: 1, .. }), "{err}");
        assert!(get_by_index(&own, 1).is_err());
        assert!(get_by_index(&own, 999_999).expect("lookup").is_none());
    }
}
