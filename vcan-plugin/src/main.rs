//! The vcan-plugin daemon: wires configuration, logging and the library together.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use vcan_plugin::bus::{self, Bus, BusStats};
use vcan_plugin::config::{Config, LogFormat};
use vcan_plugin::ebpf::{self, Counters};
use vcan_plugin::health::{self, Health};
use vcan_plugin::injector::Injector;
use vcan_plugin::kubelet::registration::Registrar;
use vcan_plugin::metrics::{self, BusSample, Metrics, Snapshot, StateSource, TrafficSample};
use vcan_plugin::podresources::PodResources;
use vcan_plugin::resource::DeviceSet;
use vcan_plugin::runtime::{self, CriRuntime};

/// How often pods that went away are forgotten.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(10);

/// The live state behind /metrics and /readyz.
struct Live {
    injector: Arc<Injector>,
    /// One injector per shared bus.
    buses: Vec<Arc<Injector>>,
    health: tokio::sync::watch::Receiver<Health>,
    /// One flag per resource: ready only when every resource is registered.
    registered: Vec<Arc<AtomicBool>>,
}

impl Live {
    /// Every served pod's counters, read now; pods that went away have no series.
    fn traffic(&self) -> Vec<TrafficSample> {
        let Some(counters) = self.injector.counters() else {
            return Vec::new();
        };
        let mut samples = Vec::new();
        let served = std::iter::once(&self.injector)
            .chain(&self.buses)
            .flat_map(|i| i.served());
        for pod in served {
            for attachment in &pod.attachments {
                let snapshot = match counters.read(attachment) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(pod = %pod.pod, error = %e, "reading counters failed");
                        continue;
                    }
                };
                samples.extend(metrics::traffic_samples(
                    &pod.pod.namespace,
                    &pod.pod.name,
                    &attachment.info.ifname,
                    &snapshot,
                ));
            }
        }
        samples
    }
}

impl Live {
    /// Every bus's members and can-gw counters, read now.
    fn buses(&self) -> Vec<BusSample> {
        self.buses
            .iter()
            .filter_map(|i| i.bus())
            .map(|bus| {
                let stats = bus.stats().unwrap_or_else(|e| {
                    tracing::debug!(bus = %bus.spec().name, error = %e, "reading bus counters failed");
                    BusStats {
                        members: bus.members().len(),
                        ..BusStats::default()
                    }
                });
                BusSample {
                    bus: bus.spec().name.clone(),
                    members: stats.members,
                    forwarded: stats.forwarded,
                    dropped: stats.dropped,
                }
            })
            .collect()
    }
}

impl StateSource for Live {
    fn snapshot(&self) -> Snapshot {
        let devices = self.injector.devices().len();
        let supported = self.health.borrow().is_healthy();
        Snapshot {
            devices,
            healthy: if supported { devices } else { 0 },
            allocated: self.injector.allocated(),
            pods_served: self.injector.served().len(),
            registered: self.registered.iter().all(|r| r.load(Ordering::SeqCst)),
            vcan_supported: supported,
            traffic: self.traffic(),
            buses: self.buses(),
        }
    }

    fn readiness(&self) -> (bool, bool) {
        (
            self.registered.iter().all(|r| r.load(Ordering::SeqCst)),
            self.health.borrow().is_healthy(),
        )
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(config.log_format);
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

    let bpffs_dir = config.bpffs_dir.clone();
    let counters = match tokio::task::spawn_blocking(move || {
        Counters::open(&ebpf::Config {
            bpffs_dir,
            mode: None,
        })
    })
    .await?
    {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::error!(
                error = %e,
                "CAN frame counting is unavailable; interfaces are still served without counters"
            );
            None
        }
    };
    let attach_mode = counters
        .as_ref()
        .map_or("none", |c| c.attach_mode().as_str());
    let metrics = Arc::new(Metrics::new(&config.resource_name.to_string(), attach_mode));
    let injector = Injector::new(
        config.resource_name.clone(),
        DeviceSet::new(&config.resource_name, config.devices as usize),
        PodResources::new(&config.pod_resources_socket),
        Arc::new(CriRuntime::new(&containerd_socket)),
        metrics.clone(),
    );
    let injector = Arc::new(match counters.clone() {
        Some(c) => injector.with_counters(c),
        None => injector,
    });
    let buses = match &config.bus_config {
        Some(path) => bus::load(path)?,
        None => Vec::new(),
    };
    let mut bus_injectors = Vec::new();
    for spec in buses {
        let bus = Bus::new(spec, config.resource_name.domain(), &config.state_dir)
            .context("bus resource name")?;
        if bus.resource() == &config.resource_name {
            anyhow::bail!(
                "bus {} has the resource name {} of the private interfaces: rename the bus",
                bus.spec().name,
                bus.resource()
            );
        }
        tracing::info!(
            bus = %bus.spec().name,
            resource = %bus.resource(),
            fd = bus.spec().fd,
            members = bus.spec().members,
            interface = %bus.spec().interface,
            namespace = %bus.namespace().display(),
            "serving shared CAN bus"
        );
        let injector = Injector::new(
            bus.resource().clone(),
            DeviceSet::new(bus.resource(), bus.spec().members as usize),
            PodResources::new(&config.pod_resources_socket),
            Arc::new(CriRuntime::new(&containerd_socket)),
            metrics.clone(),
        )
        .with_bus(Arc::new(bus));
        bus_injectors.push(Arc::new(match counters.clone() {
            Some(c) => injector.with_counters(c),
            None => injector,
        }));
    }
    let all: Vec<Arc<Injector>> = std::iter::once(injector.clone())
        .chain(bus_injectors.iter().cloned())
        .collect();
    let health = health::watch(Duration::from_secs(config.health_interval.max(1)));

    // Interfaces of running pods survive a plugin restart; take them over from what the kubelet and
    // the runtime report rather than from anything this process remembered.
    // Bus members are adopted before their bus is served, so every member's rules are known
    // before a new member can join.
    for i in &all {
        match i.recover().await {
            // The pod count first: logs and tests read "adopted running pods pods=N".
            Ok(n) => tracing::info!(pods = n, resource = %i.resource(), "adopted running pods"),
            Err(e) => tracing::warn!(error = %e, "could not adopt running pods yet"),
        }
    }

    let shutdown = CancellationToken::new();
    let reconciler = {
        let all = all.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(RECONCILE_INTERVAL);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                for injector in &all {
                    match injector.reconcile().await {
                        Ok(gone) => {
                            for pod in gone {
                                tracing::info!(
                                    resource = %injector.resource(),
                                    pod = %pod.pod,
                                    "pod went away: forgotten"
                                );
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "reconcile skipped"),
                    }
                }
            }
        })
    };

    let registrar = Registrar::new(&config.device_plugin_dir, injector.clone(), health.clone());
    // Bus devices are healthy while the node can make vxcan pairs and forward with can-gw.
    let bus_health = (!bus_injectors.is_empty()).then(|| {
        health::watch_probe(
            health::Probe::Bus,
            Duration::from_secs(config.health_interval.max(1)),
        )
    });
    let bus_registrars: Vec<Registrar> = bus_injectors
        .iter()
        .zip(std::iter::repeat_with(|| bus_health.clone()).flatten())
        .map(|(i, h)| Registrar::new(&config.device_plugin_dir, i.clone(), h))
        .collect();
    let live = Arc::new(Live {
        injector: injector.clone(),
        buses: bus_injectors.clone(),
        health,
        registered: std::iter::once(registrar.registered_flag())
            .chain(bus_registrars.iter().map(Registrar::registered_flag))
            .collect(),
    });
    let http = {
        let server = metrics::serve(
            config.metrics_address,
            metrics.clone(),
            live,
            shutdown.clone().cancelled_owned(),
        );
        let shutdown_all = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "metrics endpoint failed; stopping");
                shutdown_all.cancel();
            }
        })
    };
    let signals = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            shutdown.cancel();
        })
    };
    // Each resource has its own socket and registration; any of them failing stops the plugin.
    let registrations = futures::future::try_join_all(
        std::iter::once(&registrar)
            .chain(&bus_registrars)
            .map(|r| r.run(shutdown.clone())),
    )
    .await;
    shutdown.cancel();
    registrations.context("device-plugin registration failed")?;
    let _ = reconciler.await;
    let _ = http.await;
    signals.abort();
    Ok(())
}
