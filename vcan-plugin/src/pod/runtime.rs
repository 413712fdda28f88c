//! A pod's sandbox as the container runtime knows it: its network namespace and annotations.
//!
//! The lookup goes through the CRI RuntimeService that containerd serves on its own socket, so it
//! needs neither the API server nor containerd-specific APIs, and its verbose sandbox status carries
//! the pod annotations the kubelet passed in.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use tonic::transport::Channel;

use crate::api::cri::v1::runtime_service_client::RuntimeServiceClient;
use crate::api::cri::v1::{
    ListPodSandboxRequest, NamespaceMode, PodSandboxFilter, PodSandboxState, PodSandboxStateValue,
    PodSandboxStatusRequest,
};
use crate::pod::resources::PodRef;
use crate::uds;

/// Where a pod's sandbox lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The runtime's sandbox ID.
    pub id: String,
    /// The pod's UID (label `io.kubernetes.pod.uid`).
    pub uid: String,
    /// The sandbox's network namespace file; `None` for hostNetwork pods.
    pub netns: Option<PathBuf>,
    /// The pod's annotations.
    pub annotations: HashMap<String, String>,
}

/// Why a sandbox could not be found.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime did not answer.
    #[error(
        "cannot reach the container runtime's CRI service at {path}: {status} (set \
         --containerd-socket to the runtime's socket and mount its directory into the plugin)"
    )]
    Unavailable {
        /// The socket.
        path: String,
        /// The gRPC status message.
        status: String,
    },
    /// No ready sandbox for the pod.
    #[error("the container runtime has no ready sandbox for pod {0}")]
    NoSandbox(PodRef),
    /// Ready sandboxes of different pods (UIDs) carry the pod's name: a pod deleted and created
    /// again under the same name whose old sandbox is still running.
    #[error(
        "the container runtime has ready sandboxes of {count} different pods named {pod} (UIDs \
         {uids:?}); waiting until the old pod's sandbox is stopped"
    )]
    Ambiguous {
        /// The pod.
        pod: PodRef,
        /// How many distinct pods.
        count: usize,
        /// Their UIDs.
        uids: Vec<String>,
    },
    /// The sandbox status lacks the network namespace path.
    #[error("the runtime's status of sandbox {id} of pod {pod} has no network namespace: {why}")]
    NoNetns {
        /// Sandbox ID.
        id: String,
        /// The pod.
        pod: PodRef,
        /// What was missing.
        why: String,
    },
}

/// Looks up pod sandboxes. The plugin uses [`CriRuntime`]; tests substitute their own.
#[async_trait::async_trait]
pub trait SandboxLookup: Send + Sync + 'static {
    /// The ready sandbox of `pod`.
    async fn sandbox(&self, pod: &PodRef) -> Result<Sandbox, RuntimeError>;

    /// The IDs of every ready sandbox (one listing for all pods); an error when the runtime
    /// cannot tell (unreachable).
    async fn ready_sandboxes(&self) -> Result<HashSet<String>, RuntimeError>;
}

/// Sandbox lookup over CRI (containerd's socket also serves `runtime.v1.RuntimeService`).
#[derive(Debug, Clone)]
pub struct CriRuntime {
    client: RuntimeServiceClient<Channel>,
    path: PathBuf,
}

/// The sockets containerd listens on in common distributions, in order of preference.
pub const CONTAINERD_SOCKETS: &[&str] = &[
    "/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/var/snap/microk8s/common/run/containerd.sock",
];

/// The first of [`CONTAINERD_SOCKETS`] that exists, or the first one if none does yet.
pub fn default_containerd_socket() -> PathBuf {
    CONTAINERD_SOCKETS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(CONTAINERD_SOCKETS[0]))
}

impl CriRuntime {
    /// A client for the CRI socket at `path`; connects on first use and after runtime restarts.
    pub fn new(path: &Path) -> Self {
        CriRuntime {
            client: RuntimeServiceClient::new(uds::lazy_channel(path, uds::CALL_DEADLINE)),
            path: path.to_path_buf(),
        }
    }

    fn unavailable(&self, status: tonic::Status) -> RuntimeError {
        RuntimeError::Unavailable {
            path: self.path.display().to_string(),
            status: uds::status_text(&status),
        }
    }
}

/// Finds the network namespace path in a verbose sandbox status's `info` JSON.
///
/// containerd reports it as `netNamespacePath` and inside the OCI runtime spec; either will do.
pub fn netns_from_info(info: &str) -> Result<Option<PathBuf>, String> {
    let json: serde_json::Value =
        serde_json::from_str(info).map_err(|e| format!("unparseable info JSON: {e}"))?;
    if let Some(path) = json
        .get("netNamespacePath")
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
    {
        return Ok(Some(PathBuf::from(path)));
    }
    let namespaces = json
        .pointer("/runtimeSpec/linux/namespaces")
        .and_then(|n| n.as_array());
    Ok(namespaces.and_then(|list| {
        list.iter()
            .find(|n| n.get("type").and_then(|t| t.as_str()) == Some("network"))
            .and_then(|n| n.get("path"))
            .and_then(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }))
}

/// A ready sandbox as the runtime lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The runtime's sandbox ID.
    pub id: String,
    /// The pod's UID (label `io.kubernetes.pod.uid`).
    pub uid: String,
    /// When the runtime created it, nanoseconds since the Unix epoch.
    pub created_at: i64,
}

/// A sandbox in full, from its verbose status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// The pod it belongs to.
    pub pod: PodRef,
    /// Whether it is ready (its pause process runs).
    pub ready: bool,
    /// When the runtime created it, nanoseconds since the Unix epoch.
    pub created_at: i64,
    /// Where it lives.
    pub sandbox: Sandbox,
}

/// The sandbox of `pod` among `listed`, its ready sandboxes: the newest, since several of one pod
/// (same UID) happen briefly when it gets a new one. Ready sandboxes of different pods under one
/// name mean an old pod still runs; picking one could put interfaces into the wrong pod.
pub fn choose<'a>(pod: &PodRef, listed: &'a [Listed]) -> Result<&'a Listed, RuntimeError> {
    let uids: BTreeSet<&str> = listed.iter().map(|s| s.uid.as_str()).collect();
    if uids.len() > 1 {
        return Err(RuntimeError::Ambiguous {
            pod: pod.clone(),
            count: uids.len(),
            uids: uids.into_iter().map(str::to_string).collect(),
        });
    }
    listed
        .iter()
        .max_by_key(|s| s.created_at)
        .ok_or_else(|| RuntimeError::NoSandbox(pod.clone()))
}

/// The pod a sandbox's labels name, if they name one.
pub(crate) fn pod_of(labels: &HashMap<String, String>) -> Option<PodRef> {
    Some(PodRef {
        namespace: labels.get("io.kubernetes.pod.namespace")?.clone(),
        name: labels.get("io.kubernetes.pod.name")?.clone(),
    })
}

pub(crate) fn uid_of(labels: &HashMap<String, String>) -> String {
    labels
        .get("io.kubernetes.pod.uid")
        .cloned()
        .unwrap_or_default()
}

impl CriRuntime {
    /// The ready sandboxes of `pod`, or of every pod; each with the pod its labels name.
    pub async fn list_ready(
        &self,
        pod: Option<&PodRef>,
    ) -> Result<Vec<(PodRef, Listed)>, RuntimeError> {
        let label_selector = pod
            .map(|pod| {
                HashMap::from([
                    ("io.kubernetes.pod.name".to_string(), pod.name.clone()),
                    (
                        "io.kubernetes.pod.namespace".to_string(),
                        pod.namespace.clone(),
                    ),
                ])
            })
            .unwrap_or_default();
        let items = self
            .client
            .clone()
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    state: Some(PodSandboxStateValue {
                        state: PodSandboxState::SandboxReady as i32,
                    }),
                    label_selector,
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| self.unavailable(s))?
            .into_inner()
            .items;
        Ok(items
            .into_iter()
            .filter_map(|s| {
                let pod = pod_of(&s.labels)?;
                Some((
                    pod,
                    Listed {
                        uid: uid_of(&s.labels),
                        id: s.id,
                        created_at: s.created_at,
                    },
                ))
            })
            .collect())
    }

    /// The sandbox `id` in full; `None` when the runtime has no such sandbox (the ID of an app
    /// container, say) or it belongs to no pod.
    pub async fn describe(&self, id: &str) -> Result<Option<Described>, RuntimeError> {
        let response = match self
            .client
            .clone()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: true,
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(self.unavailable(status)),
        };
        let status = response.status.unwrap_or_default();
        let Some(pod) = pod_of(&status.labels) else {
            return Ok(None);
        };
        let network_mode = status
            .linux
            .as_ref()
            .and_then(|l| l.namespaces.as_ref())
            .and_then(|n| n.options.as_ref())
            .map(|o| o.network)
            .unwrap_or_default();
        let no_netns = |why: String| RuntimeError::NoNetns {
            id: id.to_string(),
            pod: pod.clone(),
            why,
        };
        let netns = if network_mode == NamespaceMode::Node as i32 {
            None
        } else {
            let info = response
                .info
                .get("info")
                .ok_or_else(|| no_netns("the verbose status has no `info` entry".into()))?;
            let path = netns_from_info(info).map_err(no_netns)?;
            Some(path.ok_or_else(|| no_netns("no network namespace path in the info".into()))?)
        };
        Ok(Some(Described {
            ready: status.state == PodSandboxState::SandboxReady as i32,
            created_at: status.created_at,
            sandbox: Sandbox {
                id: id.to_string(),
                uid: uid_of(&status.labels),
                netns,
                annotations: status.annotations,
            },
            pod,
        }))
    }
}

#[async_trait::async_trait]
impl SandboxLookup for CriRuntime {
    async fn sandbox(&self, pod: &PodRef) -> Result<Sandbox, RuntimeError> {
        let listed: Vec<Listed> = self
            .list_ready(Some(pod))
            .await?
            .into_iter()
            .map(|(_, listed)| listed)
            .collect();
        let newest = choose(pod, &listed)?;
        match self.describe(&newest.id).await? {
            Some(described) => Ok(described.sandbox),
            // Stopped and removed between the two calls.
            None => Err(RuntimeError::NoSandbox(pod.clone())),
        }
    }

    async fn ready_sandboxes(&self) -> Result<HashSet<String>, RuntimeError> {
        Ok(self
            .list_ready(None)
            .await?
            .into_iter()
            .map(|(_, listed)| listed.id)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_path_is_found_in_either_place() {
        let direct = r#"{"netNamespacePath":"/var/run/netns/cni-1"}"#;
        assert_eq!(
            netns_from_info(direct).expect("parses"),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        let spec = r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},
            {"type":"network","path":"/var/run/netns/cni-2"}]}}}"#;
        assert_eq!(
            netns_from_info(spec).expect("parses"),
            Some(PathBuf::from("/var/run/netns/cni-2"))
        );
        let host = r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"}]}}}"#;
        assert_eq!(netns_from_info(host).expect("parses"), None);
        assert!(netns_from_info("not json").is_err());
    }
}
