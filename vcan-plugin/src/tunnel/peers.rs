//! Who a bus tunnel talks to: the plugin's other instances, found through a headless Service
//! whose DNS name resolves to every plugin pod's address, plus fixed external peers (a bench rig
//! running cannelloni), re-resolved periodically so nodes join and leave without restarts.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};

/// Where a tunnel's peers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSource {
    /// A DNS name resolving to every plugin instance (a headless Service), if any.
    pub service: Option<String>,
    /// The tunnel's UDP port on every plugin instance.
    pub port: u16,
    /// Fixed peers by address.
    pub fixed: Vec<SocketAddr>,
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

impl PeerSource {
    /// The current peers: the fixed ones and every address the service resolves to, except this
    /// instance's own. Resolution failures leave the fixed peers and return the error beside.
    pub async fn resolve(&self) -> (BTreeSet<SocketAddr>, Option<ResolveError>) {
        let mut peers: BTreeSet<SocketAddr> = self.fixed.iter().copied().collect();
        let Some(service) = &self.service else {
            return (peers, None);
        };
        match tokio::net::lookup_host((service.as_str(), self.port)).await {
            Ok(found) => {
                peers.extend(found.filter(|a| !is_local(a.ip())));
                (peers, None)
            }
            Err(source) => (
                peers,
                Some(ResolveError {
                    service: service.clone(),
                    source,
                }),
            ),
        }
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
    async fn fixed_peers_stay_and_own_addresses_are_left_out() {
        let fixed: SocketAddr = "192.0.2.10:20000".parse().expect("address");
        let source = PeerSource {
            service: Some("localhost".into()),
            port: 20000,
            fixed: vec![fixed],
        };
        let (peers, error) = source.resolve().await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(peers.into_iter().collect::<Vec<_>>(), [fixed]);

        let source = PeerSource {
            service: Some("no-such-service.invalid".into()),
            ..source
        };
        let (peers, error) = source.resolve().await;
        assert_eq!(peers.len(), 1, "the fixed peer survives a failed lookup");
        let error = error.expect("an unresolvable name is an error");
        assert!(
            error
                .to_string()
                .starts_with("cannot resolve the peer service no-such-service.invalid"),
            "{error}"
        );
    }

    #[test]
    fn only_own_addresses_are_local() {
        assert!(is_local("127.0.0.1".parse().expect("ip")));
        assert!(!is_local("192.0.2.10".parse().expect("ip")));
    }
}
