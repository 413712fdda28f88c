//! Membership of a shared bus: one interface per pod, the pod end of a vxcan pair whose other end
//! the bus forwards to and from every other member.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bus::{self, Bus};
use crate::kernel::link::LinkInfo;
use crate::kernel::netns::Netns;
use crate::pod::resources::PodDevices;
use crate::pod::runtime::Sandbox;
use crate::resource::ResourceName;
use crate::serve::{INTERFACES_ENV, Provision, ServeError, ServedPod};

/// Joins pods to one bus and takes them off it when they are gone.
#[derive(Debug)]
pub struct BusMembership {
    bus: Arc<Bus>,
}

impl BusMembership {
    /// Membership of `bus`.
    pub fn new(bus: Arc<Bus>) -> Self {
        BusMembership { bus }
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }
}

#[async_trait::async_trait]
impl Provision for BusMembership {
    fn allocate_env(
        &self,
        resource: &ResourceName,
        ids: &[String],
    ) -> Result<HashMap<String, String>, ServeError> {
        if ids.len() > 1 {
            return Err(ServeError::InvalidIds(format!(
                "{} devices of {resource} requested by one container: a pod joins a bus with one \
                 interface, request {resource}: 1",
                ids.len(),
            )));
        }
        Ok(HashMap::from([(
            INTERFACES_ENV.to_string(),
            self.bus.spec().interface.clone(),
        )]))
    }

    async fn provision(
        &self,
        resource: &ResourceName,
        owner: &PodDevices,
        sandbox: &Sandbox,
        netns: &Netns,
    ) -> Result<Vec<LinkInfo>, ServeError> {
        let pod = owner.pod.clone();
        let config = bus::member_config(resource.domain(), &sandbox.annotations, self.bus.spec())
            .map_err(|source| ServeError::BusMember {
            pod: pod.clone(),
            source: Box::new(source),
        })?;
        // A pod whose containers each hold a device joins once, under its lowest device.
        let bus_end = owner
            .device_ids
            .iter()
            .min()
            .and_then(|id| bus::bus_end_name(id))
            .ok_or_else(|| {
                ServeError::InvalidIds(format!("no device of {resource} for pod {pod}"))
            })?;
        let pair = self
            .bus
            .join(&pod, &sandbox.id, netns, &bus_end, &config)
            .await
            .map_err(|source| ServeError::Bus {
                pod: pod.clone(),
                source: Box::new(source),
            })?;
        Ok(vec![LinkInfo {
            index: pair.index,
            name: pair.name,
            kind: "vxcan".into(),
            mtu: pair.mtu.bytes(),
            up: true,
        }])
    }

    /// On a timed bus, bounds the member's transmit queue and tells the scheduler its slot.
    async fn counted(
        &self,
        owner: &PodDevices,
        attachments: &[crate::ebpf::Attachment],
        counters: &Arc<crate::ebpf::Counters>,
    ) -> Result<(), ServeError> {
        let Some(timed) = self.bus.timed() else {
            return Ok(());
        };
        for a in attachments {
            counters
                .set_tx_queue(a.info.slot, timed.timing().tx_queue)
                .map_err(|source| ServeError::Counters {
                    pod: owner.pod.clone(),
                    source: Box::new(source),
                })?;
            timed.set_slot(&owner.pod, a.info.slot);
        }
        Ok(())
    }

    /// Connects the uplink and the tunnel if they are not (yet or any more), takes the gone members off the bus
    /// (their rules and pairs, if still there), and removes the bus namespace once no member is
    /// left in it; runs also with none gone, for members deleted while the plugin was down.
    async fn release(&self, gone: &[ServedPod]) {
        if let Err(e) = self.bus.ensure_fixed_ends().await {
            tracing::warn!(bus = %self.bus.spec().name, error = %e, "the bus's uplink or tunnel is not connected");
        }
        let sandboxes: Vec<String> = gone.iter().map(|p| p.sandbox.clone()).collect();
        match self.bus.leave(sandboxes).await {
            Ok(left) => {
                for m in left {
                    tracing::info!(bus = %self.bus.spec().name, pod = %m.pod, "member left the bus");
                }
            }
            Err(e) => {
                tracing::warn!(bus = %self.bus.spec().name, error = %e, "leaving the bus failed")
            }
        }
    }
}
