//! Command-line flags (each with an environment variable of the same meaning).
// The flags' doc comments are their `--help` text, where `<domain>` and `<name>` are
// placeholders as users read them, not HTML.
#![allow(rustdoc::invalid_html_tags)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::control::{self, FaultKind, FaultParams, Inject, Request, RequestError, Target};
use crate::resource::ResourceName;

/// Kubernetes device plugin that gives pods virtual SocketCAN (vcan) interfaces.
///
/// A pod that requests `<resource>: N` gets N vcan interfaces in its own network namespace, created
/// and up before its first container starts. Interface names and CAN mode come from pod annotations
/// under the resource's domain, e.g. for socketcan.io/vcan: `socketcan.io/names: "can0,can1"` and
/// `socketcan.io/fd: "false"` (default: vcan0..vcanN-1, CAN FD capable, MTU 72).
///
/// Without a command it runs the daemon; `vcan-plugin fault ...` asks the daemon running in the
/// same pod to inject faults into its timed buses.
#[derive(Debug, Clone, Parser)]
#[command(name = "vcan-plugin", version, about, long_about)]
pub struct Config {
    /// What to do instead of running the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,

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
    #[arg(
        long,
        env = "VCAN_STATE_DIR",
        default_value = "/run/vcan-plugin",
        global = true
    )]
    pub state_dir: PathBuf,

    /// The Unix socket on which the daemon takes fault-injection requests and `vcan-plugin
    /// fault` sends them (default: <state-dir>/control.sock). Only root may connect; it is
    /// reached with kubectl exec into the plugin's pod, never over the network.
    #[arg(long, env = "VCAN_PLUGIN_CONTROL_SOCKET", global = true)]
    pub control_socket: Option<PathBuf>,

    /// Seconds between checks that this node can still create vcan interfaces.
    #[arg(long, env = "VCAN_HEALTH_INTERVAL", default_value_t = 30)]
    pub health_interval: u64,

    /// Log format.
    #[arg(long, env = "VCAN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// The control socket's path: `--control-socket`, or `control.sock` in the state directory.
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join(control::SOCKET_NAME))
    }
}

/// A command other than running the daemon.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Inject, clear or list faults on the timed buses of the daemon running in this pod
    /// (through its control socket; run it with kubectl exec in the plugin's pod on the bus's
    /// node).
    #[command(subcommand)]
    Fault(FaultCommand),
}

/// `vcan-plugin fault ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum FaultCommand {
    /// Make a timed bus misbehave for one member pod or for all members, for a while.
    ///
    /// Parameters by kind: bus-off needs --restart-ms; disconnect needs --duration-ms; drop and
    /// corrupt need --probability and --duration-ms; delay needs --latency-ms and
    /// --duration-ms, and takes --jitter-ms. Durations are at most one hour.
    Inject(InjectArgs),
    /// End faults before their time: all of a bus's, or those of one pod.
    Clear(ClearArgs),
    /// Show the active faults.
    List(ListArgs),
}

/// `vcan-plugin fault inject`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pod", "all"])))]
pub struct InjectArgs {
    /// The timed bus.
    #[arg(long)]
    pub bus: String,
    /// The member pod, as namespace/name.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = Target::pod)]
    pub pod: Option<Target>,
    /// Every member of the bus.
    #[arg(long)]
    pub all: bool,
    /// What happens.
    #[arg(long, value_enum)]
    pub kind: FaultKindArg,
    /// bus-off: milliseconds until the controller restarts (error-active again).
    #[arg(long, value_name = "MS")]
    pub restart_ms: Option<u64>,
    /// disconnect, drop, corrupt, delay: milliseconds the fault lasts.
    #[arg(long, value_name = "MS")]
    pub duration_ms: Option<u64>,
    /// drop, corrupt: the chance that a frame is affected, above 0 and at most 1.
    #[arg(long, value_name = "P")]
    pub probability: Option<f64>,
    /// delay: mean milliseconds frames to the member(s) are held back.
    #[arg(long, value_name = "MS")]
    pub latency_ms: Option<u64>,
    /// delay: largest deviation from the latency, either way, uniformly (default 0; at most
    /// the latency).
    #[arg(long, value_name = "MS")]
    pub jitter_ms: Option<u64>,
}

/// The fault kinds as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FaultKindArg {
    /// The member's controller goes error-warning, error-passive, bus-off, and restarts after
    /// --restart-ms.
    BusOff,
    /// Nothing sent or received for --duration-ms.
    Disconnect,
    /// Frames sent or received dropped with --probability for --duration-ms.
    Drop,
    /// One payload bit of frames flipped with --probability for --duration-ms.
    Corrupt,
    /// Frames to the member(s) delivered --latency-ms ± --jitter-ms late for --duration-ms.
    Delay,
}

/// `vcan-plugin fault clear`.
#[derive(Debug, Clone, Args)]
pub struct ClearArgs {
    /// The timed bus.
    #[arg(long)]
    pub bus: String,
    /// Only this member pod's faults, as namespace/name (default: every fault on the bus).
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = Target::pod)]
    pub pod: Option<Target>,
}

/// `vcan-plugin fault list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only this bus's faults (default: every bus's).
    #[arg(long)]
    pub bus: Option<String>,
}

impl FaultCommand {
    /// The request to send, validated.
    pub fn request(&self) -> Result<Request, RequestError> {
        let request = match self {
            FaultCommand::Inject(args) => {
                let label = match args.kind {
                    FaultKindArg::BusOff => "bus_off",
                    FaultKindArg::Disconnect => "disconnect",
                    FaultKindArg::Drop => "drop",
                    FaultKindArg::Corrupt => "corrupt",
                    FaultKindArg::Delay => "delay",
                };
                let params = FaultParams {
                    restart_ms: args.restart_ms,
                    duration_ms: args.duration_ms,
                    probability: args.probability,
                    latency_ms: args.latency_ms,
                    jitter_ms: args.jitter_ms,
                };
                Request::Inject(Inject {
                    bus: args.bus.clone(),
                    // The argument group makes exactly one of --pod and --all present.
                    target: args.pod.clone().unwrap_or(Target::All),
                    kind: FaultKind::from_params(label, &params)?,
                })
            }
            FaultCommand::Clear(args) => Request::Clear {
                bus: args.bus.clone(),
                target: args.pod.clone(),
            },
            FaultCommand::List(args) => Request::List {
                bus: args.bus.clone(),
            },
        };
        request.validate()?;
        Ok(request)
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("vcan-plugin").chain(args.iter().copied()))
    }

    fn fault(args: &[&str]) -> FaultCommand {
        match parse(args).expect("valid flags").command {
            Some(Command::Fault(fault)) => fault,
            None => panic!("no fault command"),
        }
    }

    #[test]
    fn without_a_command_the_daemon_runs_as_before() {
        let config = parse(&["--devices", "3", "--state-dir", "/tmp/s"]).expect("valid flags");
        assert!(config.command.is_none());
        assert_eq!(config.devices, 3);
        assert_eq!(
            config.control_socket(),
            PathBuf::from("/tmp/s/control.sock")
        );
        let config = parse(&["--control-socket", "/x.sock"]).expect("valid flags");
        assert_eq!(config.control_socket(), PathBuf::from("/x.sock"));
    }

    #[test]
    fn fault_commands_make_requests() {
        let inject = fault(&[
            "fault",
            "inject",
            "--bus",
            "chassis",
            "--pod",
            "default/ecu-a",
            "--kind",
            "bus-off",
            "--restart-ms",
            "200",
        ]);
        assert_eq!(
            inject.request(),
            Ok(Request::Inject(Inject {
                bus: "chassis".into(),
                target: Target::pod("default/ecu-a").expect("pod"),
                kind: FaultKind::BusOff {
                    restart: Duration::from_millis(200)
                },
            }))
        );
        let all = fault(&[
            "fault",
            "inject",
            "--bus",
            "b",
            "--all",
            "--kind",
            "drop",
            "--probability",
            "0.5",
            "--duration-ms",
            "1000",
        ]);
        assert!(matches!(
            all.request(),
            Ok(Request::Inject(Inject {
                target: Target::All,
                ..
            }))
        ));
        assert_eq!(
            fault(&["fault", "clear", "--bus", "b"]).request(),
            Ok(Request::Clear {
                bus: "b".into(),
                target: None
            })
        );
        assert_eq!(
            fault(&["fault", "list"]).request(),
            Ok(Request::List { bus: None })
        );
        let missing = fault(&["fault", "inject", "--bus", "b", "--all", "--kind", "delay"]);
        assert!(matches!(
            missing.request(),
            Err(RequestError::MissingParameter { .. })
        ));
    }

    #[test]
    fn the_state_dir_and_socket_flags_go_before_or_after_the_command() {
        for args in [
            &["--state-dir", "/s", "fault", "list"][..],
            &["fault", "list", "--state-dir", "/s"][..],
        ] {
            let config = parse(args).expect("valid flags");
            assert_eq!(
                config.control_socket(),
                PathBuf::from("/s/control.sock"),
                "{args:?}"
            );
        }
        let config = parse(&["fault", "list", "--control-socket", "/c.sock"]).expect("valid");
        assert_eq!(config.control_socket(), PathBuf::from("/c.sock"));
    }

    #[test]
    fn inject_needs_exactly_one_target_and_a_well_formed_pod() {
        let base = [
            "fault",
            "inject",
            "--bus",
            "b",
            "--kind",
            "bus-off",
            "--restart-ms",
            "1",
        ];
        assert!(parse(&base).is_err(), "no target");
        let both = [&base[..], &["--all", "--pod", "a/b"]].concat();
        assert!(parse(&both).is_err(), "two targets");
        let bad = [&base[..], &["--pod", "ecu-a"]].concat();
        let err = parse(&bad).expect_err("not namespace/name").to_string();
        assert!(err.contains("namespace/name form"), "{err}");
    }
}
