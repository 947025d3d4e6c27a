//! The sandbox's router and the gate in front of the Easemob endpoints.
//!
//! The gate (one middleware for every request, fallbacks included) does what Easemob does before
//! an endpoint runs: count the request, apply injected faults, check the App Key, rate-limit and
//! authenticate (see [`SandboxState::admit`]). Handlers then only deal with their resource.
//! Unknown routes and wrong methods get Easemob-shaped 404/405 `web_application` errors rather
//! than axum's empty answers.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::error::{ApiError, EasemobError};
use super::state::{SandboxState, Timing};
use super::{contacts, control, exception_cache, token, users};

/// Path prefix of the sandbox's own endpoints.
const CONTROL_PREFIX: &str = "/_sandbox/";

/// Every route of the sandbox, Easemob's and its own.
pub fn router(state: Arc<SandboxState>) -> Router {
    Router::new()
        .route("/{org}/{app}/token", post(token::issue_token))
        .route("/{org}/{app}/users", post(users::register_users))
        .route("/{org}/{app}/users/{username}", get(users::get_user).delete(users::delete_user))
        .route("/{org}/{app}/users/{username}/contacts/users", get(contacts::list_friends))
        .route(
            "/{org}/{app}/users/{username}/contacts/users/{friend}",
            post(contacts::add_friend).delete(contacts::remove_friend),
        )
        .route("/{org}/{app}/callbacks/storage/info", get(exception_cache::info))
        .route("/{org}/{app}/callbacks/storage/retry", post(exception_cache::retry))
        .route("/_sandbox/stats", get(control::get_stats))
        .route("/_sandbox/callbacks", get(control::list_callbacks))
        .route("/_sandbox/faults", post(control::inject_faults))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(Arc::clone(&state), gate))
        .with_state(state)
}

/// Admits or refuses a request before it reaches a handler, and starts its [`Timing`].
async fn gate(State(state): State<Arc<SandboxState>>, mut request: Request, next: Next) -> Response {
    if request.uri().path().starts_with(CONTROL_PREFIX) {
        return next.run(request).await;
    }
    let timing = Timing { start_ms: state.clock().now_ms() };
    let authorization = request.headers().get(AUTHORIZATION).and_then(|value| value.to_str().ok());
    if let Err(error) = state.admit(request.method().as_str(), request.uri().path(), authorization) {
        return state.reject(&timing, error).into_response();
    }
    request.extensions_mut().insert(timing);
    next.run(request).await
}

async fn route_not_found(State(state): State<Arc<SandboxState>>, timing: Timing) -> ApiError {
    state.reject(&timing, EasemobError::RouteNotFound)
}

async fn method_not_allowed(State(state): State<Arc<SandboxState>>, timing: Timing) -> ApiError {
    state.reject(&timing, EasemobError::MethodNotAllowed)
}
