//! `cargo xtask vm-test`: builds the workspace's test binaries on the host and runs their
//! ignored tests in the guest.
//!
//! Convention: every `#[ignore]`d test in this workspace is a VM test (ignore reason "needs the
//! CAN test-bed VM"), so `--ignored` selects exactly the tests that need the guest kernel.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use super::{GuestJob, VmOptions, results_dir, run_in_guest};
use crate::util::{self, sh_quote};

/// The ignore reason of VM tests (the same string as `vcan_test_support::IGNORE_REASON`).
const IGNORE_REASON: &str = "needs the CAN test-bed VM";

/// Arguments of `cargo xtask vm-test`.
#[derive(Debug, Clone, clap::Args)]
pub struct VmTestArgs {
    /// Run only VM tests whose name contains one of these (libtest filters).
    pub filters: Vec<String>,
    /// Build and run only this package's tests (repeatable; default: the whole workspace).
    #[arg(short, long = "package", value_name = "SPEC")]
    pub packages: Vec<String>,
    /// Limit for the VM run, boot included, in seconds (the end-to-end tests start well over a
    /// hundred pods under emulation).
    #[arg(long, default_value_t = 3000, value_name = "SECONDS")]
    pub timeout: u64,
    /// Extra libtest arguments for every test binary (e.g. `-- --exact`).
    #[arg(last = true)]
    pub test_args: Vec<String>,
    /// VM settings.
    #[command(flatten)]
    pub vm: VmOptions,
}

/// A test executable cargo built, with the VM tests it holds.
#[derive(Debug, Clone)]
struct TestBinary {
    executable: PathBuf,
    manifest_dir: PathBuf,
    /// Human name: crate directory, target name and kind.
    label: String,
    /// Ignored tests matching the filters.
    selected: usize,
}

/// Tally of one binary's run in the guest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    passed: usize,
    failed: usize,
}

/// Runs the VM tests; returns whether all of them passed.
pub fn vm_test(args: &VmTestArgs) -> Result<bool> {
    let started = Instant::now();
    warn_native_cpu();
    let (binaries, total) = select_binaries(args)?;
    let built_in = started.elapsed();

    let (counts, vm_error) = if binaries.is_empty() {
        eprintln!("[xtask] no VM test matches; not booting the VM");
        (Counts::default(), None)
    } else {
        run_binaries(&binaries, args, built_in)
    };

    let skipped = total.saturating_sub(counts.passed + counts.failed);
    let mut summary = format!("vm: {} passed, {} failed", counts.passed, counts.failed);
    if skipped > 0 {
        summary.push_str(&format!(", {skipped} skipped"));
    }
    println!("{summary} (wall {:.1} s)", started.elapsed().as_secs_f64());
    if let Some(err) = vm_error {
        return Err(err);
    }
    if counts.passed == 0 && args.filters.is_empty() {
        eprintln!("[xtask] no VM test ran: every VM test must be #[ignore = \"{IGNORE_REASON}\"]");
        return Ok(false);
    }
    Ok(counts.failed == 0)
}

/// Builds the test binaries and keeps those with ignored tests matching the filters; also
/// returns how many ignored tests there are in all, filters aside.
fn select_binaries(args: &VmTestArgs) -> Result<(Vec<TestBinary>, usize)> {
    let mut binaries = Vec::new();
    let mut total = 0;
    for (executable, manifest_dir, label) in build_test_binaries(&args.packages)? {
        let selected = count_ignored(&executable, &manifest_dir, &args.filters, &args.test_args)?;
        total += if args.filters.is_empty() {
            selected
        } else {
            count_ignored(&executable, &manifest_dir, &[], &args.test_args)?
        };
        if selected > 0 {
            binaries.push(TestBinary {
                executable,
                manifest_dir,
                label,
                selected,
            });
        }
    }
    Ok((binaries, total))
}

/// Boots the guest for the selected binaries and prints their output. VM trouble comes back as
/// the error, after whatever the guest had finished has been reported.
fn run_binaries(
    binaries: &[TestBinary],
    args: &VmTestArgs,
    built_in: Duration,
) -> (Counts, Option<anyhow::Error>) {
    let job = GuestJob {
        timeout: Duration::from_secs(args.timeout),
        stream: true,
        vm: args.vm.clone(),
        ..GuestJob::new("vm-test", guest_script(binaries, args))
    };
    eprintln!(
        "[xtask] running {} VM test(s) from {} test binar{} in the guest",
        binaries.iter().map(|b| b.selected).sum::<usize>(),
        binaries.len(),
        if binaries.len() == 1 { "y" } else { "ies" }
    );
    let (results, timing, error) = match run_in_guest(&job) {
        Ok(outcome) => {
            let timing = format!(
                "[xtask] build+list {:.1} s, guest boot {}, VM run {:.1} s",
                built_in.as_secs_f64(),
                outcome
                    .boot
                    .map_or_else(|| "?".into(), |b| format!("{:.1} s", b.as_secs_f64())),
                outcome.wall.as_secs_f64()
            );
            // The job script itself never fails on test failures; non-zero means it broke.
            let error = (outcome.status != 0).then(|| {
                anyhow!(
                    "the guest job failed with status {} (console: {})",
                    outcome.status,
                    outcome.console_log.display()
                )
            });
            (outcome.results, Some(timing), error)
        }
        Err(err) => (results_dir(&job.name), None, Some(err)),
    };
    let mut counts = Counts::default();
    for (i, binary) in binaries.iter().enumerate() {
        let c = report_binary(binary, &results, i + 1);
        counts.passed += c.passed;
        counts.failed += c.failed;
    }
    if let Some(timing) = timing {
        eprintln!("{timing}");
    }
    (counts, error)
}

/// Building on the host for the host CPU would give binaries the TCG guest CPU cannot run.
fn warn_native_cpu() {
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        if std::env::var(var).is_ok_and(|v| v.contains("target-cpu=native")) {
            eprintln!(
                "[xtask] warning: {var} has target-cpu=native; the guest CPU has no AVX-512 and \
                 may die with Illegal instruction"
            );
        }
    }
}

/// `cargo test --no-run`, returning each test executable with its crate directory and a label.
fn build_test_binaries(packages: &[String]) -> Result<Vec<(PathBuf, PathBuf, String)>> {
    // The end-to-end tests run the daemon binary, which cargo builds for vcan-plugin's own
    // integration tests only: with `-p vcan-e2e` alone it would be whatever an earlier build left.
    if packages.is_empty() || packages.iter().any(|p| p == "vcan-e2e") {
        let mut cmd = util::cargo();
        cmd.args(["build", "--package", "vcan-plugin", "--bin", "vcan-plugin"])
            .current_dir(util::workspace_root());
        util::run(&mut cmd).context("building the vcan-plugin daemon for the end-to-end tests")?;
    }
    let mut cmd = util::cargo();
    cmd.args([
        "test",
        "--no-run",
        "--tests",
        "--message-format=json-render-diagnostics",
    ]);
    if packages.is_empty() {
        cmd.arg("--workspace");
    } else {
        for p in packages {
            cmd.args(["--package", p]);
        }
    }
    cmd.current_dir(util::workspace_root());
    eprintln!("[xtask] {}", util::describe(&cmd));
    let json = util::output(&mut cmd)?;
    let root = util::workspace_root();
    let mut out: Vec<(PathBuf, PathBuf, String)> = Vec::new();
    for line in json.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        let manifest_dir = Path::new(manifest)
            .parent()
            .context("manifest path without a parent")?
            .to_path_buf();
        let name = msg["target"]["name"].as_str().unwrap_or("?");
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("?");
        let dir = manifest_dir.strip_prefix(&root).unwrap_or(&manifest_dir);
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let label = format!("{} {kind} `{name}`", dir.display());
        let exe = PathBuf::from(exe);
        if !out.iter().any(|(e, _, _)| *e == exe) {
            out.push((exe, manifest_dir, label));
        }
    }
    Ok(out)
}

/// Counts a binary's ignored tests by asking it on the host (`--list --ignored`).
fn count_ignored(exe: &Path, dir: &Path, filters: &[String], extra: &[String]) -> Result<usize> {
    let mut cmd = Command::new(exe);
    cmd.args(["--list", "--ignored", "--format", "terse"])
        .args(extra)
        .args(filters)
        .current_dir(dir)
        .stdin(Stdio::null());
    let listing = util::output(&mut cmd)?;
    Ok(listing.lines().filter(|l| l.ends_with(": test")).count())
}

/// The guest job: each binary runs with its crate directory as cwd, like under `cargo test`,
/// its output and status going to the results share.
fn guest_script(binaries: &[TestBinary], args: &VmTestArgs) -> String {
    let mut script = String::from("export RUST_BACKTRACE=1\n");
    // Test knobs set on the host (e.g. VCAN_TEST_FAULT_CYCLES) reach the guest's tests.
    for (key, value) in std::env::vars().filter(|(k, _)| k.starts_with("VCAN_TEST_")) {
        script.push_str(&format!("export {key}={}\n", sh_quote(&value)));
    }
    let n = binaries.len();
    for (i, b) in binaries.iter().enumerate() {
        let i = i + 1;
        let dir = sh_quote(&b.manifest_dir.to_string_lossy());
        script.push_str(&format!(
            "echo {}\n",
            sh_quote(&format!(
                "vmtest: [{i}/{n}] {}: {} test(s)",
                b.label, b.selected
            ))
        ));
        let mut run = format!(
            "(cd {dir} && CARGO_MANIFEST_DIR={dir} exec {} --ignored",
            sh_quote(&b.executable.to_string_lossy())
        );
        for arg in args.test_args.iter().chain(&args.filters) {
            run.push(' ');
            run.push_str(&sh_quote(arg));
        }
        script.push_str(&format!(
            "{run}) >\"$VMTEST_RESULTS/test-{i}.out\" 2>&1\necho $? >\"$VMTEST_RESULTS/test-{i}.rc\"\n"
        ));
    }
    script
}

/// Prints a binary's guest output and returns its tally.
fn report_binary(binary: &TestBinary, results: &Path, index: usize) -> Counts {
    let out_path = results.join(format!("test-{index}.out"));
    // Tests may print anything; a missing file means the binary never started.
    let output =
        String::from_utf8_lossy(&std::fs::read(&out_path).unwrap_or_default()).into_owned();
    let rc = std::fs::read_to_string(results.join(format!("test-{index}.rc")))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    println!("──── {} ────", binary.label);
    print!("{output}");
    if !output.ends_with('\n') && !output.is_empty() {
        println!();
    }
    let parsed = parse_result_line(&output);
    let counts = tally(parsed, rc, binary.selected);
    match rc {
        None => println!("(did not finish: the VM stopped first; counted as failed)"),
        Some(rc) if rc != 0 && parsed.is_none_or(|c| c.failed == 0) => println!(
            "(test binary exited with status {rc} without reporting failures: counted as failed)"
        ),
        _ => {}
    }
    counts
}

/// Combines the libtest summary with the exit status: a binary that crashed or exited non-zero
/// without reporting a failure still fails, for every selected test it did not pass.
fn tally(parsed: Option<Counts>, rc: Option<i32>, selected: usize) -> Counts {
    match (parsed, rc) {
        // Fewer tests ran than the binary listed on the host: the missing ones count as failed.
        (Some(c), Some(0)) if c.passed + c.failed < selected => Counts {
            passed: c.passed,
            failed: selected - c.passed,
        },
        (Some(c), Some(0)) => c,
        (Some(c), _) if c.failed > 0 => c,
        (parsed, _) => {
            let passed = parsed.map_or(0, |c| c.passed);
            Counts {
                passed,
                failed: selected.saturating_sub(passed).max(1),
            }
        }
    }
}

/// Parses libtest's `test result: ok. 3 passed; 0 failed; ...` line.
fn parse_result_line(output: &str) -> Option<Counts> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.starts_with("test result:"))?;
    let mut counts = Counts::default();
    for part in line.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(what), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<usize>() else {
            continue;
        };
        match what {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            _ => {}
        }
    }
    Some(counts)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_libtest_summaries() {
        let ok = "running 1 test\ntest a ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; \
                  0 measured; 2 filtered out; finished in 0.55s\n\n";
        assert_eq!(
            parse_result_line(ok),
            Some(Counts {
                passed: 1,
                failed: 0
            })
        );
        let bad = "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(
            parse_result_line(bad),
            Some(Counts {
                passed: 2,
                failed: 1
            })
        );
        assert_eq!(parse_result_line("thread 'main' panicked"), None);
    }

    #[test]
    fn a_crashed_binary_counts_as_failed() {
        let c = |passed, failed| Counts { passed, failed };
        assert_eq!(tally(Some(c(2, 0)), Some(0), 2), c(2, 0));
        assert_eq!(tally(Some(c(1, 1)), Some(101), 2), c(1, 1));
        assert_eq!(tally(None, Some(132), 3), c(0, 3));
        assert_eq!(tally(None, None, 3), c(0, 3));
        assert_eq!(tally(Some(c(2, 0)), Some(1), 2), c(2, 1));
        // A binary that ran fewer tests than it listed.
        assert_eq!(tally(Some(c(1, 0)), Some(0), 3), c(1, 2));
    }
}
