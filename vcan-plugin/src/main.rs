//! The vcan-plugin daemon: wires configuration, logging and the library together.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use vcan_plugin::config::{Config, LogFormat};
use vcan_plugin::ebpf::{self, Counters};
use vcan_plugin::health::{self, Health};
use vcan_plugin::injector::Injector;
use vcan_plugin::kubelet::registration::Registrar;
use vcan_plugin::metrics::{self, Metrics, Snapshot, StateSource, TrafficSample};
use vcan_plugin::podresources::PodResources;
use vcan_plugin::resource::DeviceSet;
use vcan_plugin::runtime::{self, CriRuntime};

/// How often pods that went away are forgotten.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(10);

/// The live state behind /metrics and /readyz.
struct Live {
    injector: Arc<Injector>,
    health: tokio::sync::watch::Receiver<Health>,
    registered: Arc<AtomicBool>,
}

impl Live {
    /// Every served pod's counters, read now; pods that went away have no series.
    fn traffic(&self) -> Vec<TrafficSample> {
        let Some(counters) = self.injector.counters() else {
            return Vec::new();
        };
        let mut samples = Vec::new();
        for pod in self.injector.served() {
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

impl StateSource for Live {
    fn snapshot(&self) -> Snapshot {
        let devices = self.injector.devices().len();
        let supported = self.health.borrow().is_healthy();
        Snapshot {
            devices,
            healthy: if supported { devices } else { 0 },
            allocated: self.injector.allocated(),
            pods_served: self.injector.served().len(),
            registered: self.registered.load(Ordering::SeqCst),
            vcan_supported: supported,
            traffic: self.traffic(),
        }
    }

    fn readiness(&self) -> (bool, bool) {
        (
            self.registered.load(Ordering::SeqCst),
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
    let injector = Arc::new(match counters {
        Some(c) => injector.with_counters(c),
        None => injector,
    });
    let health = health::watch(Duration::from_secs(config.health_interval.max(1)));

    // Interfaces of running pods survive a plugin restart; take them over from what the kubelet and
    // the runtime report rather than from anything this process remembered.
    match injector.recover().await {
        Ok(n) => tracing::info!(pods = n, "adopted running pods"),
        Err(e) => tracing::warn!(error = %e, "could not adopt running pods yet"),
    }

    let shutdown = CancellationToken::new();
    let reconciler = {
        let injector = injector.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(RECONCILE_INTERVAL);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                match injector.reconcile().await {
                    Ok(gone) => {
                        for pod in gone {
                            tracing::info!(pod = %pod.pod, "pod went away: forgotten");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "reconcile skipped"),
                }
            }
        })
    };

    let registrar = Registrar::new(&config.device_plugin_dir, injector.clone(), health.clone());
    let live = Arc::new(Live {
        injector: injector.clone(),
        health,
        registered: registrar.registered_flag(),
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
    registrar
        .run(shutdown.clone())
        .await
        .context("device-plugin registration failed")?;
    shutdown.cancel();
    let _ = reconciler.await;
    let _ = http.await;
    signals.abort();
    Ok(())
}
