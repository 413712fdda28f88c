//! A bus across two nodes in the CAN test-bed VM (`cargo xtask bench-xnode`, see BENCHMARKS.md):
//! one FD bus `x` with `"span": "cluster"` (default batch, 1 ms), node B behind netem delay, a
//! sender `s` and a receiver `r1` on node A, a receiver `r2` on node B. The bench opens CAN_RAW
//! sockets on the pods' `can0` itself and measures, in one run:
//!
//! 1. one-way latency sender → same-node member vs sender → cross-node member (paced frames
//!    carrying a sequence number; send and receive instants on the guest's one clock);
//! 2. frames/s each member receives while the sender floods, and frames lost;
//! 3. frames lost at a steady rate (default 1000 frames/s for 5 s).
//!
//! It prints the figures and also writes them to `$VMTEST_RESULTS/xnode-bench.txt` if set.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vcan_e2e::cluster::{ClusterBus, ClusterNode, NODE_A, NODE_B, Network, member, pod_netns};
use vcan_e2e::containerd::{Containerd, ContainerdOptions};
use vcan_plugin::kernel::can_raw::{CAN_MTU, CANFD_MTU, RawCanSocket};
use vcan_plugin::kernel::netns::Netns;
use vcan_test_support::require_testbed;

/// The bus: FD, the default batch (1 ms), node A and node B as each other's only peers.
const BUS_JSON: &str = r#"{"buses": [{"name": "x", "fd": true, "members": 4, "interface": "can0",
                            "span": "cluster", "port": 20000}]}"#;
/// Identifiers of each phase's frames, so that a late frame of one phase never counts in the next.
const WARM_UP_ID: u32 = 0x100;
const LATENCY_ID: u32 = 0x101;
const FLOOD_ID: u32 = 0x102;
const RATE_ID: u32 = 0x103;
/// How long after its last send a phase waits for frames still on their way.
const DRAIN: Duration = Duration::from_secs(3);

struct Args {
    latency_frames: usize,
    interval: Duration,
    flood_frames: usize,
    rate: usize,
    seconds: u64,
    netem: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        latency_frames: 2000,
        interval: Duration::from_millis(2),
        flood_frames: 20000,
        rate: 1000,
        seconds: 5,
        netem: "delay 1ms".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        let number = || -> Result<usize> {
            value
                .parse()
                .with_context(|| format!("{flag} needs a number, got {value:?}"))
        };
        match flag.as_str() {
            "--latency-frames" => args.latency_frames = number()?,
            "--interval-us" => args.interval = Duration::from_micros(number()? as u64),
            "--flood-frames" => args.flood_frames = number()?,
            "--rate" => args.rate = number()?,
            "--seconds" => args.seconds = number()? as u64,
            "--netem" => args.netem = value,
            other => bail!(
                "unknown argument {other}; use --latency-frames N --interval-us US \
                 --flood-frames N --rate FRAMES_PER_S --seconds S --netem 'delay 1ms'"
            ),
        }
    }
    if args.rate == 0 || args.latency_frames == 0 || args.flood_frames == 0 {
        bail!("--latency-frames, --flood-frames and --rate must be positive");
    }
    Ok(args)
}

/// A classic frame `id#<seq as 4 bytes LE>00000000`.
fn frame(id: u32, seq: u32) -> [u8; CAN_MTU] {
    let mut f = [0u8; CAN_MTU];
    f[..4].copy_from_slice(&id.to_ne_bytes());
    f[4] = 8;
    f[8..12].copy_from_slice(&seq.to_le_bytes());
    f
}

/// Sends one frame, retrying while the socket's send buffer or the interface's queue is full.
fn send(socket: &RawCanSocket, f: &[u8]) -> io::Result<()> {
    loop {
        match socket.send(f) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOBUFS) =>
            {
                std::thread::sleep(Duration::from_micros(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Gives the receivers' sockets room for a whole flood, so that what is measured is the bus and
/// the tunnel, not how fast a receiver thread is scheduled under TCG.
fn grow_receive_buffer(socket: &RawCanSocket) -> io::Result<()> {
    let size: libc::c_int = 8 << 20;
    // SAFETY: the option value points at a c_int of the length given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Frames of phase `id` a receiver got: sequence number → the instants it arrived (more than
/// one is a duplicate).
type Received = HashMap<u32, Vec<Instant>>;

/// Reads `socket` until `stop`, keeping the frames with identifier `id`; counts them in `count`.
fn receive(socket: &RawCanSocket, id: u32, stop: &AtomicBool, count: &AtomicUsize) -> Received {
    let mut got: Received = HashMap::new();
    let mut buf = [0u8; CANFD_MTU];
    loop {
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 20) };
        if ready <= 0 {
            if stop.load(Ordering::Relaxed) {
                return got;
            }
            continue;
        }
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let at = Instant::now();
                    if n >= CAN_MTU && u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) == id {
                        let seq = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
                        got.entry(seq).or_default().push(at);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading a receiver's socket: {e}"),
            }
        }
    }
}

/// Runs one phase: both receivers read while `sender` sends (returning each frame's send
/// instant); waits until both have `expected` frames or none arrived for [`DRAIN`].
fn phase(
    receivers: [&RawCanSocket; 2],
    id: u32,
    expected: usize,
    sender: impl FnOnce() -> io::Result<Vec<Instant>>,
) -> Result<(Vec<Instant>, [Received; 2])> {
    let stop = AtomicBool::new(false);
    let counts = [AtomicUsize::new(0), AtomicUsize::new(0)];
    std::thread::scope(|scope| {
        let threads = [0, 1].map(|i| {
            let (stop, count, socket) = (&stop, &counts[i], receivers[i]);
            scope.spawn(move || receive(socket, id, stop, count))
        });
        // The receivers are polling before the first frame leaves.
        std::thread::sleep(Duration::from_millis(100));
        let sent = sender();
        let mut last = (0, Instant::now());
        loop {
            let total = counts[0].load(Ordering::Relaxed) + counts[1].load(Ordering::Relaxed);
            if total >= 2 * expected || sent.is_err() {
                break;
            }
            if total != last.0 {
                last = (total, Instant::now());
            } else if last.1.elapsed() >= DRAIN {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        let [r1, r2] = threads.map(|t| t.join().expect("receiver thread"));
        Ok((sent.context("sending")?, [r1, r2]))
    })
}

/// Sends `n` frames of `id`, frame `i` at `start + i * interval` (at once when late).
fn paced(socket: &RawCanSocket, id: u32, n: usize, interval: Duration) -> io::Result<Vec<Instant>> {
    let mut sent = Vec::with_capacity(n);
    let start = Instant::now() + Duration::from_millis(10);
    for i in 0..n {
        let due = start + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let f = frame(id, i as u32);
        sent.push(Instant::now());
        send(socket, &f)?;
    }
    Ok(sent)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What one receiver got of `sent.len()` frames.
struct Summary {
    /// One-way latencies of the frames received, sorted.
    latencies: Vec<Duration>,
    /// Frames never received.
    lost: usize,
    /// Frames received more than once, extra copies.
    duplicates: usize,
    /// Frames received after a frame sent later.
    reordered: usize,
    /// The last arrival.
    last: Option<Instant>,
}

fn summarise(sent: &[Instant], got: &Received) -> Summary {
    let mut latencies = Vec::new();
    let mut arrivals: Vec<(Instant, u32)> = Vec::new();
    let mut duplicates = 0;
    for (seq, sent_at) in sent.iter().enumerate() {
        if let Some(at) = got.get(&(seq as u32)) {
            duplicates += at.len() - 1;
            latencies.push(at[0].saturating_duration_since(*sent_at));
            arrivals.push((at[0], seq as u32));
        }
    }
    latencies.sort();
    arrivals.sort();
    let reordered = arrivals.windows(2).filter(|w| w[1].1 < w[0].1).count();
    Summary {
        lost: sent.len() - latencies.len(),
        latencies,
        duplicates,
        reordered,
        last: arrivals.last().map(|(at, _)| *at),
    }
}

fn latency_line(name: &str, s: &Summary) -> String {
    format!(
        "  {name}: n={} p50={:.3} ms p99={:.3} ms max={:.3} ms; lost {}, duplicated {}, reordered {}",
        s.latencies.len(),
        ms(percentile(&s.latencies, 50.0)),
        ms(percentile(&s.latencies, 99.0)),
        ms(s.latencies.last().copied().unwrap_or_default()),
        s.lost,
        s.duplicates,
        s.reordered
    )
}

/// Tunnel counters of the A → B direction: frames and packets A sent to B, frames B received
/// from A, packets of A that B counted lost.
fn tunnel_counters(a: &ClusterNode, b: &ClusterNode) -> [f64; 4] {
    let to_b = "bus=\"x\",direction=\"tx\",kind=\"instance\",peer=\"10.99.0.2:20000\"";
    let from_a = "bus=\"x\",direction=\"rx\",kind=\"instance\",peer=\"10.99.0.1:20000\"";
    let a_at_b = "bus=\"x\",kind=\"instance\",peer=\"10.99.0.1:20000\"";
    [
        a.metric(&format!("vcan_plugin_tunnel_frames_total{{{to_b}}}")),
        a.metric(&format!("vcan_plugin_tunnel_packets_total{{{to_b}}}")),
        b.metric(&format!("vcan_plugin_tunnel_frames_total{{{from_a}}}")),
        b.metric(&format!(
            "vcan_plugin_tunnel_packets_lost_total{{{a_at_b}}}"
        )),
    ]
    .map(|v| v.unwrap_or(f64::NAN))
}

fn tunnel_line(before: [f64; 4], after: [f64; 4]) -> String {
    let d: Vec<f64> = before.iter().zip(after).map(|(b, a)| a - b).collect();
    format!(
        "  tunnel A→B during the phase: A sent {} frames in {} packets ({:.1} frames/packet, \
         heartbeats included), B received {} frames, B counted {} packets lost",
        d[0],
        d[1],
        d[0] / d[1],
        d[2],
        d[3]
    )
}

/// Everything measured, as text.
fn measure(
    args: &Args,
    a: &ClusterNode,
    b: &ClusterNode,
    s: &RawCanSocket,
    r: [&RawCanSocket; 2],
) -> Result<String> {
    let mut out = String::new();
    let mut say = |line: String| {
        println!("{line}");
        out.push_str(&line);
        out.push('\n');
    };

    // The first frames through the tunnel resolve node B's address (ARP): keep them out of the
    // figures by sending until both receivers have one.
    let started = Instant::now();
    let mut seq = 0;
    loop {
        let (_, [r1, r2]) = phase(r, WARM_UP_ID, 1, || {
            send(s, &frame(WARM_UP_ID, seq))?;
            Ok(vec![Instant::now()])
        })?;
        seq += 1;
        if !r1.is_empty() && !r2.is_empty() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "no frame crossed to node B within 60 s:\nA:\n{}\nB:\n{}",
                a.tunnel_metrics(),
                b.tunnel_metrics()
            );
        }
    }
    std::thread::sleep(Duration::from_secs(1));

    // 1. Latency.
    let before = tunnel_counters(a, b);
    let (sent, [r1, r2]) = phase(r, LATENCY_ID, args.latency_frames, || {
        paced(s, LATENCY_ID, args.latency_frames, args.interval)
    })?;
    let (l1, l2) = (summarise(&sent, &r1), summarise(&sent, &r2));
    say(format!(
        "latency, one way, {} classic frames paced every {} µs:",
        args.latency_frames,
        args.interval.as_micros()
    ));
    say(latency_line("s → r1 (same node) ", &l1));
    say(latency_line("s → r2 (other node)", &l2));
    let ratio = |p: f64| {
        ms(percentile(&l2.latencies, p)) / ms(percentile(&l1.latencies, p)).max(f64::MIN_POSITIVE)
    };
    say(format!(
        "  ratio other node / same node: p50 {:.1}, p99 {:.1}",
        ratio(50.0),
        ratio(99.0)
    ));
    say(tunnel_line(before, tunnel_counters(a, b)));
    std::thread::sleep(Duration::from_secs(2));

    // 2. Throughput.
    let before = tunnel_counters(a, b);
    let n = args.flood_frames;
    let (sent, [r1, r2]) = phase(r, FLOOD_ID, n, || {
        let mut sent = Vec::with_capacity(n);
        for i in 0..n {
            let f = frame(FLOOD_ID, i as u32);
            sent.push(Instant::now());
            send(s, &f)?;
        }
        Ok(sent)
    })?;
    let (first, last_sent) = (sent[0], sent[sent.len() - 1]);
    say(format!(
        "throughput, {n} classic frames back to back: sender {:.0} frames/s",
        n as f64 / (last_sent - first).as_secs_f64().max(1e-9)
    ));
    for (name, got) in [("r1 (same node) ", &r1), ("r2 (other node)", &r2)] {
        let sum = summarise(&sent, got);
        let received = n - sum.lost;
        let rate = sum.last.map_or(0.0, |last| {
            received as f64 / (last - first).as_secs_f64().max(1e-9)
        });
        say(format!(
            "  {name}: {rate:.0} frames/s received (first send to last arrival), {received} \
             received, {} lost, duplicated {}, reordered {}",
            sum.lost, sum.duplicates, sum.reordered
        ));
    }
    say(tunnel_line(before, tunnel_counters(a, b)));
    std::thread::sleep(Duration::from_secs(2));

    // 3. Steady rate.
    let before = tunnel_counters(a, b);
    let n = args.rate * args.seconds as usize;
    let interval = Duration::from_secs(1) / args.rate as u32;
    let (sent, [r1, r2]) = phase(r, RATE_ID, n, || paced(s, RATE_ID, n, interval))?;
    let took = sent[sent.len() - 1] - sent[0];
    say(format!(
        "steady rate, {} frames/s for {} s ({n} frames, sent in {:.2} s), netem {:?} only:",
        args.rate,
        args.seconds,
        took.as_secs_f64(),
        args.netem
    ));
    for (name, got) in [("r1 (same node) ", &r1), ("r2 (other node)", &r2)] {
        let sum = summarise(&sent, got);
        say(format!(
            "  {name}: lost {} of {n}, duplicated {}, reordered {}; latency p50 {:.3} ms p99 \
             {:.3} ms",
            sum.lost,
            sum.duplicates,
            sum.reordered,
            ms(percentile(&sum.latencies, 50.0)),
            ms(percentile(&sum.latencies, 99.0))
        ));
    }
    say(tunnel_line(before, tunnel_counters(a, b)));
    Ok(out)
}

fn shell(command: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    require_testbed();
    let args = parse_args()?;
    let header = format!(
        "vcan-xnode-bench {}\nguest: kernel {}, {} CPUs, {} MiB; bus x: FD, span cluster, \
         batch_us 1000 (default); netem towards node B: {}",
        shell("date -u '+%F %T UTC'"),
        shell("uname -r"),
        shell("nproc"),
        shell("awk '/MemTotal/{print int($2/1024)}' /proc/meminfo"),
        args.netem
    );
    println!("{header}");

    let network = Network::start(&args.netem);
    let bus = ClusterBus::write("x", 4, BUS_JSON);
    let containerd = Containerd::start(ContainerdOptions::default())
        .await
        .context("containerd")?;
    let a = ClusterNode::start("a", &NODE_A, &containerd, &bus).await;
    let b = ClusterNode::start("b", &NODE_B, &containerd, &bus).await;
    a.wait_peers(1.0).await;
    b.wait_peers(1.0).await;
    let pods = [
        (&a, a.run(&member(&bus, "s", "sleep 100000")).await),
        (&a, a.run(&member(&bus, "r1", "sleep 100000")).await),
        (&b, b.run(&member(&bus, "r2", "sleep 100000")).await),
    ];
    let mut sockets = Vec::new();
    for (node, pod) in &pods {
        let ns = PathBuf::from(pod_netns(&node.node, pod).await);
        let socket = RawCanSocket::open(&Netns::Path(ns), "can0")
            .with_context(|| format!("CAN socket in pod {}", pod.spec.name))?;
        sockets.push(socket);
    }
    let [s, r1, r2] = &sockets[..] else {
        unreachable!("three pods, three sockets")
    };
    grow_receive_buffer(r1).context("SO_RCVBUFFORCE")?;
    grow_receive_buffer(r2).context("SO_RCVBUFFORCE")?;

    // The measurement sleeps and spins on threads of its own; keep the runtime's workers free.
    let figures = tokio::task::block_in_place(|| measure(&args, &a, &b, s, [r1, r2]));
    let figures = match figures {
        Ok(f) => f,
        Err(e) => bail!(
            "{e:#}\nA:\n{}\nB:\n{}",
            a.tunnel_metrics(),
            b.tunnel_metrics()
        ),
    };
    if let Some(dir) = std::env::var_os("VMTEST_RESULTS") {
        let path = PathBuf::from(dir).join("xnode-bench.txt");
        std::fs::write(&path, format!("{header}\n{figures}"))
            .with_context(|| format!("writing {}", path.display()))?;
    }

    drop(sockets);
    for (node, pod) in &pods {
        node.node.delete_pod(pod).await.context("deleting a pod")?;
    }
    drop(pods);
    drop(a);
    drop(b);
    containerd.stop().await.context("stopping containerd")?;
    drop(network);
    Ok(())
}
