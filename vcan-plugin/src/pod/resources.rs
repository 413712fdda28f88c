//! Which pod owns which devices, from the kubelet's PodResources API.
//!
//! PreStartContainer carries only device IDs; the kubelet records an allocation at admission, so by
//! the time PreStart is called the owning pod is listed here.
//!
//! The sandbox is created between admission and PreStart (a second or more), so the plugin lists
//! the pods shortly after each Allocate and PreStart reads the owner from that listing. A listing
//! answers for a device only if it started after the device's last Allocate: the kubelet hands a
//! device to a new pod only through a new Allocate, so such a listing names the pod a listing made
//! now would name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    memory: Arc<Mutex<Memory>>,
}

/// What the listings after Allocates remember for PreStart.
#[derive(Debug, Default)]
struct Memory {
    /// When each device (resource, ID) was last allocated by this process.
    allocated: HashMap<(String, String), Instant>,
    /// The newest listing by the time it was asked for.
    latest: Option<(Instant, Arc<ListPodResourcesResponse>)>,
}

/// How long after an Allocate the pods are listed: the kubelet records the allocation once
/// Allocate has returned.
const LIST_AFTER_ALLOCATE: Duration = Duration::from_millis(30);
/// Listings after an Allocate until one shows its devices, and the wait between them.
const LISTS_AFTER_ALLOCATE: u32 = 3;
const LIST_AGAIN_AFTER: Duration = Duration::from_millis(150);

/// Where the owner of some devices came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerSource {
    /// A listing made after the devices' Allocate, before the PreStart.
    Remembered,
    /// A listing made for this lookup.
    Listed,
}

/// The owner of some devices and the listing it was found in.
#[derive(Debug, Clone)]
pub struct Owner {
    /// The pod holding the devices.
    pub owner: PodDevices,
    /// Every pod holding devices of the resource, per that listing.
    pub pods: Vec<PodDevices>,
    /// Where the listing came from.
    pub source: OwnerSource,
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
            memory: Arc::default(),
        }
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes that the kubelet allocated `ids` of `resource` now, and lists the pods a moment
    /// later (again, a few times, until the listing shows them) so that the PreStart of the
    /// container finds its pod in memory. Needs a tokio runtime.
    pub fn allocated(&self, resource: &str, ids: &[String]) {
        let now = Instant::now();
        {
            let mut memory = self.memory();
            for id in ids {
                memory
                    .allocated
                    .insert((resource.to_string(), id.clone()), now);
            }
        }
        let this = self.clone();
        let resource = resource.to_string();
        let ids = ids.to_vec();
        tokio::spawn(async move {
            let mut wait = LIST_AFTER_ALLOCATE;
            for _ in 0..LISTS_AFTER_ALLOCATE {
                tokio::time::sleep(wait).await;
                wait = LIST_AGAIN_AFTER;
                if this.remembered_owner(&resource, &ids).is_some() {
                    return;
                }
                if let Err(e) = this.listing().await {
                    tracing::debug!(error = %e, "cannot list pods after an Allocate");
                    return;
                }
            }
        });
    }

    /// The owner of `ids` according to the newest listing, if it started after every one of
    /// them was last allocated.
    fn remembered_owner(&self, resource: &str, ids: &[String]) -> Option<Owner> {
        let memory = self.memory();
        let (started, response) = memory.latest.as_ref()?;
        let after_allocation = ids.iter().all(|id| {
            memory
                .allocated
                .get(&(resource.to_string(), id.clone()))
                .is_some_and(|at| at < started)
        });
        if !after_allocation {
            return None;
        }
        let pods = pods_in(response, resource);
        let owner = owner_of(pods.clone(), resource, ids).ok()?;
        Some(Owner {
            owner,
            pods,
            source: OwnerSource::Remembered,
        })
    }

    /// The pod holding all of `ids` of `resource`: from the listing made after their Allocate if
    /// that shows it, otherwise from a new listing.
    pub async fn owner(&self, resource: &str, ids: &[String]) -> Result<Owner, PodResourcesError> {
        if let Some(owner) = self.remembered_owner(resource, ids) {
            return Ok(owner);
        }
        let pods = self.pods_with(resource).await?;
        Ok(Owner {
            owner: owner_of(pods.clone(), resource, ids)?,
            pods,
            source: OwnerSource::Listed,
        })
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
                        let asked = Instant::now();
                        let listed = this.list_once().await.map(Arc::new);
                        if let Ok(response) = &listed {
                            let mut memory = this.memory();
                            if memory.latest.as_ref().is_none_or(|(at, _)| *at < asked) {
                                memory.latest = Some((asked, response.clone()));
                            }
                        }
                        listed
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

    /// Every pod holding devices of `resource`, with its device IDs, from a listing that starts
    /// after this call.
    pub async fn pods_with(&self, resource: &str) -> Result<Vec<PodDevices>, PodResourcesError> {
        Ok(pods_in(&*self.listing().await?, resource))
    }
}

/// Every pod of `response` holding devices of `resource`, with its device IDs.
fn pods_in(response: &ListPodResourcesResponse, resource: &str) -> Vec<PodDevices> {
    response
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
        .collect()
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
