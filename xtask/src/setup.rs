//! `cargo xtask setup`: installs the Debian packages the project's builds and tests need. `cargo
//! xtask ci`, `cargo xtask demo` and `cargo xtask bench` run it first.

use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::util;

/// Every Debian package the project needs, on developer machines and CI alike.
pub const PACKAGES: &[&str] = &[
    // The CAN test-bed VM (see xtask/src/vm).
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
    // CAN and networking tools, run in the guest.
    "can-utils",
    "iproute2",
    // The container runtime the plugin talks to.
    "containerd",
    "runc",
    "containernetworking-plugins",
    "umoci",
    // The eBPF program: built with clang, inspected with bpftool.
    "clang-19",
    "llvm-19",
    "libbpf-dev",
    "bpftool",
    // Metrics checks; `cargo xtask check-manifests` also needs python3 with venv for its PyPI tools.
    "prometheus",
    "python3-venv",
    // The kubelet API's protobuf definitions.
    "protobuf-compiler",
    // Buses across nodes: a DNS server answering the peer service's name in the test-bed, and
    // the tools that build cannelloni, the third-party peer the tunnel is tested against.
    "dnsmasq-base",
    "cmake",
    "g++",
];

/// Installs whatever of [`PACKAGES`] is missing; does nothing (and needs no root) otherwise.
pub fn setup() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!(
            "[xtask] all {} Debian packages are installed",
            PACKAGES.len()
        );
        return Ok(());
    }
    eprintln!("[xtask] installing {}", missing.join(" "));
    apt_get(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt_get(&install)
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.ends_with(b" installed"))
}

fn apt_get(args: &[&str]) -> Result<()> {
    let mut cmd = if util::is_root() {
        Command::new("apt-get")
    } else if util::have_program("sudo") {
        // sudo resets the environment, so DEBIAN_FRONTEND goes through env.
        let mut cmd = Command::new("sudo");
        cmd.args(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        cmd
    } else {
        bail!("installing packages needs root or sudo");
    };
    cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
    util::run(&mut cmd)
}
