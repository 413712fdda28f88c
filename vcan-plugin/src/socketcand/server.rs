//! One bus's socketcand endpoint: a TCP listener speaking [`protocol`] to its clients and one
//! CAN_RAW socket on the I/O end of the bus's `socketcand` pair.
//!
//! Frames the bus carries are read once, formatted once and queued to every client in raw mode;
//! a client's frames are written to the bus once (can-gw takes them to every member) and queued
//! to the other clients, as a socketcand sharing one interface would show them. A client never
//! gets its own frames back. Each client has a bounded queue: a client that stops reading fills
//! it and is disconnected, so it never holds up the bus or the other clients.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::config::SocketcandSpec;
use crate::bus::socketcand_io_name;
use crate::kernel::can_raw::{CANFD_MTU, RawCanSocket, read_waiting};
use crate::kernel::netns::Netns;
use crate::kernel::sockbuf::{self, Buffer};
use crate::socketcand::protocol::{self, Command, ProtocolError, Splitter};
use crate::telemetry::metrics::SocketcandSample;
use crate::tunnel::wire::Frame;

/// Messages queued to one client before it counts as not reading: about 70 KiB of frames, a
/// quarter of a second of a fully loaded 1 Mbit/s bus, on top of [`SEND_BUFFER`].
const CLIENT_QUEUE: usize = 2048;
/// The kernel's send buffer of a client's socket, fixed rather than left to grow to megabytes:
/// what a client that stopped reading can hold up is bounded, and noticed sooner.
const SEND_BUFFER: usize = 64 * 1024;
/// How long a client may take to open the bus after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Protocol errors after which a client is disconnected: it is not speaking socketcand.
const MAX_PROTOCOL_ERRORS: u32 = 64;
/// Pause after a handshake reply before anything else goes out: python-can reads each reply
/// with one `recv` and compares it whole, so a frame right behind it would fail the handshake.
const HANDSHAKE_SETTLE: Duration = Duration::from_millis(50);
/// How long a client's frame waits for room in the bus end's queue before it is dropped.
const SEND_PATIENCE: Duration = Duration::from_millis(500);
/// How long a refused connection is given to read why.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the endpoint could not run.
#[derive(Debug, thiserror::Error)]
pub enum SocketcandError {
    /// The listening socket could not be bound.
    #[error(
        "bus {bus}: cannot listen for socketcand clients on {address}: {source} (choose another \
         socketcand.port in the bus configuration)"
    )]
    Bind {
        /// The bus.
        bus: String,
        /// The address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// What one client is sent: text, or a handshake reply that must arrive on its own.
#[derive(Debug, Clone)]
enum Out {
    Text(Arc<str>),
    Handshake(&'static str),
}

/// Why a client went away, as the metric's `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Gone {
    Closed,
    SlowClient,
    ProtocolError,
    HandshakeTimeout,
    WrongBus,
    Shutdown,
}

impl Gone {
    fn label(self) -> &'static str {
        match self {
            Gone::Closed => "closed",
            Gone::SlowClient => "slow_client",
            Gone::ProtocolError => "protocol_error",
            Gone::HandshakeTimeout => "handshake_timeout",
            Gone::WrongBus => "wrong_bus",
            Gone::Shutdown => "shutdown",
        }
    }
}

/// A connected client as the fan-out sees it.
#[derive(Debug)]
struct Client {
    id: u64,
    /// In raw mode: gets the bus's frames.
    raw: AtomicBool,
    queue: mpsc::Sender<Out>,
    /// Cancelled to disconnect the client; `slow` says it was for not reading.
    kill: CancellationToken,
    slow: AtomicBool,
}

impl Client {
    /// Queues `out`; a full queue disconnects the client as not reading.
    fn offer(&self, out: Out) -> bool {
        match self.queue.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.slow.store(true, Ordering::Relaxed);
                self.kill.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Kinds of protocol errors besides [`ProtocolError::LABELS`]: what a valid command may do wrong.
const SESSION_ERRORS: [&str; 4] = ["wrong_bus", "no_bus_open", "bad_state", "unsupported"];
/// Why frames are not passed on.
const DROP_REASONS: [&str; 4] = ["fd_frame", "remote_frame", "bus_not_connected", "bus_full"];

/// The endpoint's counts, read by scrapes.
#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    refused: AtomicU64,
    frames_to_clients: AtomicU64,
    frames_from_clients: AtomicU64,
    bytes_to_clients: AtomicU64,
    bytes_from_clients: AtomicU64,
    /// Protocol errors, disconnections and frames not passed on, by label.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    disconnects: Mutex<BTreeMap<&'static str, u64>>,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
}

impl Stats {
    /// Every label from zero, so that a dashboard's rates draw (at 0) before the first error.
    fn new() -> Self {
        let zeros = |labels: &[&'static str]| Mutex::new(labels.iter().map(|l| (*l, 0)).collect());
        let errors: Vec<&'static str> = ProtocolError::LABELS
            .iter()
            .chain(&SESSION_ERRORS)
            .copied()
            .collect();
        let gone = [
            Gone::Closed,
            Gone::SlowClient,
            Gone::ProtocolError,
            Gone::HandshakeTimeout,
            Gone::WrongBus,
            Gone::Shutdown,
        ]
        .map(Gone::label);
        Stats {
            errors: zeros(&errors),
            disconnects: zeros(&gone),
            dropped: zeros(&DROP_REASONS),
            ..Stats::default()
        }
    }
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, label: &'static str) {
    *map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(label)
        .or_default() += 1;
}

fn read(map: &Mutex<BTreeMap<&'static str, u64>>) -> Vec<(&'static str, u64)> {
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// The socketcand endpoint of one bus.
#[derive(Debug)]
pub struct Endpoint {
    bus: String,
    /// The bus's member interface name, which clients may open as well as the bus's name.
    interface: String,
    spec: SocketcandSpec,
    io_ns: Netns,
    clients: Mutex<Vec<Arc<Client>>>,
    can: Mutex<Option<Arc<AsyncFd<RawCanSocket>>>>,
    next_id: AtomicU64,
    stats: Arc<Stats>,
}

impl Endpoint {
    /// The endpoint of bus `bus` (members see it as `interface`), its I/O end in `io_ns`.
    pub fn new(bus: &str, interface: &str, spec: SocketcandSpec, io_ns: Netns) -> Self {
        Endpoint {
            bus: bus.to_string(),
            interface: interface.to_string(),
            spec,
            io_ns,
            clients: Mutex::new(Vec::new()),
            can: Mutex::new(None),
            next_id: AtomicU64::new(1),
            stats: Arc::new(Stats::new()),
        }
    }

    /// The bus served.
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// The endpoint's counts for a scrape.
    pub fn sample(&self) -> SocketcandSample {
        let s = &self.stats;
        SocketcandSample {
            bus: self.bus.clone(),
            clients: self.lock_clients().len() as u64,
            accepted: s.accepted.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            frames_to_clients: s.frames_to_clients.load(Ordering::Relaxed),
            frames_from_clients: s.frames_from_clients.load(Ordering::Relaxed),
            bytes_to_clients: s.bytes_to_clients.load(Ordering::Relaxed),
            bytes_from_clients: s.bytes_from_clients.load(Ordering::Relaxed),
            protocol_errors: read(&s.errors),
            disconnects: read(&s.disconnects),
            dropped: read(&s.dropped),
        }
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Client>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn can_socket(&self) -> Option<Arc<AsyncFd<RawCanSocket>>> {
        self.can.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_can_socket(&self, can: Option<Arc<AsyncFd<RawCanSocket>>>) {
        *self.can.lock().unwrap_or_else(|p| p.into_inner()) = can;
    }

    /// Listens and serves clients until `shutdown`. The bus end is opened once its pair exists
    /// (the reconcile pass makes it) and again if it goes away.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), SocketcandError> {
        let span = tracing::info_span!("socketcand", bus = %self.bus, listen = %self.spec.listen);
        self.run_loop(shutdown).instrument(span).await
    }

    async fn run_loop(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), SocketcandError> {
        let listener = TcpListener::bind(self.spec.listen)
            .await
            .map_err(|source| SocketcandError::Bind {
                bus: self.bus.clone(),
                address: self.spec.listen,
                source,
            })?;
        tracing::info!("socketcand endpoint listening");
        let mut reopen = tokio::time::interval(Duration::from_millis(500));
        reopen.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut formatted = String::new();
        loop {
            let can = self.can_socket();
            tokio::select! {
                () = shutdown.cancelled() => {
                    for client in self.lock_clients().iter() {
                        client.kill.cancel();
                    }
                    return Ok(());
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, from)) => self.admit(stream, from, &shutdown),
                    Err(e) => {
                        // Out of descriptors, most likely: the clients already connected keep
                        // being served; accepting resumes when some go.
                        tracing::warn!(error = %e, "cannot accept a socketcand client");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = reopen.tick(), if can.is_none() => {
                    self.set_can_socket(self.open_can().await.map(Arc::new));
                }
                frames = readable(can.as_deref()) => match frames {
                    Ok(frames) => {
                        let now = unix_now();
                        for frame in frames {
                            self.fan_out(&frame, now, None, &mut formatted);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the socketcand end of the bus failed; reopening");
                        self.set_can_socket(None);
                    }
                },
            }
        }
    }

    async fn open_can(&self) -> Option<AsyncFd<RawCanSocket>> {
        match RawCanSocket::open_async(&self.io_ns, &socketcand_io_name(&self.bus)).await {
            Ok(fd) => {
                tracing::info!("socketcand endpoint connected to the bus");
                Some(fd)
            }
            Err(e) => {
                tracing::debug!(error = %e, "the socketcand end of the bus is not there yet");
                None
            }
        }
    }

    /// Queues `frame` to every client in raw mode but `except` (its sender).
    fn fan_out(&self, frame: &Frame, at: Duration, except: Option<u64>, text: &mut String) {
        text.clear();
        if !protocol::format_frame(frame, at, text) {
            let reason = if frame.is_fd() {
                "fd_frame"
            } else {
                "remote_frame"
            };
            bump(&self.stats.dropped, reason);
            return;
        }
        let line: Arc<str> = Arc::from(text.as_str());
        for client in self.lock_clients().iter() {
            if Some(client.id) != except
                && client.raw.load(Ordering::Relaxed)
                && client.offer(Out::Text(line.clone()))
            {
                self.stats.frames_to_clients.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Takes a new connection: served if there is room, told why not otherwise.
    fn admit(self: &Arc<Self>, stream: TcpStream, from: SocketAddr, shutdown: &CancellationToken) {
        let limit = self.spec.max_clients as usize;
        let mut clients = self.lock_clients();
        if clients.len() >= limit {
            drop(clients);
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %from, limit, "socketcand client refused: too many clients");
            let reply = protocol::format_error(&format!(
                "too many clients: this endpoint serves at most {limit} at once \
                 (socketcand.max_clients in the bus configuration)"
            ));
            tokio::spawn(async move {
                let mut stream = stream;
                let _ =
                    tokio::time::timeout(REFUSAL_TIMEOUT, stream.write_all(reply.as_bytes())).await;
            });
            return;
        }
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let (queue, rx) = mpsc::channel(CLIENT_QUEUE);
        let client = Arc::new(Client {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            raw: AtomicBool::new(false),
            queue,
            kill: shutdown.child_token(),
            slow: AtomicBool::new(false),
        });
        clients.push(client.clone());
        drop(clients);
        tracing::info!(client = %from, id = client.id, "socketcand client connected");
        let endpoint = self.clone();
        let span = tracing::info_span!("client", client = %from);
        tokio::spawn(
            async move {
                let gone = endpoint.serve(stream, &client, rx).await;
                let gone = if client.slow.load(Ordering::Relaxed) {
                    Gone::SlowClient
                } else {
                    gone
                };
                endpoint.lock_clients().retain(|c| c.id != client.id);
                bump(&endpoint.stats.disconnects, gone.label());
                tracing::info!(reason = gone.label(), "socketcand client disconnected");
            }
            .instrument(span),
        );
    }

    /// Serves one client until it goes; says why it went.
    async fn serve(&self, stream: TcpStream, client: &Client, rx: mpsc::Receiver<Out>) -> Gone {
        // Frames are small and latency is the point: no Nagle delay.
        let _ = stream.set_nodelay(true);
        limit_send_buffer(&stream);
        let (mut reader, writer) = stream.into_split();
        let writing = tokio::spawn(write_out(
            writer,
            rx,
            client.kill.clone(),
            self.stats.clone(),
        ));
        client.offer(Out::Handshake(protocol::HELLO));
        let mut session = Session {
            mode: Mode::NoBus,
            errors: 0,
        };
        let mut splitter = Splitter::new();
        let mut buf = vec![0u8; 4096];
        let handshake = tokio::time::sleep(HANDSHAKE_TIMEOUT);
        tokio::pin!(handshake);
        let gone = loop {
            let n = tokio::select! {
                () = client.kill.cancelled() => break if client.slow.load(Ordering::Relaxed) {
                    Gone::SlowClient
                } else {
                    Gone::Shutdown
                },
                () = &mut handshake, if session.mode == Mode::NoBus => break Gone::HandshakeTimeout,
                read = reader.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break Gone::Closed,
                    Ok(n) => n,
                },
            };
            self.stats
                .bytes_from_clients
                .fetch_add(n as u64, Ordering::Relaxed);
            splitter.push(&buf[..n]);
            let mut verdict = None;
            for next in splitter.by_ref() {
                let result = next.and_then(|text| protocol::parse(&text));
                if let Some(gone) = self.handle(result, &mut session, client).await {
                    verdict = Some(gone);
                    break;
                }
            }
            if let Some(gone) = verdict {
                break gone;
            }
        };
        client.kill.cancel();
        // The writer flushes what was queued before the kill (e.g. why the client is closed)
        // as far as the client reads it, then stops.
        let _ = writing.await;
        gone
    }

    /// Carries out one command (or answers its error); `Some` ends the connection.
    async fn handle(
        &self,
        command: Result<Command, ProtocolError>,
        session: &mut Session,
        client: &Client,
    ) -> Option<Gone> {
        let reply = |text: String| client.offer(Out::Text(Arc::from(text)));
        let command = match command {
            Ok(c) => c,
            Err(e) => {
                bump(&self.stats.errors, e.label());
                session.errors += 1;
                reply(protocol::format_error(&e.to_string()));
                if e.is_fatal() || session.errors >= MAX_PROTOCOL_ERRORS {
                    return Some(Gone::ProtocolError);
                }
                return None;
            }
        };
        match (session.mode, command) {
            (_, Command::Echo) => {
                reply(protocol::ECHO.to_string());
            }
            (Mode::NoBus, Command::Open(name)) => {
                if name == self.bus || name == self.interface {
                    session.mode = Mode::Bcm;
                    client.offer(Out::Handshake(protocol::OK));
                } else {
                    bump(&self.stats.errors, "wrong_bus");
                    reply(protocol::format_error(&format!(
                        "could not open bus '{name}': this endpoint serves bus '{}' (open '{}' \
                         or '{}')",
                        self.bus, self.interface, self.bus
                    )));
                    // As socketcand does: a bus that cannot be opened ends the connection.
                    return Some(Gone::WrongBus);
                }
            }
            (Mode::NoBus, _) => {
                bump(&self.stats.errors, "no_bus_open");
                reply(protocol::format_error(&format!(
                    "no bus is open: open it first ('open {}')",
                    self.interface
                )));
            }
            (_, Command::Open(_)) => {
                bump(&self.stats.errors, "bad_state");
                reply(protocol::format_error("a bus is open already"));
            }
            (_, Command::RawMode) => {
                session.mode = Mode::Raw;
                client.offer(Out::Handshake(protocol::OK));
                client.raw.store(true, Ordering::Relaxed);
            }
            (_, Command::BcmMode) => {
                session.mode = Mode::Bcm;
                client.raw.store(false, Ordering::Relaxed);
                client.offer(Out::Handshake(protocol::OK));
            }
            (_, Command::ControlMode | Command::IsotpMode) => {
                bump(&self.stats.errors, "unsupported");
                reply(protocol::format_error(
                    "only the raw and BCM modes are served here (use 'rawmode')",
                ));
            }
            (_, Command::Unsupported(what)) => {
                bump(&self.stats.errors, "unsupported");
                reply(protocol::format_error(&format!(
                    "{what} is not supported by this endpoint: use 'rawmode' to receive and \
                     'send' to send"
                )));
            }
            (_, Command::Send(frame)) => self.send(&frame, client.id).await,
        }
        None
    }

    /// Writes a client's frame to the bus and queues it to the other clients.
    async fn send(&self, frame: &Frame, from: u64) {
        let Some(can) = self.can_socket() else {
            bump(&self.stats.dropped, "bus_not_connected");
            return;
        };
        let mut raw = [0u8; CANFD_MTU];
        let bytes = frame.to_kernel(&mut raw);
        let deadline = tokio::time::Instant::now() + SEND_PATIENCE;
        loop {
            match can.get_ref().send(bytes) {
                Ok(()) => break,
                // The bus end's queue is full (ENOBUFS on CAN interfaces): the client's TCP
                // stream waits meanwhile, which is how it learns to slow down.
                Err(e)
                    if (e.kind() == std::io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(libc::ENOBUFS))
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "a client's frame could not be written to the bus");
                    bump(&self.stats.dropped, "bus_full");
                    return;
                }
            }
        }
        self.stats
            .frames_from_clients
            .fetch_add(1, Ordering::Relaxed);
        let mut text = String::new();
        self.fan_out(frame, unix_now(), Some(from), &mut text);
    }
}

/// The protocol state of one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoBus,
    Bcm,
    Raw,
}

#[derive(Debug)]
struct Session {
    mode: Mode,
    errors: u32,
}

/// Writes what is queued for a client until it is killed; after a kill, what is already queued
/// (a refusal, an error) goes out as far as the client takes it within a moment.
async fn write_out(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    kill: CancellationToken,
    stats: Arc<Stats>,
) {
    let written = &stats.bytes_to_clients;
    loop {
        let out = tokio::select! {
            biased;
            out = rx.recv() => out,
            () = kill.cancelled() => None,
        };
        let Some(out) = out else { break };
        // A write that cannot finish at once waits for the client, unless the client is killed
        // meanwhile (it stopped reading, or it is being closed).
        let wrote = tokio::select! {
            biased;
            w = write_one(&mut writer, &out, written) => w,
            () = kill.cancelled() => break,
        };
        if wrote.is_err() {
            kill.cancel();
            return;
        }
        if matches!(out, Out::Handshake(_)) {
            tokio::time::sleep(HANDSHAKE_SETTLE).await;
        }
    }
    // Last words only: whatever is queued, for a moment, never waiting on a client that does not
    // read.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(out) = rx.try_recv() {
            if write_one(&mut writer, &out, written).await.is_err() {
                break;
            }
        }
    })
    .await;
    let _ = writer.shutdown().await;
}

async fn write_one(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    out: &Out,
    written: &AtomicU64,
) -> std::io::Result<()> {
    let text: &str = match out {
        Out::Text(t) => t,
        Out::Handshake(t) => t,
    };
    writer.write_all(text.as_bytes()).await?;
    written.fetch_add(text.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Frames waiting on the bus end (a batch); pending forever without one.
async fn readable(can: Option<&AsyncFd<RawCanSocket>>) -> std::io::Result<Vec<Frame>> {
    let mut frames = Vec::new();
    read_waiting(can, 256, |raw| {
        if let Ok(f) = Frame::from_kernel(raw) {
            frames.push(f);
        }
    })
    .await?;
    Ok(frames)
}

fn limit_send_buffer(stream: &TcpStream) {
    use std::os::fd::AsFd;
    if let Err(e) = sockbuf::set(stream.as_fd(), Buffer::Send, SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot size a client's send buffer");
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// An endpoint on a free loopback port whose bus end never appears (no CAN on the host):
    /// everything but frames.
    async fn endpoint(max_clients: u32) -> (Arc<Endpoint>, SocketAddr, CancellationToken) {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let listen = free.local_addr().expect("address");
        drop(free);
        let spec = SocketcandSpec {
            listen,
            max_clients,
        };
        let e = Arc::new(Endpoint::new(
            "eng",
            "can0",
            spec,
            Netns::Pid(std::process::id()),
        ));
        let shutdown = CancellationToken::new();
        tokio::spawn(e.clone().run(shutdown.clone()));
        for _ in 0..100 {
            if TcpStream::connect(listen).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The probing connection counts as a client until the endpoint sees it close.
        for _ in 0..100 {
            let s = e.sample();
            if s.accepted == 1 && s.clients == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (e, listen, shutdown)
    }

    /// Reads until `want` replies (`< ... >`) arrived or the connection closed.
    async fn replies(stream: &mut TcpStream, want: usize) -> Vec<String> {
        let mut text = String::new();
        let mut buf = [0u8; 1024];
        while text.matches('>').count() < want {
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
            match read {
                Ok(Ok(n)) if n > 0 => text.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => break,
            }
        }
        text.split_inclusive('>')
            .map(|r| r.trim().to_string())
            .collect()
    }

    async fn closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn handshake_errors_and_echo() {
        let (e, listen, shutdown) = endpoint(4).await;
        let mut c = TcpStream::connect(listen).await.expect("connect");
        assert_eq!(replies(&mut c, 1).await, ["< hi >"]);
        c.write_all(b"< open can0 >").await.expect("write");
        assert_eq!(replies(&mut c, 1).await, ["< ok >"]);
        c.write_all(b"< rawmode >< send 800 1 1 >< bogus >\n<echo>")
            .await
            .expect("write");
        let got = replies(&mut c, 4).await;
        assert_eq!(got[0], "< ok >");
        assert!(
            got[1].starts_with("< error ") && got[1].contains("7FF"),
            "{got:?}"
        );
        assert!(got[2].starts_with("< error "), "{got:?}");
        assert_eq!(got[3], "< echo >");
        // The bus end is not there on the host: a valid frame is dropped and counted.
        c.write_all(b"< send 123 2 de ad >< echo >")
            .await
            .expect("write");
        assert_eq!(replies(&mut c, 1).await, ["< echo >"]);
        let s = e.sample();
        assert_eq!(s.clients, 1);
        let nonzero = |counts: &[(&'static str, u64)]| -> Vec<(&'static str, u64)> {
            counts.iter().copied().filter(|(_, n)| *n > 0).collect()
        };
        assert_eq!(nonzero(&s.dropped), [("bus_not_connected", 1)]);
        assert_eq!(
            nonzero(&s.protocol_errors),
            [("bad_arguments", 1), ("unknown_command", 1)]
        );
        // Every label is there from zero.
        assert_eq!(s.dropped.len(), DROP_REASONS.len());
        assert_eq!(s.disconnects.len(), 6);
        drop(c);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_wrong_bus_and_an_endless_line_end_the_connection() {
        let (e, listen, shutdown) = endpoint(4).await;
        let mut c = TcpStream::connect(listen).await.expect("connect");
        c.write_all(b"< open vcan9 >").await.expect("write");
        let got = replies(&mut c, 2).await;
        assert!(got[1].contains("could not open bus 'vcan9'"), "{got:?}");
        assert!(closed(&mut c).await);

        let mut c = TcpStream::connect(listen).await.expect("connect");
        c.write_all(b"< open eng >< send 123 1 ")
            .await
            .expect("write");
        c.write_all(&[b'0'; 70_000]).await.expect("write");
        let got = replies(&mut c, 3).await;
        assert_eq!(got[..2], ["< hi >", "< ok >"]);
        assert!(got[2].starts_with("< error "), "{got:?}");
        assert!(closed(&mut c).await);
        for _ in 0..100 {
            if e.sample().clients == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = e.sample();
        assert_eq!(s.clients, 0);
        // Besides the probe's "closed".
        assert!(s.disconnects.contains(&("protocol_error", 1)), "{s:?}");
        assert!(s.disconnects.contains(&("wrong_bus", 1)), "{s:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn clients_beyond_the_limit_are_told_why() {
        let (e, listen, shutdown) = endpoint(2).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(listen).await.expect("connect");
            assert_eq!(replies(&mut c, 1).await, ["< hi >"]);
            held.push(c);
        }
        let mut extra = TcpStream::connect(listen).await.expect("connect");
        let got = replies(&mut extra, 1).await;
        assert!(
            got[0].starts_with("< error too many clients: this endpoint serves at most 2"),
            "{got:?}"
        );
        assert!(closed(&mut extra).await);
        assert_eq!(e.sample().refused, 1);
        shutdown.cancel();
    }
}
