//! The plugin's other instances a bus tunnel talks to, found through a headless Service whose DNS
//! name resolves to every plugin pod's address, re-resolved periodically so nodes join and leave
//! without restarts. (External peers, bench rigs running cannelloni, are configured.)
//!
//! Resolution runs in a task of its own ([`spawn_resolver`]) with a deadline, so a resolver that
//! hangs or is down never holds up the frames: the tunnel keeps its known peers and gets a new
//! set only from an answer.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// The longest one resolution may take; beyond it the attempt counts as failed.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest time between two resolutions, however often one is asked for early.
pub const MIN_RESOLVE_GAP: Duration = Duration::from_secs(1);

/// Where a tunnel's instance peers come from (its external peers are configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSource {
    /// A DNS name resolving to every plugin instance (a headless Service).
    pub service: String,
    /// The tunnel's UDP port on every plugin instance.
    pub port: u16,
}

/// Why the peers could not be resolved.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot resolve the peer service {service}: {source} (is the headless Service deployed, and \
     does the plugin use the cluster's DNS?)"
)]
pub struct ResolveError {
    /// The name.
    pub service: String,
    /// The resolver's error.
    pub source: std::io::Error,
}

/// Resolves `service` (port `port`) every `interval`, and early — at most once per
/// [`MIN_RESOLVE_GAP`] — whenever `early` is notified, until `shutdown`. Each answer is
/// published as the set of instance addresses (this one's own left out); failures and timeouts
/// are logged and publish nothing, so the known peers stay as they are.
pub fn spawn_resolver(
    bus: String,
    service: String,
    port: u16,
    interval: Duration,
    early: Arc<Notify>,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<BTreeSet<SocketAddr>>> {
    let (tx, rx) = watch::channel(None);
    let source = PeerSource { service, port };
    tokio::spawn(async move {
        loop {
            let started = tokio::time::Instant::now();
            let attempt = tokio::time::timeout(RESOLVE_TIMEOUT, source.resolve());
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = attempt => match result {
                    Ok(Ok(found)) => {
                        tx.send_replace(Some(found));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(bus = %bus, error = %e, "peers not updated");
                    }
                    Err(_) => {
                        tracing::warn!(bus = %bus, service = %source.service, timeout = ?RESOLVE_TIMEOUT, "peer service resolution timed out; peers not updated");
                    }
                },
            }
            // Wait for the next regular pass or an early request, never sooner than the gap.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(started + interval) => {}
                () = early.notified() => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep_until(started + MIN_RESOLVE_GAP) => {}
                    }
                }
            }
        }
    });
    rx
}

impl PeerSource {
    /// Every address the service resolves to, except this instance's own.
    pub async fn resolve(&self) -> Result<BTreeSet<SocketAddr>, ResolveError> {
        let found = tokio::net::lookup_host((self.service.as_str(), self.port))
            .await
            .map_err(|source| ResolveError {
                service: self.service.clone(),
                source,
            })?;
        // The tunnel's socket is IPv4 (as are cannelloni's defaults); a dual-stack Service's
        // IPv6 addresses name the same instances.
        Ok(found.filter(|a| a.is_ipv4() && !is_local(a.ip())).collect())
    }
}

/// Whether `ip` is one of this host's (this pod's) addresses: binding a socket to it succeeds
/// only then. The service resolves to every instance, this one included, and a tunnel must not
/// send its frames to itself.
pub fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn own_addresses_are_left_out_and_failures_named() {
        let source = PeerSource {
            service: "localhost".into(),
            port: 20000,
        };
        let peers = source.resolve().await.expect("localhost resolves");
        assert!(peers.is_empty(), "{peers:?}");

        let source = PeerSource {
            service: "no-such-service.invalid".into(),
            ..source
        };
        let error = source
            .resolve()
            .await
            .expect_err("an unresolvable name is an error");
        assert!(
            error
                .to_string()
                .starts_with("cannot resolve the peer service no-such-service.invalid"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn the_resolver_publishes_answers_and_answers_early_requests() {
        let early = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        let mut rx = spawn_resolver(
            "x".into(),
            "localhost".into(),
            20000,
            Duration::from_secs(3600),
            early.clone(),
            shutdown.clone(),
        );
        rx.changed().await.expect("a first answer");
        assert_eq!(rx.borrow_and_update().clone(), Some(BTreeSet::new()));
        let asked = tokio::time::Instant::now();
        early.notify_one();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("an early answer, long before the interval")
            .expect("resolver alive");
        assert!(asked.elapsed() < Duration::from_secs(5));
        shutdown.cancel();
    }

    #[test]
    fn only_own_addresses_are_local() {
        assert!(is_local("127.0.0.1".parse().expect("ip")));
        assert!(!is_local("192.0.2.10".parse().expect("ip")));
    }
}
