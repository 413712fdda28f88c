//! gRPC channels over Unix sockets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Longest any single call to the kubelet's PodResources or the runtime may take: a server that
/// accepts connections but never answers must not hold a PreStart (the kubelet gives it 30 s)
/// or a reconcile pass.
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// A channel to the gRPC server on the Unix socket `path`, connected on first use and reconnected
/// after the server restarts; every call on it fails after `deadline`.
pub fn lazy_channel(path: &Path, deadline: Duration) -> Channel {
    let path: PathBuf = path.to_path_buf();
    // The URI is required by tonic but unused: the connector below decides where to dial.
    Endpoint::from_static("http://[::]:50051")
        .timeout(deadline)
        .connect_timeout(deadline)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
}

/// A channel to `path`, connected now: fails if nothing listens there.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// A gRPC status as one readable phrase, for error messages.
pub fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
