//! Checks of the CAN test-bed VM itself: the guest kernel has working vcan and vxcan, and the
//! helpers of this crate work there. These run before any of the plugin's own VM tests can.

use std::process::{Command, Stdio};
use std::time::Duration;

use vcan_test_support::{IP, NetnsFixture, require_testbed, wait_for_can_listener};

/// Generous: under TCG a listener can take seconds to bind.
const BIND_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn vcan_carries_a_frame_from_cansend_to_candump() {
    require_testbed();
    let ns = NetnsFixture::new();
    ns.ip(&["link", "add", "vcan0", "type", "vcan"]);
    ns.ip(&["link", "set", "vcan0", "up"]);
    let details = ns.ip(&["-details", "link", "show", "vcan0"]);
    assert!(details.contains("link/can"), "{details}");

    // `timeout` bounds the listener even if the frame never comes.
    let candump = Command::new(IP)
        .args(["netns", "exec", ns.name(), "timeout", "30"])
        .args(["candump", "-n", "1", "vcan0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("candump starts");
    wait_for_can_listener(ns.name(), "vcan0", BIND_TIMEOUT);
    ns.run_ok("cansend", &["vcan0", "5A1#11.2233.44556677.88"]);

    let out = candump.wait_with_output().expect("candump finishes");
    assert!(
        out.status.success(),
        "candump: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "  vcan0  5A1   [8]  11 22 33 44 55 66 77 88\n"
    );
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn vxcan_pair_links_two_namespaces() {
    require_testbed();
    let a = NetnsFixture::new();
    let b = NetnsFixture::new();
    a.ip(&[
        "link",
        "add",
        "vxa",
        "type",
        "vxcan",
        "peer",
        "name",
        "vxb",
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", "vxa", "up"]);
    b.ip(&["link", "set", "vxb", "up"]);

    let candump = Command::new(IP)
        .args(["netns", "exec", b.name(), "timeout", "30"])
        .args(["candump", "-n", "1", "vxb"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("candump starts");
    wait_for_can_listener(b.name(), "vxb", BIND_TIMEOUT);
    a.run_ok("cansend", &["vxa", "12345678#DEADBEEF"]);

    let out = candump.wait_with_output().expect("candump finishes");
    assert!(out.status.success(), "candump: {}", out.status);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "  vxb  12345678   [4]  DE AD BE EF\n"
    );
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn can_modules_are_loaded() {
    require_testbed();
    for module in [
        "can", "can_raw", "can_dev", "vcan", "vxcan", "can_gw", "can_bcm",
    ] {
        assert!(
            std::path::Path::new("/sys/module").join(module).exists(),
            "module {module} is not loaded"
        );
    }
}
