//! `GET /healthz` (the process is up) and `GET /readyz` (the database reads and the writer commits;
//! also how many requests the quarantine holds).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::app::SharedState;
use crate::metrics::CallbackResult;

/// Routes of this module.
pub fn router() -> axum::Router<SharedState> {
    axum::Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<SharedState>) -> Response {
    let read = state.store.probe_read().await.err().map(|e| e.to_string());
    let write = match state.store.probe_write().await {
        Ok(()) => state.store.writer_health().last_error(),
        Err(e) => Some(e.to_string()),
    };
    let ready = read.is_none() && write.is_none();
    // Held requests are not a readiness problem, but they are events not stored yet: showing them
    // here is how a wrong secret gets noticed. The count walks the partial index of held rows
    // (bounded by --quarantine-cap); null if it could not be read.
    let held = state.store.count_quarantine_held().await.ok();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": { "read": read.as_deref().unwrap_or("ok"), "write": write.as_deref().unwrap_or("ok") },
        "quarantine": {
            "held": held,
            "quarantined_since_start": state.metrics.callbacks(CallbackResult::Quarantined),
        },
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}
