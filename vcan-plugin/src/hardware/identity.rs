//! Recognising a physical CAN controller by what does not change, whatever the kernel names it.
//!
//! A controller's name is not its own: the kernel hands a controller back from a destroyed
//! namespace under the name it had inside (the pod's `can0`) or `dev<N>` when that name is taken
//! on the node. Its parent device and channel stay. An entry configured by parent device matches
//! on them directly; an entry configured by `device.ifname` records them when it first sees its
//! interface under that name (`<state-dir>/hardware/<name>.identity`, next to the recorded name)
//! and from then on recognises the controller by them alone.
//!
//! Every entry knows the others' devices through one [`Roster`], so an entry never takes a
//! device that another entry's configuration or recorded identity claims — a controller returned
//! as `can4` is not adopted by an entry configured as `ifname: can4` when it belongs to another.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::hardware::config::{DeviceMatch, HardwareSpec};
use crate::kernel::can::CanLink;

/// What a controller is known by: its parent device and, on cards with several, its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The PCI or USB device behind the netdev (`parentdev`).
    pub parent: String,
    /// The netdev's `dev_id`; `None` when it could not be read (then the parent alone decides).
    pub channel: Option<u32>,
}

/// Why a recorded identity could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file exists but does not say a parent device.
    #[error("{path}: no \"parent=\" line; remove the file to record the identity again")]
    Malformed {
        /// The file.
        path: String,
    },
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl Identity {
    /// The identity of `link`, whose channel (`dev_id`) is `channel`; `None` for a netdev with no
    /// parent device, which has nothing stable to be known by.
    pub fn of(link: &CanLink, channel: Option<u32>) -> Option<Identity> {
        link.parent_dev.as_ref().map(|parent| Identity {
            parent: parent.clone(),
            channel,
        })
    }

    /// Whether `link`, whose channel is `channel`, is this controller.
    pub fn matches(&self, link: &CanLink, channel: Option<u32>) -> bool {
        link.parent_dev.as_deref() == Some(self.parent.as_str())
            && self.channel.is_none_or(|c| channel == Some(c))
    }

    /// The file's text: `parent=…` and `channel=…` lines.
    fn to_text(&self) -> String {
        match self.channel {
            Some(c) => format!("parent={}\nchannel={c}\n", self.parent),
            None => format!("parent={}\n", self.parent),
        }
    }

    /// Parses what [`Identity::to_text`] wrote; `None` without a parent.
    fn parse(text: &str) -> Option<Identity> {
        let mut parent = None;
        let mut channel = None;
        for line in text.lines() {
            match line.trim().split_once('=') {
                Some(("parent", v)) if !v.trim().is_empty() => parent = Some(v.trim().to_string()),
                Some(("channel", v)) => channel = v.trim().parse().ok(),
                _ => {}
            }
        }
        parent.map(|parent| Identity { parent, channel })
    }

    /// Reads the identity recorded at `path`; `Ok(None)` when none is.
    pub fn load(path: &Path) -> Result<Option<Identity>, IdentityError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Identity::parse(&text)
                .map(Some)
                .ok_or_else(|| IdentityError::Malformed {
                    path: path.display().to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(IdentityError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Records the identity at `path`, creating its directory.
    pub fn store(&self, path: &Path) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(path, self.to_text()).map_err(io)
    }
}

/// `<state-dir>/hardware/<name>.identity`. Entry names are DNS labels, which have no dots, so
/// this never collides with another entry's name file.
pub fn identity_file(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("hardware").join(format!("{name}.identity"))
}

/// Every configured controller of the node, with the identities recorded for entries configured
/// by interface name. Shared by all [`super::Controller`]s.
#[derive(Debug, Default)]
pub struct Roster {
    entries: Vec<(String, DeviceMatch)>,
    /// Recorded identities by entry name.
    identities: Mutex<HashMap<String, Identity>>,
}

impl Roster {
    /// The roster of `specs`, with the identities recorded under `state_dir`. An unreadable
    /// record is logged and left out: the entry records its identity again when it next finds
    /// its interface by name.
    pub fn load(specs: &[HardwareSpec], state_dir: &Path) -> Self {
        let mut identities = HashMap::new();
        for spec in specs {
            if !matches!(spec.device, DeviceMatch::Ifname(_)) {
                continue;
            }
            match Identity::load(&identity_file(state_dir, &spec.name)) {
                Ok(Some(id)) => {
                    identities.insert(spec.name.clone(), id);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(interface = %spec.name, error = %e, "ignoring the recorded identity")
                }
            }
        }
        Roster {
            entries: specs
                .iter()
                .map(|s| (s.name.clone(), s.device.clone()))
                .collect(),
            identities: Mutex::new(identities),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Identity>> {
        // Single inserts cannot leave the map half-updated: a poisoned lock is usable.
        self.identities.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The identity recorded for entry `name`.
    pub fn identity(&self, name: &str) -> Option<Identity> {
        self.lock().get(name).cloned()
    }

    /// Remembers entry `name`'s identity (the caller has stored it).
    pub fn record(&self, name: &str, identity: Identity) {
        self.lock().insert(name.to_string(), identity);
    }

    /// The entry other than `me` whose device `link` (channel `channel`) is, by its parent
    /// device or its recorded identity.
    pub fn claimed_by_other(
        &self,
        me: &str,
        link: &CanLink,
        channel: Option<u32>,
    ) -> Option<String> {
        let identities = self.lock();
        self.entries
            .iter()
            .filter(|(name, _)| name != me)
            .find(|(name, device)| match device {
                DeviceMatch::Parent { parent, channel: c } => {
                    link.parent_dev.as_deref() == Some(parent.as_str())
                        && c.is_none_or(|c| channel == Some(c))
                }
                DeviceMatch::Ifname(_) => identities
                    .get(name)
                    .is_some_and(|id| id.matches(link, channel)),
            })
            .map(|(name, _)| name.clone())
    }
}

/// Whether `link`, found in the node's namespace, is entry `me`'s controller: configured by
/// `device`, recorded under `recorded_name`, with the recorded `identity` if any. `channel` is
/// the link's `dev_id`.
///
/// A parent-matched entry goes by its parent device (and channel). A name-matched entry goes by
/// its recorded identity once it has one — whatever the link's name — and before that by its
/// configured or recorded name, unless another entry claims the device.
pub fn is_at_home(
    me: &str,
    device: &DeviceMatch,
    recorded_name: Option<&str>,
    identity: Option<&Identity>,
    roster: &Roster,
    link: &CanLink,
    channel: Option<u32>,
) -> bool {
    match device {
        DeviceMatch::Parent { parent, channel: c } => {
            link.parent_dev.as_deref() == Some(parent.as_str())
                && c.is_none_or(|c| channel == Some(c))
        }
        DeviceMatch::Ifname(ifname) => match identity {
            Some(id) => id.matches(link, channel),
            None => {
                (link.name == *ifname || recorded_name == Some(link.name.as_str()))
                    && roster.claimed_by_other(me, link, channel).is_none()
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::config::parse;
    use crate::kernel::can::OperState;

    fn link(name: &str, parent: Option<&str>) -> CanLink {
        CanLink {
            index: 3,
            name: name.into(),
            up: false,
            operstate: OperState::Down,
            mtu: 16,
            parent_bus: parent.map(|_| "pci".into()),
            parent_dev: parent.map(Into::into),
            ..CanLink::default()
        }
    }

    fn specs() -> Vec<HardwareSpec> {
        parse(
            r#"{"interfaces":[
                {"name":"bench","device":{"parent":"0000:00:10.0"},"bitrate":500000},
                {"name":"dual","device":{"parent":"0000:00:14.0","channel":1},"bitrate":500000},
                {"name":"byname","device":{"ifname":"can4"},"bitrate":500000},
                {"name":"other","device":{"ifname":"can5"},"bitrate":500000}
            ]}"#,
            "hw.json",
        )
        .expect("valid")
    }

    fn id(parent: &str, channel: Option<u32>) -> Identity {
        Identity {
            parent: parent.into(),
            channel,
        }
    }

    #[test]
    fn the_identity_file_round_trips_and_refuses_a_record_without_parent() {
        for identity in [id("0000:00:12.0", Some(0)), id("1-1.2:1.0", None)] {
            assert_eq!(Identity::parse(&identity.to_text()), Some(identity));
        }
        assert_eq!(Identity::parse("channel=1\n"), None);
        let dir = std::env::temp_dir().join(format!("vcan-identity-{}", std::process::id()));
        let path = identity_file(&dir, "byname");
        assert!(Identity::load(&path).expect("absent is fine").is_none());
        id("0000:00:12.0", Some(0)).store(&path).expect("store");
        assert_eq!(
            Identity::load(&path).expect("load"),
            Some(id("0000:00:12.0", Some(0)))
        );
        std::fs::write(&path, "garbage\n").expect("write");
        let err = Identity::load(&path).expect_err("malformed");
        assert!(err.to_string().contains("no \"parent=\" line"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_name_matched_controller_is_recognised_by_its_identity_under_any_name() {
        let specs = specs();
        let roster = Roster::default();
        let byname = &specs[2].device;
        let identity = id("0000:00:12.0", Some(0));
        // The kernel handed it back under the pod's name, or dev<N>.
        for name in ["can0", "dev3", "can4"] {
            assert!(
                is_at_home(
                    "byname",
                    byname,
                    Some("can4"),
                    Some(&identity),
                    &roster,
                    &link(name, Some("0000:00:12.0")),
                    Some(0)
                ),
                "{name}"
            );
        }
        // Its configured name on another device, or another channel of its card, is not it.
        assert!(!is_at_home(
            "byname",
            byname,
            Some("can4"),
            Some(&identity),
            &roster,
            &link("can4", Some("0000:00:13.0")),
            Some(0)
        ));
        assert!(!is_at_home(
            "byname",
            byname,
            Some("can4"),
            Some(&identity),
            &roster,
            &link("can4", Some("0000:00:12.0")),
            Some(1)
        ));
        // Before an identity is recorded, the name decides.
        assert!(is_at_home(
            "byname",
            byname,
            None,
            None,
            &roster,
            &link("can4", Some("0000:00:12.0")),
            Some(0)
        ));
        assert!(!is_at_home(
            "byname",
            byname,
            None,
            None,
            &roster,
            &link("dev3", Some("0000:00:12.0")),
            Some(0)
        ));
    }

    #[test]
    fn an_entry_never_adopts_another_entrys_device() {
        let specs = specs();
        let roster = Roster::load(&specs, Path::new("/nonexistent"));
        roster.record("other", id("0000:00:15.0", None));
        let byname = &specs[2].device;
        // bench's controller, returned from a pod as can4: bench's, not byname's.
        let bench = link("can4", Some("0000:00:10.0"));
        assert_eq!(
            roster.claimed_by_other("byname", &bench, Some(0)),
            Some("bench".into())
        );
        assert!(!is_at_home(
            "byname", byname, None, None, &roster, &bench, None
        ));
        // The other name-matched entry's recorded device, returned as can4.
        let other = link("can4", Some("0000:00:15.0"));
        assert_eq!(
            roster.claimed_by_other("byname", &other, Some(0)),
            Some("other".into())
        );
        assert!(!is_at_home(
            "byname",
            byname,
            None,
            None,
            &roster,
            &other,
            Some(0)
        ));
        // Channel 0 of dual's card is nobody's; channel 1 is dual's.
        assert_eq!(
            roster.claimed_by_other("byname", &link("can4", Some("0000:00:14.0")), Some(0)),
            None
        );
        assert_eq!(
            roster.claimed_by_other("byname", &link("can4", Some("0000:00:14.0")), Some(1)),
            Some("dual".into())
        );
        // An entry does not exclude its own device.
        assert_eq!(roster.claimed_by_other("bench", &bench, Some(0)), None);
        assert!(is_at_home(
            "bench",
            &specs[0].device,
            None,
            None,
            &roster,
            &bench,
            Some(0)
        ));
    }
}
