//! Which pod owns which devices, from the kubelet's PodResources API.
//!
//! PreStartContainer carries only device IDs; the kubelet records an allocation at admission, so by
//! the time PreStart is called the owning pod is listed here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;

use crate::api::podresources::v1::ListPodResourcesRequest;
use crate::api::podresources::v1::pod_resources_lister_client::PodResourcesListerClient;
use crate::uds;

/// A pod, by namespace and name (PodResources carries no UID).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The devices of one resource held by one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDevices {
    /// The pod.
    pub pod: PodRef,
    /// All the pod's device IDs of the resource, container by container in spec order.
    pub device_ids: Vec<String>,
}

/// Why the owner of some devices could not be found.
#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    /// The kubelet's PodResources API did not answer.
    #[error(
        "cannot query the kubelet's PodResources API at {path}: {status} (is the pod-resources \
         directory mounted into the plugin?)"
    )]
    Unavailable {
        /// The socket.
        path: String,
        /// The gRPC status message.
        status: String,
    },
    /// No pod holds the devices.
    #[error(
        "no pod holds devices {ids:?} of {resource} according to the kubelet (devices of \
         non-restartable init containers are not listed by PodResources)"
    )]
    NotFound {
        /// The IDs looked for.
        ids: Vec<String>,
        /// The resource.
        resource: String,
    },
}

/// A client of the kubelet's PodResources API.
#[derive(Debug, Clone)]
pub struct PodResources {
    client: PodResourcesListerClient<Channel>,
    path: PathBuf,
}

/// How often to retry when the kubelet rate-limits PodResources (100 qps, burst 10).
const RATE_LIMIT_RETRIES: u32 = 8;

impl PodResources {
    /// A client for the socket at `path`; connects on first use.
    pub fn new(path: &Path) -> Self {
        PodResources {
            client: PodResourcesListerClient::new(uds::lazy_channel(path)),
            path: path.to_path_buf(),
        }
    }

    /// Every pod holding devices of `resource`, with its device IDs.
    pub async fn pods_with(&self, resource: &str) -> Result<Vec<PodDevices>, PodResourcesError> {
        let mut delay = Duration::from_millis(20);
        let mut attempt = 0;
        let response = loop {
            match self.client.clone().list(ListPodResourcesRequest {}).await {
                Ok(r) => break r.into_inner(),
                Err(status)
                    if status.code() == Code::ResourceExhausted && attempt < RATE_LIMIT_RETRIES =>
                {
                    attempt += 1;
                    tracing::debug!(attempt, "PodResources rate-limited; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(status) => {
                    return Err(PodResourcesError::Unavailable {
                        path: self.path.display().to_string(),
                        status: uds::status_text(&status),
                    });
                }
            }
        };
        Ok(response
            .pod_resources
            .into_iter()
            .filter_map(|pod| {
                let device_ids: Vec<String> = pod
                    .containers
                    .iter()
                    .flat_map(|c| &c.devices)
                    .filter(|d| d.resource_name == resource)
                    .flat_map(|d| d.device_ids.iter().cloned())
                    .collect();
                (!device_ids.is_empty()).then_some(PodDevices {
                    pod: PodRef {
                        namespace: pod.namespace,
                        name: pod.name,
                    },
                    device_ids,
                })
            })
            .collect())
    }
}

/// The pod among `pods` holding all of `ids` of `resource`.
pub fn owner_of(
    pods: Vec<PodDevices>,
    resource: &str,
    ids: &[String],
) -> Result<PodDevices, PodResourcesError> {
    pods.into_iter()
        .find(|p| ids.iter().all(|id| p.device_ids.contains(id)))
        .ok_or_else(|| PodResourcesError::NotFound {
            ids: ids.to_vec(),
            resource: resource.to_string(),
        })
}
