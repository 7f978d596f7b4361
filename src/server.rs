//! The operator's HTTP port: `/healthz` (alive), `/readyz` (listening and able to get an FCM
//! token), `/metrics` (Prometheus text).

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

async fn ready(State(h): State<Health>) -> Response {
    if !h.listen.all_up() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                json!({"ready": false, "reason": "the Firestore listen stream is not up yet"}),
            ),
        )
            .into_response();
    }
    if let Err(e) = h.sender.access_token().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "reason": crate::errors::Chain(&e).to_string()})),
        )
            .into_response();
    }
    axum::Json(json!({"ready": true})).into_response()
}

async fn metrics(State(h): State<Health>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.metrics.render(),
    )
        .into_response()
}
