//! One bus's tunnel end: frames the bus's members send leave the bus namespace through the
//! tunnel's vxcan pair, whose other end is in the plugin's own namespace, and go, batched into
//! cannelloni packets, to every peer; packets from peers come back as frames onto the bus, which
//! can-gw hands to every local member.
//!
//! Frames from a peer enter through the tunnel's end of the bus and can-gw never forwards a frame
//! back out of the end it came in on, so no frame returns to the node that sent it. Each peer gets
//! its own sequence numbers, so each can count what it lost and put packets the network reordered
//! back in order ([`crate::tunnel::reorder`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::bus::config::TunnelSpec;
use crate::bus::tunnel_io_name;
use crate::kernel::can_raw::{CANFD_MTU, RawCanSocket};
use crate::kernel::netns::Netns;
use crate::tunnel::peers::PeerSource;
use crate::tunnel::reorder::Reorder;
use crate::tunnel::sequence::{Arrival, SequenceTracker};
use crate::tunnel::wire::{self, DEFAULT_PAYLOAD_LIMIT, Encoder, Frame};

/// How often the peer service is resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(10);
/// How often an idle tunnel tells the plugin's other instances it is alive (an empty packet,
/// which cannelloni ignores).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Why a received packet was dropped when it came from no current peer.
pub const UNKNOWN_PEER: &str = "unknown_peer";
/// Why a received frame was dropped when the bus's queue was full.
pub const QUEUE_FULL: &str = "queue_full";

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
    /// [`QUEUE_FULL`]).
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
}

/// One bus's tunnel to its peers.
#[derive(Debug)]
pub struct Tunnel {
    bus: String,
    spec: TunnelSpec,
    source: PeerSource,
    stats: Mutex<TunnelStats>,
}

struct Peer {
    addr: SocketAddr,
    seq: u8,
    last_sent: Instant,
}

impl Tunnel {
    /// The tunnel of bus `bus`, with peers from `service` (the plugin's other instances, when the
    /// bus spans the cluster) and the configured ones.
    pub fn new(bus: &str, spec: TunnelSpec, service: Option<String>) -> Self {
        let source = PeerSource {
            service: match spec.span {
                crate::bus::config::Span::Cluster => service,
                crate::bus::config::Span::Node => None,
            },
            port: spec.port,
            fixed: spec.peers.clone(),
        };
        Tunnel {
            bus: bus.to_string(),
            spec,
            source,
            // Every reason starts at zero, so the first drop of a kind is an increase.
            stats: Mutex::new(TunnelStats {
                peers: BTreeMap::new(),
                dropped: wire::WireError::LABELS
                    .iter()
                    .chain(&[UNKNOWN_PEER, QUEUE_FULL])
                    .map(|r| (*r, 0))
                    .collect(),
            }),
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

    /// Binds the UDP port and carries frames until `shutdown`. The tunnel's CAN end is opened
    /// once its pair exists (the reconcile pass makes it) and again if it goes away.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), TunnelError> {
        let udp = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], self.spec.port)))
            .await
            .map_err(|source| TunnelError::Bind {
                bus: self.bus.clone(),
                port: self.spec.port,
                source,
            })?;
        tracing::info!(bus = %self.bus, port = self.spec.port, "bus tunnel listening");
        let mut peers: Vec<Peer> = Vec::new();
        let mut resolve = tokio::time::interval(RESOLVE_INTERVAL);
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        let mut can: Option<AsyncFd<RawCanSocket>> = None;
        let mut reopen = tokio::time::interval(Duration::from_millis(500));
        let encoder = Encoder::new(DEFAULT_PAYLOAD_LIMIT)
            .unwrap_or_else(|_| unreachable!("the default payload limit holds the largest frame"));
        let mut batch: Vec<Frame> = Vec::new();
        // Frames from external peers, for the plugin's other instances (see `receive`).
        let mut relay: Vec<Frame> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut buf = vec![0u8; wire::MAX_PACKET_LEN];
        let mut packet = Vec::with_capacity(DEFAULT_PAYLOAD_LIMIT);
        // Per peer, packets waiting for earlier ones (see `reorder`).
        let mut reorders: HashMap<SocketAddr, Reorder> = HashMap::new();
        loop {
            let flush_at = deadline;
            let held_until = reorders
                .values()
                .filter_map(Reorder::deadline)
                .min()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = resolve.tick() => {
                    self.update_peers(&mut peers).await;
                    reorders.retain(|addr, _| peers.iter().any(|p| p.addr == *addr));
                }
                _ = reopen.tick(), if can.is_none() => {
                    can = self.open_can().await;
                }
                _ = heartbeat.tick() => {
                    let now = Instant::now();
                    let kinds = self.kinds(&peers);
                    for p in peers.iter_mut().filter(|p| {
                        kinds.get(&p.addr) == Some(&PeerKind::Instance)
                            && now.duration_since(p.last_sent) >= HEARTBEAT_INTERVAL
                    }) {
                        encoder.encode(p.seq, &[], &mut packet);
                        if udp.send_to(&packet, p.addr).await.is_ok() {
                            p.seq = p.seq.wrapping_add(1);
                            p.last_sent = now;
                            if let Some(s) = self.lock_stats().peers.get_mut(&p.addr) {
                                s.tx_packets += 1;
                            }
                        }
                    }
                }
                received = udp.recv_from(&mut buf) => {
                    let Ok((n, from)) = received else { continue };
                    let Some((seq, external)) = self.accept(&buf[..n], from, &peers) else {
                        continue;
                    };
                    let ready = reorders
                        .entry(from)
                        .or_default()
                        .push(seq, buf[..n].to_vec(), Instant::now());
                    for packet in ready {
                        relay.extend(self.deliver(&packet, external, can.as_ref()));
                    }
                    if !relay.is_empty() && deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + self.spec.batch);
                    }
                    if batch_is_full(&relay) {
                        deadline = Some(tokio::time::Instant::now());
                    }
                }
                () = sleep_until(held_until) => {
                    // Packets held for missing ones waited long enough: the missing are lost.
                    let now = Instant::now();
                    let kinds = self.kinds(&peers);
                    for (from, reorder) in reorders.iter_mut() {
                        if reorder.deadline().is_some_and(|d| d <= now) {
                            let external = kinds.get(from) == Some(&PeerKind::External);
                            for packet in reorder.flush() {
                                relay.extend(self.deliver(&packet, external, can.as_ref()));
                            }
                        }
                    }
                    if !relay.is_empty() && deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + self.spec.batch);
                    }
                }
                readable = readable(can.as_ref()) => {
                    match readable {
                        Ok(frames) => {
                            if !frames.is_empty() && deadline.is_none() {
                                deadline = Some(tokio::time::Instant::now() + self.spec.batch);
                            }
                            batch.extend(frames);
                        }
                        Err(e) => {
                            tracing::warn!(bus = %self.bus, error = %e, "the tunnel's CAN end failed; reopening");
                            can = None;
                        }
                    }
                    if batch_is_full(&batch) {
                        deadline = Some(tokio::time::Instant::now());
                    }
                }
                () = sleep_until(flush_at) => {
                    deadline = None;
                    self.send(&udp, &encoder, &mut peers, &mut batch, &mut packet, None).await;
                    self.send(&udp, &encoder, &mut peers, &mut relay, &mut packet, Some(PeerKind::Instance)).await;
                }
            }
        }
    }

    fn kinds(&self, peers: &[Peer]) -> BTreeMap<SocketAddr, PeerKind> {
        let stats = self.lock_stats();
        peers
            .iter()
            .filter_map(|p| stats.peers.get(&p.addr).map(|s| (p.addr, s.kind)))
            .collect()
    }

    async fn open_can(&self) -> Option<AsyncFd<RawCanSocket>> {
        let ns = Netns::Pid(std::process::id());
        let name = tunnel_io_name(&self.bus);
        let opened = tokio::task::spawn_blocking(move || RawCanSocket::open(&ns, &name))
            .await
            .ok()?;
        match opened {
            // SAFETY: the socket owns its descriptor (an OwnedFd), never replaces it and keeps it
            // open until it is dropped with the AsyncFd.
            Ok(socket) => match unsafe { AsyncFd::register(socket) } {
                Ok(fd) => {
                    tracing::info!(bus = %self.bus, "tunnel connected to the bus");
                    Some(fd)
                }
                Err(e) => {
                    tracing::warn!(bus = %self.bus, error = %e, "cannot poll the tunnel's CAN end");
                    None
                }
            },
            Err(e) => {
                tracing::debug!(bus = %self.bus, error = %e, "the tunnel's CAN end is not there yet");
                None
            }
        }
    }

    async fn update_peers(&self, peers: &mut Vec<Peer>) {
        let (found, error) = self.source.resolve().await;
        if let Some(e) = error {
            tracing::warn!(bus = %self.bus, error = %e, "peers not updated");
            if peers.iter().any(|p| !self.spec.peers.contains(&p.addr)) {
                // A failing resolver proves nothing about the instances found before.
                return;
            }
        }
        let before: BTreeSet<SocketAddr> = peers.iter().map(|p| p.addr).collect();
        if before == found {
            return;
        }
        for added in found.difference(&before) {
            tracing::info!(bus = %self.bus, peer = %added, "tunnel peer joined");
        }
        for gone in before.difference(&found) {
            tracing::info!(bus = %self.bus, peer = %gone, "tunnel peer left");
        }
        peers.retain(|p| found.contains(&p.addr));
        let now = Instant::now();
        for addr in found.difference(&before) {
            peers.push(Peer {
                addr: *addr,
                seq: 0,
                last_sent: now - HEARTBEAT_INTERVAL,
            });
        }
        let mut stats = self.lock_stats();
        stats.peers.retain(|a, _| found.contains(a));
        for addr in &found {
            let kind = if self.spec.peers.contains(addr) {
                PeerKind::External
            } else {
                PeerKind::Instance
            };
            stats
                .peers
                .entry(*addr)
                .or_insert_with(|| PeerStats::new(kind));
        }
    }

    /// A packet from `from`: checked and counted. Returns its sequence number and whether it
    /// came from an external peer, if it is to be delivered.
    fn accept(&self, bytes: &[u8], from: SocketAddr, peers: &[Peer]) -> Option<(u8, bool)> {
        if !peers.iter().any(|p| p.addr == from) {
            self.drop_one(UNKNOWN_PEER);
            return None;
        }
        let packet = match wire::decode(bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(bus = %self.bus, peer = %from, error = %e, "malformed packet dropped");
                self.drop_one(e.label());
                return None;
            }
        };
        let frames = packet.len() as u64;
        let bytes_in: u64 = packet.frames().map(|f| f.len() as u64).sum();
        let mut stats = self.lock_stats();
        let peer = stats.peers.get_mut(&from)?;
        if peer.sequence.record(packet.seq()) == Arrival::Restart {
            tracing::info!(bus = %self.bus, peer = %from, "tunnel peer restarted its numbering");
        }
        peer.rx_frames += frames;
        peer.rx_bytes += bytes_in;
        peer.last_seen = Some(SystemTime::now());
        Some((packet.seq(), peer.kind == PeerKind::External))
    }

    /// Puts the frames of an accepted packet on the bus. Returns them when they are to be
    /// relayed to the plugin's other instances: those of an external peer, which (like
    /// cannelloni) talks to one node only, while the instances talk to each other and to every
    /// external peer directly — so every frame reaches every node once.
    fn deliver(
        &self,
        bytes: &[u8],
        external: bool,
        can: Option<&AsyncFd<RawCanSocket>>,
    ) -> Vec<Frame> {
        let Ok(packet) = wire::decode(bytes) else {
            return Vec::new();
        };
        let mut full = 0u64;
        let mut raw = [0u8; CANFD_MTU];
        for frame in packet.frames() {
            match can {
                Some(can) if can.get_ref().send(frame.to_kernel(&mut raw)).is_ok() => {}
                _ => full += 1,
            }
        }
        if full > 0 {
            *self.lock_stats().dropped.entry(QUEUE_FULL).or_default() += full;
        }
        if external {
            packet.frames().collect()
        } else {
            Vec::new()
        }
    }

    /// Sends the batch to every peer (of kind `only`, if given), in as many packets as it takes.
    async fn send(
        &self,
        udp: &UdpSocket,
        encoder: &Encoder,
        peers: &mut [Peer],
        batch: &mut Vec<Frame>,
        packet: &mut Vec<u8>,
        only: Option<PeerKind>,
    ) {
        if batch.is_empty() {
            return;
        }
        let frames = batch.len() as u64;
        let bytes: u64 = batch.iter().map(|f| f.len() as u64).sum();
        let kinds = self.kinds(peers);
        for peer in peers
            .iter_mut()
            .filter(|p| only.is_none() || kinds.get(&p.addr).copied() == only)
        {
            let mut rest: &[Frame] = batch;
            let mut packets = 0u64;
            while !rest.is_empty() {
                let n = encoder.encode(peer.seq, rest, packet);
                if n == 0 {
                    break;
                }
                if let Err(e) = udp.send_to(packet, peer.addr).await {
                    tracing::debug!(bus = %self.bus, peer = %peer.addr, error = %e, "tunnel send failed");
                }
                peer.seq = peer.seq.wrapping_add(1);
                packets += 1;
                rest = &rest[n..];
            }
            peer.last_sent = Instant::now();
            if let Some(s) = self.lock_stats().peers.get_mut(&peer.addr) {
                s.tx_frames += frames;
                s.tx_bytes += bytes;
                s.tx_packets += packets;
            }
        }
        batch.clear();
    }
}

/// Frames waiting on the tunnel's CAN end, read until none is left; pending forever without one.
async fn readable(can: Option<&AsyncFd<RawCanSocket>>) -> std::io::Result<Vec<Frame>> {
    let Some(can) = can else {
        return std::future::pending().await;
    };
    let mut guard = can.readable().await?;
    let mut frames = Vec::new();
    let mut raw = [0u8; CANFD_MTU];
    loop {
        match guard.get_inner().recv(&mut raw) {
            Ok(n) => {
                // The kernel only hands out whole classic or FD frames; anything else is skipped.
                if let Ok(f) = Frame::from_kernel(&raw[..n]) {
                    frames.push(f);
                }
                if frames.len() >= 256 {
                    return Ok(frames);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                guard.clear_ready();
                return Ok(frames);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether the batch fills a packet already, so waiting longer gains nothing.
fn batch_is_full(batch: &[Frame]) -> bool {
    let size: usize = wire::HEADER_LEN + batch.iter().map(Frame::wire_len).sum::<usize>();
    size + wire::MAX_FRAME_WIRE_LEN > DEFAULT_PAYLOAD_LIMIT
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
