//! `/_sandbox/...`: the sandbox's own control and inspection endpoints. They are not Easemob
//! endpoints, so they bypass the App Key check, authentication, the rate limit, injected faults
//! and the request counter.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;

use super::callbacks::CallbackRecord;
use super::error::{ApiError, EasemobError};
use super::faults::InjectedFault;
use super::state::{SandboxState, SandboxStats, Timing};

/// `GET /_sandbox/stats`.
pub async fn get_stats(State(state): State<Arc<SandboxState>>) -> Json<SandboxStats> {
    Json(state.stats())
}

/// `GET /_sandbox/callbacks`: records in generation order.
pub async fn list_callbacks(State(state): State<Arc<SandboxState>>) -> Json<Vec<CallbackRecord>> {
    Json(state.callback_records())
}

/// `POST /_sandbox/faults` with an [`InjectedFault`] body; answers with the queued fault.
pub async fn inject_faults(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    body: Bytes,
) -> Result<Json<InjectedFault>, ApiError> {
    let fault: InjectedFault = serde_json::from_slice(&body)
        .map_err(|error| state.reject(&timing, EasemobError::JsonParse(error.to_string())))?;
    state.inject_fault(fault.clone()).map_err(|reason| state.reject(&timing, EasemobError::IllegalArgument(reason)))?;
    Ok(Json(fault))
}
