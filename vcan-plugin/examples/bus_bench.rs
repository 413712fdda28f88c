//! Shared-bus benchmark, run in the CAN test-bed VM by `cargo xtask bench-bus` (needs root and
//! the vcan, vxcan and can-gw modules).
//!
//! Builds a bus exactly as the plugin does ([`Bus::join`]: a vxcan pair per member, a full mesh of
//! can-gw rules in the bus namespace) for members in namespaces of their own, and a single vcan
//! in another namespace as the baseline, then measures, in interleaved rounds:
//!
//! 1. Latency: ping-pong between two CAN_RAW sockets, member → member through the bus vs two
//!    sockets on the one vcan; one-way latency is half the round trip. Medians and their ratio.
//! 2. Throughput: one sender floods frames, every other member counts what it receives; frames/s
//!    delivered per member through the bus vs the same number of receiving sockets on one vcan.
//!
//! With `--timed` it measures timed buses instead (a bus with a `bitrate`, scheduled by the
//! plugin): one member writes a burst of classic 8-byte frames into a queue that holds them, the
//! other timestamps each arrival; the span from the first to the last arrival against the sum of
//! the exact bit times of frames 2..N is the accuracy, per bitrate, and the scheduler thread's CPU
//! time per frame its cost.
//!
//! Figures go to stdout and, with `--summary FILE`, to a file.

use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use vcan_plugin::bus::config::TimingSpec;
use vcan_plugin::bus::timing::bits::{self, WireFrame};
use vcan_plugin::bus::{Bus, BusSpec, MemberConfig};
use vcan_plugin::kernel::link::{CanMtu, Links, VcanSpec};
use vcan_plugin::kernel::netns::{self, Netns};
use vcan_plugin::pod::resources::PodRef;

/// Benchmark settings.
#[derive(Debug, Parser)]
#[command(about = "Shared CAN bus benchmark: latency and throughput vs a single vcan (as root)")]
struct Args {
    /// Members of the bus (one sends, the others receive, in the throughput test).
    #[arg(long, default_value_t = 8)]
    members: usize,
    /// Round trips per latency round.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Frames per throughput round.
    #[arg(long, default_value_t = 20_000)]
    frames: usize,
    /// Interleaved rounds of each measurement.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Where the bench's namespaces are bind-mounted (removed at the end).
    #[arg(long, default_value = "/run/vcan-bus-bench")]
    state_dir: PathBuf,
    /// Also write the figures to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Measure timed buses' accuracy and cost instead (bitrates from --bitrates).
    #[arg(long)]
    timed: bool,
    /// Bitrates for --timed, bit/s.
    #[arg(long, value_delimiter = ',', default_value = "125000,500000,1000000")]
    bitrates: Vec<u32>,
    /// Frames per burst for --timed.
    #[arg(long, default_value_t = 1000)]
    burst: usize,
}

const AF_CAN: i32 = 29;
const CAN_RAW: i32 = 1;
/// `struct can_frame`: id, length, padding, 8 data bytes.
const FRAME_SIZE: usize = 16;
/// `sizeof(struct sockaddr_can)` on 64-bit Linux.
const SOCKADDR_CAN_SIZE: usize = 24;

/// A CAN_RAW socket bound to `ifname` in `ns` (opened inside it; it stays there).
fn can_socket(ns: &Netns, ifname: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
    netns::run(ns, move || -> io::Result<OwnedFd> {
        // SAFETY: plain socket/bind/setsockopt calls on a fresh fd with buffers sized as the kernel
        // expects.
        unsafe {
            let fd = libc::socket(AF_CAN, libc::SOCK_RAW | libc::SOCK_CLOEXEC, CAN_RAW);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let ifindex = libc::if_nametoindex(name.as_ptr());
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            // A flood must not overflow the receivers' queues before they are scheduled.
            let rcvbuf: libc::c_int = 8 << 20;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&rcvbuf as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            let mut addr = [0u8; SOCKADDR_CAN_SIZE];
            addr[..2].copy_from_slice(&(AF_CAN as u16).to_ne_bytes());
            addr[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
            if libc::bind(
                fd.as_raw_fd(),
                addr.as_ptr().cast(),
                SOCKADDR_CAN_SIZE as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(fd)
        }
    })
    .map_err(io::Error::other)?
}

fn frame(id: u32, seq: u32) -> [u8; FRAME_SIZE] {
    let mut f = [0u8; FRAME_SIZE];
    f[..4].copy_from_slice(&id.to_ne_bytes());
    f[4] = 8;
    f[8..12].copy_from_slice(&seq.to_ne_bytes());
    f
}

/// Writes one frame, waiting while the interface's queue is full.
fn send(fd: &OwnedFd, f: &[u8; FRAME_SIZE]) -> io::Result<()> {
    loop {
        // SAFETY: writes FRAME_SIZE bytes from a buffer of that size.
        let n = unsafe { libc::write(fd.as_raw_fd(), f.as_ptr().cast(), FRAME_SIZE) };
        if n == FRAME_SIZE as isize {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOBUFS) {
            return Err(e);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Reads one frame, or `None` after `timeout` without one.
fn recv(fd: &OwnedFd, timeout: Duration) -> io::Result<Option<[u8; FRAME_SIZE]>> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if ready < 0 {
        return Err(io::Error::last_os_error());
    }
    if ready == 0 {
        return Ok(None);
    }
    let mut f = [0u8; FRAME_SIZE];
    // SAFETY: reads at most FRAME_SIZE bytes into a buffer of that size.
    let n = unsafe { libc::read(fd.as_raw_fd(), f.as_mut_ptr().cast(), FRAME_SIZE) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(f))
}

/// Median one-way latency (half the round trip) over `n` ping-pongs between `a` and `b`.
fn latency(a: &OwnedFd, b: &OwnedFd, n: usize) -> io::Result<Duration> {
    let mut rtts = Vec::with_capacity(n);
    let wait = Duration::from_secs(2);
    for i in 0..n {
        let started = Instant::now();
        send(a, &frame(0x100, i as u32))?;
        recv(b, wait)?.ok_or_else(|| io::Error::other("ping lost"))?;
        send(b, &frame(0x200, i as u32))?;
        recv(a, wait)?.ok_or_else(|| io::Error::other("pong lost"))?;
        rtts.push(started.elapsed());
    }
    rtts.sort();
    Ok(rtts[n / 2] / 2)
}

/// Floods `frames` frames from `sender`; returns the frames/s each receiver got (frames received
/// over the time from the first send to its last frame), and the frames each received.
fn throughput(
    sender: &OwnedFd,
    receivers: Vec<OwnedFd>,
    frames: usize,
) -> io::Result<Vec<(f64, usize)>> {
    let started = Instant::now();
    let handles: Vec<_> = receivers
        .into_iter()
        .map(|fd| {
            std::thread::spawn(move || -> io::Result<(f64, usize)> {
                let mut got = 0;
                let mut last = Instant::now();
                while got < frames {
                    match recv(&fd, Duration::from_secs(2))? {
                        Some(_) => {
                            got += 1;
                            last = Instant::now();
                        }
                        None => break,
                    }
                }
                Ok((got as f64 / (last - started).as_secs_f64(), got))
            })
        })
        .collect();
    for i in 0..frames {
        send(sender, &frame(0x300, i as u32))?;
    }
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("receiver panicked")))
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Drains frames left over from a previous round.
fn drain(fds: &[&OwnedFd]) -> io::Result<()> {
    for fd in fds {
        while recv(fd, Duration::from_millis(20))?.is_some() {}
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.timed {
        let text = timed(&args).await?;
        print!("{text}");
        if let Some(path) = &args.summary {
            std::fs::write(path, &text)?;
        }
        return Ok(());
    }
    anyhow::ensure!(args.members >= 2, "a bus needs at least 2 members");
    let members_dir = args.state_dir.join("members");
    let base_ns = Netns::Path(args.state_dir.join("vcan"));
    netns::create_persistent(&base_ns.path())?;
    Links::open(&base_ns)?.ensure_vcan(&VcanSpec {
        name: "vcan0".into(),
        mtu: CanMtu::Fd,
    })?;

    let bus = Arc::new(Bus::new(
        BusSpec {
            name: "bench".into(),
            fd: true,
            members: args.members as u32,
            interface: "can0".into(),
            uplink: None,
            tunnel: None,
            socketcand: None,
            timing: None,
        },
        "bench.io",
        &args.state_dir,
    )?);
    let mut member_ns = Vec::new();
    let join_started = Instant::now();
    for k in 0..args.members {
        let path = members_dir.join(format!("m{k}"));
        netns::create_persistent(&path)?;
        let ns = Netns::Path(path);
        bus.join(
            &PodRef {
                namespace: "bench".into(),
                name: format!("member-{k}"),
            },
            &format!("sandbox-{k}"),
            &ns,
            &format!("m{k:04}"),
            &MemberConfig {
                interface: "can0".into(),
                filters: Vec::new(),
            },
        )
        .await?;
        member_ns.push(ns);
    }
    let join_time = join_started.elapsed();

    let result = tokio::task::spawn_blocking({
        let (member_ns, base_ns) = (member_ns.clone(), base_ns.clone());
        let args_rounds = (args.rounds, args.round_trips, args.frames, args.members);
        move || measure(&member_ns, &base_ns, args_rounds)
    })
    .await?;

    // Clean up whatever happened.
    for ns in &member_ns {
        let _ = netns::remove_persistent(&ns.path());
    }
    let _ = bus
        .leave((0..args.members).map(|k| format!("sandbox-{k}")).collect())
        .await;
    let _ = netns::remove_persistent(&base_ns.path());

    let figures = result?;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "bus of {} members (FD, full mesh of {} can-gw rules), joined in {:.2?}",
        args.members,
        args.members * (args.members - 1) * 2,
        join_time
    );
    text.push_str(&figures);
    print!("{text}");
    if let Some(path) = &args.summary {
        std::fs::write(path, &text)?;
    }
    Ok(())
}

/// The interleaved rounds; returns the figures as text.
fn measure(
    member_ns: &[Netns],
    base_ns: &Netns,
    (rounds, round_trips, frames, members): (usize, usize, usize, usize),
) -> anyhow::Result<String> {
    let (mut lat_vcan, mut lat_bus, mut tp_vcan, mut tp_bus) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut lost_vcan, mut lost_bus) = (0usize, 0usize);
    let a_bus = can_socket(&member_ns[0], "can0")?;
    let b_bus = can_socket(&member_ns[1], "can0")?;
    let a_vcan = can_socket(base_ns, "vcan0")?;
    let b_vcan = can_socket(base_ns, "vcan0")?;
    for round in 0..rounds {
        drain(&[&a_vcan, &b_vcan, &a_bus, &b_bus])?;
        lat_vcan.push(latency(&a_vcan, &b_vcan, round_trips)?);
        lat_bus.push(latency(&a_bus, &b_bus, round_trips)?);

        let receivers: Vec<OwnedFd> = (0..members - 1)
            .map(|_| can_socket(base_ns, "vcan0"))
            .collect::<io::Result<_>>()?;
        let vcan = throughput(&a_vcan, receivers, frames)?;
        let receivers: Vec<OwnedFd> = member_ns[1..]
            .iter()
            .map(|ns| can_socket(ns, "can0"))
            .collect::<io::Result<_>>()?;
        let bus = throughput(&a_bus, receivers, frames)?;
        lost_vcan += vcan.iter().map(|(_, got)| frames - got).sum::<usize>();
        lost_bus += bus.iter().map(|(_, got)| frames - got).sum::<usize>();
        let (v, b) = (
            median(vcan.iter().map(|(r, _)| *r).collect()),
            median(bus.iter().map(|(r, _)| *r).collect()),
        );
        eprintln!(
            "round {round}: latency vcan {:.1?} bus {:.1?}; per-member frames/s vcan {v:.0} bus {b:.0}",
            lat_vcan[round], lat_bus[round]
        );
        tp_vcan.push(v);
        tp_bus.push(b);
    }
    let us = |d: &Vec<Duration>| median(d.iter().map(|d| d.as_secs_f64() * 1e6).collect());
    let (lv, lb) = (us(&lat_vcan), us(&lat_bus));
    let (tv, tb) = (median(tp_vcan), median(tp_bus));
    let mut text = String::new();
    let _ = writeln!(
        text,
        "latency (one way, median of {rounds} rounds × {round_trips} round trips): \
         single vcan {lv:.1} µs, bus member→member {lb:.1} µs, ratio {:.2}",
        lb / lv
    );
    let _ = writeln!(
        text,
        "throughput (1 sender, {} receivers, {frames} frames, median of {rounds} rounds): \
         per receiver single vcan {tv:.0} frames/s, bus {tb:.0} frames/s, ratio {:.2}; \
         frames not received: vcan {lost_vcan}, bus {lost_bus}",
        members - 1,
        tb / tv
    );
    Ok(text)
}

/// Nanoseconds thread `tid` of this process has run (`/proc/self/task/<tid>/schedstat`).
fn thread_cpu_ns(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `--timed`: per bitrate, `rounds` bursts through a timed bus of two members.
async fn timed(args: &Args) -> anyhow::Result<String> {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "timed buses: bursts of {} classic 8-byte frames, median of {} rounds",
        args.burst, args.rounds
    );
    for &bitrate in &args.bitrates {
        let bus = Arc::new(Bus::new(
            BusSpec {
                name: format!("timed-{bitrate}"),
                fd: false,
                members: 2,
                interface: "can0".into(),
                uplink: None,
                tunnel: None,
                socketcand: None,
                timing: Some(TimingSpec {
                    bitrate,
                    data_bitrate: None,
                    tx_queue: 1024,
                    pace: true,
                }),
            },
            "bench.io",
            &args.state_dir,
        )?);
        let mut member_ns = Vec::new();
        for k in 0..2 {
            let path = args.state_dir.join(format!("timed-m{k}"));
            netns::create_persistent(&path)?;
            let ns = Netns::Path(path);
            bus.join(
                &PodRef {
                    namespace: "bench".into(),
                    name: format!("member-{k}"),
                },
                &format!("sandbox-{k}"),
                &ns,
                &format!("t{k:04}"),
                &MemberConfig {
                    interface: "can0".into(),
                    filters: Vec::new(),
                },
            )
            .await?;
            member_ns.push(ns);
        }
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let runner = bus.clone();
        let scheduler = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            runner.run_timing(None)
        });
        let tid = tid_rx.recv()?;
        let (burst, rounds) = (args.burst, args.rounds);
        let result = tokio::task::spawn_blocking({
            let member_ns = member_ns.clone();
            move || burst_rounds(&member_ns, bitrate, burst, rounds, tid)
        })
        .await?;
        if let Some(t) = bus.timed() {
            t.stop();
        }
        let _ = scheduler.join();
        for ns in &member_ns {
            let _ = netns::remove_persistent(&ns.path());
        }
        let _ = bus
            .leave((0..2).map(|k| format!("sandbox-{k}")).collect())
            .await;
        // A timed bus keeps its namespace without members; the bench's goes now.
        let _ = netns::remove_persistent(bus.namespace());
        let (error, worst, cpu_us) = result?;
        let _ = writeln!(
            text,
            "{:>5} kbit/s: span vs sum of exact bit times {error:+.2} % (worst round {worst:+.2} %), \
             scheduler CPU {cpu_us:.1} µs per frame",
            bitrate / 1000
        );
    }
    Ok(text)
}

/// Bursts through the timed bus between the first two namespaces; returns the median and worst
/// relative error of the span (percent) and the scheduler thread's CPU per frame (µs).
fn burst_rounds(
    member_ns: &[Netns],
    bitrate: u32,
    burst: usize,
    rounds: usize,
    scheduler_tid: i32,
) -> anyhow::Result<(f64, f64, f64)> {
    let tx = can_socket(&member_ns[0], "can0")?;
    let rx = can_socket(&member_ns[1], "can0")?;
    // The scheduler opens its socket when it starts: a probe that crosses says it is running.
    let mut probes = 0;
    loop {
        send(&tx, &frame(0x7FF, 0))?;
        if recv(&rx, Duration::from_millis(500))?.is_some() {
            break;
        }
        probes += 1;
        anyhow::ensure!(probes < 20, "the timed bus carries no frames");
    }
    drain(&[&rx])?;
    let (mut errors, mut cpu) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let frames: Vec<[u8; FRAME_SIZE]> = (0..burst)
            .map(|i| frame(0x123, (round * burst + i) as u32 * 0x0101_0101))
            .collect();
        let expected: f64 = frames[1..]
            .iter()
            .map(|f| {
                let b = bits::frame_bits(&WireFrame {
                    can_id: 0x123,
                    data: &f[8..16],
                    dlc: 8,
                    fd: false,
                    brs: false,
                });
                bits::duration(b, bitrate, None).as_secs_f64()
            })
            .sum();
        let cpu_before = thread_cpu_ns(scheduler_tid);
        let receiver = {
            let rx = rx.try_clone()?;
            std::thread::spawn(move || -> io::Result<Vec<Instant>> {
                let mut at = Vec::with_capacity(burst);
                while at.len() < burst {
                    match recv(&rx, Duration::from_secs(5))? {
                        Some(_) => at.push(Instant::now()),
                        None => return Err(io::Error::other("frames lost")),
                    }
                }
                Ok(at)
            })
        };
        for f in &frames {
            send(&tx, f)?;
        }
        let at = receiver
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("receiver panicked")))?;
        let cpu_ns = thread_cpu_ns(scheduler_tid).saturating_sub(cpu_before);
        let span = (at[burst - 1] - at[0]).as_secs_f64();
        let error = (span / expected - 1.0) * 100.0;
        eprintln!(
            "{bitrate} bit/s round {round}: span {span:.4} s, expected {expected:.4} s, \
             error {error:+.2} %, scheduler CPU {:.1} µs/frame",
            cpu_ns as f64 / 1e3 / burst as f64
        );
        errors.push(error);
        cpu.push(cpu_ns as f64 / 1e3 / burst as f64);
    }
    let worst = errors
        .iter()
        .copied()
        .max_by(|a, b| a.abs().total_cmp(&b.abs()))
        .unwrap_or(0.0);
    Ok((median(errors), worst, median(cpu)))
}
