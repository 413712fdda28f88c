//! Physical CAN interfaces: lent to one pod at a time (passthrough), or to a shared bus as its
//! uplink, and always returned to the node.
//!
//! A [`Controller`] is one configured interface. Lending it finds its netdev in the node's
//! namespace by its parent device (stable across reboots, unlike `can0`), sets the controller's
//! bit timing and modes while it is down, moves it into the borrower's namespace under the
//! borrower's name in one step (so neither namespace ever sees a name clash half-way) and brings it
//! up. Returning it takes it down and moves it back under the name it had on the node, which is
//! kept under the state directory so a restarted plugin still knows it.
//!
//! The kernel also returns a physical netdev on its own when the namespace holding it is destroyed
//! — with the name it had inside, or `dev<N>` if that name is taken. [`Controller::restore`], run
//! on every reconcile pass while nobody holds the interface, renames and downs whatever came back.

pub mod config;

use std::path::PathBuf;
use std::sync::Mutex;

pub use config::{
    ControllerSettings, DeviceMatch, HardwareConfigError, HardwareSpec, RESOURCE_PREFIX, load,
    parse,
};

use crate::kernel::can::{self, CanError, CanLink};
use crate::kernel::link::LinkInfo;
use crate::kernel::netns::Netns;
use crate::pod::resources::PodRef;
use crate::telemetry::metrics::ControllerSample;

/// What went wrong lending, returning or inspecting a physical interface.
#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    /// The interface is not in the node's namespace (nor where the plugin lent it).
    #[error(
        "{what} ({device}) is not on the node: check that the device is plugged in and its \
         driver loaded (`ip -details link show type can`), and that no other namespace holds it"
    )]
    Missing {
        /// The configured interface, e.g. `hardware interface "bench"`.
        what: String,
        /// How it is matched.
        device: String,
    },
    /// A pod asked for a bitrate the configuration does not allow.
    #[error(
        "{what}: bitrate {requested} is not allowed; the configuration allows {allowed} (remove \
         the annotation {annotation} or choose one of these)"
    )]
    BitrateNotAllowed {
        /// The configured interface.
        what: String,
        /// The bitrate asked for.
        requested: String,
        /// The bitrates allowed.
        allowed: String,
        /// The annotation.
        annotation: String,
    },
    /// The kernel refused a request.
    #[error("{what}: {source}")]
    Kernel {
        /// The configured interface.
        what: String,
        /// What failed.
        source: Box<CanError>,
    },
    /// The file keeping the interface's node-side name could not be written.
    #[error("{what}: cannot record its name on the node in {path}: {source}")]
    State {
        /// The configured interface.
        what: String,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Who holds a lent interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A pod, given the interface itself.
    Pod(PodRef),
    /// A shared bus, as its uplink.
    Bus(String),
}

/// Where a lent interface is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Loan {
    ns: Netns,
    name: String,
    holder: Holder,
}

/// One configured physical interface.
#[derive(Debug)]
pub struct Controller {
    spec: HardwareSpec,
    /// The node's namespace: the plugin's own (it runs with hostNetwork).
    home: Netns,
    /// `<state-dir>/hardware/<name>`: the interface's name on the node.
    name_file: PathBuf,
    loan: Mutex<Option<Loan>>,
    /// Held by lending, taking back and restoring, so a pass restoring an idle interface never
    /// downs or renames one that a PreStart is lending.
    busy: Mutex<()>,
}

impl Controller {
    /// The interface of `spec`, at home in the plugin's namespace, its node-side name kept under
    /// `state_dir`.
    pub fn new(spec: HardwareSpec, state_dir: &std::path::Path) -> Self {
        Controller {
            name_file: state_dir.join("hardware").join(&spec.name),
            spec,
            home: Netns::Pid(std::process::id()),
            loan: Mutex::new(None),
            busy: Mutex::new(()),
        }
    }

    /// The configuration.
    pub fn spec(&self) -> &HardwareSpec {
        &self.spec
    }

    fn what(&self) -> String {
        format!("hardware interface {:?}", self.spec.name)
    }

    fn kernel(&self, source: CanError) -> HardwareError {
        HardwareError::Kernel {
            what: self.what(),
            source: Box::new(source),
        }
    }

    fn lock_busy(&self) -> std::sync::MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_loan(&self) -> std::sync::MutexGuard<'_, Option<Loan>> {
        self.loan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `link` is this interface. Outside the node's namespace sysfs cannot tell channels
    /// apart, so there a channel match also needs the borrower's `name`.
    fn matches(&self, link: &CanLink, at_home: bool, name: Option<&str>) -> bool {
        match &self.spec.device {
            DeviceMatch::Parent { parent, channel } => {
                link.parent_dev.as_deref() == Some(parent.as_str())
                    && match channel {
                        None => true,
                        Some(c) if at_home => dev_id(&link.name) == Some(*c),
                        Some(_) => name.is_some_and(|n| n == link.name),
                    }
            }
            DeviceMatch::Ifname(ifname) => {
                if at_home {
                    link.name == *ifname || self.recorded_name().is_some_and(|n| n == link.name)
                } else {
                    name.is_some_and(|n| n == link.name)
                }
            }
        }
    }

    /// The interface in `ns`, if it is there.
    fn find(&self, ns: &Netns, name: Option<&str>) -> Result<Option<CanLink>, HardwareError> {
        let at_home = *ns == self.home;
        let links = can::list(ns).map_err(|e| self.kernel(e))?;
        Ok(links.into_iter().find(|l| self.matches(l, at_home, name)))
    }

    fn recorded_name(&self) -> Option<String> {
        std::fs::read_to_string(&self.name_file)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// The name the interface has on the node: as recorded, else as configured, else as found.
    fn home_name(&self, found: &CanLink) -> Result<String, HardwareError> {
        if let Some(name) = self.recorded_name() {
            return Ok(name);
        }
        let name = match &self.spec.device {
            DeviceMatch::Ifname(n) => n.clone(),
            DeviceMatch::Parent { .. } => found.name.clone(),
        };
        let state = |source| HardwareError::State {
            what: self.what(),
            path: self.name_file.display().to_string(),
            source,
        };
        if let Some(dir) = self.name_file.parent() {
            std::fs::create_dir_all(dir).map_err(state)?;
        }
        std::fs::write(&self.name_file, format!("{name}\n")).map_err(state)?;
        Ok(name)
    }

    /// Lends the interface to `holder`'s namespace `to` as `name`, set up with `settings` and
    /// up (blocking). Lending it again to the same place finds it there and changes nothing,
    /// which is how a restarted plugin adopts a loan.
    pub fn lend(
        &self,
        holder: Holder,
        to: &Netns,
        name: &str,
        settings: &ControllerSettings,
    ) -> Result<LinkInfo, HardwareError> {
        let _busy = self.lock_busy();
        if let Some(link) = self.find(to, Some(name))? {
            if !link.up {
                can::set_up(to, link.index, true).map_err(|e| self.kernel(e))?;
            }
            *self.lock_loan() = Some(Loan {
                ns: to.clone(),
                name: link.name.clone(),
                holder,
            });
            return Ok(link_info(&link, true));
        }
        let Some(link) = self.find(&self.home, None)? else {
            return Err(HardwareError::Missing {
                what: self.what(),
                device: self.spec.device.to_string(),
            });
        };
        self.home_name(&link)?;
        if link.up {
            can::set_up(&self.home, link.index, false).map_err(|e| self.kernel(e))?;
        }
        can::configure(&self.home, link.index, &settings.to_can()).map_err(|e| self.kernel(e))?;
        can::move_to(&self.home, link.index, to, name).map_err(|e| self.kernel(e))?;
        let moved = self
            .find(to, Some(name))?
            .ok_or_else(|| HardwareError::Missing {
                what: self.what(),
                device: format!("{} after moving it to {to}", self.spec.device),
            })?;
        *self.lock_loan() = Some(Loan {
            ns: to.clone(),
            name: moved.name.clone(),
            holder,
        });
        if let Err(e) = can::set_up(to, moved.index, true) {
            self.give_back(to, &moved);
            return Err(self.kernel(e));
        }
        Ok(link_info(&moved, true))
    }

    /// Takes the interface back from wherever it was lent, if that namespace still exists; a
    /// namespace already destroyed returned it to the node by itself (blocking).
    pub fn take_back(&self) {
        let _busy = self.lock_busy();
        let loan = self.lock_loan().take();
        if let Some(loan) = loan
            && loan.ns.path().exists()
        {
            match self.find(&loan.ns, Some(&loan.name)) {
                Ok(Some(link)) => self.give_back(&loan.ns, &link),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(interface = %self.spec.name, error = %e, "cannot take the interface back")
                }
            }
        }
        self.restore_idle();
    }

    /// Downs `link` in `from` and moves it home under its node-side name.
    fn give_back(&self, from: &Netns, link: &CanLink) {
        let home_name = match self.home_name(link) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(interface = %self.spec.name, error = %e, "returning the interface under its current name");
                link.name.clone()
            }
        };
        let result = can::set_up(from, link.index, false)
            .and_then(|()| can::move_to(from, link.index, &self.home, &home_name));
        match result {
            Ok(_) => {
                tracing::info!(interface = %self.spec.name, name = %home_name, "interface returned to the node")
            }
            Err(e) => {
                tracing::warn!(interface = %self.spec.name, error = %e, "returning the interface failed")
            }
        }
    }

    /// While nobody holds the interface: whatever the kernel returned goes down and gets its
    /// node-side name back (blocking). Does nothing while it is lent.
    pub fn restore(&self) {
        let _busy = self.lock_busy();
        self.restore_idle();
    }

    fn restore_idle(&self) {
        if self.lock_loan().is_some() {
            return;
        }
        let link = match self.find(&self.home, None) {
            Ok(Some(link)) => link,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(interface = %self.spec.name, error = %e, "cannot look for the interface");
                return;
            }
        };
        let Ok(home_name) = self.home_name(&link) else {
            return;
        };
        if link.up
            && let Err(e) = can::set_up(&self.home, link.index, false)
        {
            tracing::warn!(interface = %self.spec.name, error = %e, "cannot set the returned interface down");
        }
        if link.name != home_name {
            match can::rename(&self.home, link.index, &home_name) {
                Ok(()) => {
                    tracing::info!(interface = %self.spec.name, from = %link.name, to = %home_name, "returned interface renamed")
                }
                Err(e) => {
                    tracing::warn!(interface = %self.spec.name, error = %e, "cannot rename the returned interface")
                }
            }
        }
    }

    /// The interface where it is now, with its state: lent (to whom) or at home (`None`).
    pub fn locate(&self) -> Result<(Option<Holder>, CanLink), HardwareError> {
        let loan = self.lock_loan().clone();
        // A borrower's namespace that is gone gave the interface back to the node (the next
        // pass restores it); look for it there.
        if let Some(loan) = loan.filter(|l| l.ns.path().exists())
            && let Some(link) = self.find(&loan.ns, Some(&loan.name))?
        {
            return Ok((Some(loan.holder), link));
        }
        match self.find(&self.home, None)? {
            Some(link) => Ok((None, link)),
            None => Err(HardwareError::Missing {
                what: self.what(),
                device: self.spec.device.to_string(),
            }),
        }
    }

    /// Whether the interface can be served: present, and its controller not bus-off.
    ///
    /// A netdev that is neither on the node nor where this process lent it may be in a pod that
    /// a previous run lent it to and this one has not adopted yet: if its parent device is there
    /// with a driver bound, it counts as present.
    pub fn health(&self) -> crate::telemetry::health::Health {
        use crate::telemetry::health::Health;
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

impl Controller {
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
    fn link_health(&self, link: &CanLink) -> crate::telemetry::health::Health {
        use crate::telemetry::health::Health;
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
            Some(Holder::Pod(p)) => (p.namespace, p.name, String::new()),
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

/// `/sys/class/net/<name>/dev_id`: the channel of a netdev on a card with several.
fn dev_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/dev_id")).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

fn link_info(link: &CanLink, up: bool) -> LinkInfo {
    LinkInfo {
        index: link.index,
        name: link.name.clone(),
        kind: "can".into(),
        mtu: link.mtu,
        up,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::can::{BerrCounter, CanDeviceStats, CanState, OperState};
    use crate::telemetry::health::Health;

    fn controller() -> Controller {
        let spec = parse(
            r#"{"interfaces":[{"name":"bench","device":{"parent":"0000:00:10.0"},"bitrate":500000}]}"#,
            "hw.json",
        )
        .expect("valid")
        .remove(0);
        Controller::new(spec, std::path::Path::new("/nonexistent"))
    }

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
        let sample = c.sample_of(Some(Holder::Pod(pod)), &link(CanState::ErrorPassive));
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
