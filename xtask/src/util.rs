//! Small helpers shared by the xtask commands: running programs, locating the workspace.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Root of the cargo workspace (the parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is baked in at compile time, so this works whatever the caller's cwd is.
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().unwrap_or(xtask_dir).to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` like cargo itself does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The cargo binary that runs us, so nested builds use the same toolchain.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs a command with inherited stdio and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Runs a command, capturing stdout (stderr is passed through), and fails unless it succeeds.
pub fn output(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out: Output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !out.status.success() {
        bail!("`{what}` failed ({})", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{what}` printed non-UTF-8 output"))
}

/// True when the program exists somewhere on PATH (or at the given path).
pub fn have_program(program: impl AsRef<OsStr>) -> bool {
    let program = Path::new(program.as_ref());
    if program.components().count() > 1 {
        return program.is_file();
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// True when we run as root (CI does; developers may not).
pub fn is_root() -> bool {
    // Reading /proc avoids a libc dependency just for geteuid().
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Quotes a string for POSIX sh so it reaches the command as one literal argument.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A sibling path for writing `path`'s new contents before renaming them into place; unique per
/// process so concurrent runs never write the same temporary file.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes a file via a temporary sibling and a rename, so an interrupted or concurrent run never
/// sees a half-written cache entry.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
}

/// Creates (or refreshes) a virtualenv at `venv` with the pinned PyPI packages of `requirements`
/// and returns its interpreter. A stamp file in the venv records the requirements installed, so
/// the venv is rebuilt whenever that file changes and left alone otherwise. `python` creates it
/// (default: /usr/bin/python3, else python3 on PATH); `what` names the packages in messages.
pub fn ensure_venv(
    venv: &Path,
    requirements: &Path,
    python: Option<&Path>,
    what: &str,
) -> Result<PathBuf> {
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
    run(Command::new(&interpreter)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--requirement",
        ])
        .arg(requirements))
    .with_context(|| format!("installing {what} from PyPI failed"))?;
    write_atomic(&stamp, wanted.as_bytes())?;
    Ok(interpreter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(sh_quote("/usr/bin/ip"), "/usr/bin/ip");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote("$HOME"), "'$HOME'");
    }
}
