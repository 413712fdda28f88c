//! Shared CAN buses between the pods of a node.
//!
//! Each bus named in the plugin's bus configuration is its own extended resource
//! (`<domain>/bus-<name>`). A pod holding it gets one interface in its namespace: the pod end of a
//! [`crate::vxcan`] pair whose other end (the *bus end*) lives in a network namespace the plugin
//! owns for that bus, bind-mounted under the state directory so it outlives plugin restarts. In
//! that namespace [`crate::cangw`] rules forward every frame arriving on one bus end out of every
//! other bus end.
//!
//! Topology: a full mesh of rules, one per ordered pair of members (and per frame kind on an FD
//! bus). can-gw routes a frame at most `max_hops` times, 1 by default; that is a parameter of the
//! can-gw module, shared by every user of the node, which a device plugin has no business changing.
//! A hub (every member forwarding to one end that forwards to everyone) needs two hops; the mesh
//! needs one, never returns a frame to its sender and touches only the joining or leaving member's
//! 2·(n−1) rules. n·(n−1) rules are few for the tens of members a node hosts (992 for 32).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::cangw::{Filter, Gateway, GatewayError, Rule};
use crate::link::{self, CanMtu, LinkError, Links};
use crate::netns::{self, Netns, NetnsError};
use crate::pod_config::{self, PodConfigError};
use crate::podresources::PodRef;
use crate::resource::{ResourceName, ResourceNameError};
use crate::vxcan::{self, VxcanError, VxcanPair, VxcanSpec};

/// Members per node when the configuration does not say.
pub const DEFAULT_MEMBERS: u32 = 32;
/// The pod's interface name when neither the configuration nor the pod says.
pub const DEFAULT_INTERFACE: &str = "can0";
/// The resource name of bus `name` is `<domain>/bus-<name>`.
pub const RESOURCE_PREFIX: &str = "bus-";
/// The annotation option (after the domain) holding a member's receive filters.
pub const FILTER_OPTION: &str = "filter";
/// Longest bus name: the resource name `bus-<name>` must leave room for device IDs.
const MAX_NAME_LEN: usize = 54;

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
    /// The interface name inside member pods, unless a pod's `names` annotation says otherwise.
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

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
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
        if !is_dns_label(&bus.name) || bus.name.len() > MAX_NAME_LEN {
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
/// The first name of `<domain>/names` overrides the bus's interface name; `<domain>/filter` lists
/// receive filters, comma-separated.
pub fn member_config(
    domain: &str,
    annotations: &HashMap<String, String>,
    bus: &BusSpec,
) -> Result<MemberConfig, MemberConfigError> {
    // The shared checks (unknown options, valid names) as for the pod's private interfaces.
    // Any count of names works here: only the first one is used.
    let named = pod_config::interfaces(domain, annotations, 64)?;
    let explicit = annotations
        .get(&format!("{domain}/names"))
        .is_some_and(|v| v.split(',').any(|n| !n.trim().is_empty()));
    let interface = match named.first() {
        Some(spec) if explicit => spec.name.clone(),
        _ => bus.interface.clone(),
    };
    let key = format!("{domain}/{FILTER_OPTION}");
    let mut filters: Vec<(String, Filter)> = Vec::new();
    for entry in annotations
        .get(&key)
        .map(|v| v.split(',').map(str::trim).filter(|e| !e.is_empty()))
        .into_iter()
        .flatten()
    {
        let filter = parse_filter(entry).ok_or_else(|| MemberConfigError::BadFilter {
            key: key.clone(),
            entry: entry.to_string(),
        })?;
        if let Some((other, _)) = filters.iter().find(|(_, f)| overlap(f, &filter)) {
            return Err(MemberConfigError::Overlap {
                key,
                a: other.clone(),
                b: entry.to_string(),
            });
        }
        filters.push((entry.to_string(), filter));
    }
    Ok(MemberConfig {
        interface,
        filters: filters.into_iter().map(|(_, f)| f).collect(),
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

/// Frames the bus's rules have forwarded and dropped, and its members, read now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Members known to the plugin.
    pub members: usize,
    /// Rules in the bus namespace.
    pub rules: usize,
    /// Frames forwarded, summed over the current rules (can-gw's 32-bit counters, widened).
    pub forwarded: u64,
    /// Frames dropped, summed over the current rules.
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
    /// others', so two joins must not interleave there. Pair creation and counter attachment, the
    /// slow parts of a join, run outside it; other buses and private pods never wait on it.
    rules: tokio::sync::Mutex<()>,
    /// Serialises creating the namespace (two joins must not mount two namespaces on one file).
    creating: Mutex<()>,
    /// Counters of the rules as last read, and the sums of rules since deleted, so the bus
    /// totals do not go down when members leave.
    counted: Mutex<Counted>,
}

/// See [`Bus::stats`].
#[derive(Debug, Default)]
struct Counted {
    last_seen: HashMap<Rule, Seen>,
    retired: (u64, u64),
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
        vxcan::ensure(
            pod_ns,
            &ns,
            &VxcanSpec {
                name: interface.to_string(),
                peer_name: bus_end.to_string(),
                mtu: self.spec.mtu(),
            },
        )
        .map_err(|source| BusError::Vxcan {
            bus: self.spec.name.clone(),
            source,
        })
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
                // The final counts of the rules about to go, for the bus totals.
                let listed = gw.list().map_err(|e| self.gateway_error(e))?;
                self.note_counters(&listed, false);
                gw.delete_interface(member.bus_index)
                    .map_err(|e| self.gateway_error(e))?;
                vxcan::delete(&self.ns(), &member.bus_end).map_err(|source| BusError::Vxcan {
                    bus: self.spec.name.clone(),
                    source,
                })?;
            }
        }
        Ok(Some(member))
    }

    /// Records the rules' counters as read now. With `complete`, `listed` is every rule of the
    /// bus, and rules seen before but missing now (deleted, by the plugin or by the kernel with
    /// their interface) have their last counts added to the retired sums.
    fn note_counters(&self, listed: &[crate::cangw::ListedRule], complete: bool) {
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        let now: HashMap<Rule, (u32, u32)> = listed
            .iter()
            .filter(|l| !l.foreign)
            .map(|l| (l.rule, (l.counters.handled, l.counters.dropped)))
            .collect();
        if complete {
            let gone: Vec<Rule> = counted
                .last_seen
                .keys()
                .filter(|rule| !now.contains_key(rule))
                .copied()
                .collect();
            for rule in gone {
                if let Some(seen) = counted.last_seen.remove(&rule) {
                    counted.retired.0 += seen.total.0;
                    counted.retired.1 += seen.total.1;
                }
            }
        }
        for (rule, raw) in now {
            counted
                .last_seen
                .entry(rule)
                .and_modify(|seen| seen.advance(raw))
                .or_insert_with(|| Seen::new(raw));
        }
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
    pub fn stats(&self) -> Result<BusStats, BusError> {
        let listed = if self.ns_path.exists() {
            let mut gw = Gateway::open(&self.ns()).map_err(|e| self.gateway_error(e))?;
            gw.list().map_err(|e| self.gateway_error(e))?
        } else {
            Vec::new()
        };
        self.note_counters(&listed, true);
        let counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        let mut stats = BusStats {
            members: self.lock_members().len(),
            forwarded: counted.retired.0,
            dropped: counted.retired.1,
            rules: 0,
        };
        for seen in counted.last_seen.values() {
            stats.rules += 1;
            stats.forwarded += seen.total.0;
            stats.dropped += seen.total.1;
        }
        Ok(stats)
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
                &format!(r#"{{"buses":[{{"name":"{}"}}]}}"#, "a".repeat(55)),
                "name",
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
