//! The agent's HTTP endpoints on `agent.listen`: `/metrics`, `/health/live`, `/health/ready`
//! (the DaemonSet's probes), `/status` (JSON, read by `agent status`) and `/policy/datapath`
//! (JSON: the policy generation in force as the maps hold it, by service name). They read the
//! shared [`AgentState`] and render it through `telemetry`.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::{state::AgentState, telemetry::metrics};

pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/health/live", get(|| async { "live\n" }))
        .route("/health/ready", get(get_ready))
        .route("/status", get(get_status))
        .route("/policy/datapath", get(get_datapath_policy))
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AgentState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
}

async fn get_metrics(State(state): State<Arc<AgentState>>) -> Response {
    match state.report() {
        Ok(report) => match metrics::render(&report, &state.degrade_transitions()) {
            Ok(text) => ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], text).into_response(),
            Err(e) => unavailable(e),
        },
        Err(e) => unavailable(e),
    }
}

async fn get_ready(State(state): State<Arc<AgentState>>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        unavailable("not ready: programs not attached or policy not applied")
    }
}

async fn get_status(State(state): State<Arc<AgentState>>) -> Response {
    match state.report() {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn get_datapath_policy(State(state): State<Arc<AgentState>>) -> Response {
    let read = tokio::task::spawn_blocking(move || state.datapath().live_policy()).await;
    match read {
        Ok(Ok(policy)) => axum::Json(policy).into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(e) => unavailable(e),
    }
}
