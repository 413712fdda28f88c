//! `cargo xtask ci`: everything CI checks, in order, stopping at the first failure.

use anyhow::{Context, Result, bail};

use crate::{manifests, setup, util, vm};

/// Runs setup, fmt, clippy, host tests and the VM tests.
pub fn ci(vm_args: &vm::tests::VmTestArgs) -> Result<()> {
    const STEPS: usize = 6;
    let root = util::workspace_root();
    let step = |n: usize, what: &str| eprintln!("\n==> [ci {n}/{STEPS}] {what}");

    step(1, "setup: Debian packages");
    setup::setup().context("setup failed")?;

    step(2, "cargo fmt --all -- --check");
    util::run(
        util::cargo()
            .args(["fmt", "--all", "--", "--check"])
            .current_dir(&root),
    )?;

    step(3, "cargo clippy --workspace --all-targets -- -D warnings");
    util::run(
        util::cargo()
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(&root),
    )?;

    step(4, "cargo test --workspace (host)");
    util::run(
        util::cargo()
            .args(["test", "--workspace"])
            .current_dir(&root),
    )?;

    step(5, "cargo xtask check-manifests");
    if !manifests::check_manifests(&manifests::CheckManifestsArgs::default())? {
        bail!("manifest checks failed");
    }

    step(6, "cargo xtask vm-test");
    if !vm::tests::vm_test(vm_args)? {
        bail!("VM tests failed");
    }
    eprintln!("\n==> ci passed");
    Ok(())
}
