//! The HTTP side: /metrics, /healthz and /readyz on one axum router.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::State as Extract,
    http::{
        header::{ACCEPT, CONTENT_TYPE},
        HeaderMap, StatusCode,
    },
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus_client::registry::Registry;

use super::{
    exposition::{render, Format},
    health::{liveness, readiness, Verdict},
    state::State,
};

/// What the handlers read.
#[derive(Debug)]
pub struct Shared {
    pub registry: Registry,
    pub state: Arc<Mutex<State>>,
    pub started: Instant,
    pub interval: Duration,
}

/// The routes of the endpoint.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

async fn index() -> &'static str {
    "observer: /metrics (Prometheus, OpenMetrics), /healthz, /readyz\n"
}

async fn metrics(Extract(shared): Extract<Arc<Shared>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(ACCEPT).and_then(|v| v.to_str().ok()));
    match render(&shared.registry, format) {
        Ok(body) => ([(CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "observer could not encode its metrics\n",
        )
            .into_response(),
    }
}

async fn healthz(Extract(shared): Extract<Arc<Shared>>) -> Response {
    let own = shared
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .own
        .clone();
    answer(liveness(
        &own,
        shared.started,
        shared.interval,
        Instant::now(),
    ))
}

async fn readyz(Extract(shared): Extract<Arc<Shared>>) -> Response {
    let own = shared
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .own
        .clone();
    answer(readiness(&own))
}

/// 200 or 503, with the verdict's sentence as a plain-text body.
fn answer(v: Verdict) -> Response {
    let status = if v.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{}\n", v.message)).into_response()
}
