//! containerd with its CRI plugin, run as a child process inside the test-bed VM.
//!
//! [`Containerd::start`] writes a config for a kubelet-style node without a registry: CRI with
//! the locally built pause image as `sandbox_image`, the overlayfs snapshotter, runc v2 with
//! cgroupfs, AppArmor off, and a bridge + host-local CNI network (no gateway, no masquerade) from
//! Debian's plugins in `/usr/lib/cni`. containerd's root is a tmpfs of its own, mounted for each
//! start: overlayfs snapshots cannot live on the guest's overlay root filesystem. Its state
//! (sockets, shim and runc state) is under `/run/containerd`. After the CRI service reports
//! ready, the image tars from `cargo xtask images` are imported with `ctr`.
//!
//! There is one containerd per guest, so within one process a second [`Containerd::start`]
//! waits until the first instance is stopped or dropped: tests of one binary that each start
//! their own containerd run one after the other, whatever libtest's thread count. Stopping (or
//! dropping) removes all pods through CRI, stops containerd, kills whatever it left behind and
//! unmounts its root, so the next test, or the next test binary in the same guest, starts clean.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::cri::Cri;
use crate::images::{self, ImageArchive};

/// The containerd namespace of the CRI plugin.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// Where runc v2 shims keep runc's state for [`K8S_NAMESPACE`] (a constant of the shim, not
/// derived from containerd's state directory).
const RUNC_ROOT: &str = "/run/containerd/runc/k8s.io";

/// How long containerd gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Limit for removing all pods while stopping.
const POD_REMOVAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for each `ctr images import`.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(120);
/// Console lines of containerd's log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// Where and how to run containerd. The defaults are the paths a node uses.
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// Directory for the generated config, CNI config, host-local IPAM state and the log.
    pub run_dir: PathBuf,
    /// containerd's root (images, snapshots, metadata); a fresh tmpfs is mounted here.
    pub root: PathBuf,
    /// containerd's state directory.
    pub state: PathBuf,
    /// The gRPC socket (containerd API and CRI).
    pub socket: PathBuf,
    /// Image tars imported into [`K8S_NAMESPACE`] after the first start; the first one must
    /// be the pause image named by `sandbox_image`.
    pub images: Vec<ImageArchive>,
    /// The pods' IPv4 subnet (host-local IPAM on the bridge).
    pub cni_subnet: String,
    /// containerd's `--log-level`.
    pub log_level: String,
    /// Limit for containerd to report ready (and for the images to appear in CRI).
    pub ready_timeout: Duration,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        Self {
            run_dir: "/run/vcan-e2e".into(),
            root: "/var/lib/containerd".into(),
            state: "/run/containerd".into(),
            socket: "/run/containerd/containerd.sock".into(),
            images: images::default_archives(),
            cni_subnet: "10.88.0.0/16".into(),
            log_level: "info".into(),
            ready_timeout: Duration::from_secs(120),
        }
    }
}

/// A running containerd; stopped by [`Containerd::stop`] or, best effort, on drop.
#[derive(Debug)]
pub struct Containerd {
    opts: ContainerdOptions,
    config: PathBuf,
    log: PathBuf,
    /// `None` once stopped.
    instance: Option<Instance>,
    /// Held for the instance's whole life: one containerd per process at a time.
    _exclusive: OwnedMutexGuard<()>,
    startup: Startup,
}

/// How long [`Containerd::start`] took, from the moment it was this instance's turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Startup {
    /// Until CRI reported ready (config, tmpfs, spawn, plugin initialisation).
    pub ready: Duration,
    /// Importing the images and waiting for CRI to list them.
    pub images: Duration,
}

/// What must be undone, owned apart from [`Containerd`] so it can move to a blocking task.
#[derive(Debug)]
struct Instance {
    child: Option<Child>,
    socket: PathBuf,
    root: PathBuf,
    state: PathBuf,
    root_mounted: bool,
    log: PathBuf,
}

fn exclusive() -> Arc<Mutex<()>> {
    static LOCK: OnceLock<Arc<Mutex<()>>> = OnceLock::new();
    Arc::clone(LOCK.get_or_init(|| Arc::new(Mutex::new(()))))
}

impl Containerd {
    /// Starts containerd (waiting first for any other instance of this process to stop),
    /// waits until its CRI service is ready and imports the images.
    ///
    /// Needs root, containerd, runc, `ctr`, the CNI plugins and the image tars: the test-bed
    /// VM has them all (`cargo xtask vm-test` builds the images before booting).
    pub async fn start(opts: ContainerdOptions) -> Result<Self> {
        let guard = exclusive().lock_owned().await;
        let started = Instant::now();
        for image in &opts.images {
            if !image.tar.is_file() {
                bail!(
                    "image tar {} of {} is missing: run `cargo xtask images` on the host",
                    image.tar.display(),
                    image.reference
                );
            }
        }
        if std::os::unix::net::UnixStream::connect(&opts.socket).is_ok() {
            bail!(
                "something already listens on {}: another containerd runs in this guest",
                opts.socket.display()
            );
        }
        let config = opts.run_dir.join("containerd.toml");
        let log = opts.run_dir.join("containerd.log");
        write_configs(&opts, &config)?;
        std::fs::create_dir_all(&opts.root)
            .with_context(|| format!("cannot create {}", opts.root.display()))?;
        sys::mount_tmpfs(&opts.root, "mode=0711").with_context(|| {
            format!(
                "cannot mount a tmpfs on {} (needs root, as in the test-bed VM)",
                opts.root.display()
            )
        })?;
        let mut me = Self {
            instance: Some(Instance {
                child: None,
                socket: opts.socket.clone(),
                root: opts.root.clone(),
                state: opts.state.clone(),
                root_mounted: true,
                log: log.clone(),
            }),
            opts,
            config,
            log,
            _exclusive: guard,
            startup: Startup::default(),
        };
        // From here on, a failure drops `me`, which cleans up.
        me.spawn(false)?;
        me.wait_ready().await?;
        me.startup.ready = started.elapsed();
        me.import_images().await?;
        me.startup.images = started.elapsed() - me.startup.ready;
        Ok(me)
    }

    /// How long the start took (not counting the wait for another instance to stop).
    pub fn startup(&self) -> Startup {
        self.startup
    }

    /// The gRPC socket (containerd API and CRI).
    pub fn socket(&self) -> &Path {
        &self.opts.socket
    }

    /// containerd's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The options it was started with.
    pub fn options(&self) -> &ContainerdOptions {
        &self.opts
    }

    /// The last lines of containerd's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, LOG_TAIL_LINES)
    }

    /// containerd's process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.instance
            .as_ref()
            .and_then(|i| i.child.as_ref())
            .map(Child::id)
    }

    /// Stops containerd (SIGTERM, SIGKILL after a grace period) and starts it again on the
    /// same root and state, as a node's service manager would; running pods keep running (their
    /// shims outlive containerd). Returns once CRI is ready again.
    pub async fn restart(&mut self) -> Result<()> {
        let mut instance = self.instance.take().context("containerd was stopped")?;
        let (instance, exited) = tokio::task::spawn_blocking(move || {
            let exited = instance.stop_daemon(STOP_GRACE);
            (instance, exited)
        })
        .await
        .context("the task stopping containerd panicked")?;
        self.instance = Some(instance);
        exited.context("stopping containerd for the restart")?;
        self.spawn(true)?;
        self.wait_ready().await
    }

    /// Removes all pods, stops containerd, kills anything it left running and unmounts its
    /// root. Errors report what went wrong; the cleanup is done either way.
    pub async fn stop(mut self) -> Result<()> {
        let Some(mut instance) = self.instance.take() else {
            return Ok(());
        };
        let crashed = instance.exit_status();
        let removal = if crashed.is_none() {
            let removal = tokio::time::timeout(POD_REMOVAL_TIMEOUT, async {
                Cri::connect(&self.opts.socket)
                    .await?
                    .remove_all_pods()
                    .await
            })
            .await;
            Some(flatten_timeout(removal, "removing all pods"))
        } else {
            None
        };
        let teardown = tokio::task::spawn_blocking(move || instance.teardown())
            .await
            .context("the teardown task panicked")?;
        if let Some(status) = crashed {
            bail!(
                "containerd had exited ({status}) before stop; log {}:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        if let Some(Err(err)) = removal {
            return Err(err.context("stopping containerd"));
        }
        teardown
    }

    /// Spawns the daemon, logging to the log file (appending after a restart).
    fn spawn(&mut self, append: bool) -> Result<()> {
        let instance = self.instance.as_mut().context("containerd was stopped")?;
        let log = if append {
            OpenOptions::new().create(true).append(true).open(&self.log)
        } else {
            File::create(&self.log)
        }
        .with_context(|| format!("cannot open {}", self.log.display()))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg(&self.opts.log_level)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start containerd (Debian package containerd)")?;
        instance.child = Some(child);
        Ok(())
    }

    /// Waits until CRI answers Status with every condition true.
    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut last = String::from("socket not there yet");
        loop {
            if let Some(status) = self.instance.as_mut().and_then(Instance::exit_status) {
                bail!(
                    "containerd exited ({status}) while starting; log {}:\n{}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            if self.opts.socket.exists() {
                match Cri::connect(&self.opts.socket).await {
                    Ok(cri) => match cri.ready().await {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(unmet)) => last = format!("not ready: {unmet}"),
                        Err(err) => last = format!("{err:#}"),
                    },
                    Err(err) => last = format!("{err:#}"),
                }
            }
            if started.elapsed() > self.opts.ready_timeout {
                bail!(
                    "containerd's CRI service not ready after {:?} ({last}); log {}:\n{}",
                    self.opts.ready_timeout,
                    self.log.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `ctr images import` of every image tar, then waits until CRI lists each image (the
    /// CRI plugin learns about imported images from events, asynchronously).
    async fn import_images(&self) -> Result<()> {
        for image in &self.opts.images {
            let mut cmd = tokio::process::Command::new("ctr");
            cmd.arg("--address")
                .arg(&self.opts.socket)
                .args(["--namespace", K8S_NAMESPACE, "images", "import"])
                .args(["--base-name", &image.base_name])
                .arg(&image.tar)
                .stdin(Stdio::null())
                .kill_on_drop(true);
            let out = tokio::time::timeout(IMPORT_TIMEOUT, cmd.output())
                .await
                .with_context(|| {
                    format!("importing {} took over {IMPORT_TIMEOUT:?}", image.reference)
                })?
                .context("cannot run ctr")?;
            if !out.status.success() {
                bail!(
                    "ctr images import {} failed ({}): {}{}",
                    image.tar.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let cri = Cri::connect(&self.opts.socket).await?;
        let started = Instant::now();
        for image in &self.opts.images {
            while cri.image_id(&image.reference).await?.is_none() {
                if started.elapsed() > self.opts.ready_timeout {
                    bail!(
                        "{} was imported but CRI does not list it after {:?}",
                        image.reference,
                        self.opts.ready_timeout
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let Some(mut instance) = self.instance.take() else {
            return;
        };
        if instance.exit_status().is_none() {
            let socket = self.opts.socket.clone();
            // CRI calls need a runtime, and drop may run on a runtime's thread (an async
            // test's), where blocking on a new one panics: use a thread of its own.
            let removal = std::thread::spawn(move || remove_all_pods_blocking(&socket)).join();
            match removal {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => eprintln!("vcan-e2e: removing pods at drop: {err:#}"),
                Err(_) => eprintln!("vcan-e2e: removing pods at drop panicked"),
            }
        }
        if let Err(err) = instance.teardown() {
            eprintln!("vcan-e2e: stopping containerd at drop: {err:#}");
        }
    }
}

fn remove_all_pods_blocking(socket: &Path) -> Result<usize> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build a runtime")?;
    runtime.block_on(async {
        let removal = tokio::time::timeout(POD_REMOVAL_TIMEOUT, async {
            Cri::connect(socket).await?.remove_all_pods().await
        })
        .await;
        flatten_timeout(removal, "removing all pods")
    })
}

fn flatten_timeout<T>(
    result: std::result::Result<Result<T>, tokio::time::error::Elapsed>,
    what: &str,
) -> Result<T> {
    result.unwrap_or_else(|_| bail!("{what} took over {POD_REMOVAL_TIMEOUT:?}"))
}

impl Instance {
    /// The daemon's exit status if it has exited (or was never started: `None` child counts
    /// as not running and yields `None` here too).
    fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps the process.
    fn stop_daemon(&mut self, grace: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        // Ignore errors: the process may exit between the check and the signal.
        let _ = sys::kill(child.id(), libc::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < grace {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Stops the daemon, kills what it left behind (containers, shims), unmounts its root and
    /// mounts under its state, removes the state and saves the log to the VM's results share.
    fn teardown(mut self) -> Result<()> {
        let stopped = self.stop_daemon(STOP_GRACE);
        let leftovers = kill_leftovers(&self.socket);
        unmount_below(&[self.state.as_path(), self.root.as_path()]);
        if self.root_mounted {
            // Lazily: never hang on a busy mount.
            let _ = sys::umount_lazy(&self.root);
            self.root_mounted = false;
        }
        // Stale task directories and sockets would only confuse the next containerd.
        let _ = std::fs::remove_dir_all(&self.state);
        save_log(&self.log);
        stopped.context("stopping containerd")?;
        if leftovers > 0 {
            bail!("killed {leftovers} containers or shims that outlived containerd");
        }
        Ok(())
    }
}

/// Kills containers still known to runc and shims serving `socket`; returns how many. After a
/// clean pod removal there are none. Containers go first: a killed shim would leave its
/// container running, reparented to init.
fn kill_leftovers(socket: &Path) -> usize {
    let mut killed = 0;
    if let Ok(entries) = std::fs::read_dir(RUNC_ROOT) {
        for entry in entries.flatten() {
            let id = entry.file_name();
            let deleted = Command::new("runc")
                .args(["--root", RUNC_ROOT, "delete", "--force"])
                .arg(&id)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            killed += usize::from(deleted);
        }
    }
    for pid in shims_of(socket) {
        if sys::kill(pid, libc::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// PIDs of containerd-shim processes started for the containerd on `socket` (their command
/// line has `-address <socket>`).
fn shims_of(socket: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let socket = socket.as_os_str().as_encoded_bytes();
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
            let ours = args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == socket);
            (is_shim && ours).then_some(pid)
        })
        .collect()
}

/// Lazily unmounts every mount strictly below one of `dirs`, deepest first (container rootfs
/// overlays, shm, sandbox files left by killed shims).
fn unmount_below(dirs: &[&Path]) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| dirs.iter().any(|d| p.starts_with(d) && p != d))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in points {
        let _ = sys::umount_lazy(&point);
    }
}

/// /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(p: &str) -> String {
    p.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Copies the log to the VM's results share (`$VMTEST_RESULTS`), where the host keeps it
/// after the run; does nothing outside the VM.
fn save_log(log: &Path) {
    let Some(results) = std::env::var_os("VMTEST_RESULTS").map(PathBuf::from) else {
        return;
    };
    if !results.is_dir() {
        return;
    }
    let exe = std::env::current_exe()
        .ok()
        .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "test".into());
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "containerd-{exe}-{}-{}.log",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let _ = std::fs::copy(log, results.join(name));
}

/// The last `n` lines of a file, or a note that it cannot be read.
fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// Quotes a string for TOML (JSON string escapes are valid TOML basic-string escapes).
fn toml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Writes containerd's config and the CNI network config.
fn write_configs(opts: &ContainerdOptions, config: &Path) -> Result<()> {
    let cni_dir = opts.run_dir.join("cni");
    let ipam_dir = opts.run_dir.join("cni-ipam");
    for dir in [&opts.run_dir, &cni_dir, &ipam_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let pause = opts
        .images
        .first()
        .map_or(images::PAUSE_IMAGE, |i| i.reference.as_str());
    let text = containerd_config(opts, pause, &cni_dir);
    std::fs::write(config, text).with_context(|| format!("cannot write {}", config.display()))?;
    let conflist = cni_conflist(&opts.cni_subnet, &ipam_dir);
    let path = cni_dir.join("10-vcan-e2e.conflist");
    std::fs::write(&path, conflist).with_context(|| format!("cannot write {}", path.display()))
}

fn containerd_config(opts: &ContainerdOptions, pause: &str, cni_dir: &Path) -> String {
    let path = |p: &Path| toml_str(&p.to_string_lossy());
    format!(
        r#"version = 2
root = {root}
state = {state}
# Snapshotters that cannot work here; disabled so that containerd does not probe them.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {socket}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {pause}
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {cni_dir}
    max_conf_num = 1
"#,
        root = path(&opts.root),
        state = path(&opts.state),
        socket = path(&opts.socket),
        pause = toml_str(pause),
        cni_dir = path(cni_dir),
    )
}

/// A bridge network with host-local addresses and neither gateway nor masquerading: the VM has
/// no uplink, pods only need their own network namespace.
fn cni_conflist(subnet: &str, ipam_dir: &Path) -> String {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "vcan-e2e",
        "plugins": [{
            "type": "bridge",
            "bridge": "vcane2e0",
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet }]],
                "dataDir": ipam_dir,
            },
        }],
    });
    format!("{conf:#}\n")
}

/// Thin safe wrappers over the few system calls needed here.
mod sys {
    use std::ffi::CString;
    use std::io;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    fn c_path(path: &Path) -> io::Result<CString> {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
    }

    /// kill(2).
    pub fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: kill(2) takes no pointers; any pid and signal are memory-safe.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `mount -t tmpfs -o <options> tmpfs <target>`.
    pub fn mount_tmpfs(target: &Path, options: &str) -> io::Result<()> {
        let target = c_path(target)?;
        let options = CString::new(options)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in options"))?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `umount -l <target>`.
    pub fn umount_lazy(target: &Path) -> io::Result<()> {
        let target = c_path(target)?;
        // SAFETY: the pointer is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_the_pause_image_and_cni_dir() {
        let opts = ContainerdOptions::default();
        let text = containerd_config(&opts, images::PAUSE_IMAGE, Path::new("/run/x/cni"));
        assert!(
            text.contains(r#"sandbox_image = "localhost/vcan-pause:latest""#),
            "{text}"
        );
        assert!(text.contains(r#"conf_dir = "/run/x/cni""#), "{text}");
        assert!(text.contains(r#"root = "/var/lib/containerd""#), "{text}");
        assert!(text.contains("SystemdCgroup = false"), "{text}");
        assert!(text.contains(r#"address = "/run/containerd/containerd.sock""#));
    }

    #[test]
    fn the_cni_network_has_no_gateway_or_masquerade() {
        let text = cni_conflist("10.1.0.0/16", Path::new("/run/ipam"));
        let conf: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let bridge = &conf["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["isGateway"], false);
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.1.0.0/16");
        assert_eq!(bridge["ipam"]["dataDir"], "/run/ipam");
    }

    #[test]
    fn toml_strings_are_quoted() {
        assert_eq!(toml_str("/a b"), r#""/a b""#);
        assert_eq!(toml_str(r#"x"y\"#), r#""x\"y\\""#);
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b\134c"), r"/a b\c");
    }
}
