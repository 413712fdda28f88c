//! Shared CAN buses between the pods of a node.
//!
//! Each bus named in the plugin's bus configuration is its own extended resource
//! (`<domain>/bus-<name>`). A pod holding it gets one interface in its namespace: the pod end of a
//! [`crate::kernel::vxcan`] pair whose other end (the *bus end*) lives in a network namespace the plugin
//! owns for that bus, bind-mounted under the state directory so it outlives plugin restarts. In
//! that namespace [`crate::kernel::cangw`] rules forward every frame arriving on one bus end out of every
//! other bus end.
//!
//! Topology: a full mesh of rules, one per ordered pair of members (and per frame kind on an FD
//! bus). can-gw routes a frame at most `max_hops` times, 1 by default; that is a parameter of the
//! can-gw module, shared by every user of the node, which a device plugin has no business changing.
//! A hub (every member forwarding to one end that forwards to everyone) needs two hops; the mesh
//! needs one, never returns a frame to its sender and touches only the joining or leaving member's
//! 2·(n−1) rules. n·(n−1) rules are few for the tens of members a node hosts (992 for 32).
//!
//! Every lock here belongs to one [`Bus`]: a join or leave on one bus never waits for another bus,
//! nor for the pods with private interfaces.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::kernel::cangw::{Filter, Gateway, GatewayError, ListedRule, Rule};
use crate::kernel::link::{self, CanMtu, LinkError, Links};
use crate::kernel::netns::{self, Netns, NetnsError};
use crate::kernel::vxcan::{self, VxcanError, VxcanPair, VxcanSpec};
use crate::pod::annotations::{self, PodConfigError};
use crate::pod::resources::PodRef;
use crate::resource::{ResourceName, ResourceNameError};

/// Members per node when the configuration does not say.
pub const DEFAULT_MEMBERS: u32 = 32;
/// The pod's interface name when neither the configuration nor the pod says.
pub const DEFAULT_INTERFACE: &str = "can0";
/// The resource name of bus `name` is `<domain>/bus-<name>`.
pub const RESOURCE_PREFIX: &str = "bus-";
/// The annotation option (after the domain) holding a member's receive filters.
pub const FILTER_OPTION: &str = "filter";
/// Most receive filters one member may list. Each filter is one more rule from every other member
/// (two on an FD bus), so filters multiply the bus's rules; and the overlap check compares every
/// two filters of a member, which stays cheap up to this count.
pub const MAX_FILTERS: usize = 64;
/// Longest bus name. Kubernetes allows 63 characters after the domain: the device IDs
/// `bus-<name>-NNNN` would allow 54, and the annotation `interface.<name>` 53.
const MAX_NAME_LEN: usize = 63 - annotations::BUS_INTERFACE_OPTION.len();

/// `CAN_EFF_FLAG`: the identifier is extended (29 bits).
const CAN_EFF_FLAG: u32 = 0x8000_0000;
const CAN_SFF_MASK: u32 = 0x7FF;
const CAN_EFF_MASK: u32 = 0x1FFF_FFFF;

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
    /// [`member_config`]).
    pub interface: String,
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
}

/// Whether `s` can name a bus: a DNS label of at most 53 characters.
pub(crate) fn is_bus_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
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
            .unwrap_or_else(|| DEFAULT_INTERFACE.to_string());
        link::validate_name(&interface).map_err(|e| field("interface", e.to_string()))?;
        buses.push(BusSpec {
            name: bus.name,
            fd: bus.fd.unwrap_or(true),
            members,
            interface,
        });
    }
    Ok(buses)
}

/// Reads and parses the bus configuration file at `path`.
pub fn load(path: &Path) -> Result<Vec<BusSpec>, BusConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| BusConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// What a member pod asks for by annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberConfig {
    /// The pod end's interface name.
    pub interface: String,
    /// Receive filters: the member gets only frames passing one of them; empty for every frame.
    pub filters: Vec<Filter>,
}

/// What is wrong with a member's annotations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemberConfigError {
    /// The same checks as for private interfaces (unknown option, bad name).
    #[error(transparent)]
    Pod(#[from] PodConfigError),
    /// More filters than [`MAX_FILTERS`].
    #[error(
        "annotation {key} lists {count} filters, more than the {max} a member may have: combine \
         filters with wider masks"
    )]
    TooManyFilters {
        /// The annotation key.
        key: String,
        /// How many filters it lists.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A filter is not `ID:MASK` in hex.
    #[error(
        "annotation {key}: {entry:?} is not a filter: expected ID:MASK in hex, 3 digits for a \
         standard ID or 8 for an extended one, e.g. \"123:7FF,200:700\" or \"18DAF110:1FFFFFFF\""
    )]
    BadFilter {
        /// The annotation key.
        key: String,
        /// The offending entry.
        entry: String,
    },
    /// Two filters match the same frames, which would then arrive twice.
    #[error(
        "annotation {key}: filters {a:?} and {b:?} both match some identifiers, whose frames \
         would arrive twice: make the filters disjoint"
    )]
    Overlap {
        /// The annotation key.
        key: String,
        /// One filter.
        a: String,
        /// The other.
        b: String,
    },
}

/// Parses one filter, `ID:MASK` in hex. A 3-digit ID is a standard (11-bit) identifier and matches
/// standard frames only; an 8-digit ID is an extended (29-bit) one and matches extended frames
/// only (the kernel's filters would otherwise let a standard filter match extended frames whose
/// low bits agree).
pub fn parse_filter(entry: &str) -> Option<Filter> {
    let (id, mask) = entry.trim().split_once(':')?;
    let hex = |s: &str| {
        (!s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    let (id_value, mask_value) = (hex(id)?, hex(mask)?);
    match id.len() {
        3 if id_value <= CAN_SFF_MASK && mask_value <= CAN_SFF_MASK => Some(Filter {
            id: id_value,
            mask: mask_value | CAN_EFF_FLAG,
        }),
        8 if id_value <= CAN_EFF_MASK && mask_value <= CAN_EFF_MASK => Some(Filter {
            id: id_value | CAN_EFF_FLAG,
            mask: mask_value | CAN_EFF_FLAG,
        }),
        _ => None,
    }
}

/// Whether some frame passes both filters.
fn overlap(a: &Filter, b: &Filter) -> bool {
    (a.id ^ b.id) & a.mask & b.mask == 0
}

/// Works out a member's interface name and filters from its pod's `annotations` under `domain`.
///
/// The interface name is `<domain>/interface.<bus>` if set, else the first name of
/// `<domain>/names` (one list for every resource of the pod, kept for pods on a single bus), else
/// the bus's. `<domain>/filter` lists receive filters, comma-separated, at most [`MAX_FILTERS`].
pub fn member_config(
    domain: &str,
    annotations: &HashMap<String, String>,
    bus: &BusSpec,
) -> Result<MemberConfig, MemberConfigError> {
    // The shared checks (unknown options, valid names) as for the pod's private interfaces.
    // Any count of names works here: only the first one is used.
    let named = annotations::interfaces(domain, annotations, 64)?;
    let per_bus = annotations
        .get(&annotations::bus_interface_key(domain, &bus.name))
        .map(|v| v.trim().to_string());
    let explicit = annotations
        .get(&format!("{domain}/names"))
        .is_some_and(|v| v.split(',').any(|n| !n.trim().is_empty()));
    let interface = match (per_bus, named.first()) {
        (Some(name), _) => name,
        (None, Some(spec)) if explicit => spec.name.clone(),
        _ => bus.interface.clone(),
    };
    let key = format!("{domain}/{FILTER_OPTION}");
    let entries: Vec<&str> = annotations
        .get(&key)
        .map(|v| v.split(',').map(str::trim).filter(|e| !e.is_empty()))
        .into_iter()
        .flatten()
        .collect();
    if entries.len() > MAX_FILTERS {
        return Err(MemberConfigError::TooManyFilters {
            key,
            count: entries.len(),
            max: MAX_FILTERS,
        });
    }
    let mut filters: Vec<(&str, Filter)> = Vec::with_capacity(entries.len());
    for entry in entries {
        let filter = parse_filter(entry).ok_or_else(|| MemberConfigError::BadFilter {
            key: key.clone(),
            entry: entry.to_string(),
        })?;
        // Every two filters are compared: at most 64·63/2 pairs, and overlapping is no
        // equivalence that hashing could decide.
        if let Some((other, _)) = filters.iter().find(|(_, f)| overlap(f, &filter)) {
            return Err(MemberConfigError::Overlap {
                key,
                a: other.to_string(),
                b: entry.to_string(),
            });
        }
        filters.push((entry, filter));
    }
    Ok(MemberConfig {
        interface,
        filters: filters.into_iter().map(|(_, f)| f).collect(),
    })
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

/// The bus end's name for the member holding device `device_id` (`bus-x-0007` → `m0007`): unique
/// in the bus namespace and stable across plugin restarts, as device IDs are.
pub fn bus_end_name(device_id: &str) -> Option<String> {
    let (_, n) = device_id.rsplit_once('-')?;
    (n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit())).then(|| format!("m{n}"))
}

/// What went wrong joining, leaving or inspecting a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus namespace could not be made or entered.
    #[error("bus {bus}: its namespace {ns}: {source}")]
    Namespace {
        /// The bus.
        bus: String,
        /// The namespace file.
        ns: String,
        /// What failed.
        source: NetnsError,
    },
    /// The member's interface name is already taken in its pod: by the interface of another bus,
    /// a private vcan or anything else that is not this bus's pair.
    #[error(
        "interface {interface} is already used in the pod by another bus or a private interface \
         ({holder}): set annotation {annotation} to a different name"
    )]
    InterfaceInUse {
        /// The bus.
        bus: String,
        /// The interface name.
        interface: String,
        /// What has the name, e.g. "a vcan interface".
        holder: String,
        /// The annotation choosing the member's interface name on this bus.
        annotation: String,
    },
    /// The vxcan pair could not be made, found or deleted.
    #[error("bus {bus}: {source}")]
    Vxcan {
        /// The bus.
        bus: String,
        /// What failed.
        source: VxcanError,
    },
    /// Listing the bus ends failed.
    #[error("bus {bus}: {source}")]
    Link {
        /// The bus.
        bus: String,
        /// What failed.
        source: LinkError,
    },
    /// A can-gw request failed.
    #[error("bus {bus}: {source}")]
    Gateway {
        /// The bus.
        bus: String,
        /// What failed.
        source: GatewayError,
    },
}

/// One member as the plugin knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The pod.
    pub pod: PodRef,
    /// The pod's sandbox ID.
    pub sandbox: String,
    /// The bus end's name in the bus namespace.
    pub bus_end: String,
    /// The bus end's interface index in the bus namespace.
    pub bus_index: u32,
    /// The member's receive filters.
    pub filters: Vec<Filter>,
}

/// A bus's members and frame totals, read now ([`Bus::stats`]).
#[derive(Debug)]
pub struct BusStats {
    /// Members known to the plugin; known even when the counters cannot be read.
    pub members: usize,
    /// The frame totals, or why they could not be read. There is deliberately no default: zeros
    /// standing in for a failed read would look like a counter reset to Prometheus.
    pub frames: Result<FrameTotals, BusError>,
}

/// Frames a bus's rules have forwarded and dropped since the plugin started, current rules and
/// rules since deleted together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTotals {
    /// Rules in the bus namespace.
    pub rules: usize,
    /// Frames forwarded (can-gw's 32-bit counters, widened).
    pub forwarded: u64,
    /// Frames dropped.
    pub dropped: u64,
}

/// A configured bus and its members on this node.
#[derive(Debug)]
pub struct Bus {
    spec: BusSpec,
    resource: ResourceName,
    ns_path: PathBuf,
    /// Members by sandbox ID. Held only for map updates.
    members: Mutex<HashMap<String, Member>>,
    /// Held shared by joins while they use the namespace, exclusively to remove it.
    namespace: tokio::sync::RwLock<()>,
    /// Serialises the rule changes of joins and leaves: a member's rules are computed from the
    /// others', so two joins must not interleave there, and [`crate::kernel::cangw`] leaves serialising
    /// its list-then-change sequences to its callers (can-gw would take a rule added twice).
    /// Pair creation and counter attachment, the slow parts of a join, run outside it; other
    /// buses and private pods never wait on it.
    rules: tokio::sync::Mutex<()>,
    /// Serialises creating the namespace (two joins must not mount two namespaces on one file).
    creating: Mutex<()>,
    /// Counters of the rules as last read, and the sums of rules since deleted, so the bus
    /// totals do not go down when members leave. Held from listing the rules until their counts
    /// are recorded: a listing recorded after a newer one would look like a wrap-around.
    counted: Mutex<Counted>,
}

/// See [`Bus::stats`].
#[derive(Debug, Default)]
struct Counted {
    last_seen: HashMap<Rule, Seen>,
    retired: (u64, u64),
}

impl Counted {
    /// Records the rules' counters as read now. With `complete`, `listed` is every rule of the
    /// bus, and rules seen before but missing now (deleted, by the plugin or by the kernel with
    /// their interface) have their last counts added to the retired sums.
    fn note(&mut self, listed: &[ListedRule], complete: bool) {
        let now: HashMap<Rule, (u32, u32)> = listed
            .iter()
            .filter(|l| !l.foreign)
            .map(|l| (l.rule, (l.counters.handled, l.counters.dropped)))
            .collect();
        if complete {
            let retired = &mut self.retired;
            self.last_seen.retain(|rule, seen| {
                let keep = now.contains_key(rule);
                if !keep {
                    retired.0 += seen.total.0;
                    retired.1 += seen.total.1;
                }
                keep
            });
        }
        for (rule, raw) in now {
            self.last_seen
                .entry(rule)
                .and_modify(|seen| seen.advance(raw))
                .or_insert_with(|| Seen::new(raw));
        }
    }

    fn totals(&self) -> FrameTotals {
        let mut totals = FrameTotals {
            rules: self.last_seen.len(),
            forwarded: self.retired.0,
            dropped: self.retired.1,
        };
        for seen in self.last_seen.values() {
            totals.forwarded += seen.total.0;
            totals.dropped += seen.total.1;
        }
        totals
    }
}

/// One rule's counters: the kernel's 32-bit values as last read, and the 64-bit totals they add
/// up to across wrap-arounds (a busy bus passes 2^32 frames in days).
#[derive(Debug, Clone, Copy)]
struct Seen {
    raw: (u32, u32),
    total: (u64, u64),
}

impl Seen {
    fn new(raw: (u32, u32)) -> Self {
        Seen {
            raw,
            total: (u64::from(raw.0), u64::from(raw.1)),
        }
    }

    /// Advances to `raw`; a value below the last one has wrapped.
    fn advance(&mut self, raw: (u32, u32)) {
        self.total.0 += u64::from(raw.0.wrapping_sub(self.raw.0));
        self.total.1 += u64::from(raw.1.wrapping_sub(self.raw.1));
        self.raw = raw;
    }
}

/// The rules that deliver frames from `src` to `dst`: one per filter of `dst` (or one without a
/// filter), each for classic frames and, on an FD bus, for FD frames.
fn rules_between(src: &Member, dst: &Member, mtu: CanMtu) -> Vec<Rule> {
    let filters: Vec<Option<Filter>> = if dst.filters.is_empty() {
        vec![None]
    } else {
        dst.filters.iter().copied().map(Some).collect()
    };
    let mut rules = Vec::new();
    for filter in filters {
        let mut kinds = vec![Rule::classic(src.bus_index, dst.bus_index)];
        if mtu == CanMtu::Fd {
            kinds.push(Rule::can_fd(src.bus_index, dst.bus_index));
        }
        for rule in kinds {
            rules.push(match filter {
                Some(f) => rule.with_filter(f.id, f.mask),
                None => rule,
            });
        }
    }
    rules
}

impl Bus {
    /// Bus `spec` under `domain`, with its namespace file in `<state_dir>/buses/`.
    pub fn new(spec: BusSpec, domain: &str, state_dir: &Path) -> Result<Self, ResourceNameError> {
        Ok(Bus {
            resource: spec.resource(domain)?,
            ns_path: state_dir.join("buses").join(&spec.name),
            spec,
            members: Mutex::new(HashMap::new()),
            namespace: tokio::sync::RwLock::new(()),
            rules: tokio::sync::Mutex::new(()),
            creating: Mutex::new(()),
            counted: Mutex::new(Counted::default()),
        })
    }

    /// The configuration.
    pub fn spec(&self) -> &BusSpec {
        &self.spec
    }

    /// The bus's extended resource.
    pub fn resource(&self) -> &ResourceName {
        &self.resource
    }

    /// The bus namespace's file.
    pub fn namespace(&self) -> &Path {
        &self.ns_path
    }

    fn ns(&self) -> Netns {
        Netns::Path(self.ns_path.clone())
    }

    fn lock_members(&self) -> std::sync::MutexGuard<'_, HashMap<String, Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_counted(&self) -> std::sync::MutexGuard<'_, Counted> {
        // Counted's updates cannot panic halfway, so a poisoned lock is still usable.
        self.counted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The members, sorted by pod.
    pub fn members(&self) -> Vec<Member> {
        let mut members: Vec<Member> = self.lock_members().values().cloned().collect();
        members.sort_by(|a, b| a.pod.cmp(&b.pod));
        members
    }

    fn gateway_error(&self, source: GatewayError) -> BusError {
        BusError::Gateway {
            bus: self.spec.name.clone(),
            source,
        }
    }

    /// The bus ends present in the namespace, by name → index.
    fn bus_ends(&self) -> Result<HashMap<String, u32>, BusError> {
        let mut links = Links::open(&self.ns()).map_err(|source| BusError::Link {
            bus: self.spec.name.clone(),
            source,
        })?;
        Ok(links
            .list()
            .map_err(|source| BusError::Link {
                bus: self.spec.name.clone(),
                source,
            })?
            .into_iter()
            .filter(|l| l.kind == "vxcan")
            .map(|l| (l.name, l.index))
            .collect())
    }

    /// Makes the pod in `pod_ns` a member: ensures the bus namespace, the vxcan pair (pod end
    /// `config.interface`, bus end `bus_end`) and the rules between it and every other member, all
    /// in place on return. Repeating it changes nothing, so a restarted plugin adopts members with
    /// it without interrupting traffic.
    pub async fn join(
        self: &Arc<Self>,
        pod: &PodRef,
        sandbox: &str,
        pod_ns: &Netns,
        bus_end: &str,
        config: &MemberConfig,
    ) -> Result<VxcanPair, BusError> {
        let _namespace = self.namespace.read().await;
        let pair = {
            let (bus, pod_ns, bus_end, interface) = (
                self.clone(),
                pod_ns.clone(),
                bus_end.to_string(),
                config.interface.clone(),
            );
            self.blocking(move || bus.make_pair(&pod_ns, &bus_end, &interface))
                .await??
        };
        let me = Member {
            pod: pod.clone(),
            sandbox: sandbox.to_string(),
            bus_end: pair.peer_name.clone(),
            bus_index: pair.peer_index,
            filters: config.filters.clone(),
        };
        let _rules = self.rules.lock().await;
        let bus = self.clone();
        self.blocking(move || bus.connect(me)).await??;
        Ok(pair)
    }

    /// Runs blocking namespace work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, BusError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| BusError::Namespace {
                bus: self.spec.name.clone(),
                ns: self.ns_path.display().to_string(),
                source: NetnsError::Thread(e.to_string()),
            })
    }

    /// The namespace (made if missing) and the member's pair in it.
    fn make_pair(
        &self,
        pod_ns: &Netns,
        bus_end: &str,
        interface: &str,
    ) -> Result<VxcanPair, BusError> {
        let ns = self.ns();
        {
            let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
            netns::create_persistent(&self.ns_path).map_err(|source| BusError::Namespace {
                bus: self.spec.name.clone(),
                ns: ns.to_string(),
                source,
            })?;
        }
        let spec = VxcanSpec {
            name: interface.to_string(),
            peer_name: bus_end.to_string(),
            mtu: self.spec.mtu(),
        };
        match vxcan::ensure(pod_ns, &ns, &spec) {
            // The bus end is named after the device, which the kubelet gives one pod at a time:
            // a bus end of that name is what is left of the device's previous holder, whose
            // namespace the kernel has not finished tearing down (or a member deleted while the
            // plugin was down). Deleting it takes its pair and its rules with it.
            Err(VxcanError::Link(crate::kernel::link::LinkError::NameTaken { name, .. }))
                if name == bus_end =>
            {
                tracing::info!(bus = %self.spec.name, bus_end, "removing the bus end left by the device's previous holder");
                vxcan::delete(&ns, bus_end).map_err(|source| self.vxcan_error(source))?;
                vxcan::ensure(pod_ns, &ns, &spec)
            }
            other => other,
        }
        .map_err(|source| self.vxcan_error(source))
    }

    /// A taken interface name in the pod becomes an error naming the annotation to set; the
    /// annotation cannot help with `ensure`'s other errors, which concern the bus end or the
    /// node.
    fn vxcan_error(&self, source: VxcanError) -> BusError {
        match source {
            VxcanError::NameInUse { name, holder, .. } => BusError::InterfaceInUse {
                bus: self.spec.name.clone(),
                interface: name,
                holder,
                annotation: annotations::bus_interface_key(self.resource.domain(), &self.spec.name),
            },
            source => BusError::Vxcan {
                bus: self.spec.name.clone(),
                source,
            },
        }
    }

    /// Adds the rules between `me` and every other member and records `me` (with the rules lock).
    fn connect(&self, me: Member) -> Result<(), BusError> {
        // Members whose bus end is gone (their pod went away, not yet reconciled) get no rules.
        let present = self.bus_ends()?;
        let others: Vec<Member> = self
            .lock_members()
            .values()
            .filter(|m| m.sandbox != me.sandbox && present.get(&m.bus_end) == Some(&m.bus_index))
            .cloned()
            .collect();
        let mut rules = Vec::new();
        for other in &others {
            rules.extend(rules_between(&me, other, self.spec.mtu()));
            rules.extend(rules_between(other, &me, self.spec.mtu()));
        }
        let mut gw = Gateway::open(&self.ns()).map_err(|e| self.gateway_error(e))?;
        let added = gw.add_missing(&rules).map_err(|e| self.gateway_error(e))?;
        tracing::debug!(bus = %self.spec.name, pod = %me.pod, bus_end = %me.bus_end, added, "member joined");
        self.lock_members().insert(me.sandbox.clone(), me);
        Ok(())
    }

    /// Removes the members of `sandboxes` — their rules and pairs, if still there — and then the
    /// bus namespace if no member is left. Returns the members that were removed.
    pub async fn leave(self: &Arc<Self>, sandboxes: Vec<String>) -> Result<Vec<Member>, BusError> {
        let left = {
            let _rules = self.rules.lock().await;
            let bus = self.clone();
            self.blocking(move || {
                let mut left = Vec::new();
                for sandbox in &sandboxes {
                    if let Some(m) = bus.leave_one(sandbox)? {
                        left.push(m);
                    }
                }
                Ok::<_, BusError>(left)
            })
            .await??
        };
        let _namespace = self.namespace.write().await;
        let bus = self.clone();
        self.blocking(move || bus.remove_if_unused()).await??;
        Ok(left)
    }

    fn leave_one(&self, sandbox: &str) -> Result<Option<Member>, BusError> {
        let Some(member) = self.lock_members().remove(sandbox) else {
            return Ok(None);
        };
        if self.ns_path.exists() {
            // The pod's namespace going away already took the pair and the kernel its rules. Only
            // if the same bus end is still there are they deleted here (a reused index could
            // belong to a newer member).
            let ends = self.bus_ends()?;
            if ends.get(&member.bus_end) == Some(&member.bus_index) {
                let mut gw = Gateway::open(&self.ns()).map_err(|e| self.gateway_error(e))?;
                // The final counts of the rules about to go, for the bus totals, recorded before
                // a scrape can record an older listing of them.
                let mut counted = self.lock_counted();
                let listed = gw.list().map_err(|e| self.gateway_error(e))?;
                counted.note(&listed, false);
                gw.delete_interface(member.bus_index)
                    .map_err(|e| self.gateway_error(e))?;
                drop(counted);
                vxcan::delete(&self.ns(), &member.bus_end).map_err(|source| BusError::Vxcan {
                    bus: self.spec.name.clone(),
                    source,
                })?;
            }
        }
        Ok(Some(member))
    }

    /// Destroys the bus namespace if no member is known and no bus end is left in it (blocking;
    /// joins must not be using the namespace). Returns whether it did.
    fn remove_if_unused(&self) -> Result<bool, BusError> {
        if !self.lock_members().is_empty() || !self.ns_path.exists() {
            return Ok(false);
        }
        match self.bus_ends() {
            Ok(ends) if !ends.is_empty() => return Ok(false),
            // A placeholder file that is no namespace (a failed earlier creation) goes as well.
            Ok(_) | Err(BusError::Link { .. }) => {}
            Err(e) => return Err(e),
        }
        let removed =
            netns::remove_persistent(&self.ns_path).map_err(|source| BusError::Namespace {
                bus: self.spec.name.clone(),
                ns: self.ns_path.display().to_string(),
                source,
            })?;
        if removed {
            tracing::info!(bus = %self.spec.name, "last member left: bus namespace removed");
        }
        Ok(removed)
    }

    /// Members and can-gw's counters, read now (blocking).
    ///
    /// can-gw keeps counters per rule, and a rule's counters go with it when a member leaves. The
    /// totals therefore add the last counts read of every rule since deleted (read at each call and
    /// just before the plugin deletes a member's rules), so they only go down when the plugin
    /// restarts or a member's pod goes away between a scrape and its last frames (Prometheus
    /// takes a decrease for a counter reset). The kernel's counters are 32 bits wide.
    ///
    /// When the rules cannot be listed, [`BusStats::frames`] is the error and nothing is recorded:
    /// the rules seen before are neither forgotten nor counted as deleted.
    pub fn stats(&self) -> BusStats {
        let members = self.lock_members().len();
        BusStats {
            members,
            frames: self.frame_totals(),
        }
    }

    fn frame_totals(&self) -> Result<FrameTotals, BusError> {
        let mut counted = self.lock_counted();
        let listed = if self.ns_path.exists() {
            let mut gw = Gateway::open(&self.ns()).map_err(|e| self.gateway_error(e))?;
            gw.list().map_err(|e| self.gateway_error(e))?
        } else {
            Vec::new()
        };
        counted.note(&listed, true);
        Ok(counted.totals())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_counters_keep_counting_across_the_kernels_32_bit_wrap() {
        let mut seen = Seen::new((u32::MAX - 1, 5));
        seen.advance((3, 5));
        assert_eq!(seen.total, (u64::from(u32::MAX) + 4, 5));
        seen.advance((10, 7));
        assert_eq!(seen.total, (u64::from(u32::MAX) + 11, 7));
    }

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn bus(fd: bool) -> BusSpec {
        BusSpec {
            name: "powertrain".into(),
            fd,
            members: 32,
            interface: "can0".into(),
        }
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
                    interface: "pt0".into()
                },
                BusSpec {
                    name: "body".into(),
                    fd: true,
                    members: DEFAULT_MEMBERS,
                    interface: DEFAULT_INTERFACE.into()
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
    fn filters_follow_candump_syntax_and_keep_standard_and_extended_apart() {
        assert_eq!(
            parse_filter("123:7FF"),
            Some(Filter {
                id: 0x123,
                mask: 0x7FF | CAN_EFF_FLAG
            })
        );
        assert_eq!(
            parse_filter("18DAF110:1FFFFFFF"),
            Some(Filter {
                id: 0x18DA_F110 | CAN_EFF_FLAG,
                mask: CAN_EFF_MASK | CAN_EFF_FLAG
            })
        );
        for bad in [
            "123", "12:7FF", "800:7FF", "123:FFF", "xyz:7FF", "123:", "~123:7FF",
        ] {
            assert_eq!(parse_filter(bad), None, "{bad}");
        }
    }

    #[test]
    fn member_annotations_pick_name_and_filters() {
        let b = bus(true);
        let plain = member_config("socketcan.io", &HashMap::new(), &b).expect("defaults");
        assert_eq!(
            plain,
            MemberConfig {
                interface: "can0".into(),
                filters: vec![]
            }
        );
        let a = ann(&[
            ("socketcan.io/names", "pt"),
            ("socketcan.io/filter", "123:7FF, 200:700"),
        ]);
        let m = member_config("socketcan.io", &a, &b).expect("valid");
        assert_eq!(m.interface, "pt");
        assert_eq!(m.filters.len(), 2);

        let err = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", "123:7FF,100:700")]),
            &b,
        )
        .expect_err("overlap");
        assert!(matches!(err, MemberConfigError::Overlap { .. }), "{err}");
        let err = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", "12G:7FF")]),
            &b,
        )
        .expect_err("bad");
        assert!(err.to_string().contains("\"12G:7FF\""), "{err}");
        let err = member_config("socketcan.io", &ann(&[("socketcan.io/bitrate", "1")]), &b)
            .expect_err("unknown");
        assert!(err.to_string().contains("unknown annotation"), "{err}");
        // A standard and an extended filter never overlap.
        member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", "123:7FF,00000123:1FFFFFFF")]),
            &b,
        )
        .expect("disjoint");
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
    fn at_most_64_filters_and_the_error_says_how_many() {
        let list = |n: u32| -> String {
            (0..n)
                .map(|i| format!("{i:03X}:7FF"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let b = bus(true);
        let m = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", &list(64))]),
            &b,
        )
        .expect("64 disjoint filters");
        assert_eq!(m.filters.len(), MAX_FILTERS);
        let err = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", &list(65))]),
            &b,
        )
        .expect_err("65 filters");
        assert_eq!(
            err,
            MemberConfigError::TooManyFilters {
                key: "socketcan.io/filter".into(),
                count: 65,
                max: 64
            }
        );
        assert_eq!(
            err.to_string(),
            "annotation socketcan.io/filter lists 65 filters, more than the 64 a member may have: \
             combine filters with wider masks"
        );
        // Counted before anything is parsed: a long list is refused as such, whatever it holds.
        let junk = vec!["x"; 100].join(",");
        let err = member_config("socketcan.io", &ann(&[("socketcan.io/filter", &junk)]), &b)
            .expect_err("100 entries");
        assert!(
            matches!(err, MemberConfigError::TooManyFilters { count: 100, .. }),
            "{err}"
        );
    }

    #[test]
    fn each_bus_takes_its_own_interface_annotation_first() {
        let pt = bus(true);
        let body = BusSpec {
            name: "body".into(),
            ..bus(false)
        };
        let a = ann(&[
            ("socketcan.io/interface.body", "can1"),
            ("socketcan.io/names", "pt"),
        ]);
        assert_eq!(
            member_config("socketcan.io", &a, &body)
                .expect("valid")
                .interface,
            "can1"
        );
        // Not this bus's key: `names` applies as before.
        assert_eq!(
            member_config("socketcan.io", &a, &pt)
                .expect("valid")
                .interface,
            "pt"
        );
        let only_other = ann(&[("socketcan.io/interface.body", "can1")]);
        assert_eq!(
            member_config("socketcan.io", &only_other, &pt)
                .expect("valid")
                .interface,
            "can0"
        );
        let err = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/interface.body", "no/slash")]),
            &pt,
        )
        .expect_err("invalid name on any bus");
        assert!(
            err.to_string()
                .starts_with("annotation socketcan.io/interface.body: "),
            "{err}"
        );
    }

    #[test]
    fn a_name_taken_in_the_pod_names_the_annotation_to_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = Bus::new(
            BusSpec {
                name: "body".into(),
                ..bus(false)
            },
            "socketcan.io",
            dir.path(),
        )
        .expect("valid");
        let err = body.vxcan_error(VxcanError::NameInUse {
            name: "can0".into(),
            ns: "/proc/7/ns/net".into(),
            holder: "a vxcan pair whose other end is in another namespace, not /run/x".into(),
        });
        assert!(matches!(err, BusError::InterfaceInUse { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "interface can0 is already used in the pod by another bus or a private interface (a \
             vxcan pair whose other end is in another namespace, not /run/x): set annotation \
             socketcan.io/interface.body to a different name"
        );
        // Errors about the bus end or the node are not the pod's to fix by annotation.
        let err = body.vxcan_error(VxcanError::VxcanUnsupported);
        assert!(matches!(err, BusError::Vxcan { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn joining_with_a_name_the_pod_already_uses_names_the_annotation() {
        // Every namespace has a `lo`, and finding it needs neither vxcan nor can-gw.
        let dir = tempfile::tempdir().expect("tempdir");
        let pod_ns = dir.path().join("pod");
        netns::create_persistent(&pod_ns).expect("pod namespace (needs root)");
        let bus = Arc::new(Bus::new(bus(true), "socketcan.io", dir.path()).expect("valid"));
        let pod = PodRef {
            namespace: "default".into(),
            name: "x".into(),
        };
        let config = MemberConfig {
            interface: "lo".into(),
            filters: vec![],
        };
        let joined = bus
            .join(
                &pod,
                "sandbox",
                &Netns::Path(pod_ns.clone()),
                "m0000",
                &config,
            )
            .await;
        let left = bus.leave(vec![]).await;
        netns::remove_persistent(&pod_ns).expect("remove the pod namespace");
        let err = joined.expect_err("lo is taken");
        assert_eq!(
            err.to_string(),
            "interface lo is already used in the pod by another bus or a private interface (an \
             interface of unknown kind): set annotation socketcan.io/interface.powertrain to a \
             different name"
        );
        assert!(left.expect("leave").is_empty());
        assert!(
            !bus.namespace().exists(),
            "the bus namespace went with the last member"
        );
    }

    fn listed(rule: Rule, handled: u32, dropped: u32) -> ListedRule {
        ListedRule {
            rule,
            counters: crate::kernel::cangw::Counters {
                handled,
                dropped,
                deleted: 0,
            },
            foreign: false,
        }
    }

    #[test]
    fn deleted_rules_keep_counting_in_the_totals() {
        let (a, b) = (Rule::classic(2, 3), Rule::classic(3, 2));
        let mut counted = Counted::default();
        counted.note(&[listed(a, 10, 1), listed(b, 5, 0)], true);
        assert_eq!(
            counted.totals(),
            FrameTotals {
                rules: 2,
                forwarded: 15,
                dropped: 1
            }
        );
        // A leave reads b's final counts, then b is deleted.
        counted.note(&[listed(a, 11, 1), listed(b, 7, 0)], false);
        counted.note(&[listed(a, 12, 1)], true);
        assert_eq!(
            counted.totals(),
            FrameTotals {
                rules: 1,
                forwarded: 19,
                dropped: 1
            }
        );
        let foreign = ListedRule {
            foreign: true,
            ..listed(Rule::classic(4, 2), 1000, 0)
        };
        counted.note(&[listed(a, 12, 1), foreign], true);
        assert_eq!(counted.totals().forwarded, 19);
    }

    #[test]
    fn a_failed_read_gives_an_error_not_zeros_and_forgets_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = Bus::new(bus(true), "socketcan.io", dir.path()).expect("valid");
        {
            let mut counted = bus.lock_counted();
            counted.retired = (100, 2);
            counted.note(&[listed(Rule::classic(2, 3), 7, 1)], false);
        }
        // A namespace file that is no namespace: the rules cannot be listed.
        std::fs::create_dir_all(dir.path().join("buses")).expect("mkdir");
        std::fs::write(bus.namespace(), b"").expect("placeholder");
        let stats = bus.stats();
        assert_eq!(stats.members, 0);
        let err = stats.frames.expect_err("unreadable");
        assert!(matches!(err, BusError::Gateway { .. }), "{err}");
        assert_eq!(bus.lock_counted().last_seen.len(), 1, "nothing retired");

        // Without a namespace there are no rules: the last one retires and the totals stay.
        std::fs::remove_file(bus.namespace()).expect("rm");
        let frames = bus.stats().frames.expect("no namespace, no rules");
        assert_eq!(
            frames,
            FrameTotals {
                rules: 0,
                forwarded: 107,
                dropped: 3
            }
        );
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
        let yaml = include_str!("../../deploy/components/shared-buses/configmap.yaml");
        let (_, json) = yaml.split_once("buses.json: |\n").expect("buses.json");
        let readme = include_str!("../../README.md");
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

    #[test]
    fn no_lock_is_shared_by_every_bus() {
        // A static lock would make each bus wait for the others' joins and leaves.
        for (file, source) in [
            ("bus.rs", include_str!("bus.rs")),
            ("kernel/cangw.rs", include_str!("kernel/cangw.rs")),
        ] {
            for line in source.lines().map(str::trim_start) {
                let item = line
                    .strip_prefix("pub ")
                    .or_else(|| line.strip_prefix("pub(crate) "))
                    .unwrap_or(line);
                assert!(!item.starts_with("static "), "{file}: {line}");
            }
        }
    }

    #[test]
    fn bus_end_names_come_from_device_ids() {
        assert_eq!(
            bus_end_name("bus-powertrain-0007").as_deref(),
            Some("m0007")
        );
        assert_eq!(bus_end_name("bus-a-9999").as_deref(), Some("m9999"));
        assert_eq!(bus_end_name("bus-a-7"), None);
        assert_eq!(bus_end_name("nodash"), None);
    }

    #[test]
    fn rules_between_members_honour_filters_and_fd() {
        let member = |i, filters| Member {
            pod: PodRef {
                namespace: "d".into(),
                name: format!("p{i}"),
            },
            sandbox: format!("s{i}"),
            bus_end: format!("m{i:04}"),
            bus_index: i,
            filters,
        };
        let a = member(2, vec![]);
        let f = Filter {
            id: 0x123,
            mask: 0x7FF | CAN_EFF_FLAG,
        };
        let b = member(3, vec![f]);
        assert_eq!(
            rules_between(&a, &b, CanMtu::Classic),
            [Rule::classic(2, 3).with_filter(f.id, f.mask)]
        );
        assert_eq!(
            rules_between(&b, &a, CanMtu::Fd),
            [Rule::classic(3, 2), Rule::can_fd(3, 2)]
        );
    }
}
