//! `cargo xtask demo` and `cargo xtask bench`: the demo node and the PreStart latency benchmark,
//! both run by host-built binaries inside the CAN test-bed VM. Both first install whatever Debian
//! packages are missing (`cargo xtask setup`): building the plugin needs clang-19 and libbpf-dev,
//! the test-bed qemu, busybox and the rest, so on a fresh machine they are the first command.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{images, setup, util, vm};

/// Builds the daemon and the e2e binaries in `profile` (`dev` or `release`), and the images.
pub(crate) fn build(profile: &str) -> Result<()> {
    eprintln!("[xtask] building vcan-plugin and the kubelet stand-in ({profile})");
    util::run(
        util::cargo()
            .args([
                "build",
                "--profile",
                profile,
                "-p",
                "vcan-plugin",
                "-p",
                "vcan-e2e",
                "--bins",
            ])
            .current_dir(util::workspace_root()),
    )?;
    images::ensure_for_vm();
    Ok(())
}

fn run_binary(
    name: &str,
    profile: &str,
    args: &[String],
    timeout: Duration,
    vm: vm::VmOptions,
) -> Result<()> {
    // Only missing packages are installed; with all present this is a dpkg query per package.
    setup::setup().context("installing the Debian packages the build and the VM need failed")?;
    build(profile)?;
    let dir = util::target_dir().join(if profile == "dev" { "debug" } else { profile });
    let path = |bin: &str| -> Result<String> {
        Ok(dir
            .join(bin)
            .to_str()
            .context("non-UTF-8 target path")?
            .to_string())
    };
    // The node starts the daemon of the same build.
    let mut command = vec![
        "env".to_string(),
        format!("VCAN_PLUGIN_BIN={}", path("vcan-plugin")?),
        path(name)?,
    ];
    command.extend(args.iter().cloned());
    let status = vm::vm_run(&command, timeout, vm)?;
    if status != 0 {
        bail!("{name} failed in the VM (exit status {status})");
    }
    Ok(())
}

/// Boots the test-bed and runs the demo node.
pub fn demo(vm: vm::VmOptions) -> Result<()> {
    run_binary("vcan-demo", "dev", &[], Duration::from_secs(300), vm)
}

/// Boots the test-bed and runs the PreStart latency benchmark.
pub fn bench(args: &[String], mut vm: vm::VmOptions) -> Result<()> {
    // Fifty running pods mean fifty runtime shims; the default guest memory is too small for them.
    if vm.memory == vm::VmOptions::default().memory {
        vm.memory = 3072;
    }
    let host = util::output(std::process::Command::new("sh").args([
        "-c",
        "echo \"$(nproc) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)\"",
    ]))
    .unwrap_or_default();
    eprintln!("[xtask] host: {}", host.trim());
    // Latency is a property of the shipped (release) build.
    run_binary("vcan-bench", "release", args, Duration::from_secs(1800), vm)
}
