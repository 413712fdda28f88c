//! `cargo xtask bench-dataplane`: the data-plane benchmark of the eBPF CAN counters (flood
//! overhead, scrape cost with many interfaces), run by the release build of
//! `vcan-plugin/examples/dataplane_bench.rs` inside the CAN test-bed VM; `bench-bus` and
//! `bench-xnode`, the shared-bus benchmarks, run the same way. See BENCHMARKS.md.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{demo, setup, util, vm};

/// The figures file the example writes on the results share.
const SUMMARY: &str = "dataplane-bench.txt";

/// Builds the example (release), boots the test-bed, runs it with `args`, prints the figures.
pub fn bench_dataplane(args: &[String], mut vm: vm::VmOptions) -> Result<()> {
    // A thousand attachments and namespaces need more than the default guest memory.
    if vm.memory == vm::VmOptions::default().memory {
        vm.memory = 2048;
    }
    run_example("dataplane_bench", SUMMARY, args, vm)
}

/// `cargo xtask bench-bus`: the shared-bus benchmark (`vcan-plugin/examples/bus_bench.rs`), latency
/// and throughput through a bus vs a single vcan. See BENCHMARKS.md.
pub fn bench_bus(args: &[String], vm: vm::VmOptions) -> Result<()> {
    run_example("bus_bench", "bus-bench.txt", args, vm)
}

/// `cargo xtask bench-xnode`: a bus across two nodes (`tests/e2e/src/bin/vcan-xnode-bench.rs`),
/// latency to a member on the same node vs on another, throughput and loss through the tunnel.
/// It needs the daemon (two instances), containerd and the images, like `cargo xtask bench`.
pub fn bench_xnode(args: &[String], vm: vm::VmOptions) -> Result<()> {
    setup::setup().context("installing the Debian packages the build and the VM need failed")?;
    // Latency is a property of the shipped (release) build; this also builds the images.
    demo::build("release")?;
    let dir = util::target_dir().join("release");
    let path = |bin: &str| -> Result<String> {
        Ok(util::sh_quote(
            dir.join(bin).to_str().context("non-UTF-8 target path")?,
        ))
    };
    // The nodes start the daemon of the same build.
    let mut script = format!(
        "exec env VCAN_PLUGIN_BIN={} {}",
        path("vcan-plugin")?,
        path("vcan-xnode-bench")?
    );
    for arg in args {
        script.push(' ');
        script.push_str(&util::sh_quote(arg));
    }
    script.push('\n');
    run_and_report("bench-xnode", script, "xnode-bench.txt", vm)
}

/// Builds the example `example` (release), runs it in the test-bed with `args` and
/// `--summary <results>/<summary>`, and prints the figures it wrote there.
fn run_example(example: &str, summary: &str, args: &[String], vm: vm::VmOptions) -> Result<()> {
    eprintln!("[xtask] building the {example} example (release)");
    util::run(
        util::cargo()
            .args([
                "build",
                "--release",
                "-p",
                "vcan-plugin",
                "--example",
                example,
            ])
            .current_dir(util::workspace_root()),
    )?;
    let binary = util::target_dir().join("release/examples").join(example);
    let binary = binary.to_str().context("non-UTF-8 target path")?;
    let mut script = format!(
        "exec {} --summary \"$VMTEST_RESULTS/{summary}\"",
        util::sh_quote(binary)
    );
    for arg in args {
        script.push(' ');
        script.push_str(&util::sh_quote(arg));
    }
    script.push('\n');
    run_and_report(&example.replace('_', "-"), script, summary, vm)
}

/// Boots the test-bed for job `name` running `script` (as root, streaming its output), then
/// prints the host, the host's load before and after, and the figures the job left in the
/// results share as `summary`. Fails if the script did.
fn run_and_report(name: &str, script: String, summary: &str, vm: vm::VmOptions) -> Result<()> {
    let host = util::output(std::process::Command::new("sh").args([
        "-c",
        "echo \"$(date -u +%F), host: $(nproc) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB, \
         $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)\"",
    ]))
    .unwrap_or_default();

    let job = vm::GuestJob {
        timeout: Duration::from_secs(3600),
        stream: true,
        vm,
        ..vm::GuestJob::new(name, script)
    };
    // Other VMs or builds on the host slow the guest's vCPUs unevenly: say how busy it was.
    let load_before = loadavg();
    let outcome = vm::run_in_guest(&job)?;
    let load_after = loadavg();
    let figures = std::fs::read_to_string(outcome.results.join(summary)).unwrap_or_default();
    println!("\n[xtask] {}", host.trim());
    println!(
        "[xtask] guest boot {}, wall {:.0} s",
        outcome
            .boot
            .map_or_else(|| "?".to_string(), |b| format!("{:.1} s", b.as_secs_f64())),
        outcome.wall.as_secs_f64()
    );
    println!("[xtask] host load average (1 min) before {load_before}, after {load_after}");
    print!("{figures}");
    if outcome.status != 0 {
        bail!(
            "{name} failed in the VM (exit status {}; console: {})",
            outcome.status,
            outcome.console_log.display()
        );
    }
    Ok(())
}

/// The host's 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
