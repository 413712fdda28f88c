//! The daemon's wiring: the configuration checked as a whole ([`plan`]), then one resource
//! server per resource (private vcans, each shared bus, each physical interface), their
//! registrations, the reconcile loop, the bus tunnels and the HTTP endpoint, run as one set of
//! tasks with one failure policy, and an orderly shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::{self, Bus};
use crate::config::Config;
use crate::ebpf::{self, Counters};
use crate::hardware::{self, Controller, HardwareSpec};
use crate::kubelet::registration::Registrar;
use crate::node::{NodeState, ServedResource};
use crate::pod::resources::PodResources;
use crate::pod::runtime::{self, SandboxLookup};
use crate::pod::sandbox_index::SandboxIndex;
use crate::resource::DeviceSet;
use crate::serve::bus_member::BusMembership;
use crate::serve::passthrough::Passthrough;
use crate::serve::private::PrivateVcans;
use crate::serve::{Provision, ResourceServer};
use crate::socketcand::server::Endpoint;
use crate::telemetry::health::{self, Health};
use crate::telemetry::{http, metrics::Metrics};
use crate::tunnel::endpoint::Tunnel;

/// How often released pods are looked for and unserved pods adopted.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(10);

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The bus configuration is invalid.
    #[error(transparent)]
    BusConfig(#[from] bus::BusConfigError),
    /// A bus's resource name is invalid.
    #[error("bus {bus}: {source}")]
    BusResource {
        /// The bus.
        bus: String,
        /// What is wrong.
        source: crate::resource::ResourceNameError,
    },
    /// A bus's resource name is that of the private interfaces.
    #[error(
        "bus {bus}: its resource name {resource} is that of the private interfaces: rename the bus"
    )]
    BusResourceTaken {
        /// The bus.
        bus: String,
        /// The resource name.
        resource: String,
    },
    /// The hardware configuration is invalid.
    #[error(transparent)]
    HardwareConfig(#[from] hardware::HardwareConfigError),
    /// A hardware interface's resource name is invalid or taken.
    #[error("hardware interface {name}: {message}")]
    HardwareResource {
        /// The interface's name in the configuration.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A bus names an uplink the hardware configuration does not have.
    #[error(
        "bus {bus}: its uplink {uplink:?} is not an interface of the hardware configuration \
         (--hardware-config){}",
        if *.configured { "" } else { ", which is not set" }
    )]
    UnknownUplink {
        /// The bus.
        bus: String,
        /// The uplink named.
        uplink: String,
        /// Whether a hardware configuration was given.
        configured: bool,
    },
    /// A bus spans the cluster but no peer service is set.
    #[error(
        "bus {bus} spans the cluster (\"span\": \"cluster\") but --peer-service \
         (VCAN_PEER_SERVICE) is not set: name the headless Service whose DNS name resolves to \
         every plugin pod"
    )]
    NoPeerService {
        /// The bus.
        bus: String,
    },
    /// A bus spans the cluster but no tunnel key is set.
    #[error(
        "bus {bus} spans the cluster (\"span\": \"cluster\") but --tunnel-key-file \
         (VCAN_TUNNEL_KEY_FILE) is not set: the plugin's instances authenticate their packets with \
         a key shared through a Secret (see README, \"Buses across nodes\")"
    )]
    NoTunnelKey {
        /// The bus.
        bus: String,
    },
    /// The tunnel key could not be read.
    #[error(transparent)]
    TunnelKey(#[from] crate::tunnel::auth::KeyError),
    /// The namespace of the tunnels' I/O ends could not be made.
    #[error("cannot make the namespace of the bus tunnels' I/O ends: {0}")]
    TunnelNamespace(#[source] crate::kernel::netns::NetnsError),
    /// A bus tunnel failed.
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::endpoint::TunnelError),
    /// A bus's socketcand endpoint could not run.
    #[error(transparent)]
    Socketcand(#[from] crate::socketcand::server::SocketcandError),
    /// A timed bus's scheduler failed.
    #[error(transparent)]
    Timing(#[from] bus::BusError),
    /// The control socket could not be served.
    #[error(transparent)]
    Control(#[from] crate::control::socket::ControlError),
    /// The configuration needs more counter slots than the eBPF maps hold.
    #[error(transparent)]
    Capacity(#[from] bus::CapacityError),
    /// A task of the daemon panicked.
    #[error("a task of the daemon failed: {0}")]
    Task(String),
    /// A registration loop failed.
    #[error("device-plugin registration failed: {0}")]
    Registration(#[from] crate::kubelet::registration::RegistrationError),
    /// The metrics endpoint failed.
    #[error("the metrics endpoint {address} failed: {source}")]
    Http {
        /// The address.
        address: String,
        /// The error.
        source: std::io::Error,
    },
}

pub mod faults;
pub mod plan;

/// One resource to serve, before it is wired.
struct Planned {
    server: Arc<ResourceServer>,
    health: watch::Receiver<Health>,
}

/// Runs the daemon until SIGTERM/SIGINT (or `shutdown` is cancelled): reads the configuration,
/// checks it as a whole ([`plan::plan`]), then builds and runs what it asks for.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let containerd_socket = config
        .containerd_socket
        .clone()
        .unwrap_or_else(runtime::default_containerd_socket);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        resource = %config.resource_name,
        devices = config.devices,
        containerd = %containerd_socket.display(),
        "starting vcan-plugin"
    );
    if !containerd_socket.exists() {
        tracing::warn!(
            socket = %containerd_socket.display(),
            "container runtime socket not found yet; PreStart calls fail until it appears \
             (set --containerd-socket and mount its directory)"
        );
    }
    let bus_specs = match &config.bus_config {
        Some(path) => bus::load(path)?,
        None => Vec::new(),
    };
    let hardware_specs = match &config.hardware_config {
        Some(path) => hardware::load(path)?,
        None => Vec::new(),
    };
    let plan = plan::plan(&config, bus_specs, hardware_specs, ebpf::layout::MAX_SLOTS)?;
    let tunnel_key = match &config.tunnel_key_file {
        Some(path) => Some(crate::tunnel::auth::TunnelKey::load(path)?),
        None => None,
    };
    // One namespace of the process's own for the I/O ends of every tunnel and socketcand
    // endpoint (see bus::tunnel_io_name).
    let io_ns = if plan.has_io_ends() {
        Some(crate::kernel::netns::process_private().map_err(DaemonError::TunnelNamespace)?)
    } else {
        None
    };

    let counters = open_counters(config.bpffs_dir.clone()).await;
    let attach_mode = counters
        .as_ref()
        .map_or("none", |c| c.attach_mode().as_str());
    let sandbox_index = Arc::new(SandboxIndex::new(&containerd_socket));
    let runtime: Arc<dyn SandboxLookup> = sandbox_index.clone();
    let pod_resources = PodResources::new(&config.pod_resources_socket);
    let interval = Duration::from_secs(config.health_interval.max(1));
    let vcan_health = health::watch(interval);
    let server = |resource: &crate::resource::ResourceName,
                  devices: usize,
                  provision: Arc<dyn Provision>| {
        Arc::new(ResourceServer::new(
            resource.clone(),
            DeviceSet::new(resource, devices),
            pod_resources.clone(),
            runtime.clone(),
            counters.clone(),
            provision,
        ))
    };

    let mut planned = vec![Planned {
        server: server(
            &config.resource_name,
            config.devices as usize,
            Arc::new(PrivateVcans),
        ),
        health: vcan_health.clone(),
    }];
    let bus_health =
        (!plan.buses.is_empty()).then(|| health::watch_probe(health::Probe::Bus, interval));
    let roster = Arc::new(hardware::Roster::load(&plan.hardware(), &config.state_dir));
    let controller =
        |spec: HardwareSpec| Arc::new(Controller::new(spec, &config.state_dir, roster.clone()));
    let mut buses = Vec::new();
    let mut hardware = Vec::new();
    let mut tunnels = Vec::new();
    let mut endpoints = Vec::new();
    for planned_bus in plan.buses {
        let name = planned_bus.spec.name.clone();
        let uplink = planned_bus.uplink.map(controller);
        let bus = Bus::new(
            planned_bus.spec,
            config.resource_name.domain(),
            &config.state_dir,
        )
        .map_err(|source| DaemonError::BusResource {
            bus: name.clone(),
            source,
        })?
        .with_uplink(uplink);
        let bus = match &io_ns {
            Some(ns) => bus.with_io_namespace(ns.clone()),
            None => bus,
        };
        tracing::info!(
            bus = %bus.spec().name,
            resource = %bus.resource(),
            fd = bus.spec().fd,
            members = bus.spec().members,
            interface = %bus.spec().interface,
            namespace = %bus.namespace().display(),
            "serving shared CAN bus"
        );
        let bus = Arc::new(bus);
        if let (Some(spec), Some(io_ns)) = (bus.spec().socketcand, &io_ns) {
            tracing::info!(bus = %bus.spec().name, listen = %spec.listen, "serving the bus to socketcand clients");
            endpoints.push(Arc::new(Endpoint::new(
                &bus.spec().name,
                &bus.spec().interface,
                spec,
                io_ns.clone(),
            )));
        }
        if let (Some(spec), Some(io_ns)) = (&bus.spec().tunnel, &io_ns) {
            tunnels.push(Arc::new(
                Tunnel::new(
                    &bus.spec().name,
                    spec.clone(),
                    config.peer_service.clone(),
                    tunnel_key.clone(),
                    io_ns.clone(),
                )
                .with_state_dir(&config.state_dir),
            ));
        }
        if let Some(uplink) = bus.uplink() {
            tracing::info!(bus = %bus.spec().name, uplink = %uplink.spec().name, device = %uplink.spec().device, "bus connected to a physical CAN interface");
            hardware.push(uplink.clone());
        }
        planned.push(Planned {
            server: server(
                bus.resource(),
                bus.spec().members as usize,
                Arc::new(BusMembership::new(bus.clone())),
            ),
            health: bus_health.clone().unwrap_or_else(|| vcan_health.clone()),
        });
        buses.push(bus);
    }
    for passthrough in plan.passthrough {
        let controller = controller(passthrough.spec);
        let spec = controller.spec();
        tracing::info!(
            interface = %spec.name,
            resource = %passthrough.resource,
            device = %spec.device,
            bitrate = spec.settings.bitrate,
            "serving physical CAN interface"
        );
        let probe = controller.clone();
        let health = health::watch_with(
            format!("hardware interface {:?}", spec.name),
            move || probe.health(),
            interval,
        );
        planned.push(Planned {
            server: server(
                &passthrough.resource,
                1,
                Arc::new(Passthrough::new(controller.clone())),
            ),
            health,
        });
        hardware.push(controller);
    }

    let resource_names: Vec<String> = planned
        .iter()
        .map(|p| p.server.resource().to_string())
        .collect();
    let metrics = Arc::new(Metrics::new(&resource_names, attach_mode));
    let registrars: Vec<Arc<Registrar>> = planned
        .iter()
        .map(|p| {
            Arc::new(Registrar::new(
                &config.device_plugin_dir,
                p.server.clone(),
                metrics.clone(),
                p.health.clone(),
            ))
        })
        .collect();
    let servers: Vec<Arc<ResourceServer>> = planned.iter().map(|p| p.server.clone()).collect();
    let timed_buses: Vec<Arc<Bus>> = buses
        .iter()
        .filter(|b| b.timed().is_some())
        .cloned()
        .collect();
    let state = Arc::new(
        NodeState::new(
            planned
                .into_iter()
                .zip(&registrars)
                .map(|(p, r)| ServedResource {
                    server: p.server,
                    registered: r.registered_flag(),
                    health: p.health,
                })
                .collect(),
            buses,
            hardware,
            tunnels.clone(),
            vcan_health,
        )
        .with_socketcand(endpoints.clone())
        .with_sandbox_index(sandbox_index.clone()),
    );

    // One task per long-running part, one failure policy: the first that fails stops them all
    // (the bus would silently not span the nodes without its tunnel, the node would lose a
    // resource without its registration), and its error is the daemon's.
    let mut tasks: JoinSet<Result<(), DaemonError>> = JoinSet::new();
    // Registration does not wait for adoption: a runtime that hangs must not keep the node
    // without devices, and a bus member joining before an older member is adopted is connected
    // to it when the adoption adds that member's rules.
    tasks.spawn(reconcile_loop(servers, metrics.clone(), shutdown.clone()));
    // Without the index every PreStart asks the runtime, which is slower but as correct: its end
    // (a runtime without containerd's events API) stops nothing else.
    let index_shutdown = shutdown.clone();
    tasks.spawn(async move {
        tokio::select! {
            () = sandbox_index.run() => {}
            () = index_shutdown.cancelled() => {}
        }
        index_shutdown.cancelled().await;
        Ok(())
    });
    for tunnel in tunnels {
        let shutdown = shutdown.clone();
        tasks.spawn(on_own_thread(move || async move {
            Ok(tunnel.run(shutdown).await?)
        }));
    }
    for endpoint in endpoints {
        let shutdown = shutdown.clone();
        tasks.spawn(async move { Ok(endpoint.run(shutdown).await?) });
    }
    let credits = counters
        .as_ref()
        .map(|c| c.clone() as Arc<dyn crate::bus::timing::TxCredits>);
    for bus in timed_buses.iter().cloned() {
        tasks.spawn(run_timed_bus(bus, credits.clone(), shutdown.clone()));
    }
    if !timed_buses.is_empty() {
        let path = config.control_socket();
        tracing::info!(socket = %path.display(), "fault injection on timed buses through the control socket");
        let handler = Arc::new(faults::BusFaults::new(timed_buses));
        let shutdown = shutdown.clone();
        tasks.spawn(
            async move { Ok(crate::control::socket::serve(&path, handler, shutdown).await?) },
        );
    }
    {
        let address = config.metrics_address;
        let server = http::serve(address, metrics, state, shutdown.clone().cancelled_owned());
        tasks.spawn(async move {
            server.await.map_err(|source| DaemonError::Http {
                address: address.to_string(),
                source,
            })
        });
    }
    for registrar in registrars {
        let shutdown = shutdown.clone();
        tasks.spawn(async move { Ok(registrar.run(shutdown).await?) });
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| Err(DaemonError::Task(e.to_string())));
        if let Err(e) = result {
            first_error.get_or_insert(e);
            shutdown.cancel();
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Runs a timed bus's scheduler on a thread of its own until `shutdown`: every frame of the bus
/// waits for it, so it must not queue behind other tasks.
async fn run_timed_bus(
    bus: Arc<Bus>,
    credits: Option<Arc<dyn crate::bus::timing::TxCredits>>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let (done, result) = tokio::sync::oneshot::channel();
    let runner = bus.clone();
    std::thread::Builder::new()
        .name("vcan-timed-bus".into())
        .spawn(move || {
            let _ = done.send(runner.run_timing(credits));
        })
        .map_err(|e| DaemonError::Task(format!("cannot start a timed bus's thread: {e}")))?;
    let stopper = bus.clone();
    let stop_on_shutdown = async move {
        shutdown.cancelled().await;
        if let Some(t) = stopper.timed() {
            t.stop();
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        r = result => r.unwrap_or_else(|_| Err(bus::BusError::Namespace {
            bus: bus.spec().name.clone(),
            ns: bus.namespace().display().to_string(),
            source: crate::kernel::netns::NetnsError::Thread("the scheduler's thread ended without a result".into()),
        })).map_err(DaemonError::from),
        () = stop_on_shutdown => Ok(()),
    }
}

/// Runs the future `make` returns on a thread of its own, with a single-threaded runtime, and
/// waits for its result.
///
/// For a bus's tunnel, whose every frame crossing the node waits for it to be woken: on its own
/// thread the task runs where its sockets' readiness is noticed, with no hand-over to a worker of
/// the shared runtime (a thread wake-up, milliseconds on a loaded or emulated CPU) and no queue
/// behind the other tasks.
async fn on_own_thread<F, Fut>(make: F) -> Result<(), DaemonError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), DaemonError>> + 'static,
{
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vcan-tunnel".into())
        .spawn(move || {
            let outcome = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(make()),
                Err(e) => Err(DaemonError::Task(format!(
                    "cannot start a tunnel's runtime: {e}"
                ))),
            };
            let _ = done.send(outcome);
        })
        .map_err(|e| DaemonError::Task(format!("cannot start a tunnel's thread: {e}")))?;
    result.await.unwrap_or_else(|_| {
        Err(DaemonError::Task(
            "a tunnel's thread ended without a result".into(),
        ))
    })
}

async fn open_counters(bpffs_dir: PathBuf) -> Option<Arc<Counters>> {
    let opened = tokio::task::spawn_blocking(move || {
        Counters::open(&ebpf::Config {
            bpffs_dir,
            mode: None,
        })
    })
    .await;
    match opened {
        Ok(Ok(c)) => Some(Arc::new(c)),
        Ok(Err(e)) => {
            tracing::error!(
                error = %e,
                "CAN frame counting is unavailable; interfaces are still served without counters"
            );
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "opening the CAN frame counters failed");
            None
        }
    }
}

/// Reconciles every resource now and then every [`RECONCILE_INTERVAL`] until shutdown. The
/// first pass adopts the pods a previous run served. Each finished pass is counted, so that
/// whoever waits for the plugin to have looked again (tests, operators) can watch the count.
async fn reconcile_loop(
    servers: Vec<Arc<ResourceServer>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let mut ticker = tokio::time::interval(RECONCILE_INTERVAL);
    let mut first = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        for server in &servers {
            let pass = server.reconcile().await;
            for pod in &pass.released {
                tracing::info!(resource = %server.resource(), pod = %pod.pod, "pod sandbox gone: released");
            }
            if first || !pass.adopted.is_empty() {
                // The pod count first: logs and tests read "adopted running pods pods=N".
                tracing::info!(pods = pass.adopted.len(), resource = %server.resource(), "adopted running pods");
            }
            if let Some(e) = pass.listing_error {
                tracing::debug!(resource = %server.resource(), error = %e, "no PodResources listing this pass");
            }
        }
        first = false;
        metrics.reconcile_pass();
    }
}
