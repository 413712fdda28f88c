//! Two nodes in one test-bed VM, for buses that span nodes (`"span": "cluster"`): a bridge
//! `br-vcan` with a namespace per node (plus one for an external peer), `tc netem` delay on the
//! link towards node B, dnsmasq answering the plugins' peer service with both nodes' addresses,
//! and per node a kubelet stand-in and a plugin instance in the node's namespace. One containerd
//! runs the pods of both nodes. Used by `tests/tunnel_vm.rs` and the `vcan-xnode-bench` binary.
//!
//! The nodes share no CAN state: each has its own plugin (own address, device-plugin directory,
//! state directory, bpffs directory and bus namespaces); only the tunnel joins their buses.
//!
//! Everything here needs root in the test-bed, and panics with context when the test-bed is not
//! as expected: these are fixtures, and a broken fixture should stop the test on the spot.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use vcan_e2e::cluster::{self, ClusterBus, ClusterNode, Network, NODE_A, NODE_B};
//! use vcan_e2e::{Containerd, ContainerdOptions};
//!
//! let network = Network::start("delay 1ms");
//! let bus = ClusterBus::write(
//!     "x",
//!     4,
//!     r#"{"buses": [{"name": "x", "members": 4, "span": "cluster", "port": 20000}]}"#,
//! );
//! let containerd = Containerd::start(ContainerdOptions::default()).await?;
//! let a = ClusterNode::start("a", &NODE_A, &containerd, &bus).await;
//! let b = ClusterNode::start("b", &NODE_B, &containerd, &bus).await;
//! a.wait_peers(1.0).await;
//! let pod = a.run(&cluster::member(&bus, "s", "sleep 100000")).await;
//! let netns = cluster::pod_netns(&a.node, &pod).await;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::containerd::Containerd;
use crate::cri::{ContainerSpec, Cri, PodSpec};
use crate::images::CANUTILS_IMAGE;
use crate::node::{Node, StartedPod};
use crate::plugin::{Plugin, PluginConfig, http_get};
use vcan_test_support::kubelet::Kubelet;

/// The DNS name of the plugins' peer service (`--peer-service`), answered by the network's
/// dnsmasq with node A's and node B's addresses.
pub const PEER_SERVICE: &str = "peers.vcan.test";
/// Where the nodes' files live (bus configuration, per-node directories, plugin logs).
pub const ROOT: &str = "/run/vcan-xnode";
/// The bridge's own address in the guest's namespace, where dnsmasq listens.
pub const DNS: &str = "10.99.0.254";
/// The private resource each node's plugin serves next to its buses.
pub const RESOURCE: &str = "socketcan.io/vcan";
/// How long [`wait_listening`] waits for a CAN socket.
const BIND_TIMEOUT: Duration = Duration::from_secs(60);

/// A namespace on the bridge.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    /// The named network namespace (`ip netns`, under /run/netns).
    pub ns: &'static str,
    /// The bridge end of its veth pair, in the guest's namespace (where netem applies).
    pub veth: &'static str,
    /// Its address on the bridge's /24.
    pub addr: &'static str,
}

/// Node A.
pub const NODE_A: Host = Host {
    ns: "vnode-a",
    veth: "va",
    addr: "10.99.0.1",
};
/// Node B: what leaves the bridge towards it goes through netem.
pub const NODE_B: Host = Host {
    ns: "vnode-b",
    veth: "vb",
    addr: "10.99.0.2",
};
/// A third namespace for an external peer (a cannelloni bench rig).
pub const RIG: Host = Host {
    ns: "vnode-c",
    veth: "vc",
    addr: "10.99.0.3",
};
/// A fourth namespace for a second bench rig.
pub const RIG2: Host = Host {
    ns: "vnode-d",
    veth: "vd",
    addr: "10.99.0.4",
};
/// Every namespace [`Network`] creates.
pub const HOSTS: [Host; 4] = [NODE_A, NODE_B, RIG, RIG2];
/// The key the nodes' plugins authenticate their tunnel packets with (`--tunnel-key-file`), as
/// a Secret would hold it.
pub const TUNNEL_KEY: &str = "dGVzdC1iZWQga2V5IG9mIHRoZSB0d28gbm9kZXMsIDMyIGJ5dGVz";

/// Runs `script` with `sh -ec`; panics with its output unless it succeeds.
pub fn sh(script: &str) {
    let out = Command::new("sh")
        .args(["-ec", script])
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bridge, the namespaces of [`HOSTS`] with their addresses, netem towards node B, and
/// dnsmasq answering [`PEER_SERVICE`] with both nodes, as the guest's resolver; all removed and
/// the guest's resolver restored on drop.
pub struct Network {
    dnsmasq: Child,
    resolv: Option<Vec<u8>>,
}

impl Network {
    /// Builds the network; `netem` is the netem qdisc's parameters on the link towards node B
    /// (e.g. `"delay 1ms"`). Panics if anything fails.
    pub fn start(netem: &str) -> Self {
        sh("modprobe -a bridge veth sch_netem");
        sh(&format!(
            "ip link add br-vcan type bridge && ip addr add {DNS}/24 dev br-vcan && ip link set br-vcan up"
        ));
        for Host { ns, veth, addr } in HOSTS {
            sh(&format!(
                "ip netns add {ns}
                 ip link add {veth} type veth peer name eth0 netns {ns}
                 ip link set {veth} master br-vcan up
                 ip -n {ns} addr add {addr}/24 dev eth0
                 ip -n {ns} link set eth0 up
                 ip -n {ns} link set lo up"
            ));
        }
        // The plugins keep the node's mounts (see PluginConfig::netns), so the node's resolver
        // is theirs: the guest's, for this network's lifetime.
        let resolv = std::fs::read("/etc/resolv.conf").ok();
        std::fs::write("/etc/resolv.conf", format!("nameserver {DNS}\n")).expect("resolv.conf");
        // What leaves the bridge towards node B is delayed (or lost), as across a real network.
        sh(&format!(
            "tc qdisc add dev {} root netem {netem}",
            NODE_B.veth
        ));
        std::fs::create_dir_all(ROOT).expect("root dir");
        let hosts = Path::new(ROOT).join("peers.hosts");
        write_hosts(&[NODE_A.addr, NODE_B.addr]);
        let dnsmasq = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={DNS}"),
                &format!("--addn-hosts={}", hosts.display()),
                "--pid-file=",
                "--user=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq starts (cargo xtask setup installs dnsmasq-base)");
        let network = Network { dnsmasq, resolv };
        // Both nodes resolve the service to both addresses before any plugin starts.
        let started = Instant::now();
        loop {
            let out = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", NODE_B.ns))
                .args(["getent", "ahostsv4", PEER_SERVICE])
                .output()
                .expect("getent");
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains(NODE_A.addr) && text.contains(NODE_B.addr) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "dnsmasq does not answer {PEER_SERVICE}: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        network
    }

    /// Replaces the netem parameters on the link towards node B (e.g. `"delay 1ms loss 1%"`).
    pub fn netem(&self, netem: &str) {
        sh(&format!(
            "tc qdisc change dev {} root netem {netem}",
            NODE_B.veth
        ));
    }

    /// Stops the DNS server as a hung resolver: queries go unanswered until [`Self::resume_dns`].
    pub fn pause_dns(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.dnsmasq.id() as libc::pid_t, libc::SIGSTOP);
        }
    }

    /// Lets the DNS server answer again.
    pub fn resume_dns(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.dnsmasq.id() as libc::pid_t, libc::SIGCONT);
        }
    }

    /// Makes the peer service answer with `addrs` from now on, as a headless Service's
    /// endpoints change.
    pub fn set_service(&self, addrs: &[&str]) {
        write_hosts(addrs);
        // dnsmasq reads its hosts files again on SIGHUP.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.dnsmasq.id() as libc::pid_t, libc::SIGHUP);
        }
    }
}

/// The peer service's answers, as dnsmasq reads them.
fn write_hosts(addrs: &[&str]) {
    let text: String = addrs
        .iter()
        .map(|a| format!("{a} {PEER_SERVICE}\n"))
        .collect();
    std::fs::write(Path::new(ROOT).join("peers.hosts"), text).expect("hosts file");
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        for Host { ns, veth, .. } in HOSTS {
            let _ = Command::new("ip").args(["link", "del", veth]).status();
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", "br-vcan"]).status();
        match &self.resolv {
            Some(text) => {
                let _ = std::fs::write("/etc/resolv.conf", text);
            }
            None => {
                let _ = std::fs::remove_file("/etc/resolv.conf");
            }
        }
    }
}

/// The bus every node's plugin serves and the nodes wait for: its name, the devices each node
/// advertises for it, and the bus configuration file (`--bus-config`) all nodes share.
#[derive(Debug, Clone)]
pub struct ClusterBus {
    /// The bus's `name` in the configuration.
    pub name: String,
    /// Its `members`: the devices each node advertises for it.
    pub members: usize,
    /// The configuration file.
    pub config: PathBuf,
}

impl ClusterBus {
    /// Writes the bus configuration `json` to `<ROOT>/buses.json` for the bus `name` with
    /// `members` members per node (both as in `json`). Panics if the file cannot be written.
    pub fn write(name: &str, members: usize, json: &str) -> Self {
        std::fs::create_dir_all(ROOT).expect("root dir");
        let config = Path::new(ROOT).join("buses.json");
        std::fs::write(&config, json).expect("bus config");
        ClusterBus {
            name: name.to_string(),
            members,
            config,
        }
    }

    /// The bus's extended resource, `socketcan.io/bus-<name>`.
    pub fn resource(&self) -> String {
        format!("socketcan.io/bus-{}", self.name)
    }
}

/// One node: its kubelet stand-in, the shared runtime and its plugin instance in the node's
/// namespace. On drop the plugin stops, and its log is kept in `$VMTEST_RESULTS` if set.
pub struct ClusterNode {
    /// The kubelet stand-in and the CRI client.
    pub node: Node,
    /// The node's plugin instance.
    pub plugin: Plugin,
    /// The plugin's metrics address, `<node address>:9720`.
    pub metrics: String,
    /// The bus's name, for its metrics' labels.
    bus: String,
    /// How the plugin was started.
    config: PluginConfig,
    /// The bus, for waiting on its registration.
    cluster_bus: ClusterBus,
}

impl ClusterNode {
    /// Starts the kubelet stand-in and the plugin of node `name` in `host`'s namespace, with
    /// `bus`'s configuration and [`PEER_SERVICE`], and waits until the bus is registered with
    /// all its devices. Panics, with the plugin's log, if it is not.
    pub async fn start(name: &str, host: &Host, containerd: &Containerd, bus: &ClusterBus) -> Self {
        let dir = Path::new(ROOT).join(name);
        std::fs::create_dir_all(&dir).expect("node dir");
        let device_plugin_dir = dir.join("device-plugins");
        let pod_resources_socket = dir.join("pod-resources/kubelet.sock");
        let kubelet = Kubelet::start(&device_plugin_dir, &pod_resources_socket)
            .await
            .expect("kubelet stand-in");
        let metrics = format!("{}:9720", host.addr);
        let key = Path::new(ROOT).join("tunnel.key");
        std::fs::write(&key, format!("{TUNNEL_KEY}\n")).expect("tunnel key");
        let config = PluginConfig {
            device_plugin_dir,
            pod_resources_socket,
            containerd_socket: containerd.socket().to_path_buf(),
            metrics_address: metrics.clone(),
            resource_name: RESOURCE.into(),
            devices: 1,
            log: dir.join("vcan-plugin.log"),
            extra_args: vec![
                "--bus-config".into(),
                bus.config.display().to_string(),
                "--peer-service".into(),
                PEER_SERVICE.into(),
                "--state-dir".into(),
                dir.join("state").display().to_string(),
                "--bpffs-dir".into(),
                format!("/sys/fs/bpf/vcan-{name}"),
                "--tunnel-key-file".into(),
                key.display().to_string(),
            ],
            netns: Some(host.ns.into()),
        };
        let plugin = Plugin::start(&config).expect("plugin starts");
        let node = Node {
            kubelet,
            cri: Cri::connect(containerd.socket()).await.expect("CRI"),
            resource: RESOURCE.into(),
        };
        let this = ClusterNode {
            node,
            plugin,
            metrics,
            bus: bus.name.clone(),
            config,
            cluster_bus: bus.clone(),
        };
        this.node
            .kubelet
            .wait_for_resource(&bus.resource(), bus.members, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:#}\n{}", this.plugin.log()));
        this
    }

    /// Replaces the node's plugin as a DaemonSet rollout does when the new pod gets a new
    /// address: the plugin stops, the node's namespace `host` changes its address to `addr`,
    /// and a new plugin starts there (metrics on the new address). Waits until the bus is
    /// registered again; panics with the plugin's log if it is not.
    pub async fn replace_at(&mut self, host: &Host, addr: &str) {
        self.plugin.stop().expect("plugin stops");
        sh(&format!(
            "ip -n {ns} addr flush dev eth0 && ip -n {ns} addr add {addr}/24 dev eth0",
            ns = host.ns
        ));
        self.metrics = format!("{addr}:9720");
        self.config.metrics_address = self.metrics.clone();
        self.plugin = Plugin::start(&self.config).expect("plugin starts");
        let bus = &self.cluster_bus;
        self.node
            .kubelet
            .wait_for_resource(&bus.resource(), bus.members, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.plugin.log()));
    }

    /// Waits up to 60 s until the plugin's log has `n` lines containing `needle`; panics with
    /// the log if it does not.
    pub async fn wait_log(&self, needle: &str, n: usize) {
        let started = Instant::now();
        loop {
            let log = self.plugin.log();
            if log.lines().filter(|l| l.contains(needle)).count() >= n {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{}: never {n} lines with {needle:?}:\n{log}",
                self.metrics
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many lines of the plugin's log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.plugin
            .log()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The sum of every series of `family` whose labels include all of `labels` (each
    /// `name="value"`), if the metrics answer.
    pub fn metric_sum(&self, family: &str, labels: &[&str]) -> Option<f64> {
        let (_, body) = http_get(&self.metrics, "/metrics").ok()?;
        Some(
            body.lines()
                .filter(|l| {
                    l.strip_prefix(family)
                        .is_some_and(|rest| rest.starts_with('{'))
                        && labels.iter().all(|want| l.contains(want))
                })
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .sum(),
        )
    }

    /// The value of the plugin's series `series` (name and labels exactly as exported), if it
    /// has one and its metrics answer.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.plugin.metric(series)
    }

    /// Waits up to 60 s until the plugin's tunnel of the bus has `n` peers; panics with the
    /// plugin's log if it does not.
    pub async fn wait_peers(&self, n: f64) {
        let series = format!("vcan_plugin_tunnel_peers{{bus=\"{}\"}}", self.bus);
        let started = Instant::now();
        while self.metric(&series) != Some(n) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} never had {n} tunnel peers:\n{}",
                self.metrics,
                self.plugin.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `spec` the way the kubelet does; panics, with the plugin's log, unless every
    /// container started.
    pub async fn run(&self, spec: &PodSpec) -> StartedPod {
        let p = self.node.run_pod(spec).await.expect("pod runs");
        assert_eq!(p.failure, None, "{}\n{}", spec.name, self.plugin.log());
        p
    }

    /// The plugin's tunnel and bus series, for failure messages and reports.
    pub fn tunnel_metrics(&self) -> String {
        http_get(&self.metrics, "/metrics")
            .map(|(_, body)| {
                body.lines()
                    .filter(|l| {
                        l.starts_with("vcan_plugin_tunnel") || l.starts_with("vcan_plugin_bus")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|e| format!("no metrics: {e:#}"))
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        // The guest's /run is lost with the VM: keep the plugin's log with the run's results.
        if let Some(dir) = std::env::var_os("VMTEST_RESULTS") {
            let name = self.metrics.replace([':', '.'], "-");
            let _ = std::fs::write(
                PathBuf::from(dir).join(format!("vcan-plugin-tunnel-{name}.log")),
                self.plugin.log(),
            );
        }
    }
}

/// A pod `default/<name>` with one container `app` (canutils image) running `sh -c command`, a
/// member of `bus`.
pub fn member(bus: &ClusterBus, name: &str, command: &str) -> PodSpec {
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sh", "-c", command]);
    c.resources = vec![(bus.resource(), 1)];
    let mut p = PodSpec::new("default", name);
    p.containers = vec![c];
    p
}

/// The path of `pod`'s network namespace file; panics if the runtime does not say or the pod
/// has none of its own.
pub async fn pod_netns(node: &Node, pod: &StartedPod) -> String {
    node.cri
        .netns_path(&pod.sandbox)
        .await
        .expect("sandbox status")
        .expect("own netns")
        .display()
        .to_string()
}

/// Waits until a CAN socket listens on `ifname` in the namespace `nsenter_arg` names
/// (`--net=<namespace file>`); panics after a minute.
pub fn wait_listening(nsenter_arg: &str, ifname: &str) {
    let started = Instant::now();
    loop {
        let out = Command::new("nsenter")
            .arg(nsenter_arg)
            .args(["cat", "/proc/net/can/rcvlist_all"])
            .output()
            .expect("nsenter");
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ifname))
        {
            return;
        }
        assert!(
            started.elapsed() < BIND_TIMEOUT,
            "nobody listens on {ifname} in {nsenter_arg}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
