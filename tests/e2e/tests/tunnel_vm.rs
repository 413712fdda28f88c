//! Buses that span nodes, in the CAN test-bed VM: two nodes that share no CAN state — each with
//! its own plugin instance (in its own network namespace and address), kubelet stand-in,
//! device-plugin directory, state directory, bpffs directory and bus namespace — joined by a
//! bridge whose link to node B carries `tc netem` delay (and later loss), plus the real
//! cannelloni on a vcan in a third namespace as an external peer. The plugins find each other
//! through a real DNS server (dnsmasq, the guest's resolver for the test) answering the peer
//! service's name with both nodes' addresses. One containerd runs the pods of both nodes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vcan_e2e::PodSpec;
use vcan_e2e::cluster::{
    ClusterBus, ClusterNode, Host, NODE_A, NODE_B, Network, RIG, RIG2, member, pod_netns, sh,
    wait_listening,
};
use vcan_e2e::containerd::{Containerd, ContainerdOptions};
use vcan_e2e::node::{Node, StartedPod};
use vcan_test_support::{require_testbed, run_ok};

const EXIT_TIMEOUT: Duration = Duration::from_secs(180);
const EXEC_TIMEOUT: Duration = Duration::from_secs(90);
const DUMP_TIMEOUT: &str = "150";

/// The bus of both nodes, with two rigs as external peers: the first names the instance it
/// sends to (`via`), the second is served by the instance it first sends to.
fn bus() -> ClusterBus {
    ClusterBus::write(
        "x",
        4,
        r#"{"buses": [{"name": "x", "fd": true, "members": 4, "interface": "can0",
                       "span": "cluster", "port": 20000,
                       "peers": [{"address": "10.99.0.3:20000", "via": "10.99.0.1"},
                                 "10.99.0.4:20000"]}]}"#,
    )
}

fn listener(bus: &ClusterBus, name: &str, frames: usize) -> PodSpec {
    member(
        bus,
        name,
        &format!("timeout {DUMP_TIMEOUT} candump -L -n {frames} can0; rc=$?; sleep 3; exit $rc"),
    )
}

async fn send(node: &Node, pod: &StartedPod, frame: &str) {
    node.cansend(pod, "can0", frame, EXEC_TIMEOUT).await;
}

async fn dumped(node: &Node, pod: &StartedPod) -> Vec<String> {
    node.dumped(pod, EXIT_TIMEOUT).await
}

/// A bench rig: the real cannelloni on vcan0 in its own namespace, configured the way its users
/// configure it — one remote (a node's address), its default peer check (packets from any other
/// address are dropped), the default ports.
struct Rig {
    host: Host,
    cannelloni: Child,
}

impl Rig {
    fn start(host: Host, remote: &str) -> Self {
        let binary =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/cannelloni/cannelloni");
        assert!(
            binary.is_file(),
            "{} is missing: `cargo xtask vm-test` builds it (needs cmake and g++)",
            binary.display()
        );
        sh(&format!(
            "modprobe vcan; ip -n {ns} link add vcan0 type vcan; ip -n {ns} link set vcan0 up",
            ns = host.ns
        ));
        let cannelloni = Command::new("ip")
            .args(["netns", "exec", host.ns])
            .arg(&binary)
            .args([
                "-4", "-I", "vcan0", "-R", remote, "-r", "20000", "-l", "20000",
            ])
            .args(["-t", "1000"])
            .env(
                "LD_LIBRARY_PATH",
                binary.parent().expect("binary's directory"),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannelloni starts");
        Rig { host, cannelloni }
    }

    /// A candump of the rig's vcan0 waiting for `frames` frames.
    fn dump(&self, frames: usize) -> Child {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.host.ns,
                "timeout",
                DUMP_TIMEOUT,
                "candump",
                "-L",
            ])
            .args(["-n", &frames.to_string(), "vcan0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("candump");
        wait_listening(&format!("--net=/run/netns/{}", self.host.ns), "vcan0");
        child
    }

    fn send(&self, frame: &str) {
        run_ok(
            "ip",
            &["netns", "exec", self.host.ns, "cansend", "vcan0", frame],
        );
    }

    fn frames(&self, dump: Child) -> Vec<String> {
        let out = dump.wait_with_output().expect("candump ends");
        let frames: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest.to_string()))
            .collect();
        assert!(
            out.status.success(),
            "rig {} missed frames; got {frames:?}",
            self.host.ns
        );
        frames
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.cannelloni.kill();
        let _ = self.cannelloni.wait();
    }
}

/// How the frames look in candump -L on the pods' `can0` and the rigs' `vcan0`. The kernel adds
/// CANFD_FDF (4) to the flags of an FD frame it passes on. The second rig speaks first: the
/// node it sends to serves it from then on.
const SENT: [(&str, &str); 10] = [
    ("rig2", "1A0#D1"),
    ("a1", "101#A1"),
    ("a2", "10000102#A2A2"),
    ("b1", "103##1.00112233445566778899AABB"),
    ("b2", "104#R"),
    ("rig", "105#C1C2C3C4C5C6C7C8"),
    ("rig", "1ABCDEF0#C3"),
    ("rig2", "1A1#D2D2"),
    ("rig", "106#R3"),
    ("rig", "107##3.0102030405060708090A0B0C"),
];

fn seen(frame: &str, ifname: &str) -> String {
    // candump prints the FD flags with FDF set: 1 (BRS) → 5, 3 (BRS+ESI) → 7.
    let shown = match frame.split_once("##") {
        Some((id, rest)) => {
            let flags = u8::from_str_radix(&rest[..1], 16).expect("flags") | 4;
            format!("{id}##{flags:X}{}", rest[1..].replace('.', ""))
        }
        None => frame.to_string(),
    };
    format!("{ifname} {shown}")
}

/// Frames each receiver has had so far, as the plugins count them: the four members' received
/// frames (eBPF counters) and the frames node A sent to rig 1 and node B to rig 2.
fn received(a: &ClusterNode, b: &ClusterNode) -> [f64; 6] {
    let rx = |node: &ClusterNode, pod: &str| {
        node.metric_sum(
            "vcan_plugin_can_frames_total",
            &[&format!("pod=\"{pod}\""), "direction=\"rx\""],
        )
        .unwrap_or(-1.0)
    };
    let to = |node: &ClusterNode, peer: &str| {
        node.metric_sum(
            "vcan_plugin_tunnel_frames_total",
            &["direction=\"tx\"", &format!("peer=\"{peer}\"")],
        )
        .unwrap_or(-1.0)
    };
    [
        rx(a, "a1"),
        rx(a, "a2"),
        rx(b, "b1"),
        rx(b, "b2"),
        to(a, "10.99.0.3:20000"),
        to(b, "10.99.0.4:20000"),
    ]
}

/// Waits until a frame sent by `sender` after `before` was taken has reached every other
/// receiver, so that the next sender's frame cannot overtake it anywhere.
async fn wait_delivered(a: &ClusterNode, b: &ClusterNode, sender: &str, before: [f64; 6]) {
    let names = ["a1", "a2", "b1", "b2", "rig", "rig2"];
    let started = Instant::now();
    loop {
        let now = received(a, b);
        let missing: Vec<&str> = names
            .iter()
            .zip(now.iter().zip(before))
            .filter(|(name, (n, b))| **name != sender && **n < b + 1.0)
            .map(|(name, _)| *name)
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{sender}'s frame never reached {missing:?}\nnode A:\n{}\nnode B:\n{}",
            a.tunnel_metrics(),
            b.tunnel_metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn a_bus_spans_two_nodes_and_two_cannelloni_rigs() {
    require_testbed();
    let network = Network::start("delay 1ms");
    let bus = bus();
    let containerd = Containerd::start(ContainerdOptions::default())
        .await
        .expect("containerd");
    let a = ClusterNode::start("a", &NODE_A, &containerd, &bus).await;
    let mut b = ClusterNode::start("b", &NODE_B, &containerd, &bus).await;
    let rig = Rig::start(RIG, NODE_A.addr);
    let rig2 = Rig::start(RIG2, NODE_B.addr);
    // Each node's peers: the other node and both rigs.
    a.wait_peers(3.0).await;
    b.wait_peers(3.0).await;
    // The tunnels' I/O ends live in namespaces of the plugins' own, not in the nodes'.
    for host in [NODE_A, NODE_B] {
        let links = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-n", host.ns, "-o", "link"])
                .output()
                .expect("ip link")
                .stdout,
        )
        .to_string();
        assert!(
            !links.contains("vcant"),
            "a tunnel end in node {}'s namespace:\n{links}",
            host.ns
        );
    }

    let total = SENT.len();
    let a1 = a.run(&listener(&bus, "a1", total + 1)).await;
    let a2 = a.run(&listener(&bus, "a2", total)).await;
    let b1 = b.run(&listener(&bus, "b1", total + 1)).await;
    let b2 = b.run(&listener(&bus, "b2", total + 1)).await;
    for (node, pod) in [
        (&a.node, &a1),
        (&a.node, &a2),
        (&b.node, &b1),
        (&b.node, &b2),
    ] {
        let ns = pod_netns(node, pod).await;
        wait_listening(&format!("--net={ns}"), "can0");
    }
    let rig_dump = rig.dump(total + 1);
    let rig2_dump = rig2.dump(total + 1);

    // Every frame, from a member on either node or from a rig, reaches everyone else once, in
    // order (and the sender's own candump sees its echo).
    for (sender, frame) in SENT {
        let before = received(&a, &b);
        match sender {
            "a1" => send(&a.node, &a1, frame).await,
            "a2" => send(&a.node, &a2, frame).await,
            "b1" => send(&b.node, &b1, frame).await,
            "b2" => send(&b.node, &b2, frame).await,
            "rig" => rig.send(frame),
            _ => rig2.send(frame),
        }
        wait_delivered(&a, &b, sender, before).await;
    }
    let expected: Vec<String> = SENT.iter().map(|(_, f)| seen(f, "can0")).collect();
    let got = dumped(&a.node, &a2).await;
    assert_eq!(
        got,
        expected,
        "a2\nnode A:\n{}\nnode B:\n{}",
        a.tunnel_metrics(),
        b.tunnel_metrics()
    );

    // A member leaves node A and node B's plugin restarts: the others carry on once B's new
    // process has adopted its members and connected its tunnel again.
    a.node.delete_pod(&a2).await.expect("delete a2");
    let connected = b.log_count("tunnel connected to the bus");
    b.plugin.restart().expect("plugin B restarts");
    b.node
        .kubelet
        .wait_for_resource(&bus.resource(), 4, Duration::from_secs(60))
        .await
        .expect("B registered again");
    b.wait_peers(3.0).await;
    b.wait_log("tunnel connected to the bus", connected + 1)
        .await;
    wait_served(&b, 2.0).await;
    spoofed_packets_inject_nothing(&a).await;
    send(&b.node, &b2, "108#B2").await;
    let mut expected_all = expected.clone();
    expected_all.push(seen("108#B2", "can0"));
    assert_eq!(dumped(&a.node, &a1).await, expected_all, "a1");
    assert_eq!(dumped(&b.node, &b1).await, expected_all, "b1");
    assert_eq!(dumped(&b.node, &b2).await, expected_all, "b2");
    let rig_expected: Vec<String> = expected_all
        .iter()
        .map(|f| f.replacen("can0", "vcan0", 1))
        .collect();
    assert_eq!(rig.frames(rig_dump), rig_expected, "rig 1");
    assert_eq!(rig2.frames(rig2_dump), rig_expected, "rig 2");
    for node in [&a, &b] {
        assert_eq!(
            node.metric(
                "vcan_plugin_tunnel_packets_dropped_total{bus=\"x\",reason=\"unknown_peer\"}"
            ),
            Some(0.0),
            "nothing came from unknown peers"
        );
    }

    loss_is_counted_from_sequence_gaps(&network, &bus, &a, &b).await;
    duplicates_are_delivered_once(&network, &bus, &a, &b).await;
    tunnel_panels_draw(&a, &b).await;
    drop(rig);
    drop(rig2);
    bad_packets_are_dropped_and_counted(&a).await;
    for pod in [&a1] {
        a.node.delete_pod(pod).await.expect("delete");
    }
    for pod in [&b1, &b2] {
        b.node.delete_pod(pod).await.expect("delete");
    }
    a_resolver_down_for_a_minute_changes_nothing(&network, &bus, &a, &b).await;
    a_replaced_plugin_with_a_new_address_carries_frames_at_once(&network, &bus, &a, &mut b).await;
}

/// Waits until `node`'s plugin serves `n` members of the bus (adopted after a restart).
async fn wait_served(node: &ClusterNode, n: f64) {
    let series = "vcan_plugin_pods_served{resource=\"socketcan.io/bus-x\"}";
    let started = Instant::now();
    while node.metric(series) != Some(n) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} never served {n} members:\n{}",
            node.metrics,
            node.plugin.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const TO_B: &str = "{bus=\"x\",direction=\"tx\",kind=\"instance\",peer=\"10.99.0.2:20000\"}";
const FROM_A: &str = "{bus=\"x\",direction=\"rx\",kind=\"instance\",peer=\"10.99.0.1:20000\"}";
const A_AT_B: &str = "{bus=\"x\",kind=\"instance\",peer=\"10.99.0.1:20000\"}";

/// Packets A sent to B that B neither received nor counted lost (those sent while B's plugin
/// was restarting: its new tracker starts from the first packet it sees), and B's count of A's
/// lost packets, read while no heartbeat crossed: A's count is read before and after B's and
/// must not have moved. A heartbeat A counted just before the read may still be on its way
/// into B's counters, which would make one packet look unaccounted, so two such reads in a row
/// must agree.
async fn unaccounted(a: &ClusterNode, b: &ClusterNode) -> (f64, f64) {
    let mut previous = None;
    for _ in 0..50 {
        let reading = held_still_reading(a, b).await;
        if previous == Some(reading) {
            let (sent, received, lost) = reading;
            return (sent - received - lost, lost);
        }
        previous = Some(reading);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    panic!("A's and B's packet counts never agreed in two reads in a row");
}

/// A's packets sent to B, B's received from A and B's count of A's lost packets, read while
/// A's count held still.
async fn held_still_reading(a: &ClusterNode, b: &ClusterNode) -> (f64, f64, f64) {
    for _ in 0..50 {
        let sent_before = a.metric(&format!("vcan_plugin_tunnel_packets_total{TO_B}"));
        let received = b.metric(&format!("vcan_plugin_tunnel_packets_total{FROM_A}"));
        let lost = b.metric(&format!("vcan_plugin_tunnel_packets_lost_total{A_AT_B}"));
        let sent_after = a.metric(&format!("vcan_plugin_tunnel_packets_total{TO_B}"));
        let (Some(s1), Some(r), Some(l), Some(s2)) = (sent_before, received, lost, sent_after)
        else {
            panic!(
                "missing tunnel series:\nA:\n{}\nB:\n{}",
                a.tunnel_metrics(),
                b.tunnel_metrics()
            );
        };
        eprintln!("A sent {s1}..{s2}, B received {r} and counted {l} lost");
        if s1 == s2 {
            return (s1, r, l);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    panic!("A's packet count never held still for one read of B's");
}

/// With 1 % loss towards node B, B's count of A's lost packets is exactly what A sent and B did
/// not receive (no packet goes unaccounted), and nothing crashes.
async fn loss_is_counted_from_sequence_gaps(
    network: &Network,
    bus: &ClusterBus,
    a: &ClusterNode,
    b: &ClusterNode,
) {
    let (before, lost_before) = unaccounted(a, b).await;
    network.netem("delay 1ms loss 1%");
    let sender = a
        .run(&member(
            bus,
            "sender",
            "cangen can0 -g 2 -n 1500 -I 222 -L 8 -D i; sleep 3",
        ))
        .await;
    let code = a
        .node
        .cri
        .wait_exit(sender.container("app"), EXIT_TIMEOUT)
        .await
        .expect("cangen ends");
    assert_eq!(code, 0);
    network.netem("delay 1ms");
    // A loss is seen when the next packet arrives, at most a heartbeat later.
    let mut last = (0.0, 0.0);
    for _ in 0..10 {
        last = unaccounted(a, b).await;
        if last.0 == before && last.1 > lost_before {
            assert_eq!(
                b.metric(&format!(
                    "vcan_plugin_tunnel_packets_reordered_total{A_AT_B}"
                )),
                Some(0.0)
            );
            eprintln!(
                "netem loss 1 %: B counted {} of A's packets lost, all accounted for",
                last.1 - lost_before
            );
            a.node.delete_pod(&sender).await.expect("delete");
            return;
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    panic!(
        "loss accounting: before the loss {before} of A's packets were unaccounted at B and \
         {lost_before} counted lost; after: {} unaccounted, {} lost",
        last.0, last.1
    );
}

/// Every query of the dashboard's "Buses across nodes" row draws something, with a real
/// Prometheus scraping both plugins as a cluster's would (metrics_vm checks the other rows on a
/// single node, which has no tunnel to draw). The bus carried traffic and both instances send
/// heartbeats every second, so the frame and packet counters have series that keep growing; the
/// drop counters are exported from zero for every reason, so their rate of 0 draws too.
async fn tunnel_panels_draw(a: &ClusterNode, b: &ClusterNode) {
    use std::collections::BTreeSet;
    use vcan_e2e::prometheus::{
        JOB, Prometheus, RowSelect, dashboard_queries, finite_values, unix_now,
    };

    const ROW: &str = "Buses across nodes";
    /// How long Prometheus may take to show what is expected under TCG: a rate needs two
    /// scrapes within the dashboard's 10 s `$__rate_interval`.
    const SETTLE: Duration = Duration::from_secs(60);

    /// Polls `check` every 250 ms until it succeeds; panics with its last complaint after
    /// [`SETTLE`].
    async fn poll<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
        let started = Instant::now();
        loop {
            match check() {
                Ok(v) => return v,
                Err(why) if started.elapsed() >= SETTLE => {
                    panic!("{what}: still not so after {SETTLE:?}:\n{why}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    let panels = dashboard_queries(RowSelect::Only(&[ROW])).expect("the row's queries");
    let started = Instant::now();
    // Prometheus runs in the guest's own namespace, which reaches both plugins' metrics
    // addresses over the bridge; its port is next to metrics_vm's (127.0.0.1:9790).
    let mut prometheus = Prometheus::start(
        "127.0.0.1:9791",
        &[
            (a.metrics.as_str(), "node-a"),
            (b.metrics.as_str(), "node-b"),
        ],
    )
    .expect("prometheus starts");
    prometheus
        .wait_ready(Duration::from_secs(180))
        .await
        .expect("prometheus gets ready");
    poll("prometheus scrapes both plugins", || {
        let up = prometheus.query(&format!("up{{job=\"{JOB}\"}} == 1"))?;
        let nodes: BTreeSet<&str> = up
            .iter()
            .filter_map(|s| s["metric"]["node"].as_str())
            .collect();
        if nodes == BTreeSet::from(["node-a", "node-b"]) && finite_values(&up).len() == 2 {
            Ok(())
        } else {
            Err(format!("up: {up:?}"))
        }
    })
    .await;
    let first_scrape = unix_now() - 2.0;
    println!(
        "prometheus: scraping both plugins after {:?}",
        started.elapsed()
    );

    let mut report = Vec::new();
    for (title, expr) in &panels.queries {
        let values = poll(&format!("panel {title:?}: {expr}"), || {
            prometheus.panel_values(expr, first_scrape)
        })
        .await;
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        report.push(format!("  {title}: {} points, max {max:.3}", values.len()));
    }
    println!(
        "dashboard: all {} queries of row {ROW:?} return data:\n{}",
        panels.queries.len(),
        report.join("\n")
    );
}

/// Packets that are not cannelloni's, or not from a peer, are dropped and counted by reason, and
/// the tunnel carries on. Sent from the rig's namespace once cannelloni is gone, so that the
/// malformed ones come from the peer address node A knows (10.99.0.3:20000).
async fn bad_packets_are_dropped_and_counted(a: &ClusterNode) {
    // Sockets keep the namespace they were made in: bound inside the rig's, used from here.
    let send = |port: u16, hex: &str| {
        let rig = vcan_plugin::kernel::netns::Netns::Path("/run/netns/vnode-c".into());
        let socket = vcan_plugin::kernel::netns::run(&rig, move || {
            std::net::UdpSocket::bind(("10.99.0.3", port))
        })
        .expect("enter the rig's namespace")
        .expect("bind in the rig's namespace");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        socket.send_to(&bytes, "10.99.0.1:20000").expect("send");
    };
    let dropped = |reason: &str| {
        a.metric(&format!(
            "vcan_plugin_tunnel_packets_dropped_total{{bus=\"x\",reason=\"{reason}\"}}"
        ))
        .unwrap_or(-1.0)
    };
    let before: Vec<f64> = [
        "unknown_peer",
        "truncated",
        "version",
        "frame_count_overrun",
    ]
    .iter()
    .map(|r| dropped(r))
    .collect();
    // A valid packet (one frame 123#AA) from an address that is no peer.
    send(20001, "02000000010000012301AA");
    // From the peer's address: cut short, wrong version, a count the bytes cannot hold.
    send(20000, "020000");
    send(20000, "01000000010000012301AA");
    send(20000, "02000000ff00000123");
    let started = Instant::now();
    loop {
        let after: Vec<f64> = [
            "unknown_peer",
            "truncated",
            "version",
            "frame_count_overrun",
        ]
        .iter()
        .map(|r| dropped(r))
        .collect();
        let grew: Vec<f64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
        if grew == [1.0, 1.0, 1.0, 1.0] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "drops by reason grew by {grew:?}, expected one each:\n{}",
            a.tunnel_metrics()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        a.metric("vcan_plugin_tunnel_peers{bus=\"x\"}").is_some(),
        "the plugin is alive"
    );
}

/// The drops of node `node` for `reason`.
fn dropped(node: &ClusterNode, reason: &str) -> f64 {
    node.metric(&format!(
        "vcan_plugin_tunnel_packets_dropped_total{{bus=\"x\",reason=\"{reason}\"}}"
    ))
    .unwrap_or(-1.0)
}

/// Runs `scripts/udp_spoof.py` with `args`; returns what it printed.
fn spoof(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/udp_spoof.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "udp_spoof.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Packets that claim to come from node B, sent with a raw socket as any pod with NET_RAW
/// could: a forged cannelloni packet without the instances' tag, one with a made-up tag, and a
/// real packet of B's captured on the wire and sent again. None reaches a member (a1's candump
/// would show it before the next frame); each is dropped and counted.
async fn spoofed_packets_inject_nothing(a: &ClusterNode) {
    let (unauthenticated, duplicate) = (dropped(a, "unauthenticated"), dropped(a, "duplicate"));
    // One frame 666#DEADBEEF; then the same with 32 bytes where the trailer would be.
    let forged = "02000000010000066604DEADBEEF";
    let from_b = format!("{}:20000", NODE_B.addr);
    let to_a = format!("{}:20000", NODE_A.addr);
    spoof(&["forge", &from_b, &to_a, forged]);
    spoof(&[
        "forge",
        &from_b,
        &to_a,
        &format!("{forged}{}", "5A".repeat(32)),
    ]);
    let len = spoof(&["replay", NODE_A.veth, NODE_B.addr, &to_a]);
    eprintln!("replayed one of B's packets ({len} bytes of payload)");
    let started = Instant::now();
    loop {
        let grew = (
            dropped(a, "unauthenticated") - unauthenticated,
            dropped(a, "duplicate") - duplicate,
        );
        if grew == (2.0, 1.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "spoofed packets: unauthenticated and duplicate drops grew by {grew:?}, expected \
             (2, 1):\n{}",
            a.tunnel_metrics()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With the network duplicating every packet towards node B, B's members get each of A's
/// frames once, and B counts the copies it dropped.
async fn duplicates_are_delivered_once(
    network: &Network,
    bus: &ClusterBus,
    a: &ClusterNode,
    b: &ClusterNode,
) {
    const FRAMES: usize = 50;
    let listener_pod = b.run(&listener(bus, "dup-rx", FRAMES)).await;
    let ns = pod_netns(&b.node, &listener_pod).await;
    wait_listening(&format!("--net={ns}"), "can0");
    let copies = dropped(b, "duplicate");
    network.netem("delay 1ms duplicate 100%");
    let sender = a
        .run(&member(
            bus,
            "dup-tx",
            &format!("cangen can0 -g 5 -n {FRAMES} -I 333 -L 2 -D i; sleep 3"),
        ))
        .await;
    let got = dumped(&b.node, &listener_pod).await;
    network.netem("delay 1ms");
    let expected: Vec<String> = (0..FRAMES)
        .map(|i| format!("can0 333#{:02X}{:02X}", i & 0xff, 0))
        .collect();
    assert_eq!(got, expected, "each frame once, in order");
    let dropped_copies = dropped(b, "duplicate") - copies;
    assert!(
        dropped_copies >= 1.0,
        "the network's copies were not dropped as duplicates:\n{}",
        b.tunnel_metrics()
    );
    eprintln!("netem duplicate 100 %: {dropped_copies} copies dropped at B, {FRAMES} frames once");
    a.node.delete_pod(&sender).await.expect("delete");
    b.node.delete_pod(&listener_pod).await.expect("delete");
}

/// The cluster's DNS stops answering for a minute (queries hang, as with CoreDNS down): the
/// known peers stay, and heartbeats and frames keep flowing all the while — the tunnel never
/// waits for the resolver.
async fn a_resolver_down_for_a_minute_changes_nothing(
    network: &Network,
    bus: &ClusterBus,
    a: &ClusterNode,
    b: &ClusterNode,
) {
    const OUTAGE: Duration = Duration::from_secs(60);
    let listener_pod = b.run(&listener(bus, "dns-rx", 6)).await;
    let ns = pod_netns(&b.node, &listener_pod).await;
    wait_listening(&format!("--net={ns}"), "can0");
    let sender = a.run(&member(bus, "dns-tx", "sleep 100000")).await;
    let timeouts = a.log_count("peer service resolution timed out");
    let peers = (
        a.metric("vcan_plugin_tunnel_peers{bus=\"x\"}"),
        b.metric("vcan_plugin_tunnel_peers{bus=\"x\"}"),
    );
    network.pause_dns();
    let started = Instant::now();
    let mut sent = 0;
    let mut stalest = 0.0f64;
    while started.elapsed() < OUTAGE {
        // B's view of A: A's heartbeats arrive every second unless A's tunnel stalls.
        let last_seen = b
            .metric(&format!(
                "vcan_plugin_tunnel_peer_last_seen_timestamp_seconds{A_AT_B}"
            ))
            .expect("A is still B's peer");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        stalest = stalest.max(now - last_seen);
        assert_eq!(
            (
                a.metric("vcan_plugin_tunnel_peers{bus=\"x\"}"),
                b.metric("vcan_plugin_tunnel_peers{bus=\"x\"}"),
            ),
            peers,
            "peers changed while the resolver was down"
        );
        if started.elapsed() >= OUTAGE / 6 * sent as u32 && sent < 6 {
            send(&a.node, &sender, &format!("1D{sent}#0{sent}")).await;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        a.log_count("peer service resolution timed out") > timeouts,
        "the resolver was not asked during the outage:\n{}",
        a.plugin.log()
    );
    network.resume_dns();
    let expected: Vec<String> = (0..6).map(|i| format!("can0 1D{i}#0{i}")).collect();
    assert_eq!(dumped(&b.node, &listener_pod).await, expected);
    // Heartbeats are a second apart; a tunnel that waited for the resolver would be silent for
    // as long as a lookup hangs (glibc: 5 s per attempt, 2 attempts), well beyond this bound.
    assert!(
        stalest < 6.0,
        "A's heartbeats stalled for {stalest:.1} s while the resolver was down"
    );
    eprintln!(
        "resolver down for {OUTAGE:?}: peers unchanged, {sent} frames crossed, longest silence \
         of A at B {stalest:.1} s"
    );
    a.node.delete_pod(&sender).await.expect("delete");
    b.node.delete_pod(&listener_pod).await.expect("delete");
}

/// A DaemonSet rollout replaces node B's plugin pod, and the new one comes up under a new
/// address while the cluster's DNS still lists the old one: the new instance's authenticated
/// packets make it node A's peer at once, so frames cross both ways before DNS catches up; once
/// it does, the old address is dropped.
async fn a_replaced_plugin_with_a_new_address_carries_frames_at_once(
    network: &Network,
    bus: &ClusterBus,
    a: &ClusterNode,
    b: &mut ClusterNode,
) {
    const NEW_B: &str = "10.99.0.5";
    let a_rx = a.run(&listener(bus, "ip-a", 1)).await;
    let ns = pod_netns(&a.node, &a_rx).await;
    wait_listening(&format!("--net={ns}"), "can0");
    let started = Instant::now();
    let connected = b.log_count("tunnel connected to the bus");
    b.replace_at(&NODE_B, NEW_B).await;
    b.wait_log("tunnel connected to the bus", connected + 1)
        .await;
    // B's listener hears its neighbour's frame, then A's.
    let b_rx = b.run(&listener(bus, "ip-b", 2)).await;
    let ns = pod_netns(&b.node, &b_rx).await;
    wait_listening(&format!("--net={ns}"), "can0");
    let b_tx = b.run(&member(bus, "ip-tx", "sleep 100000")).await;
    send(&b.node, &b_tx, "1E0#E0").await;
    assert_eq!(dumped(&a.node, &a_rx).await, ["can0 1E0#E0"], "B to A");
    let a_tx = a.run(&member(bus, "ip-a-tx", "sleep 100000")).await;
    send(&a.node, &a_tx, "1E1#E1").await;
    assert_eq!(
        dumped(&b.node, &b_rx).await,
        ["can0 1E0#E0", "can0 1E1#E1"],
        "A to B"
    );
    eprintln!(
        "plugin B replaced under a new address: frames both ways {:?} after its restart began, \
         DNS still listing the old address",
        started.elapsed()
    );
    assert!(
        a.metric(&format!(
            "vcan_plugin_tunnel_peer_last_seen_timestamp_seconds{{bus=\"x\",kind=\"instance\",peer=\"{NEW_B}:20000\"}}"
        ))
        .is_some(),
        "A knows B's new address:\n{}",
        a.tunnel_metrics()
    );
    network.set_service(&[NODE_A.addr, NEW_B]);
    let old = format!("peer=\"{}:20000\"", NODE_B.addr);
    let waited = Instant::now();
    while a.tunnel_metrics().contains(&old) {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "A kept B's old address:\n{}",
            a.tunnel_metrics()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for pod in [&a_rx, &a_tx] {
        a.node.delete_pod(pod).await.expect("delete");
    }
    for pod in [&b_rx, &b_tx] {
        b.node.delete_pod(pod).await.expect("delete");
    }
}
