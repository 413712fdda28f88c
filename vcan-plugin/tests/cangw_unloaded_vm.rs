//! What vxcan and can-gw management report on a kernel without those modules, in the CAN test-bed
//! VM.
//!
//! This unloads `can_gw` and `vxcan`, so it lives in its own test binary: the test-bed runs
//! binaries one after another, and no other test can be using them meanwhile.

use std::process::Command;

use vcan_plugin::kernel::cangw::{Gateway, GatewayError};
use vcan_plugin::kernel::link::CanMtu;
use vcan_plugin::kernel::netns::Netns;
use vcan_plugin::kernel::vxcan::{self, VxcanError, VxcanSpec};
use vcan_plugin::telemetry::health::{self, Health};
use vcan_test_support::{NetnsFixture, require_testbed};

const MODPROBE_KNOB: &str = "/proc/sys/kernel/modprobe";

/// Restores module autoloading and the modules even when the test fails.
struct RestoreModules(String);

impl Drop for RestoreModules {
    fn drop(&mut self) {
        let _ = std::fs::write(MODPROBE_KNOB, &self.0);
        let _ = Command::new("modprobe")
            .args(["-a", "can_gw", "vxcan"])
            .status();
    }
}

fn unload(module: &str) {
    let status = Command::new("modprobe")
        .args(["-r", module])
        .status()
        .expect("modprobe -r");
    assert!(status.success(), "cannot unload {module}");
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn cangw_without_the_modules_the_errors_say_what_to_load() {
    require_testbed();
    let saved = std::fs::read_to_string(MODPROBE_KNOB).expect("read modprobe knob");
    let _restore = RestoreModules(saved.trim().to_string());
    // The kernel would autoload vxcan on demand (can-gw it never does); pointing its modprobe at
    // /bin/false reproduces a node whose kernel lacks the modules.
    std::fs::write(MODPROBE_KNOB, "/bin/false").expect("disable autoloading");
    let (a, b) = (NetnsFixture::new(), NetnsFixture::new());
    assert_eq!(health::probe_bus(), Health::Healthy, "with both modules");

    unload("can_gw");
    // The buses' health probe: what turns the bus devices Unhealthy, with the advice.
    match health::probe_bus() {
        Health::Unhealthy(why) => assert!(why.contains("modprobe can-gw"), "{why}"),
        Health::Healthy => panic!("buses reported healthy without can-gw"),
    }
    let err = Gateway::open(&Netns::Path(b.path())).expect_err("no can-gw");
    assert!(matches!(err, GatewayError::NotLoaded), "{err}");
    assert!(err.to_string().contains("modprobe can-gw"), "{err}");

    unload("vxcan");
    let err = vxcan::ensure(
        &Netns::Path(a.path()),
        &Netns::Path(b.path()),
        &VxcanSpec {
            name: "can0".into(),
            peer_name: "busA1".into(),
            mtu: CanMtu::Fd,
        },
    )
    .expect_err("no vxcan driver");
    assert!(matches!(err, VxcanError::VxcanUnsupported), "{err}");
    assert!(err.to_string().contains("modprobe vxcan"), "{err}");
    let err = vxcan::probe().expect_err("the probe finds no vxcan driver either");
    assert!(matches!(err, VxcanError::VxcanUnsupported), "{err}");
    match health::probe_bus() {
        Health::Unhealthy(why) => assert!(why.contains("modprobe vxcan"), "{why}"),
        Health::Healthy => panic!("buses reported healthy without vxcan"),
    }
}
