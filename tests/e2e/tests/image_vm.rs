//! The plugin run from its container image (`localhost/vcan-plugin:dev`, the equivalent of
//! deploy/Dockerfile's `plugin` stage built by `cargo xtask images`) as a pod, with
//! deploy/base/daemonset.yaml's security context, volumes and settings, in the CAN test-bed VM:
//! containerd's CRI, the kubelet stand-in, a client pod using two interfaces, and clean-up.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vcan_e2e::cri::{HostMount, Profile, Propagation, SecurityContext, parse_cri_log};
use vcan_e2e::images::{self, CANUTILS_IMAGE, PLUGIN_IMAGE};
use vcan_e2e::node::Node;
use vcan_e2e::{ContainerSpec, Containerd, ContainerdOptions, Cri, PodSpec};
use vcan_plugin::kernel::netns::Netns;
use vcan_test_support::kubelet::Kubelet;
use vcan_test_support::require_testbed;

const RESOURCE: &str = "socketcan.io/vcan";
/// The DaemonSet's `VCAN_DEVICES`.
const DEVICES: usize = 100;
/// The DaemonSet's host paths (volumes), which are also its container paths.
const DEVICE_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
const POD_RESOURCES_DIR: &str = "/var/lib/kubelet/pod-resources";
const CONTAINERD_RUN: &str = "/run/containerd";
const NETNS_DIR: &str = "/var/run/netns";
const BPFFS: &str = "/sys/fs/bpf";
/// The plugin's socket in the device-plugin directory (`<domain>-<name>.sock`).
const PLUGIN_SOCKET: &str = "socketcan.io-vcan.sock";
/// Where the stand-in kubelet keeps the plugin pod's `tmp` emptyDir (`medium: Memory`).
const EMPTY_DIR: &str = "/run/vcan-image-e2e/tmp";
/// The entrypoint of the image, as the plugin's process shows it.
const PLUGIN_EXE: &str = "/usr/local/bin/vcan-plugin";
/// The DaemonSet's `terminationGracePeriodSeconds`.
const GRACE: Duration = Duration::from_secs(30);
/// The capabilities the DaemonSet adds (after dropping ALL), as `capabilities(7)` numbers:
/// NET_ADMIN 12, SYS_ADMIN 21, SYS_RESOURCE 24, PERFMON 38, BPF 39.
const ADDED_CAPS: [&str; 5] = ["SYS_ADMIN", "NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"];
const ADDED_CAP_MASK: u64 = 1 << 12 | 1 << 21 | 1 << 24 | 1 << 38 | 1 << 39;
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
const SEED_FRAME: &str = "5A1#11.2233.44556677.88";
const SEED_LOGGED: &str = "vcan0 5A1#1122334455667788";

/// The plugin pod as the DaemonSet's template makes it: image, `VCAN_*` environment, volumes
/// and security context as in deploy/base/daemonset.yaml (hostNetwork false, no command: the
/// image's entrypoint).
fn plugin_pod() -> PodSpec {
    let mut pod = PodSpec::new("vcan-plugin", "vcan-plugin-x7k2p");
    pod.labels = HashMap::from([
        ("app.kubernetes.io/name".into(), "vcan-plugin".into()),
        ("app.kubernetes.io/component".into(), "device-plugin".into()),
    ]);
    let mut c = ContainerSpec::new("vcan-plugin", PLUGIN_IMAGE, Vec::<String>::new());
    c.env = HashMap::from(
        [
            ("VCAN_RESOURCE_NAME", RESOURCE.to_string()),
            ("VCAN_DEVICES", DEVICES.to_string()),
            ("VCAN_DEVICE_PLUGIN_DIR", DEVICE_PLUGIN_DIR.into()),
            (
                "VCAN_POD_RESOURCES_SOCKET",
                format!("{POD_RESOURCES_DIR}/kubelet.sock"),
            ),
            (
                "VCAN_CONTAINERD_SOCKET",
                format!("{CONTAINERD_RUN}/containerd.sock"),
            ),
            ("VCAN_METRICS_ADDRESS", "0.0.0.0:9720".into()),
            // Not in the DaemonSet: debug logs for this test's diagnostics.
            ("RUST_LOG", "vcan_plugin=debug,info".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    c.mounts = vec![
        HostMount::new(DEVICE_PLUGIN_DIR, DEVICE_PLUGIN_DIR),
        HostMount::new(POD_RESOURCES_DIR, POD_RESOURCES_DIR).readonly(),
        HostMount::new(CONTAINERD_RUN, CONTAINERD_RUN).readonly(),
        HostMount::new(NETNS_DIR, NETNS_DIR)
            .readonly()
            .propagation(Propagation::HostToContainer),
        HostMount::new(BPFFS, BPFFS).propagation(Propagation::HostToContainer),
        HostMount::new(EMPTY_DIR, "/tmp"),
    ];
    c.security = SecurityContext {
        privileged: false,
        add_capabilities: ADDED_CAPS.iter().map(|c| (*c).to_string()).collect(),
        drop_capabilities: vec!["ALL".into()],
        run_as_user: Some(0),
        run_as_group: Some(0),
        read_only_root_filesystem: true,
        allow_privilege_escalation: Some(false),
        // The pod's seccompProfile, which applies to its containers.
        seccomp: Some(Profile::RuntimeDefault),
        apparmor: Some(Profile::Unconfined),
    };
    pod.containers = vec![c];
    pod
}

/// The client: two interfaces there at its first instruction, a frame from cansend to candump.
fn client_pod() -> PodSpec {
    let script = format!(
        "test -e /sys/class/net/vcan0 && test -e /sys/class/net/vcan1 || \
         {{ echo missing; exit 3; }}; \
         timeout 60 candump -L -n 1 vcan0 >/tmp/heard & listener=$!; \
         for i in $(seq 600); do grep -q '^ *vcan0 ' /proc/net/can/rcvlist_all && break; \
         sleep 0.1; done; \
         cansend vcan0 {SEED_FRAME} || exit 4; \
         wait $listener || exit 5; \
         cat /tmp/heard"
    );
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sh", "-c", &script]);
    c.vcan = 2;
    let mut pod = PodSpec::new("default", "image-client");
    pod.containers = vec![c];
    pod
}

/// The plugin container's output so far, for failure messages.
fn plugin_log(pod: &PodSpec) -> String {
    std::fs::read(pod.log_path("vcan-plugin"))
        .map(|b| parse_cri_log(&String::from_utf8_lossy(&b)))
        .unwrap_or_else(|e| format!("(no log: {e})"))
}

/// The mountinfo line of the mount `path` is on (longest mount point that is a prefix).
fn mount_of(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| path.starts_with(m))
        })
        .max_by_key(|l| l.split_whitespace().nth(4).map_or(0, str::len))
        .map(str::to_string)
}

/// mount(2) with only flags.
fn mount_flags(source: &Path, target: &Path, flags: libc::c_ulong, fstype: Option<&str>) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("path without NUL");
    let (source, target) = (c(source), c(target));
    let fstype = fstype.map(|f| CString::new(f).expect("fstype"));
    // SAFETY: valid NUL-terminated strings (or null) that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "mount {target:?} (flags {flags:#x}): {}",
        std::io::Error::last_os_error()
    );
}

/// What systemd does first on every node: `mount --make-rshared /`. The DaemonSet's
/// `mountPropagation: HostToContainer` volumes rely on it; the test-bed's init is no systemd
/// and leaves every mount private, which fails in two ways (both seen in this test-bed):
///
/// - containerd refuses a HostToContainer mount whose source is not on a shared or slave
///   mount. It looks `/var/run/netns` up without resolving the `/var/run` symlink, so it checks
///   `/` (`path "/var/run/netns" is mounted on "/" but it is not a shared or slave mount`); it
///   checks `/sys/fs/bpf`, a mount point of its own, as such.
/// - With those passing but the mount that really holds /var/run/netns (`/run`) private, the
///   container starts, but the nsfs bind mounts containerd makes there for later pods never
///   reach it: the plugin sees only the empty placeholder file and setns(2) fails with EINVAL
///   ("cannot enter network namespace /var/run/netns/cni-…: Invalid argument").
fn make_rshared_like_systemd() {
    for dir in ["/", "/run", BPFFS] {
        println!(
            "mount of {dir} before: {}",
            mount_of(Path::new(dir)).unwrap_or_default()
        );
    }
    mount_flags(
        Path::new("none"),
        Path::new("/"),
        libc::MS_SHARED | libc::MS_REC,
        None,
    );
}

/// Everything that refers to the network namespace with inode `ino`: threads in it, open file
/// descriptors and nsfs mounts (in any mount namespace), as "pid what" lines.
fn netns_holders(ino: u64) -> Vec<String> {
    let needle = format!("net:[{ino}]");
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for proc in procs.flatten() {
        let name = proc.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() {
            continue;
        }
        let dir = proc.path();
        if let Ok(tasks) = std::fs::read_dir(dir.join("task")) {
            for task in tasks.flatten() {
                if std::fs::read_link(task.path().join("ns/net"))
                    .is_ok_and(|l| l.to_string_lossy() == needle)
                {
                    found.push(format!("{name} thread {:?}", task.file_name()));
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir(dir.join("fd")) {
            for fd in fds.flatten() {
                if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == needle) {
                    found.push(format!("{name} fd {:?}", fd.file_name()));
                }
            }
        }
        if let Ok(info) = std::fs::read_to_string(dir.join("mountinfo")) {
            for line in info.lines().filter(|l| l.contains(&needle)) {
                found.push(format!("{name} mount {line}"));
            }
        }
    }
    found
}

/// The PID (in the node's PID namespace) of the process running the image's entrypoint.
fn plugin_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        (cmdline.split(|b| *b == 0).next() == Some(PLUGIN_EXE.as_bytes())).then_some(pid)
    })
}

/// A `/proc/<pid>/status` field.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// `GET path` on the plugin's metrics port, from inside its pod's network namespace (as the
/// kubelet's probes and Prometheus reach the pod IP).
async fn plugin_http(netns: &Path, path: &str) -> Result<(u16, String)> {
    let ns = Netns::Path(netns.to_path_buf());
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        vcan_plugin::kernel::netns::run(&ns, move || {
            vcan_e2e::plugin::http_get("127.0.0.1:9720", &path)
        })
    })
    .await
    .context("the HTTP task panicked")?
    .context("entering the plugin pod's netns")?
}

/// A metric's value from Prometheus text, by name and a label fragment.
fn metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// The sockets in `dir`, by name.
fn sockets(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("device-plugin dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The `cni-*` namespace files containerd has in /run/netns.
fn cni_netns() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The plugin container's state, exit code and reason, for failure messages.
async fn container_state(cri: &Cri, id: &str) -> String {
    match cri.container_status(id).await {
        Ok(s) => format!(
            "{:?} (exit code {}, reason {:?}, message {:?})",
            s.state(),
            s.exit_code,
            s.reason,
            s.message
        ),
        Err(e) => format!("unknown: {e:#}"),
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let started = Instant::now();
    let mut last = String::new();
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => last.clear(),
            Err(e) => last = format!("{e:#}"),
        }
        if started.elapsed() > timeout {
            bail!("{what}: not after {timeout:?} {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn the_plugin_image_serves_pods_as_the_daemonset_runs_it() {
    require_testbed();
    let started = Instant::now();
    let elapsed = || format!("{:6.1} s", started.elapsed().as_secs_f64());

    // The node as the kubelet and systemd leave it: shared mounts, an emptyDir for /tmp.
    std::fs::create_dir_all(NETNS_DIR).expect("netns dir");
    make_rshared_like_systemd();
    std::fs::create_dir_all(EMPTY_DIR).expect("emptyDir");
    mount_flags(Path::new("tmpfs"), Path::new(EMPTY_DIR), 0, Some("tmpfs"));

    let mut options = ContainerdOptions::default();
    options.images.push(images::plugin_archive());
    let containerd = Containerd::start(options).await.expect("containerd starts");
    println!(
        "{} containerd ready in {:?}, images (plugin's included) imported in {:?}",
        elapsed(),
        containerd.startup().ready,
        containerd.startup().images
    );
    let cri = Cri::connect(containerd.socket()).await.expect("CRI");
    let kubelet = Kubelet::start(
        Path::new(DEVICE_PLUGIN_DIR),
        &Path::new(POD_RESOURCES_DIR).join("kubelet.sock"),
    )
    .await
    .expect("kubelet stand-in");
    let node = Node {
        kubelet,
        cri: cri.clone(),
        resource: RESOURCE.to_string(),
    };

    // A pod that runs before the plugin does (a node where the DaemonSet rolls out or restarts):
    // the plugin's container starts with copies of its netns and rootfs mounts.
    let mut early = PodSpec::new("default", "early");
    early.containers = vec![ContainerSpec::new("app", CANUTILS_IMAGE, ["sleep", "3600"])];
    let early_run = node.run_pod(&early).await.expect("early pod");
    let early_netns = cri
        .netns_path(&early_run.sandbox)
        .await
        .expect("early sandbox status")
        .expect("early netns");
    let early_netns_ino = std::fs::metadata(&early_netns).expect("early netns").ino();

    // The plugin pod, as the DaemonSet controller and the kubelet would start it.
    let plugin = plugin_pod();
    let plugin_sandbox = cri.run_sandbox(&plugin).await.expect("plugin sandbox");
    let plugin_id = cri
        .create_and_start(
            &plugin_sandbox,
            &plugin,
            &plugin.containers[0],
            &HashMap::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("the plugin container does not start: {e:#}"));
    println!("{} plugin pod started from {PLUGIN_IMAGE}", elapsed());
    if let Err(e) = node
        .kubelet
        .wait_for_resource(RESOURCE, DEVICES, Duration::from_secs(60))
        .await
    {
        panic!(
            "{e:#}\nplugin container: {}\nplugin log:\n{}",
            container_state(&cri, &plugin_id).await,
            plugin_log(&plugin)
        );
    }
    assert!(node.kubelet.prestart_required(RESOURCE));
    println!(
        "{} plugin registered with {DEVICES} healthy devices",
        elapsed()
    );
    let plugin_netns = cri
        .netns_path(&plugin_sandbox)
        .await
        .expect("plugin sandbox status")
        .expect("hostNetwork false: the plugin pod has its own netns");

    // The process runs as the DaemonSet says: root with exactly the added capabilities, no new
    // privileges, seccomp filtering, read-only root filesystem; and the image has no shell.
    let pid = plugin_pid().expect("the plugin's process");
    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("0")
    );
    let cap_eff = u64::from_str_radix(&status_field(pid, "CapEff"), 16).expect("CapEff");
    assert_eq!(
        cap_eff, ADDED_CAP_MASK,
        "effective capabilities {cap_eff:#x}"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");
    let root_mount = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .expect("mountinfo")
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .map(str::to_string)
        .expect("root mount");
    assert!(
        root_mount
            .split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
        "root filesystem not read-only: {root_mount}"
    );
    let shell = cri
        .exec(
            &plugin_id,
            &["/bin/sh", "-c", "true"],
            Duration::from_secs(10),
        )
        .await;
    assert!(
        shell.as_ref().is_err() || shell.as_ref().is_ok_and(|o| o.exit_code != 0),
        "the image has a shell: {shell:?}"
    );

    // Probes, as the DaemonSet's: /healthz and /readyz on the pod's port 9720.
    wait_until("/readyz answers 200", Duration::from_secs(30), || async {
        Ok(plugin_http(&plugin_netns, "/readyz").await?.0 == 200)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nplugin log:\n{}", plugin_log(&plugin)));
    assert_eq!(
        plugin_http(&plugin_netns, "/healthz")
            .await
            .expect("healthz")
            .0,
        200
    );
    let (_, body) = plugin_http(&plugin_netns, "/metrics")
        .await
        .expect("metrics");
    let log = plugin_log(&plugin);
    assert!(
        !log.contains("CAN frame counting is unavailable")
            && !body.contains("attach_mode=\"none\""),
        "eBPF counters do not work in the container (bpffs, capabilities, seccomp?):\n{log}"
    );
    assert!(
        Path::new(BPFFS).join("vcan-plugin").is_dir(),
        "the plugin's pins are not on the node's bpffs"
    );
    println!("{} plugin ready, eBPF counters loaded", elapsed());

    // A client pod created after the plugin: its netns must reach the plugin (propagation).
    let client = client_pod();
    let run = node
        .run_pod(&client)
        .await
        .unwrap_or_else(|e| panic!("client pod: {e:#}\nplugin log:\n{}", plugin_log(&plugin)));
    assert_eq!(run.failure, None, "plugin log:\n{}", plugin_log(&plugin));
    let client_netns = cri
        .netns_path(&run.sandbox)
        .await
        .expect("client sandbox status")
        .expect("client netns");
    let client_netns_ino = std::fs::metadata(&client_netns)
        .expect("client netns")
        .ino();
    let code = cri
        .wait_exit(run.container("app"), EXIT_TIMEOUT)
        .await
        .expect("client exits");
    let output = cri.logs(&client, "app").await.expect("client log");
    assert_eq!(
        code,
        0,
        "client output:\n{output}\nplugin log:\n{}",
        plugin_log(&plugin)
    );
    let heard: Vec<&str> = output
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(_, frame)| frame))
        .collect();
    assert_eq!(heard, [SEED_LOGGED], "client output:\n{output}");
    println!(
        "{} client pod: vcan0 and vcan1 present at start, {SEED_FRAME} sent and received \
         (PreStart {:?})",
        elapsed(),
        run.prestart
    );
    // The counters attached from inside the plugin's container saw the frame.
    let labels = format!("namespace=\"default\",pod=\"{}\"", client.name);
    wait_until("the frame is counted", Duration::from_secs(30), || {
        let labels = labels.clone();
        let netns = plugin_netns.clone();
        async move {
            let (_, body) = plugin_http(&netns, "/metrics").await?;
            Ok(metric(&body, "vcan_plugin_can_frames_total", &labels).unwrap_or(0.0) >= 1.0)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nplugin log:\n{}", plugin_log(&plugin)));

    // Deleting the client leaves nothing: its namespace file is gone and nothing (the plugin's
    // threads, descriptors or its mount namespace's copy of the netns mount) keeps it alive.
    node.delete_pod(&run).await.expect("delete client");
    assert!(!client_netns.exists(), "client netns file left");
    wait_until(
        "the plugin forgets the client",
        Duration::from_secs(30),
        || {
            let netns = plugin_netns.clone();
            async move {
                let (_, body) = plugin_http(&netns, "/metrics").await?;
                Ok(metric(&body, "vcan_plugin_pods_served", "").unwrap_or(0.0) == 0.0)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nplugin log:\n{}", plugin_log(&plugin)));
    let holders = netns_holders(client_netns_ino);
    assert!(
        holders.is_empty(),
        "the deleted client's netns is still referenced:\n{}",
        holders.join("\n")
    );
    println!("{} client pod deleted, its namespace is gone", elapsed());

    // The pod that was there before the plugin leaves nothing in the plugin's mount namespace
    // either: its netns and rootfs/shm mounts (copied at the plugin's start through the
    // /var/run/netns and /run/containerd volumes) go when the pod goes.
    let early_ids = [
        early_run.sandbox.clone(),
        early_run.container("app").to_string(),
    ];
    node.delete_pod(&early_run).await.expect("delete early pod");
    let holders = netns_holders(early_netns_ino);
    assert!(
        holders.is_empty(),
        "the deleted early pod's netns is still referenced:\n{}",
        holders.join("\n")
    );
    let plugin_mounts =
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("plugin mountinfo");
    let leaked: Vec<&str> = plugin_mounts
        .lines()
        .filter(|l| early_ids.iter().any(|id| l.contains(id.as_str())))
        .collect();
    assert!(
        leaked.is_empty(),
        "mounts of the deleted early pod are left in the plugin's mount namespace:\n{}",
        leaked.join("\n")
    );
    println!(
        "{} early pod deleted, nothing of it held by the plugin",
        elapsed()
    );

    // Deleting the plugin pod as the kubelet does: SIGTERM with the grace period, then the
    // sandbox. The plugin removes its socket on the way out.
    assert!(sockets(DEVICE_PLUGIN_DIR).contains(&PLUGIN_SOCKET.to_string()));
    let stopping = Instant::now();
    cri.stop_container(&plugin_id, GRACE)
        .await
        .expect("stop plugin");
    let stopped_in = stopping.elapsed();
    let status = cri.container_status(&plugin_id).await.expect("status");
    let log = plugin_log(&plugin);
    assert_eq!(
        status.exit_code,
        0,
        "the plugin did not exit cleanly on SIGTERM: {}\n{log}",
        container_state(&cri, &plugin_id).await
    );
    assert!(
        stopped_in < Duration::from_secs(10),
        "the plugin took {stopped_in:?} to stop"
    );
    assert!(log.contains("shutting down"), "{log}");
    assert_eq!(
        sockets(DEVICE_PLUGIN_DIR),
        ["kubelet.sock"],
        "the plugin's socket outlived it"
    );
    cri.remove_pod(&plugin_sandbox)
        .await
        .expect("remove plugin pod");
    assert!(!plugin_netns.exists(), "plugin netns file left");
    assert_eq!(
        cni_netns(),
        Vec::<String>::new(),
        "namespaces left in {NETNS_DIR}"
    );
    assert!(plugin_pid().is_none(), "a plugin process is left");
    assert_eq!(
        cri.remove_all_pods().await.expect("list pods"),
        0,
        "pods left"
    );
    println!(
        "{} plugin stopped in {stopped_in:?} after SIGTERM, its socket removed; pods, \
         namespaces and processes: none left",
        elapsed()
    );

    if let Some(dir) = std::env::var_os("VMTEST_RESULTS") {
        let _ = std::fs::write(PathBuf::from(dir).join("vcan-plugin-image.log"), &log);
    }
    drop(node);
    containerd.stop().await.expect("containerd stops");
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::umount2(c"/run/vcan-image-e2e/tmp".as_ptr(), libc::MNT_DETACH) };
}
