//! containerd's event stream, reduced to what tells a pod sandbox's life: a task started, a task's
//! init process exited or was deleted.
//!
//! Sandboxes and app containers both run as containerd tasks (the sandbox's pause process is the
//! task of the sandbox's ID), so the events name IDs; whether an ID is a sandbox is for the CRI to
//! say.

use std::path::Path;

use futures::{Stream, StreamExt};
use prost::Message;

use crate::api::containerd::events::{TaskDelete, TaskExit, TaskStart};
use crate::api::containerd::services::events::v1::events_client::EventsClient;
use crate::api::containerd::services::events::v1::{Envelope, SubscribeRequest};
use crate::uds;

/// The containerd namespace where the CRI keeps Kubernetes' containers.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// What a task event says about a sandbox or container ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// The task of container (or sandbox) `0` started.
    Started(String),
    /// The init process of container (or sandbox) `0` exited, or its task was deleted.
    Ended(String),
}

/// The filters of the subscription: any of them matching sends the event.
const FILTERS: &[&str] = &[
    r#"topic=="/tasks/start""#,
    r#"topic=="/tasks/exit""#,
    r#"topic=="/tasks/delete""#,
];

/// Why the event stream cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The runtime does not serve containerd's events API (CRI-O, say).
    #[error("the runtime at {0} has no containerd events API")]
    Unsupported(String),
    /// The call or the stream failed.
    #[error("containerd's event stream at {path}: {status}")]
    Stream {
        /// The socket.
        path: String,
        /// The gRPC status.
        status: String,
    },
}

/// Subscribes to the task events of containerd at `socket`. The call is answered when the first
/// event arrives (containerd sends the stream's headers with it), so callers poll it alongside
/// other work rather than wait for it.
pub async fn subscribe(
    socket: &Path,
) -> Result<impl Stream<Item = Result<TaskEvent, EventsError>> + use<>, EventsError> {
    // No deadline: the stream stays open for the runtime's lifetime.
    let channel = uds::lazy_stream_channel(socket);
    let path = socket.display().to_string();
    let request = SubscribeRequest {
        filters: FILTERS.iter().map(|f| (*f).to_string()).collect(),
    };
    let stream = EventsClient::new(channel)
        .subscribe(request)
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unimplemented => EventsError::Unsupported(path.clone()),
            _ => EventsError::Stream {
                path: path.clone(),
                status: uds::status_text(&status),
            },
        })?
        .into_inner();
    Ok(stream.filter_map(move |item| {
        let item = match item {
            Ok(envelope) => decode(&envelope).map(Ok),
            Err(status) => Some(Err(EventsError::Stream {
                path: path.clone(),
                status: uds::status_text(&status),
            })),
        };
        async move { item }
    }))
}

/// The task event in `envelope`, if it is one of the CRI's and concerns a task's init process.
pub fn decode(envelope: &Envelope) -> Option<TaskEvent> {
    if envelope.namespace != CRI_NAMESPACE {
        return None;
    }
    let any = envelope.event.as_ref()?;
    // containerd's type URLs are the bare message names; other publishers may prefix them.
    let kind = any.type_url.rsplit('/').next()?;
    let value = any.value.as_slice();
    match kind {
        "containerd.events.TaskStart" => {
            let event = TaskStart::decode(value).ok()?;
            Some(TaskEvent::Started(event.container_id))
        }
        "containerd.events.TaskExit" => {
            let event = TaskExit::decode(value).ok()?;
            init_process(&event.container_id, &event.id)
                .then_some(TaskEvent::Ended(event.container_id))
        }
        "containerd.events.TaskDelete" => {
            let event = TaskDelete::decode(value).ok()?;
            init_process(&event.container_id, &event.id)
                .then_some(TaskEvent::Ended(event.container_id))
        }
        _ => None,
    }
}

/// Whether an exit or delete concerns the task's init process rather than an exec in it
/// (`kubectl exec` ending must not look like the sandbox ending).
fn init_process(container_id: &str, exec_id: &str) -> bool {
    exec_id.is_empty() || exec_id == container_id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(namespace: &str, type_url: &str, value: Vec<u8>) -> Envelope {
        Envelope {
            timestamp: None,
            namespace: namespace.to_string(),
            topic: String::new(),
            event: Some(prost_types::Any {
                type_url: type_url.to_string(),
                value,
            }),
        }
    }

    #[test]
    fn task_events_of_the_cri_are_read() {
        let start = TaskStart {
            container_id: "sb1".into(),
            pid: 7,
        };
        assert_eq!(
            decode(&envelope(
                "k8s.io",
                "containerd.events.TaskStart",
                start.encode_to_vec()
            )),
            Some(TaskEvent::Started("sb1".into()))
        );
        let exit = TaskExit {
            container_id: "sb1".into(),
            id: "sb1".into(),
            ..Default::default()
        };
        assert_eq!(
            decode(&envelope(
                "k8s.io",
                "types.containerd.io/containerd.events.TaskExit",
                exit.encode_to_vec()
            )),
            Some(TaskEvent::Ended("sb1".into()))
        );
        let delete = TaskDelete {
            container_id: "sb1".into(),
            ..Default::default()
        };
        assert_eq!(
            decode(&envelope(
                "k8s.io",
                "containerd.events.TaskDelete",
                delete.encode_to_vec()
            )),
            Some(TaskEvent::Ended("sb1".into()))
        );
    }

    #[test]
    fn other_events_are_ignored() {
        // An exec ending in the sandbox is not the sandbox ending.
        let exec_exit = TaskExit {
            container_id: "sb1".into(),
            id: "exec-3".into(),
            ..Default::default()
        };
        assert_eq!(
            decode(&envelope(
                "k8s.io",
                "containerd.events.TaskExit",
                exec_exit.encode_to_vec()
            )),
            None
        );
        // Containers of other containerd namespaces are not Kubernetes'.
        let start = TaskStart {
            container_id: "x".into(),
            pid: 1,
        };
        assert_eq!(
            decode(&envelope(
                "default",
                "containerd.events.TaskStart",
                start.encode_to_vec()
            )),
            None
        );
        assert_eq!(
            decode(&envelope(
                "k8s.io",
                "containerd.events.TaskOOM",
                start.encode_to_vec()
            )),
            None
        );
        assert_eq!(
            decode(&envelope(
                "k8s.io",
                "containerd.events.TaskStart",
                vec![0xff, 0xff]
            )),
            None
        );
    }
}
