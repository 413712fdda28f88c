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
    // The URI is required by tonic but unused: the connector below decides where to dial.
    Endpoint::from_static("http://[::]:50051")
        .timeout(deadline)
        .connect_timeout(deadline)
        .connect_with_connector_lazy(dial(path))
}

/// A channel to the gRPC server on the Unix socket `path` for long-lived streams: connected on
/// first use within [`CALL_DEADLINE`], calls without a deadline.
pub fn lazy_stream_channel(path: &Path) -> Channel {
    Endpoint::from_static("http://[::]:50051")
        .connect_timeout(CALL_DEADLINE)
        .connect_with_connector_lazy(dial(path))
}

/// A channel to `path`, connected now: fails if nothing listens there.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(dial(path))
        .await
}

/// A connector that dials the Unix socket `path` whatever URI tonic asks for.
fn dial(
    path: &Path,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<tokio::net::UnixStream>>> + Send,
> + Clone
+ Send
+ 'static {
    let path: PathBuf = path.to_path_buf();
    tower::service_fn(move |_| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok(TokioIo::new(stream))
        }
    })
}

/// A gRPC status as one readable phrase, for error messages.
pub fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
