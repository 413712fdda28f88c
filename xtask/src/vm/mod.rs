//! The CAN test-bed VM: Debian's stock kernel under qemu (TCG), running the host's own root
//! filesystem read-only over 9p with a tmpfs overlay, so host-built binaries run unchanged.
//!
//! [`run_in_guest`] boots it for one shell script; `vm-run` and `vm-test` are built on it, and
//! other xtask commands (demo, benchmarks) can use it the same way.
//!
//! Boot: qemu loads the uncompressed `vmlinux` through the PVH entry ([`kernel`]) and a tiny
//! busybox initramfs ([`initramfs`], `guest/init.sh`) that mounts `/` of the host and switches
//! into it; `guest/stage2.sh` then prepares the environment and runs the job from the results
//! share, where it also leaves the job's exit status.
//!
//! Cache layout under `target/vm/` (safe to delete at any time):
//! - `kernel/<package>/`: the .deb, its extracted tree with a generated modules.dep, `vmlinux`;
//! - `initramfs-<release>.cpio`;
//! - `runs/<job>-<pid>/`: `console.log`, `stage2.sh`, and `share/` (the results share: `job.sh`,
//!   `status`, `boot-seconds`, `dmesg.txt`, whatever the job wrote). Only the latest run of each
//!   job name is kept.

mod initramfs;
mod kernel;
mod qemu;
pub mod tests;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util;

const STAGE2_SCRIPT: &str = include_str!("guest/stage2.sh");
/// How much of the console to show when the VM misbehaves.
const TAIL_LINES: usize = 40;

/// VM settings shared by every command that boots the guest.
#[derive(Debug, Clone, clap::Args)]
pub struct VmOptions {
    /// Guest memory in MiB (below 256 the guest thrashes: every binary is paged in over 9p).
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Kernel package to boot instead of the one linux-image-amd64 depends on.
    #[arg(long, value_name = "PACKAGE")]
    pub kernel_package: Option<String>,
    /// Copy the whole console (boot included) to stdout.
    #[arg(long)]
    pub console: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory: 1024,
            cpus: 2,
            kernel_package: None,
            console: false,
        }
    }
}

/// One boot of the guest, running `script`.
#[derive(Debug, Clone)]
pub struct GuestJob {
    /// Names the run directory (`target/vm/runs/<name>-<pid>/`).
    pub name: String,
    /// Shell script for the guest's `/bin/sh` (the host's dash), run after the shared setup with
    /// cwd `/`, `VCAN_TESTBED=1`, and `VMTEST_RESULTS` pointing at the results share, whose
    /// files the host finds in [`GuestOutcome::results`]. Its exit status is the job's.
    pub script: String,
    /// Limit for the whole run, boot included.
    pub timeout: Duration,
    /// Copy the guest console to stdout from the start of the job.
    pub stream: bool,
    /// Memory, CPUs, kernel.
    pub vm: VmOptions,
}

impl GuestJob {
    /// A job with default VM settings, a 600 s timeout and no streaming.
    pub fn new(name: impl Into<String>, script: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            script: script.into(),
            timeout: Duration::from_secs(600),
            stream: false,
            vm: VmOptions::default(),
        }
    }
}

/// What a guest run produced. VM trouble (timeout, panic, no status) is an `Err` instead.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// Exit status of the job script.
    pub status: i32,
    /// Host directory of the results share (`$VMTEST_RESULTS` in the guest).
    pub results: PathBuf,
    /// The serial console log.
    pub console_log: PathBuf,
    /// Guest uptime when the job started (kernel boot plus stage 1 and 2).
    pub boot: Option<Duration>,
    /// Wall time of the whole VM run, from preparing the kernel to qemu's exit.
    pub wall: Duration,
}

/// The VM cache: kernels, initramfs, run directories.
fn cache_dir() -> PathBuf {
    util::target_dir().join("vm")
}

/// Host directory of the results share of this process's job named `job_name`; also useful
/// after [`run_in_guest`] failed, to collect what the guest wrote before it stopped.
pub fn results_dir(job_name: &str) -> PathBuf {
    qemu::RunDir::of(&cache_dir(), job_name).share
}

/// Boots the guest, runs the job's script in it and returns its exit status.
pub fn run_in_guest(job: &GuestJob) -> Result<GuestOutcome> {
    let started = Instant::now();
    let cache = cache_dir();
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create {}", cache.display()))?;
    let kernel = kernel::ensure(&cache, job.vm.kernel_package.as_deref())?;
    let initramfs = initramfs::ensure(&cache, &kernel)?;
    // The guest sees target/ through the host root share: the end-to-end tests import these.
    crate::images::ensure_for_vm();
    crate::cannelloni::ensure_for_vm();
    crate::python_can::ensure_for_vm();

    let run = qemu::RunDir::create(&cache, &job.name)?;
    let stage2 = run.dir.join("stage2.sh");
    std::fs::write(&stage2, STAGE2_SCRIPT)?;
    std::fs::write(run.share.join("job.sh"), &job.script)?;

    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet vmtest.stage2={} vmtest.modules={}",
        cmdline_path(&stage2)?,
        cmdline_path(&kernel.modules_dir)?,
    );
    let qemu = qemu::Qemu {
        vmlinux: &kernel.vmlinux,
        initramfs: &initramfs,
        cmdline,
        results_share: &run.share,
        memory_mib: job.vm.memory,
        cpus: job.vm.cpus,
        console_log: &run.console_log,
        stream: job.stream || job.vm.console,
        stream_all: job.vm.console,
        timeout: job.timeout,
    };
    let exit = qemu.run()?;
    let wall = started.elapsed();

    let tail = || qemu::console_tail(&run.console_log, TAIL_LINES);
    let status = std::fs::read_to_string(run.share.join("status")).ok();
    let status = match (exit, status) {
        (qemu::Exit::TimedOut, _) => bail!(
            "the VM did not finish within {} s; last console lines ({}):\n{}",
            job.timeout.as_secs(),
            run.console_log.display(),
            tail()
        ),
        (qemu::Exit::Exited(how), None) => {
            let setup = std::fs::read_to_string(run.share.join("setup-error"))
                .map(|e| format!("guest setup failed: {}", e.trim()))
                .unwrap_or_else(|_| {
                    let log = std::fs::read(&run.console_log).unwrap_or_default();
                    if String::from_utf8_lossy(&log).contains("Kernel panic") {
                        "the guest kernel panicked".into()
                    } else {
                        "guest panic or setup failure?".into()
                    }
                });
            bail!(
                "the VM stopped ({how}) without reporting an exit status ({setup}); last \
                 console lines ({}):\n{}",
                run.console_log.display(),
                tail()
            )
        }
        (qemu::Exit::Exited(_), Some(text)) => text.trim().parse::<i32>().with_context(|| {
            format!(
                "unreadable guest status {text:?} in {}",
                run.share.display()
            )
        })?,
    };
    let boot = std::fs::read_to_string(run.share.join("boot-seconds"))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok());
    Ok(GuestOutcome {
        status,
        results: run.share,
        console_log: run.console_log,
        boot,
        wall,
    })
}

/// The kernel command line is split at whitespace and has no quoting the guest scripts parse.
fn cmdline_path(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))?;
    if text.chars().any(char::is_whitespace) {
        bail!("the VM cannot use a path with whitespace: {text:?}");
    }
    Ok(text.to_string())
}

/// `cargo xtask vm-run`: runs a host command in the guest, streaming its output.
pub fn vm_run(command: &[String], timeout: Duration, vm: VmOptions) -> Result<i32> {
    let (program, args) = command.split_first().context("no command given")?;
    let cwd = std::env::current_dir().context("no current directory")?;
    // The guest mounts fresh tmpfs on these, hiding the host's files.
    let hidden = ["/tmp", "/run", "/dev", "/proc", "/sys"]
        .iter()
        .any(|dir| cwd.starts_with(dir));
    let cwd = if hidden {
        eprintln!(
            "[xtask] {} is not visible in the guest; running from /",
            cwd.display()
        );
        "/".to_string()
    } else {
        util::sh_quote(&cwd.to_string_lossy())
    };
    let mut script = format!("cd {cwd} || exit 125\nexec {}", util::sh_quote(program));
    for arg in args {
        script.push(' ');
        script.push_str(&util::sh_quote(arg));
    }
    script.push('\n');

    let job = GuestJob {
        timeout,
        stream: true,
        vm,
        ..GuestJob::new("vm-run", script)
    };
    let outcome = run_in_guest(&job)?;
    eprintln!(
        "[xtask] guest exit status {} (boot {}, wall {:.1} s)",
        outcome.status,
        outcome
            .boot
            .map_or_else(|| "?".to_string(), |b| format!("{:.1} s", b.as_secs_f64())),
        outcome.wall.as_secs_f64()
    );
    Ok(outcome.status)
}
