//! The bus configuration: which buses a node serves, parsed and checked field by field, and
//! whether the node's counter slots cover them.

use std::path::Path;

use serde::Deserialize;

use crate::kernel::link::{self, CanMtu};
use crate::pod::annotations;
use crate::resource::{ResourceName, ResourceNameError};

/// Members per node when the configuration does not say.
pub const DEFAULT_MEMBERS: u32 = 32;
/// The pod's interface name when neither the configuration nor the pod says.
pub const DEFAULT_INTERFACE: &str = "can0";
/// The resource name of bus `name` is `<domain>/bus-<name>`.
pub const RESOURCE_PREFIX: &str = "bus-";
/// Longest bus name. Kubernetes allows 63 characters after the domain: the device IDs
/// `bus-<name>-NNNN` would allow 54, and the annotation `interface.<name>` 53.
const MAX_NAME_LEN: usize = annotations::MAX_KEY_LEN - annotations::BUS_INTERFACE_OPTION.len();

/// One bus as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusSpec {
    /// The bus's name, a DNS label; the resource is `<domain>/bus-<name>`.
    pub name: String,
    /// Whether the bus carries CAN FD frames (MTU 72) or classic frames only (MTU 16).
    pub fd: bool,
    /// How many pods of the node can be members at once (the devices advertised).
    pub members: u32,
    /// The interface name inside member pods, unless a pod's annotations say otherwise (see
    /// [`crate::bus::member::member_config`]).
    pub interface: String,
    /// The physical interface (an entry of the hardware configuration) that connects the bus to
    /// a real CAN wire, if any.
    pub uplink: Option<String>,
    /// The tunnel joining the bus to other nodes and external peers, if it spans beyond the node.
    pub tunnel: Option<TunnelSpec>,
    /// The socketcand endpoint serving the bus to engineers' tools, if asked for.
    pub socketcand: Option<SocketcandSpec>,
    /// The bus's bitrate, if it is a timed bus: frames are then scheduled one at a time in the
    /// plugin (see [`crate::bus::timing`]) instead of forwarded by can-gw at memory speed.
    pub timing: Option<TimingSpec>,
}

/// Lowest nominal bitrate a timed bus accepts (bit/s).
pub const MIN_BITRATE: u32 = 10_000;
/// Highest nominal bitrate (bit/s): ISO 11898's limit for the arbitration phase.
pub const MAX_BITRATE: u32 = 1_000_000;
/// Highest data-phase bitrate of an FD bus (bit/s).
pub const MAX_DATA_BITRATE: u32 = 15_000_000;
/// A member's transmit queue when the configuration does not say: Linux's default
/// `txqueuelen` for CAN interfaces.
pub const DEFAULT_TX_QUEUE: u32 = 10;

/// How a timed bus carries frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimingSpec {
    /// Nominal (arbitration-phase) bitrate, bit/s.
    pub bitrate: u32,
    /// Data-phase bitrate of CAN FD frames with bit-rate switch, bit/s (FD buses only).
    pub data_bitrate: Option<u32>,
    /// Frames a member may have waiting for the bus; the next write fails with ENOBUFS.
    pub tx_queue: u32,
    /// Whether frames take their bit time (true) or go at once with the load only measured
    /// against `bitrate` (false).
    pub pace: bool,
}

/// Default TCP port of a bus's socketcand endpoint (socketcand's default).
pub const DEFAULT_SOCKETCAND_PORT: u16 = 29536;
/// Default limit of clients connected at once to one socketcand endpoint.
pub const DEFAULT_SOCKETCAND_CLIENTS: u32 = 16;

/// A bus's socketcand endpoint (see [`crate::socketcand`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketcandSpec {
    /// Where it listens. Loopback by default: socketcand has no authentication, so only
    /// `kubectl port-forward` (or whoever is inside the plugin pod) reaches it.
    pub listen: std::net::SocketAddr,
    /// How many clients may be connected at once; the next is told so and closed.
    pub max_clients: u32,
}

/// How far a bus reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// The pods of one node.
    Node,
    /// The pods of every node where the plugin runs.
    Cluster,
}

/// Default UDP port of a bus's tunnel (cannelloni's default).
pub const DEFAULT_TUNNEL_PORT: u16 = 20000;
/// Default longest wait before a tunnel sends a partly filled packet.
pub const DEFAULT_BATCH: std::time::Duration = std::time::Duration::from_micros(1000);

/// A bus's tunnel to other nodes (cannelloni's UDP format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    /// Whether the plugin's instances on other nodes are peers.
    pub span: Span,
    /// The UDP port of the bus's tunnel, the same on every node.
    pub port: u16,
    /// External peers (e.g. a bench rig running cannelloni).
    pub peers: Vec<ExternalPeer>,
    /// The longest a frame waits for others to share its packet.
    pub batch: std::time::Duration,
}

/// A peer that is not the plugin (cannelloni on a bench rig).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalPeer {
    /// Where it listens.
    pub address: std::net::SocketAddr,
    /// The plugin instance's address it sends to (cannelloni's `-R`): that instance serves it
    /// from the start. Without it, the instance it first sends to serves it from then on.
    pub via: Option<std::net::IpAddr>,
}

impl BusSpec {
    /// The MTU of every interface of the bus.
    pub fn mtu(&self) -> CanMtu {
        if self.fd { CanMtu::Fd } else { CanMtu::Classic }
    }

    /// The extended resource of the bus under `domain`.
    pub fn resource(&self, domain: &str) -> Result<ResourceName, ResourceNameError> {
        format!("{domain}/{RESOURCE_PREFIX}{}", self.name).parse()
    }
}

/// What is wrong with the bus configuration.
#[derive(Debug, thiserror::Error)]
pub enum BusConfigError {
    /// The file could not be read.
    #[error("cannot read the bus configuration {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error(
        "the bus configuration {path} is not valid: {detail} (expected e.g. \
         {{\"buses\":[{{\"name\":\"powertrain\",\"fd\":true,\"members\":32,\"interface\":\"can0\"}}]}})"
    )]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        detail: String,
    },
    /// One field of one bus is invalid.
    #[error("the bus configuration {path}: buses[{index}].{field}: {message}")]
    Field {
        /// The file.
        path: String,
        /// Position of the bus in the list.
        index: usize,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    buses: Vec<RawBus>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBus {
    name: String,
    #[serde(default)]
    fd: Option<bool>,
    #[serde(default)]
    members: Option<i64>,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    uplink: Option<String>,
    #[serde(default)]
    span: Option<String>,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    socketcand: Option<RawSocketcand>,
    #[serde(default)]
    batch_us: Option<i64>,
    #[serde(default)]
    bitrate: Option<i64>,
    #[serde(default)]
    data_bitrate: Option<i64>,
    #[serde(default)]
    tx_queue: Option<i64>,
    #[serde(default)]
    pace: Option<bool>,
}

/// A socketcand endpoint as written: `{"port": 29536, "listen": "127.0.0.1", "max_clients": 16}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSocketcand {
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    max_clients: Option<i64>,
}

/// An external peer as written: `"192.0.2.10:20000"` or
/// `{"address": "192.0.2.10:20000", "via": "10.0.0.1"}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPeer {
    Address(String),
    Full(RawPeerFields),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeerFields {
    address: String,
    #[serde(default)]
    via: Option<String>,
}

/// Whether `s` can name a bus: a DNS label of at most 53 characters.
pub(crate) fn is_bus_name(s: &str) -> bool {
    crate::resource::is_dns_label(s, MAX_NAME_LEN)
}

/// Parses a bus configuration, JSON (`path` only names it in errors). `fd` defaults to true,
/// `members` to 32, `interface` to `can0`.
pub fn parse(text: &str, path: &str) -> Result<Vec<BusSpec>, BusConfigError> {
    let raw: RawFile = serde_json::from_str(text).map_err(|e| BusConfigError::Syntax {
        path: path.to_string(),
        detail: e.to_string(),
    })?;
    let mut buses: Vec<BusSpec> = Vec::new();
    for (index, bus) in raw.buses.into_iter().enumerate() {
        let field = |field, message: String| BusConfigError::Field {
            path: path.to_string(),
            index,
            field,
            message,
        };
        if !is_bus_name(&bus.name) {
            return Err(field(
                "name",
                format!(
                    "{:?} is not a valid bus name: lowercase letters, digits and '-', not at \
                     either end, 1 to {MAX_NAME_LEN} characters",
                    bus.name
                ),
            ));
        }
        if buses.iter().any(|b| b.name == bus.name) {
            return Err(field("name", format!("bus {:?} is listed twice", bus.name)));
        }
        let members = bus.members.unwrap_or(i64::from(DEFAULT_MEMBERS));
        let members = u32::try_from(members)
            .ok()
            .filter(|m| (1..=9999).contains(m))
            .ok_or_else(|| field("members", format!("{members} is not in 1..=9999")))?;
        let interface = bus
            .interface
            .clone()
            .unwrap_or_else(|| DEFAULT_INTERFACE.to_string());
        link::validate_name(&interface).map_err(|e| field("interface", e.to_string()))?;
        if let Some(uplink) = &bus.uplink
            && let Some(other) = buses.iter().find(|b| b.uplink.as_ref() == Some(uplink))
        {
            return Err(field(
                "uplink",
                format!(
                    "{uplink:?} is already the uplink of bus {:?}: a physical interface connects \
                     one bus",
                    other.name
                ),
            ));
        }
        let span = match bus.span.as_deref() {
            None | Some("node") => Span::Node,
            Some("cluster") => Span::Cluster,
            Some(other) => {
                return Err(field(
                    "span",
                    format!("{other:?} is neither \"node\" nor \"cluster\""),
                ));
            }
        };
        let peers = bus
            .peers
            .iter()
            .map(|p| {
                let (address, via) = match p {
                    RawPeer::Address(a) => (a, None),
                    RawPeer::Full(RawPeerFields { address, via }) => (address, via.as_ref()),
                };
                let address = address.parse::<std::net::SocketAddr>().map_err(|_| {
                    field(
                        "peers",
                        format!(
                            "{address:?} is not an address with a port, e.g. \"192.0.2.10:20000\""
                        ),
                    )
                })?;
                if address.is_ipv6() {
                    return Err(field(
                        "peers",
                        format!(
                            "\"{address}\" is an IPv6 address: the tunnel speaks IPv4 only (run \
                             the peer's cannelloni with -4 and give its IPv4 address)"
                        ),
                    ));
                }
                let via = via
                    .map(|v| {
                        v.parse::<std::net::Ipv4Addr>().map_err(|_| {
                            field(
                                "peers",
                                format!(
                                    "via {v:?} is not an IPv4 address: give the address of the \
                                     plugin instance the peer sends to (cannelloni's -R)"
                                ),
                            )
                        })
                    })
                    .transpose()?
                    .map(std::net::IpAddr::V4);
                Ok(ExternalPeer { address, via })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tunnel = if span == Span::Cluster || !peers.is_empty() {
            let port = match bus.port {
                None => DEFAULT_TUNNEL_PORT,
                Some(p) => u16::try_from(p)
                    .ok()
                    .filter(|p| *p >= 1)
                    .ok_or_else(|| field("port", format!("{p} is not a UDP port")))?,
            };
            if let Some(other) = buses
                .iter()
                .find(|b| b.tunnel.as_ref().is_some_and(|t| t.port == port))
            {
                return Err(field(
                    "port",
                    format!(
                        "{port} is already the tunnel port of bus {:?}: each bus needs its own \
                         (cannelloni's packets do not say which bus they belong to)",
                        other.name
                    ),
                ));
            }
            let batch = match bus.batch_us {
                None => DEFAULT_BATCH,
                Some(us) => u64::try_from(us)
                    .ok()
                    .filter(|us| *us <= 100_000)
                    .map(std::time::Duration::from_micros)
                    .ok_or_else(|| field("batch_us", format!("{us} is not in 0..=100000")))?,
            };
            Some(TunnelSpec {
                span,
                port,
                peers,
                batch,
            })
        } else {
            if bus.port.is_some() || bus.batch_us.is_some() {
                return Err(field(
                    "port",
                    "port and batch_us belong to buses that span nodes (\"span\": \"cluster\") \
                     or have peers"
                        .into(),
                ));
            }
            None
        };
        let socketcand = bus
            .socketcand
            .as_ref()
            .map(|raw| socketcand_spec(raw, &buses, &field))
            .transpose()?;
        let fd = bus.fd.unwrap_or(true);
        let timing = timing_spec(&bus, fd, &field)?;
        buses.push(BusSpec {
            name: bus.name,
            fd,
            members,
            interface,
            uplink: bus.uplink,
            tunnel,
            socketcand,
            timing,
        });
    }
    Ok(buses)
}

/// The timing of a bus (`bitrate`, `data_bitrate`, `tx_queue`, `pace`), if it has a bitrate.
fn timing_spec(
    bus: &RawBus,
    fd: bool,
    field: &dyn Fn(&'static str, String) -> BusConfigError,
) -> Result<Option<TimingSpec>, BusConfigError> {
    let Some(bitrate) = bus.bitrate else {
        if bus.data_bitrate.is_some() || bus.tx_queue.is_some() || bus.pace.is_some() {
            return Err(field(
                "bitrate",
                "data_bitrate, tx_queue and pace belong to timed buses: set \"bitrate\" too \
                 (e.g. 500000)"
                    .into(),
            ));
        }
        return Ok(None);
    };
    if bus.uplink.is_some() {
        return Err(field(
            "bitrate",
            "a bus with an uplink runs at its wire's bitrate (the controller's settings in the \
             hardware configuration): remove \"bitrate\" from the bus"
                .into(),
        ));
    }
    let bitrate = u32::try_from(bitrate)
        .ok()
        .filter(|b| (MIN_BITRATE..=MAX_BITRATE).contains(b))
        .ok_or_else(|| {
            field(
                "bitrate",
                format!("{bitrate} is not in {MIN_BITRATE}..={MAX_BITRATE} bit/s"),
            )
        })?;
    let data_bitrate = match bus.data_bitrate {
        None => None,
        Some(_) if !fd => {
            return Err(field(
                "data_bitrate",
                "a classic bus (\"fd\": false) has no data phase: remove data_bitrate".into(),
            ));
        }
        Some(d) => Some(
            u32::try_from(d)
                .ok()
                .filter(|d| (bitrate..=MAX_DATA_BITRATE).contains(d))
                .ok_or_else(|| {
                    field(
                        "data_bitrate",
                        format!("{d} is not in {bitrate}..={MAX_DATA_BITRATE} bit/s (at least the bitrate)"),
                    )
                })?,
        ),
    };
    let tx_queue = match bus.tx_queue {
        None => DEFAULT_TX_QUEUE,
        Some(q) => u32::try_from(q)
            .ok()
            .filter(|q| (1..=1024).contains(q))
            .ok_or_else(|| field("tx_queue", format!("{q} is not in 1..=1024")))?,
    };
    Ok(Some(TimingSpec {
        bitrate,
        data_bitrate,
        tx_queue,
        pace: bus.pace.unwrap_or(true),
    }))
}

/// The socketcand endpoint of a bus, checked against the buses before it.
fn socketcand_spec(
    raw: &RawSocketcand,
    before: &[BusSpec],
    field: &dyn Fn(&'static str, String) -> BusConfigError,
) -> Result<SocketcandSpec, BusConfigError> {
    let port = match raw.port {
        None => DEFAULT_SOCKETCAND_PORT,
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| field("socketcand.port", format!("{p} is not a TCP port")))?,
    };
    let ip: std::net::IpAddr = match &raw.listen {
        None => std::net::Ipv4Addr::LOCALHOST.into(),
        Some(a) => a.parse().map_err(|_| {
            field(
                "socketcand.listen",
                format!(
                    "{a:?} is not an IP address (the address to listen on, e.g. \"127.0.0.1\", \
                     or \"0.0.0.0\" behind a NetworkPolicy)"
                ),
            )
        })?,
    };
    let max_clients = match raw.max_clients {
        None => DEFAULT_SOCKETCAND_CLIENTS,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| field("socketcand.max_clients", format!("{n} is not in 1..=1024")))?,
    };
    if let Some(other) = before
        .iter()
        .find(|b| b.socketcand.is_some_and(|s| s.listen.port() == port))
    {
        return Err(field(
            "socketcand.port",
            format!(
                "{port} is already the socketcand port of bus {:?}: each bus needs its own",
                other.name
            ),
        ));
    }
    Ok(SocketcandSpec {
        listen: std::net::SocketAddr::new(ip, port),
        max_clients,
    })
}

/// Reads and parses the bus configuration file at `path`.
pub fn load(path: &Path) -> Result<Vec<BusSpec>, BusConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| BusConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}
/// Counter slots the node needs at most: one per private device and one per possible member of
/// each bus, as every interface the plugin serves gets its own eBPF counters.
pub fn slots_needed(private_devices: u32, buses: &[BusSpec]) -> u64 {
    u64::from(private_devices) + buses.iter().map(|b| u64::from(b.members)).sum::<u64>()
}

/// The configuration needs more counter slots than the node's eBPF maps hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--devices {devices}{} need {needed} counter slots, the node has {capacity}: lower \
     --devices{}",
    describe_members(.members),
    if .members.is_empty() { "" } else { " or buses[].members in the bus configuration" }
)]
pub struct CapacityError {
    /// Private devices (`--devices`).
    pub devices: u32,
    /// Members of each bus, in configuration order.
    pub members: Vec<u32>,
    /// Slots needed.
    pub needed: u64,
    /// Slots the node has.
    pub capacity: u32,
}

fn describe_members(members: &[u32]) -> String {
    if members.is_empty() {
        return String::new();
    }
    let list: Vec<String> = members.iter().map(u32::to_string).collect();
    format!(" plus bus members {}", list.join("+"))
}

/// Fails when the private devices and the buses' members together need more counter slots than
/// `capacity` (the eBPF maps' `MAX_SLOTS`): the interfaces beyond it would otherwise be refused
/// one by one at PreStart, long after the plugin started and advertised them.
pub fn check_capacity(
    private_devices: u32,
    buses: &[BusSpec],
    capacity: u32,
) -> Result<(), CapacityError> {
    let needed = slots_needed(private_devices, buses);
    if needed <= u64::from(capacity) {
        return Ok(());
    }
    Err(CapacityError {
        devices: private_devices,
        members: buses.iter().map(|b| b.members).collect(),
        needed,
        capacity,
    })
}

/// A bus spec for tests elsewhere in the module.
#[cfg(test)]
pub(super) fn example(fd: bool) -> BusSpec {
    BusSpec {
        name: "powertrain".into(),
        fd,
        members: 32,
        interface: "can0".into(),
        uplink: None,
        tunnel: None,
        socketcand: None,
        timing: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus(fd: bool) -> BusSpec {
        example(fd)
    }

    #[test]
    fn configs_parse_with_defaults() {
        let json = r#"{"buses":[{"name":"powertrain","fd":true,"members":8,"interface":"pt0"},
                       {"name":"body"}]}"#;
        let buses = parse(json, "buses.json").expect("valid");
        assert_eq!(
            buses,
            [
                BusSpec {
                    name: "powertrain".into(),
                    fd: true,
                    members: 8,
                    interface: "pt0".into(),
                    uplink: None,
                    tunnel: None,
                    socketcand: None,
                    timing: None
                },
                BusSpec {
                    name: "body".into(),
                    fd: true,
                    members: DEFAULT_MEMBERS,
                    interface: DEFAULT_INTERFACE.into(),
                    uplink: None,
                    tunnel: None,
                    socketcand: None,
                    timing: None
                }
            ]
        );
        let buses = parse(r#"{"buses":[{"name":"chassis","fd":false}]}"#, "b.json").expect("valid");
        assert_eq!(buses[0].name, "chassis");
        assert_eq!(buses[0].mtu(), CanMtu::Classic);
        assert_eq!(
            buses[0]
                .resource("socketcan.io")
                .expect("valid")
                .to_string(),
            "socketcan.io/bus-chassis"
        );
        assert!(
            parse(r#"{"buses":[]}"#, "x")
                .expect("empty is fine")
                .is_empty()
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (r#"{"buses":[{"name":"Power"}]}"#, "buses[0].name"),
            (r#"{"buses":[{"name":"a"},{"name":"-b"}]}"#, "buses[1].name"),
            (r#"{"buses":[{"name":"a"},{"name":"a"}]}"#, "listed twice"),
            (
                r#"{"buses":[{"name":"a","members":0}]}"#,
                "buses[0].members",
            ),
            (
                r#"{"buses":[{"name":"a","members":10000}]}"#,
                "10000 is not in 1..=9999",
            ),
            (
                r#"{"buses":[{"name":"a","interface":"this-is-too-long"}]}"#,
                "buses[0].interface",
            ),
            (r#"{"buses":[{"name":"a","bitrate":5}]}"#, "bitrate"),
            (r#"{"buses":[{"name":"a","fd":"yes"}]}"#, "not valid"),
            (r#"{"busses":[]}"#, "busses"),
            (
                &format!(r#"{{"buses":[{{"name":"{}"}}]}}"#, "a".repeat(54)),
                "1 to 53 characters",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text, "cfg").expect_err(text);
            assert!(err.to_string().contains(expected), "{err} !~ {expected}");
        }
    }
    #[test]
    fn socketcand_endpoints_listen_on_loopback_unless_told() {
        let json = r#"{"buses":[{"name":"a","socketcand":{}},
                       {"name":"b","socketcand":{"port":29537,"listen":"0.0.0.0","max_clients":2}},
                       {"name":"c"}]}"#;
        let buses = parse(json, "buses.json").expect("valid");
        assert_eq!(
            buses[0].socketcand,
            Some(SocketcandSpec {
                listen: "127.0.0.1:29536".parse().expect("address"),
                max_clients: DEFAULT_SOCKETCAND_CLIENTS,
            })
        );
        assert_eq!(
            buses[1].socketcand,
            Some(SocketcandSpec {
                listen: "0.0.0.0:29537".parse().expect("address"),
                max_clients: 2,
            })
        );
        assert_eq!(buses[2].socketcand, None);
        for (json, message) in [
            (
                r#"{"buses":[{"name":"a","socketcand":{}},{"name":"b","socketcand":{}}]}"#,
                "buses[1].socketcand.port: 29536 is already the socketcand port of bus \"a\"",
            ),
            (
                r#"{"buses":[{"name":"a","socketcand":{"port":0}}]}"#,
                "buses[0].socketcand.port: 0 is not a TCP port",
            ),
            (
                r#"{"buses":[{"name":"a","socketcand":{"listen":"localhost"}}]}"#,
                "buses[0].socketcand.listen: \"localhost\" is not an IP address",
            ),
            (
                r#"{"buses":[{"name":"a","socketcand":{"max_clients":0}}]}"#,
                "buses[0].socketcand.max_clients: 0 is not in 1..=1024",
            ),
        ] {
            let err = parse(json, "b.json").expect_err(json).to_string();
            assert!(err.contains(message), "{err}");
        }
        let err = parse(
            r#"{"buses":[{"name":"a","socketcand":{"beacon":true}}]}"#,
            "b.json",
        )
        .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `beacon`"), "{err}");
    }

    #[test]
    fn a_bitrate_makes_a_timed_bus_and_its_fields_are_checked() {
        let buses = parse(
            r#"{"buses":[{"name":"a","bitrate":500000},
                         {"name":"b","bitrate":125000,"data_bitrate":2000000,"tx_queue":4,"pace":false},
                         {"name":"c"}]}"#,
            "cfg",
        )
        .expect("valid");
        assert_eq!(
            buses[0].timing,
            Some(TimingSpec {
                bitrate: 500_000,
                data_bitrate: None,
                tx_queue: DEFAULT_TX_QUEUE,
                pace: true
            })
        );
        assert_eq!(
            buses[1].timing,
            Some(TimingSpec {
                bitrate: 125_000,
                data_bitrate: Some(2_000_000),
                tx_queue: 4,
                pace: false
            })
        );
        assert_eq!(buses[2].timing, None);
        for (json, message) in [
            (
                r#"{"buses":[{"name":"a","bitrate":2000000}]}"#,
                "buses[0].bitrate: 2000000 is not in 10000..=1000000 bit/s",
            ),
            (
                r#"{"buses":[{"name":"a","tx_queue":3}]}"#,
                "set \"bitrate\" too",
            ),
            (
                r#"{"buses":[{"name":"a","fd":false,"bitrate":500000,"data_bitrate":2000000}]}"#,
                "buses[0].data_bitrate: a classic bus",
            ),
            (
                r#"{"buses":[{"name":"a","bitrate":500000,"data_bitrate":250000}]}"#,
                "at least the bitrate",
            ),
            (
                r#"{"buses":[{"name":"a","bitrate":500000,"tx_queue":0}]}"#,
                "buses[0].tx_queue: 0 is not in 1..=1024",
            ),
            (
                r#"{"buses":[{"name":"a","bitrate":500000,"uplink":"can0"}]}"#,
                "runs at its wire's bitrate",
            ),
        ] {
            let err = parse(json, "b.json").expect_err(json).to_string();
            assert!(err.contains(message), "{err}");
        }
    }

    #[test]
    fn buses_that_span_nodes_get_a_tunnel_each() {
        let buses = parse(
            r#"{"buses":[{"name":"a","span":"cluster"},
                         {"name":"b","peers":["192.0.2.10:20001"],"port":20001,"batch_us":0},
                         {"name":"c","span":"node"}]}"#,
            "cfg",
        )
        .expect("valid");
        assert_eq!(
            buses[0].tunnel,
            Some(TunnelSpec {
                span: Span::Cluster,
                port: DEFAULT_TUNNEL_PORT,
                peers: vec![],
                batch: DEFAULT_BATCH
            })
        );
        let b = buses[1].tunnel.as_ref().expect("peers make a tunnel");
        assert_eq!(
            (b.span, b.port, b.peers.len(), b.batch),
            (Span::Node, 20001, 1, std::time::Duration::ZERO)
        );
        assert_eq!(buses[2].tunnel, None);
        for (text, expected) in [
            (
                r#"{"buses":[{"name":"a","span":"world"}]}"#,
                "buses[0].span: \"world\" is neither",
            ),
            (
                r#"{"buses":[{"name":"a","peers":["rig:20000"]}]}"#,
                "buses[0].peers: \"rig:20000\" is not an address with a port",
            ),
            (
                r#"{"buses":[{"name":"a","peers":["[2001:db8::10]:20000"]}]}"#,
                "buses[0].peers: \"[2001:db8::10]:20000\" is an IPv6 address: the tunnel speaks \
                 IPv4 only",
            ),
            (
                r#"{"buses":[{"name":"a","peers":[{"address":"192.0.2.10:20000","via":"node-a"}]}]}"#,
                "buses[0].peers: via \"node-a\" is not an IPv4 address",
            ),
            (
                r#"{"buses":[{"name":"a","span":"cluster"},{"name":"b","span":"cluster"}]}"#,
                "buses[1].port: 20000 is already the tunnel port of bus \"a\"",
            ),
            (
                r#"{"buses":[{"name":"a","span":"cluster","port":0}]}"#,
                "buses[0].port: 0 is not a UDP port",
            ),
            (
                r#"{"buses":[{"name":"a","span":"cluster","batch_us":200000}]}"#,
                "buses[0].batch_us: 200000 is not in 0..=100000",
            ),
            (
                r#"{"buses":[{"name":"a","port":20000}]}"#,
                "buses[0].port: port and batch_us belong to buses that span nodes",
            ),
        ] {
            let err = parse(text, "cfg").expect_err(text).to_string();
            assert!(err.contains(expected), "{err} !~ {expected}");
        }
    }
    #[test]
    fn a_physical_interface_uplinks_one_bus_only() {
        let buses = parse(
            r#"{"buses":[{"name":"plant","fd":false,"uplink":"wire"},{"name":"other"}]}"#,
            "cfg",
        )
        .expect("valid");
        assert_eq!(buses[0].uplink.as_deref(), Some("wire"));
        assert_eq!(buses[1].uplink, None);
        let err = parse(
            r#"{"buses":[{"name":"a","uplink":"wire"},{"name":"b","uplink":"wire"}]}"#,
            "cfg",
        )
        .expect_err("one uplink, two buses");
        assert_eq!(
            err.to_string(),
            "the bus configuration cfg: buses[1].uplink: \"wire\" is already the uplink of bus \
             \"a\": a physical interface connects one bus"
        );
    }
    #[test]
    fn the_longest_bus_name_still_makes_valid_annotation_keys_and_device_ids() {
        let name = "a".repeat(MAX_NAME_LEN);
        let buses = parse(&format!(r#"{{"buses":[{{"name":"{name}"}}]}}"#), "cfg").expect("valid");
        let key = annotations::bus_interface_key("socketcan.io", &buses[0].name);
        let (_, option) = key.split_once('/').expect("domain/name");
        assert!(
            option.len() <= 63,
            "{option} is {} characters",
            option.len()
        );
        assert!(format!("{RESOURCE_PREFIX}{name}-0001").len() <= 63);
    }
    #[test]
    fn capacity_counts_private_devices_and_every_possible_member() {
        let buses = [
            bus(true),
            BusSpec {
                name: "body".into(),
                members: 9999,
                ..bus(false)
            },
        ];
        assert_eq!(slots_needed(100, &buses), 10_131);
        assert_eq!(slots_needed(0, &[]), 0);
        assert_eq!(slots_needed(u32::MAX, &buses), u64::from(u32::MAX) + 10_031);
        check_capacity(4096 - 32, &buses[..1], 4096).expect("exactly full");
        let err = check_capacity(100, &buses, 4096).expect_err("too many");
        assert_eq!(
            err.to_string(),
            "--devices 100 plus bus members 32+9999 need 10131 counter slots, the node has 4096: \
             lower --devices or buses[].members in the bus configuration"
        );
        let err = check_capacity(5000, &[], 4096).expect_err("too many devices");
        assert_eq!(
            err.to_string(),
            "--devices 5000 need 5000 counter slots, the node has 4096: lower --devices"
        );
    }

    /// The JSON of the first ```json block after `heading` in `markdown`.
    fn json_after(markdown: &str, heading: &str) -> String {
        let (_, rest) = markdown.split_once(heading).expect("heading");
        let (_, block) = rest.split_once("```json\n").expect("json block");
        block.split_once("```").expect("closed").0.to_string()
    }

    #[test]
    fn the_shipped_examples_give_each_bus_its_own_interface_name() {
        let yaml = include_str!("../../../deploy/components/shared-buses/configmap.yaml");
        let (_, json) = yaml.split_once("buses.json: |\n").expect("buses.json");
        let readme = include_str!("../../../README.md");
        for (what, json) in [
            ("configmap", json.to_string()),
            ("README", json_after(readme, "## Shared buses")),
        ] {
            let buses = parse(&json, what).expect(what);
            assert!(buses.len() >= 2, "{what}");
            let mut names: Vec<&str> = buses.iter().map(|b| b.interface.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), buses.len(), "{what}: {json}");
        }
    }
}
