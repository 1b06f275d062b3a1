//! The operator's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// State behind the endpoints.
#[derive(Clone)]
pub struct Health {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Not ready until [`Health::set_ready`] is called.
    #[must_use]
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks the process ready (API server reachable) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// The router, separate from [`serve`] so tests can call it without a socket.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.metrics.render(),
    )
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves the endpoints on `listener` until `shutdown` completes.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let req = Request::get(path).body(Body::empty()).expect("request");
        let resp = router.oneshot(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readyz_turns_ok_only_once_marked_ready_while_healthz_is_always_ok() {
        let health = Health::new(Metrics::new().expect("metrics"));
        assert_eq!(
            get(router(health.clone()), "/healthz").await.0,
            StatusCode::OK
        );
        assert_eq!(
            get(router(health.clone()), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.set_ready(true);
        assert_eq!(get(router(health), "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_the_operator_metrics() {
        let health = Health::new(Metrics::new().expect("metrics"));
        let (status, body) = get(router(health), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("wsgate_operator_reconcile_total"));
        assert!(body.contains("wsgate_operator_managed_wsclusters"));
    }
}
