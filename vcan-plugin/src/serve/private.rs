//! Private vcan interfaces: each pod gets as many as it holds devices, named by its annotations.

use std::collections::HashMap;

use crate::kernel::link::{LinkInfo, Links};
use crate::kernel::netns::{Netns, NetnsError};
use crate::pod::annotations;
use crate::pod::resources::PodDevices;
use crate::pod::runtime::Sandbox;
use crate::resource::ResourceName;
use crate::serve::{INTERFACES_ENV, Provision, ServeError, ServedPod};

/// Makes a pod's private vcan interfaces.
#[derive(Debug, Default)]
pub struct PrivateVcans;

#[async_trait::async_trait]
impl Provision for PrivateVcans {
    /// Allocate runs at admission, before the pod's sandbox exists and without the pod's identity,
    /// so the names are the defaults for a pod whose only requesting container holds these
    /// devices; pods that rename interfaces by annotation already know their names.
    fn allocate_env(
        &self,
        _: &ResourceName,
        ids: &[String],
    ) -> Result<HashMap<String, String>, ServeError> {
        let names: Vec<String> = (0..ids.len()).map(annotations::default_name).collect();
        Ok(HashMap::from([(
            INTERFACES_ENV.to_string(),
            names.join(","),
        )]))
    }

    async fn provision(
        &self,
        resource: &ResourceName,
        owner: &PodDevices,
        sandbox: &Sandbox,
        netns: &Netns,
    ) -> Result<Vec<LinkInfo>, ServeError> {
        let specs = annotations::interfaces(
            resource.domain(),
            &sandbox.annotations,
            owner.device_ids.len(),
        )
        .map_err(|source| ServeError::PodConfig {
            pod: owner.pod.clone(),
            source,
        })?;
        let target = netns.clone();
        let link_error = |source| ServeError::Link {
            pod: owner.pod.clone(),
            source: Box::new(source),
        };
        tokio::task::spawn_blocking(move || {
            let mut links = Links::open(&target)?;
            specs
                .iter()
                .map(|s| links.ensure_vcan(s))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| {
            link_error(crate::kernel::link::LinkError::Netns(NetnsError::Thread(
                e.to_string(),
            )))
        })?
        .map_err(link_error)
    }

    /// A private pod's links went with its namespace; only its counters (released by the
    /// server) remain.
    async fn release(&self, _: &[ServedPod]) {}
}
