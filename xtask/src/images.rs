//! `cargo xtask images`: the container images the end-to-end tests run in the guest's containerd.
//!
//! Nothing in the test-bed can reach a registry, so the images are assembled on the host from
//! the host's own binaries with Debian's `umoci` and saved as OCI-layout tars that
//! `ctr -n k8s.io images import --base-name <base name> <tar>` accepts (the `vcan-e2e` crate does
//! that in the guest):
//!
//! - `localhost/vcan-pause:latest` (`vcan-pause.tar`): busybox-static only; the sandbox
//!   ("pause") image of the guest's CRI plugin. Its entrypoint sleeps until SIGTERM/SIGINT.
//! - `localhost/vcan-canutils:latest` (`vcan-canutils.tar`): busybox with its applets in `/bin`,
//!   dash as `/bin/sh`, iproute2's `ip` and can-utils, with the shared libraries they need.
//! - `localhost/vcan-plugin:dev` (`vcan-plugin.tar`): the plugin as deploy/Dockerfile ships it,
//!   see [`PLUGIN`]; the image test (tests/e2e/tests/image_vm.rs) runs the daemon from it.
//!
//! Each tar holds `oci-layout`, `index.json` and `blobs/`; the index's only manifest carries the
//! `org.opencontainers.image.ref.name` annotation with the image's tag (`latest`, `dev`), which
//! containerd 1.6's import turns into `<base name>:<tag>`. The cache is `target/images/`: each
//! tar has a `.stamp` next to it recording this file's hash and the size and mtime of every host
//! file that went in (the plugin binary included), so a cached run only stats a few dozen files
//! and an apt upgrade or a rebuilt plugin rebuilds.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::util;

/// An image the tests need.
struct Image {
    /// Name given to `ctr images import --base-name`; the image becomes `<base_name>:<tag>`.
    base_name: &'static str,
    /// The tag the image gets inside the layout, and thus after import.
    tag: &'static str,
    /// File name of the OCI-layout tar in [`images_dir`].
    file: &'static str,
    /// Produces inputs that are not host packages (the plugin binary); runs before the cache
    /// check, so that a changed input is noticed.
    prepare: Option<fn() -> Result<()>>,
    /// Host programs copied into the image, as (host path, path in the image). Their shared
    /// libraries come along (found with `ldd`).
    programs: fn() -> Vec<(PathBuf, String)>,
    /// What to install when a program is missing.
    missing_hint: &'static str,
    /// Copy the programs without their debug info (`strip --strip-debug`), as a release build
    /// has none; their libraries are copied as they are.
    strip_debug: bool,
    /// Empty directories of the root filesystem, besides the parents of what is copied.
    dirs: &'static [&'static str],
    /// `/etc/passwd` (`/etc/group` has `root` and `nogroup`).
    passwd: &'static str,
    /// Entrypoint of the image config.
    entrypoint: &'static [&'static str],
    /// Command (arguments to the entrypoint) of the image config.
    cmd: &'static [&'static str],
    /// `User` of the image config; empty leaves it unset (root).
    user: &'static str,
    /// `ExposedPorts` of the image config, e.g. `9720/tcp`.
    exposed_ports: &'static [&'static str],
    /// Whether `/bin` gets a symlink for every busybox applet (except those in [`SHADOWED`]),
    /// `sh` pointing at dash and `ip` at iproute2's `/sbin/ip`.
    applets: bool,
}

/// The tag of the test images.
const TAG: &str = "latest";
/// Root filesystem skeleton of the test images.
const TEST_DIRS: &[&str] = &[
    "bin", "sbin", "usr/bin", "etc", "root", "tmp", "proc", "sys", "dev",
];
/// `/etc/passwd` of the test images.
const TEST_PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
/// What the test images' programs come from.
const TEST_PACKAGES: &str = "Debian packages busybox-static, dash, iproute2, can-utils; \
                             `cargo xtask setup`";
/// PATH in the image config (Docker's default, so `/sbin/ip` wins over anything in `/bin`).
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// busybox-static; every image has it.
const BUSYBOX: &str = "/bin/busybox";

/// Applets not linked into `/bin`: `busybox` itself (a self-symlink would replace the binary),
/// `sh` (dash instead: busybox's shell always runs its own `ip` applet, even when PATH names
/// iproute2's, so `sh -c 'ip -details link'` would not show CAN details) and `ip` (iproute2's).
const SHADOWED: &[&str] = &["busybox", "sh", "ip"];

/// can-utils' programs in the can-utils image.
const CAN_UTILS: &[&str] = &[
    "candump",
    "cansend",
    "cangen",
    "canbusload",
    "cangw",
    "canplayer",
    "cansniffer",
    "cansequence",
    "canfdtest",
    "canlogserver",
    "asc2log",
    "log2asc",
    "log2long",
    "isotpsend",
    "isotprecv",
    "isotpdump",
    "isotpsniffer",
];

const PAUSE: Image = Image {
    base_name: "localhost/vcan-pause",
    tag: TAG,
    file: "vcan-pause.tar",
    prepare: None,
    programs: || vec![(BUSYBOX.into(), "/bin/busybox".into())],
    missing_hint: TEST_PACKAGES,
    strip_debug: false,
    dirs: TEST_DIRS,
    passwd: TEST_PASSWD,
    // A bare `sleep` as PID 1 of its namespace would ignore SIGTERM (the kernel drops signals
    // without a handler for a namespace's init), so a shell with a trap waits for it instead.
    entrypoint: &[
        "/bin/busybox",
        "sh",
        "-c",
        "trap 'exit 0' TERM INT; busybox sleep 2147483647 & wait $!",
    ],
    cmd: &[],
    user: "",
    exposed_ports: &[],
    applets: false,
};

const CANUTILS: Image = Image {
    base_name: "localhost/vcan-canutils",
    tag: TAG,
    file: "vcan-canutils.tar",
    prepare: None,
    programs: || {
        let mut programs = vec![
            (BUSYBOX.into(), "/bin/busybox".into()),
            ("/bin/dash".into(), "/bin/dash".into()),
            // Debian's /sbin/ip is a symlink to /bin/ip; copying reads through it.
            ("/sbin/ip".into(), "/sbin/ip".into()),
        ];
        programs.extend(
            CAN_UTILS
                .iter()
                .map(|p| (Path::new("/usr/bin").join(p), format!("/usr/bin/{p}"))),
        );
        programs
    },
    missing_hint: TEST_PACKAGES,
    strip_debug: false,
    dirs: TEST_DIRS,
    passwd: TEST_PASSWD,
    entrypoint: &[],
    cmd: &["/bin/sh"],
    user: "",
    exposed_ports: &[],
    applets: true,
};

/// Where deploy/Dockerfile installs the plugin, and thus the image's entrypoint.
const PLUGIN_PATH: &str = "/usr/local/bin/vcan-plugin";

/// The plugin's image: the equivalent of deploy/Dockerfile's default (last) stage `plugin`,
/// assembled without a Docker engine.
///
/// - Stage `build` (rust + clang-19 + libbpf-dev, `cargo build --release --locked`): here the
///   workspace's own `cargo build --package vcan-plugin --bin vcan-plugin` on the host
///   ([`build_plugin`]), in the debug profile the VM tests use, the same toolchain
///   (rust-toolchain.toml) and Debian 12 as the Dockerfile's; its debug info is stripped as a
///   release build has none. (The eBPF object is built and embedded by build.rs either way.)
/// - Stage `plugin` (`FROM gcr.io/distroless/cc-debian12`, `COPY --from=build ...
///   /usr/local/bin/vcan-plugin`): the binary at the same path plus exactly the shared libraries
///   `ldd` names for it (libc, libm, libgcc_s, the dynamic loader: the part of distroless/cc the
///   binary uses), `/etc/passwd` and `/etc/group` with root, `/tmp` (1777) and the empty mount
///   points `/proc`, `/sys`, `/dev`. Left out of distroless/cc because the binary uses none of
///   them: CA certificates (and the `SSL_CERT_FILE` variable naming them), tzdata, netbase,
///   nsswitch.conf, os-release, libstdc++ and libgomp. No shell, no package manager, nothing
///   executable but the plugin.
/// - Config: `ENTRYPOINT ["/usr/local/bin/vcan-plugin"]` and `EXPOSE 9720` from the Dockerfile;
///   `User` 0, working directory `/` and `PATH` as distroless/cc's root variant sets them (the
///   Dockerfile has no `USER`/`ENV` of its own). The DaemonSet passes the settings as `VCAN_*`
///   variables or flags.
const PLUGIN: Image = Image {
    base_name: "localhost/vcan-plugin",
    tag: "dev",
    file: "vcan-plugin.tar",
    prepare: Some(build_plugin),
    programs: || vec![(plugin_binary(), PLUGIN_PATH.into())],
    missing_hint: "the vcan-plugin binary; `cargo build --package vcan-plugin`",
    strip_debug: true,
    dirs: &["etc", "tmp", "proc", "sys", "dev"],
    // distroless's entries: there is no shell to log in with.
    passwd: "root:x:0:0:root:/root:/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    entrypoint: &[PLUGIN_PATH],
    cmd: &[],
    user: "0",
    exposed_ports: &["9720/tcp"],
    applets: false,
};

/// Every image, in build order.
const IMAGES: &[&Image] = &[&PAUSE, &CANUTILS, &PLUGIN];

/// The creation date recorded in the images.
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// Changing this file (the recipes) invalidates the cache.
const RECIPE: &str = include_str!("images.rs");

/// The image cache directory, `target/images/`.
pub fn images_dir() -> PathBuf {
    util::target_dir().join("images")
}

/// `cargo xtask images`: builds whatever image is missing or stale and lists them all.
pub fn images(force: bool) -> Result<()> {
    let started = Instant::now();
    for (image, path, built) in ensure_all(force)? {
        eprintln!(
            "[xtask] {}:{}: {} ({})",
            image.base_name,
            image.tag,
            path.display(),
            if built { "built" } else { "cached" }
        );
    }
    eprintln!(
        "[xtask] images ready in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The debug build of the plugin, as the end-to-end tests' `vcan_e2e::plugin::binary()` runs it.
fn plugin_binary() -> PathBuf {
    util::target_dir().join("debug").join("vcan-plugin")
}

/// Builds the plugin binary. Always, not only when it is missing: `cargo test` of another
/// package (e.g. `vm-test -p vcan-e2e`) does not rebuild a stale binary, and an up-to-date build
/// costs cargo a fraction of a second.
fn build_plugin() -> Result<()> {
    let mut cmd = util::cargo();
    cmd.args([
        "build",
        "--quiet",
        "--package",
        "vcan-plugin",
        "--bin",
        "vcan-plugin",
    ])
    .current_dir(util::workspace_root());
    util::run(&mut cmd).context("building the vcan-plugin binary for its image")
}

/// For the VM commands, before boot: makes sure the images exist. A failure is only a warning,
/// so that a host without umoci can still run the VM tests that need no containers; the
/// end-to-end tests then fail, naming the missing tar.
pub fn ensure_for_vm() {
    let started = Instant::now();
    match ensure_all(false) {
        Ok(list) => {
            if list.iter().any(|(_, _, built)| *built) {
                eprintln!(
                    "[xtask] built the container images in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        Err(err) => eprintln!(
            "[xtask] warning: cannot build the container images (end-to-end tests will fail): \
             {err:#}"
        ),
    }
}

/// Builds the stale images; returns every image with its tar and whether it was rebuilt.
fn ensure_all(force: bool) -> Result<Vec<(&'static Image, PathBuf, bool)>> {
    let dir = images_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut out = Vec::new();
    for &image in IMAGES {
        if let Some(prepare) = image.prepare {
            prepare().with_context(|| format!("building {}:{}", image.base_name, image.tag))?;
        }
        let tar = dir.join(image.file);
        let stamp = stamp_path(&tar);
        let fresh = !force && tar.is_file() && stamp_is_fresh(&stamp, &primary_inputs(image));
        if !fresh {
            build(image, &dir, &tar, &stamp)
                .with_context(|| format!("building {}:{}", image.base_name, image.tag))?;
        }
        out.push((image, tar, !fresh));
    }
    Ok(out)
}

fn stamp_path(tar: &Path) -> PathBuf {
    let mut name = tar.file_name().unwrap_or_default().to_os_string();
    name.push(".stamp");
    tar.with_file_name(name)
}

/// The host files an image is built from, without their libraries (those are found by `ldd`
/// when building and recorded in the stamp).
fn primary_inputs(image: &Image) -> Vec<PathBuf> {
    (image.programs)()
        .into_iter()
        .map(|(host, _)| host)
        .collect()
}

/// 64-bit FNV-1a: enough to notice that the recipe changed.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One stamp line: size, mtime and path of an input; `None` if it cannot be read.
fn fingerprint(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!(
        "{} {}.{:09} {}",
        meta.len(),
        mtime.as_secs(),
        mtime.subsec_nanos(),
        path.display()
    ))
}

fn recipe_line() -> String {
    format!("recipe {:016x}", fnv1a(RECIPE))
}

/// The stamp records the recipe hash and a fingerprint of every input (libraries included);
/// it is fresh when all of them still match and it covers every current primary input.
fn stamp_is_fresh(stamp: &Path, primaries: &[PathBuf]) -> bool {
    let Ok(text) = std::fs::read_to_string(stamp) else {
        return false;
    };
    let mut lines = text.lines();
    if lines.next() != Some(recipe_line().as_str()) {
        return false;
    }
    let mut recorded = BTreeSet::new();
    for line in lines {
        let Some(path) = line.splitn(3, ' ').nth(2) else {
            return false;
        };
        if fingerprint(Path::new(path)).as_deref() != Some(line) {
            return false;
        }
        recorded.insert(PathBuf::from(path));
    }
    primaries.iter().all(|p| recorded.contains(p))
}

/// Builds one image into `tar` (atomically) and writes its stamp.
fn build(image: &Image, dir: &Path, tar: &Path, stamp: &Path) -> Result<()> {
    check_tools()?;
    // Per-process work directory: concurrent builds never share one, and the last rename wins
    // with an equally valid tar.
    let work = dir.join(format!(".{}-build-{}", image.file, std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    let result = build_in(image, &work, tar, stamp);
    // Best effort: a leftover work directory only costs disk space.
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn check_tools() -> Result<()> {
    for (program, package) in [
        ("umoci", "umoci"),
        ("tar", "tar"),
        ("ldd", "libc-bin"),
        ("strip", "binutils"),
    ] {
        if !util::have_program(program) {
            bail!(
                "`{program}` is missing: install the Debian package {package} (`cargo xtask setup`)"
            );
        }
    }
    Ok(())
}

fn build_in(image: &Image, work: &Path, tar: &Path, stamp: &Path) -> Result<()> {
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    std::fs::create_dir_all(&rootfs)?;

    // Inputs are fingerprinted before they are copied, so a file replaced during the build
    // makes the next run rebuild rather than trust a stale image.
    let mut inputs: Vec<PathBuf> = primary_inputs(image);
    let mut copies = (image.programs)();
    let mut libraries = BTreeSet::new();
    for (host, _) in &copies {
        if !host.is_file() {
            bail!("{} is missing ({})", host.display(), image.missing_hint);
        }
        libraries.extend(shared_libraries(host)?);
    }
    for lib in &libraries {
        copies.push((lib.clone(), lib.to_string_lossy().into_owned()));
        inputs.push(lib.clone());
    }
    let mut stamp_text = recipe_line();
    stamp_text.push('\n');
    for input in &inputs {
        let line =
            fingerprint(input).with_context(|| format!("cannot stat {}", input.display()))?;
        writeln!(stamp_text, "{line}")?;
    }

    for dir in image.dirs {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    if image.dirs.contains(&"tmp") {
        std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    }
    let programs = primary_inputs(image);
    for (host, dest) in &copies {
        let target = rootfs.join(dest.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if image.strip_debug && programs.contains(host) {
            util::run(
                Command::new("strip")
                    .arg("--strip-debug")
                    .arg("-o")
                    .arg(&target)
                    .arg(host),
            )?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
            continue;
        }
        // fs::copy reads through symlinks (/sbin/ip, libc.so.6) and keeps the mode bits.
        std::fs::copy(host, &target)
            .with_context(|| format!("cannot copy {} to {}", host.display(), target.display()))?;
    }
    if image.applets {
        link_applets(&rootfs)?;
        symlink("dash", rootfs.join("bin/sh"))?;
        // Also for PATHs that list /bin first.
        symlink("/sbin/ip", rootfs.join("bin/ip"))?;
    }
    std::fs::write(rootfs.join("etc/passwd"), image.passwd)?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;

    let layer = work.join("layer.tar");
    write_tar(&rootfs, &layer)?;
    let image_ref = format!("{}:{}", layout.display(), image.tag);
    run_umoci(&["init", "--layout", &layout.to_string_lossy()])?;
    run_umoci(&["new", "--image", &image_ref])?;
    run_umoci(&[
        "raw",
        "add-layer",
        // Fixed history (not "now"): the same inputs give the same image ID.
        "--history.created",
        EPOCH,
        "--history.created_by",
        "cargo xtask images",
        "--image",
        &image_ref,
        &layer.to_string_lossy(),
    ])?;
    let mut config = vec![
        "config".to_string(),
        "--no-history".into(),
        "--image".into(),
        image_ref.clone(),
        "--created".into(),
        EPOCH.into(),
        "--config.workingdir".into(),
        "/".into(),
        "--config.env".into(),
        PATH_ENV.into(),
    ];
    for arg in image.entrypoint {
        config.extend(["--config.entrypoint".to_string(), (*arg).to_string()]);
    }
    for arg in image.cmd {
        config.extend(["--config.cmd".to_string(), (*arg).to_string()]);
    }
    if !image.user.is_empty() {
        config.extend(["--config.user".to_string(), image.user.to_string()]);
    }
    for port in image.exposed_ports {
        config.extend(["--config.exposedports".to_string(), (*port).to_string()]);
    }
    let config: Vec<&str> = config.iter().map(String::as_str).collect();
    run_umoci(&config)?;
    run_umoci(&["gc", "--layout", &layout.to_string_lossy()])?;

    let tmp = util::temp_sibling(tar);
    write_tar(&layout, &tmp)?;
    std::fs::rename(&tmp, tar).with_context(|| format!("cannot rename to {}", tar.display()))?;
    util::write_atomic(stamp, stamp_text.as_bytes())
}

/// The shared libraries `program` loads (the dynamic loader included), by their canonical
/// paths as `ldd` resolves them on this host; none for a static program.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .with_context(|| format!("cannot run ldd {}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable")
        || err.contains("not a dynamic executable")
        || text.contains("statically linked")
    {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed ({}): {err}", program.display(), out.status);
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", program.display()))
}

/// Parses `ldd` output: `name => /path (0x…)`, `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO
/// has no file and is skipped.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("{} not found", name.trim());
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Symlinks every busybox applet into `/bin` (as `busybox`), except the shadowed ones and any
/// name that is a real program in the image already.
fn link_applets(rootfs: &Path) -> Result<()> {
    let list = util::output(Command::new(BUSYBOX).arg("--list"))?;
    for applet in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if SHADOWED.contains(&applet) || applet.contains('/') {
            continue;
        }
        let taken = ["bin", "sbin", "usr/bin"]
            .iter()
            .any(|dir| rootfs.join(dir).join(applet).exists());
        if !taken {
            symlink("busybox", rootfs.join("bin").join(applet))?;
        }
    }
    Ok(())
}

/// A tar of `dir`'s contents (entries relative, without `./`), with fixed owners and times so
/// the same inputs give the same bytes.
fn write_tar(dir: &Path, out: &Path) -> Result<()> {
    let mut entries: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    let mut cmd = Command::new("tar");
    cmd.args([
        "--create",
        "--format=gnu",
        "--sort=name",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--mtime=@0",
    ])
    .arg("--file")
    .arg(out)
    .arg("--directory")
    .arg(dir)
    .arg("--")
    .args(&entries);
    util::run(&mut cmd)
}

fn run_umoci(args: &[&str]) -> Result<()> {
    // These subcommands only edit the layout (no unpacking), so they need no root: the layer's
    // owners come from `write_tar`.
    util::run(Command::new("umoci").args(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibbpf.so.1 => /lib/x86_64-linux-gnu/libbpf.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(text).expect("parses");
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libbpf.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn the_plugin_image_has_the_dockerfiles_entrypoint_and_port() {
        let dockerfile = std::fs::read_to_string(util::workspace_root().join("deploy/Dockerfile"))
            .expect("deploy/Dockerfile");
        // The last stage is the default target, the image the DaemonSet runs.
        let last_stage = dockerfile
            .rsplit_once("\nFROM ")
            .map(|(_, stage)| stage)
            .expect("a FROM line");
        let entrypoint = format!("ENTRYPOINT [\"{}\"]", PLUGIN.entrypoint.join("\", \""));
        assert!(
            last_stage.contains(&entrypoint),
            "{entrypoint} in\n{last_stage}"
        );
        for port in PLUGIN.exposed_ports {
            let port = port.trim_end_matches("/tcp");
            assert!(
                last_stage.contains(&format!("EXPOSE {port}")),
                "{last_stage}"
            );
        }
        assert!(last_stage.contains(&format!("/out/vcan-plugin {PLUGIN_PATH}")));
        // No USER: distroless/cc's root variant, whose user PLUGIN sets.
        assert!(!last_stage.contains("\nUSER "), "{last_stage}");
        assert_eq!(PLUGIN.user, "0");
    }

    #[test]
    fn the_stamp_notices_changed_inputs() {
        let dir = std::env::temp_dir().join(format!("xtask-images-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let input = dir.join("input");
        std::fs::write(&input, "one").expect("write input");
        let stamp = dir.join("x.stamp");
        let line = fingerprint(&input).expect("fingerprint");
        std::fs::write(&stamp, format!("{}\n{line}\n", recipe_line())).expect("write stamp");
        assert!(stamp_is_fresh(&stamp, std::slice::from_ref(&input)));
        // A primary input the stamp does not cover (e.g. a new program in the recipe).
        assert!(!stamp_is_fresh(&stamp, &[input.clone(), dir.join("other")]));
        std::fs::write(&input, "three").expect("rewrite input");
        assert!(!stamp_is_fresh(&stamp, &[input]));
        std::fs::write(&stamp, "recipe 0\n").expect("write stamp");
        assert!(!stamp_is_fresh(&stamp, &[]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
