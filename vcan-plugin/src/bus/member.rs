//! What a member pod asks for by annotation (its interface name and receive filters), and the
//! name of its bus end.

use std::collections::HashMap;

use crate::kernel::cangw::Filter;
use crate::pod::annotations::{self, PodConfigError};

use super::config::BusSpec;

/// The annotation option (after the domain) holding a member's receive filters.
pub const FILTER_OPTION: &str = "filter";
/// Most receive filters one member may list. Each filter is one more rule from every other member
/// (two on an FD bus), so filters multiply the bus's rules; and the overlap check compares every
/// two filters of a member, which stays cheap up to this count.
pub const MAX_FILTERS: usize = 64;
pub(super) use crate::kernel::frame::{CAN_EFF_FLAG, CAN_EFF_MASK, CAN_SFF_MASK};

/// What a member pod asks for by annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberConfig {
    /// The pod end's interface name.
    pub interface: String,
    /// Receive filters: the member gets only frames passing one of them; empty for every frame.
    pub filters: Vec<Filter>,
}

/// What is wrong with a member's annotations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemberConfigError {
    /// The same checks as for private interfaces (unknown option, bad name).
    #[error(transparent)]
    Pod(#[from] PodConfigError),
    /// More filters than [`MAX_FILTERS`].
    #[error(
        "annotation {key} lists {count} filters, more than the {max} a member may have: combine \
         filters with wider masks"
    )]
    TooManyFilters {
        /// The annotation key.
        key: String,
        /// How many filters it lists.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A filter is not `ID:MASK` in hex.
    #[error(
        "annotation {key}: {entry:?} is not a filter: expected ID:MASK in hex, 3 digits for a \
         standard ID or 8 for an extended one, e.g. \"123:7FF,200:700\" or \"18DAF110:1FFFFFFF\""
    )]
    BadFilter {
        /// The annotation key.
        key: String,
        /// The offending entry.
        entry: String,
    },
    /// Two filters match the same frames, which would then arrive twice.
    #[error(
        "annotation {key}: filters {a:?} and {b:?} both match some identifiers, whose frames \
         would arrive twice: make the filters disjoint"
    )]
    Overlap {
        /// The annotation key.
        key: String,
        /// One filter.
        a: String,
        /// The other.
        b: String,
    },
}

/// Parses one filter, `ID:MASK` in hex. A 3-digit ID is a standard (11-bit) identifier and matches
/// standard frames only; an 8-digit ID is an extended (29-bit) one and matches extended frames
/// only (the kernel's filters would otherwise let a standard filter match extended frames whose
/// low bits agree).
pub fn parse_filter(entry: &str) -> Option<Filter> {
    let (id, mask) = entry.trim().split_once(':')?;
    let hex = |s: &str| {
        (!s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    let (id_value, mask_value) = (hex(id)?, hex(mask)?);
    match id.len() {
        3 if id_value <= CAN_SFF_MASK && mask_value <= CAN_SFF_MASK => Some(Filter {
            id: id_value,
            mask: mask_value | CAN_EFF_FLAG,
        }),
        8 if id_value <= CAN_EFF_MASK && mask_value <= CAN_EFF_MASK => Some(Filter {
            id: id_value | CAN_EFF_FLAG,
            mask: mask_value | CAN_EFF_FLAG,
        }),
        _ => None,
    }
}

/// Whether some frame passes both filters.
fn overlap(a: &Filter, b: &Filter) -> bool {
    (a.id ^ b.id) & a.mask & b.mask == 0
}

/// Works out a member's interface name and filters from its pod's `annotations` under `domain`.
///
/// The interface name is `<domain>/interface.<bus>` if set, else the first name of
/// `<domain>/names` (one list for every resource of the pod, kept for pods on a single bus), else
/// the bus's. `<domain>/filter` lists receive filters, comma-separated, at most [`MAX_FILTERS`].
pub fn member_config(
    domain: &str,
    annotations: &HashMap<String, String>,
    bus: &BusSpec,
) -> Result<MemberConfig, MemberConfigError> {
    // The shared checks (unknown options, valid names) as for the pod's private interfaces.
    // Any count of names works here: only the first one is used.
    let named = annotations::interfaces(domain, annotations, 64)?;
    let per_bus = annotations
        .get(&annotations::bus_interface_key(domain, &bus.name))
        .map(|v| v.trim().to_string());
    let explicit = annotations
        .get(&format!("{domain}/names"))
        .is_some_and(|v| v.split(',').any(|n| !n.trim().is_empty()));
    let interface = match (per_bus, named.first()) {
        (Some(name), _) => name,
        (None, Some(spec)) if explicit => spec.name.clone(),
        _ => bus.interface.clone(),
    };
    let key = format!("{domain}/{FILTER_OPTION}");
    let entries: Vec<&str> = annotations
        .get(&key)
        .map(|v| v.split(',').map(str::trim).filter(|e| !e.is_empty()))
        .into_iter()
        .flatten()
        .collect();
    if entries.len() > MAX_FILTERS {
        return Err(MemberConfigError::TooManyFilters {
            key,
            count: entries.len(),
            max: MAX_FILTERS,
        });
    }
    let mut filters: Vec<(&str, Filter)> = Vec::with_capacity(entries.len());
    for entry in entries {
        let filter = parse_filter(entry).ok_or_else(|| MemberConfigError::BadFilter {
            key: key.clone(),
            entry: entry.to_string(),
        })?;
        // Every two filters are compared: at most 64·63/2 pairs, and overlapping is no
        // equivalence that hashing could decide.
        if let Some((other, _)) = filters.iter().find(|(_, f)| overlap(f, &filter)) {
            return Err(MemberConfigError::Overlap {
                key,
                a: other.to_string(),
                b: entry.to_string(),
            });
        }
        filters.push((entry, filter));
    }
    Ok(MemberConfig {
        interface,
        filters: filters.into_iter().map(|(_, f)| f).collect(),
    })
}
/// The bus end's name for the member holding device `device_id` (`bus-x-0007` → `m0007`): unique
/// in the bus namespace and stable across plugin restarts, as device IDs are.
pub fn bus_end_name(device_id: &str) -> Option<String> {
    let (_, n) = device_id.rsplit_once('-')?;
    (n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit())).then(|| format!("m{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::config::example as bus;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn filters_follow_candump_syntax_and_keep_standard_and_extended_apart() {
        assert_eq!(
            parse_filter("123:7FF"),
            Some(Filter {
                id: 0x123,
                mask: CAN_SFF_MASK | CAN_EFF_FLAG
            })
        );
        assert_eq!(
            parse_filter("18DAF110:1FFFFFFF"),
            Some(Filter {
                id: 0x18DA_F110 | CAN_EFF_FLAG,
                mask: CAN_EFF_MASK | CAN_EFF_FLAG
            })
        );
        for bad in [
            "123", "12:7FF", "800:7FF", "123:FFF", "xyz:7FF", "123:", "~123:7FF",
        ] {
            assert_eq!(parse_filter(bad), None, "{bad}");
        }
    }

    #[test]
    fn member_annotations_pick_name_and_filters() {
        let b = bus(true);
        let plain = member_config("socketcan.io", &HashMap::new(), &b).expect("defaults");
        assert_eq!(
            plain,
            MemberConfig {
                interface: "can0".into(),
                filters: vec![]
            }
        );
        let a = ann(&[
            ("socketcan.io/names", "pt"),
            ("socketcan.io/filter", "123:7FF, 200:700"),
        ]);
        let m = member_config("socketcan.io", &a, &b).expect("valid");
        assert_eq!(m.interface, "pt");
        assert_eq!(m.filters.len(), 2);

        let err = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", "123:7FF,100:700")]),
            &b,
        )
        .expect_err("overlap");
        assert!(matches!(err, MemberConfigError::Overlap { .. }), "{err}");
        let err = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", "12G:7FF")]),
            &b,
        )
        .expect_err("bad");
        assert!(err.to_string().contains("\"12G:7FF\""), "{err}");
        let err = member_config("socketcan.io", &ann(&[("socketcan.io/bitrate", "1")]), &b)
            .expect_err("unknown");
        assert!(err.to_string().contains("unknown annotation"), "{err}");
        // A standard and an extended filter never overlap.
        member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", "123:7FF,00000123:1FFFFFFF")]),
            &b,
        )
        .expect("disjoint");
    }
    #[test]
    fn at_most_64_filters_and_the_error_says_how_many() {
        let list = |n: u32| -> String {
            (0..n)
                .map(|i| format!("{i:03X}:7FF"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let b = bus(true);
        let m = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", &list(64))]),
            &b,
        )
        .expect("64 disjoint filters");
        assert_eq!(m.filters.len(), MAX_FILTERS);
        let err = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/filter", &list(65))]),
            &b,
        )
        .expect_err("65 filters");
        assert_eq!(
            err,
            MemberConfigError::TooManyFilters {
                key: "socketcan.io/filter".into(),
                count: 65,
                max: 64
            }
        );
        assert_eq!(
            err.to_string(),
            "annotation socketcan.io/filter lists 65 filters, more than the 64 a member may have: \
             combine filters with wider masks"
        );
        // Counted before anything is parsed: a long list is refused as such, whatever it holds.
        let junk = vec!["x"; 100].join(",");
        let err = member_config("socketcan.io", &ann(&[("socketcan.io/filter", &junk)]), &b)
            .expect_err("100 entries");
        assert!(
            matches!(err, MemberConfigError::TooManyFilters { count: 100, .. }),
            "{err}"
        );
    }

    #[test]
    fn each_bus_takes_its_own_interface_annotation_first() {
        let pt = bus(true);
        let body = BusSpec {
            name: "body".into(),
            ..bus(false)
        };
        let a = ann(&[
            ("socketcan.io/interface.body", "can1"),
            ("socketcan.io/names", "pt"),
        ]);
        assert_eq!(
            member_config("socketcan.io", &a, &body)
                .expect("valid")
                .interface,
            "can1"
        );
        // Not this bus's key: `names` applies as before.
        assert_eq!(
            member_config("socketcan.io", &a, &pt)
                .expect("valid")
                .interface,
            "pt"
        );
        let only_other = ann(&[("socketcan.io/interface.body", "can1")]);
        assert_eq!(
            member_config("socketcan.io", &only_other, &pt)
                .expect("valid")
                .interface,
            "can0"
        );
        let err = member_config(
            "socketcan.io",
            &ann(&[("socketcan.io/interface.body", "no/slash")]),
            &pt,
        )
        .expect_err("invalid name on any bus");
        assert!(
            err.to_string()
                .starts_with("annotation socketcan.io/interface.body: "),
            "{err}"
        );
    }
    #[test]
    fn bus_end_names_come_from_device_ids() {
        assert_eq!(
            bus_end_name("bus-powertrain-0007").as_deref(),
            Some("m0007")
        );
        assert_eq!(bus_end_name("bus-a-9999").as_deref(), Some("m9999"));
        assert_eq!(bus_end_name("bus-a-7"), None);
        assert_eq!(bus_end_name("nodash"), None);
    }
}
