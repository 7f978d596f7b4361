//! The operator's HTTP port: `/healthz` (alive), `/readyz` (caught up with both collections
//! and able to get an FCM token), `/metrics` (Prometheus text, with the readiness as `ffpush_ready`).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::fcm::Sender;
use crate::intake::ListenState;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    pub listen: Arc<ListenState>,
    pub sender: Arc<Sender>,
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// What `/readyz` checks: both listen streams have handed their collection's current documents
/// to the worker (at start: the whole replay), and an FCM access token is obtainable. The
/// startup probe in `deploy/service.yaml` asks this, so a rollout retires the old revision
/// only once the new one is caught up.
async fn readiness(h: &Health) -> Result<(), String> {
    if !h.listen.all_up() {
        return Err(
            "the Firestore listen streams have not caught up yet (replaying the collections)"
                .to_string(),
        );
    }
    h.sender
        .access_token()
        .await
        .map(|_| ())
        .map_err(|e| crate::errors::Chain(&e).to_string())
}

async fn ready(State(h): State<Health>) -> Response {
    match readiness(&h).await {
        Ok(()) => axum::Json(json!({"ready": true})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

async fn metrics(State(h): State<Health>) -> Response {
    // Bounded so that a hanging token endpoint cannot stall the scrape: that counts as not ready.
    let ready = tokio::time::timeout(std::time::Duration::from_secs(5), readiness(&h))
        .await
        .is_ok_and(|r| r.is_ok());
    h.metrics.ready.set(u64::from(ready));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.metrics.render(),
    )
        .into_response()
}
