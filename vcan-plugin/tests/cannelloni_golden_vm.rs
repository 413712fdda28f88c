//! Regenerates the golden packets of `tests/tunnel_corpus` from the real cannelloni 2.1.2, in
//! the CAN test-bed VM: `cargo xtask vm-test -p vcan-plugin cannelloni`.
//!
//! The corpus files whose comment says "made by cannelloni" once came from a throwaway harness
//! around cannelloni's `buildPacket()`. This test makes them again the way cannelloni makes
//! packets in real use: in a fresh network namespace it starts the real binary on an FD-capable
//! vcan0 with its remote on 127.0.0.1, writes each file's frames (from `MANIFEST`) onto vcan0
//! with one CAN_RAW socket in a single burst, so that a multi-frame file is batched into one
//! packet, receives what cannelloni sends over UDP and compares it byte by byte with the file.
//! Every regenerated packet is printed as hex, also when the test passes.
//!
//! Expected differences, and only these:
//! - the sequence number (byte 2): cannelloni numbers its packets from 0, the corpus picked its
//!   own; the test checks instead that the packets are numbered 0, 1, 2, … in order;
//! - error frames (`CAN_ERR_FLAG`): cannelloni subscribes to error frames (bus-off, controller
//!   problems, restarts) only to track the bus state and never forwards one (`CANThread::run`
//!   hands them to `handleErrorFrame` and drops them). `error-frame.hex` is therefore checked the
//!   other way round — written to vcan0, it must produce no packet — and `mixed-batch.hex` is
//!   regenerated with all its frames written, error frame included, and compared with the file's
//!   bytes with that frame cut out and the frame count lowered by one. That an error frame
//!   encodes as in those files is covered only by the encoder's own tests
//!   (`tests/tunnel_wire.rs` re-encodes every `ok` input, and `src/tunnel/wire/tests.rs`).
//! - `empty.hex` (no frames): cannelloni never sends an empty packet (it sends only when frames
//!   are buffered), so it is not regenerated; the decoder and encoder tests cover it.
//! - the CAN FD flags byte: see [`KERNEL_ADDS_FDF`].

use std::fs;
use std::io::{self, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use vcan_plugin::kernel::can_raw::RawCanSocket;
use vcan_plugin::kernel::netns::{self, Netns};
use vcan_test_support::{IP, NetnsFixture, require_testbed, run_in_netns};

/// Port of the test's UDP socket (cannelloni's remote port `-r`); cannelloni listens on the
/// next one (`-l`). The namespace is the test's own, so nothing else uses them.
const PORT: u16 = 20_000;
/// cannelloni's batching time (`-t`, µs): long enough that a burst of frames written back to
/// back always ends up in one packet, even under the VM's slow emulation.
const BATCH_US: u64 = 200_000;
/// How long to wait for a packet, or for cannelloni to bind its CAN socket.
const WAIT: Duration = Duration::from_secs(30);

/// `canid_t` flags.
const CAN_RTR_FLAG: u32 = 0x4000_0000;
const CAN_ERR_FLAG: u32 = 0x2000_0000;
/// Top bit of a frame's length byte on the wire: CAN FD, a flags byte follows.
const WIRE_FD: u8 = 0x80;
/// The kernel's `CANFD_FDF` flag.
const CANFD_FDF: u8 = 0x04;

/// Whether the kernel adds `CANFD_FDF` to the flags of the CAN FD frames it passes to a CAN_RAW
/// socket.
///
/// Kernels that know CAN XL (Debian's 6.1, which the VM boots, among them) mark every CAN FD
/// frame with `CANFD_FDF` on its way through the CAN core, and cannelloni copies the flags byte
/// of what it read verbatim into the packet: a frame written with BRS|ESI (`03`) leaves
/// cannelloni with flags `07`, one with BRS (`01`) with `05` (seen in this test's runs). The corpus's
/// FD frames carry the flags without `CANFD_FDF`, as the `buildPacket()` harness was given them;
/// the test expects exactly those bytes with `CANFD_FDF` added to each FD frame's flags byte
/// (and to nothing else).
const KERNEL_ADDS_FDF: bool = true;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tunnel_corpus")
}

fn cannelloni_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cannelloni/cannelloni")
}

/// A `.hex` corpus file: its comment lines and its bytes.
struct HexFile {
    comments: Vec<String>,
    bytes: Vec<u8>,
}

fn read_hex(name: &str) -> HexFile {
    let path = corpus().join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (comments, data): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|l| l.trim_start().starts_with('#'));
    let digits: String = data.into_iter().flat_map(str::split_whitespace).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "{name}: odd number of hex digits"
    );
    let bytes = (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16)
                .unwrap_or_else(|e| panic!("{name}: {:?}: {e}", &digits[i..i + 2]))
        })
        .collect();
    HexFile {
        comments: comments.into_iter().map(str::to_string).collect(),
        bytes,
    }
}

/// The `ok` lines of `MANIFEST`: file and frames, in the manifest's order.
fn manifest_ok() -> Vec<(String, Vec<String>)> {
    let text = fs::read_to_string(corpus().join("MANIFEST")).expect("MANIFEST");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let file = words.next()?.to_string();
            if words.next() != Some("ok") {
                return None;
            }
            let _seq = words.next();
            Some((file, words.map(str::to_string).collect()))
        })
        .collect()
}

/// A frame in the manifest's notation (`00000123#112233`, `400007FF#R4`, `000000AB##03AABB`,
/// the id being the full `canid_t`), as the kernel struct a CAN_RAW socket writes:
/// `can_frame` (16 bytes) or `canfd_frame` (72 bytes). Parsed here rather than with the crate's
/// own types so that the check does not lean on the code it checks.
fn kernel_frame(text: &str) -> Vec<u8> {
    let bad = || -> ! { panic!("frame {text:?}: not in the MANIFEST's notation") };
    let (id, rest) = text.split_once('#').unwrap_or_else(|| bad());
    let id = u32::from_str_radix(id, 16).unwrap_or_else(|_| bad());
    let hex = |s: &str| -> Vec<u8> {
        if !s.len().is_multiple_of(2) {
            bad();
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| bad()))
            .collect()
    };
    let (size, len, flags, data) = if let Some(fd) = rest.strip_prefix('#') {
        let (flags, data) = (hex(&fd[..2]), hex(&fd[2..]));
        (72, data.len(), flags[0], data)
    } else if let Some(len) = rest.strip_prefix('R') {
        assert!(id & CAN_RTR_FLAG != 0, "{text}: R without the RTR flag");
        (16, len.parse().unwrap_or_else(|_| bad()), 0, Vec::new())
    } else {
        let data = hex(rest);
        (16, data.len(), 0, data)
    };
    let mut raw = vec![0; size];
    raw[..4].copy_from_slice(&id.to_ne_bytes());
    raw[4] = u8::try_from(len).unwrap_or_else(|_| bad());
    raw[5] = flags;
    raw[8..8 + data.len()].copy_from_slice(&data);
    raw
}

/// One frame's place in a packet: its byte range and, for CAN FD, where its flags byte is.
struct Span {
    start: usize,
    end: usize,
    id: u32,
    flags_at: Option<usize>,
}

/// Walks a well-formed packet's frames (the corpus's `ok` files are well-formed: tunnel_wire.rs
/// checks that); written out here, independent of the crate's decoder.
fn spans(packet: &[u8]) -> Vec<Span> {
    let count = usize::from(u16::from_be_bytes([packet[3], packet[4]]));
    let mut at = 5;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let start = at;
        let id = u32::from_be_bytes(packet[at..at + 4].try_into().expect("4 bytes"));
        let len_byte = packet[at + 4];
        at += 5;
        let flags_at = (len_byte & WIRE_FD != 0).then(|| {
            at += 1;
            at - 1
        });
        if id & CAN_RTR_FLAG == 0 {
            at += usize::from(len_byte & !WIRE_FD);
        }
        out.push(Span {
            start,
            end: at,
            id,
            flags_at,
        });
    }
    assert_eq!(at, packet.len(), "trailing bytes after {count} frames");
    out
}

/// What cannelloni must send for a corpus packet: the same bytes without the error frames
/// (count lowered accordingly) and, if the kernel marks FD frames, with `CANFD_FDF` in each FD
/// frame's flags. The sequence number is left as it is (the comparison skips it).
fn expected_from_corpus(golden: &[u8]) -> Vec<u8> {
    let mut out = golden[..5].to_vec();
    let mut count: u16 = 0;
    for span in spans(golden) {
        if span.id & CAN_ERR_FLAG != 0 {
            continue;
        }
        let mut frame = golden[span.start..span.end].to_vec();
        if let (Some(at), true) = (span.flags_at, KERNEL_ADDS_FDF) {
            frame[at - span.start] |= CANFD_FDF;
        }
        out.extend_from_slice(&frame);
        count += 1;
    }
    out[3..5].copy_from_slice(&count.to_be_bytes());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a line to the process's stdout directly, not through `println!`, which libtest
/// captures: the regenerated packets show in the test's output even when it passes.
fn show(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The real cannelloni, killed when dropped; its output goes to a temporary file.
struct Cannelloni {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Cannelloni {
    fn start(netns: &str) -> Self {
        let binary = cannelloni_binary();
        assert!(
            binary.is_file(),
            "{} is missing: `cargo xtask vm-test` builds it (needs cmake and g++)",
            binary.display()
        );
        let log = tempfile::NamedTempFile::new().expect("log file");
        let output = || Stdio::from(log.reopen().expect("log file"));
        let child = Command::new(IP)
            .args(["netns", "exec", netns])
            .arg(&binary)
            .args(["-4", "-I", "vcan0", "-R", "127.0.0.1"])
            .args(["-r", &PORT.to_string(), "-l", &(PORT + 1).to_string()])
            .args(["-t", &BATCH_US.to_string()])
            .env(
                "LD_LIBRARY_PATH",
                binary.parent().expect("binary's directory"),
            )
            .stdin(Stdio::null())
            .stdout(output())
            .stderr(output())
            .spawn()
            .expect("cannelloni starts");
        Cannelloni { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Panics with cannelloni's output if it has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("cannelloni exited ({status}):\n{}", self.log());
        }
    }

    /// Waits until cannelloni has bound its CAN socket on vcan0: the kernel then lists its
    /// receive filters in the namespace's `/proc/net/can/rcvlist_all`. (The test's own CAN socket
    /// is opened only afterwards, so the entry is cannelloni's.)
    fn wait_bound(&mut self, netns: &str) {
        let started = Instant::now();
        loop {
            self.assert_running();
            let out = run_in_netns(netns, "cat", &["/proc/net/can/rcvlist_all"]);
            let listing = String::from_utf8_lossy(&out.stdout);
            if listing
                .lines()
                .any(|l| l.split_whitespace().next() == Some("vcan0"))
            {
                return;
            }
            assert!(
                started.elapsed() < WAIT,
                "cannelloni did not bind to vcan0 within {WAIT:?}; rcvlist_all:\n{listing}\n\
                 cannelloni's output:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cannelloni {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lets cannelloni's batching timer run out, so that the next burst starts a fresh batch. (Its
/// UDP timer is periodic while frames come in and stops at the first period that finds none; a
/// burst written while it still runs could be cut in two by its next tick.)
fn settle() {
    sleep(Duration::from_micros(3 * BATCH_US));
}

/// Waits for the next UDP packet; `None` if none came within `timeout`.
fn receive(udp: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
    udp.set_read_timeout(Some(timeout)).expect("read timeout");
    let mut buf = vec![0; 65_536];
    match udp.recv_from(&mut buf) {
        Ok((n, from)) => {
            assert_eq!(
                from,
                ([127, 0, 0, 1], PORT + 1).into(),
                "packet from elsewhere"
            );
            buf.truncate(n);
            Some(buf)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("UDP receive: {e}"),
    }
}

fn write_burst(can: &RawCanSocket, frames: &[Vec<u8>], file: &str) {
    for raw in frames {
        can.send(raw)
            .unwrap_or_else(|e| panic!("{file}: writing a frame to vcan0: {e}"));
    }
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn cannelloni_regenerates_the_golden_packets() {
    require_testbed();
    let fx = NetnsFixture::new();
    fx.ip(&["link", "set", "lo", "up"]);
    fx.ip(&["link", "add", "vcan0", "type", "vcan"]);
    // Set while the link is down (vcan allows no MTU change later); 72 lets CAN FD frames pass.
    fx.ip(&["link", "set", "vcan0", "mtu", "72"]);
    fx.ip(&["link", "set", "vcan0", "up"]);
    let ns = Netns::Path(PathBuf::from("/run/netns").join(fx.name()));

    let udp = netns::run(&ns, move || UdpSocket::bind(("127.0.0.1", PORT)))
        .expect("enter the namespace")
        .expect("bind the UDP socket");
    let mut cannelloni = Cannelloni::start(fx.name());
    cannelloni.wait_bound(fx.name());
    let can = RawCanSocket::open(&ns, "vcan0").expect("CAN socket on vcan0");
    settle();

    let mut regenerated = 0;
    let mut next_seq: u8 = 0;
    let mut failures = Vec::new();
    for (file, frame_texts) in manifest_ok() {
        if !file.ends_with(".hex") {
            continue;
        }
        let golden = read_hex(&file);
        if !golden
            .comments
            .iter()
            .any(|c| c.contains("made by cannelloni"))
        {
            continue;
        }
        if frame_texts.is_empty() {
            show(&format!(
                "{file}: not regenerated: cannelloni never sends an empty packet"
            ));
            continue;
        }
        let frames: Vec<Vec<u8>> = frame_texts.iter().map(|f| kernel_frame(f)).collect();
        let forwarded = frame_texts
            .iter()
            .zip(&frames)
            .filter(|(_, raw)| {
                u32::from_ne_bytes(raw[..4].try_into().expect("4 bytes")) & CAN_ERR_FLAG == 0
            })
            .count();
        cannelloni.assert_running();
        write_burst(&can, &frames, &file);

        if forwarded == 0 {
            // Only error frames: cannelloni must keep quiet.
            match receive(&udp, Duration::from_micros(5 * BATCH_US)) {
                None => show(&format!(
                    "{file}: no packet, as expected: cannelloni never forwards error frames"
                )),
                Some(got) => failures.push(format!(
                    "{file}: error frames only, yet cannelloni sent {}",
                    hex(&got)
                )),
            }
            settle();
            continue;
        }

        let Some(got) = receive(&udp, WAIT) else {
            failures.push(format!(
                "{file}: no packet from cannelloni within {WAIT:?}; its output:\n{}",
                cannelloni.log()
            ));
            settle();
            continue;
        };
        regenerated += 1;
        let seq = next_seq;
        next_seq = next_seq.wrapping_add(1);
        let dropped = frames.len() - forwarded;
        show(&format!(
            "{file}: regenerated (seq {}{}): {}",
            got.get(2).copied().unwrap_or_default(),
            if dropped > 0 {
                format!(", {dropped} error frame(s) written but not forwarded")
            } else {
                String::new()
            },
            hex(&got)
        ));
        let expected = expected_from_corpus(&golden.bytes);
        let same_but_seq = got.len() == expected.len()
            && got
                .iter()
                .zip(&expected)
                .enumerate()
                .all(|(i, (a, b))| i == 2 || a == b);
        if !same_but_seq {
            failures.push(format!(
                "{file}: cannelloni's packet differs from the corpus (byte 2, the sequence \
                 number, aside)\n  cannelloni: {}\n  expected:   {}\n  corpus file: {}",
                hex(&got),
                hex(&expected),
                hex(&golden.bytes)
            ));
        } else if got[2] != seq {
            failures.push(format!(
                "{file}: sequence number {}, expected {seq} (cannelloni numbers its packets from 0)",
                got[2]
            ));
        }
        settle();
    }

    // Nothing else came: no packet for the error frames after all, no batch cut in two.
    if let Some(stray) = receive(&udp, Duration::from_micros(5 * BATCH_US)) {
        failures.push(format!("an unexpected packet: {}", hex(&stray)));
    }
    cannelloni.assert_running();
    assert!(
        failures.is_empty(),
        "{}\ncannelloni's output:\n{}",
        failures.join("\n"),
        cannelloni.log()
    );
    assert!(
        regenerated >= 5,
        "only {regenerated} packets regenerated: did the corpus lose its \"made by cannelloni\" \
         files?"
    );
}
