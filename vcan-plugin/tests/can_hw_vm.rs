//! Physical CAN controllers against the real driver, in the CAN test-bed VM: four emulated Kvaser
//! PCIcan (SJA1000) controllers, 0000:00:10.0 and 0000:00:11.0 on one emulated bus, 0000:00:12.0
//! and 0000:00:13.0 on another (xtask/src/vm/qemu.rs).
//!
//! The tests share the controllers (with each other and with later test binaries), so they run one
//! at a time and every test leaves every controller in the node's namespace, down, under its
//! original name.

use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use vcan_plugin::kernel::can::{self, BerrCounter, CanError, CanLink, CanSettings, CanState};
use vcan_plugin::kernel::link::LinkError;
use vcan_plugin::kernel::netns::Netns;
use vcan_test_support::{IP, NetnsFixture, require_testbed, run_ok, wait_for_can_listener};

/// Parent device and the name the driver gives it (probe order follows the PCI addresses).
const CONTROLLERS: [(&str, &str); 4] = [
    ("0000:00:10.0", "can0"),
    ("0000:00:11.0", "can1"),
    ("0000:00:12.0", "can2"),
    ("0000:00:13.0", "can3"),
];
const TIMEOUT: Duration = Duration::from_secs(20);

/// One test at a time: they all use the same four controllers.
static CONTROLLERS_LOCK: Mutex<()> = Mutex::new(());

/// The node's namespace, named as the plugin would name it.
fn node() -> Netns {
    Netns::Pid(1)
}

/// The test process's own namespace (the node's, in the VM): the other way to name it.
fn own() -> Netns {
    Netns::Pid(std::process::id())
}

/// Holds the lock and puts the controllers back when the test ends, passed or failed.
struct Testbed {
    _lock: MutexGuard<'static, ()>,
}

impl Testbed {
    fn take() -> Self {
        require_testbed();
        let lock = CONTROLLERS_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        load_driver();
        reset_controllers();
        Testbed { _lock: lock }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // A failed test may have left a namespace holding a controller: its fixture is dropped
        // before this guard (declared later), and the kernel returns the controller shortly after.
        if std::thread::panicking() {
            let _ = std::panic::catch_unwind(reset_controllers);
        } else {
            reset_controllers();
        }
    }
}

/// Loads the Kvaser PCI driver (sja1000 and can-dev come with it) and waits for its interfaces.
fn load_driver() {
    run_ok("modprobe", &["kvaser_pci"]);
    wait_for("the four emulated controllers to register", || {
        let links = can::list(&node()).ok()?;
        (CONTROLLERS
            .iter()
            .all(|(dev, _)| links.iter().any(|l| l.parent_dev.as_deref() == Some(dev))))
        .then_some(())
    });
}

/// Polls `probe` until it returns something; panics after [`TIMEOUT`].
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(started.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The controller with parent device `dev` in the node's namespace.
fn controller(dev: &str) -> CanLink {
    can::find_by_parent(&node(), dev)
        .expect("list controllers")
        .unwrap_or_else(|| panic!("controller {dev} is not in the node's namespace"))
}

/// Every controller in the node's namespace, down, under its original name, listen-only off.
fn reset_controllers() {
    let links = wait_for("every controller back in the node's namespace", || {
        let links = can::list(&node()).ok()?;
        CONTROLLERS
            .iter()
            .map(|(dev, _)| {
                links
                    .iter()
                    .find(|l| l.parent_dev.as_deref() == Some(dev))
                    .cloned()
            })
            .collect::<Option<Vec<_>>>()
    });
    for link in &links {
        if link.up {
            can::set_up(&node(), link.index, false).expect("set down");
        }
        if link.listen_only() {
            can::configure(&node(), link.index, &CanSettings::classic(500_000))
                .expect("clear listen-only");
        }
    }
    // Through temporary names, in case two controllers hold each other's names.
    for (i, link) in links.iter().enumerate() {
        if link.name != CONTROLLERS[i].1 {
            can::rename(&node(), link.index, &format!("canreset{i}")).expect("rename");
        }
    }
    for (i, link) in links.iter().enumerate() {
        if link.name != CONTROLLERS[i].1 {
            can::rename(&node(), link.index, CONTROLLERS[i].1).expect("rename back");
        }
    }
}

/// `ip -details -json link show <name>` (in `netns` if given): the kernel's view through
/// iproute2, an independent reader.
fn ip_details(netns: Option<&str>, name: &str) -> Value {
    let mut cmd = Command::new(IP);
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let out = cmd
        .args(["-details", "-json", "link", "show", name])
        .output()
        .expect("ip runs");
    assert!(
        out.status.success(),
        "ip link show {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Value = serde_json::from_slice(&out.stdout).expect("ip -json prints JSON");
    all[0].clone()
}

/// Waits until a CAN socket in the test's own namespace listens on `ifname` (the support crate's
/// helper looks into named namespaces only).
fn wait_for_host_listener(ifname: &str) {
    wait_for(&format!("a CAN listener on {ifname}"), || {
        let listing = std::fs::read_to_string("/proc/net/can/rcvlist_all").ok()?;
        listing
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ifname))
            .then_some(())
    });
}

/// `candump -L -n 1 <ifname>` under a timeout, in `netns` if given.
fn candump(netns: Option<&str>, ifname: &str) -> Child {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new(IP);
            c.args(["netns", "exec", ns, "timeout", "30"]);
            c
        }
        None => {
            let mut c = Command::new("timeout");
            c.arg("30");
            c
        }
    };
    cmd.args(["candump", "-L", "-n", "1", ifname])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("candump starts")
}

/// The frame a `candump -L` received, without its timestamp: `can1 123#DEADBEEF`.
fn received(child: Child) -> String {
    let out = child.wait_with_output().expect("candump finishes");
    assert!(
        out.status.success(),
        "candump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.split_once(' '))
        .map(|(_, frame)| frame.to_string())
        .unwrap_or_default()
}

fn settings_500k() -> CanSettings {
    CanSettings {
        sample_point: Some(875),
        restart_ms: 100,
        ..CanSettings::classic(500_000)
    }
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn controllers_are_found_by_parent_device_and_configured() {
    let _bed = Testbed::take();
    let links = can::list(&node()).expect("list");
    assert_eq!(links.len(), 4, "{links:#?}");
    for (dev, name) in CONTROLLERS {
        let link = controller(dev);
        assert_eq!(
            (link.name.as_str(), link.parent_bus.as_deref(), link.mtu),
            (name, Some("pci"), 16)
        );
        assert_eq!(link.clock_hz, Some(8_000_000), "{name}");
        assert!(!link.up && !link.fd(), "{name}");
        assert_eq!(link.state, Some(CanState::Stopped), "{name} is down");
        let by_name = can::get(&own(), name).expect("get").expect("by name");
        let by_index = can::get_by_index(&own(), link.index)
            .expect("get")
            .expect("by index");
        assert_eq!((by_name.index, by_index.name.as_str()), (link.index, name));
    }

    let can0 = controller("0000:00:10.0");
    let configured = can::configure(&node(), can0.index, &settings_500k()).expect("configure");
    let bt = configured.bittiming.expect("bit timing");
    assert_eq!((bt.bitrate, bt.sample_point), (500_000, 875));
    assert_eq!(configured.restart_ms, 100);
    assert!(!configured.up, "configure keeps a down controller down");
    let json = ip_details(None, "can0");
    let data = &json["linkinfo"]["info_data"];
    assert_eq!(data["bittiming"]["bitrate"], 500_000, "{json}");
    assert_eq!(data["bittiming"]["sample_point"], "0.875", "{json}");
    assert_eq!(data["restart_ms"], 100, "{json}");
    assert_eq!(data["state"], "STOPPED", "{json}");
    assert_eq!(json["parentdev"], "0000:00:10.0", "{json}");
    // The kernel computed the segments from bitrate and sample point alone.
    assert_eq!(data["bittiming"]["tq"], bt.tq, "{json}");
    assert_eq!(data["bittiming"]["phase_seg2"], bt.phase_seg2, "{json}");

    // 8 MHz / 3 Mbit/s is 2.67 quanta per bit, 3 at least: 11 % off, and the kernel allows 5 %.
    let unreachable = CanSettings {
        sample_point: Some(875),
        ..CanSettings::classic(3_000_000)
    };
    let err = can::configure(&node(), can0.index, &unreachable).expect_err("3 Mbit/s on 8 MHz");
    println!("unreachable bitrate: {err}");
    assert!(matches!(err, CanError::Bitrate { .. }), "{err:?}");
    let text = err.to_string();
    for part in ["\"can0\"", "3000000 bit/s", "8000000 Hz"] {
        assert!(text.contains(part), "{part} missing: {text}");
    }
    let CanError::Bitrate { source, .. } = &err else {
        unreachable!()
    };
    assert_eq!(
        vcan_plugin::kernel::netlink::errno(source),
        Some(libc::EDOM)
    );
    let kept = controller("0000:00:10.0").bittiming.expect("bit timing");
    assert_eq!(kept.bitrate, 500_000, "a refused bitrate changes nothing");

    // SJA1000 has no CAN FD: the driver's refusal is explained.
    let fd = CanSettings {
        fd: true,
        data_bitrate: Some(2_000_000),
        ..settings_500k()
    };
    let err = can::configure(&node(), can0.index, &fd).expect_err("FD on an SJA1000");
    println!("CAN FD on an SJA1000: {err}");
    assert!(matches!(err, CanError::Unsupported { .. }), "{err:?}");

    // Listen-only set, then cleared by the same settings without it.
    let listen = CanSettings {
        listen_only: true,
        ..settings_500k()
    };
    assert!(
        can::configure(&node(), can0.index, &listen)
            .expect("listen-only")
            .listen_only()
    );
    let modes = ip_details(None, "can0")["linkinfo"]["info_data"]["ctrlmode"].clone();
    assert!(
        modes
            .as_array()
            .is_some_and(|m| m.iter().any(|v| v == "LISTEN-ONLY")),
        "{modes}"
    );
    assert!(
        !can::configure(&node(), can0.index, &settings_500k())
            .expect("clear")
            .listen_only()
    );
    let modes = ip_details(None, "can0")["linkinfo"]["info_data"]["ctrlmode"].clone();
    assert!(
        !modes
            .as_array()
            .is_some_and(|m| m.iter().any(|v| v == "LISTEN-ONLY")),
        "{modes}"
    );

    // A controller that is up is reconfigured too (down for the change, then up again).
    can::set_up(&node(), can0.index, true).expect("up");
    let up = can::configure(
        &node(),
        can0.index,
        &CanSettings {
            sample_point: None,
            ..CanSettings::classic(250_000)
        },
    )
    .expect("reconfigure while up");
    assert!(up.up, "configure restores the up state");
    assert_eq!(up.bittiming.map(|b| b.bitrate), Some(250_000));
    assert_eq!(up.state, Some(CanState::ErrorActive));
    can::set_up(&node(), can0.index, false).expect("down");
    assert_eq!(controller("0000:00:10.0").state, Some(CanState::Stopped));
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn a_controller_moves_into_a_namespace_renamed_carries_frames_and_moves_back() {
    let _bed = Testbed::take();
    let fx = NetnsFixture::new();
    let pod = Netns::Path(fx.path());
    let can0 = controller("0000:00:10.0");
    let can1 = controller("0000:00:11.0");
    can::configure(&node(), can0.index, &settings_500k()).expect("configure can0");
    can::configure(&node(), can1.index, &settings_500k()).expect("configure can1");

    let hw0 = can::move_to(&node(), can0.index, &pod, "hw0").expect("move into the pod");
    assert_eq!(hw0.name, "hw0");
    assert_eq!(hw0.parent_dev.as_deref(), Some("0000:00:10.0"));
    assert!(!hw0.up);
    assert_eq!(
        hw0.bittiming.map(|b| b.bitrate),
        Some(500_000),
        "settings move with it"
    );
    assert!(
        can::find_by_parent(&node(), "0000:00:10.0")
            .expect("list")
            .is_none()
    );
    let inside = ip_details(Some(fx.name()), "hw0");
    assert_eq!(inside["parentdev"], "0000:00:10.0", "{inside}");

    // A name taken in the target namespace is refused, and the controller stays where it was
    // (the kernel alone would move it under its old name before failing the rename).
    fx.ip(&["link", "add", "hw1", "type", "dummy"]);
    let err = can::move_to(&node(), can1.index, &pod, "hw1").expect_err("hw1 is taken");
    println!("name collision: {err}");
    assert!(
        matches!(&err, CanError::Link(LinkError::NameTaken { name, kind, .. })
            if name == "hw1" && kind == "dummy"),
        "{err:?}"
    );
    assert_eq!(controller("0000:00:11.0").name, "can1");
    assert!(
        can::list(&pod).expect("list").len() == 1,
        "only hw0 is in the pod"
    );

    // Frames both ways between the pod's controller and its peer on the same emulated bus.
    can::set_up(&pod, hw0.index, true).expect("hw0 up");
    can::set_up(&node(), can1.index, true).expect("can1 up");
    let pod_before = can::get(&pod, "hw0").expect("get").expect("hw0");
    let host_before = controller("0000:00:11.0");

    let dump = candump(None, "can1");
    wait_for_host_listener("can1");
    fx.run_ok("cansend", &["hw0", "123#DEADBEEF"]);
    assert_eq!(received(dump), "can1 123#DEADBEEF");

    let dump = candump(Some(fx.name()), "hw0");
    wait_for_can_listener(fx.name(), "hw0", TIMEOUT);
    run_ok("cansend", &["can1", "1F334455#0011223344556677"]);
    assert_eq!(received(dump), "hw0 1F334455#0011223344556677");

    let pod_after = can::get(&pod, "hw0").expect("get").expect("hw0");
    println!("hw0 in the pod: {pod_after:?}");
    assert_eq!(pod_after.state, Some(CanState::ErrorActive));
    assert_eq!(pod_after.berr, Some(BerrCounter { txerr: 0, rxerr: 0 }));
    assert!(pod_after.up);
    let device_stats = pod_after.device_stats.expect("device stats");
    assert_eq!(
        (device_stats.bus_off, device_stats.error_passive),
        (0, 0),
        "{device_stats:?}"
    );
    let (b, a) = (
        pod_before.stats.expect("stats"),
        pod_after.stats.expect("stats"),
    );
    assert_eq!(
        (
            a.tx_packets - b.tx_packets,
            a.tx_bytes - b.tx_bytes,
            a.rx_packets - b.rx_packets,
            a.rx_bytes - b.rx_bytes
        ),
        (1, 4, 1, 8),
        "the pod's controller sent 4 bytes and received 8"
    );
    let (b, a) = (
        host_before.stats.expect("stats"),
        controller("0000:00:11.0").stats.expect("stats"),
    );
    assert_eq!(
        (a.rx_packets - b.rx_packets, a.tx_packets - b.tx_packets),
        (1, 1)
    );

    // Back to the node's namespace, named by the plugin's own namespace this time, from inside
    // the pod's: up or not, the kernel closes it to move it.
    let back = can::move_to(&pod, pod_after.index, &own(), "can0").expect("move back");
    assert_eq!(
        (back.name.as_str(), back.parent_dev.as_deref(), back.up),
        ("can0", Some("0000:00:10.0"), false)
    );
    let json = ip_details(None, "can0");
    assert_eq!(json["operstate"], "DOWN", "{json}");
    assert_eq!(json["parentdev"], "0000:00:10.0", "{json}");
    assert!(can::list(&pod).expect("list").is_empty());
    can::set_up(&node(), can1.index, false).expect("can1 down");
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn a_destroyed_namespace_returns_its_controller_under_the_name_it_had_inside() {
    let _bed = Testbed::take();
    let fx = NetnsFixture::new();
    let pod = Netns::Path(fx.path());
    // The controller's own name is taken in the pod: the kernel then uses the new name as its
    // fallback, the other path through the same request.
    fx.ip(&["link", "add", "can2", "type", "dummy"]);
    let can2 = controller("0000:00:12.0");
    can::configure(&node(), can2.index, &settings_500k()).expect("configure");
    let hw2 = can::move_to(&node(), can2.index, &pod, "hw2").expect("move into the pod");
    assert_eq!(hw2.name, "hw2");
    // A round trip to PID 1's namespace and in again.
    let back = can::move_to(&pod, hw2.index, &node(), "can2").expect("move back");
    assert_eq!(back.parent_dev.as_deref(), Some("0000:00:12.0"));
    let hw2 = can::move_to(&node(), back.index, &pod, "hw2").expect("move in again");
    assert_eq!(hw2.parent_dev.as_deref(), Some("0000:00:12.0"));
    can::set_up(&pod, hw2.index, true).expect("up in the pod");

    drop(fx);
    // The kernel returns devices of a dying namespace from a work queue, not within `ip netns
    // del`: poll.
    let returned = wait_for("the controller back in the node's namespace", || {
        can::find_by_parent(&node(), "0000:00:12.0").ok().flatten()
    });
    println!("returned: {returned:?}");
    assert_eq!(
        returned.name, "hw2",
        "the kernel keeps the name it had inside"
    );
    assert!(!returned.up);
    can::rename(&node(), returned.index, "can2").expect("rename back");
    let renamed = can::get(&node(), "can2").expect("get").expect("can2");
    assert_eq!(renamed.parent_dev.as_deref(), Some("0000:00:12.0"));

    // Renaming needs the interface down, and says so.
    can::set_up(&node(), renamed.index, true).expect("up");
    let err = can::rename(&node(), renamed.index, "hw2").expect_err("up");
    assert!(matches!(err, CanError::RenameWhileUp { .. }), "{err:?}");
    can::set_up(&node(), renamed.index, false).expect("down");
}

/// A configured controller as the daemon makes it, with its state under `state`.
fn configured(json: &str, state: &std::path::Path) -> vcan_plugin::hardware::Controller {
    use vcan_plugin::hardware::{Controller, Roster, parse};
    let specs = parse(json, "hw.json").expect("valid configuration");
    let roster = std::sync::Arc::new(Roster::load(&specs, state));
    Controller::new(specs[0].clone(), state, roster)
}

fn pod_holder(name: &str, sandbox: &str) -> vcan_plugin::hardware::Holder {
    vcan_plugin::hardware::Holder::Pod {
        pod: vcan_plugin::pod::resources::PodRef {
            namespace: "default".into(),
            name: name.into(),
        },
        uid: format!("uid-{name}"),
        sandbox: sandbox.into(),
    }
}

/// A fresh state directory for one test.
fn state_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vcan-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn a_released_pod_never_takes_back_the_controller_from_the_next_pod() {
    let _bed = Testbed::take();
    let state = state_dir("handover");
    let bench = configured(
        r#"{"interfaces":[{"name":"bench","device":{"parent":"0000:00:10.0"},"bitrate":500000}]}"#,
        &state,
    );
    let settings = bench.spec().settings.clone();
    let (a, b) = (
        pod_holder("app-a", "sandbox-a"),
        pod_holder("app-b", "sandbox-b"),
    );
    let fx_a = NetnsFixture::new();
    bench
        .lend(a.clone(), &Netns::Path(fx_a.path()), "can0", &settings)
        .expect("lend to A");
    // A's sandbox goes; B asks at once, while the kernel may still be returning the controller.
    drop(fx_a);
    let fx_b = NetnsFixture::new();
    let lent = bench
        .lend(b.clone(), &Netns::Path(fx_b.path()), "can0", &settings)
        .expect("lend to B");
    assert_eq!(lent.name, "can0");
    // The pass that releases A comes after B has the controller: B keeps it, up.
    bench.release(std::slice::from_ref(&a));
    let in_b = can::get(&Netns::Path(fx_b.path()), "can0")
        .expect("get")
        .expect("B still has can0");
    assert!(in_b.up, "{in_b:?}");
    assert_eq!(in_b.parent_dev.as_deref(), Some("0000:00:10.0"));
    assert!(
        can::find_by_parent(&node(), "0000:00:10.0")
            .expect("list")
            .is_none()
    );
    let (holder, _) = bench.locate().expect("located");
    assert_eq!(holder, Some(b.clone()));

    // A failed serve of B undoes its lend: the controller is back on the node, no loan left.
    bench.abandon(&b);
    let home = can::find_by_parent(&node(), "0000:00:10.0")
        .expect("list")
        .expect("back on the node");
    assert_eq!((home.name.as_str(), home.up), ("can0", false));
    assert_eq!(bench.locate().expect("located").0, None);

    // B's own release, once lent again, returns it.
    bench
        .lend(b.clone(), &Netns::Path(fx_b.path()), "can0", &settings)
        .expect("lend to B again");
    bench.release(std::slice::from_ref(&b));
    let home = controller("0000:00:10.0");
    assert_eq!((home.name.as_str(), home.up), ("can0", false));
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn an_ifname_entry_recognises_its_controller_returned_as_dev_n() {
    let _bed = Testbed::take();
    let state = state_dir("byname");
    // The bench controller (can0 on the node) configured by parent device too: the returned
    // can2 must never be confused with it.
    let json = r#"{"interfaces":[
        {"name":"byname","device":{"ifname":"can2"},"bitrate":500000},
        {"name":"bench","device":{"parent":"0000:00:10.0"},"bitrate":500000}
    ]}"#;
    let byname = configured(json, &state);
    let settings = byname.spec().settings.clone();
    // The first pass records what can2 is.
    byname.release(&[]);
    let identity =
        std::fs::read_to_string(state.join("hardware/byname.identity")).expect("identity recorded");
    assert!(identity.contains("parent=0000:00:12.0"), "{identity}");

    let a = pod_holder("app-a", "sandbox-a");
    let fx_a = NetnsFixture::new();
    byname
        .lend(a.clone(), &Netns::Path(fx_a.path()), "can0", &settings)
        .expect("lend to A");
    drop(fx_a);
    // can0 is taken on the node by the bench controller: the kernel names it dev<N>.
    let returned = wait_for("the controller back on the node", || {
        can::find_by_parent(&node(), "0000:00:12.0").ok().flatten()
    });
    println!("returned as {}", returned.name);
    assert!(returned.name.starts_with("dev"), "{returned:?}");
    byname.release(std::slice::from_ref(&a));
    let home = controller("0000:00:12.0");
    assert_eq!((home.name.as_str(), home.up), ("can2", false));
    assert_eq!(controller("0000:00:10.0").name, "can0", "bench untouched");

    // A plugin restarted now still knows it by identity, under any name.
    can::rename(&node(), home.index, "dev9").expect("rename");
    let restarted = configured(json, &state);
    restarted.release(&[]);
    assert_eq!(controller("0000:00:12.0").name, "can2");
    let fx_b = NetnsFixture::new();
    restarted
        .lend(
            pod_holder("app-b", "sandbox-b"),
            &Netns::Path(fx_b.path()),
            "can0",
            &settings,
        )
        .expect("the next pod gets it");
    restarted.release(&[pod_holder("app-b", "sandbox-b")]);
    assert_eq!(controller("0000:00:12.0").name, "can2");
    let _ = std::fs::remove_dir_all(&state);
}
