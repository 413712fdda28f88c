//! Physical CAN interfaces: lent to one pod at a time (passthrough), or to a shared bus as its
//! uplink, and always returned to the node.
//!
//! A [`Controller`] is one configured interface. Lending it finds its netdev in the node's
//! namespace by what does not change (its parent device and channel, or the identity recorded for
//! an entry configured by interface name; see [`identity`]), sets the controller's bit timing and
//! modes while it is down, moves it into the borrower's namespace under the borrower's name in
//! one step (so neither namespace ever sees a name clash half-way) and brings it up. Returning it
//! takes it down and moves it back under the name it had on the node, which is kept under the
//! state directory so a restarted plugin still knows it.
//!
//! A loan belongs to one holder — a pod's sandbox or a bus — and a release ends only the loans of
//! the holders it names ([`loan`]): when the kubelet gives the device to a new pod before the old
//! pod's release, the new pod keeps it.
//!
//! The kernel also returns a physical netdev on its own when the namespace holding it is destroyed
//! — with the name it had inside, or `dev<N>` if that name is taken. [`Controller::release`], run
//! on every reconcile pass, renames and downs whatever came back while nobody holds the interface.

pub mod config;
pub mod identity;
pub mod loan;
mod status;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use config::{
    ControllerSettings, DeviceMatch, HardwareConfigError, HardwareSpec, RESOURCE_PREFIX, load,
    parse,
};
pub use identity::{Identity, Roster};
pub use loan::Holder;

use crate::kernel::can::{self, CanError, CanLink};
use crate::kernel::link::LinkInfo;
use crate::kernel::netns::Netns;
use loan::{Loan, Release};

/// How long a lend waits for the kernel to hand the controller back from a previous holder's
/// destroyed namespace. The kernel returns devices of a dying namespace from a work queue, so a
/// pod given the device right after the previous one was deleted can ask before it is back; the
/// kubelet's PreStart deadline (30 s) leaves room for this.
const RETURN_WAIT: Duration = Duration::from_secs(10);

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

/// One configured physical interface.
#[derive(Debug)]
pub struct Controller {
    spec: HardwareSpec,
    /// The node's namespace: the plugin's own (it runs with hostNetwork).
    home: Netns,
    /// `<state-dir>/hardware/<name>`: the interface's name on the node.
    name_file: PathBuf,
    /// `<state-dir>/hardware/<name>.identity`: what an entry configured by name recognises its
    /// controller by.
    identity_file: PathBuf,
    /// Every configured controller, so this one never takes another's device.
    roster: Arc<Roster>,
    loan: Mutex<Option<Loan>>,
    /// Held by lending, taking back and restoring, so a pass restoring an idle interface never
    /// downs or renames one that a PreStart is lending.
    busy: Mutex<()>,
}

impl Controller {
    /// The interface of `spec`, at home in the plugin's namespace, its node-side name and
    /// identity kept under `state_dir`; `roster` holds every configured interface.
    pub fn new(spec: HardwareSpec, state_dir: &std::path::Path, roster: Arc<Roster>) -> Self {
        Controller {
            name_file: state_dir.join("hardware").join(&spec.name),
            identity_file: identity::identity_file(state_dir, &spec.name),
            spec,
            roster,
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

    fn missing(&self) -> HardwareError {
        HardwareError::Missing {
            what: self.what(),
            device: self.spec.device.to_string(),
        }
    }

    fn lock_busy(&self) -> std::sync::MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_loan(&self) -> std::sync::MutexGuard<'_, Option<Loan>> {
        self.loan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `link`, in a borrower's namespace, is this interface. Outside the node's namespace
    /// sysfs cannot tell channels apart (nor read `dev_id`), so there the borrower's `name`
    /// decides, with the parent device wherever it is known.
    fn matches_away(&self, link: &CanLink, name: Option<&str>) -> bool {
        let named = name.is_some_and(|n| n == link.name);
        match &self.spec.device {
            DeviceMatch::Parent { parent, channel } => {
                link.parent_dev.as_deref() == Some(parent.as_str()) && (channel.is_none() || named)
            }
            DeviceMatch::Ifname(_) => {
                named
                    && self
                        .roster
                        .identity(&self.spec.name)
                        .is_none_or(|id| link.parent_dev.as_deref() == Some(id.parent.as_str()))
            }
        }
    }

    /// The interface in `ns`, if it is there.
    fn find(&self, ns: &Netns, name: Option<&str>) -> Result<Option<CanLink>, HardwareError> {
        let links = can::list(ns).map_err(|e| self.kernel(e))?;
        if *ns != self.home {
            return Ok(links.into_iter().find(|l| self.matches_away(l, name)));
        }
        let recorded = self.recorded_name();
        let identity = self.roster.identity(&self.spec.name);
        Ok(links.into_iter().find(|l| {
            identity::is_at_home(
                &self.spec.name,
                &self.spec.device,
                recorded.as_deref(),
                identity.as_ref(),
                &self.roster,
                l,
                dev_id(&l.name),
            )
        }))
    }

    /// For an entry configured by name, records what its controller `link` (found at home by
    /// name) is known by, so it is recognised when the kernel returns it under another name.
    fn remember(&self, link: &CanLink) {
        if !matches!(self.spec.device, DeviceMatch::Ifname(_))
            || self.roster.identity(&self.spec.name).is_some()
        {
            return;
        }
        let Some(id) = Identity::of(link, dev_id(&link.name)) else {
            tracing::warn!(interface = %self.spec.name, name = %link.name, "the interface has no parent device: it is recognised by its name only, and lost if the kernel returns it under another");
            return;
        };
        match id.store(&self.identity_file) {
            Ok(()) => {
                tracing::info!(interface = %self.spec.name, name = %link.name, parent = %id.parent, channel = ?id.channel, "recorded the interface's identity");
                self.roster.record(&self.spec.name, id);
            }
            Err(e) => {
                tracing::warn!(interface = %self.spec.name, error = %e, "cannot record the interface's identity")
            }
        }
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
    ///
    /// When the interface is not on the node because a previous pod still has it, or its
    /// destroyed namespace has not handed it back yet, the kubelet has given the device to
    /// `holder`: the interface is taken from the previous pod, or awaited for a few seconds.
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
                adopted: true,
            });
            return Ok(link_info(&link, true));
        }
        let link = match self.find(&self.home, None)? {
            Some(link) => link,
            None => self.reclaim(&holder)?,
        };
        self.remember(&link);
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
        if let Err(e) = can::set_up(to, moved.index, true) {
            self.give_back(to, &moved);
            return Err(self.kernel(e));
        }
        tracing::info!(interface = %self.spec.name, %holder, name = %moved.name, "interface lent");
        *self.lock_loan() = Some(Loan {
            ns: to.clone(),
            name: moved.name.clone(),
            holder,
            adopted: false,
        });
        Ok(link_info(&moved, true))
    }

    /// The interface, back on the node, when a previous pod's loan still stands: the kubelet
    /// allocates a device to one pod at a time, so lending to `holder` means the previous pod's
    /// containers are gone. Takes it from that pod's namespace if it is still there, else waits
    /// up to [`RETURN_WAIT`] for the kernel to return it from the destroyed namespace.
    fn reclaim(&self, holder: &Holder) -> Result<CanLink, HardwareError> {
        let previous = self
            .lock_loan()
            .clone()
            .filter(|l| l.holder != *holder && matches!(l.holder, Holder::Pod { .. }));
        let Some(previous) = previous else {
            return Err(self.missing());
        };
        let deadline = Instant::now() + RETURN_WAIT;
        loop {
            // A namespace being destroyed may vanish between the check and the listing: a
            // failed look there only means the interface is on its way home.
            if previous.ns.path().exists()
                && let Ok(Some(link)) = self.find(&previous.ns, Some(&previous.name))
            {
                tracing::info!(interface = %self.spec.name, from = %previous.holder, to = %holder, "taking the interface from the pod that held the device before");
                self.give_back(&previous.ns, &link);
            }
            if let Some(link) = self.find(&self.home, None)? {
                return Ok(link);
            }
            if Instant::now() >= deadline {
                return Err(self.missing());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends the loan if its holder is one of `gone`, taking the interface back from the
    /// holder's namespace if it still exists (a destroyed one returned it to the node by itself);
    /// a loan to any other holder stays. Then, while nobody holds the interface, restores
    /// whatever the kernel returned (blocking). Runs on every pass, also with none gone.
    pub fn release(&self, gone: &[Holder]) {
        let _busy = self.lock_busy();
        let outcome = {
            let mut loan = self.lock_loan();
            let outcome = loan::release(loan.as_ref(), gone);
            if matches!(outcome, Release::Ends(_)) {
                *loan = None;
            }
            outcome
        };
        match outcome {
            Release::Ends(loan) => {
                if loan.ns.path().exists() {
                    match self.find(&loan.ns, Some(&loan.name)) {
                        Ok(Some(link)) => self.give_back(&loan.ns, &link),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(interface = %self.spec.name, error = %e, "cannot take the interface back")
                        }
                    }
                }
            }
            Release::Kept(holder) if !gone.is_empty() => {
                tracing::info!(interface = %self.spec.name, %holder, "a released pod no longer held the interface: left with its holder");
            }
            Release::Kept(_) | Release::Idle => {}
        }
        self.restore_idle();
    }

    /// Undoes a lend to `holder` whose later steps failed (blocking), so that no loan outlives
    /// a pod that is not served: an interface the lend moved goes back to the node; one it found
    /// already in place (a running pod being adopted) stays there, unrecorded, for the next
    /// adoption attempt. A loan to any other holder is left alone.
    pub fn abandon(&self, holder: &Holder) {
        let _busy = self.lock_busy();
        let ended = {
            let mut loan = self.lock_loan();
            if loan.as_ref().is_some_and(|l| l.holder == *holder) {
                loan.take()
            } else {
                None
            }
        };
        let Some(loan) = ended else {
            return;
        };
        tracing::info!(interface = %self.spec.name, %holder, moved = !loan.adopted, "serving the pod failed: lend undone");
        if !loan.adopted
            && let Ok(Some(link)) = self.find(&loan.ns, Some(&loan.name))
        {
            self.give_back(&loan.ns, &link);
        }
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
        self.remember(&link);
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
            None => Err(self.missing()),
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
    use crate::pod::resources::PodRef;

    pub(super) fn controller() -> Controller {
        let spec = parse(
            r#"{"interfaces":[{"name":"bench","device":{"parent":"0000:00:10.0"},"bitrate":500000}]}"#,
            "hw.json",
        )
        .expect("valid")
        .remove(0);
        let roster = Arc::new(Roster::load(
            std::slice::from_ref(&spec),
            std::path::Path::new("/nonexistent"),
        ));
        Controller::new(spec, std::path::Path::new("/nonexistent"), roster)
    }

    fn holder(name: &str, sandbox: &str) -> Holder {
        Holder::Pod {
            pod: PodRef {
                namespace: "default".into(),
                name: name.into(),
            },
            uid: format!("uid-{name}"),
            sandbox: sandbox.into(),
        }
    }

    #[test]
    fn abandoning_a_lend_ends_only_that_holders_loan() {
        let c = controller();
        let loan = |h: Holder| Loan {
            ns: Netns::Path("/var/run/netns/cni-gone".into()),
            name: "can0".into(),
            holder: h,
            // Found in place: undoing it moves nothing, so no kernel is needed here.
            adopted: true,
        };
        *c.lock_loan() = Some(loan(holder("b", "sandbox-b")));
        c.abandon(&holder("a", "sandbox-a"));
        assert_eq!(
            c.lock_loan().as_ref().map(|l| l.holder.clone()),
            Some(holder("b", "sandbox-b")),
            "another pod's loan stays"
        );
        c.abandon(&holder("b", "sandbox-b"));
        assert!(c.lock_loan().is_none(), "no loan without a served pod");
    }
}
