//! What the link layer reports on a kernel without vcan, in the CAN test-bed VM.
//!
//! This unloads the vcan module, so it lives in its own test binary: the test-bed runs binaries one
//! after another, and no other test can be using vcan meanwhile.

use std::path::PathBuf;
use std::process::Command;

use vcan_plugin::kernel::link::{CanMtu, LinkError, Links, VcanSpec};
use vcan_plugin::kernel::netns::Netns;
use vcan_test_support::{NetnsFixture, require_testbed};

const MODPROBE_KNOB: &str = "/proc/sys/kernel/modprobe";

/// Restores module autoloading and the vcan module even when the test fails.
struct RestoreVcan(String);

impl Drop for RestoreVcan {
    fn drop(&mut self) {
        let _ = std::fs::write(MODPROBE_KNOB, &self.0);
        let _ = Command::new("modprobe").arg("vcan").status();
    }
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn a_kernel_without_vcan_gets_an_error_that_says_to_load_it() {
    require_testbed();
    let saved = std::fs::read_to_string(MODPROBE_KNOB).expect("read modprobe knob");
    let _restore = RestoreVcan(saved.trim().to_string());
    // The kernel would autoload vcan on demand; pointing its modprobe at /bin/false reproduces a
    // node whose kernel has no vcan module.
    std::fs::write(MODPROBE_KNOB, "/bin/false").expect("disable autoloading");
    let status = Command::new("modprobe")
        .args(["-r", "vcan"])
        .status()
        .expect("modprobe -r");
    assert!(status.success(), "cannot unload vcan");

    let fx = NetnsFixture::new();
    let mut links =
        Links::open(&Netns::Path(PathBuf::from("/run/netns").join(fx.name()))).expect("open");
    let err = links
        .ensure_vcan(&VcanSpec {
            name: "vcan0".into(),
            mtu: CanMtu::Fd,
        })
        .expect_err("no vcan driver");
    assert!(matches!(err, LinkError::VcanUnsupported), "{err}");
    assert!(err.to_string().contains("modprobe vcan"), "{err}");
}
