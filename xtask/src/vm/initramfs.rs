//! The stage-1 initramfs: static busybox, the few modules needed to mount the host's root over
//! virtio-9p with an overlay on top, and an `/init` that does so and switches into it.
//!
//! The archive is rebuilt in memory on every run (a few MB, milliseconds) and written only when
//! its bytes changed, so any change of input (busybox, modules, init script) is picked up without
//! tracking inputs separately.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::kernel::Kernel;
use crate::util;

/// Modules that stage 1 must insmod; their dependencies are added from modules.dep.
/// virtio_pci carries the 9p transport, overlay gives a writable root over the read-only share.
const ROOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

const INIT_SCRIPT: &str = include_str!("guest/init.sh");

/// Paths where Debian's busybox-static installs the binary.
const BUSYBOX_PATHS: &[&str] = &["/usr/bin/busybox", "/bin/busybox"];

/// Builds (or reuses) the initramfs for `kernel` and returns its path.
pub fn ensure(cache: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let path = cache.join(format!("initramfs-{}.cpio", kernel.release));
    let archive = build(kernel)?;
    if fs::read(&path).ok().as_deref() != Some(archive.as_slice()) {
        eprintln!("[xtask] writing {}", path.display());
        util::write_atomic(&path, &archive)?;
    }
    Ok(path)
}

fn build(kernel: &Kernel) -> Result<Vec<u8>> {
    let busybox_path = BUSYBOX_PATHS
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("busybox not found: install busybox-static (`cargo xtask setup`)")?;
    let busybox = fs::read(busybox_path)?;
    // A dynamically linked busybox would fail as /init with no libc in the initramfs, and the
    // guest would only say "No working init found".
    if contains(&busybox, b"/lib64/ld-linux") {
        bail!(
            "{} is dynamically linked: install busybox-static",
            busybox_path.display()
        );
    }
    let applets = util::output(Command::new(busybox_path).arg("--list"))?;

    let modules = resolve_modules(&kernel.modules_dir, ROOT_MODULES)?;

    let mut cpio = Newc::default();
    for dir in [
        "bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before /init runs.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    for applet in applets.split_whitespace() {
        // `busybox --list` names busybox itself: that link would replace the binary by a
        // self-referencing symlink.
        if applet != "busybox" && !applet.contains('/') {
            cpio.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    let mut order = String::new();
    for (name, path) in &modules {
        cpio.file(&format!("modules/{name}.ko"), 0o644, &read_module(path)?);
        order.push_str(name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
    Ok(cpio.finish())
}

/// Normalises a module name the way kmod does: `can-raw` and `can_raw` are the same module.
fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Returns `(name, path)` of the wanted modules and their dependencies, dependencies first.
/// Built-in modules are skipped.
fn resolve_modules(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let dep_file = modules_dir.join("modules.dep");
    let deps = fs::read_to_string(&dep_file)
        .with_context(|| format!("cannot read {}", dep_file.display()))?;
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    let order = dependency_order(&parse_modules_dep(&deps), &builtin, wanted)?;
    Ok(order
        .into_iter()
        .map(|(name, rel)| (name, modules_dir.join(rel)))
        .collect())
}

/// modules.dep maps each module's relative path to the paths of all modules it needs.
fn parse_modules_dep(text: &str) -> HashMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let (path, deps) = line.split_once(':')?;
            let deps = deps.split_whitespace().map(module_name).collect();
            Some((module_name(path), (path.trim().to_string(), deps)))
        })
        .collect()
}

fn dependency_order(
    deps: &HashMap<String, (String, Vec<String>)>,
    builtin: &HashSet<String>,
    wanted: &[&str],
) -> Result<Vec<(String, String)>> {
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        builtin: &HashSet<String>,
        done: &mut HashSet<String>,
        out: &mut Vec<(String, String)>,
    ) -> Result<()> {
        if done.contains(name) || builtin.contains(name) {
            return Ok(());
        }
        done.insert(name.to_string());
        let (path, needs) = deps
            .get(name)
            .with_context(|| format!("module {name} is neither in modules.dep nor built in"))?;
        for need in needs {
            visit(need, deps, builtin, done, out)?;
        }
        out.push((name.to_string(), path.clone()));
        Ok(())
    }
    let mut done = HashSet::new();
    let mut out = Vec::new();
    for name in wanted {
        visit(&module_name(name), deps, builtin, &mut done, &mut out)?;
    }
    Ok(out)
}

/// Busybox insmod cannot be relied on to decompress, so compressed modules are unpacked here.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let decompressor = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match decompressor {
        None => fs::read(path).with_context(|| format!("cannot read {}", path.display())),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("cannot run {tool}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {} failed", path.display());
            }
            Ok(out.stdout)
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Writer for the "newc" cpio format the kernel unpacks. Timestamps and owners are zero so the
/// same inputs give the same bytes.
#[derive(Default)]
struct Newc {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Newc {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, 1, (0, 0), data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, 1, (0, 0), target.as_bytes());
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, 1, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        self.header(self.next_ino, mode, nlink, rdev, data.len(), name);
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        size: usize,
        name: &str,
    ) {
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            // Entries are a few MB at most, far below the format's 4 GiB limit.
            u32::try_from(size).unwrap_or(u32::MAX),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for field in fields {
            self.buf
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.header(0, 0, 1, (0, 0), 0, "TRAILER!!!");
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first_and_builtins_are_skipped() {
        let dep = "\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/drivers/net/can/vcan.ko: kernel/drivers/net/can/dev/can-dev.ko
kernel/drivers/net/can/dev/can-dev.ko:
";
        let deps = parse_modules_dep(dep);
        let builtin = HashSet::from(["netfs".to_string()]);
        let order =
            dependency_order(&deps, &builtin, &["9p", "vcan", "can-dev"]).expect("resolves");
        let names: Vec<_> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["9pnet", "fscache", "9p", "can_dev", "vcan"]);
        assert_eq!(order[3].1, "kernel/drivers/net/can/dev/can-dev.ko");
        assert!(dependency_order(&deps, &builtin, &["nope"]).is_err());
    }

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut cpio = Newc::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = cpio.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let trailer = bytes
            .windows(10)
            .position(|w| w == b"TRAILER!!!")
            .expect("trailer");
        // 110-byte header, then "init\0" padded to 116, then 10 bytes of data padded to 128.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
        assert_eq!(trailer, 128 + 110);
    }
}
