//! Data-plane benchmark of the eBPF CAN frame counters, run in the CAN test-bed VM by
//! `cargo xtask bench-dataplane` (needs root, CAN modules, bpffs and can-utils' `cangen`).
//!
//! 1. Flood overhead: `cangen -g 0` through one vcan in a fresh network namespace, in
//!    interleaved rounds of three modes: no counter, the project's eBPF counters
//!    ([`Counters::attach`]), and the userspace alternative they replace (a CAN_RAW socket bound
//!    to the interface, read frame by frame in a thread). Medians of frames/s and their ratios.
//! 2. Scrape cost: many vcans across namespaces, counters attached to all; times attach per
//!    interface, building the /metrics text for all of them (read + samples + render),
//!    and the process's RSS before and after attaching.
//! 3. Clean-up: detach everything, delete the namespaces and the pinned maps.
//!
//! `--render-only` times just the scrape's CPU work (samples + render) with synthetic
//! counters; it needs no root, CAN or BPF, so it also runs natively on the host.
//!
//! Figures go to stdout and, with `--summary FILE`, to a file.

use std::ffi::CString;
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use vcan_plugin::ebpf::{Config, Counters, CountersSnapshot};
use vcan_plugin::kernel::link::{CanMtu, Links, VcanSpec};
use vcan_plugin::kernel::netns::{self, Netns};
use vcan_plugin::telemetry::metrics::{Metrics, ResourceSample, Snapshot, TrafficSample};

/// Benchmark settings.
#[derive(Debug, Parser)]
#[command(about = "Data-plane benchmark of vcan-plugin's eBPF CAN counters (run as root)")]
struct Args {
    /// Frames per flood round.
    #[arg(long, default_value_t = 100_000)]
    frames: u64,
    /// Interleaved rounds per flood mode.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Network namespaces for the scrape benchmark.
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// vcan interfaces per namespace for the scrape benchmark.
    #[arg(long, default_value_t = 10)]
    per_namespace: usize,
    /// Timed scrapes.
    #[arg(long, default_value_t = 50)]
    scrapes: usize,
    /// The cangen binary.
    #[arg(long, default_value = "cangen")]
    cangen: PathBuf,
    /// bpffs directory for this run's pinned maps (removed at the end).
    #[arg(long, default_value = "/sys/fs/bpf/vcan-dataplane-bench")]
    bpffs_dir: PathBuf,
    /// Also write the figures to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Skip the flood benchmark.
    #[arg(long)]
    no_flood: bool,
    /// Skip the scrape benchmark.
    #[arg(long)]
    no_scrape: bool,
    /// Only time the scrape's CPU work (samples + render) with synthetic counters: needs no
    /// root, CAN or BPF, so it also runs natively on the host.
    #[arg(long)]
    render_only: bool,
}

/// Collects the report, printing each line as it comes.
#[derive(Default)]
struct Report(String);

impl Report {
    fn line(&mut self, text: impl AsRef<str>) {
        println!("{}", text.as_ref());
        self.0.push_str(text.as_ref());
        self.0.push('\n');
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces

/// A named network namespace bind-mounted under /run/netns (as `ip netns add` does), removed on
/// drop; the kernel then deletes it with its interfaces.
struct TempNetns {
    path: PathBuf,
}

impl TempNetns {
    fn create(name: &str) -> io::Result<Self> {
        let path = Path::new("/run/netns").join(name);
        netns::create_persistent(&path).map_err(io::Error::other)?;
        Ok(TempNetns { path })
    }

    fn netns(&self) -> Netns {
        Netns::Path(self.path.clone())
    }
}

impl Drop for TempNetns {
    fn drop(&mut self) {
        let _ = netns::remove_persistent(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Resident set size of this process, in KiB (`VmRSS`, or another /proc/self/status field).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(str::to_string))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Busy CPU time of the whole system so far (all CPUs, everything but idle and iowait).
fn busy_cpu() -> Duration {
    let ticks_per_s = {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    };
    let line = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal ...
    let busy: u64 = line
        .split_whitespace()
        .skip(1)
        .enumerate()
        .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    Duration::from_secs_f64(busy as f64 / ticks_per_s)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "p50 … p99 … max …" of latencies, in ms.
fn latency_line(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 99.0)),
        ms(samples.last().copied().unwrap_or_default())
    )
}

// ---------------------------------------------------------------------------------------------
// Flood

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No counter at all.
    Plain,
    /// The project's eBPF counters attached.
    Ebpf,
    /// A userspace CAN_RAW socket reading and counting every frame.
    RawSocket,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Plain, Mode::Ebpf, Mode::RawSocket];

    fn label(self) -> &'static str {
        match self {
            Mode::Plain => "no counter",
            Mode::Ebpf => "eBPF counters (Counters::attach)",
            Mode::RawSocket => "userspace CAN_RAW counter",
        }
    }
}

/// One flood round.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// The cangen run.
    run: Flood,
    /// Frames the counter saw (eBPF: tx and rx; raw socket: received echoes).
    seen_tx: Option<u64>,
    seen_rx: Option<u64>,
}

impl Round {
    /// Frames per second from the first frame to cangen's exit.
    fn rate(&self) -> f64 {
        self.run.frames as f64 / self.run.flood.as_secs_f64().max(1e-6)
    }

    /// Frames per second including cangen's start-up.
    fn gross_rate(&self, frames: u64) -> f64 {
        frames as f64 / self.run.total.as_secs_f64().max(1e-6)
    }

    /// Busy CPU time of all guest CPUs per frame, in µs.
    fn cpu_us(&self) -> f64 {
        self.run.cpu.as_secs_f64() * 1e6 / self.run.frames.max(1) as f64
    }
}

/// Timings of one cangen run.
#[derive(Debug, Clone, Copy, Default)]
struct Flood {
    /// From spawning cangen to its exit.
    total: Duration,
    /// From the first frame seen on the interface to cangen's exit.
    flood: Duration,
    /// Frames sent during `flood`.
    frames: u64,
    /// Busy CPU time of the whole guest during `flood`.
    cpu: Duration,
}

/// Frames sent on `ifname` so far, from `/proc/thread-self/net/dev` (the calling thread's
/// namespace).
fn tx_packets(ifname: &str) -> Option<u64> {
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").ok()?;
    dev.lines().find_map(|line| {
        let (name, stats) = line.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets ...
        stats.split_whitespace().nth(9)?.parse().ok()
    })
}

/// Runs cangen on `ifname` in `ns` (it inherits the namespace of the thread that spawns it).
/// The flood is timed from the first frame the interface reports, so that the process start-up
/// (hundreds of ms under TCG, and noisy) stays out of the rate.
fn run_cangen(cangen: &Path, ns: &Netns, ifname: &str, frames: u64) -> Result<Flood, String> {
    let mut cmd = Command::new(cangen);
    cmd.args(["-g", "0", "-I", "123", "-L", "8", "-D", "11223344DEADBEEF"])
        .arg("-n")
        .arg(frames.to_string())
        .arg(ifname)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let what = cangen.display().to_string();
    let ifname = ifname.to_string();
    netns::run(ns, move || -> Result<Flood, String> {
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| format!("cannot run {what}: {e}"))?;
        // Poll until the first frame; the poller then stops, so it cannot slow the flood.
        let mut first = None;
        loop {
            if let Some(sent) = tx_packets(&ifname).filter(|&n| n > 0) {
                first = Some((Instant::now(), busy_cpu(), sent));
                break;
            }
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_micros(200)),
                Ok(Some(_)) | Err(_) => break,
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for cangen: {e}"))?;
        let (end, end_cpu) = (Instant::now(), busy_cpu());
        if !out.status.success() {
            return Err(format!(
                "cangen failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let (t_first, cpu_first, sent_first) = first.unwrap_or((end, end_cpu, frames));
        Ok(Flood {
            total: end - started,
            flood: end - t_first,
            frames: frames.saturating_sub(sent_first),
            cpu: end_cpu.saturating_sub(cpu_first),
        })
    })
    .map_err(|e| e.to_string())?
}

/// A CAN_RAW socket bound to `ifname` in `ns`, with a receive timeout so that its reader
/// notices the end of a flood.
fn open_raw_socket(ns: &Netns, ifname: &str) -> io::Result<OwnedFd> {
    let ifname =
        CString::new(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    netns::run(ns, move || -> io::Result<OwnedFd> {
        // SAFETY: plain socket creation.
        let raw = unsafe {
            libc::socket(
                libc::AF_CAN,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::CAN_RAW,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifname is NUL-terminated.
        let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_can is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_can = unsafe { std::mem::zeroed() };
        addr.can_family = libc::AF_CAN as libc::sa_family_t;
        addr.can_ifindex = index as libc::c_int;
        // SAFETY: addr is a valid sockaddr_can of the given length.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_can>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: timeout is a valid timeval of the given length.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    })
    .map_err(io::Error::other)?
}

/// Reads frames one `read` at a time, as a simple userspace counter does, until `stop` is set
/// and the socket has been quiet for its receive timeout. Returns the frames read.
fn count_frames(sock: &OwnedFd, stop: &AtomicBool) -> u64 {
    let mut frames = 0u64;
    let mut buf = [0u8; 72];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::read(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            frames += 1;
            continue;
        }
        let err = io::Error::last_os_error();
        let timed_out = matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        );
        if (timed_out && stop.load(Ordering::Relaxed))
            || !(timed_out || err.kind() == io::ErrorKind::Interrupted)
        {
            return frames;
        }
    }
}

fn frames_of(s: &CountersSnapshot) -> (u64, u64) {
    (s.egress.total().frames, s.ingress.total().frames)
}

/// The interface the flood runs on.
const FLOOD_IF: &str = "vcan0";

/// Runs `f` with a freshly created [`FLOOD_IF`] in `ns`, deleting it afterwards, so that no
/// qdisc or filter is left over from an earlier round.
fn on_fresh_vcan<T>(ns: &TempNetns, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let mut links = Links::open(&ns.netns()).map_err(|e| e.to_string())?;
    links
        .ensure_vcan(&VcanSpec {
            name: FLOOD_IF.into(),
            mtu: CanMtu::Fd,
        })
        .map_err(|e| e.to_string())?;
    let result = f();
    links.delete_vcan(FLOOD_IF).map_err(|e| e.to_string())?;
    result
}

fn flood_round(
    cangen: &Path,
    frames: u64,
    counters: &Counters,
    ns: &TempNetns,
    mode: Mode,
) -> Result<Round, String> {
    let netns = ns.netns();
    on_fresh_vcan(ns, || {
        let mut round = Round {
            run: Flood::default(),
            seen_tx: None,
            seen_rx: None,
        };
        round.run = match mode {
            Mode::Plain => run_cangen(cangen, &netns, FLOOD_IF, frames)?,
            Mode::Ebpf => {
                // Attaching is not timed: only the flood with the programs in place is.
                let att = counters
                    .attach(&netns, FLOOD_IF)
                    .map_err(|e| e.to_string())?;
                let before = counters.read(&att).map_err(|e| e.to_string());
                let timed = run_cangen(cangen, &netns, FLOOD_IF, frames);
                let after = counters.read(&att).map_err(|e| e.to_string());
                counters.detach(&att).map_err(|e| e.to_string())?;
                let (b, a) = (frames_of(&before?), frames_of(&after?));
                round.seen_tx = Some(a.0.wrapping_sub(b.0));
                round.seen_rx = Some(a.1.wrapping_sub(b.1));
                timed?
            }
            Mode::RawSocket => {
                // Bound before cangen starts, so it can see every frame.
                let sock = Arc::new(open_raw_socket(&netns, FLOOD_IF).map_err(|e| e.to_string())?);
                let stop = Arc::new(AtomicBool::new(false));
                let reader = {
                    let (sock, stop) = (Arc::clone(&sock), Arc::clone(&stop));
                    std::thread::spawn(move || count_frames(&sock, &stop))
                };
                let timed = run_cangen(cangen, &netns, FLOOD_IF, frames);
                stop.store(true, Ordering::Relaxed);
                let seen = reader
                    .join()
                    .map_err(|_| "the counting thread panicked".to_string())?;
                round.seen_rx = Some(seen);
                timed?
            }
        };
        Ok(round)
    })
}

fn flood_bench(args: &Args, counters: &Counters, report: &mut Report) -> Result<(), String> {
    let ns = TempNetns::create("vcanbench-flood").map_err(|e| format!("netns: {e}"))?;
    let cangen = args.cangen.as_path();
    let frames = args.frames;

    report.line(format!(
        "## 1. Flood: cangen -g 0 -I 123 -L 8 -D 11223344DEADBEEF -n {frames} on one vcan in a \
         fresh netns, {} interleaved rounds per mode (+1 warm-up round, not counted)",
        args.rounds
    ));
    // Warm-up: pages cangen in (over 9p in the VM) and gets every path translated once.
    for mode in Mode::ALL {
        flood_round(cangen, frames / 4, counters, &ns, mode)?;
    }

    let mut rounds: Vec<(usize, Mode, Round)> = Vec::new();
    for r in 0..args.rounds {
        // Rotate the order so that no mode always runs first or last.
        let mut order = Mode::ALL;
        order.rotate_left(r % Mode::ALL.len());
        let mut line = format!("round {:>2} frames/s:", r + 1);
        for mode in order {
            let round = flood_round(cangen, frames, counters, &ns, mode)?;
            let _ = write!(line, "  {mode:?} {:.0}", round.rate());
            if mode == Mode::Ebpf && round.seen_tx != Some(frames) {
                return Err(format!(
                    "the eBPF counters saw {:?} tx frames of {frames} sent",
                    round.seen_tx
                ));
            }
            rounds.push((r, mode, round));
        }
        report.line(line);
    }

    let of = |mode: Mode, f: &dyn Fn(&Round) -> f64| -> Vec<f64> {
        rounds
            .iter()
            .filter(|(_, m, _)| *m == mode)
            .map(|(_, _, r)| f(r))
            .collect()
    };
    let med = |mode: Mode, f: &dyn Fn(&Round) -> f64| median(&of(mode, f));
    // Per-round ratios (the modes of one round ran back to back) resist slow drifts.
    let paired = |mode: Mode| {
        let (base, other) = (of(Mode::Plain, &Round::rate), of(mode, &Round::rate));
        let ratios: Vec<f64> = base.iter().zip(&other).map(|(b, o)| o / b).collect();
        median(&ratios)
    };
    let start = {
        let mut v: Vec<Duration> = rounds
            .iter()
            .map(|(_, _, r)| r.run.total.saturating_sub(r.run.flood))
            .collect();
        v.sort();
        percentile(&v, 50.0)
    };
    report.line(format!(
        "frames/s is timed from the first frame on the interface to cangen's exit; cangen's \
         start-up before that (p50 {:.0} ms) is left out, the incl.-start column has it",
        ms(start)
    ));
    report.line(format!(
        "{:<34} {:>12} {:>9} {:>15} {:>12} {:>22}",
        "mode", "frames/s p50", "vs none", "incl. start", "CPU/frame", "frames counted p50"
    ));
    let plain = med(Mode::Plain, &Round::rate);
    for mode in Mode::ALL {
        let rate = med(mode, &Round::rate);
        let counted = match mode {
            Mode::Plain => "-".to_string(),
            Mode::Ebpf => format!(
                "tx {:.0} rx {:.0}",
                med(mode, &|r| r.seen_tx.unwrap_or(0) as f64),
                med(mode, &|r| r.seen_rx.unwrap_or(0) as f64)
            ),
            Mode::RawSocket => {
                let seen = med(mode, &|r| r.seen_rx.unwrap_or(0) as f64);
                format!("{seen:.0} ({:.1}%)", 100.0 * seen / frames as f64)
            }
        };
        report.line(format!(
            "{:<34} {:>12.0} {:>9.3} {:>15.0} {:>9.2} µs {:>22}",
            mode.label(),
            rate,
            if plain > 0.0 { rate / plain } else { 0.0 },
            med(mode, &|r| r.gross_rate(frames)),
            med(mode, &Round::cpu_us),
            counted
        ));
    }
    report.line(format!(
        "ratio with eBPF counters / without: {:.3} (ratio of medians; median of per-round \
         ratios {:.3}; goal >= 0.97)",
        med(Mode::Ebpf, &Round::rate) / plain,
        paired(Mode::Ebpf)
    ));
    report.line(format!(
        "ratio with the userspace CAN_RAW counter / without: {:.3} (per-round {:.3})",
        med(Mode::RawSocket, &Round::rate) / plain,
        paired(Mode::RawSocket)
    ));
    report.line(
        "(CPU/frame: busy time of all guest CPUs during the flood per frame sent; the eBPF rx \
         count is vcan's echo of each frame, which is what the CAN_RAW counter reads)",
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scrape

/// One timed scrape, split into its parts.
struct Scrape {
    read: Duration,
    samples: Duration,
    render: Duration,
    bytes: usize,
    series: usize,
}

/// Reads every target's counters at once, in the targets' order.
type ReadAll<'a> = &'a dyn Fn() -> Result<Vec<CountersSnapshot>, String>;

/// Builds the /metrics text for `targets` (pod, interface) as the daemon does, with `read`
/// giving the targets' counters.
fn scrape(
    metrics: &Metrics,
    targets: &[(String, String)],
    read: ReadAll,
) -> Result<Scrape, String> {
    let t0 = Instant::now();
    let snapshots = read()?;
    let t1 = Instant::now();
    let traffic: Vec<TrafficSample> = targets
        .iter()
        .zip(&snapshots)
        .map(|((pod, ifname), snap)| TrafficSample::new("bench", pod, ifname, *snap))
        .collect();
    // 32 series per interface: per direction, frames and bytes of 7 kinds and 2 id formats.
    let series = traffic.len() * 32;
    let snapshot = Snapshot {
        resources: vec![ResourceSample {
            resource: "socketcan.io/vcan".into(),
            devices: targets.len(),
            healthy: targets.len(),
            allocated: targets.len(),
            pods_served: targets.len(),
            registered: true,
            ..Default::default()
        }],
        vcan_supported: true,
        traffic,
        buses: Vec::new(),
        timed_buses: Vec::new(),
        controllers: Vec::new(),
        tunnels: Vec::new(),
        socketcand: Vec::new(),
        sandbox_index: None,
    };
    let t2 = Instant::now();
    let text = metrics.render(&snapshot);
    let t3 = Instant::now();
    Ok(Scrape {
        read: t1 - t0,
        samples: t2 - t1,
        render: t3 - t2,
        bytes: text.len(),
        series,
    })
}

/// Runs a warm-up and `n` timed scrapes and reports their times.
fn timed_scrapes(
    report: &mut Report,
    label: &str,
    n: usize,
    metrics: &Metrics,
    targets: &[(String, String)],
    read: ReadAll,
) -> Result<(), String> {
    scrape(metrics, targets, read)?; // warm-up
    let mut scrapes = Vec::with_capacity(n);
    for _ in 0..n {
        scrapes.push(scrape(metrics, targets, read)?);
    }
    let part = |f: &dyn Fn(&Scrape) -> Duration| {
        let mut v: Vec<Duration> = scrapes.iter().map(f).collect();
        v.sort();
        v
    };
    let totals = part(&|s| s.read + s.samples + s.render);
    let (bytes, series) = scrapes.last().map_or((0, 0), |s| (s.bytes, s.series));
    report.line(format!(
        "scrape ({label} + samples + Metrics::render): {} (goal p50 <= 20 ms)",
        latency_line(totals)
    ));
    for (name, v) in [
        ("read", part(&|s| s.read)),
        ("samples", part(&|s| s.samples)),
        ("render", part(&|s| s.render)),
    ] {
        report.line(format!(
            "  {name:<16} p50={:.2} ms p99={:.2} ms",
            ms(percentile(&v, 50.0)),
            ms(percentile(&v, 99.0))
        ));
    }
    report.line(format!(
        "  output: {series} traffic series, {:.1} KiB of text",
        bytes as f64 / 1024.0
    ));
    Ok(())
}

/// The scrape's CPU work without any kernel: synthetic counters for `namespaces x
/// per_namespace` interfaces (runs anywhere, e.g. natively on the host).
fn render_only(args: &Args, report: &mut Report) -> Result<(), String> {
    let total = args.namespaces * args.per_namespace;
    report.line(format!(
        "## Scrape CPU work only: {total} interfaces with synthetic counters (no kernel reads)"
    ));
    let targets: Vec<(String, String)> = (0..args.namespaces)
        .flat_map(|n| {
            (0..args.per_namespace).map(move |i| (format!("pod-{n:04}"), format!("vcan{i}")))
        })
        .collect();
    let mut snap = CountersSnapshot::default();
    snap.egress.classic.frames = 123_456;
    snap.egress.classic.bytes = 987_648;
    snap.egress.std_id = 123_456;
    snap.ingress = snap.egress;
    let metrics = Metrics::new(&["socketcan.io/vcan".into()], "clsact");
    timed_scrapes(
        report,
        "synthetic counters",
        args.scrapes,
        &metrics,
        &targets,
        &|| Ok(vec![snap; targets.len()]),
    )?;
    report.line(format!(
        "RSS (VmRSS) after the scrapes: {} KiB; peak VmHWM {} KiB",
        status_kib("VmRSS"),
        status_kib("VmHWM")
    ));
    Ok(())
}

fn scrape_bench(args: &Args, counters: &Counters, report: &mut Report) -> Result<(), String> {
    let total = args.namespaces * args.per_namespace;
    report.line(format!(
        "## 2. Scrape: {total} vcans ({} namespaces x {}), counters attached to all",
        args.namespaces, args.per_namespace
    ));
    let rss_start = status_kib("VmRSS");

    let started = Instant::now();
    let mut namespaces = Vec::with_capacity(args.namespaces);
    let mut pods = Vec::with_capacity(total);
    for n in 0..args.namespaces {
        let ns =
            TempNetns::create(&format!("vcanbench-{n:04}")).map_err(|e| format!("netns: {e}"))?;
        let mut links = Links::open(&ns.netns()).map_err(|e| e.to_string())?;
        for i in 0..args.per_namespace {
            let name = format!("vcan{i}");
            links
                .ensure_vcan(&VcanSpec {
                    name: name.clone(),
                    mtu: CanMtu::Fd,
                })
                .map_err(|e| e.to_string())?;
            pods.push((n, format!("pod-{n:04}"), name));
        }
        namespaces.push(ns);
    }
    report.line(format!(
        "created {} namespaces and {total} vcans in {:.1} s",
        args.namespaces,
        started.elapsed().as_secs_f64()
    ));

    let rss_before = status_kib("VmRSS");
    let avail_before = meminfo_kib("MemAvailable");
    let mut attach_times = Vec::with_capacity(total);
    let mut attached = Vec::with_capacity(total);
    let result = (|| -> Result<(), String> {
        let started = Instant::now();
        for (n, pod, ifname) in &pods {
            let t = Instant::now();
            let att = counters
                .attach(&namespaces[*n].netns(), ifname)
                .map_err(|e| e.to_string())?;
            attach_times.push(t.elapsed());
            attached.push((pod.clone(), att));
        }
        let attach_wall = started.elapsed();
        let rss_after = status_kib("VmRSS");
        let avail_after = meminfo_kib("MemAvailable");
        report.line(format!(
            "attach per interface: {} (all {total}: {:.1} s, mode {})",
            latency_line(attach_times.clone()),
            attach_wall.as_secs_f64(),
            counters.attach_mode()
        ));

        let metrics = Metrics::new(
            &["socketcan.io/vcan".into()],
            counters.attach_mode().as_str(),
        );
        let targets: Vec<(String, String)> = attached
            .iter()
            .map(|(pod, att)| (pod.clone(), att.info.ifname.clone()))
            .collect();
        // The same scrape reading one attachment at a time (two map lookups each), as the
        // daemon did before reading the map in batches: both in one boot.
        timed_scrapes(
            report,
            &format!("Counters::read of {total} attachments, one by one"),
            args.scrapes,
            &metrics,
            &targets,
            &|| {
                attached
                    .iter()
                    .map(|(_, a)| counters.read(a).map_err(|e| e.to_string()))
                    .collect()
            },
        )?;
        timed_scrapes(
            report,
            &format!("Counters::read_many of {total} attachments (batched, as the daemon reads)"),
            args.scrapes,
            &metrics,
            &targets,
            &|| {
                let refs: Vec<_> = attached.iter().map(|(_, a)| a).collect();
                counters
                    .read_many(&refs)
                    .into_iter()
                    .map(|r| r.map_err(|e| e.to_string()))
                    .collect()
            },
        )?;
        let rss_scraped = status_kib("VmRSS");
        report.line(format!(
            "RSS (VmRSS): {rss_start} KiB at start, {rss_before} KiB with {total} vcans before \
             attaching, {rss_after} KiB with {total} attached ({:+} KiB), {rss_scraped} KiB after \
             the scrapes; peak VmHWM {} KiB",
            rss_after as i64 - rss_before as i64,
            status_kib("VmHWM"),
        ));
        let kernel_kib = avail_before as i64 - avail_after as i64;
        report.line(format!(
            "guest MemAvailable: {} KiB less with {total} attached ({:.1} KiB per interface: \
             programs, JIT images, clsact qdiscs and filters live in the kernel)",
            kernel_kib,
            kernel_kib as f64 / total.max(1) as f64
        ));
        Ok(())
    })();

    // 3. Clean-up, also after a failure.
    let started = Instant::now();
    let mut detach_times = Vec::with_capacity(attached.len());
    let mut detach_errors = 0;
    for (_, att) in &attached {
        let t = Instant::now();
        if counters.detach(att).is_err() {
            detach_errors += 1;
        }
        detach_times.push(t.elapsed());
    }
    let detach_wall = started.elapsed();
    drop(namespaces);
    let left = counters.list().len();
    report.line(format!(
        "## 3. Clean-up: detach per interface: {} (all: {:.1} s, {detach_errors} errors); \
         namespaces deleted; {left} slots left registered",
        latency_line(detach_times),
        detach_wall.as_secs_f64()
    ));
    result?;
    if detach_errors > 0 || left > 0 {
        return Err(format!(
            "clean-up incomplete: {detach_errors} detach errors, {left} slots left"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(str::trim)
                    .map(str::to_string)
            })
        })
        .unwrap_or_default();
    let testbed = if std::env::var_os("VCAN_TESTBED").is_some() {
        "test-bed VM (qemu TCG)"
    } else {
        "this machine"
    };
    format!(
        "machine: {testbed}, {cpus} CPUs ({model}), kernel {}, {:.0} MiB RAM",
        kernel.trim(),
        meminfo_kib("MemTotal") as f64 / 1024.0
    )
}

/// A field of /proc/meminfo, in KiB.
fn meminfo_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    let mut report = Report::default();
    report.line(machine());
    report.line("build: release (cargo build --release -p vcan-plugin --examples)");
    if args.render_only {
        if let Err(e) = render_only(&args, &mut report) {
            eprintln!("render-only benchmark failed: {e}");
            std::process::exit(1);
        }
        if let Some(path) = &args.summary {
            std::fs::write(path, &report.0).expect("writing the summary file");
        }
        return;
    }

    let counters = Counters::open(&Config {
        bpffs_dir: args.bpffs_dir.clone(),
        mode: None,
    })
    .expect("opening the eBPF counters (root, bpffs mounted?)");
    report.line(format!("attach mode: {}", counters.attach_mode()));

    let mut failed = Vec::new();
    if !args.no_flood
        && let Err(e) = flood_bench(&args, &counters, &mut report)
    {
        report.line(format!("flood benchmark FAILED: {e}"));
        failed.push("flood");
    }
    if !args.no_scrape
        && let Err(e) = scrape_bench(&args, &counters, &mut report)
    {
        report.line(format!("scrape benchmark FAILED: {e}"));
        failed.push("scrape");
    }

    drop(counters);
    match std::fs::remove_dir_all(&args.bpffs_dir) {
        Ok(()) => report.line(format!(
            "removed the pinned maps in {}",
            args.bpffs_dir.display()
        )),
        Err(e) => report.line(format!("cannot remove {}: {e}", args.bpffs_dir.display())),
    }

    if let Some(path) = &args.summary {
        std::fs::write(path, &report.0).expect("writing the summary file");
    }
    if !failed.is_empty() {
        eprintln!("failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}
