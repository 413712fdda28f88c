//! Shared CAN buses between pods on a real node: containerd's CRI, the kubelet stand-in and the
//! vcan-plugin daemon with a bus configuration, in the CAN test-bed VM. One node serves every
//! scenario in order (containerd is one per guest).
//!
//! Listeners are `candump -n N` in the member pods themselves; each scenario ends with a marker
//! frame sent after the frames under test, so a member's first N frames are exactly what it must
//! receive, in order: a frame arriving twice, or one that must not arrive, would push the marker
//! out of them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vcan_e2e::env::TestNode;
use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::node::StartedPod;
use vcan_e2e::wait::eventually;
use vcan_e2e::{ContainerSpec, PodSpec};
use vcan_test_support::{parse_cangw_listing, require_testbed, wait_for_can_listener};

const STATE_DIR: &str = "/run/vcan-node/state";
const BUS_A: &str = "socketcan.io/bus-a";
const BUS_B: &str = "socketcan.io/bus-b";
const BUS_C: &str = "socketcan.io/bus-c";
const BIND_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(150);
/// A CRI exec can take tens of seconds under TCG while pods start alongside.
const EXEC_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a listener waits for its frames before failing the test (seconds).
const DUMP_TIMEOUT: &str = "120";

/// A classic frame and an FD frame (BRS), as sent and as candump -L logs them on `can0`. The kernel
/// adds CANFD_FDF (4) to the flags of an FD frame it passes on.
const CLASSIC: &str = "123#DEADBEEF";
const CLASSIC_SEEN: &str = "can0 123#DEADBEEF";
const FD: &str = "1F334455##1.00112233445566778899AABBCCDDEEFF";
const FD_SEEN: &str = "can0 1F334455##500112233445566778899AABBCCDDEEFF";

fn bus_config() -> PathBuf {
    let path = PathBuf::from("/run/vcan-node/buses.json");
    std::fs::create_dir_all("/run/vcan-node").expect("node dir");
    std::fs::write(
        &path,
        r#"{"buses": [
            {"name": "a", "fd": true},
            {"name": "b", "fd": true, "members": 4},
            {"name": "c", "fd": false, "members": 4, "interface": "can0"}
        ]}"#,
    )
    .expect("write bus config");
    path
}

/// A member pod whose container dumps the first `frames` frames of `ifname` and exits with
/// candump's status. It lingers a little after candump so that a `cansend` exec'd into the same
/// container, whose echo may be the last frame awaited, is not killed with the container.
fn listener(name: &str, resource: &str, frames: usize, ifname: &str) -> PodSpec {
    let script =
        format!("timeout {DUMP_TIMEOUT} candump -L -n {frames} {ifname}; rc=$?; sleep 3; exit $rc");
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sh", "-c", &script]);
    if resource == vcan_e2e::env::RESOURCE {
        c.vcan = 1;
    } else {
        c.resources = vec![(resource.to_string(), 1)];
    }
    let mut p = PodSpec::new("default", name);
    p.containers = vec![c];
    p
}

async fn wait_bound(t: &TestNode, pod: &StartedPod, ifname: &str) {
    let ns = t.netns_name(pod).await;
    tokio::task::spawn_blocking({
        let ifname = ifname.to_string();
        move || wait_for_can_listener(&ns, &ifname, BIND_TIMEOUT)
    })
    .await
    .expect("wait for listener");
}

/// Runs `cansend IFNAME FRAME` in the pod; returns (exit code, stderr).
async fn send(t: &TestNode, pod: &StartedPod, ifname: &str, frame: &str) -> (i32, String) {
    let out = t
        .node
        .cri
        .exec(
            pod.container("app"),
            &["cansend", ifname, frame],
            EXEC_TIMEOUT,
        )
        .await
        .unwrap_or_else(|e| panic!("exec in {}: {e:#}", pod.spec.name));
    (out.exit_code, format!("{}{}", out.stdout, out.stderr))
}

async fn send_ok(t: &TestNode, pod: &StartedPod, frame: &str) {
    let (code, output) = send(t, pod, "can0", frame).await;
    if code != 0 {
        let status = t.node.cri.container_status(pod.container("app")).await;
        let log = t.node.cri.logs(&pod.spec, "app").await;
        panic!(
            "cansend {frame} in {} exited {code}: {output}\ncontainer: {status:?}\nlog: {log:?}",
            pod.spec.name
        );
    }
}

/// The frames a listener pod dumped (candump -L without timestamps), once it has exited.
async fn dumped(t: &TestNode, pod: &StartedPod) -> Vec<String> {
    let code = t
        .node
        .cri
        .wait_exit(pod.container("app"), EXIT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", pod.spec.name));
    let log = t.node.cri.logs(&pod.spec, "app").await.expect("logs");
    let frames: Vec<String> = log
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest.to_string()))
        .collect();
    assert_eq!(
        code, 0,
        "{} did not receive all its frames; got {frames:?}",
        pod.spec.name
    );
    frames
}

/// The bus end of a member: `m` and its device number.
fn bus_end(pod: &StartedPod, resource: &str) -> String {
    let id = pod
        .allocation
        .containers
        .iter()
        .find(|c| c.resource == resource)
        .and_then(|c| c.ids.first())
        .expect("pod holds the bus");
    format!("m{}", id.rsplit_once('-').expect("device id").1)
}

fn bus_ns(bus: &str) -> PathBuf {
    Path::new(STATE_DIR).join("buses").join(bus)
}

fn in_bus_ns(bus: &str, program: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", bus_ns(bus).display()))
        .arg(program)
        .args(args)
        .output()
        .expect("nsenter runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The bus ends in the bus namespace, by name.
fn bus_ends(bus: &str) -> BTreeSet<String> {
    in_bus_ns(bus, "ip", &["-o", "link", "show", "type", "vxcan"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// A rule as (source, destination, sorted flags, filter).
type RuleText = (String, String, String, Option<String>);

/// `cangw -L` (can-utils) in the bus namespace, parsed. Lines look like
/// `cangw -A -s m0000 -d m0001 -X -i -f 123:C00007FF # 0 handled 0 dropped 0 deleted`.
fn cangw_rules(bus: &str) -> BTreeSet<RuleText> {
    let text = in_bus_ns(bus, "cangw", &["-L"]);
    let mut rules = BTreeSet::new();
    for r in parse_cangw_listing(&text) {
        let rule = (r.src, r.dst, r.flags, r.filter);
        assert!(
            rules.insert(rule.clone()),
            "duplicate rule {rule:?} in:\n{text}"
        );
    }
    rules
}

/// The full mesh the plugin must have made between `ends` (no filters).
fn mesh(ends: &[String], fd: bool) -> BTreeSet<RuleText> {
    let mut rules = BTreeSet::new();
    for s in ends {
        for d in ends.iter().filter(|d| *d != s) {
            rules.insert((s.clone(), d.clone(), "-i".to_string(), None));
            if fd {
                rules.insert((s.clone(), d.clone(), "-X -i".to_string(), None));
            }
        }
    }
    rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn pods_share_buses_that_deliver_each_frame_once_to_every_other_member() {
    require_testbed();
    let config = bus_config();
    let mut t = TestNode::start_with(
        4,
        "127.0.0.1:9725",
        vec![
            "--bus-config".into(),
            config.display().to_string(),
            "--state-dir".into(),
            STATE_DIR.into(),
        ],
        &[(BUS_A, 32), (BUS_B, 4), (BUS_C, 4)],
    )
    .await
    .expect("node starts");
    assert!(t.node.kubelet.prestart_required(BUS_A));

    three_on_a_one_on_b_and_a_private_pod(&t).await;
    a_classic_bus_refuses_fd_frames(&t).await;
    a_member_with_filters_receives_only_matching_ids(&t).await;
    a_plugin_restart_loses_no_frame_between_members(&mut t).await;
    thirty_two_members_all_receive_one_frame(&t).await;
}

/// A1, A2, A3 on bus A, B1 on bus B, P1 with a private vcan. A1's classic and FD frames reach A2
/// and A3 once each and nobody else; `cangw -L` lists exactly the plugin's mesh; deleting A3
/// removes its rules and pair, and the bus namespace goes away with the last member.
async fn three_on_a_one_on_b_and_a_private_pod(t: &TestNode) {
    const MARKER: &str = "7FF#A2";
    const MARKER_SEEN: &str = "can0 7FF#A2";
    let a: Vec<StartedPod> = futures::future::join_all(
        ["a1", "a2", "a3"]
            .map(|n| async move { t.run_pod_ok(&listener(n, BUS_A, 3, "can0")).await }),
    )
    .await;
    let b1 = t.run_pod_ok(&listener("b1", BUS_B, 1, "can0")).await;
    let p1 = t
        .run_pod_ok(&listener("p1", vcan_e2e::env::RESOURCE, 1, "vcan0"))
        .await;
    for pod in &a {
        wait_bound(t, pod, "can0").await;
    }
    wait_bound(t, &b1, "can0").await;
    wait_bound(t, &p1, "vcan0").await;

    send_ok(t, &a[0], CLASSIC).await;
    send_ok(t, &a[0], FD).await;
    send_ok(t, &a[1], MARKER).await;
    // B1's and P1's own frames (their local echo) are all they may see.
    send_ok(t, &b1, "0B1#B1").await;
    let (code, out) = send(t, &p1, "vcan0", "0C1#C1").await;
    assert_eq!(code, 0, "{out}");

    for pod in &a {
        assert_eq!(
            dumped(t, pod).await,
            [CLASSIC_SEEN, FD_SEEN, MARKER_SEEN],
            "{}",
            pod.spec.name
        );
    }
    assert_eq!(dumped(t, &b1).await, ["can0 0B1#B1"]);
    assert_eq!(dumped(t, &p1).await, ["vcan0 0C1#C1"]);
    println!("bus a: A1's classic and FD frames reached A2 and A3 once, B1 and P1 never");

    // Per bus: members and can-gw's counters (3 frames, each forwarded to 2 members); per member:
    // the eBPF counters of its interface.
    assert_eq!(
        t.plugin.metric("vcan_plugin_bus_members{bus=\"a\"}"),
        Some(3.0)
    );
    assert_eq!(
        t.plugin.metric("vcan_plugin_bus_members{bus=\"b\"}"),
        Some(1.0)
    );
    assert_eq!(
        t.plugin
            .metric("vcan_plugin_bus_frames_forwarded_total{bus=\"a\"}"),
        Some(6.0)
    );
    assert_eq!(
        t.plugin
            .metric("vcan_plugin_bus_frames_dropped_total{bus=\"a\"}"),
        Some(0.0)
    );
    for kind in ["classic", "fd_brs"] {
        assert_eq!(
            t.plugin.metric(&format!(
                "vcan_plugin_can_frames_total{{direction=\"tx\",kind=\"{kind}\",\
                     interface=\"can0\",namespace=\"default\",pod=\"a1\"}}"
            )),
            Some(1.0),
            "a1 {kind}"
        );
    }

    // The rules are exactly the plugin's full mesh, as can-utils reads them.
    let ends: Vec<String> = a.iter().map(|p| bus_end(p, BUS_A)).collect();
    assert_eq!(bus_ends("a"), ends.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(cangw_rules("a"), mesh(&ends, true));
    assert_eq!(cangw_rules("b"), BTreeSet::new());

    // Deleting a member removes its pair and rules; the others keep theirs.
    t.node.delete_pod(&a[2]).await.expect("delete a3");
    let rest = ends[..2].to_vec();
    eventually("a3 leaves bus a", Duration::from_secs(30), || {
        let (have_ends, have_rules) = (bus_ends("a"), cangw_rules("a"));
        if have_ends == rest.iter().cloned().collect() && have_rules == mesh(&rest, true) {
            Ok(())
        } else {
            Err(format!("ends {have_ends:?}, rules {have_rules:?}"))
        }
    })
    .await;
    println!("a3 deleted: its bus end and its rules are gone, 4 rules remain");
    eventually(
        "counts survive a3 leaving",
        Duration::from_secs(20),
        || match t
            .plugin
            .metric("vcan_plugin_bus_frames_forwarded_total{bus=\"a\"}")
        {
            Some(6.0) => match t.plugin.metric("vcan_plugin_bus_members{bus=\"a\"}") {
                Some(2.0) => Ok(()),
                other => Err(format!("members {other:?}")),
            },
            other => Err(format!("forwarded {other:?}")),
        },
    )
    .await;

    // The bus namespace goes away with its last member, and comes back with the next one.
    for pod in a.iter().take(2).chain([&b1, &p1]) {
        t.node.delete_pod(pod).await.expect("delete");
    }
    eventually(
        "bus namespaces go away with their last member",
        Duration::from_secs(30),
        || match ["a", "b"].into_iter().find(|b| bus_ns(b).exists()) {
            Some(b) => Err(format!("{} still exists", bus_ns(b).display())),
            None => Ok(()),
        },
    )
    .await;
    println!("bus namespaces removed with their last members");
}

/// On a classic-only bus the interfaces have MTU 16: the kernel refuses FD frames from the pod
/// (cansend reports it), while classic frames cross.
async fn a_classic_bus_refuses_fd_frames(t: &TestNode) {
    let c1 = t.run_pod_ok(&listener("c1", BUS_C, 1, "can0")).await;
    let c2 = t.run_pod_ok(&listener("c2", BUS_C, 1, "can0")).await;
    wait_bound(t, &c1, "can0").await;
    wait_bound(t, &c2, "can0").await;
    let mtu = t
        .node
        .cri
        .exec(
            c1.container("app"),
            &["cat", "/sys/class/net/can0/mtu"],
            EXEC_TIMEOUT,
        )
        .await
        .expect("exec");
    assert_eq!(mtu.stdout, "16\n");
    let (code, out) = send(t, &c1, "can0", FD).await;
    assert_ne!(code, 0, "an FD frame on a classic bus must fail: {out}");
    println!(
        "FD frame on the classic bus refused by cansend: {}",
        out.trim()
    );
    // cansend checks the MTU itself; the kernel refuses the write just the same.
    let ns = t
        .node
        .cri
        .netns_path(&c1.sandbox)
        .await
        .expect("sandbox status")
        .expect("netns");
    let refused = tokio::task::spawn_blocking(move || write_fd_frame(&ns))
        .await
        .expect("writer");
    assert_eq!(
        refused.raw_os_error(),
        Some(libc::EINVAL),
        "writing an FD frame to a classic-only member: {refused}"
    );
    println!("the kernel refuses an FD frame on the classic bus: {refused}");
    send_ok(t, &c1, CLASSIC).await;
    assert_eq!(dumped(t, &c2).await, [CLASSIC_SEEN]);
    assert_eq!(dumped(t, &c1).await, [CLASSIC_SEEN]);
    let ends = vec![bus_end(&c1, BUS_C), bus_end(&c2, BUS_C)];
    assert_eq!(cangw_rules("c"), mesh(&ends, false));
    for pod in [&c1, &c2] {
        t.node.delete_pod(pod).await.expect("delete");
    }
}

/// F1 filters for 123:7FF and 200:700; F2 sends a mix; F3 (no filter) gets everything.
async fn a_member_with_filters_receives_only_matching_ids(t: &TestNode) {
    let mut f1 = listener("f1", BUS_A, 3, "can0");
    f1.annotations
        .insert("socketcan.io/filter".into(), "123:7FF, 200:700".into());
    let f1 = t.run_pod_ok(&f1).await;
    let f2 = t.run_pod_ok(&listener("f2", BUS_A, 6, "can0")).await;
    let f3 = t.run_pod_ok(&listener("f3", BUS_A, 6, "can0")).await;
    for pod in [&f1, &f2, &f3] {
        wait_bound(t, pod, "can0").await;
    }
    let sent = [
        "123#01",
        "124#02",
        "2AB#03",
        "00000123#04",
        "300#05",
        "2FF#FF",
    ];
    for frame in sent {
        send_ok(t, &f2, frame).await;
    }
    let all: Vec<String> = sent.iter().map(|f| format!("can0 {f}")).collect();
    assert_eq!(dumped(t, &f3).await, all);
    assert_eq!(dumped(t, &f2).await, all);
    assert_eq!(
        dumped(t, &f1).await,
        ["can0 123#01", "can0 2AB#03", "can0 2FF#FF"]
    );
    // Two filters × two senders × classic and FD.
    let f1_end = bus_end(&f1, BUS_A);
    let filtered: Vec<RuleText> = cangw_rules("a")
        .into_iter()
        .filter(|r| r.1 == f1_end)
        .collect();
    assert_eq!(filtered.len(), 8, "{filtered:?}");
    assert!(filtered.iter().all(|r| r.3.is_some()), "{filtered:?}");
    println!("filtered member received only 123, 2AB and 2FF; rules: {filtered:?}");
    for pod in [&f1, &f2, &f3] {
        t.node.delete_pod(pod).await.expect("delete");
    }
}

/// R1 sends 400 frames, 20 ms apart, to R2 while the plugin restarts: R2 gets every one, in order.
/// After the restart a new member joins and the mesh is exactly the three members' rules.
async fn a_plugin_restart_loses_no_frame_between_members(t: &mut TestNode) {
    const FRAMES: usize = 400;
    let mut sender = ContainerSpec::new("app", CANUTILS_IMAGE, ["sleep", "3600"]);
    sender.resources = vec![(BUS_B.to_string(), 1)];
    let mut r1 = PodSpec::new("default", "r1");
    r1.containers = vec![sender];
    let r1 = t.run_pod_ok(&r1).await;
    let r2 = t.run_pod_ok(&listener("r2", BUS_B, FRAMES, "can0")).await;
    wait_bound(t, &r2, "can0").await;

    let TestNode { node, plugin, .. } = t;
    let count = FRAMES.to_string();
    let cangen = [
        "cangen", "can0", "-g", "20", "-n", &count, "-I", "i", "-L", "1", "-D", "i",
    ];
    let traffic = node
        .cri
        .exec(r1.container("app"), &cangen, Duration::from_secs(120));
    let restart = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        plugin.restart().expect("plugin restarts");
    };
    let (traffic, ()) = tokio::join!(traffic, restart);
    let traffic = traffic.expect("cangen runs");
    assert_eq!(traffic.exit_code, 0, "cangen: {}", traffic.stderr);
    t.node
        .kubelet
        .wait_for_resource(BUS_B, 4, Duration::from_secs(30))
        .await
        .expect("restarted plugin registers the bus again");
    let frames = dumped(t, &r2).await;
    assert_eq!(frames.len(), FRAMES);
    for (i, frame) in frames.iter().enumerate() {
        let id = frame
            .split_whitespace()
            .nth(1)
            .and_then(|f| f.split_once('#'))
            .map(|(id, _)| id.to_string())
            .unwrap_or_default();
        assert_eq!(id, format!("{:03X}", i % 0x800), "frame {i}: {frame}");
    }
    assert!(
        t.plugin
            .log()
            .contains("adopted running pods pods=2 resource=socketcan.io/bus-b"),
        "plugin log:\n{}",
        t.plugin.log()
    );
    println!("{FRAMES} frames through bus b across a plugin restart, none lost");

    let r3 = t.run_pod_ok(&listener("r3", BUS_B, 1, "can0")).await;
    wait_bound(t, &r3, "can0").await;
    send_ok(t, &r1, "0B3#03").await;
    assert_eq!(dumped(t, &r3).await, ["can0 0B3#03"]);
    let ends: Vec<String> = [&r1, &r2, &r3].iter().map(|p| bus_end(p, BUS_B)).collect();
    assert_eq!(cangw_rules("b"), mesh(&ends, true));
    for pod in [&r1, &r2, &r3] {
        t.node.delete_pod(pod).await.expect("delete");
    }
}

/// A full bus: 32 members, one frame from the first reaches the 31 others (and its own echo).
async fn thirty_two_members_all_receive_one_frame(t: &TestNode) {
    let started = Instant::now();
    let specs: Vec<PodSpec> = (0..32)
        .map(|i| listener(&format!("full-{i}"), BUS_A, 1, "can0"))
        .collect();
    // Sixteen at a time: joins run concurrently, but 32 pods starting at once under emulation
    // leave the last PreStarts close to the kubelet's 30 s timeout, whatever the plugin does.
    let mut pods: Vec<StartedPod> = Vec::new();
    for batch in specs.chunks(16) {
        pods.extend(futures::future::join_all(batch.iter().map(|s| t.run_pod_ok(s))).await);
    }
    println!("32 members started in {:?}", started.elapsed());
    for pod in &pods {
        wait_bound(t, pod, "can0").await;
    }
    assert_eq!(
        t.plugin.metric("vcan_plugin_bus_members{bus=\"a\"}"),
        Some(32.0)
    );
    send_ok(t, &pods[0], "5A5#32").await;
    for pod in &pods {
        assert_eq!(dumped(t, pod).await, ["can0 5A5#32"], "{}", pod.spec.name);
    }
    assert_eq!(cangw_rules("a").len(), 32 * 31 * 2);
    println!("32 members on one bus each received the frame once");
    for pod in &pods {
        t.node.delete_pod(pod).await.expect("delete");
    }
}

/// Writes one CAN FD frame from a CAN_RAW socket with FD frames enabled, bound to `can0` in the
/// namespace `ns`; returns the write's error (or an error saying it succeeded).
fn write_fd_frame(ns: &Path) -> std::io::Error {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const AF_CAN: i32 = 29;
    const CAN_RAW: i32 = 1;
    const SOL_CAN_RAW: i32 = 101;
    const CAN_RAW_FD_FRAMES: i32 = 5;
    let result = vcan_plugin::kernel::netns::run(
        &vcan_plugin::kernel::netns::Netns::Path(ns.to_path_buf()),
        || -> std::io::Error {
            // SAFETY: socket calls on a fresh fd with buffers of the sizes passed.
            unsafe {
                let raw = libc::socket(AF_CAN, libc::SOCK_RAW, CAN_RAW);
                if raw < 0 {
                    return std::io::Error::last_os_error();
                }
                let fd = OwnedFd::from_raw_fd(raw);
                let on: libc::c_int = 1;
                if libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_CAN_RAW,
                    CAN_RAW_FD_FRAMES,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                ) != 0
                {
                    return std::io::Error::last_os_error();
                }
                let ifindex = libc::if_nametoindex(c"can0".as_ptr());
                // struct sockaddr_can: family, padding, ifindex, 16 bytes of addresses.
                let mut addr = [0u8; 24];
                addr[..2].copy_from_slice(&(AF_CAN as u16).to_ne_bytes());
                addr[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
                if libc::bind(fd.as_raw_fd(), addr.as_ptr().cast(), 24) != 0 {
                    return std::io::Error::last_os_error();
                }
                // struct canfd_frame (CANFD_MTU, 72 bytes): id 0x123, 8 data bytes.
                let mut frame = [0u8; 72];
                frame[..4].copy_from_slice(&0x123u32.to_ne_bytes());
                frame[4] = 8;
                if libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) < 0 {
                    return std::io::Error::last_os_error();
                }
                std::io::Error::other("the kernel accepted the FD frame")
            }
        },
    );
    result.unwrap_or_else(std::io::Error::other)
}
