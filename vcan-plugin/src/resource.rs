//! The extended resource the plugin serves and the device IDs it advertises.

use std::fmt;
use std::str::FromStr;

/// Longest device ID the kubelet accepts.
pub const MAX_DEVICE_ID_LEN: usize = 63;

/// An extended resource name, `domain/name` (e.g. `socketcan.io/vcan`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceName {
    domain: String,
    name: String,
}

/// Why a resource name was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid resource name {0:?}: {1}")]
pub struct ResourceNameError(String, &'static str);

impl FromStr for ResourceName {
    type Err = ResourceNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ResourceNameError(s.to_string(), why);
        let (domain, name) = s
            .split_once('/')
            .ok_or_else(|| err("expected domain/name, e.g. socketcan.io/vcan"))?;
        if domain.len() > 253
            || !domain.split('.').all(|label| is_dns_label(label, 63))
            || !domain.contains('.')
        {
            return Err(err(
                "the domain must be a DNS subdomain with a dot, e.g. socketcan.io",
            ));
        }
        if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
            return Err(err("the kubernetes.io domain is reserved"));
        }
        if !is_dns_label(name, 63) {
            return Err(err(
                "the name must be lowercase letters, digits and '-', at most 63 characters",
            ));
        }
        // Device IDs are "<name>-NNNN" and must fit the kubelet's 63-character limit.
        if name.len() + 5 > MAX_DEVICE_ID_LEN {
            return Err(err("the name must be at most 58 characters"));
        }
        Ok(ResourceName {
            domain: domain.to_string(),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.name)
    }
}

impl ResourceName {
    /// The domain, which also prefixes the pod annotations the plugin reads.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The name part, e.g. `vcan`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The socket file name the plugin serves in the kubelet's device-plugin directory.
    pub fn socket_name(&self) -> String {
        format!("{}-{}.sock", self.domain, self.name)
    }
}

/// The advertised devices: `count` interchangeable slots with IDs stable across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSet {
    prefix: String,
    count: usize,
}

impl DeviceSet {
    /// Devices `<name>-0000` … for `resource`.
    pub fn new(resource: &ResourceName, count: usize) -> Self {
        DeviceSet {
            prefix: resource.name().to_string(),
            count,
        }
    }

    /// How many devices there are.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every device ID, in order.
    pub fn ids(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.count).map(|i| format!("{}-{i:04}", self.prefix))
    }

    /// Whether `id` is one of ours.
    pub fn contains(&self, id: &str) -> bool {
        id.strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .filter(|n| n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n < self.count)
    }
}

/// Whether `s` is a DNS label of at most `max_len` characters (lowercase letters, digits and
/// '-', not at either end): what names in the configurations become part of resource names and
/// annotation keys with.
pub fn is_dns_label(s: &str, max_len: usize) -> bool {
    !s.is_empty()
        && s.len() <= max_len
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_are_validated() {
        let r: ResourceName = "socketcan.io/vcan".parse().expect("valid");
        assert_eq!((r.domain(), r.name()), ("socketcan.io", "vcan"));
        assert_eq!(r.socket_name(), "socketcan.io-vcan.sock");
        for bad in [
            "vcan",
            "socketcan/vcan",
            "Socketcan.io/vcan",
            "socketcan.io/VCAN",
            "socketcan.io/",
            "kubernetes.io/vcan",
            "a.b/-x",
        ] {
            assert!(bad.parse::<ResourceName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn device_ids_are_stable_and_recognised() {
        let r: ResourceName = "k8s.collabora.com/vcan".parse().expect("valid");
        let set = DeviceSet::new(&r, 100);
        let ids: Vec<String> = set.ids().collect();
        assert_eq!(ids.len(), 100);
        assert_eq!(ids[0], "vcan-0000");
        assert_eq!(ids[99], "vcan-0099");
        assert!(
            ids.iter()
                .all(|id| id.len() <= MAX_DEVICE_ID_LEN && set.contains(id))
        );
        assert_eq!(DeviceSet::new(&r, 100).ids().collect::<Vec<_>>(), ids);
        for bad in [
            "vcan-0100",
            "vcan-1",
            "vcan0000",
            "bus-0000",
            "",
            "vcan-00a1",
        ] {
            assert!(!set.contains(bad), "{bad}");
        }
    }
}
