//! Command-line flags (each with an environment variable of the same meaning).
// The flags' doc comments are their `--help` text, where `<domain>` and `<name>` are
// placeholders as users read them, not HTML.
#![allow(rustdoc::invalid_html_tags)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::resource::ResourceName;

/// Kubernetes device plugin that gives pods virtual SocketCAN (vcan) interfaces.
///
/// A pod that requests `<resource>: N` gets N vcan interfaces in its own network namespace, created
/// and up before its first container starts. Interface names and CAN mode come from pod annotations
/// under the resource's domain, e.g. for socketcan.io/vcan: `socketcan.io/names: "can0,can1"` and
/// `socketcan.io/fd: "false"` (default: vcan0..vcanN-1, CAN FD capable, MTU 72).
#[derive(Debug, Clone, Parser)]
#[command(name = "vcan-plugin", version, about, long_about)]
pub struct Config {
    /// Extended resource to advertise, as domain/name. Also sets the annotation domain.
    #[arg(long, env = "VCAN_RESOURCE_NAME", default_value = "socketcan.io/vcan")]
    pub resource_name: ResourceName,

    /// Number of devices (interfaces) the node advertises.
    #[arg(long, env = "VCAN_DEVICES", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=9999))]
    pub devices: u32,

    /// The kubelet's device-plugin directory (holds kubelet.sock and the plugin's socket).
    #[arg(
        long,
        env = "VCAN_DEVICE_PLUGIN_DIR",
        default_value = "/var/lib/kubelet/device-plugins"
    )]
    pub device_plugin_dir: PathBuf,

    /// The kubelet's PodResources socket.
    #[arg(
        long,
        env = "VCAN_POD_RESOURCES_SOCKET",
        default_value = "/var/lib/kubelet/pod-resources/kubelet.sock"
    )]
    pub pod_resources_socket: PathBuf,

    /// containerd's socket (its CRI service). Default: the first that exists of
    /// /run/containerd/containerd.sock, /run/k3s/containerd/containerd.sock,
    /// /var/snap/microk8s/common/run/containerd.sock.
    #[arg(long, env = "VCAN_CONTAINERD_SOCKET")]
    pub containerd_socket: Option<PathBuf>,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    #[arg(long, env = "VCAN_METRICS_ADDRESS", default_value = "0.0.0.0:9720")]
    pub metrics_address: SocketAddr,

    /// bpffs directory for the pinned CAN frame counters (kept across plugin restarts).
    #[arg(
        long,
        env = "VCAN_BPFFS_DIR",
        default_value = "/sys/fs/bpf/vcan-plugin"
    )]
    pub bpffs_dir: PathBuf,

    /// Shared CAN buses between pods (a JSON file), e.g.
    /// {"buses":[{"name":"powertrain","fd":true,"members":32,"interface":"can0"}]}. Each bus is
    /// its own resource, <domain>/bus-<name>. Without it only private vcans are served.
    #[arg(long, env = "VCAN_BUS_CONFIG")]
    pub bus_config: Option<PathBuf>,

    /// Physical CAN interfaces (a JSON file), e.g.
    /// {"interfaces":[{"name":"bench","device":{"parent":"0000:03:00.0"},"bitrate":500000}]}.
    /// Each is passed to one pod at a time as its own resource, <domain>/hw-<name>, unless a bus
    /// of the bus configuration names it as its uplink. Needs the node's network namespace
    /// (hostNetwork), where the interfaces are.
    #[arg(long, env = "VCAN_HARDWARE_CONFIG")]
    pub hardware_config: Option<PathBuf>,

    /// DNS name that resolves to every plugin instance (a headless Service), for buses that
    /// span nodes ("span": "cluster" in the bus configuration), e.g.
    /// vcan-plugin-peers.vcan-plugin.svc.cluster.local. (a final dot skips the resolver's search
    /// domains). Re-resolved every 10 s, and early when an unknown address sends to a tunnel.
    #[arg(long, env = "VCAN_PEER_SERVICE")]
    pub peer_service: Option<String>,

    /// File holding the key the plugin's instances authenticate their tunnel packets with (at
    /// least 16 bytes; mount it from a Secret). Required by buses that span nodes: packets from
    /// instances without a valid tag are dropped.
    #[arg(long, env = "VCAN_TUNNEL_KEY_FILE")]
    pub tunnel_key_file: Option<PathBuf>,

    /// Directory for state that must outlive the plugin: the buses' network namespaces are
    /// bind-mounted under <state-dir>/buses/. Must be a host directory with Bidirectional mount
    /// propagation when the plugin runs in a container.
    #[arg(long, env = "VCAN_STATE_DIR", default_value = "/run/vcan-plugin")]
    pub state_dir: PathBuf,

    /// Seconds between checks that this node can still create vcan interfaces.
    #[arg(long, env = "VCAN_HEALTH_INTERVAL", default_value_t = 30)]
    pub health_interval: u64,

    /// Log format.
    #[arg(long, env = "VCAN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}
