//! The hardware configuration: which physical CAN interfaces a node passes to pods (or lends to a
//! shared bus as its uplink), how each is found and how its controller is set up — parsed and
//! checked field by field.

use std::path::Path;

use serde::Deserialize;

use crate::kernel::link;
use crate::resource::{ResourceName, ResourceNameError};

/// The resource name of interface `name` is `<domain>/hw-<name>` unless it sets `resource`.
pub const RESOURCE_PREFIX: &str = "hw-";
/// The interface's name inside the pod when the configuration does not say.
pub const DEFAULT_INTERFACE: &str = "can0";
/// Longest interface name: Kubernetes allows 63 characters after the domain, less `hw-`, less
/// the `bitrate.` of the annotation that picks a bitrate.
const MAX_NAME_LEN: usize =
    crate::pod::annotations::MAX_KEY_LEN - crate::pod::annotations::BITRATE_OPTION.len();

/// How the plugin finds the netdev of a configured interface.
///
/// Interface names such as `can0` follow probe order and can change across reboots; the parent
/// device (a PCI address such as `0000:03:00.0`, or a USB interface such as `1-1.2:1.0`) and the
/// channel on it do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMatch {
    /// The netdev whose parent device is `parent` (and, for cards with several channels, whose
    /// `dev_id` is `channel`).
    Parent {
        /// The parent device's name, as `ip -details link` shows after `parentdev`.
        parent: String,
        /// The channel on a card with several (`/sys/class/net/<if>/dev_id`); `None` when the
        /// parent has one CAN netdev.
        channel: Option<u32>,
    },
    /// The netdev named so on the node (only as stable as the node's naming).
    Ifname(String),
}

impl std::fmt::Display for DeviceMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceMatch::Parent {
                parent,
                channel: None,
            } => write!(f, "the CAN interface of device {parent}"),
            DeviceMatch::Parent {
                parent,
                channel: Some(c),
            } => write!(f, "channel {c} of device {parent}"),
            DeviceMatch::Ifname(name) => write!(f, "interface {name}"),
        }
    }
}

/// The bit timing and modes a controller is set to before use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerSettings {
    /// Nominal bitrate, bit/s.
    pub bitrate: u32,
    /// Sample point in tenths of a percent (875 = 87.5 %); `None` lets the kernel choose.
    pub sample_point: Option<u32>,
    /// CAN FD data bitrate, bit/s; `None` for classic CAN.
    pub data_bitrate: Option<u32>,
    /// CAN FD data-phase sample point, tenths of a percent.
    pub data_sample_point: Option<u32>,
    /// Milliseconds after a bus-off before the controller restarts itself; 0 = never.
    pub restart_ms: u32,
    /// Listen-only: the controller neither acknowledges nor sends.
    pub listen_only: bool,
}

impl ControllerSettings {
    /// The request for [`crate::kernel::can::configure`]: CAN FD exactly when a data bitrate is
    /// set.
    pub fn to_can(&self) -> crate::kernel::can::CanSettings {
        crate::kernel::can::CanSettings {
            bitrate: self.bitrate,
            sample_point: self.sample_point,
            data_bitrate: self.data_bitrate,
            data_sample_point: self.data_sample_point,
            restart_ms: self.restart_ms,
            listen_only: self.listen_only,
            fd: self.data_bitrate.is_some(),
        }
    }
}

/// One physical interface as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardwareSpec {
    /// The configuration's name for the interface, a DNS label.
    pub name: String,
    /// The extended resource, `<domain>/hw-<name>` unless configured (e.g. the
    /// `k8s.collabora.com/socketcan-<if>` names of k8s-socketcan, for migration).
    pub resource: Option<String>,
    /// How the netdev is found.
    pub device: DeviceMatch,
    /// How its controller is set up.
    pub settings: ControllerSettings,
    /// Bitrates a pod may choose instead of `settings.bitrate` (which is always allowed).
    pub bitrates: Vec<u32>,
    /// The interface's name inside the pod.
    pub interface: String,
}

impl HardwareSpec {
    /// The interface's extended resource under `domain`.
    pub fn resource(&self, domain: &str) -> Result<ResourceName, ResourceNameError> {
        match &self.resource {
            Some(r) => r.parse(),
            None => format!("{domain}/{RESOURCE_PREFIX}{}", self.name).parse(),
        }
    }

    /// Whether a pod may ask for `bitrate`.
    pub fn allows(&self, bitrate: u32) -> bool {
        bitrate == self.settings.bitrate || self.bitrates.contains(&bitrate)
    }
}

/// What is wrong with the hardware configuration.
#[derive(Debug, thiserror::Error)]
pub enum HardwareConfigError {
    /// The file could not be read.
    #[error("cannot read the hardware configuration {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error(
        "the hardware configuration {path} is not valid: {detail} (expected e.g. \
         {{\"interfaces\":[{{\"name\":\"bench\",\"device\":{{\"parent\":\"0000:03:00.0\"}},\
         \"bitrate\":500000}}]}})"
    )]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        detail: String,
    },
    /// One field of one interface is invalid.
    #[error("the hardware configuration {path}: interfaces[{index}].{field}: {message}")]
    Field {
        /// The file.
        path: String,
        /// Position of the interface in the list.
        index: usize,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    interfaces: Vec<RawInterface>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    channel: Option<i64>,
    #[serde(default)]
    ifname: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: String,
    #[serde(default)]
    resource: Option<String>,
    device: RawDevice,
    bitrate: i64,
    #[serde(default)]
    sample_point: Option<f64>,
    #[serde(default)]
    data_bitrate: Option<i64>,
    #[serde(default)]
    data_sample_point: Option<f64>,
    #[serde(default)]
    restart_ms: Option<i64>,
    #[serde(default)]
    listen_only: Option<bool>,
    #[serde(default)]
    bitrates: Vec<i64>,
    #[serde(default)]
    interface: Option<String>,
}

/// The fastest data bitrate SocketCAN controllers reach (CAN FD tops out near 8–12 Mbit/s).
const MAX_BITRATE: i64 = 16_000_000;

fn bitrate(value: i64) -> Result<u32, String> {
    u32::try_from(value)
        .ok()
        .filter(|b| (1..=MAX_BITRATE).contains(&i64::from(*b)))
        .ok_or_else(|| format!("{value} is not a bitrate in 1..={MAX_BITRATE} bit/s"))
}

fn sample_point(value: f64) -> Result<u32, String> {
    // The kernel takes tenths of a percent; `ip link` takes a fraction, as this file does.
    if value > 0.0 && value < 1.0 {
        Ok((value * 1000.0).round() as u32)
    } else {
        Err(format!(
            "{value} is not a sample point: a fraction between 0 and 1, e.g. 0.875"
        ))
    }
}

/// Parses a hardware configuration, JSON (`path` only names it in errors).
pub fn parse(text: &str, path: &str) -> Result<Vec<HardwareSpec>, HardwareConfigError> {
    let raw: RawFile = serde_json::from_str(text).map_err(|e| HardwareConfigError::Syntax {
        path: path.to_string(),
        detail: e.to_string(),
    })?;
    let mut specs: Vec<HardwareSpec> = Vec::new();
    for (index, raw) in raw.interfaces.into_iter().enumerate() {
        let field = |field, message: String| HardwareConfigError::Field {
            path: path.to_string(),
            index,
            field,
            message,
        };
        if !crate::resource::is_dns_label(&raw.name, MAX_NAME_LEN) {
            return Err(field(
                "name",
                format!(
                    "{:?} is not a valid name: lowercase letters, digits and '-', not at either \
                     end, 1 to {MAX_NAME_LEN} characters",
                    raw.name
                ),
            ));
        }
        if specs.iter().any(|s| s.name == raw.name) {
            return Err(field(
                "name",
                format!("interface {:?} is listed twice", raw.name),
            ));
        }
        let device = match (raw.device.parent, raw.device.ifname) {
            (Some(parent), None) if !parent.is_empty() => DeviceMatch::Parent {
                parent,
                channel: raw
                    .device
                    .channel
                    .map(|c| {
                        u32::try_from(c)
                            .map_err(|_| field("device.channel", format!("{c} is not a channel")))
                    })
                    .transpose()?,
            },
            (None, Some(ifname)) if raw.device.channel.is_none() => {
                link::validate_name(&ifname).map_err(|e| field("device.ifname", e.to_string()))?;
                DeviceMatch::Ifname(ifname)
            }
            (None, Some(_)) => {
                return Err(field(
                    "device.channel",
                    "a channel goes with a parent device, not with an interface name".into(),
                ));
            }
            _ => {
                return Err(field(
                    "device",
                    "give either \"parent\" (the PCI or USB device, e.g. \"0000:03:00.0\", as \
                     `ip -details link` shows after parentdev; stable across reboots) or \
                     \"ifname\" (e.g. \"can0\")"
                        .into(),
                ));
            }
        };
        if let Some(other) = specs.iter().find(|s| s.device == device) {
            return Err(field(
                "device",
                format!(
                    "{device} is already interface {:?}: a device can be passed to one entry only",
                    other.name
                ),
            ));
        }
        let settings = ControllerSettings {
            bitrate: bitrate(raw.bitrate).map_err(|m| field("bitrate", m))?,
            sample_point: raw
                .sample_point
                .map(sample_point)
                .transpose()
                .map_err(|m| field("sample_point", m))?,
            data_bitrate: raw
                .data_bitrate
                .map(bitrate)
                .transpose()
                .map_err(|m| field("data_bitrate", m))?,
            data_sample_point: raw
                .data_sample_point
                .map(sample_point)
                .transpose()
                .map_err(|m| field("data_sample_point", m))?,
            restart_ms: match raw.restart_ms {
                None => 100,
                Some(ms) => u32::try_from(ms)
                    .ok()
                    .filter(|ms| *ms <= 60_000)
                    .ok_or_else(|| {
                        field(
                            "restart_ms",
                            format!("{ms} is not in 0..=60000 (0: never restart after bus-off)"),
                        )
                    })?,
            },
            listen_only: raw.listen_only.unwrap_or(false),
        };
        if settings.data_sample_point.is_some() && settings.data_bitrate.is_none() {
            return Err(field(
                "data_sample_point",
                "set only with data_bitrate (CAN FD)".into(),
            ));
        }
        let bitrates = raw
            .bitrates
            .iter()
            .map(|b| bitrate(*b))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|m| field("bitrates", m))?;
        let interface = raw
            .interface
            .unwrap_or_else(|| DEFAULT_INTERFACE.to_string());
        link::validate_name(&interface).map_err(|e| field("interface", e.to_string()))?;
        let spec = HardwareSpec {
            name: raw.name,
            resource: raw.resource,
            device,
            settings,
            bitrates,
            interface,
        };
        if let Some(resource) = &spec.resource {
            let parsed: ResourceName = resource
                .parse()
                .map_err(|e: ResourceNameError| field("resource", e.to_string()))?;
            if specs
                .iter()
                .any(|s| s.resource.as_deref() == Some(parsed.to_string().as_str()))
            {
                return Err(field(
                    "resource",
                    format!("{resource} is used by another interface"),
                ));
            }
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// Reads and parses the hardware configuration file at `path`.
pub fn load(path: &Path) -> Result<Vec<HardwareSpec>, HardwareConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| HardwareConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse(text, "hw.json").expect_err("invalid").to_string()
    }

    #[test]
    fn interfaces_parse_with_defaults() {
        let specs = parse(
            r#"{"interfaces":[
                {"name":"bench","device":{"parent":"0000:00:10.0"},"bitrate":500000,
                 "sample_point":0.875,"bitrates":[125000,250000],"interface":"ecu0"},
                {"name":"fd","device":{"parent":"1-1:1.0","channel":1},"bitrate":1000000,
                 "data_bitrate":5000000,"restart_ms":0,"listen_only":true,
                 "resource":"k8s.collabora.com/socketcan-can1"},
                {"name":"legacy","device":{"ifname":"can7"},"bitrate":250000}
            ]}"#,
            "hw.json",
        )
        .expect("valid");
        assert_eq!(specs.len(), 3);
        let bench = &specs[0];
        assert_eq!(
            bench.device,
            DeviceMatch::Parent {
                parent: "0000:00:10.0".into(),
                channel: None
            }
        );
        assert_eq!(bench.settings.sample_point, Some(875));
        assert_eq!(
            bench.settings.restart_ms, 100,
            "restarts after bus-off by default"
        );
        assert_eq!(bench.interface, "ecu0");
        assert!(bench.allows(500_000) && bench.allows(125_000) && !bench.allows(1_000_000));
        assert_eq!(
            bench.resource("socketcan.io").expect("valid").to_string(),
            "socketcan.io/hw-bench"
        );
        let fd = &specs[1];
        assert_eq!(fd.settings.data_bitrate, Some(5_000_000));
        assert!(fd.settings.listen_only);
        assert_eq!(fd.settings.restart_ms, 0);
        assert_eq!(
            fd.resource("socketcan.io").expect("valid").to_string(),
            "k8s.collabora.com/socketcan-can1"
        );
        assert_eq!(specs[2].device, DeviceMatch::Ifname("can7".into()));
        assert_eq!(specs[2].interface, "can0");
    }

    #[test]
    fn each_bad_field_is_named() {
        let one = |fields: &str| {
            error(&format!(
                r#"{{"interfaces":[{{"name":"a","device":{{"parent":"p"}},"bitrate":500000{fields}}}]}}"#
            ))
        };
        assert_eq!(
            one(r#","bitrate":0"#).split(": ").next(),
            Some("the hardware configuration hw.json is not valid"),
            "a repeated key is a syntax error"
        );
        assert!(
            one(r#","sample_point":87.5"#).contains(
                "interfaces[0].sample_point: 87.5 is not a sample point: a fraction between 0 and 1"
            ),
            "{}",
            one(r#","sample_point":87.5"#)
        );
        assert!(one(r#","data_bitrate":-1"#).contains("interfaces[0].data_bitrate: -1 is not"));
        assert!(one(r#","data_sample_point":0.8"#).contains("set only with data_bitrate"));
        assert!(one(r#","restart_ms":70000"#).contains("interfaces[0].restart_ms: 70000"));
        assert!(one(r#","bitrates":[0]"#).contains("interfaces[0].bitrates: 0 is not a bitrate"));
        assert!(one(r#","interface":"a/b""#).contains("interfaces[0].interface:"));
        assert!(one(r#","resource":"nodomain""#).contains("interfaces[0].resource:"));
        assert!(one(r#","colour":"red""#).contains("unknown field `colour`"));
        assert!(
            error(r#"{"interfaces":[{"name":"A","device":{"parent":"p"},"bitrate":1}]}"#)
                .contains("interfaces[0].name: \"A\" is not a valid name")
        );
        assert!(
            error(r#"{"interfaces":[{"name":"a","device":{},"bitrate":1}]}"#)
                .contains("interfaces[0].device: give either \"parent\"")
        );
        assert!(
            error(r#"{"interfaces":[{"name":"a","device":{"ifname":"can0","channel":1},"bitrate":1}]}"#)
                .contains("interfaces[0].device.channel: a channel goes with a parent device")
        );
    }

    #[test]
    fn a_device_or_name_listed_twice_is_refused() {
        let err = error(
            r#"{"interfaces":[
                {"name":"a","device":{"parent":"0000:00:10.0"},"bitrate":500000},
                {"name":"b","device":{"parent":"0000:00:10.0"},"bitrate":250000}]}"#,
        );
        assert_eq!(
            err,
            "the hardware configuration hw.json: interfaces[1].device: the CAN interface of \
             device 0000:00:10.0 is already interface \"a\": a device can be passed to one \
             entry only"
        );
        let err = error(
            r#"{"interfaces":[
                {"name":"a","device":{"parent":"x"},"bitrate":500000},
                {"name":"a","device":{"parent":"y"},"bitrate":500000}]}"#,
        );
        assert!(
            err.contains("interfaces[1].name: interface \"a\" is listed twice"),
            "{err}"
        );
    }
}
