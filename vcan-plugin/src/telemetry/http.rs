//! The HTTP endpoint: `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::telemetry::metrics::{Metrics, Snapshot};

/// Supplies the current state at scrape time and readiness.
pub trait StateSource: Send + Sync + 'static {
    /// The state now.
    fn snapshot(&self) -> Snapshot;

    /// Whether the plugin is registered and the node can create vcan interfaces. Probes call
    /// this often, so implementations should answer without reading the traffic counters.
    fn readiness(&self) -> (bool, bool) {
        let s = self.snapshot();
        (s.resources.iter().all(|r| r.registered), s.vcan_supported)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    source: Arc<dyn StateSource>,
}

async fn metrics_handler(State(app): State<AppState>) -> impl IntoResponse {
    let app2 = app.clone();
    // Reading BPF maps is blocking syscalls; keep it off the async workers.
    let body = tokio::task::spawn_blocking(move || app2.metrics.render(&app2.source.snapshot()))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    let source = app.source.clone();
    let now = tokio::task::spawn_blocking(move || source.readiness())
        .await
        .unwrap_or((false, false));
    match now {
        (true, true) => (StatusCode::OK, "ready\n".to_string()),
        (registered, vcan) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: registered={registered} vcan_supported={vcan}\n"),
        ),
    }
}

/// The HTTP routes: `/metrics`, `/healthz` (process alive) and `/readyz` (registered and able to
/// create vcan interfaces).
pub fn router(metrics: Arc<Metrics>, source: Arc<dyn StateSource>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, source })
}

/// Serves [`router`] on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    source: Arc<dyn StateSource>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics, source))
        .with_graceful_shutdown(shutdown)
        .await
}
