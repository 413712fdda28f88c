//! python-can from PyPI, the real socketcand client the socketcand endpoint is tested against
//! (through `tests/e2e/scripts/socketcand_client.py`): built on the host, before the VM boots,
//! into a virtualenv at `target/python-can-venv/`, with the packages pinned in
//! `tests/e2e/scripts/requirements-python-can.txt`. The guest sees the venv through the host root
//! share and runs its interpreter, which is the host's /usr/bin/python3 (the same Debian python3
//! the guest has). None of its code is part of the project.

use std::path::PathBuf;

use anyhow::Result;

use crate::util;

/// The pinned requirements, relative to the workspace root.
const REQUIREMENTS: &str = "tests/e2e/scripts/requirements-python-can.txt";

/// The virtualenv; the end-to-end tests run `bin/python` in it.
pub fn venv_dir() -> PathBuf {
    util::target_dir().join("python-can-venv")
}

/// Creates the virtualenv unless it is there with the pinned packages already; returns its
/// interpreter.
pub fn ensure() -> Result<PathBuf> {
    util::ensure_venv(
        &venv_dir(),
        &util::workspace_root().join(REQUIREMENTS),
        None,
        "python-can (the socketcand client)",
    )
}

/// For the VM commands, before boot. A failure is only a warning, so that the VM tests that do
/// not need it still run; the socketcand endpoint test then fails, naming the missing interpreter.
pub fn ensure_for_vm() {
    if let Err(err) = ensure() {
        eprintln!(
            "[xtask] warning: cannot install python-can (the socketcand endpoint test will fail): \
             {err:#}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_pin_python_can_and_every_dependency() {
        let path = util::workspace_root().join(REQUIREMENTS);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
        let pins: Vec<(&str, &str)> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                l.split_once("==")
                    .unwrap_or_else(|| panic!("{}: `{l}` is not pinned", path.display()))
            })
            .collect();
        assert!(pins.contains(&("python-can", "4.6.1")), "{pins:?}");
        for (name, version) in &pins {
            assert!(
                !name.is_empty()
                    && !version.is_empty()
                    && version
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.'),
                "{}: `{name}=={version}` is not an exact pin",
                path.display()
            );
        }
    }

    #[test]
    fn the_venv_is_under_the_target_directory() {
        assert!(venv_dir().starts_with(util::target_dir()));
        assert!(venv_dir().ends_with("python-can-venv"));
    }
}
