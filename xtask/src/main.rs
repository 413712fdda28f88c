//! Developer commands for vcan-plugin (`cargo xtask <command>`).
//!
//! The host kernel has no CAN support, so everything that needs vcan, vxcan, can-gw or eBPF on
//! CAN interfaces runs in a qemu VM booting Debian's stock kernel; see [`vm`].

mod bench_dataplane;
mod cannelloni;
mod ci;
mod demo;
mod images;
mod manifests;
mod python_can;
mod setup;
mod util;
mod vm;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer commands for vcan-plugin"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the VM tests (every ignored test) in the CAN test-bed VM.
    VmTest(vm::tests::VmTestArgs),
    /// Boot the test-bed VM and run a host command in it; exits with the command's status.
    VmRun {
        /// Limit for the VM run, boot included, in seconds.
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        timeout: u64,
        /// VM settings.
        #[command(flatten)]
        vm: vm::VmOptions,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build the container images of the end-to-end tests into target/images/ (if stale).
    Images {
        /// Rebuild even if the cached images are up to date.
        #[arg(long)]
        force: bool,
    },
    /// The demo node: boot the test-bed, start containerd, vcan-plugin and the kubelet stand-in,
    /// run the example pod with two vcan interfaces, show candump receiving cansend's frame.
    Demo {
        /// VM settings.
        #[command(flatten)]
        vm: vm::VmOptions,
    },
    /// PreStart latency benchmark in the test-bed: p50/p99 over pods started one after another
    /// and all at once (see BENCHMARKS.md).
    Bench {
        /// VM settings.
        #[command(flatten)]
        vm: vm::VmOptions,
        /// Arguments for the benchmark (e.g. `-- --sequential 100 --concurrent 50`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Data-plane benchmark in the test-bed: cangen flood without/with the eBPF counters and
    /// with a userspace counter, scrape cost and RSS with 1000 attached vcans (see BENCHMARKS.md).
    BenchDataplane {
        /// VM settings.
        #[command(flatten)]
        vm: vm::VmOptions,
        /// Arguments for the benchmark (e.g. `-- --frames 200000 --rounds 9 --no-scrape`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Shared-bus benchmark in the test-bed: member→member latency through a bus vs a single
    /// vcan, and frames/s per member with 8 members (see BENCHMARKS.md).
    BenchBus {
        /// VM settings.
        #[command(flatten)]
        vm: vm::VmOptions,
        /// Arguments for the benchmark (e.g. `-- --members 8 --frames 20000 --rounds 5`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Buses across nodes in the test-bed: two nodes joined by the UDP tunnel, latency to a
    /// member on the same node vs on the other, throughput and loss (see BENCHMARKS.md).
    BenchXnode {
        /// VM settings.
        #[command(flatten)]
        vm: vm::VmOptions,
        /// Arguments for the benchmark (e.g. `-- --latency-frames 2000 --flood-frames 20000`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install the Debian packages the project needs (only those missing).
    Setup,
    /// Setup, fmt, clippy, host tests and VM tests, stopping at the first failure.
    Ci(vm::tests::VmTestArgs),
    /// Check deploy/ and dashboards/: render and validate the manifests, promtool the alerts and
    /// the dashboard's queries (Python tools in a virtualenv under target/).
    CheckManifests(manifests::CheckManifestsArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::VmTest(args) => Ok(if vm::tests::vm_test(&args)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Cmd::VmRun {
            timeout,
            vm,
            command,
        } => {
            let status = vm::vm_run(&command, Duration::from_secs(timeout), vm)?;
            // Statuses outside 0..=255 cannot be passed on; report them as plain failure.
            Ok(u8::try_from(status).map_or(ExitCode::FAILURE, ExitCode::from))
        }
        Cmd::Images { force } => images::images(force).map(|()| ExitCode::SUCCESS),
        Cmd::Demo { vm } => demo::demo(vm).map(|()| ExitCode::SUCCESS),
        Cmd::Bench { vm, args } => demo::bench(&args, vm).map(|()| ExitCode::SUCCESS),
        Cmd::BenchBus { vm, args } => {
            bench_dataplane::bench_bus(&args, vm).map(|()| ExitCode::SUCCESS)
        }
        Cmd::BenchXnode { vm, args } => {
            bench_dataplane::bench_xnode(&args, vm).map(|()| ExitCode::SUCCESS)
        }
        Cmd::BenchDataplane { vm, args } => {
            bench_dataplane::bench_dataplane(&args, vm).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Setup => setup::setup().map(|()| ExitCode::SUCCESS),
        Cmd::Ci(args) => ci::ci(&args).map(|()| ExitCode::SUCCESS),
        Cmd::CheckManifests(args) => Ok(if manifests::check_manifests(&args)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
    }
}
