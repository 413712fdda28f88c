//! What a scrape and the health probe see of a controller: where it is, who holds it, its
//! state and error counters, and whether it can be served.

use std::path::PathBuf;

use super::{Controller, DeviceMatch, HardwareError, Holder};
use crate::kernel::can::{self, CanLink};
use crate::telemetry::health::Health;
use crate::telemetry::metrics::ControllerSample;

impl Controller {
    /// Whether the interface can be served: present, and its controller not bus-off.
    ///
    /// A netdev that is neither on the node nor where this process lent it may be in a pod that
    /// a previous run lent it to and this one has not adopted yet: if its parent device is there
    /// with a driver bound, it counts as present.
    pub fn health(&self) -> Health {
        match self.locate() {
            Ok((_, link)) => self.link_health(&link),
            Err(e @ HardwareError::Missing { .. }) => match &self.spec.device {
                DeviceMatch::Parent { parent, .. } => match parent_device(parent) {
                    Some(dir) if dir.join("driver").exists() => Health::Healthy,
                    Some(_) => Health::Unhealthy(format!(
                        "{}: device {parent} has no driver bound: load the CAN controller's \
                         driver (see `lspci -k` or `lsusb -t`)",
                        self.what()
                    )),
                    None => Health::Unhealthy(e.to_string()),
                },
                DeviceMatch::Ifname(_) => Health::Unhealthy(e.to_string()),
            },
            Err(e) => Health::Unhealthy(e.to_string()),
        }
    }

    /// The controller's state for a scrape (blocking); `None` when the interface is not found.
    pub fn sample(&self) -> Option<ControllerSample> {
        let (holder, link) = self
            .locate()
            .inspect_err(
                |e| tracing::debug!(interface = %self.spec.name, error = %e, "no controller state"),
            )
            .ok()?;
        Some(self.sample_of(holder, &link))
    }

    /// The health of the interface as found: bus-off is unhealthy until the controller has
    /// recovered (by itself after restart_ms, or when restarted).
    fn link_health(&self, link: &CanLink) -> Health {
        if link.state == Some(can::CanState::BusOff) {
            Health::Unhealthy(format!(
                "{} ({}) is bus-off: check the wiring, termination and the bitrate of every node \
                 on the bus; it restarts after restart_ms ({} ms, 0: never)",
                self.what(),
                link.name,
                self.spec.settings.restart_ms
            ))
        } else {
            Health::Healthy
        }
    }

    /// A scrape's view of the interface as found, held by `holder`.
    fn sample_of(&self, holder: Option<Holder>, link: &CanLink) -> ControllerSample {
        let (namespace, pod, bus) = match holder {
            Some(Holder::Pod { pod, .. }) => (pod.namespace, pod.name, String::new()),
            Some(Holder::Bus(b)) => (String::new(), String::new(), b),
            None => Default::default(),
        };
        ControllerSample {
            controller: self.spec.name.clone(),
            interface: link.name.clone(),
            namespace,
            pod,
            bus,
            state: link.state.map(|s| s.as_label()),
            error_counters: link.berr.map(|b| (b.txerr, b.rxerr)),
            events: link.device_stats.map(|d| {
                [
                    d.bus_error,
                    d.error_warning,
                    d.error_passive,
                    d.bus_off,
                    d.arbitration_lost,
                    d.restarts,
                ]
                .map(u64::from)
            }),
        }
    }
}

/// The sysfs directory of device `name` on any bus (`/sys/bus/pci/devices/0000:03:00.0`), if the
/// node has it.
fn parent_device(name: &str) -> Option<PathBuf> {
    std::fs::read_dir("/sys/bus")
        .ok()?
        .filter_map(Result::ok)
        .map(|bus| bus.path().join("devices").join(name))
        .find(|dir| dir.exists())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::tests::controller;
    use crate::kernel::can::{BerrCounter, CanDeviceStats, CanState, OperState};
    use crate::pod::resources::PodRef;

    /// A controller as the kernel would report one that has gone bus-off: the test-bed's
    /// emulated controllers never do (no ACK or bit errors on qemu's wire).
    fn link(state: CanState) -> CanLink {
        CanLink {
            index: 7,
            name: "can0".into(),
            up: true,
            operstate: OperState::Up,
            mtu: 16,
            parent_bus: Some("pci".into()),
            parent_dev: Some("0000:00:10.0".into()),
            state: Some(state),
            berr: Some(BerrCounter {
                txerr: 256,
                rxerr: 17,
            }),
            device_stats: Some(CanDeviceStats {
                bus_error: 40,
                error_warning: 3,
                error_passive: 2,
                bus_off: 1,
                arbitration_lost: 5,
                restarts: 1,
            }),
            bittiming: None,
            data_bittiming: None,
            clock_hz: Some(8_000_000),
            restart_ms: 100,
            ctrlmode: 0,
            stats: None,
        }
    }

    #[test]
    fn bus_off_is_unhealthy_until_the_controller_recovers() {
        let c = controller();
        let Health::Unhealthy(why) = c.link_health(&link(CanState::BusOff)) else {
            panic!("bus-off must be unhealthy");
        };
        assert_eq!(
            why,
            "hardware interface \"bench\" (can0) is bus-off: check the wiring, termination and \
             the bitrate of every node on the bus; it restarts after restart_ms (100 ms, 0: never)"
        );
        for state in [
            CanState::ErrorActive,
            CanState::ErrorWarning,
            CanState::ErrorPassive,
            CanState::Stopped,
        ] {
            assert_eq!(c.link_health(&link(state)), Health::Healthy, "{state:?}");
        }
    }

    #[test]
    fn a_scrape_shows_the_state_counters_and_holder() {
        let c = controller();
        let pod = PodRef {
            namespace: "default".into(),
            name: "ecu".into(),
        };
        let holder = Holder::Pod {
            pod,
            uid: "uid-1".into(),
            sandbox: "sandbox-1".into(),
        };
        let sample = c.sample_of(Some(holder), &link(CanState::ErrorPassive));
        assert_eq!(
            sample,
            ControllerSample {
                controller: "bench".into(),
                interface: "can0".into(),
                namespace: "default".into(),
                pod: "ecu".into(),
                bus: String::new(),
                state: Some("error_passive"),
                error_counters: Some((256, 17)),
                events: Some([40, 3, 2, 1, 5, 1]),
            }
        );
        let on_bus = c.sample_of(Some(Holder::Bus("plant".into())), &link(CanState::BusOff));
        assert_eq!(
            (on_bus.bus.as_str(), on_bus.pod.as_str(), on_bus.state),
            ("plant", "", Some("bus_off"))
        );
    }
}
