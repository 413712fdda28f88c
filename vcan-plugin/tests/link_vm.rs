//! The link layer against the real kernel, in the CAN test-bed VM.

use std::process::{Command, Stdio};
use std::time::Duration;

use vcan_plugin::kernel::link::{CanMtu, LinkError, Links, VcanSpec};
use vcan_plugin::kernel::netns::{self, Netns};
use vcan_test_support::{IP, NetnsFixture, require_testbed, wait_for_can_listener};

const BIND_TIMEOUT: Duration = Duration::from_secs(20);

fn spec(name: &str, mtu: CanMtu) -> VcanSpec {
    VcanSpec {
        name: name.into(),
        mtu,
    }
}

fn host_link_names() -> Vec<String> {
    let mut names: Vec<String> = Links::current()
        .expect("route socket")
        .list()
        .expect("dump")
        .into_iter()
        .map(|l| l.name)
        .collect();
    names.sort();
    names
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn classic_and_fd_frames_cross_interfaces_created_in_a_namespace() {
    require_testbed();
    let host_before = host_link_names();
    let fx = NetnsFixture::new();
    let mut links = Links::open(&Netns::Path(fx.path())).expect("open namespace");

    let classic = links
        .ensure_vcan(&spec("vcan0", CanMtu::Classic))
        .expect("vcan0");
    let fd = links
        .ensure_vcan(&spec("vcan1", CanMtu::Fd))
        .expect("vcan1");
    assert_eq!(
        (classic.mtu, classic.up, classic.kind.as_str()),
        (16, true, "vcan")
    );
    assert_eq!((fd.mtu, fd.up, fd.kind.as_str()), (72, true, "vcan"));
    let mut listed: Vec<(String, u32)> = links
        .list_vcan()
        .expect("list")
        .into_iter()
        .map(|l| (l.name, l.mtu))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [("vcan0".to_string(), 16), ("vcan1".to_string(), 72)]
    );
    let details = fx.ip(&["-details", "link", "show", "vcan0"]);
    assert!(
        details.contains("mtu 16") && details.contains("UP"),
        "{details}"
    );

    // candump -L prints `(time) iface frame` in cansend's syntax, which makes exact comparison easy.
    let candump = Command::new(IP)
        .args(["netns", "exec", fx.name(), "timeout", "30"])
        .args(["candump", "-L", "-n", "2", "vcan0", "vcan1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("candump starts");
    wait_for_can_listener(fx.name(), "vcan0", BIND_TIMEOUT);
    wait_for_can_listener(fx.name(), "vcan1", BIND_TIMEOUT);
    fx.run_ok("cansend", &["vcan0", "5A1#11.2233.44556677.88"]);
    fx.run_ok(
        "cansend",
        &["vcan1", "1F334455##1.00112233445566778899AABBCCDDEEFF"],
    );
    let out = candump.wait_with_output().expect("candump finishes");
    assert!(
        out.status.success(),
        "candump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.split_once(' ')
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        frames,
        [
            "vcan0 5A1#1122334455667788",
            // Flags 5: the BRS bit that was sent plus CANFD_FDF, which the kernel sets on every FD frame.
            "vcan1 1F334455##500112233445566778899AABBCCDDEEFF",
        ]
    );

    // A classic-only interface refuses FD frames, as the kernel does for any MTU-16 device.
    let refused = vcan_test_support::run_in_netns(fx.name(), "cansend", &["vcan0", "123##1.11"]);
    assert!(
        !refused.status.success(),
        "FD frame accepted on a classic vcan"
    );

    assert_eq!(
        host_link_names(),
        host_before,
        "the test's own namespace changed"
    );
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn creating_is_idempotent_and_conflicts_are_errors() {
    require_testbed();
    let fx = NetnsFixture::new();
    let mut links = Links::open(&Netns::Path(fx.path())).expect("open namespace");
    let first = links
        .ensure_vcan(&spec("can0", CanMtu::Fd))
        .expect("create");
    let again = links
        .ensure_vcan(&spec("can0", CanMtu::Fd))
        .expect("same again");
    assert_eq!(
        first.index, again.index,
        "an identical request must not recreate"
    );

    let err = links
        .ensure_vcan(&spec("can0", CanMtu::Classic))
        .expect_err("other MTU");
    assert!(matches!(err, LinkError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("MTU 72"), "{err}");

    fx.ip(&["link", "add", "dummy0", "type", "dummy"]);
    let err = links
        .ensure_vcan(&spec("dummy0", CanMtu::Fd))
        .expect_err("name of a dummy");
    assert!(matches!(err, LinkError::NameTaken { .. }), "{err}");
    assert!(err.to_string().contains("dummy"), "{err}");

    let err = links
        .ensure_vcan(&spec("a-name-that-is-too-long", CanMtu::Fd))
        .expect_err("too long");
    assert!(matches!(err, LinkError::InvalidName { .. }), "{err}");

    // A vcan brought down by someone else is brought up again rather than refused.
    fx.ip(&["link", "set", "can0", "down"]);
    assert!(
        links
            .ensure_vcan(&spec("can0", CanMtu::Fd))
            .expect("adopt")
            .up
    );

    assert!(links.delete_vcan("can0").expect("delete"));
    assert!(links.get("can0").expect("get").is_none());
    assert!(!links.delete_vcan("can0").expect("already gone"));
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn interfaces_go_away_with_their_namespace() {
    require_testbed();
    let fx = NetnsFixture::new();
    let ns = Netns::Path(fx.path());
    {
        let mut links = Links::open(&ns).expect("open namespace");
        links
            .ensure_vcan(&spec("vcan0", CanMtu::Fd))
            .expect("vcan0");
        links
            .ensure_vcan(&spec("vcan1", CanMtu::Fd))
            .expect("vcan1");
    }
    let inode = netns::inode(&ns.path()).expect("namespace inode");
    drop(fx);
    assert!(!ns.path().exists(), "the namespace file is still there");
    // Nothing of ours holds the namespace (the route socket was dropped above), so the kernel
    // destroys it and every link in it: no process refers to the inode any more.
    let still_referenced = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|p| netns::inode(&p.path().join("ns/net")).ok())
        .any(|i| i == inode);
    assert!(
        !still_referenced,
        "namespace {inode} outlived its last process"
    );
}
