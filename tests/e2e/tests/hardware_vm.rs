//! Physical CAN interfaces on a real node: containerd's CRI, the kubelet stand-in and the plugin
//! with a hardware configuration, in the CAN test-bed VM, whose qemu emulates four Kvaser PCIcan
//! (SJA1000) controllers driven by the kernel's own `kvaser_pci` driver: 0000:00:10.0 and
//! 0000:00:11.0 on one emulated wire, 0000:00:12.0 and 0000:00:13.0 on another. On each wire one
//! controller is the plugin's and the other plays the ECU, in the node's namespace.
//!
//! The emulation models neither ACK nor bit errors, so bus-off and error-passive cannot happen
//! here; their handling is covered by unit tests on parsed netlink state.
//!
//! The tests share the controllers, so they hold [`CONTROLLERS`] and leave every controller on
//! the node, down, under its name. They wait for what the plugin exposes (its reconcile pass
//! count, metrics, log) or for the kernel's own state, never for a fixed time.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vcan_e2e::cluster::{pod_netns, wait_listening};
use vcan_e2e::env::TestNode;
use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::node::StartedPod;
use vcan_e2e::wait::eventually;
use vcan_e2e::{ContainerSpec, PodSpec};
use vcan_test_support::{require_testbed, run_ok};

const STATE_DIR: &str = "/run/vcan-node/state";
const HW_BENCH: &str = "socketcan.io/hw-bench";
const HW_GHOST: &str = "socketcan.io/hw-ghost";
const HW_BYNAME: &str = "socketcan.io/hw-byname";
const BUS_PLANT: &str = "socketcan.io/bus-plant";
/// The plugin's passthrough controller and the ECU on the same emulated wire.
const BENCH_PCI: &str = "0000:00:10.0";
const BENCH_ECU_PCI: &str = "0000:00:11.0";
/// The bus's uplink and the ECU on the other wire.
const UPLINK_PCI: &str = "0000:00:12.0";
const UPLINK_ECU_PCI: &str = "0000:00:13.0";
const EXIT_TIMEOUT: Duration = Duration::from_secs(150);
const EXEC_TIMEOUT: Duration = Duration::from_secs(90);
const BIND_TIMEOUT: Duration = Duration::from_secs(60);
const DUMP_TIMEOUT: &str = "120";
/// Long enough for several reconcile passes (one every 10 s) under emulation.
const PASS_TIMEOUT: Duration = Duration::from_secs(90);

/// One test at a time: they use the same controllers and the same node directories.
static CONTROLLERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn configs() -> (PathBuf, PathBuf) {
    std::fs::create_dir_all("/run/vcan-node").expect("node dir");
    let hardware = PathBuf::from("/run/vcan-node/hardware.json");
    std::fs::write(
        &hardware,
        format!(
            r#"{{"interfaces": [
                {{"name": "bench", "device": {{"parent": "{BENCH_PCI}"}}, "bitrate": 500000,
                  "sample_point": 0.875, "restart_ms": 100, "bitrates": [250000, 3000000]}},
                {{"name": "wire", "device": {{"parent": "{UPLINK_PCI}"}}, "bitrate": 500000}},
                {{"name": "ghost", "device": {{"parent": "0000:00:1f.7"}}, "bitrate": 500000}}
            ]}}"#
        ),
    )
    .expect("write hardware config");
    let buses = PathBuf::from("/run/vcan-node/buses.json");
    std::fs::write(
        &buses,
        r#"{"buses": [{"name": "plant", "fd": false, "members": 4, "uplink": "wire"}]}"#,
    )
    .expect("write bus config");
    (hardware, buses)
}

/// The netdev of PCI device `pci` in the node's namespace, if it is there.
fn netdev(pci: &str) -> Option<String> {
    std::fs::read_dir(format!("/sys/bus/pci/devices/{pci}/net"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
}

/// Loads the driver and waits for the four controllers' netdevs.
fn load_controllers() {
    run_ok("modprobe", &["kvaser_pci"]);
    let started = Instant::now();
    while [BENCH_PCI, BENCH_ECU_PCI, UPLINK_PCI, UPLINK_ECU_PCI]
        .iter()
        .any(|p| netdev(p).is_none())
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "kvaser_pci made no netdevs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sets the ECU at `pci` to 500 kbit/s and up; returns its name.
fn ecu(pci: &str) -> String {
    let name = netdev(pci).expect("ECU controller");
    let _ = Command::new("ip")
        .args(["link", "set", &name, "down"])
        .status();
    run_ok(
        "ip",
        &["link", "set", &name, "type", "can", "bitrate", "500000"],
    );
    run_ok("ip", &["link", "set", &name, "up"]);
    name
}

/// `ip -details -json link show NAME`'s object, parsed, from `netns` (None: the node's).
fn details(netns: Option<&str>, name: &str) -> serde_json::Value {
    let mut cmd = Command::new("nsenter");
    if let Some(ns) = netns {
        cmd.arg(format!("--net={ns}"));
    }
    let out = cmd
        .args([
            "ip",
            "-details",
            "-statistics",
            "-json",
            "link",
            "show",
            name,
        ])
        .output()
        .expect("ip runs");
    assert!(
        out.status.success(),
        "ip link show {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip's JSON");
    all[0].clone()
}

/// A candump of the ECU in the node's namespace, waiting for `frames` frames.
struct EcuDump {
    child: Child,
}

impl EcuDump {
    fn start(ifname: &str, frames: usize) -> Self {
        let child = Command::new("timeout")
            .args([
                DUMP_TIMEOUT,
                "candump",
                "-L",
                "-n",
                &frames.to_string(),
                ifname,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("candump runs");
        let started = Instant::now();
        loop {
            let list = std::fs::read_to_string("/proc/net/can/rcvlist_all").unwrap_or_default();
            if list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ifname))
            {
                break;
            }
            assert!(
                started.elapsed() < BIND_TIMEOUT,
                "candump on {ifname} never bound"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        EcuDump { child }
    }

    /// The frames dumped (without timestamps), once candump has them all.
    fn frames(self) -> Vec<String> {
        let out = self.child.wait_with_output().expect("candump ends");
        let text = String::from_utf8_lossy(&out.stdout);
        let frames = text
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest.to_string()))
            .collect();
        assert!(
            out.status.success(),
            "the ECU's candump timed out: {frames:?}"
        );
        frames
    }
}

fn pod(name: &str, resource: &str, frames: usize) -> PodSpec {
    let script =
        format!("timeout {DUMP_TIMEOUT} candump -L -n {frames} can0; rc=$?; sleep 3; exit $rc");
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sh", "-c", &script]);
    c.resources = vec![(resource.to_string(), 1)];
    let mut p = PodSpec::new("default", name);
    p.containers = vec![c];
    p
}

async fn netns(t: &TestNode, pod: &StartedPod) -> String {
    pod_netns(&t.node, pod).await
}

async fn wait_bound(t: &TestNode, pod: &StartedPod) {
    let ns = netns(t, pod).await;
    tokio::task::spawn_blocking(move || wait_listening(&format!("--net={ns}"), "can0"))
        .await
        .expect("wait for the listener");
}

async fn send(t: &TestNode, pod: &StartedPod, frame: &str) {
    t.node.cansend(pod, "can0", frame, EXEC_TIMEOUT).await;
}

async fn dumped(t: &TestNode, pod: &StartedPod) -> Vec<String> {
    t.node.dumped(pod, EXIT_TIMEOUT).await
}

/// The plugin's finished reconcile passes.
fn passes(t: &TestNode) -> f64 {
    t.plugin
        .metric("vcan_plugin_reconcile_passes_total")
        .unwrap_or(0.0)
}

/// Waits until the plugin has finished `n` more reconcile passes. With `n` = 2, at least one
/// whole pass began after this call: whatever a pass does about an earlier event is done.
async fn after_passes(t: &TestNode, n: u32) {
    let target = passes(t) + f64::from(n);
    eventually(&format!("{n} more reconcile passes"), PASS_TIMEOUT, || {
        let now = passes(t);
        if now >= target {
            Ok(())
        } else {
            Err(format!("{now} passes, waiting for {target}"))
        }
    })
    .await;
}

/// Classic frames the plugin counted into `pod`'s `can0`.
fn received(t: &TestNode, pod: &str) -> f64 {
    t.plugin
        .metric(&format!(
            "vcan_plugin_can_frames_total{{direction=\"rx\",kind=\"classic\",\
             interface=\"can0\",namespace=\"default\",pod=\"{pod}\"}}"
        ))
        .unwrap_or(0.0)
}

/// The kernel's count of frames node-side interface `ifname` received.
fn rx_packets(ifname: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/statistics/rx_packets"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The bench controller is back on the node under `name`, down, and nowhere else.
fn at_home_down(name: &str) -> Result<(), String> {
    at_home_down_as(BENCH_PCI, name)
}

/// The controller of PCI device `pci` is back on the node under `name`, down.
fn at_home_down_as(pci: &str, name: &str) -> Result<(), String> {
    match netdev(pci) {
        Some(n) if n == name => {
            let d = details(None, name);
            let flags = d["flags"].to_string();
            if flags.contains("\"UP\"") {
                Err(format!("{name} is back but up: {flags}"))
            } else {
                Ok(())
            }
        }
        other => Err(format!("{pci} on the node as {other:?}, not {name}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn physical_interfaces_pass_through_and_uplink_a_shared_bus() {
    require_testbed();
    let _controllers = CONTROLLERS.lock().await;
    load_controllers();
    let bench_name = netdev(BENCH_PCI).expect("bench controller");
    let wire_name = netdev(UPLINK_PCI).expect("uplink controller");
    let (hardware, buses) = configs();
    let mut t = TestNode::start_with(
        2,
        "127.0.0.1:9731",
        vec![
            "--hardware-config".into(),
            hardware.display().to_string(),
            "--bus-config".into(),
            buses.display().to_string(),
            "--state-dir".into(),
            STATE_DIR.into(),
            "--health-interval".into(),
            "1".into(),
        ],
        &[(HW_BENCH, 1), (BUS_PLANT, 4)],
    )
    .await
    .expect("node starts");

    // A configured device that is not there: advertised, unhealthy, with what is missing.
    let started = Instant::now();
    while !t.node.kubelet.is_registered(HW_GHOST) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{HW_GHOST} never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(t.node.kubelet.healthy_devices(HW_GHOST), 0);
    assert!(
        t.plugin.log().contains("0000:00:1f.7) is not on the node"),
        "the log says what is missing:\n{}",
        t.plugin.log()
    );

    passthrough_exchanges_frames_and_returns_the_interface(&mut t, &bench_name).await;
    a_hand_over_leaves_the_new_pod_its_interface(&t, &bench_name).await;
    bad_bitrates_fail_the_pod_and_leave_nothing(&mut t, &bench_name).await;
    an_unbound_driver_makes_the_device_unhealthy(&t, &bench_name).await;
    uplink_connects_members_and_the_wire(&t).await;
    // A bus with an uplink keeps it in its namespace for good. Other tests in this VM want every
    // controller back on the node: stop the plugin and remove the bus namespace, whose
    // destruction hands the controller back, and give it its name again.
    drop(t);
    let bus_ns = std::path::Path::new(STATE_DIR).join("buses/plant");
    run_ok("umount", &[&bus_ns.display().to_string()]);
    std::fs::remove_file(&bus_ns).expect("remove the bus namespace file");
    let started = Instant::now();
    let returned = loop {
        if let Some(name) = netdev(UPLINK_PCI) {
            break name;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the uplink never came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("ip")
        .args(["link", "set", &returned, "down"])
        .status();
    if returned != wire_name {
        run_ok("ip", &["link", "set", &returned, "name", &wire_name]);
    }
}

async fn passthrough_exchanges_frames_and_returns_the_interface(t: &mut TestNode, home: &str) {
    let ecu = ecu(BENCH_ECU_PCI);
    // Frames the pod receives: the ECU's, its own (echo), the ECU's after a plugin restart.
    let p = t.run_pod_ok(&pod("bench-user", HW_BENCH, 3)).await;
    let ns = netns(t, &p).await;
    assert_eq!(netdev(BENCH_PCI), None, "the controller left the node");
    let d = details(Some(&ns), "can0");
    let info = &d["linkinfo"]["info_data"];
    assert_eq!(info["bittiming"]["bitrate"], 500000, "{d}");
    assert_eq!(info["bittiming"]["sample_point"], "0.875", "{d}");
    assert_eq!(info["restart_ms"], 100, "{d}");
    assert_eq!(info["state"], "ERROR-ACTIVE", "{d}");
    assert_eq!(d["parentdev"], BENCH_PCI, "{d}");
    // The kernel's counts live as long as the driver: earlier tests' frames are in them.
    let packets = |d: &serde_json::Value, dir: &str| {
        d["stats64"][dir]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("{dir} packets in {d}"))
    };
    let (base_tx, base_rx) = (packets(&d, "tx"), packets(&d, "rx"));

    wait_bound(t, &p).await;
    run_ok("cansend", &[&ecu, "123#1122334455667788"]);
    // Started after the ECU's own frame, whose echo it would otherwise see first.
    let from_pod = EcuDump::start(&ecu, 1);
    send(t, &p, "18FEF100#A1A2A3").await;
    assert_eq!(from_pod.frames(), [format!("{ecu} 18FEF100#A1A2A3")]);

    // A plugin restart changes nothing for the pod.
    t.plugin.restart().expect("plugin restarts");
    t.node
        .kubelet
        .wait_for_resource(HW_BENCH, 1, Duration::from_secs(30))
        .await
        .expect("re-registered");
    assert_eq!(netdev(BENCH_PCI), None, "still the pod's");
    run_ok("cansend", &[&ecu, "5A1#0102"]);
    assert_eq!(
        dumped(t, &p).await,
        [
            "can0 123#1122334455667788",
            "can0 18FEF100#A1A2A3",
            "can0 5A1#0102"
        ]
    );

    // Exact counts on the physical interface against the kernel's statistics. The driver
    // echoes every sent frame back through the receive path (IFF_ECHO), which counts as rx.
    let d = details(Some(&ns), "can0");
    let kernel_tx = packets(&d, "tx") - base_tx;
    let kernel_rx = packets(&d, "rx") - base_rx;
    assert_eq!((kernel_tx, kernel_rx), (1, 2), "{d}");
    let frames = |direction: &str, kind: &str| {
        t.plugin.metric(&format!(
            "vcan_plugin_can_frames_total{{direction=\"{direction}\",kind=\"{kind}\",\
                 interface=\"can0\",namespace=\"default\",pod=\"bench-user\"}}"
        ))
    };
    let counted_tx = frames("tx", "classic").unwrap_or(0.0);
    let counted_rx = frames("rx", "classic").unwrap_or(0.0);
    eprintln!(
        "bench-user: kernel tx {kernel_tx} rx {kernel_rx}; counted tx {counted_tx} rx {counted_rx}"
    );
    assert_eq!(counted_tx, kernel_tx as f64);
    assert_eq!(counted_rx, (kernel_rx + kernel_tx) as f64);
    assert_eq!(
        t.plugin.metric(
            "vcan_plugin_can_controller_info{bus=\"\",controller=\"bench\",interface=\"can0\",\
             namespace=\"default\",pod=\"bench-user\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        t.plugin.metric(
            "vcan_plugin_can_controller_state{controller=\"bench\",state=\"error_active\"}"
        ),
        Some(1.0)
    );

    // The pod goes: the interface comes home, down, under its name.
    give_back(t, &p, home, &ecu).await;
}

/// Deletes `pod`, waits until the controller is home (down, as `home`) and downs the `ecu`.
async fn give_back(t: &TestNode, pod: &StartedPod, home: &str, ecu: &str) {
    t.node.delete_pod(pod).await.expect("delete");
    eventually("the interface returns", Duration::from_secs(45), || {
        at_home_down(home)
    })
    .await;
    let _ = Command::new("ip")
        .args(["link", "set", ecu, "down"])
        .status();
}

/// A rollout's hand-over: pod A holds the controller, A is deleted and pod B is given the device
/// at once, before the reconcile pass that releases A. That release must leave B's interface
/// alone: after two more passes B still has it up and exchanges frames with the ECU.
async fn a_hand_over_leaves_the_new_pod_its_interface(t: &TestNode, home: &str) {
    let ecu = ecu(BENCH_ECU_PCI);
    let a = t.run_pod_ok(&pod("hand-a", HW_BENCH, 1)).await;
    assert_eq!(netdev(BENCH_PCI), None, "A holds the controller");
    t.node.delete_pod(&a).await.expect("delete A");
    // B: the ECU's frame, then its own (the driver's echo).
    let b = t.run_pod_ok(&pod("hand-b", HW_BENCH, 2)).await;
    let ns = netns(t, &b).await;
    after_passes(t, 2).await;
    let log = t.plugin.log();
    assert!(
        log.lines()
            .any(|l| l.contains("pod sandbox gone: released") && l.contains("default/hand-a")),
        "A was released:\n{log}"
    );
    eprintln!(
        "hand-over: A's release found B holding the controller: {}",
        log.contains("a released pod no longer held the interface")
    );
    let d = details(Some(&ns), "can0");
    assert!(
        d["flags"].to_string().contains("\"UP\""),
        "B's can0 is up: {d}"
    );
    assert_eq!(d["parentdev"], BENCH_PCI, "{d}");
    assert_eq!(d["linkinfo"]["info_data"]["state"], "ERROR-ACTIVE", "{d}");
    assert_eq!(netdev(BENCH_PCI), None, "the controller stayed with B");
    assert_eq!(
        t.plugin.metric(
            "vcan_plugin_can_controller_info{bus=\"\",controller=\"bench\",interface=\"can0\",\
             namespace=\"default\",pod=\"hand-b\"}"
        ),
        Some(1.0)
    );

    wait_bound(t, &b).await;
    run_ok("cansend", &[&ecu, "321#C0FFEE"]);
    // Started after the ECU's own frame, whose echo it would otherwise see first.
    let from_b = EcuDump::start(&ecu, 1);
    send(t, &b, "18DA00F1#0102").await;
    assert_eq!(from_b.frames(), [format!("{ecu} 18DA00F1#0102")]);
    assert_eq!(
        dumped(t, &b).await,
        ["can0 321#C0FFEE", "can0 18DA00F1#0102"]
    );

    give_back(t, &b, home, &ecu).await;
}

async fn bad_bitrates_fail_the_pod_and_leave_nothing(t: &mut TestNode, home: &str) {
    for (bitrate, expected) in [
        (
            "1000000",
            "bitrate 1000000 is not allowed; the configuration allows 250000, 500000, 3000000",
        ),
        ("3000000", "3000000"),
    ] {
        let mut spec = pod(&format!("bad-{bitrate}"), HW_BENCH, 1);
        spec.annotations
            .insert("socketcan.io/bitrate.bench".into(), bitrate.into());
        let started = t.node.run_pod(&spec).await.expect("runs");
        let failure = started.failure.clone().expect("the pod must not start");
        assert!(failure.contains(expected), "{failure}");
        eprintln!("bitrate {bitrate}: {failure}");
        t.node.delete_pod(&started).await.expect("delete");
        eventually("nothing is left", Duration::from_secs(45), || {
            at_home_down(home)
        })
        .await;
    }
    // An allowed bitrate is what the pod gets.
    let mut spec = pod("slow", HW_BENCH, 1);
    spec.annotations
        .insert("socketcan.io/bitrate.bench".into(), "250000".into());
    let p = t.run_pod_ok(&spec).await;
    let d = details(Some(&netns(t, &p).await), "can0");
    assert_eq!(d["linkinfo"]["info_data"]["bittiming"]["bitrate"], 250000);
    // Deleted while the plugin is down: the kernel hands the controller back under the pod's
    // name (or dev<N>), and the next plugin renames and downs it.
    t.plugin.stop().expect("plugin stops");
    t.node.delete_pod(&p).await.expect("delete");
    t.plugin.restart().expect("plugin starts");
    eventually("the interface returns", Duration::from_secs(45), || {
        at_home_down(home)
    })
    .await;
}

/// The controller's driver goes away (as when a USB adapter is unplugged): its device turns
/// Unhealthy naming what is missing, and healthy again when the driver is back.
async fn an_unbound_driver_makes_the_device_unhealthy(t: &TestNode, home: &str) {
    std::fs::write("/sys/bus/pci/drivers/kvaser_pci/unbind", BENCH_PCI).expect("unbind");
    // The probe runs every second here (--health-interval 1).
    eventually(
        "hw-bench unhealthy, naming the missing driver",
        Duration::from_secs(30),
        || {
            let healthy = t.node.kubelet.healthy_devices(HW_BENCH);
            let named = t
                .plugin
                .log()
                .contains("device 0000:00:10.0 has no driver bound");
            if healthy == 0 && named {
                Ok(())
            } else {
                Err(format!("{healthy} healthy, reason logged: {named}"))
            }
        },
    )
    .await;
    std::fs::write("/sys/bus/pci/drivers/kvaser_pci/bind", BENCH_PCI).expect("bind");
    t.node
        .kubelet
        .wait_for_resource(HW_BENCH, 1, Duration::from_secs(30))
        .await
        .expect("healthy again");
    // The rebound driver names the netdev afresh; the next pass gives it its name back.
    eventually(
        "the interface has its name",
        Duration::from_secs(45),
        || at_home_down(home),
    )
    .await;
}

async fn uplink_connects_members_and_the_wire(t: &TestNode) {
    let ecu = ecu(UPLINK_ECU_PCI);
    assert_eq!(
        netdev(UPLINK_PCI),
        None,
        "the uplink is in the bus namespace"
    );
    // m1 and m2 see: the ECU's frame, m1's frame, the ECU's marker, and one more ECU frame after
    // m3 left; m3 only the first three.
    let m1 = t.run_pod_ok(&pod("m1", BUS_PLANT, 4)).await;
    let m2 = t.run_pod_ok(&pod("m2", BUS_PLANT, 4)).await;
    let m3 = t.run_pod_ok(&pod("m3", BUS_PLANT, 3)).await;
    for m in [&m1, &m2, &m3] {
        wait_bound(t, m).await;
    }
    run_ok("cansend", &[&ecu, "100#E1"]);
    // The ECU's frame has crossed the wire into every member (as the plugin counts it) before
    // the ECU's dump starts, which would otherwise see the frame's echo.
    eventually(
        "every member received the ECU's frame",
        EXEC_TIMEOUT,
        || {
            let counts: Vec<f64> = ["m1", "m2", "m3"].map(|m| received(t, m)).to_vec();
            if counts.iter().all(|c| *c >= 1.0) {
                Ok(())
            } else {
                Err(format!("received {counts:?}"))
            }
        },
    )
    .await;
    let wire = EcuDump::start(&ecu, 2);
    let before = rx_packets(&ecu);
    send(t, &m1, "200#A1").await;
    // m1's frame is on the ECU before the ECU sends its marker.
    eventually("the ECU received m1's frame", EXEC_TIMEOUT, || {
        let now = rx_packets(&ecu);
        if now > before {
            Ok(())
        } else {
            Err(format!("{ecu} rx_packets still {now}"))
        }
    })
    .await;
    run_ok("cansend", &[&ecu, "7FF#FF"]);
    // The ECU got m1's frame once, then its own marker's echo.
    assert_eq!(
        wire.frames(),
        [format!("{ecu} 200#A1"), format!("{ecu} 7FF#FF")]
    );
    assert_eq!(
        dumped(t, &m3).await,
        ["can0 100#E1", "can0 200#A1", "can0 7FF#FF"]
    );
    t.node.delete_pod(&m3).await.expect("delete m3");
    // A pass that began after the deletion has released m3.
    after_passes(t, 2).await;
    run_ok("cansend", &[&ecu, "101#E2"]);
    for m in [&m1, &m2] {
        assert_eq!(
            dumped(t, m).await,
            ["can0 100#E1", "can0 200#A1", "can0 7FF#FF", "can0 101#E2"],
            "{}",
            m.spec.name
        );
    }
    assert_eq!(
        t.plugin.metric(
            "vcan_plugin_can_controller_info{bus=\"plant\",controller=\"wire\",\
             interface=\"uplink\",namespace=\"\",pod=\"\"}"
        ),
        Some(1.0)
    );
    for m in [&m1, &m2] {
        t.node.delete_pod(m).await.expect("delete");
    }
    let _ = Command::new("ip")
        .args(["link", "set", &ecu, "down"])
        .status();
}

/// A controller configured by `device.ifname` (the uplink wire's controller, here by its name on
/// the node): when its pod goes, the kernel hands it back under another name (`dev<N>`, as the
/// pod's `can0` is taken on the node by the bench controller); the plugin recognises it by the
/// identity it recorded, gives it its name back, and the next pod gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn an_ifname_controller_comes_back_under_its_name_for_the_next_pod() {
    require_testbed();
    let _controllers = CONTROLLERS.lock().await;
    load_controllers();
    let name = netdev(UPLINK_PCI).expect("the controller");
    std::fs::create_dir_all("/run/vcan-node").expect("node dir");
    let config = PathBuf::from("/run/vcan-node/hardware-byname.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"interfaces": [
                {{"name": "byname", "device": {{"ifname": "{name}"}}, "bitrate": 500000}}
            ]}}"#
        ),
    )
    .expect("write hardware config");
    let t = TestNode::start_with(
        2,
        "127.0.0.1:9732",
        vec![
            "--hardware-config".into(),
            config.display().to_string(),
            "--state-dir".into(),
            STATE_DIR.into(),
        ],
        &[(HW_BYNAME, 1)],
    )
    .await
    .expect("node starts");
    let ecu = ecu(UPLINK_ECU_PCI);
    let at_home = format!(
        "vcan_plugin_can_controller_info{{bus=\"\",controller=\"byname\",interface=\"{name}\",\
         namespace=\"\",pod=\"\"}}"
    );

    let first = t.run_pod_ok(&pod("byname-1", HW_BYNAME, 1)).await;
    let d = details(Some(&netns(&t, &first).await), "can0");
    assert_eq!(d["parentdev"], UPLINK_PCI, "{d}");
    let identity = std::fs::read_to_string(format!("{STATE_DIR}/hardware/byname.identity"))
        .expect("the identity is recorded");
    assert!(
        identity.contains(&format!("parent={UPLINK_PCI}")),
        "{identity}"
    );
    t.node.delete_pod(&first).await.expect("delete");
    // The plugin shows it on the node under its own name again, and it is down there.
    eventually(
        "the plugin has the controller back under its name",
        PASS_TIMEOUT,
        || match t.plugin.metric(&at_home) {
            Some(1.0) => at_home_down_as(UPLINK_PCI, &name),
            _ => Err(format!(
                "no {at_home}; {UPLINK_PCI} is {:?}",
                netdev(UPLINK_PCI)
            )),
        },
    )
    .await;

    // The next pod gets it: the ECU's frame, then its own.
    let second = t.run_pod_ok(&pod("byname-2", HW_BYNAME, 2)).await;
    assert_eq!(netdev(UPLINK_PCI), None, "the controller is the pod's");
    wait_bound(&t, &second).await;
    run_ok("cansend", &[&ecu, "0C1#AA55"]);
    // Started after the ECU's own frame, whose echo it would otherwise see first.
    let from_pod = EcuDump::start(&ecu, 1);
    send(&t, &second, "0C2#55AA").await;
    assert_eq!(from_pod.frames(), [format!("{ecu} 0C2#55AA")]);
    assert_eq!(
        dumped(&t, &second).await,
        ["can0 0C1#AA55", "can0 0C2#55AA"]
    );
    t.node.delete_pod(&second).await.expect("delete");
    eventually(
        "the controller is back under its name",
        PASS_TIMEOUT,
        || at_home_down_as(UPLINK_PCI, &name),
    )
    .await;
    let _ = Command::new("ip")
        .args(["link", "set", &ecu, "down"])
        .status();
}
