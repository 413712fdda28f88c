//! cannelloni, the third-party CAN-over-UDP tunnel the cross-node buses are tested against: built
//! on the host (before the VM boots, as compiling under TCG would take many minutes) from the
//! source archive kept beside the workspace, into `target/cannelloni/`. None of its code is part of
//! the project.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util;

/// The directory holding the build script and source archive, outside the workspace:
/// `$VCAN_CANNELLONI_DIR` if set, else `shared/third_party/cannelloni` beside the workspace.
fn source_dir() -> PathBuf {
    match std::env::var_os("VCAN_CANNELLONI_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => util::workspace_root().join("../shared/third_party/cannelloni"),
    }
}

/// Where the binary goes; the end-to-end tests look for it here.
pub fn dir() -> PathBuf {
    util::target_dir().join("cannelloni")
}

/// Builds cannelloni unless it is there already.
pub fn ensure() -> Result<PathBuf> {
    let binary = dir().join("cannelloni");
    if binary.is_file() {
        return Ok(binary);
    }
    let script = source_dir().join("build.sh");
    if !script.is_file() {
        bail!(
            "{} is missing (set VCAN_CANNELLONI_DIR to the directory with cannelloni's build.sh \
             and source archive)",
            script.display()
        );
    }
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(dir());
    util::run(&mut cmd).context("building cannelloni (needs cmake and g++: cargo xtask setup)")?;
    eprintln!(
        "[xtask] built cannelloni in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(binary)
}

/// For the VM commands, before boot. A failure is only a warning, so that the VM tests that do
/// not need it still run; the cross-node test then fails, naming the missing binary.
pub fn ensure_for_vm() {
    if let Err(err) = ensure() {
        eprintln!(
            "[xtask] warning: cannot build cannelloni (the cross-node bus test will fail): {err:#}"
        );
    }
}
