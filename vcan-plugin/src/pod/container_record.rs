//! A started task's container as containerd records it: whether it is a pod sandbox, and if so
//! the pod, its network namespace and its annotations.
//!
//! The CRI keeps the pod's labels on the sandbox's container record and its own metadata of the
//! sandbox (the pod's sandbox config and the namespace path) in the record's
//! `io.cri-containerd.sandbox.metadata` extension, written before the sandbox's task starts. One
//! read of the record (a metadata lookup inside containerd) thus describes a sandbox as soon as
//! its task has started, where the CRI's verbose status encodes the whole runtime spec and knows
//! the sandbox only once `RunPodSandbox` is nearly done. A record that does not read as expected
//! (another containerd version, a hostNetwork pod) is left to the CRI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tonic::transport::Channel;

use crate::api::containerd::services::containers::v1::containers_client::ContainersClient;
use crate::api::containerd::services::containers::v1::{Container, GetContainerRequest};
use crate::pod::runtime::{Described, Sandbox, pod_of, uid_of};
use crate::pod::runtime_events::CRI_NAMESPACE;
use crate::uds;

/// The label the CRI puts on its containers' records: `sandbox` or `container`.
const KIND_LABEL: &str = "io.cri-containerd.kind";
/// The extension holding the CRI's metadata of a sandbox.
const SANDBOX_METADATA: &str = "io.cri-containerd.sandbox.metadata";
/// The version of that metadata this module reads.
const METADATA_VERSION: &str = "v1";

/// What a container record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A pod's sandbox, described.
    Sandbox(Described),
    /// An app container (or no container any more): never a sandbox.
    NotSandbox,
}

/// Why a record could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// containerd did not answer.
    #[error("containerd's containers service at {path}: {status}")]
    Unavailable {
        /// The socket.
        path: String,
        /// The gRPC status message.
        status: String,
    },
    /// The record is not what this module reads.
    #[error("the record of container {id} does not describe its sandbox: {why}")]
    Unreadable {
        /// The container ID.
        id: String,
        /// What did not match.
        why: String,
    },
}

/// The CRI's sandbox metadata, the part read here (Go's JSON field names).
#[derive(Debug, Deserialize)]
struct Versioned {
    #[serde(rename = "Version")]
    version: String,
    #[serde(rename = "Metadata")]
    metadata: Metadata,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Config", default)]
    config: Option<SandboxConfig>,
    #[serde(rename = "NetNSPath", default)]
    netns_path: String,
}

#[derive(Debug, Deserialize)]
struct SandboxConfig {
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

/// A client of containerd's containers service.
#[derive(Debug, Clone)]
pub struct ContainerRecords {
    client: ContainersClient<Channel>,
    path: PathBuf,
}

impl ContainerRecords {
    /// A client for containerd at `socket`; connects on first use.
    pub fn new(socket: &Path) -> Self {
        ContainerRecords {
            client: ContainersClient::new(uds::lazy_channel(socket, uds::CALL_DEADLINE)),
            path: socket.to_path_buf(),
        }
    }

    /// What the record of container `id` (in the CRI's namespace) says.
    pub async fn describe(&self, id: &str) -> Result<Record, RecordError> {
        let mut request = tonic::Request::new(GetContainerRequest { id: id.to_string() });
        request.metadata_mut().insert(
            "containerd-namespace",
            tonic::metadata::MetadataValue::from_static(CRI_NAMESPACE),
        );
        match self.client.clone().get(request).await {
            Ok(response) => match response.into_inner().container {
                Some(container) => read(id, container),
                None => Err(RecordError::Unreadable {
                    id: id.to_string(),
                    why: "containerd answered without a record".into(),
                }),
            },
            // Removed already: whatever it was, it is not running.
            Err(status) if status.code() == tonic::Code::NotFound => Ok(Record::NotSandbox),
            Err(status) => Err(RecordError::Unavailable {
                path: self.path.display().to_string(),
                status: uds::status_text(&status),
            }),
        }
    }
}

/// Reads record `container` of the started task `id`.
pub fn read(id: &str, container: Container) -> Result<Record, RecordError> {
    let unreadable = |why: String| RecordError::Unreadable {
        id: id.to_string(),
        why,
    };
    match container.labels.get(KIND_LABEL).map(String::as_str) {
        Some("sandbox") => {}
        Some(_) => return Ok(Record::NotSandbox),
        None => return Err(unreadable(format!("no {KIND_LABEL} label"))),
    }
    let pod = pod_of(&container.labels)
        .ok_or_else(|| unreadable("no io.kubernetes.pod.* labels".into()))?;
    let extension = container
        .extensions
        .get(SANDBOX_METADATA)
        .ok_or_else(|| unreadable(format!("no {SANDBOX_METADATA} extension")))?;
    let versioned: Versioned = serde_json::from_slice(&extension.value)
        .map_err(|e| unreadable(format!("{SANDBOX_METADATA} is not the expected JSON: {e}")))?;
    if versioned.version != METADATA_VERSION {
        return Err(unreadable(format!(
            "{SANDBOX_METADATA} version {:?}, not {METADATA_VERSION:?}",
            versioned.version
        )));
    }
    let metadata = versioned.metadata;
    if metadata.id != id {
        return Err(unreadable(format!(
            "{SANDBOX_METADATA} is of sandbox {:?}",
            metadata.id
        )));
    }
    // hostNetwork pods have no path here; the CRI tells them apart from a record read wrongly.
    if metadata.netns_path.is_empty() {
        return Err(unreadable("no network namespace path".into()));
    }
    let created_at = container
        .created_at
        .map(|t| t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos))
        .unwrap_or_default();
    Ok(Record::Sandbox(Described {
        ready: true,
        created_at,
        sandbox: Sandbox {
            id: id.to_string(),
            uid: uid_of(&container.labels),
            netns: Some(PathBuf::from(metadata.netns_path)),
            annotations: metadata
                .config
                .and_then(|c| c.annotations)
                .unwrap_or_default(),
        },
        pod,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sandbox's record as containerd 1.6's CRI writes it (trimmed).
    fn sandbox_record(id: &str, metadata: &str) -> Container {
        Container {
            id: id.into(),
            labels: HashMap::from([
                (KIND_LABEL.into(), "sandbox".into()),
                ("io.kubernetes.pod.name".into(), "ecu".into()),
                ("io.kubernetes.pod.namespace".into(), "default".into()),
                ("io.kubernetes.pod.uid".into(), "uid-1".into()),
            ]),
            created_at: Some(prost_types::Timestamp {
                seconds: 2,
                nanos: 5,
            }),
            extensions: HashMap::from([(
                SANDBOX_METADATA.into(),
                prost_types::Any {
                    type_url: "github.com/containerd/cri/pkg/store/sandbox/Metadata".into(),
                    value: metadata.as_bytes().to_vec(),
                },
            )]),
            ..Container::default()
        }
    }

    const METADATA: &str = r#"{"Version":"v1","Metadata":{"ID":"sb-1","Name":"ecu_default_uid-1_0",
        "Config":{"metadata":{"name":"ecu","uid":"uid-1","namespace":"default"},
        "annotations":{"socketcan.io/interfaces":"can0"},"linux":{}},
        "NetNSPath":"/var/run/netns/cni-1","IP":"10.0.0.5","RuntimeHandler":""}}"#;

    #[test]
    fn a_sandbox_record_describes_the_pod_and_its_namespace() {
        let Record::Sandbox(d) = read("sb-1", sandbox_record("sb-1", METADATA)).expect("reads")
        else {
            panic!("not read as a sandbox");
        };
        assert_eq!(
            (d.pod.namespace.as_str(), d.pod.name.as_str()),
            ("default", "ecu")
        );
        assert!(d.ready);
        assert_eq!(d.created_at, 2_000_000_005);
        assert_eq!(d.sandbox.uid, "uid-1");
        assert_eq!(d.sandbox.netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(
            d.sandbox
                .annotations
                .get("socketcan.io/interfaces")
                .map(String::as_str),
            Some("can0")
        );
    }

    #[test]
    fn app_containers_are_not_sandboxes() {
        let mut record = sandbox_record("c-1", METADATA);
        record.labels.insert(KIND_LABEL.into(), "container".into());
        assert_eq!(read("c-1", record).expect("reads"), Record::NotSandbox);
    }

    #[test]
    fn anything_unexpected_is_left_to_the_cri() {
        let cases = [
            ("sb-1", METADATA.replace(r#""v1""#, r#""v2""#), "version"),
            ("sb-2", METADATA.to_string(), "of sandbox"),
            (
                "sb-1",
                METADATA.replace("/var/run/netns/cni-1", ""),
                "no network namespace",
            ),
            ("sb-1", "not json".to_string(), "expected JSON"),
        ];
        for (id, metadata, why) in cases {
            let err = read(id, sandbox_record(id, &metadata)).expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        let mut unlabelled = sandbox_record("sb-1", METADATA);
        unlabelled.labels.remove(KIND_LABEL);
        assert!(read("sb-1", unlabelled).is_err());
        let mut bare = sandbox_record("sb-1", METADATA);
        bare.extensions.clear();
        assert!(read("sb-1", bare).is_err());
    }
}
