//! A pod's interface names and CAN mode, from its annotations.
//!
//! Annotations live under the resource's domain: for `socketcan.io/vcan` the plugin reads
//! `socketcan.io/names` (comma-separated interface names, in device order) and `socketcan.io/fd`
//! (`true` or `false`). Without them a pod with N devices gets `vcan0` … `vcan<N-1>`, CAN FD capable
//! (MTU 72), which carries classic frames as well.
//!
//! Members of shared buses ([`crate::bus`]) also read `<domain>/filter` and
//! `<domain>/interface.<bus>`, checked here as well so that a typo in any option under the domain
//! is an error whichever resource the pod holds.

use crate::resource::is_dns_label;
use std::collections::{BTreeSet, HashMap};

use crate::kernel::link::{self, CanMtu, VcanSpec};

/// The annotation options the plugin understands, after the domain prefix, besides
/// [`BUS_INTERFACE_OPTION`]`<bus>`.
///
/// `filter` is read only for members of shared buses ([`crate::bus`]); private interfaces ignore it.
pub const OPTIONS: &[&str] = &["names", "fd", "filter"];

/// The option naming a bus member's interface for one bus, followed by the bus's name:
/// `<domain>/interface.<bus>`. A pod on several buses needs one interface name per bus, which
/// `names` (one list for every resource) cannot give.
pub const BUS_INTERFACE_OPTION: &str = "interface.";

/// The option choosing the bitrate of a physical interface, followed by its name in the hardware
/// configuration: `<domain>/bitrate.<interface>`.
pub const BITRATE_OPTION: &str = "bitrate.";

/// The longest name part of an annotation key (after `<domain>/`), as Kubernetes allows it.
pub const MAX_KEY_LEN: usize = 63;

/// The annotation key of the member interface's name for bus `bus` under `domain`.
pub fn bus_interface_key(domain: &str, bus: &str) -> String {
    format!("{domain}/{BUS_INTERFACE_OPTION}{bus}")
}

/// Whether `option` (the part after `<domain>/`) is one the plugin understands.
fn known_option(option: &str) -> bool {
    OPTIONS.contains(&option)
        || option
            .strip_prefix(BUS_INTERFACE_OPTION)
            .is_some_and(|bus| is_dns_label(bus, MAX_KEY_LEN - BUS_INTERFACE_OPTION.len()))
        || option
            .strip_prefix(BITRATE_OPTION)
            .is_some_and(|name| is_dns_label(name, MAX_KEY_LEN - BITRATE_OPTION.len()))
}

/// Fails on the first (in sorted order) annotation under `domain` that names no option the
/// plugin understands.
pub fn check_options(
    domain: &str,
    annotations: &HashMap<String, String>,
) -> Result<(), PodConfigError> {
    let prefix = format!("{domain}/");
    match annotations
        .keys()
        .filter(|k| k.strip_prefix(&prefix).is_some_and(|o| !known_option(o)))
        .min()
    {
        Some(key) => Err(PodConfigError::UnknownOption {
            key: key.clone(),
            domain: domain.to_string(),
            known: format!(
                "{}, {BUS_INTERFACE_OPTION}<bus>, {BITRATE_OPTION}<interface>",
                OPTIONS.join(", ")
            ),
        }),
        None => Ok(()),
    }
}

/// The default name of the pod's `index`-th interface.
pub fn default_name(index: usize) -> String {
    format!("vcan{index}")
}

/// What is wrong with a pod's annotations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodConfigError {
    /// A name in the `names` annotation is not a valid interface name.
    #[error("annotation {key}: {message}")]
    InvalidName {
        /// The annotation key.
        key: String,
        /// The link layer's explanation.
        message: String,
    },
    /// The same name appears twice.
    #[error("annotation {key}: interface name {name:?} appears more than once")]
    Duplicate {
        /// The annotation key.
        key: String,
        /// The repeated name.
        name: String,
    },
    /// More names than the pod has devices.
    #[error(
        "annotation {key} lists {names} names but the pod requested {devices} device(s): \
         request more devices or list fewer names"
    )]
    TooManyNames {
        /// The annotation key.
        key: String,
        /// How many names.
        names: usize,
        /// How many devices.
        devices: usize,
    },
    /// A boolean option with another value.
    #[error("annotation {key}: expected \"true\" or \"false\", got {value:?}")]
    NotABool {
        /// The annotation key.
        key: String,
        /// The value.
        value: String,
    },
    /// An annotation under the domain that the plugin does not know.
    #[error("unknown annotation {key}: the options under {domain}/ are {known}")]
    UnknownOption {
        /// The annotation key.
        key: String,
        /// The domain.
        domain: String,
        /// The known options.
        known: String,
    },
}

/// Works out the interfaces of a pod holding `devices` devices from its `annotations`.
///
/// Names listed in `<domain>/names` come first; if the pod holds more devices than names, the rest
/// get default names not already taken.
pub fn interfaces(
    domain: &str,
    annotations: &HashMap<String, String>,
    devices: usize,
) -> Result<Vec<VcanSpec>, PodConfigError> {
    let prefix = format!("{domain}/");
    let names_key = format!("{prefix}names");
    let fd_key = format!("{prefix}fd");
    check_options(domain, annotations)?;
    // Sorted, so that of several bad names the same one is reported every time.
    let bus_interface_prefix = format!("{prefix}{BUS_INTERFACE_OPTION}");
    let mut bus_names: Vec<(&String, &String)> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(&bus_interface_prefix))
        .collect();
    bus_names.sort();
    for (key, name) in bus_names {
        link::validate_name(name.trim()).map_err(|e| PodConfigError::InvalidName {
            key: key.clone(),
            message: e.to_string(),
        })?;
    }

    let mtu = match annotations.get(&fd_key).map(|v| v.trim()) {
        None | Some("true") => CanMtu::Fd,
        Some("false") => CanMtu::Classic,
        Some(other) => {
            return Err(PodConfigError::NotABool {
                key: fd_key,
                value: other.to_string(),
            });
        }
    };

    let mut names: Vec<String> = match annotations.get(&names_key) {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect(),
        None => Vec::new(),
    };
    let mut seen = BTreeSet::new();
    for name in &names {
        link::validate_name(name).map_err(|e| PodConfigError::InvalidName {
            key: names_key.clone(),
            message: e.to_string(),
        })?;
        if !seen.insert(name.clone()) {
            return Err(PodConfigError::Duplicate {
                key: names_key,
                name: name.clone(),
            });
        }
    }
    if names.len() > devices {
        return Err(PodConfigError::TooManyNames {
            key: names_key,
            names: names.len(),
            devices,
        });
    }
    let mut candidate = 0;
    while names.len() < devices {
        let name = default_name(candidate);
        candidate += 1;
        if seen.insert(name.clone()) {
            names.push(name);
        }
    }
    Ok(names
        .into_iter()
        .map(|name| VcanSpec { name, mtu })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn names(specs: &[VcanSpec]) -> Vec<&str> {
        specs.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn defaults_are_fd_vcan0_to_n() {
        let specs = interfaces("socketcan.io", &HashMap::new(), 3).expect("defaults");
        assert_eq!(names(&specs), ["vcan0", "vcan1", "vcan2"]);
        assert!(specs.iter().all(|s| s.mtu == CanMtu::Fd));
    }

    #[test]
    fn names_and_fd_apply() {
        let a = ann(&[
            ("example.com/names", "can0, can1"),
            ("example.com/fd", "false"),
            ("other.io/names", "ignored"),
        ]);
        let specs = interfaces("example.com", &a, 2).expect("valid");
        assert_eq!(names(&specs), ["can0", "can1"]);
        assert!(specs.iter().all(|s| s.mtu == CanMtu::Classic));
    }

    #[test]
    fn fewer_names_than_devices_fill_with_free_defaults() {
        let a = ann(&[("example.com/names", "vcan0,x")]);
        let specs = interfaces("example.com", &a, 4).expect("valid");
        assert_eq!(names(&specs), ["vcan0", "x", "vcan1", "vcan2"]);
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        type Case<'a> = (&'a [(&'a str, &'a str)], usize, &'a str);
        let cases: &[Case] = &[
            (&[("d.io/names", "can0,can0")], 2, "appears more than once"),
            (
                &[("d.io/names", "a,b,c")],
                2,
                "lists 3 names but the pod requested 2",
            ),
            (
                &[("d.io/names", "this-name-is-too-long")],
                1,
                "longer than 15",
            ),
            (&[("d.io/names", "a/b")], 1, "invalid interface name"),
            (&[("d.io/fd", "yes")], 1, "expected \"true\" or \"false\""),
            (
                &[("d.io/bitrate", "500000")],
                1,
                "unknown annotation d.io/bitrate",
            ),
            (
                &[("d.io/interface.Body", "can1")],
                1,
                "unknown annotation d.io/interface.Body: the options under d.io/ are names, fd, \
                 filter, interface.<bus>, bitrate.<interface>",
            ),
            (&[("d.io/interface.", "can1")], 1, "unknown annotation"),
            (
                &[("d.io/interface.body", "can 1")],
                1,
                "annotation d.io/interface.body: ",
            ),
            (
                &[("d.io/interface.body", "")],
                1,
                "annotation d.io/interface.body: ",
            ),
        ];
        for (pairs, devices, expected) in cases {
            let err = interfaces("d.io", &ann(pairs), *devices).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err} !~ {expected}");
        }
    }

    #[test]
    fn per_bus_interface_names_are_known_options_that_private_interfaces_ignore() {
        let a = ann(&[
            ("d.io/interface.body", "can1"),
            ("d.io/interface.powertrain", " can0 "),
        ]);
        let specs = interfaces("d.io", &a, 1).expect("valid");
        assert_eq!(names(&specs), ["vcan0"]);
        assert_eq!(bus_interface_key("d.io", "body"), "d.io/interface.body");
    }

    proptest! {
        #[test]
        fn any_accepted_config_has_one_valid_unique_name_per_device(
            list in proptest::collection::vec("[a-z0-9_.-]{0,18}", 0..6),
            devices in 0usize..8,
            fd in proptest::option::of(prop_oneof!["true", "false", "maybe", ""]),
        ) {
            let mut a = ann(&[("d.io/names", &list.join(","))]);
            if let Some(fd) = &fd {
                a.insert("d.io/fd".into(), fd.clone());
            }
            match interfaces("d.io", &a, devices) {
                Ok(specs) => {
                    prop_assert_eq!(specs.len(), devices);
                    let unique: BTreeSet<_> = specs.iter().map(|s| &s.name).collect();
                    prop_assert_eq!(unique.len(), devices);
                    for s in &specs {
                        prop_assert!(link::validate_name(&s.name).is_ok());
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
