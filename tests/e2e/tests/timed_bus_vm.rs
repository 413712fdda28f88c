//! Timed buses on a real node in the CAN test-bed VM: frames take their exact bit time, the
//! lowest identifier wins, a member writing faster than the bitrate gets ENOBUFS, the load
//! metric matches the frames, and injected faults (bus-off, disconnect) reach the members as a
//! real controller's would — through the `vcan-plugin fault` command, as a pipeline runs it.
//!
//! Listeners are `candump -L -n N` in member pods (receive timestamps from the kernel); senders
//! are `cangen` exec'd into member pods, polling on ENOBUFS (`-p`) as their users run it on a
//! real controller.

use std::path::PathBuf;
use std::time::Duration;

use vcan_e2e::env::TestNode;
use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::node::StartedPod;
use vcan_e2e::wait::eventually;
use vcan_e2e::{ContainerSpec, PodSpec};
use vcan_plugin::bus::timing::bits::{self, WireFrame};
use vcan_test_support::{require_testbed, run_in_netns, wait_for_can_listener};

const STATE_DIR: &str = "/run/vcan-node/state";
const WIRE: &str = "socketcan.io/bus-wire";
const SLOW: &str = "socketcan.io/bus-slow";
const TIGHT: &str = "socketcan.io/bus-tight";
const WIRE_BITRATE: u32 = 125_000;
const SLOW_BITRATE: u32 = 10_000;
const BIND_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(240);
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a listener waits for its frames before failing the test (seconds).
const DUMP_TIMEOUT: &str = "200";

fn bus_config() -> PathBuf {
    let path = PathBuf::from("/run/vcan-node/timed-buses.json");
    std::fs::create_dir_all("/run/vcan-node").expect("node dir");
    std::fs::write(
        &path,
        format!(
            r#"{{"buses": [
                {{"name": "wire", "fd": false, "members": 4, "interface": "can0",
                  "bitrate": {WIRE_BITRATE}, "tx_queue": 1024}},
                {{"name": "tight", "fd": false, "members": 2, "interface": "can0",
                  "bitrate": {WIRE_BITRATE}, "tx_queue": 10}},
                {{"name": "slow", "fd": false, "members": 4, "interface": "can0",
                  "bitrate": {SLOW_BITRATE}, "tx_queue": 512}}]}}"#
        ),
    )
    .expect("write bus config");
    path
}

/// A member pod of `bus` dumping the first `frames` frames of can0, then lingering so that
/// commands exec'd into it finish. With `errors` it dumps error frames too (candump's error mask
/// filter), and a second candump prints them as `candump -e` decodes them, its lines prefixed
/// with `E `.
fn listener(name: &str, bus: &str, frames: usize, errors: bool) -> PodSpec {
    let script = if errors {
        format!(
            "(timeout {DUMP_TIMEOUT} candump -e -n {frames} can0,0:0,#FFFFFFFF | sed 's/^/E /') & \
             timeout {DUMP_TIMEOUT} candump -L -n {frames} can0,0:0,#FFFFFFFF; rc=$?; wait; \
             sleep 3; exit $rc"
        )
    } else {
        // Into a file first: a log line per frame through the runtime's log pipe would load the
        // emulated CPUs, which the scheduler shares, while the frames are timed.
        format!(
            "timeout {DUMP_TIMEOUT} candump -L -n {frames} can0 > /tmp/dump; rc=$?; \
             cat /tmp/dump; sleep 3; exit $rc"
        )
    };
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sh", "-c", &script]);
    c.resources = vec![(bus.to_string(), 1)];
    let mut p = PodSpec::new("default", name);
    p.containers = vec![c];
    p
}

/// A member pod of `bus` that only sends (commands exec'd into it).
fn sender(name: &str, bus: &str) -> PodSpec {
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sleep", "3600"]);
    c.resources = vec![(bus.to_string(), 1)];
    let mut p = PodSpec::new("default", name);
    p.containers = vec![c];
    p
}

async fn wait_bound(t: &TestNode, pod: &StartedPod) {
    let ns = t.netns_name(pod).await;
    tokio::task::spawn_blocking(move || wait_for_can_listener(&ns, "can0", BIND_TIMEOUT))
        .await
        .expect("wait for listener");
}

/// Like [`wait_bound`] for a listener with `errors`: both its candumps, which the kernel lists
/// among the error-frame receivers too.
async fn wait_bound_for_errors(t: &TestNode, pod: &StartedPod) {
    let ns = t.netns_name(pod).await;
    let started = std::time::Instant::now();
    loop {
        let out = run_in_netns(&ns, "cat", &["/proc/net/can/rcvlist_err"]);
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        let bound = listing
            .lines()
            .filter(|l| l.split_whitespace().next() == Some("can0"))
            .count();
        // Both of the pod's candumps.
        if bound >= 2 {
            return;
        }
        if started.elapsed() > BIND_TIMEOUT {
            let log = t.node.cri.logs(&pod.spec, "app").await.unwrap_or_default();
            panic!(
                "no error-frame listener on can0 in {}: {listing}\nits log: {log}",
                pod.spec.name
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn exec_ok(t: &TestNode, pod: &StartedPod, cmd: &[&str]) -> String {
    let out = t
        .node
        .cri
        .exec(pod.container("app"), cmd, EXEC_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("exec in {}: {e:#}", pod.spec.name));
    assert_eq!(
        out.exit_code, 0,
        "{cmd:?} in {}: {}{}",
        pod.spec.name, out.stdout, out.stderr
    );
    out.stdout
}

/// A frame as candump -L logged it.
#[derive(Debug, Clone)]
struct Logged {
    at: f64,
    id: u32,
    data: Vec<u8>,
}

impl Logged {
    fn bits(&self) -> u32 {
        let f = bits::frame_bits(&WireFrame {
            can_id: self.id,
            data: &self.data,
            dlc: self.data.len() as u8,
            fd: false,
            brs: false,
        });
        f.nominal + f.data
    }
}

fn parse_log(log: &str) -> Vec<Logged> {
    log.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let at = parts.next()?.trim_matches(|c| c == '(' || c == ')');
            let frame = parts.nth(1)?;
            let (id, data) = frame.split_once('#')?;
            let mut id_value = u32::from_str_radix(id, 16).ok()?;
            if id.len() == 8 && id_value & 0x2000_0000 == 0 {
                id_value |= 0x8000_0000;
            }
            let data = (0..data.len() / 2)
                .filter_map(|i| u8::from_str_radix(&data[2 * i..2 * i + 2], 16).ok())
                .collect();
            Some(Logged {
                at: at.parse().ok()?,
                id: id_value,
                data,
            })
        })
        .collect()
}

/// The frames a listener pod dumped, once it has exited.
async fn dumped(t: &TestNode, pod: &StartedPod) -> Vec<Logged> {
    let code = t
        .node
        .cri
        .wait_exit(pod.container("app"), EXIT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", pod.spec.name));
    let log = t.node.cri.logs(&pod.spec, "app").await.expect("logs");
    let frames = parse_log(&log);
    assert_eq!(
        code,
        0,
        "{} did not receive all its frames; got {} ({})",
        pod.spec.name,
        frames.len(),
        log.lines().last().unwrap_or("")
    );
    frames
}

fn metric(t: &TestNode, series: &str) -> f64 {
    t.plugin.metric(series).unwrap_or(0.0)
}

/// Runs `vcan-plugin fault …` as a pipeline would in the plugin's pod.
fn fault(args: &[&str]) -> String {
    let out = std::process::Command::new(vcan_e2e::plugin::binary())
        .arg("fault")
        .args(args)
        .args(["--state-dir", STATE_DIR])
        .output()
        .expect("vcan-plugin fault runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "vcan-plugin fault {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn timed_buses_take_bit_times_arbitrate_and_misbehave_on_request() {
    require_testbed();
    let config = bus_config();
    let t = TestNode::start_with(
        2,
        "127.0.0.1:9728",
        vec![
            "--bus-config".into(),
            config.display().to_string(),
            "--state-dir".into(),
            STATE_DIR.into(),
        ],
        &[(WIRE, 4), (SLOW, 4), (TIGHT, 2)],
    )
    .await
    .expect("node starts");

    frames_take_their_bit_time_and_the_load_is_theirs(&t).await;
    a_writer_faster_than_the_bitrate_gets_enobufs(&t).await;
    the_lowest_identifier_wins(&t).await;
    bus_off_and_disconnect_reach_the_member(&t).await;
    let log = t.plugin.log();
    let tail: Vec<&str> = log.lines().rev().take(12).collect();
    println!(
        "plugin log tail:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// 1000 classic 8-byte frames from one member at 125 kbit/s, written at once into a queue that
/// holds them: the receiver's first-to-last span is the sum of the bit times of frames 2..1000
/// (the first one's end is the first timestamp), within 5 %; the bus's busy time gives a load
/// over the burst within 2 points of the load the received frames make.
async fn frames_take_their_bit_time_and_the_load_is_theirs(t: &TestNode) {
    const FRAMES: usize = 1000;
    let rx = t.run_pod_ok(&listener("rx", WIRE, FRAMES, false)).await;
    let tx = t.run_pod_ok(&sender("tx", WIRE)).await;
    wait_bound(t, &rx).await;
    let busy_before = metric(t, "vcan_plugin_bus_busy_seconds_total{bus=\"wire\"}");
    let n = FRAMES.to_string();
    let cmd = [
        "cangen", "can0", "-g", "0", "-I", "123", "-L", "8", "-D", "i", "-n", &n,
    ];
    exec_ok(t, &tx, &cmd).await;
    let got = dumped(t, &rx).await;
    assert_eq!(got.len(), FRAMES);
    let span = got[FRAMES - 1].at - got[0].at;
    let expected: f64 = got[1..]
        .iter()
        .map(|f| f64::from(f.bits()) / f64::from(WIRE_BITRATE))
        .sum();
    let error = (span - expected) / expected;
    println!(
        "125 kbit/s: {FRAMES} frames, receiver span {span:.4} s, sum of exact bit times \
         {expected:.4} s, error {:+.2} %",
        error * 100.0
    );
    assert!(error.abs() <= 0.05, "span {span} s vs {expected} s");

    let all_bits: f64 = got.iter().map(|f| f64::from(f.bits())).sum();
    eventually("the busy time is counted", Duration::from_secs(10), || {
        let busy = metric(t, "vcan_plugin_bus_busy_seconds_total{bus=\"wire\"}") - busy_before;
        let from_frames = all_bits / f64::from(WIRE_BITRATE);
        // Load over the burst's span, from the metric and from the frames received.
        let (metric_load, frame_load) = (busy / span, from_frames / span);
        println!("load over the burst: metric {metric_load:.4}, frames {frame_load:.4}");
        if (metric_load - frame_load).abs() <= 0.02 {
            Ok(())
        } else {
            Err(format!("metric {metric_load}, frames {frame_load}"))
        }
    })
    .await;
    let frames = metric(
        t,
        "vcan_plugin_bus_member_frames_total{bus=\"wire\",namespace=\"default\",pod=\"tx\"}",
    );
    assert_eq!(frames, FRAMES as f64, "every frame counted to its sender");
    for pod in [&rx, &tx] {
        t.node.delete_pod(pod).await.expect("delete");
    }
}

/// A member writing 100 frames at once into a transmit queue of 10 at 125 kbit/s: cangen (not
/// told to retry) stops with ENOBUFS after about ten frames, the refusal is counted, and the
/// frames that were let through go on the bus.
async fn a_writer_faster_than_the_bitrate_gets_enobufs(t: &TestNode) {
    let tx = t.run_pod_ok(&sender("hasty", TIGHT)).await;
    let cmd = [
        "cangen", "can0", "-g", "0", "-I", "321", "-L", "8", "-n", "100",
    ];
    let out = t
        .node
        .cri
        .exec(tx.container("app"), &cmd, EXEC_TIMEOUT)
        .await
        .expect("exec cangen");
    println!(
        "cangen into a queue of 10: exit {}, {}",
        out.exit_code,
        out.stderr.trim()
    );
    assert_ne!(out.exit_code, 0, "cangen must fail: {}", out.stdout);
    assert!(
        out.stderr.contains("No buffer space available"),
        "ENOBUFS: {}",
        out.stderr
    );
    let series = |name: &str| {
        format!("vcan_plugin_bus_{name}{{bus=\"tight\",namespace=\"default\",pod=\"hasty\"}}")
    };
    let (refused, sent) = eventually("the queue drains", Duration::from_secs(10), || {
        let refused = metric(t, &series("tx_refused_total"));
        let sent = metric(t, &series("member_frames_total"));
        if refused >= 1.0 && (10.0..=12.0).contains(&sent) {
            Ok((refused, sent))
        } else {
            Err(format!("refused {refused}, on the bus {sent}"))
        }
    })
    .await;
    println!("writes refused {refused}, frames on the bus {sent}");
    t.node.delete_pod(&tx).await.expect("delete");
}

/// A blocker with the highest priority holds a 10 kbit/s bus while members A (0x200) and B
/// (0x100) each queue 100 frames; the receiver then sees B's 100 frames before A's, apart from
/// at most one frame of A already on the wire.
async fn the_lowest_identifier_wins(t: &TestNode) {
    const EACH: usize = 100;
    const BLOCKER: usize = 250;
    let rx = t
        .run_pod_ok(&listener("arb-rx", SLOW, BLOCKER + 2 * EACH, false))
        .await;
    let blocker = t.run_pod_ok(&sender("arb-block", SLOW)).await;
    let a = t.run_pod_ok(&sender("arb-a", SLOW)).await;
    let b = t.run_pod_ok(&sender("arb-b", SLOW)).await;
    wait_bound(t, &rx).await;
    let n = |k: usize| k.to_string();
    // 250 frames of ~12 ms: the bus is busy for about 3 s while A and B queue theirs.
    exec_ok(
        t,
        &blocker,
        &[
            "cangen",
            "can0",
            "-g",
            "0",
            "-I",
            "050",
            "-L",
            "8",
            "-D",
            "r",
            "-n",
            &n(BLOCKER),
        ],
    )
    .await;
    let each = n(EACH);
    let cmd_a = [
        "cangen", "can0", "-g", "0", "-I", "200", "-L", "1", "-D", "i", "-n", &each,
    ];
    let cmd_b = [
        "cangen", "can0", "-g", "0", "-I", "100", "-L", "1", "-D", "i", "-n", &each,
    ];
    tokio::join!(exec_ok(t, &a, &cmd_a), exec_ok(t, &b, &cmd_b));
    let got = dumped(t, &rx).await;
    let ids: Vec<u32> = got.iter().map(|f| f.id).collect();
    let blocker_last = ids
        .iter()
        .rposition(|id| *id == 0x050)
        .expect("blocker frames");
    let after: Vec<u32> = ids[blocker_last + 1..].to_vec();
    let last_b = after.iter().rposition(|id| *id == 0x100);
    let a_before_last_b =
        last_b.map_or(0, |i| after[..i].iter().filter(|id| **id == 0x200).count());
    println!(
        "arbitration: {} blocker frames, then {} frames; A's frames before B's last: {a_before_last_b}",
        ids.iter().filter(|id| **id == 0x050).count(),
        after.len()
    );
    assert_eq!(ids.iter().filter(|id| **id == 0x100).count(), EACH);
    assert_eq!(ids.iter().filter(|id| **id == 0x200).count(), EACH);
    assert!(
        a_before_last_b <= 1,
        "B (0x100) must win every arbitration against A (0x200): {after:x?}"
    );
    // Each sender's frames in its own order.
    for id in [0x100, 0x200] {
        let seq: Vec<u8> = got
            .iter()
            .filter(|f| f.id == id)
            .map(|f| f.data[0])
            .collect();
        let expected: Vec<u8> = (0..EACH as u8).map(|k| seq[0].wrapping_add(k)).collect();
        assert_eq!(seq, expected, "{id:x} in order");
    }
    for pod in [&rx, &blocker, &a, &b] {
        t.node.delete_pod(pod).await.expect("delete");
    }
}

/// A member injected with bus-off sees the driver's error frames (warning, passive, bus-off,
/// restarted, active) in candump -e; a member disconnected for 2 s neither sends nor receives
/// in that time while the others go on; every fault is counted.
async fn bus_off_and_disconnect_reach_the_member(t: &TestNode) {
    let ecu = t.run_pod_ok(&listener("ecu", WIRE, 5, true)).await;
    let peer = t.run_pod_ok(&listener("peer", WIRE, 3, false)).await;
    let cut = t.run_pod_ok(&listener("cut", WIRE, 2, false)).await;
    wait_bound_for_errors(t, &ecu).await;
    wait_bound(t, &peer).await;
    wait_bound(t, &cut).await;

    let out = fault(&[
        "inject",
        "--bus",
        "wire",
        "--pod",
        "default/ecu",
        "--kind",
        "bus-off",
        "--restart-ms",
        "300",
    ]);
    println!("{out}");
    let errors = dumped(t, &ecu).await;
    let log = t.node.cri.logs(&ecu.spec, "app").await.expect("logs");
    let decoded: Vec<&str> = log.lines().filter(|l| l.starts_with("E ")).collect();
    println!("candump -e in ecu:\n{}", decoded.join("\n"));
    // candump -e marks each error frame; the ids are the driver's classes in order.
    let marked: Vec<&str> = decoded
        .iter()
        .filter(|l| l.contains("can0") && l.contains("ERRORFRAME"))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(
        marked,
        ["20000204", "20000204", "20000240", "20000300", "20000204"],
        "candump -e: {decoded:?}"
    );
    let described: Vec<String> = errors
        .iter()
        .map(|f| format!("{:08X}#{:02X?}", f.id, f.data))
        .collect();
    println!("ecu's error frames: {described:?}");
    let class: Vec<u32> = errors.iter().map(|f| f.id & 0x1FFF_FFFF & !0x200).collect();
    assert_eq!(class, [0x4, 0x4, 0x40, 0x100, 0x4], "{described:?}");
    assert!(
        errors.iter().all(|f| f.id & 0x2000_0000 != 0),
        "error frames"
    );
    assert_eq!(
        errors.iter().map(|f| f.data[1]).collect::<Vec<_>>(),
        [0x08, 0x20, 0x00, 0x00, 0x40],
        "warning, passive, bus-off, restarted, active"
    );
    assert!(
        errors[3].at - errors[2].at >= 0.29,
        "restarted after restart-ms: {described:?}"
    );

    // `cut` is disconnected for 2 s: a frame sent meanwhile by `peer`'s neighbour reaches peer
    // only, `cut`'s own frame reaches nobody; after the window both reach everyone.
    let sender_pod = t.run_pod_ok(&sender("talker", WIRE)).await;
    fault(&[
        "inject",
        "--bus",
        "wire",
        "--pod",
        "default/cut",
        "--kind",
        "disconnect",
        "--duration-ms",
        "2000",
    ]);
    let injected_at = std::time::Instant::now();
    exec_ok(t, &sender_pod, &["cansend", "can0", "111#01"]).await;
    exec_ok(t, &cut, &["cansend", "can0", "222#02"]).await;
    assert!(
        injected_at.elapsed() < Duration::from_millis(1900),
        "the frames were sent within the disconnect window"
    );
    tokio::time::sleep(
        Duration::from_millis(2000).saturating_sub(injected_at.elapsed())
            + Duration::from_millis(300),
    )
    .await;
    exec_ok(t, &sender_pod, &["cansend", "can0", "333#03"]).await;
    exec_ok(t, &cut, &["cansend", "can0", "444#04"]).await;
    let peer_got: Vec<u32> = dumped(t, &peer).await.iter().map(|f| f.id).collect();
    let cut_got: Vec<u32> = dumped(t, &cut).await.iter().map(|f| f.id).collect();
    println!("peer received {peer_got:x?}, cut received {cut_got:x?}");
    assert_eq!(
        peer_got,
        [0x111, 0x333, 0x444],
        "peer misses only cut's frame from the window"
    );
    // cut's candump shows its own frames too (local echo): 222 and 444 are its own, 111 missed.
    assert_eq!(cut_got, [0x222, 0x333], "cut heard nothing in the window");

    let count = |kind: &str, pod: &str, what: &str| {
        metric(
            t,
            &format!(
                "vcan_plugin_bus_{what}{{bus=\"wire\",kind=\"{kind}\",namespace=\"default\",pod=\"{pod}\"}}"
            ),
        )
    };
    eventually("faults are counted", Duration::from_secs(10), || {
        let seen = (
            count("bus_off", "ecu", "faults_injected_total"),
            count("bus_off", "ecu", "fault_frames_total"),
            count("disconnect", "cut", "faults_injected_total"),
            count("disconnect", "cut", "fault_frames_total"),
            count("disconnect", "peer", "faults_injected_total"),
        );
        if seen == (1.0, 5.0, 1.0, 2.0, 0.0) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    let listing = fault(&["list"]);
    println!("{listing}");
    for pod in [&ecu, &peer, &cut, &sender_pod] {
        t.node.delete_pod(pod).await.expect("delete");
    }
}
