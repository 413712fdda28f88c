//! Physical CAN interfaces passed to one pod at a time: the resource has one device, and the pod
//! holding it gets the interface itself, configured and up, under the configured name.

use std::collections::HashMap;
use std::sync::Arc;

use crate::hardware::{Controller, HardwareError, Holder};
use crate::kernel::link::LinkInfo;
use crate::kernel::netns::Netns;
use crate::pod::annotations;
use crate::pod::resources::PodDevices;
use crate::pod::runtime::Sandbox;
use crate::resource::ResourceName;
use crate::serve::{INTERFACES_ENV, Provision, ServeError, ServedPod};

/// Lends one physical interface to the pod holding the resource's device.
#[derive(Debug)]
pub struct Passthrough {
    controller: Arc<Controller>,
}

impl Passthrough {
    /// Passthrough of `controller`.
    pub fn new(controller: Arc<Controller>) -> Self {
        Passthrough { controller }
    }

    /// The settings for a pod: the configuration's, with the bitrate its annotation chose if the
    /// configuration allows it.
    fn settings(
        &self,
        domain: &str,
        annotations: &HashMap<String, String>,
    ) -> Result<crate::hardware::ControllerSettings, HardwareError> {
        let spec = self.controller.spec();
        let mut settings = spec.settings.clone();
        let key = format!("{domain}/{}{}", annotations::BITRATE_OPTION, spec.name);
        if let Some(value) = annotations.get(&key) {
            let allowed = || {
                let mut all = vec![spec.settings.bitrate];
                all.extend(spec.bitrates.iter().copied());
                all.sort_unstable();
                all.dedup();
                all.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let bitrate = value
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|b| spec.allows(*b))
                .ok_or_else(|| HardwareError::BitrateNotAllowed {
                    what: format!("hardware interface {:?}", spec.name),
                    requested: value.clone(),
                    allowed: allowed(),
                    annotation: key.clone(),
                })?;
            settings.bitrate = bitrate;
        }
        Ok(settings)
    }
}

#[async_trait::async_trait]
impl Provision for Passthrough {
    fn allocate_env(
        &self,
        _: &ResourceName,
        _: &[String],
    ) -> Result<HashMap<String, String>, ServeError> {
        Ok(HashMap::from([(
            INTERFACES_ENV.to_string(),
            self.controller.spec().interface.clone(),
        )]))
    }

    async fn provision(
        &self,
        resource: &ResourceName,
        owner: &PodDevices,
        sandbox: &Sandbox,
        netns: &Netns,
    ) -> Result<Vec<LinkInfo>, ServeError> {
        let hardware = |source| ServeError::Hardware {
            pod: owner.pod.clone(),
            source: Box::new(source),
        };
        annotations::check_options(resource.domain(), &sandbox.annotations).map_err(|source| {
            ServeError::PodConfig {
                pod: owner.pod.clone(),
                source,
            }
        })?;
        let settings = self
            .settings(resource.domain(), &sandbox.annotations)
            .map_err(hardware)?;
        let controller = self.controller.clone();
        let target = netns.clone();
        let name = controller.spec().interface.clone();
        let holder = holder_of(owner, sandbox);
        let link =
            tokio::task::spawn_blocking(move || controller.lend(holder, &target, &name, &settings))
                .await
                .map_err(|e| {
                    hardware(HardwareError::Missing {
                        what: "the lending thread".into(),
                        device: e.to_string(),
                    })
                })?
                .map_err(hardware)?;
        Ok(vec![link])
    }

    /// A failed serve (counters) undoes this pod's lend: the interface goes back to the node.
    async fn abandon(&self, owner: &PodDevices, sandbox: &Sandbox) {
        let controller = self.controller.clone();
        let holder = holder_of(owner, sandbox);
        let _ = tokio::task::spawn_blocking(move || controller.abandon(&holder)).await;
    }

    /// The holders are gone: if one of them holds the interface, it comes back to the node,
    /// down, under its node-side name (or, when the kernel returned it first, is renamed and
    /// downed there). A newer pod given the device meanwhile keeps it. Runs on every pass, so an
    /// interface the kernel returned while the plugin was down is restored at its start.
    async fn release(&self, gone: &[ServedPod]) {
        let controller = self.controller.clone();
        let holders: Vec<Holder> = gone.iter().map(served_holder).collect();
        let _ = tokio::task::spawn_blocking(move || controller.release(&holders)).await;
    }
}

/// The holder a PreStart or adoption lends to: the pod's sandbox.
fn holder_of(owner: &PodDevices, sandbox: &Sandbox) -> Holder {
    Holder::Pod {
        pod: owner.pod.clone(),
        uid: sandbox.uid.clone(),
        sandbox: sandbox.id.clone(),
    }
}

/// The holder a served pod was lent to, the same as [`holder_of`] said when it was served.
fn served_holder(served: &ServedPod) -> Holder {
    Holder::Pod {
        pod: served.pod.clone(),
        uid: served.uid.clone(),
        sandbox: served.sandbox.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::resources::PodRef;

    #[test]
    fn a_release_names_the_holder_the_lend_recorded() {
        let pod = PodRef {
            namespace: "default".into(),
            name: "bench-user".into(),
        };
        let sandbox = Sandbox {
            id: "sandbox-1".into(),
            uid: "uid-1".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            annotations: HashMap::new(),
        };
        let owner = PodDevices {
            pod: pod.clone(),
            device_ids: vec!["hw-bench".into()],
        };
        let served = ServedPod {
            pod,
            uid: sandbox.uid.clone(),
            sandbox: sandbox.id.clone(),
            netns: "/var/run/netns/cni-1".into(),
            interfaces: Vec::new(),
            attachments: Vec::new(),
        };
        assert_eq!(served_holder(&served), holder_of(&owner, &sandbox));
        let recreated = ServedPod {
            sandbox: "sandbox-2".into(),
            ..served
        };
        assert_ne!(served_holder(&recreated), holder_of(&owner, &sandbox));
    }
}
