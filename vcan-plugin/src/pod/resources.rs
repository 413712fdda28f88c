//! Which pod owns which devices, from the kubelet's PodResources API.
//!
//! PreStartContainer carries only device IDs; the kubelet records an allocation at admission, so by
//! the time PreStart is called the owning pod is listed here.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use tonic::Code;
use tonic::transport::Channel;

use crate::api::podresources::v1::pod_resources_lister_client::PodResourcesListerClient;
use crate::api::podresources::v1::{ListPodResourcesRequest, ListPodResourcesResponse};
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
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The devices are split across pods or listed for several.
    #[error("devices {ids:?} are listed for more than one pod ({pods:?}) by the kubelet")]
    Ambiguous {
        /// The IDs looked for.
        ids: Vec<String>,
        /// The pods listing them.
        pods: Vec<String>,
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

/// A client of the kubelet's PodResources API. Clones share one stream of listings: a call
/// joins the next listing to start (never one already under way, which may predate the pod it
/// looks for), so that many PreStarts at once make a few `List` calls instead of one each.
#[derive(Debug, Clone)]
pub struct PodResources {
    client: PodResourcesListerClient<Channel>,
    path: PathBuf,
    listings: Arc<Mutex<Listings>>,
}

/// A `List` call that several callers await.
type Listing = Shared<BoxFuture<'static, Result<Arc<ListPodResourcesResponse>, PodResourcesError>>>;

#[derive(Default)]
struct Listings {
    /// The listing that has not started yet (it waits for `running`): callers join it.
    next: Option<(u64, Listing)>,
    /// The listing under way (or the last one, finished).
    running: Option<Listing>,
    ids: u64,
}

impl std::fmt::Debug for Listings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listings")
            .field("next", &self.next.as_ref().map(|(id, _)| id))
            .field("listed", &self.ids)
            .finish()
    }
}

/// How often to retry when the kubelet rate-limits PodResources (100 qps, burst 10).
const RATE_LIMIT_RETRIES: u32 = 8;

impl PodResources {
    /// A client for the socket at `path`; connects on first use.
    pub fn new(path: &Path) -> Self {
        PodResources {
            client: PodResourcesListerClient::new(uds::lazy_channel(path, uds::CALL_DEADLINE)),
            path: path.to_path_buf(),
            listings: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Listings> {
        self.listings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A listing that starts after this call: the next one to start, joined if another caller
    /// already waits for it.
    async fn listing(&self) -> Result<Arc<ListPodResourcesResponse>, PodResourcesError> {
        let listing = {
            let mut listings = self.lock();
            match &listings.next {
                Some((_, next)) => next.clone(),
                None => {
                    listings.ids += 1;
                    let id = listings.ids;
                    let previous = listings.running.clone();
                    let this = self.clone();
                    let listing = async move {
                        if let Some(previous) = previous {
                            let _ = previous.await;
                        }
                        {
                            // Started: whoever comes now waits for the listing after this one.
                            let mut listings = this.lock();
                            if listings.next.as_ref().is_some_and(|(next, _)| *next == id) {
                                listings.running = listings.next.take().map(|(_, l)| l);
                            }
                        }
                        this.list_once().await.map(Arc::new)
                    }
                    .boxed()
                    .shared();
                    listings.next = Some((id, listing.clone()));
                    listing
                }
            }
        };
        listing.await
    }

    /// One `List` call, retried while the kubelet rate-limits it.
    async fn list_once(&self) -> Result<ListPodResourcesResponse, PodResourcesError> {
        let mut delay = Duration::from_millis(20);
        let mut attempt = 0;
        loop {
            match self.client.clone().list(ListPodResourcesRequest {}).await {
                Ok(r) => return Ok(r.into_inner()),
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
        }
    }

    /// Every pod holding devices of `resource`, with its device IDs.
    pub async fn pods_with(&self, resource: &str) -> Result<Vec<PodDevices>, PodResourcesError> {
        let response = self.listing().await?;
        Ok(response
            .pod_resources
            .iter()
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
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
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
    let mut holders = pods
        .into_iter()
        .filter(|p| ids.iter().any(|id| p.device_ids.contains(id)));
    let owner = holders.next().ok_or_else(|| PodResourcesError::NotFound {
        ids: ids.to_vec(),
        resource: resource.to_string(),
    })?;
    // Creating interfaces in the wrong pod would be worse than failing: refuse if the kubelet's
    // view is inconsistent.
    let others: Vec<String> = holders.map(|p| p.pod.to_string()).collect();
    if !others.is_empty() || !ids.iter().all(|id| owner.device_ids.contains(id)) {
        return Err(PodResourcesError::Ambiguous {
            ids: ids.to_vec(),
            pods: std::iter::once(owner.pod.to_string())
                .chain(others)
                .collect(),
        });
    }
    Ok(owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ids: &[&str]) -> PodDevices {
        PodDevices {
            pod: PodRef {
                namespace: "default".into(),
                name: name.into(),
            },
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_owner_holds_every_id_and_no_one_else_does() {
        let pods = vec![pod("a", &["v-1", "v-2"]), pod("b", &["v-3"])];
        let owner = owner_of(pods.clone(), "r/v", &ids(&["v-2"])).expect("owner");
        assert_eq!(owner.pod.name, "a");
        assert!(matches!(
            owner_of(pods.clone(), "r/v", &ids(&["v-9"])),
            Err(PodResourcesError::NotFound { .. })
        ));
        let err = owner_of(pods, "r/v", &ids(&["v-2", "v-3"])).expect_err("split across pods");
        assert!(matches!(err, PodResourcesError::Ambiguous { .. }), "{err}");
        let twice = vec![pod("a", &["v-1"]), pod("b", &["v-1"])];
        let err = owner_of(twice, "r/v", &ids(&["v-1"])).expect_err("listed twice");
        assert!(err.to_string().contains("more than one pod"), "{err}");
    }
}
