//! Whether this node can serve its devices at all: create vcan interfaces (private devices), and
//! vxcan pairs joined by can-gw (shared buses).
//!
//! The probes create interfaces in a throw-away network namespace, so they see exactly what a pod
//! would get (module loaded or autoloadable, permissions) without ever touching the node's
//! namespace.

use std::time::Duration;

use tokio::sync::watch;

use crate::kernel::cangw::Gateway;
use crate::kernel::link::{CanMtu, LinkError, Links, VcanSpec};
use crate::kernel::netns::{self, Netns};
use crate::kernel::vxcan;

/// The node's ability to serve vcan devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// vcan interfaces can be created.
    Healthy,
    /// They cannot; the message says why and what to do.
    Unhealthy(String),
}

impl Health {
    /// Whether devices should be advertised as usable.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// Tries to create a vcan in a new, empty namespace.
pub fn probe() -> Health {
    let result = netns::run_in_new(|| -> Result<(), LinkError> {
        Links::current()?.ensure_vcan(&VcanSpec {
            name: "vcanprobe0".into(),
            mtu: CanMtu::Fd,
        })?;
        Ok(())
    });
    match result {
        Ok(Ok(())) => Health::Healthy,
        Ok(Err(e)) => Health::Unhealthy(e.to_string()),
        Err(e) => Health::Unhealthy(e.to_string()),
    }
}

/// Whether shared buses can work: a vxcan pair can be created, and the can-gw module (never
/// loaded on demand) answers. Probing can-gw changes nothing, so it runs in the plugin's own
/// namespace.
pub fn probe_bus() -> Health {
    if let Err(e) = vxcan::probe() {
        return Health::Unhealthy(e.to_string());
    }
    match Gateway::open(&Netns::Pid(std::process::id())) {
        Ok(_) => Health::Healthy,
        Err(e) => Health::Unhealthy(e.to_string()),
    }
}

/// What a probe checks, for the logs.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// [`probe`]: vcan interfaces, the private devices.
    Vcan,
    /// [`probe_bus`]: vxcan pairs and can-gw, the shared buses.
    Bus,
}

impl Probe {
    fn run(self) -> Health {
        match self {
            Probe::Vcan => probe(),
            Probe::Bus => probe_bus(),
        }
    }

    fn what(self) -> &'static str {
        match self {
            Probe::Vcan => "vcan interfaces",
            Probe::Bus => "shared buses (vxcan and can-gw)",
        }
    }
}

/// Probes vcan support now and then every `interval`, publishing changes on the returned channel
/// and logging each transition with its reason.
pub fn watch(interval: Duration) -> watch::Receiver<Health> {
    watch_probe(Probe::Vcan, interval)
}

/// [`watch()`] for any [`Probe`].
pub fn watch_probe(kind: Probe, interval: Duration) -> watch::Receiver<Health> {
    watch_with(kind.what().to_string(), move || kind.run(), interval)
}

/// Runs `probe` (blocking) now and then every `interval`, publishing changes on the returned
/// channel and logging each transition with its reason; `what` names what is probed.
pub fn watch_with(
    what: String,
    probe: impl Fn() -> Health + Clone + Send + Sync + 'static,
    interval: Duration,
) -> watch::Receiver<Health> {
    let initial = probe();
    log_transition(&what, None, &initial);
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let run = probe.clone();
            let now = match tokio::task::spawn_blocking(run).await {
                Ok(h) => h,
                Err(e) => Health::Unhealthy(format!("health probe failed: {e}")),
            };
            let before = tx.borrow().clone();
            if before != now {
                log_transition(&what, Some(&before), &now);
                if tx.send(now).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn log_transition(what: &str, before: Option<&Health>, now: &Health) {
    match now {
        Health::Healthy => {
            tracing::info!(previous = ?before, "node supports {what}: devices healthy")
        }
        Health::Unhealthy(why) => {
            tracing::error!(reason = %why, "node does not support {what}: all devices unhealthy")
        }
    }
}
