//! The eBPF frame counters against the real kernel, in the CAN test-bed VM
//! (`cargo xtask vm-test -p vcan-plugin ebpf`).
//!
//! The echo rule every count here relies on: vcan is created without IFF_ECHO, so the CAN core
//! loops each frame sent on a socket with loopback on (the default) back to the interface as a
//! received frame. Every locally sent frame is therefore counted once at tc egress (the send)
//! and once at tc ingress (the echo).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vcan_plugin::ebpf::{
    AttachMode, Config, Counters, CountersSnapshot, DirectionCounts, KindCounts,
};
use vcan_plugin::kernel::link::{CanMtu, Links, VcanSpec};
use vcan_plugin::kernel::netns::Netns;
use vcan_test_support::{NetnsFixture, require_testbed, run_in_netns};

/// The tests share the kernel's BPF state and the flood measurement wants a quiet machine: run
/// them one at a time even under libtest's parallel runner.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Frames of each kind sent per test.
const N: u64 = 5;

/// A private bpffs pin directory, removed (with every pin in it) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Self {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/vcantest-{}-{tag}",
            std::process::id()
        )))
    }

    fn config(&self) -> Config {
        Config {
            bpffs_dir: self.0.clone(),
            mode: None,
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates an FD-capable vcan in the fixture; returns its ifindex.
fn vcan(fx: &NetnsFixture, name: &str) -> u32 {
    Links::open(&Netns::Path(fx.path()))
        .expect("open namespace")
        .ensure_vcan(&VcanSpec {
            name: name.into(),
            mtu: CanMtu::Fd,
        })
        .expect("create vcan")
        .index
}

/// Sends `frame` (cansend syntax) `n` times on `ifname` inside the fixture, in one shell.
fn send(fx: &NetnsFixture, ifname: &str, frame: &str, n: u64) {
    let script = format!(
        "i=0; while [ $i -lt {n} ]; do cansend {ifname} '{frame}' || exit 1; i=$((i+1)); done"
    );
    fx.run_ok("sh", &["-c", &script]);
}

/// Reads until `pred` holds (ingress echoes are delivered from softirq, a moment after the
/// send returns), failing after a few seconds with the last snapshot.
fn read_until(
    counters: &Counters,
    att: &vcan_plugin::ebpf::Attachment,
    what: &str,
    pred: impl Fn(&CountersSnapshot) -> bool,
) -> CountersSnapshot {
    let started = Instant::now();
    loop {
        let snap = counters.read(att).expect("read counters");
        if pred(&snap) {
            return snap;
        }
        if started.elapsed() > Duration::from_secs(10) {
            panic!("{what}: counters never matched; last snapshot: {snap:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn k(frames: u64, bytes: u64) -> KindCounts {
    KindCounts { frames, bytes }
}

/// The kernel's own interface counters, read inside the namespace (`ip -s -j link show`).
fn kernel_stats(fx: &NetnsFixture, ifname: &str) -> (u64, u64, u64, u64) {
    let out = fx.ip(&["-s", "-j", "link", "show", ifname]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j prints JSON");
    let s = &v[0]["stats64"];
    let n = |p: &serde_json::Value| p.as_u64().unwrap_or_else(|| panic!("no stats in {out}"));
    (
        n(&s["tx"]["packets"]),
        n(&s["tx"]["bytes"]),
        n(&s["rx"]["packets"]),
        n(&s["rx"]["bytes"]),
    )
}

fn tc_filters(fx: &NetnsFixture, ifname: &str) -> String {
    let mut all = String::new();
    for dir in ["ingress", "egress"] {
        all.push_str(&fx.run_ok("tc", &["filter", "show", "dev", ifname, dir]));
    }
    all
}

/// Programs named like ours, loaded anywhere on the machine.
fn our_programs() -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool -j prints JSON");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|p| {
                    matches!(
                        p["name"].as_str(),
                        Some("vcan_ingress") | Some("vcan_egress")
                    )
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn ebpf_counts_each_kind_exactly_in_both_directions() {
    require_testbed();
    let _serial = serial();
    let pins = PinDir::new("kinds");
    let fx = NetnsFixture::new();
    vcan(&fx, "vcan0");
    let counters = Counters::open(&pins.config()).expect("open counters");
    let started = Instant::now();
    let att = counters
        .attach(&Netns::Path(fx.path()), "vcan0")
        .expect("attach to vcan0");
    println!(
        "attach ({}) took {:?}",
        counters.attach_mode(),
        started.elapsed()
    );
    assert_eq!(counters.attach_mode(), vcan_plugin::ebpf::attach_mode());
    let before = kernel_stats(&fx, "vcan0");

    send(&fx, "vcan0", "123#11223344", N); // classic, standard id, 4 bytes
    send(&fx, "vcan0", "1234ABCD#1122334455667788", N); // classic, extended id, 8 bytes
    send(&fx, "vcan0", "123#R", N); // remote frame: no payload
    send(&fx, "vcan0", "123##1112233445566778899AABBCC", N); // FD + BRS, 12 bytes
    send(
        &fx,
        "vcan0",
        "1234ABCD##000112233445566778899AABBCCDDEEFF",
        N,
    ); // FD, no BRS, 16 bytes
    // An error frame: an 8-digit id is extended (EFF), and 0x20000000 is CAN_ERR_FLAG. Raw
    // sockets send it like any frame; on vcan it is echoed like any frame too.
    send(&fx, "vcan0", "20000080#0000000000000000", N);

    let expected = DirectionCounts {
        classic: k(2 * N, N * 4 + N * 8),
        rtr: k(N, 0),
        err: k(N, N * 8),
        fd: k(N, N * 16),
        fd_brs: k(N, N * 12),
        xl: k(0, 0),
        other: k(0, 0),
        std_id: 3 * N, // classic 123, RTR 123, FD 123
        ext_id: 2 * N, // classic 1234ABCD, FD 1234ABCD; error frames count in neither
    };
    let snap = read_until(&counters, &att, "all kinds", |s| {
        s.egress == expected && s.ingress == expected
    });
    println!("per direction: {:?}", snap.egress);

    // Cross-check with the kernel's own interface counters.
    let after = kernel_stats(&fx, "vcan0");
    let (tx_pkts, tx_bytes, rx_pkts, rx_bytes) = (
        after.0 - before.0,
        after.1 - before.1,
        after.2 - before.2,
        after.3 - before.3,
    );
    println!(
        "kernel: tx {tx_pkts} frames / {tx_bytes} B, rx {rx_pkts} frames / {rx_bytes} B; \
         eBPF: egress {:?}, ingress {:?}",
        snap.egress.total(),
        snap.ingress.total()
    );
    assert_eq!(tx_pkts, snap.egress.total().frames, "tx frames vs egress");
    assert_eq!(rx_pkts, snap.ingress.total().frames, "rx frames vs ingress");
    assert_eq!(tx_bytes, snap.egress.total().bytes, "tx bytes vs egress");
    assert_eq!(rx_bytes, snap.ingress.total().bytes, "rx bytes vs ingress");

    counters.detach(&att).expect("detach");
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn ebpf_same_ifindex_in_two_namespaces_is_counted_apart() {
    require_testbed();
    let _serial = serial();
    let pins = PinDir::new("twons");
    let (a, b) = (NetnsFixture::new(), NetnsFixture::new());
    let (ia, ib) = (vcan(&a, "vcan0"), vcan(&b, "vcan0"));
    assert_eq!(
        ia, ib,
        "the point of this test: both vcans have the same ifindex"
    );
    let counters = Counters::open(&pins.config()).expect("open counters");
    let att_a = counters
        .attach(&Netns::Path(a.path()), "vcan0")
        .expect("attach a");
    let att_b = counters
        .attach(&Netns::Path(b.path()), "vcan0")
        .expect("attach b");
    assert_ne!(att_a.info.slot, att_b.info.slot);
    assert_ne!(att_a.info.netns_ino, att_b.info.netns_ino);

    send(&a, "vcan0", "123#01", 3);
    send(&b, "vcan0", "1234ABCD#0102", 7);
    let sa = read_until(&counters, &att_a, "namespace a", |s| {
        s.ingress.total().frames == 3
    });
    let sb = read_until(&counters, &att_b, "namespace b", |s| {
        s.ingress.total().frames == 7
    });
    assert_eq!(sa.egress.classic, k(3, 3));
    assert_eq!((sa.egress.std_id, sa.egress.ext_id), (3, 0));
    assert_eq!(sb.egress.classic, k(7, 14));
    assert_eq!((sb.egress.std_id, sb.egress.ext_id), (0, 7));
    assert_eq!(sa.ingress, sa.egress);
    assert_eq!(sb.ingress, sb.egress);

    // Attaching again is idempotent: same slot, counters untouched.
    let again = counters
        .attach(&Netns::Path(a.path()), "vcan0")
        .expect("attach a again");
    assert_eq!(again, att_a);
    assert_eq!(counters.read(&att_a).expect("read").egress.classic, k(3, 3));

    // A scrape's batched read of the whole map gives each attachment its own counts, the same as
    // reading them one by one, and calls a detached one stale.
    let many = counters.read_many(&[&att_b, &att_a]);
    assert_eq!(many.len(), 2);
    assert_eq!(many[0].as_ref().expect("b"), &sb);
    assert_eq!(many[1].as_ref().expect("a"), &sa);
    counters.detach(&att_a).expect("detach a");
    let many = counters.read_many(&[&att_a, &att_b]);
    assert!(
        matches!(many[0], Err(vcan_plugin::ebpf::EbpfError::Stale { .. })),
        "{:?}",
        many[0]
    );
    assert_eq!(many[1].as_ref().expect("b"), &sb);
    counters.detach(&att_b).expect("detach b");
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn ebpf_detach_cleans_up_and_churn_returns_maps_to_baseline() {
    require_testbed();
    let _serial = serial();
    let pins = PinDir::new("churn");
    let fx = NetnsFixture::new();
    vcan(&fx, "vcan0");
    let ns = Netns::Path(fx.path());
    let counters = Counters::open(&pins.config()).expect("open counters");
    let baseline_maps = counters.map_entries();
    let baseline_progs = our_programs();
    assert_eq!(
        baseline_maps,
        (0, 0),
        "a fresh pin directory has empty maps"
    );

    let att = counters.attach(&ns, "vcan0").expect("attach");
    assert_eq!(counters.map_entries(), (2, 1), "two directions, one slot");
    if counters.attach_mode() == AttachMode::Clsact {
        let filters = tc_filters(&fx, "vcan0");
        assert!(filters.contains("vcan_ingress"), "{filters}");
        assert!(filters.contains("vcan_egress"), "{filters}");
    }
    counters.detach(&att).expect("detach");
    assert_eq!(
        tc_filters(&fx, "vcan0").trim(),
        "",
        "no tc filters after detach"
    );
    assert!(matches!(
        counters.read(&att),
        Err(vcan_plugin::ebpf::EbpfError::Stale { .. })
    ));
    counters.detach(&att).expect("detaching twice is a no-op");

    let started = Instant::now();
    for i in 0..100 {
        let att = counters
            .attach(&ns, "vcan0")
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        // Every tenth slot also counts a frame (sending costs a process start under TCG).
        if i % 10 == 0 {
            send(&fx, "vcan0", "123#01", 1);
            read_until(&counters, &att, "a churn cycle", |s| {
                s.egress.classic.frames == 1 && s.ingress.classic.frames == 1
            });
        }
        counters
            .detach(&att)
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
    }
    println!("100 attach/detach cycles took {:?}", started.elapsed());
    assert_eq!(counters.map_entries(), baseline_maps, "map entries leaked");
    assert_eq!(tc_filters(&fx, "vcan0").trim(), "", "tc filters leaked");
    assert_eq!(counters.list(), vec![], "registry leaked");
    // Programs are freed once their filters are gone (asynchronously, after an RCU grace
    // period), so poll briefly.
    let started = Instant::now();
    while our_programs() > baseline_progs && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(our_programs(), baseline_progs, "programs leaked");
    let links = pins.0.join("links");
    assert_eq!(
        std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0),
        0,
        "TCX link pins leaked in {}",
        links.display()
    );
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn ebpf_counts_continue_across_a_plugin_restart() {
    require_testbed();
    let _serial = serial();
    let pins = PinDir::new("restart");
    let fx = NetnsFixture::new();
    vcan(&fx, "vcan0");
    let ns = Netns::Path(fx.path());

    let first = Counters::open(&pins.config()).expect("open counters");
    let att = first.attach(&ns, "vcan0").expect("attach");
    send(&fx, "vcan0", "123#0102", N);
    let before = read_until(&first, &att, "before restart", |s| {
        s.ingress.classic.frames == N
    });
    // The "restart": nothing of the first instance survives in this process.
    drop(first);

    send(&fx, "vcan0", "123#0102", 2); // frames while the plugin is down are counted too
    let second = Counters::open(&pins.config()).expect("reopen counters");
    assert_eq!(second.list().len(), 1, "the registry survived in bpffs");
    let adopted = second
        .adopt(&ns, "vcan0")
        .expect("adopt")
        .expect("the attachment is still live");
    assert_eq!(adopted, att, "same slot, same interface");
    let during = second.read(&adopted).expect("read after restart");
    assert_eq!(during.egress.classic, k(N + 2, (N + 2) * 2));
    assert!(during.egress.classic.frames >= before.egress.classic.frames);

    // attach() after a restart adopts too, instead of attaching a second time.
    assert_eq!(second.attach(&ns, "vcan0").expect("attach"), att);
    send(&fx, "vcan0", "123#0102", N);
    read_until(&second, &adopted, "after restart", |s| {
        s.egress.classic.frames == 2 * N + 2 && s.ingress.classic.frames == 2 * N + 2
    });
    if second.attach_mode() == AttachMode::Clsact {
        let filters = tc_filters(&fx, "vcan0");
        let ours = filters
            .lines()
            .filter(|l| l.contains("vcan_ingress"))
            .count();
        assert_eq!(ours, 1, "one ingress filter, not two: {filters}");
    }
    second.detach(&adopted).expect("detach");
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn ebpf_slots_of_deleted_interfaces_are_swept() {
    require_testbed();
    let _serial = serial();
    let pins = PinDir::new("sweep");
    let fx = NetnsFixture::new();
    vcan(&fx, "vcan0");
    vcan(&fx, "vcan1");
    let ns = Netns::Path(fx.path());
    let counters = Counters::open(&pins.config()).expect("open counters");
    let keep = counters.attach(&ns, "vcan0").expect("attach vcan0");
    let gone = counters.attach(&ns, "vcan1").expect("attach vcan1");
    fx.ip(&["link", "del", "vcan1"]);
    // The kernel frees the programs of a deleted interface asynchronously.
    let started = Instant::now();
    let mut released = Vec::new();
    while released.is_empty() && started.elapsed() < Duration::from_secs(10) {
        released = counters.sweep().expect("sweep");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(released, vec![gone.info.clone()]);
    assert_eq!(counters.list(), vec![keep.info.clone()]);
    assert_eq!(counters.map_entries(), (2, 1));
    // Detaching the swept attachment later is harmless.
    counters.detach(&gone).expect("detach swept");

    // A whole namespace going away, noticed at the next start.
    drop(counters);
    drop(fx);
    let started = Instant::now();
    loop {
        let reopened = Counters::open(&pins.config()).expect("reopen");
        if reopened.list().is_empty() {
            assert_eq!(reopened.map_entries(), (0, 0));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "slots of a deleted namespace were never released: {:?}",
            reopened.list()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn ebpf_errors_explain_themselves() {
    require_testbed();
    let _serial = serial();
    let pins = PinDir::new("errors");
    let fx = NetnsFixture::new();
    let counters = Counters::open(&pins.config()).expect("open counters");
    let err = counters
        .attach(&Netns::Path(fx.path()), "vcan9")
        .expect_err("no such interface");
    assert!(err.to_string().contains("no interface \"vcan9\""), "{err}");
    let err = counters
        .attach(&Netns::Path("/run/netns/does-not-exist".into()), "vcan0")
        .expect_err("no such namespace");
    assert!(err.to_string().contains("does not exist"), "{err}");
    // A caller-supplied index that is not the interface's: refused, and nothing left behind.
    let index = vcan(&fx, "vcan0");
    let err = counters
        .attach_index(&Netns::Path(fx.path()), "vcan0", index + 7)
        .expect_err("wrong index");
    assert!(
        err.to_string()
            .contains("the interface changed while attaching"),
        "{err}"
    );
    assert_eq!(counters.map_entries(), (0, 0), "a refused attach leaked");
    let att = counters
        .attach_index(&Netns::Path(fx.path()), "vcan0", index)
        .expect("the right index attaches");
    counters.detach(&att).expect("detach");
    let err = Counters::open(&Config {
        bpffs_dir: "/tmp/not-bpffs/vcan".into(),
        mode: None,
    })
    .expect_err("not bpffs");
    assert!(err.to_string().contains("mount -t bpf"), "{err}");
}

/// Wall time of `cangen -g 0 -n 100000 vcan0` in the namespace.
fn flood(fx: &NetnsFixture) -> Duration {
    let started = Instant::now();
    let out = run_in_netns(
        fx.name(),
        "cangen",
        &[
            "-g", "0", "-p", "10", "-n", "100000", "-I", "123", "-L", "8", "vcan0",
        ],
    );
    assert!(
        out.status.success(),
        "cangen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Not a benchmark suite: one measurement of what counting costs a flood, for the record.
/// Rounds alternate between attached and detached so drift affects both alike.
#[test]
#[ignore = "needs the CAN test-bed VM"]
fn ebpf_flood_overhead_is_measured() {
    require_testbed();
    let _serial = serial();
    let pins = PinDir::new("flood");
    let fx = NetnsFixture::new();
    vcan(&fx, "vcan0");
    let ns = Netns::Path(fx.path());
    let counters = Counters::open(&pins.config()).expect("open counters");
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        without.push(flood(&fx));
        let att = counters.attach(&ns, "vcan0").expect("attach");
        with.push(flood(&fx));
        let snap = counters.read(&att).expect("read");
        assert_eq!(snap.egress.classic.frames, 100_000);
        assert_eq!(snap.ingress.classic.frames, 100_000);
        counters.detach(&att).expect("detach");
    }
    let (w, wo) = (median(with.clone()), median(without.clone()));
    println!(
        "flood of 100000 frames: without {without:?} (median {wo:?}), with {with:?} (median \
         {w:?}); ratio {:.2}",
        w.as_secs_f64() / wo.as_secs_f64()
    );
    // Loose bound: under TCG timing is noisy; the point is the printed ratio.
    assert!(w.as_secs_f64() < 3.0 * wo.as_secs_f64());
}
