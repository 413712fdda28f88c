//! One bus's tunnel end: frames the bus's members send leave the bus namespace through the
//! tunnel's vxcan pair, whose other end is in a namespace private to the plugin process, and go,
//! batched into cannelloni packets, to the peers; packets from peers come back as frames onto the
//! bus, which can-gw hands to every local member.
//!
//! Frames from a peer enter through the tunnel's end of the bus and can-gw never forwards a frame
//! back out of the end it came in on, so no frame returns to the node that sent it. Each peer gets
//! its own sequence numbers, so each can count what it lost and put packets the network reordered
//! back in order ([`crate::tunnel::reorder`]).
//!
//! **Who sends what to whom.** The instances send every local frame to each other, each packet
//! authenticated ([`crate::tunnel::auth`]). An external peer (cannelloni) talks to one address
//! and, by default, accepts packets from that address only, so each is *served* by one instance:
//! the one it sends to (on a bus of one node, that node's from the start). The serving instance
//! sends it the local frames and those it receives from the other instances, and relays the
//! peer's frames to the other instances and to the other external peers it serves; the others
//! never send to it. Every frame thus reaches every node and every external peer once, and two
//! rigs talking to two different nodes hear each other.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use std::os::fd::AsFd;

use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::config::{Span, TunnelSpec};
use crate::bus::tunnel_io_name;
use crate::kernel::can_raw::{CANFD_MTU, RawCanSocket};
use crate::kernel::netns::Netns;
use crate::kernel::sockbuf::Buffer;
use crate::kernel::timerfd::PreciseTimer;
use crate::tunnel::auth::{Freshness, ReplayWindow, TRAILER_LEN, TunnelKey};
use crate::tunnel::peers::spawn_resolver;
use crate::tunnel::reorder::Reorder;
use crate::tunnel::sequence::{Arrival, SequenceTracker};
use crate::tunnel::wire::{self, DEFAULT_PAYLOAD_LIMIT, Encoder, Frame};

/// How often the peer service is resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(10);
/// The UDP socket's receive buffer: a few thousand packets, a burst of the other nodes' frames
/// for as long as this task may wait for a CPU on a busy node.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;
/// How often an idle tunnel tells the plugin's other instances it is alive (an empty packet,
/// which cannelloni ignores).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Why a received packet was dropped when it came from no current peer.
pub const UNKNOWN_PEER: &str = "unknown_peer";
/// Why a received frame was dropped when the bus's queue was full.
pub const QUEUE_FULL: &str = "queue_full";
/// Why a packet was dropped that claimed to come from an instance without a valid tag.
pub const UNAUTHENTICATED: &str = "unauthenticated";
/// Why a packet was dropped that had been delivered already (duplicated by the network, or
/// replayed).
pub const DUPLICATE: &str = "duplicate";
/// How long an instance the peer service no longer lists stays a peer while it keeps sending
/// authenticated packets (DNS lags behind a replaced plugin pod).
pub const UNLISTED_GRACE: Duration = Duration::from_secs(10);
/// A peer silent this long may have restarted, or its numbers wrapped meanwhile: its numbering
/// and loss accounting start over. Instances send a heartbeat every second, so only a peer that
/// was down or cut off is this silent.
pub const RESTART_SILENCE: Duration = Duration::from_secs(5);

/// What a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// The plugin on another node, found through the peer service.
    Instance,
    /// Configured by address (e.g. cannelloni on a bench rig).
    External,
}

impl PeerKind {
    /// As the `kind` label says it.
    pub fn label(self) -> &'static str {
        match self {
            PeerKind::Instance => "instance",
            PeerKind::External => "external",
        }
    }
}

/// Traffic with one peer.
#[derive(Debug, Clone)]
pub struct PeerStats {
    /// What the peer is.
    pub kind: PeerKind,
    /// Frames sent to it.
    pub tx_frames: u64,
    /// Payload bytes of the frames sent to it.
    pub tx_bytes: u64,
    /// Packets sent to it.
    pub tx_packets: u64,
    /// Frames received from it.
    pub rx_frames: u64,
    /// Payload bytes of the frames received from it.
    pub rx_bytes: u64,
    /// Its packets, as their sequence numbers tell.
    pub sequence: SequenceTracker,
    /// When its last packet arrived.
    pub last_seen: Option<SystemTime>,
}

impl PeerStats {
    fn new(kind: PeerKind) -> Self {
        PeerStats {
            kind,
            tx_frames: 0,
            tx_bytes: 0,
            tx_packets: 0,
            rx_frames: 0,
            rx_bytes: 0,
            sequence: SequenceTracker::new(),
            last_seen: None,
        }
    }
}

/// A tunnel's counts, as a scrape reads them.
#[derive(Debug, Clone, Default)]
pub struct TunnelStats {
    /// Current peers.
    pub peers: BTreeMap<SocketAddr, PeerStats>,
    /// Packets or frames dropped, by reason ([`wire::WireError::label`], [`UNKNOWN_PEER`],
    /// [`QUEUE_FULL`], [`UNAUTHENTICATED`], [`DUPLICATE`]).
    pub dropped: BTreeMap<&'static str, u64>,
}

/// Why a tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The UDP port could not be bound.
    #[error("bus {bus}: cannot bind the tunnel's UDP port {port}: {source}")]
    Bind {
        /// The bus.
        bus: String,
        /// The port.
        port: u16,
        /// The error.
        source: std::io::Error,
    },
    /// The batch timer could not be made.
    #[error("bus {bus}: cannot create the tunnel's batch timer: {source}")]
    Timer {
        /// The bus.
        bus: String,
        /// The error.
        source: std::io::Error,
    },
}

/// One bus's tunnel to its peers.
#[derive(Debug)]
pub struct Tunnel {
    bus: String,
    spec: TunnelSpec,
    service: Option<String>,
    key: Option<TunnelKey>,
    io_ns: Netns,
    /// The external peers this instance serves because they talked to it, kept across
    /// restarts (a restarted instance must go on serving a rig that only talks now and then).
    served_file: Option<std::path::PathBuf>,
    stats: Mutex<TunnelStats>,
}

/// Where a frame waiting to be sent came from, which decides who gets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A member on this node.
    Local,
    /// Another instance.
    Instance,
    /// An external peer served here.
    External(SocketAddr),
}

/// A peer as the tunnel's loop knows it.
#[derive(Debug)]
struct Peer {
    kind: PeerKind,
    /// cannelloni's sequence number of the next packet to it.
    seq: u8,
    last_sent: Instant,
    last_heard: Option<Instant>,
    /// Served by this instance whatever it sends (an external peer whose `via` is here).
    pinned: bool,
    /// Authenticated packets accepted from it (instances).
    replay: ReplayWindow,
    /// Its packets that arrived out of order.
    reorder: Reorder,
}

impl Peer {
    fn new(kind: PeerKind) -> Self {
        Peer {
            kind,
            seq: 0,
            last_sent: Instant::now() - HEARTBEAT_INTERVAL,
            last_heard: None,
            pinned: false,
            replay: ReplayWindow::default(),
            reorder: Reorder::default(),
        }
    }
}

/// Which frames of a batch go to a peer.
fn wanted(origin: Origin, to: SocketAddr, kind: PeerKind) -> bool {
    match (kind, origin) {
        (PeerKind::Instance, Origin::Local | Origin::External(_)) => true,
        (PeerKind::Instance, Origin::Instance) => false,
        (PeerKind::External, Origin::External(from)) => from != to,
        (PeerKind::External, _) => true,
    }
}

/// What the loop carries between events.
struct State {
    peers: BTreeMap<SocketAddr, Peer>,
    /// Frames waiting to be sent, in arrival order, with where they came from.
    out: Vec<(Frame, Origin)>,
    deadline: Option<tokio::time::Instant>,
    /// When the last local frames were read (frames coming closer than the batch time share
    /// packets; a frame after a longer quiet spell goes at once).
    last_read: Option<tokio::time::Instant>,
    can: Option<AsyncFd<RawCanSocket>>,
    /// This run of the tunnel, for the instances' replay windows: its start time.
    epoch: u64,
    /// Authenticated packets sent so far.
    counter: u64,
}

impl Tunnel {
    /// The tunnel of bus `bus`, with peers from `service` (the plugin's other instances, when the
    /// bus spans the cluster; their packets are authenticated with `key`) and the configured
    /// ones; its I/O end is in `io_ns`.
    pub fn new(
        bus: &str,
        spec: TunnelSpec,
        service: Option<String>,
        key: Option<TunnelKey>,
        io_ns: Netns,
    ) -> Self {
        Tunnel {
            bus: bus.to_string(),
            service: match spec.span {
                Span::Cluster => service,
                Span::Node => None,
            },
            spec,
            key,
            io_ns,
            served_file: None,
            // Every reason starts at zero, so the first drop of a kind is an increase.
            stats: Mutex::new(TunnelStats {
                peers: BTreeMap::new(),
                dropped: wire::WireError::LABELS
                    .iter()
                    .chain(&[UNKNOWN_PEER, QUEUE_FULL, UNAUTHENTICATED, DUPLICATE])
                    .map(|r| (*r, 0))
                    .collect(),
            }),
        }
    }

    /// The tunnel, keeping the external peers it serves in `<state_dir>/tunnels/<bus>.served`.
    pub fn with_state_dir(mut self, state_dir: &std::path::Path) -> Self {
        self.served_file = Some(
            state_dir
                .join("tunnels")
                .join(format!("{}.served", self.bus)),
        );
        self
    }

    /// The external peers served because they talked to this instance, as recorded.
    fn recorded_served(&self) -> BTreeSet<SocketAddr> {
        let Some(path) = &self.served_file else {
            return BTreeSet::new();
        };
        std::fs::read_to_string(path)
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Records the external peers served because they talked to this instance (best effort: a
    /// failure only means a restarted instance waits for the peer's next packet).
    fn record_served(&self, peers: &BTreeMap<SocketAddr, Peer>) {
        let Some(path) = &self.served_file else {
            return;
        };
        let text: String = peers
            .iter()
            .filter(|(_, p)| p.kind == PeerKind::External && p.pinned)
            .map(|(a, _)| format!("{a}\n"))
            .collect();
        let tmp = path.with_extension("served.tmp");
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), error = %e, "cannot record the external peers served here");
        }
    }

    /// The bus's name.
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// The counts so far.
    pub fn stats(&self) -> TunnelStats {
        self.lock_stats().clone()
    }

    fn lock_stats(&self) -> std::sync::MutexGuard<'_, TunnelStats> {
        // Counter updates cannot panic halfway: a poisoned lock is still usable.
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_one(&self, reason: &'static str) {
        *self.lock_stats().dropped.entry(reason).or_default() += 1;
    }

    /// Whether this instance sends to peer `p`: to every instance; to an external peer on a bus
    /// of one node always, else if its `via` is this instance or once it has talked to this
    /// instance (or to an earlier run of it).
    fn serves(&self, p: &Peer) -> bool {
        p.kind == PeerKind::Instance || self.spec.span == Span::Node || p.pinned
    }

    /// Binds the UDP port and carries frames until `shutdown`. The tunnel's CAN end is opened
    /// once its pair exists (the reconcile pass makes it) and again if it goes away.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), TunnelError> {
        let span = tracing::info_span!("tunnel", bus = %self.bus, port = self.spec.port);
        self.run_loop(shutdown).instrument(span).await
    }

    async fn run_loop(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), TunnelError> {
        let udp = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], self.spec.port)))
            .await
            .map_err(|source| TunnelError::Bind {
                bus: self.bus.clone(),
                port: self.spec.port,
                source,
            })?;
        // A burst from the other nodes must wait in the socket while this task waits for a CPU,
        // not be dropped: the default buffer holds about 200 small packets.
        if let Err(e) =
            crate::kernel::sockbuf::set(udp.as_fd(), Buffer::Receive, UDP_RECEIVE_BUFFER)
        {
            tracing::warn!(error = %e, "cannot enlarge the tunnel's receive buffer");
        }
        tracing::info!("bus tunnel listening");
        let early = Arc::new(Notify::new());
        let mut resolved = self.service.clone().map(|service| {
            spawn_resolver(
                self.bus.clone(),
                service,
                self.spec.port,
                RESOLVE_INTERVAL,
                early.clone(),
                shutdown.child_token(),
            )
        });
        let mut state = State {
            peers: BTreeMap::new(),
            out: Vec::new(),
            deadline: None,
            last_read: None,
            can: None,
            epoch: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            counter: 0,
        };
        let served = self.recorded_served();
        for external in &self.spec.peers {
            let mut peer = Peer::new(PeerKind::External);
            peer.pinned = match external.via {
                Some(via) => crate::tunnel::peers::is_local(via),
                None => served.contains(&external.address),
            };
            state.peers.insert(external.address, peer);
        }
        self.sync_stats(&state.peers);
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reopen = tokio::time::interval(Duration::from_millis(500));
        reopen.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Room for the trailer of the instances' packets, so every packet fits the path MTU.
        let encoder = Encoder::new(DEFAULT_PAYLOAD_LIMIT - TRAILER_LEN)
            .unwrap_or_else(|_| unreachable!("the payload limit holds the largest frame"));
        let mut buf = vec![0u8; wire::MAX_PACKET_LEN];
        let mut packet = Vec::with_capacity(DEFAULT_PAYLOAD_LIMIT);
        // The batch time is a fraction of a millisecond to a few; tokio's timer would round it
        // up to its next millisecond tick.
        let mut flush_timer = PreciseTimer::new().map_err(|source| TunnelError::Timer {
            bus: self.bus.clone(),
            source,
        })?;
        loop {
            if let Err(e) = flush_timer.set(state.deadline.map(tokio::time::Instant::into_std)) {
                tracing::warn!(error = %e, "cannot arm the batch timer; sending now");
                state.deadline = None;
                self.send(&udp, &encoder, &mut state, &mut packet).await;
            }
            let held_until = state
                .peers
                .values()
                .filter_map(|p| p.reorder.deadline())
                .min()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                answer = next_answer(resolved.as_mut()) => match answer {
                    Some(found) => self.update_instances(&mut state.peers, found),
                    None => resolved = None,
                },
                _ = reopen.tick(), if state.can.is_none() => {
                    state.can = self.open_can().await;
                }
                _ = heartbeat.tick() => {
                    self.heartbeat(&udp, &encoder, &mut state, &mut packet).await;
                }
                received = udp.recv_from(&mut buf) => {
                    let Ok((n, from)) = received else { continue };
                    self.receive(&buf[..n], from, &mut state, &early);
                }
                () = sleep_until(held_until) => {
                    // Packets held for missing ones waited long enough: the missing are lost.
                    let now = Instant::now();
                    let mut ready = Vec::new();
                    for (from, peer) in state.peers.iter_mut() {
                        if peer.reorder.deadline().is_some_and(|d| d <= now) {
                            let origin = origin_of(*from, peer.kind);
                            ready.extend(peer.reorder.flush().into_iter().map(|p| (p, origin)));
                        }
                    }
                    for (p, origin) in ready {
                        self.deliver(&p, origin, &mut state);
                    }
                }
                readable = readable(state.can.as_ref()) => {
                    match readable {
                        Ok(frames) if frames.is_empty() => {}
                        Ok(frames) => {
                            state.out.extend(frames.into_iter().map(|f| (f, Origin::Local)));
                            self.schedule(&mut state);
                            let now = tokio::time::Instant::now();
                            state.last_read = Some(now);
                            // Frames due now go now, not after another turn of the loop.
                            if state.deadline.is_some_and(|d| d <= now) {
                                state.deadline = None;
                                self.send(&udp, &encoder, &mut state, &mut packet).await;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the tunnel's CAN end failed; reopening");
                            state.can = None;
                        }
                    }
                }
                expired = flush_timer.expired() => {
                    if let Err(e) = expired {
                        tracing::warn!(error = %e, "the batch timer failed; sending now");
                    }
                    state.deadline = None;
                    self.send(&udp, &encoder, &mut state, &mut packet).await;
                }
            }
        }
    }

    /// Sets when the waiting frames go out: at once after a quiet spell, after the batch time
    /// while frames keep coming, or now if they fill a packet.
    fn schedule(&self, state: &mut State) {
        if state.out.is_empty() {
            return;
        }
        if state.deadline.is_none() {
            // Batching pays only while frames come faster than the batch time: the first frame
            // after a quiet spell would wait for company that is not coming, which is pure
            // latency. The frames that follow it within the batch time share packets.
            let now = tokio::time::Instant::now();
            let quiet = state
                .last_read
                .is_none_or(|t| now.duration_since(t) >= self.spec.batch);
            state.deadline = Some(if quiet { now } else { now + self.spec.batch });
        }
        let size: usize = wire::HEADER_LEN
            + TRAILER_LEN
            + state.out.iter().map(|(f, _)| f.wire_len()).sum::<usize>();
        if size + wire::MAX_FRAME_WIRE_LEN > DEFAULT_PAYLOAD_LIMIT {
            state.deadline = Some(tokio::time::Instant::now());
        }
    }

    /// The peers as a scrape sees them: one entry per current peer.
    fn sync_stats(&self, peers: &BTreeMap<SocketAddr, Peer>) {
        let mut stats = self.lock_stats();
        stats.peers.retain(|a, _| peers.contains_key(a));
        for (addr, p) in peers {
            stats
                .peers
                .entry(*addr)
                .or_insert_with(|| PeerStats::new(p.kind));
        }
    }

    /// The service's latest answer: new instances become peers; instances it no longer lists
    /// stay while they keep talking (DNS lags behind a replaced pod), and go otherwise.
    fn update_instances(
        &self,
        peers: &mut BTreeMap<SocketAddr, Peer>,
        found: BTreeSet<SocketAddr>,
    ) {
        let now = Instant::now();
        for addr in &found {
            if !peers.contains_key(addr) {
                tracing::info!(peer = %addr, "tunnel peer joined");
                peers.insert(*addr, Peer::new(PeerKind::Instance));
            }
        }
        peers.retain(|addr, p| {
            if p.kind == PeerKind::External || found.contains(addr) {
                return true;
            }
            let talking = p
                .last_heard
                .is_some_and(|t| now.duration_since(t) < UNLISTED_GRACE);
            if !talking {
                tracing::info!(peer = %addr, "tunnel peer left");
            }
            talking
        });
        self.sync_stats(peers);
    }

    async fn open_can(&self) -> Option<AsyncFd<RawCanSocket>> {
        match RawCanSocket::open_async(&self.io_ns, &tunnel_io_name(&self.bus)).await {
            Ok(fd) => {
                tracing::info!("tunnel connected to the bus");
                Some(fd)
            }
            Err(e) => {
                tracing::debug!(error = %e, "the tunnel's CAN end is not there yet");
                None
            }
        }
    }

    /// A packet from `from`: authenticated (instances), checked, counted, put in order and
    /// delivered.
    fn receive(&self, bytes: &[u8], from: SocketAddr, state: &mut State, early: &Notify) {
        let now = Instant::now();
        let known = state.peers.get(&from).map(|p| p.kind);
        let (inner, sealed) = if known == Some(PeerKind::External) {
            (bytes, None)
        } else {
            match self.key.as_ref().and_then(|k| k.open(&self.bus, bytes)) {
                Some((inner, sealed)) => (inner, Some(sealed)),
                None if known.is_some() => {
                    tracing::debug!(peer = %from, "unauthenticated packet dropped");
                    self.drop_one(UNAUTHENTICATED);
                    return;
                }
                None => {
                    // Perhaps a peer the service lists by now: ask again (rate-limited).
                    self.drop_one(UNKNOWN_PEER);
                    early.notify_one();
                    return;
                }
            }
        };
        let packet = match wire::decode(inner) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(peer = %from, error = %e, "malformed packet dropped");
                self.drop_one(e.label());
                return;
            }
        };
        if known.is_none() {
            // Authenticated by the cluster's key: an instance the service does not list yet (a
            // replaced plugin pod with a new address). It is a peer from now on.
            tracing::info!(peer = %from, "tunnel peer joined (authenticated, not yet listed by the peer service)");
            state.peers.insert(from, Peer::new(PeerKind::Instance));
            self.sync_stats(&state.peers);
            early.notify_one();
        }
        let Some(peer) = state.peers.get_mut(&from) else {
            return;
        };
        let mut restarted = Vec::new();
        let mut restart = false;
        if let Some(sealed) = sealed {
            match peer.replay.check(sealed) {
                Freshness::Replayed => {
                    self.drop_one(DUPLICATE);
                    return;
                }
                Freshness::NewEpoch => restart = true,
                Freshness::Fresh => {}
            }
        }
        if peer
            .last_heard
            .is_some_and(|t| now.duration_since(t) >= RESTART_SILENCE)
        {
            restart = true;
        }
        if restart {
            tracing::info!(peer = %from, "tunnel peer started over: its numbering and loss accounting reset");
            restarted = peer.reorder.reset();
        }
        peer.last_heard = Some(now);
        let kind = peer.kind;
        let newly_served =
            kind == PeerKind::External && !peer.pinned && self.spec.span == Span::Cluster;
        if newly_served {
            // It talks to this instance: served from here on, also after a restart.
            tracing::info!(peer = %from, "external peer served by this instance from now on");
            peer.pinned = true;
        }
        {
            let mut stats = self.lock_stats();
            if let Some(s) = stats.peers.get_mut(&from) {
                if restart {
                    s.sequence.reset();
                }
                if s.sequence.record(packet.seq()) == Arrival::Restart {
                    tracing::info!(peer = %from, "tunnel peer restarted its numbering");
                }
                s.rx_frames += packet.len() as u64;
                s.rx_bytes += packet.frames().map(|f| f.len() as u64).sum::<u64>();
                s.last_seen = Some(SystemTime::now());
            }
        }
        let pushed = peer.reorder.push_checked(packet.seq(), inner.to_vec(), now);
        if pushed.duplicate {
            self.drop_one(DUPLICATE);
        }
        let origin = origin_of(from, kind);
        for p in restarted.into_iter().chain(pushed.ready) {
            self.deliver(&p, origin, state);
        }
        if newly_served {
            self.record_served(&state.peers);
        }
    }

    /// Puts the frames of an accepted packet on the bus, and queues them for the peers that get
    /// them from here (see the module).
    fn deliver(&self, bytes: &[u8], origin: Origin, state: &mut State) {
        let Ok(packet) = wire::decode(bytes) else {
            return;
        };
        let mut full = 0u64;
        let mut raw = [0u8; CANFD_MTU];
        for frame in packet.frames() {
            match &state.can {
                Some(can) if can.get_ref().send(frame.to_kernel(&mut raw)).is_ok() => {}
                _ => full += 1,
            }
        }
        if full > 0 {
            *self.lock_stats().dropped.entry(QUEUE_FULL).or_default() += full;
        }
        let onward = state
            .peers
            .iter()
            .any(|(addr, p)| self.serves(p) && wanted(origin, *addr, p.kind));
        if onward {
            state.out.extend(packet.frames().map(|f| (f, origin)));
            self.schedule(state);
        }
    }

    /// An empty packet to every instance not sent to for a heartbeat interval (cannelloni
    /// ignores empty packets; instances learn the sender is alive).
    async fn heartbeat(
        &self,
        udp: &UdpSocket,
        encoder: &Encoder,
        state: &mut State,
        packet: &mut Vec<u8>,
    ) {
        let now = Instant::now();
        let due: Vec<SocketAddr> = state
            .peers
            .iter()
            .filter(|(_, p)| {
                p.kind == PeerKind::Instance
                    && now.duration_since(p.last_sent) >= HEARTBEAT_INTERVAL
            })
            .map(|(a, _)| *a)
            .collect();
        for addr in due {
            let Some(p) = state.peers.get_mut(&addr) else {
                continue;
            };
            encoder.encode(p.seq, &[], packet);
            self.seal(PeerKind::Instance, state.epoch, &mut state.counter, packet);
            if udp.send_to(packet, addr).await.is_ok() {
                p.seq = p.seq.wrapping_add(1);
                p.last_sent = now;
                if let Some(s) = self.lock_stats().peers.get_mut(&addr) {
                    s.tx_packets += 1;
                }
            }
        }
    }

    /// Appends the trailer to a packet for an instance.
    fn seal(&self, kind: PeerKind, epoch: u64, counter: &mut u64, packet: &mut Vec<u8>) {
        if kind == PeerKind::Instance
            && let Some(key) = &self.key
        {
            key.seal(&self.bus, epoch, *counter, packet);
            *counter += 1;
        }
    }

    /// Sends the waiting frames to every peer that gets them from here, in as many packets as
    /// it takes.
    async fn send(
        &self,
        udp: &UdpSocket,
        encoder: &Encoder,
        state: &mut State,
        packet: &mut Vec<u8>,
    ) {
        if state.out.is_empty() {
            return;
        }
        let out = std::mem::take(&mut state.out);
        let targets: Vec<(SocketAddr, PeerKind)> = state
            .peers
            .iter()
            .filter(|(_, p)| self.serves(p))
            .map(|(a, p)| (*a, p.kind))
            .collect();
        let mut frames: Vec<Frame> = Vec::with_capacity(out.len());
        for (addr, kind) in targets {
            frames.clear();
            frames.extend(
                out.iter()
                    .filter(|(_, o)| wanted(*o, addr, kind))
                    .map(|(f, _)| *f),
            );
            if frames.is_empty() {
                continue;
            }
            let Some(peer) = state.peers.get_mut(&addr) else {
                continue;
            };
            let mut rest: &[Frame] = &frames;
            let mut packets = 0u64;
            while !rest.is_empty() {
                let n = encoder.encode(peer.seq, rest, packet);
                if n == 0 {
                    break;
                }
                self.seal(kind, state.epoch, &mut state.counter, packet);
                if let Err(e) = udp.send_to(packet, addr).await {
                    tracing::debug!(peer = %addr, error = %e, "tunnel send failed");
                }
                peer.seq = peer.seq.wrapping_add(1);
                packets += 1;
                rest = &rest[n..];
            }
            peer.last_sent = Instant::now();
            if let Some(s) = self.lock_stats().peers.get_mut(&addr) {
                s.tx_frames += frames.len() as u64;
                s.tx_bytes += frames.iter().map(|f| f.len() as u64).sum::<u64>();
                s.tx_packets += packets;
            }
        }
    }
}

fn origin_of(from: SocketAddr, kind: PeerKind) -> Origin {
    match kind {
        PeerKind::Instance => Origin::Instance,
        PeerKind::External => Origin::External(from),
    }
}

/// The resolver's next answer; `None` once it is gone. Pending forever without a resolver.
async fn next_answer(
    resolved: Option<&mut watch::Receiver<Option<BTreeSet<SocketAddr>>>>,
) -> Option<BTreeSet<SocketAddr>> {
    let Some(rx) = resolved else {
        return std::future::pending().await;
    };
    loop {
        rx.changed().await.ok()?;
        if let Some(found) = rx.borrow_and_update().clone() {
            return Some(found);
        }
    }
}

/// Frames waiting on the tunnel's CAN end (a batch); pending forever without one.
async fn readable(can: Option<&AsyncFd<RawCanSocket>>) -> std::io::Result<Vec<Frame>> {
    let mut frames = Vec::new();
    // The kernel only hands out whole classic or FD frames; anything else is skipped.
    crate::kernel::can_raw::read_waiting(can, 256, |raw| {
        if let Ok(f) = Frame::from_kernel(raw) {
            frames.push(f);
        }
    })
    .await?;
    Ok(frames)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::config::ExternalPeer;

    fn tunnel(state_dir: &std::path::Path) -> Tunnel {
        let rig: SocketAddr = "192.0.2.10:20000".parse().expect("address");
        let spec = TunnelSpec {
            span: Span::Cluster,
            port: 20000,
            peers: vec![ExternalPeer {
                address: rig,
                via: None,
            }],
            batch: Duration::from_millis(1),
        };
        Tunnel::new("x", spec, None, None, Netns::Pid(std::process::id())).with_state_dir(state_dir)
    }

    #[test]
    fn served_peers_are_remembered_across_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = tunnel(dir.path());
        assert!(t.recorded_served().is_empty());
        let rig: SocketAddr = "192.0.2.10:20000".parse().expect("address");
        let other: SocketAddr = "192.0.2.11:20000".parse().expect("address");
        let mut peers = BTreeMap::new();
        let mut served = Peer::new(PeerKind::External);
        served.pinned = true;
        peers.insert(rig, served);
        peers.insert(other, Peer::new(PeerKind::External));
        peers.insert(
            "10.0.0.2:20000".parse().expect("address"),
            Peer::new(PeerKind::Instance),
        );
        t.record_served(&peers);
        let again = tunnel(dir.path());
        assert_eq!(again.recorded_served(), BTreeSet::from([rig]));
    }

    #[test]
    fn frames_go_where_they_are_wanted() {
        let rig: SocketAddr = "192.0.2.10:20000".parse().expect("address");
        let rig2: SocketAddr = "192.0.2.11:20000".parse().expect("address");
        let node: SocketAddr = "10.0.0.2:20000".parse().expect("address");
        // Instances get local frames and the rigs' (which they cannot get elsewhere), never
        // other instances' (each instance sends its own to everyone).
        assert!(wanted(Origin::Local, node, PeerKind::Instance));
        assert!(wanted(Origin::External(rig), node, PeerKind::Instance));
        assert!(!wanted(Origin::Instance, node, PeerKind::Instance));
        // A served rig gets everything but its own frames.
        assert!(wanted(Origin::Local, rig, PeerKind::External));
        assert!(wanted(Origin::Instance, rig, PeerKind::External));
        assert!(wanted(Origin::External(rig2), rig, PeerKind::External));
        assert!(!wanted(Origin::External(rig), rig, PeerKind::External));
    }
}
