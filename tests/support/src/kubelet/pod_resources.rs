//! The kubelet's PodResources v1 server, listing what the stand-in admitted.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vcan_plugin::api::podresources::v1::pod_resources_lister_server::PodResourcesLister;
use vcan_plugin::api::podresources::v1::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};

use super::{PodAllocation, Shared};

/// Serves `List` from the stand-in's admitted pods.
#[derive(Clone)]
pub(super) struct PodResourcesService {
    pub(super) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl PodResourcesLister for PodResourcesService {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        let listed = self.shared.update(|state| {
            state.list_calls += 1;
            // The kubelet rate-limits PodResources; the plugin must retry, not give up.
            if state.refused_lists > 0 {
                state.refused_lists -= 1;
                return None;
            }
            let listed: &[PodAllocation] = if state.listing_empty {
                &[]
            } else {
                &state.pods
            };
            Some(listed.iter().map(pod_resources).collect())
        });
        match listed {
            Some(pod_resources) => Ok(Response::new(ListPodResourcesResponse { pod_resources })),
            None => Err(Status::resource_exhausted("rate limited")),
        }
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Ok(Response::new(AllocatableResourcesResponse::default()))
    }

    async fn get(
        &self,
        _: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("Get is not served by the stand-in"))
    }
}

/// A pod as the kubelet lists it: one entry per container (in spec order), holding that
/// container's devices of every resource.
pub(super) fn pod_resources(pod: &PodAllocation) -> PodResources {
    let mut containers: Vec<ContainerResources> = Vec::new();
    for allocation in &pod.containers {
        let devices = ContainerDevices {
            resource_name: allocation.resource.clone(),
            device_ids: allocation.ids.clone(),
            topology: None,
        };
        match containers
            .iter_mut()
            .find(|c| c.name == allocation.container)
        {
            Some(container) => container.devices.push(devices),
            None => containers.push(ContainerResources {
                name: allocation.container.clone(),
                devices: vec![devices],
                ..Default::default()
            }),
        }
    }
    PodResources {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        containers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubelet::ContainerAllocation;

    fn allocation(container: &str, resource: &str, ids: &[&str]) -> ContainerAllocation {
        ContainerAllocation {
            container: container.into(),
            resource: resource.into(),
            ids: ids.iter().map(|s| s.to_string()).collect(),
            envs: Default::default(),
        }
    }

    #[test]
    fn a_container_with_two_resources_is_listed_once() {
        let pod = PodAllocation {
            namespace: "team".into(),
            name: "ecu".into(),
            containers: vec![
                allocation("sim", "a.io/vcan", &["vcan-0001"]),
                allocation("logger", "a.io/vcan", &["vcan-0002"]),
                allocation("sim", "b.io/vcan", &["vcan-0000", "vcan-0003"]),
            ],
        };
        let listed = pod_resources(&pod);
        assert_eq!(
            (listed.namespace.as_str(), listed.name.as_str()),
            ("team", "ecu")
        );
        let names: Vec<_> = listed.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["sim", "logger"]);
        let sim: Vec<_> = listed.containers[0]
            .devices
            .iter()
            .map(|d| (d.resource_name.as_str(), d.device_ids.clone()))
            .collect();
        assert_eq!(
            sim,
            [
                ("a.io/vcan", vec!["vcan-0001".to_string()]),
                (
                    "b.io/vcan",
                    vec!["vcan-0000".to_string(), "vcan-0003".to_string()]
                ),
            ]
        );
    }
}
