//! Whether this node can create vcan interfaces at all.
//!
//! The probe creates a vcan in a throw-away network namespace, so it sees exactly what a pod would
//! get (module loaded or autoloadable, permissions) without ever touching the node's namespace.

use std::time::Duration;

use tokio::sync::watch;

use crate::link::{CanMtu, LinkError, Links, VcanSpec};
use crate::netns;

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

/// Probes now and then every `interval`, publishing changes on the returned channel and logging
/// each transition with its reason.
pub fn watch(interval: Duration) -> watch::Receiver<Health> {
    let initial = probe();
    log_transition(None, &initial);
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let now = match tokio::task::spawn_blocking(probe).await {
                Ok(h) => h,
                Err(e) => Health::Unhealthy(format!("health probe failed: {e}")),
            };
            let before = tx.borrow().clone();
            if before != now {
                log_transition(Some(&before), &now);
                if tx.send(now).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn log_transition(before: Option<&Health>, now: &Health) {
    match now {
        Health::Healthy => {
            tracing::info!(previous = ?before, "node can create vcan interfaces: devices healthy")
        }
        Health::Unhealthy(why) => {
            tracing::error!(reason = %why, "node cannot create vcan interfaces: all devices unhealthy")
        }
    }
}
