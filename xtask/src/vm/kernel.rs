//! The guest kernel: Debian's stock `linux-image` package, downloaded once and cached under
//! `target/vm/kernel/<package>/` together with its `modules.dep` and an uncompressed `vmlinux`.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::util;

/// The metapackage whose dependency names the current kernel image.
const META_PACKAGE: &str = "linux-image-amd64";
/// Written last, so its presence means every other file of the cache entry is complete.
const READY_MARKER: &str = "ready";
/// Start of an XZ stream: where the bzImage's compressed kernel begins.
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// A kernel ready to boot, with its modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Kernel release (`uname -r` in the guest), e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// Uncompressed ELF kernel, booted through qemu's PVH entry.
    pub vmlinux: PathBuf,
    /// `lib/modules/<release>` of the extracted package, with a generated `modules.dep`.
    pub modules_dir: PathBuf,
}

/// Returns the cached kernel, downloading and preparing it first if needed.
///
/// `package` overrides the `linux-image-*` package; by default it is whatever
/// `linux-image-amd64` currently depends on. Without apt metadata (offline), the most recently
/// prepared cached kernel is used.
pub fn ensure(cache: &Path, package: Option<&str>) -> Result<Kernel> {
    let root = cache.join("kernel");
    let package = match package {
        Some(p) => p.to_string(),
        None => match current_package() {
            Ok(p) => p,
            Err(err) => {
                let dir = newest_ready(&root).with_context(|| {
                    format!("cannot find the kernel package ({err:#}) and none is cached")
                })?;
                eprintln!("[xtask] {err:#}; using cached {}", dir.display());
                return load(&dir);
            }
        },
    };
    let dir = root.join(&package);
    if dir.join(READY_MARKER).is_file() {
        return load(&dir);
    }
    prepare(&dir, &package)?;
    load(&dir)
}

/// Asks apt which kernel image `linux-image-amd64` depends on right now.
fn current_package() -> Result<String> {
    let out = util::output(Command::new("apt-cache").args(["depends", META_PACKAGE]))?;
    parse_depends(&out).with_context(|| format!("no linux-image dependency of {META_PACKAGE}"))
}

fn parse_depends(apt_cache_output: &str) -> Option<String> {
    apt_cache_output.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        dep.starts_with("linux-image-").then(|| dep.to_string())
    })
}

fn newest_ready(root: &Path) -> Result<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(root).with_context(|| format!("cannot read {}", root.display()))? {
        let dir = entry?.path();
        let Ok(meta) = fs::metadata(dir.join(READY_MARKER)) else {
            continue;
        };
        let mtime = meta.modified()?;
        if best.as_ref().is_none_or(|(t, _)| mtime > *t) {
            best = Some((mtime, dir));
        }
    }
    best.map(|(_, dir)| dir)
        .with_context(|| format!("no prepared kernel in {}", root.display()))
}

fn load(dir: &Path) -> Result<Kernel> {
    let marker = dir.join(READY_MARKER);
    let release = fs::read_to_string(&marker)
        .with_context(|| format!("cannot read {}", marker.display()))?
        .trim()
        .to_string();
    Ok(Kernel {
        vmlinux: dir.join("vmlinux"),
        modules_dir: dir.join("root/lib/modules").join(&release),
        release,
    })
}

/// Downloads (unless the .deb is already there), extracts, runs depmod and unpacks vmlinux.
fn prepare(dir: &Path, package: &str) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let deb = match find_deb(dir)? {
        Some(deb) => deb,
        None => {
            eprintln!("[xtask] downloading {package}");
            let mut cmd = Command::new("apt-get");
            // As root apt wants to drop to the `_apt` user, which cannot write into target/.
            if util::is_root() {
                cmd.args(["-o", "APT::Sandbox::User=root"]);
            }
            util::run(cmd.args(["-q", "download", package]).current_dir(dir))?;
            find_deb(dir)?
                .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?
        }
    };

    eprintln!("[xtask] extracting {}", deb.display());
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;

    // Newer packages ship modules under usr/lib only; depmod -b looks in lib/modules.
    if !root.join("lib/modules").exists() && root.join("usr/lib/modules").exists() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    let release = single_release(&root.join("lib/modules"))?;

    // The package ships no modules.dep (its postinst would run depmod); modprobe needs one.
    util::run(
        Command::new(depmod_program())
            .arg("-b")
            .arg(&root)
            .arg(&release),
    )?;

    let bzimage = root.join("boot").join(format!("vmlinuz-{release}"));
    extract_vmlinux(&bzimage, &dir.join("vmlinux"))?;
    util::write_atomic(&dir.join(READY_MARKER), format!("{release}\n").as_bytes())
}

fn find_deb(dir: &Path) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn single_release(modules: &Path) -> Result<String> {
    let mut releases = Vec::new();
    for entry in
        fs::read_dir(modules).with_context(|| format!("cannot read {}", modules.display()))?
    {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            releases.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    match releases.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel release in {}, found {releases:?}",
            modules.display()
        ),
    }
}

/// depmod lives in /sbin, which a non-root PATH may lack.
fn depmod_program() -> &'static str {
    ["/usr/sbin/depmod", "/sbin/depmod"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("depmod")
}

/// Unpacks the ELF kernel from a bzImage's XZ payload. Booting it through qemu's PVH entry skips
/// the in-guest decompression, which costs seconds under TCG.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let mut data = Vec::new();
    File::open(bzimage)
        .and_then(|mut f| f.read_to_end(&mut data))
        .with_context(|| format!("cannot read {}", bzimage.display()))?;
    let tmp = util::temp_sibling(out);
    // The magic can also occur by chance before the real payload: try each hit until one
    // decompresses to an ELF file.
    for offset in find_all(&data, XZ_MAGIC) {
        let mut input = File::open(bzimage)?;
        input.seek(SeekFrom::Start(offset as u64))?;
        let status = Command::new("xz")
            .args(["-dc", "--single-stream", "-q"])
            .stdin(Stdio::from(input))
            .stdout(Stdio::from(File::create(&tmp)?))
            .stderr(Stdio::null())
            .status()
            .context("cannot run xz")?;
        let mut head = [0u8; 4];
        let is_elf = File::open(&tmp)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && head == ELF_MAGIC;
        if status.success() && is_elf {
            fs::rename(&tmp, out)?;
            return Ok(());
        }
    }
    let _ = fs::remove_file(&tmp);
    bail!("no XZ-compressed ELF kernel found in {}", bzimage.display())
}

fn find_all<'a>(haystack: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(move |(_, w)| *w == needle)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }

    #[test]
    fn finds_every_occurrence() {
        let hits: Vec<_> = find_all(b"xxabxab", b"ab").collect();
        assert_eq!(hits, [2, 5]);
    }
}
