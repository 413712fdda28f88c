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
//! [`config`] reads the configuration, [`member`] a member's annotations, [`topology`] says
//! which rules connect two members and [`stats`] keeps the frame totals; this module runs the
//! lifecycle: joining, leaving and the bus namespace.
//!
//! Every lock here belongs to one [`Bus`]: a join or leave on one bus never waits for another bus,
//! nor for the pods with private interfaces.

pub mod config;
pub mod member;
pub mod stats;
pub mod timing;
pub mod topology;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::hardware::{Controller, HardwareError, Holder};
use crate::kernel::cangw::{Filter, Gateway, GatewayError};
use crate::kernel::link::{CanMtu, LinkError, Links};
use crate::kernel::netns::{self, Netns, NetnsError};
use crate::kernel::vxcan::{self, VxcanError, VxcanPair, VxcanSpec};
use crate::pod::annotations;
use crate::pod::resources::PodRef;
use crate::resource::{ResourceName, ResourceNameError};

pub use config::{
    BusConfigError, BusSpec, CapacityError, DEFAULT_INTERFACE, DEFAULT_MEMBERS, RESOURCE_PREFIX,
    check_capacity, load, parse, slots_needed,
};
pub use member::{
    FILTER_OPTION, MAX_FILTERS, MemberConfig, MemberConfigError, bus_end_name, member_config,
    parse_filter,
};
use stats::Counted;
pub use stats::{BusStats, FrameTotals};
use timing::TimedBus;
use topology::rules_between;

/// The uplink's name in the bus namespace.
pub const UPLINK_NAME: &str = "uplink";
/// The tunnel's end of the bus in the bus namespace: a vxcan end joined by can-gw like a member's.
pub const TUNNEL_END: &str = "tunnel";
/// The socketcand endpoint's end of the bus in the bus namespace, joined like the tunnel's.
pub const SOCKETCAND_END: &str = "socketcand";

/// The name of the other end of bus `bus`'s tunnel pair, where the tunnel reads and writes
/// frames: `vcant` and a hash of the bus's name, as bus names are longer than interface names
/// may be. That end lives in a namespace private to the plugin process
/// ([`netns::process_private`]), never in the node's (where, under hostNetwork, any host process
/// could read and write the cluster-wide bus): it goes, and the pair with it, when the process
/// does, and the next process makes a new one.
pub fn tunnel_io_name(bus: &str) -> String {
    io_name("vcant", bus)
}

/// The name of the other end of bus `bus`'s socketcand pair (`vcans` and the hash), kept like
/// the tunnel's (see [`tunnel_io_name`]).
pub fn socketcand_io_name(bus: &str) -> String {
    io_name("vcans", bus)
}

fn io_name(prefix: &str, bus: &str) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = bus.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{prefix}{hash:08x}")
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
    /// The uplink could not be lent to the bus.
    #[error("bus {bus}: its uplink: {source}")]
    Uplink {
        /// The bus.
        bus: String,
        /// What failed.
        source: Box<HardwareError>,
    },
    /// A timed bus's scheduler failed.
    #[error("{source}")]
    Timing {
        /// The bus.
        bus: String,
        /// What failed.
        source: Box<timing::TimingError>,
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

/// A fixed end of the bus as a member, with the MTU of its rules.
type FixedEnd = (Member, CanMtu);

/// A fixed end of the bus (uplink, tunnel) as the rules see it: a member that is never released
/// and filters nothing.
fn fixed_member(name: &str, index: u32) -> Member {
    Member {
        pod: PodRef {
            namespace: String::new(),
            name: name.into(),
        },
        sandbox: String::new(),
        bus_end: name.into(),
        bus_index: index,
        filters: Vec::new(),
    }
}

/// A fixed end as a timed bus's scheduler sees it.
fn fixed_end(end: &Member) -> timing::End {
    timing::End {
        pod: end.pod.clone(),
        filters: Vec::new(),
        slot: None,
    }
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
    /// The physical interface connecting the bus to a wire, kept in the bus namespace.
    uplink: Option<Arc<Controller>>,
    /// Where the I/O ends of the tunnel and the socketcand endpoint live (a bus with either).
    io_ns: Option<Netns>,
    /// The scheduler of a timed bus (one with a bitrate), which replaces can-gw's rules.
    timed: Option<Arc<TimedBus>>,
}
impl Bus {
    /// Bus `spec` under `domain`, with its namespace file in `<state_dir>/buses/`.
    pub fn new(spec: BusSpec, domain: &str, state_dir: &Path) -> Result<Self, ResourceNameError> {
        let timed = spec.timing.map(|t| TimedBus::new(&spec.name, t));
        Ok(Bus {
            resource: spec.resource(domain)?,
            ns_path: state_dir.join("buses").join(&spec.name),
            spec,
            members: Mutex::new(HashMap::new()),
            namespace: tokio::sync::RwLock::new(()),
            rules: tokio::sync::Mutex::new(()),
            creating: Mutex::new(()),
            counted: Mutex::new(Counted::default()),
            uplink: None,
            io_ns: None,
            timed,
        })
    }

    /// The scheduler of a timed bus.
    pub fn timed(&self) -> Option<&Arc<TimedBus>> {
        self.timed.as_ref()
    }

    /// Runs a timed bus's scheduler on the calling thread until it is stopped (blocking; returns
    /// at once for other buses). can-gw rules a previous configuration left in the bus
    /// namespace are removed first: frames must take the scheduler's time.
    pub fn run_timing(&self, credits: Option<Arc<dyn timing::TxCredits>>) -> Result<(), BusError> {
        let Some(timed) = &self.timed else {
            return Ok(());
        };
        self.ensure_namespace()?;
        Gateway::open(&self.ns())
            .and_then(|mut gw| gw.flush())
            .map_err(|e| self.gateway_error(e))?;
        timed
            .run(&self.ns(), credits)
            .map_err(|source| BusError::Timing {
                bus: self.spec.name.clone(),
                source: Box::new(source),
            })
    }

    /// The bus with the I/O ends of its tunnel and socketcand endpoint in `ns` (for a bus with
    /// either).
    pub fn with_io_namespace(mut self, ns: Netns) -> Self {
        self.io_ns = Some(ns);
        self
    }

    /// The bus with `uplink` connecting it to a physical CAN wire.
    pub fn with_uplink(mut self, uplink: Option<Arc<Controller>>) -> Self {
        self.uplink = uplink;
        self
    }

    /// The uplink's controller, if the bus has one.
    pub fn uplink(&self) -> Option<&Arc<Controller>> {
        self.uplink.as_ref()
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

    /// The members' bus ends present in the namespace, by name → index.
    fn bus_ends(&self) -> Result<HashMap<String, u32>, BusError> {
        Ok(self.links()?.0)
    }

    /// The members' bus ends present in the namespace, by name → index, and the fixed ends
    /// (uplink, tunnel) that are there, as members with the MTU of their rules.
    fn links(&self) -> Result<(HashMap<String, u32>, Vec<FixedEnd>), BusError> {
        let mut links = Links::open(&self.ns()).map_err(|source| BusError::Link {
            bus: self.spec.name.clone(),
            source,
        })?;
        let all = links.list().map_err(|source| BusError::Link {
            bus: self.spec.name.clone(),
            source,
        })?;
        let mut fixed = Vec::new();
        if self.uplink.is_some()
            && let Some(l) = all
                .iter()
                .find(|l| l.name == UPLINK_NAME && l.kind == "can")
        {
            fixed.push((fixed_member(UPLINK_NAME, l.index), self.uplink_mtu()));
        }
        for (end, _) in self.io_ends() {
            if let Some(l) = all.iter().find(|l| l.name == end && l.kind == "vxcan") {
                fixed.push((fixed_member(end, l.index), self.spec.mtu()));
            }
        }
        Ok((
            all.into_iter()
                .filter(|l| l.kind == "vxcan" && l.name != TUNNEL_END && l.name != SOCKETCAND_END)
                .map(|l| (l.name, l.index))
                .collect(),
            fixed,
        ))
    }

    /// The bus's ends whose other end the plugin process reads and writes: the tunnel's and the
    /// socketcand endpoint's, as configured, with the name of their I/O end.
    fn io_ends(&self) -> Vec<(&'static str, String)> {
        let mut ends = Vec::new();
        if self.spec.tunnel.is_some() {
            ends.push((TUNNEL_END, tunnel_io_name(&self.spec.name)));
        }
        if self.spec.socketcand.is_some() {
            ends.push((SOCKETCAND_END, socketcand_io_name(&self.spec.name)));
        }
        ends
    }

    /// Whether the bus namespace stays without members: a bus with an uplink, a tunnel or a
    /// socketcand endpoint keeps the wire, the other nodes and the clients connected between
    /// members.
    fn keeps_namespace(&self) -> bool {
        self.uplink.is_some() || !self.io_ends().is_empty() || self.timed.is_some()
    }

    /// The MTU of the rules between the uplink and a member: FD frames cross only if the
    /// controller is set up for CAN FD.
    fn uplink_mtu(&self) -> CanMtu {
        match &self.uplink {
            Some(c) if c.spec().settings.data_bitrate.is_some() => self.spec.mtu(),
            _ => CanMtu::Classic,
        }
    }

    /// Makes sure the bus's fixed ends are in the bus namespace — the uplink set up and up, the
    /// tunnel's vxcan pair — and connected to every member and to each other (idempotent; a
    /// no-op for a bus with neither). Runs on every reconcile pass, the first at start, so an
    /// uplink plugged in late, or returned by the kernel, is connected again.
    pub async fn ensure_fixed_ends(self: &Arc<Self>) -> Result<(), BusError> {
        if !self.keeps_namespace() {
            return Ok(());
        }
        let _namespace = self.namespace.read().await;
        let bus = self.clone();
        self.blocking(move || bus.place_fixed_ends()).await??;
        let _rules = self.rules.lock().await;
        let bus = self.clone();
        self.blocking(move || {
            let (present, fixed) = bus.links()?;
            if let Some(timed) = &bus.timed {
                for (end, _) in &fixed {
                    timed.set_end(end.bus_index, fixed_end(end));
                }
                return Ok(());
            }
            let members: Vec<Member> = bus
                .lock_members()
                .values()
                .filter(|m| present.get(&m.bus_end) == Some(&m.bus_index))
                .cloned()
                .collect();
            let mut rules = Vec::new();
            for (i, (end, mtu)) in fixed.iter().enumerate() {
                for m in &members {
                    rules.extend(rules_between(end, m, *mtu));
                    rules.extend(rules_between(m, end, *mtu));
                }
                // The wire and the other nodes reach each other too, at the smaller MTU.
                for (other, other_mtu) in &fixed[i + 1..] {
                    let mtu = if *mtu == CanMtu::Fd && *other_mtu == CanMtu::Fd {
                        CanMtu::Fd
                    } else {
                        CanMtu::Classic
                    };
                    rules.extend(rules_between(end, other, mtu));
                    rules.extend(rules_between(other, end, mtu));
                }
            }
            let mut gw = Gateway::open(&bus.ns()).map_err(|e| bus.gateway_error(e))?;
            let added = gw.add_missing(&rules).map_err(|e| bus.gateway_error(e))?;
            if added > 0 {
                tracing::info!(bus = %bus.spec.name, added, "uplink, tunnel or socketcand endpoint connected");
            }
            Ok::<_, BusError>(())
        })
        .await??;
        Ok(())
    }

    /// The bus namespace (made if missing) with the uplink and the pairs of the tunnel and the
    /// socketcand endpoint in it.
    fn place_fixed_ends(&self) -> Result<(), BusError> {
        self.ensure_namespace()?;
        if let Some(controller) = &self.uplink {
            controller
                .lend(
                    Holder::Bus(self.spec.name.clone()),
                    &self.ns(),
                    UPLINK_NAME,
                    &controller.spec().settings,
                )
                .map_err(|source| BusError::Uplink {
                    bus: self.spec.name.clone(),
                    source: Box::new(source),
                })?;
        }
        let Some(io_ns) = &self.io_ns else {
            return Ok(());
        };
        for (end, io_name) in self.io_ends() {
            let vxcan_error = |source| BusError::Vxcan {
                bus: self.spec.name.clone(),
                source,
            };
            // An end without our I/O end is a previous process's (its namespace, and the I/O
            // end with it, may still be going away) or one whose other end is elsewhere:
            // replaced, so the pair joins this process's namespace.
            let ours = Links::open(io_ns)
                .and_then(|mut l| l.get(&io_name))
                .map_err(|source| BusError::Link {
                    bus: self.spec.name.clone(),
                    source,
                })?
                .is_some();
            if !ours && vxcan::delete(&self.ns(), end).map_err(vxcan_error)? {
                tracing::info!(bus = %self.spec.name, end, "stale end replaced");
            }
            vxcan::ensure(
                io_ns,
                &self.ns(),
                &VxcanSpec {
                    name: io_name,
                    peer_name: end.into(),
                    mtu: self.spec.mtu(),
                },
            )
            .map_err(vxcan_error)?;
        }
        Ok(())
    }

    fn ensure_namespace(&self) -> Result<(), BusError> {
        let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        netns::create_persistent(&self.ns_path).map_err(|source| BusError::Namespace {
            bus: self.spec.name.clone(),
            ns: self.ns_path.display().to_string(),
            source,
        })?;
        Ok(())
    }

    /// Makes the pod in `pod_ns` a member: ensures the bus namespace, the vxcan pair (pod end
    /// `config.interface`, bus end `bus_end`) and the rules between it and every other member, all
    /// in place on return. Repeating it changes nothing, so a restarted plugin adopts members with
    /// it without interrupting traffic.
    #[tracing::instrument(name = "join", skip_all, fields(bus = %self.spec.name, pod = %pod, bus_end))]
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
        self.ensure_namespace()?;
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

    /// Adds the rules between `me` and every other member and records `me` (with the rules lock);
    /// on a timed bus, hands `me` to the scheduler instead.
    fn connect(&self, me: Member) -> Result<(), BusError> {
        if let Some(timed) = &self.timed {
            timed.set_end(
                me.bus_index,
                timing::End {
                    pod: me.pod.clone(),
                    filters: me.filters.clone(),
                    slot: None,
                },
            );
            tracing::debug!(bus = %self.spec.name, pod = %me.pod, bus_end = %me.bus_end, "member joined the timed bus");
            self.lock_members().insert(me.sandbox.clone(), me);
            return Ok(());
        }
        // Members whose bus end is gone (their pod went away, not yet reconciled) get no rules.
        let (present, fixed) = self.links()?;
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
        for (end, mtu) in &fixed {
            rules.extend(rules_between(&me, end, *mtu));
            rules.extend(rules_between(end, &me, *mtu));
        }
        let mut gw = Gateway::open(&self.ns()).map_err(|e| self.gateway_error(e))?;
        let added = gw.add_missing(&rules).map_err(|e| self.gateway_error(e))?;
        tracing::debug!(bus = %self.spec.name, pod = %me.pod, bus_end = %me.bus_end, added, "member joined");
        self.lock_members().insert(me.sandbox.clone(), me);
        Ok(())
    }

    /// Removes the members of `sandboxes` — their rules and pairs, if still there — and then the
    /// bus namespace if no member is left. Returns the members that were removed.
    #[tracing::instrument(name = "leave", skip_all, fields(bus = %self.spec.name, gone = sandboxes.len()))]
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
        if let Some(timed) = &self.timed {
            timed.remove_end(member.bus_index);
        }
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
        if self.keeps_namespace() || !self.lock_members().is_empty() || !self.ns_path.exists() {
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
        let mut totals = counted.totals();
        if let Some(timed) = &self.timed {
            totals.forwarded += timed.load().delivered;
        }
        Ok(totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::config::example as bus;
    use crate::bus::stats::listed;
    use crate::kernel::cangw::Rule;

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
    fn no_lock_is_shared_by_every_bus() {
        // A static lock would make each bus wait for the others' joins and leaves.
        for (file, source) in [
            ("bus/mod.rs", include_str!("mod.rs")),
            ("bus/stats.rs", include_str!("stats.rs")),
            ("kernel/cangw.rs", include_str!("../kernel/cangw.rs")),
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
}
