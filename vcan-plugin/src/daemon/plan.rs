//! What the configuration asks the daemon to serve, checked as a whole before anything touches
//! the node, the kubelet or the runtime: every check that spans more than one configuration
//! file or flag. Pure, so each refusal is tested on the host.

use crate::bus::{self, BusSpec};
use crate::config::Config;
use crate::hardware::HardwareSpec;
use crate::resource::ResourceName;

use super::DaemonError;

/// A shared bus to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBus {
    /// Its configuration.
    pub spec: BusSpec,
    /// Its extended resource.
    pub resource: ResourceName,
    /// The physical interface connecting it to a wire, if any.
    pub uplink: Option<HardwareSpec>,
}

/// A physical interface passed through to one pod at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedPassthrough {
    /// Its configuration.
    pub spec: HardwareSpec,
    /// Its extended resource.
    pub resource: ResourceName,
}

/// Every resource the daemon serves besides the private vcans, consistent with each other and
/// with the flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The shared buses.
    pub buses: Vec<PlannedBus>,
    /// The physical interfaces passed through.
    pub passthrough: Vec<PlannedPassthrough>,
}

impl Plan {
    /// Whether any bus has a tunnel or a socketcand endpoint (and so needs the namespace of
    /// their I/O ends).
    pub fn has_io_ends(&self) -> bool {
        self.buses
            .iter()
            .any(|b| b.spec.tunnel.is_some() || b.spec.socketcand.is_some())
    }

    /// Every hardware interface of the configuration, uplinks included.
    pub fn hardware(&self) -> Vec<HardwareSpec> {
        self.buses
            .iter()
            .filter_map(|b| b.uplink.clone())
            .chain(self.passthrough.iter().map(|p| p.spec.clone()))
            .collect()
    }
}

/// The plan for `buses` and `hardware` under `config`, or the first inconsistency: more counter
/// slots than the maps hold, an uplink the hardware configuration lacks, resource names that
/// are invalid or served twice, a bus spanning the cluster without a peer service or a key.
pub fn plan(
    config: &Config,
    buses: Vec<BusSpec>,
    hardware: Vec<HardwareSpec>,
    counter_slots: u32,
) -> Result<Plan, DaemonError> {
    bus::check_capacity(config.devices, &buses, counter_slots)?;
    let domain = config.resource_name.domain();
    let mut hardware: Vec<Option<HardwareSpec>> = hardware.into_iter().map(Some).collect();
    let mut served = vec![config.resource_name.clone()];
    let mut planned_buses = Vec::with_capacity(buses.len());
    for spec in buses {
        let uplink = match &spec.uplink {
            None => None,
            Some(name) => {
                let found = hardware
                    .iter_mut()
                    .find(|h| h.as_ref().is_some_and(|h| &h.name == name))
                    .and_then(Option::take);
                let Some(found) = found else {
                    return Err(DaemonError::UnknownUplink {
                        bus: spec.name.clone(),
                        uplink: name.clone(),
                        configured: config.hardware_config.is_some(),
                    });
                };
                Some(found)
            }
        };
        let resource = spec
            .resource(domain)
            .map_err(|source| DaemonError::BusResource {
                bus: spec.name.clone(),
                source,
            })?;
        if resource == config.resource_name {
            return Err(DaemonError::BusResourceTaken {
                bus: spec.name.clone(),
                resource: resource.to_string(),
            });
        }
        if let Some(tunnel) = &spec.tunnel
            && tunnel.span == bus::config::Span::Cluster
        {
            if config.peer_service.is_none() {
                return Err(DaemonError::NoPeerService {
                    bus: spec.name.clone(),
                });
            }
            if config.tunnel_key_file.is_none() {
                return Err(DaemonError::NoTunnelKey {
                    bus: spec.name.clone(),
                });
            }
        }
        served.push(resource.clone());
        planned_buses.push(PlannedBus {
            spec,
            resource,
            uplink,
        });
    }
    let mut passthrough = Vec::new();
    for spec in hardware.into_iter().flatten() {
        let resource = spec
            .resource(domain)
            .map_err(|e| DaemonError::HardwareResource {
                name: spec.name.clone(),
                message: e.to_string(),
            })?;
        if served.contains(&resource) {
            return Err(DaemonError::HardwareResource {
                name: spec.name.clone(),
                message: format!("its resource name {resource} is already served: rename it"),
            });
        }
        served.push(resource.clone());
        passthrough.push(PlannedPassthrough { spec, resource });
    }
    Ok(Plan {
        buses: planned_buses,
        passthrough,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["vcan-plugin"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).expect("valid flags")
    }

    fn buses(json: &str) -> Vec<BusSpec> {
        bus::config::parse(json, "buses.json").expect("valid buses")
    }

    fn hardware(json: &str) -> Vec<HardwareSpec> {
        crate::hardware::parse(json, "hw.json").expect("valid hardware")
    }

    const HW: &str = r#"{"interfaces":[
        {"name":"wire","device":{"parent":"0000:00:12.0"},"bitrate":500000},
        {"name":"bench","device":{"parent":"0000:00:10.0"},"bitrate":500000}]}"#;

    fn refusal(config: &Config, bus_json: &str, hw_json: &str) -> String {
        plan(config, buses(bus_json), hardware(hw_json), 1000)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn uplinks_leave_the_passthrough_list_and_resources_are_named() {
        let p = plan(
            &config(&["--hardware-config", "hw.json"]),
            buses(r#"{"buses":[{"name":"plant","uplink":"wire"},{"name":"body"}]}"#),
            hardware(HW),
            1000,
        )
        .expect("a plan");
        assert_eq!(p.buses.len(), 2);
        assert_eq!(
            p.buses[0].uplink.as_ref().map(|h| h.name.as_str()),
            Some("wire")
        );
        assert_eq!(p.buses[0].resource.to_string(), "socketcan.io/bus-plant");
        assert_eq!(p.passthrough.len(), 1);
        assert_eq!(
            p.passthrough[0].resource.to_string(),
            "socketcan.io/hw-bench"
        );
        assert_eq!(p.hardware().len(), 2);
        assert!(!p.has_io_ends());
    }

    #[test]
    fn inconsistent_configurations_are_refused_with_what_to_do() {
        const NO_HW: &str = r#"{"interfaces":[]}"#;
        const CLUSTER: &str = r#"{"buses":[{"name":"x","span":"cluster"}]}"#;
        const TWICE: &str = r#"{"interfaces":[
            {"name":"a","device":{"parent":"0000:00:10.0"},"bitrate":500000,"resource":"socketcan.io/bus-x"}]}"#;
        let cases: [(&[&str], &str, &str, &str); 5] = [
            (
                &[],
                r#"{"buses":[{"name":"plant","uplink":"wire"}]}"#,
                NO_HW,
                "its uplink \"wire\" is not an interface of the hardware configuration \
                 (--hardware-config), which is not set",
            ),
            (&[], CLUSTER, NO_HW, "--peer-service"),
            (
                &["--peer-service", "peers.example."],
                CLUSTER,
                NO_HW,
                "--tunnel-key-file",
            ),
            (
                &["--resource-name", "socketcan.io/bus-x"],
                r#"{"buses":[{"name":"x"}]}"#,
                NO_HW,
                "is that of the private interfaces",
            ),
            (
                &["--hardware-config", "hw.json"],
                r#"{"buses":[{"name":"x"}]}"#,
                TWICE,
                "its resource name socketcan.io/bus-x is already served",
            ),
        ];
        for (flags, bus_json, hw_json, expected) in cases {
            let why = refusal(&config(flags), bus_json, hw_json);
            assert!(why.contains(expected), "{why} !~ {expected}");
        }
        assert!(
            plan(
                &config(&[]),
                buses(r#"{"buses":[{"name":"x","members":9999}]}"#),
                vec![],
                100
            )
            .is_err(),
            "more members than counter slots"
        );
    }

    #[test]
    fn a_bus_spanning_the_cluster_with_service_and_key_has_a_tunnel() {
        let p = plan(
            &config(&[
                "--peer-service",
                "peers.example.",
                "--tunnel-key-file",
                "/etc/key",
            ]),
            buses(r#"{"buses":[{"name":"x","span":"cluster"}]}"#),
            Vec::new(),
            1000,
        )
        .expect("a plan");
        assert!(p.has_io_ends());
    }
}
