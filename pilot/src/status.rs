//! Pilot's HTTP port (15014): `/ready`, `/metrics` (Prometheus),
//! `/debug/syncz` (per proxy: subscriptions, sent and acknowledged
//! versions, SYNCED/STALE/NACKED), `/debug/configz` (the validated
//! config pilot is serving), and the dashboard (`/dashboard`, `/api/*`).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use crate::Pilot;

pub fn router(pilot: Arc<Pilot>) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug/syncz", get(syncz))
        .route("/debug/configz", get(configz))
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/dashboard") }),
        )
        .route("/dashboard", get(crate::dashboard::page))
        .route("/api/graph", get(crate::dashboard::graph))
        .route("/api/services", get(crate::dashboard::services))
        .route("/api/proxies", get(crate::dashboard::proxies))
        .with_state(pilot)
}

async fn ready(State(p): State<Arc<Pilot>>) -> impl IntoResponse {
    if *p.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "config not loaded yet\n")
    }
}

async fn metrics(State(p): State<Arc<Pilot>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        p.metrics.render(),
    )
}

async fn syncz(State(p): State<Arc<Pilot>>) -> impl IntoResponse {
    Json(p.sync.snapshot())
}

async fn configz(State(p): State<Arc<Pilot>>) -> impl IntoResponse {
    let inputs = p.store.inputs();
    Json(json!({
        "services": inputs.services.values().map(|s| &**s).collect::<Vec<_>>(),
        "workloads": inputs.workloads.values().map(|w| &**w).collect::<Vec<_>>(),
        "config": inputs.config.values().map(|r| r.to_json()).collect::<Vec<_>>(),
        "namespaces": inputs.namespaces.values().map(|n| &**n).collect::<Vec<_>>(),
    }))
}
