//! The one error type of the HTTP API, rendered as `{"code": "...", "detail": "..."}`.
//!
//! Handlers return `Result<_, ApiError>`. Client errors carry a detail that tells the caller what
//! to change; server errors log their whole cause chain and answer a generic detail, so internals
//! (paths, SQL, secrets) never reach a response body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An API error: status, stable machine code, human detail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or invalid.
    #[error("{detail}")]
    BadRequest {
        /// Stable machine code.
        code: &'static str,
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// 401: the callback failed verification. Deliberately says nothing about which check.
    #[error("signature verification failed")]
    Unauthorized,
    /// 403: the source address is not allowed.
    #[error("source address not allowed (see --allow-from and --trusted-proxy; the service log names the address)")]
    Forbidden,
    /// 404: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 409: conflicting state (e.g. an idempotency key still in flight).
    #[error("{detail}")]
    Conflict {
        /// Stable machine code.
        code: &'static str,
        /// What is going on.
        detail: String,
    },
    /// 413: body over the configured limit.
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// 415: the body is not declared as JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but semantically unacceptable.
    #[error("{detail}")]
    Unprocessable {
        /// Stable machine code.
        code: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// 503: the service cannot do it right now (write queue full, database fault, no Easemob token,
    /// another report running, stopping); `retry_after_secs` says whether and when to retry.
    #[error("{detail}")]
    Unavailable {
        /// Stable machine code.
        code: &'static str,
        /// What is going on.
        detail: String,
        /// Seconds to wait before retrying, sent as `Retry-After`; 0 sends none (for an answer
        /// that must not be retried as it is).
        retry_after_secs: u32,
    },
    /// 502: Easemob did not give a usable answer to a request friendhook made on the caller's
    /// behalf (it failed, or answered something unreadable).
    #[error("{detail}")]
    BadGateway {
        /// Stable machine code.
        code: &'static str,
        /// What Easemob answered, and what to do.
        detail: String,
    },
    /// 500: a bug or an unexpected fault; logged with its cause, answered generically.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    detail: &'a str,
}

impl ApiError {
    /// Shorthand for a 400.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest { code, detail: detail.into() }
    }

    /// Shorthand for a 500 from any error.
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(err.into())
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway { .. } => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict { code, .. } => code,
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unprocessable { code, .. } => code,
            ApiError::Unavailable { code, .. } => code,
            ApiError::BadGateway { code, .. } => code,
            ApiError::Internal(_) => "internal",
        }
    }

    /// The `detail` a client is shown. An internal error is logged with its cause here and shown
    /// as a pointer to the log: its text may name files or queries.
    pub fn public_detail(&self) -> String {
        match self {
            ApiError::Internal(err) => {
                tracing::error!(error = format!("{err:#}"), "internal error while handling a request");
                "internal error; see the service log".to_string()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = self.public_detail();
        let mut response = (status, Json(ErrorBody { code: self.code(), detail: &detail })).into_response();
        if let ApiError::Unavailable { retry_after_secs, .. } = &self
            && *retry_after_secs > 0
        {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        // The call the key names is still running: asked again in a moment, the key answers
        // with its record once the outcome is in.
        if let ApiError::Conflict { code: "idempotency_in_flight", .. } = &self {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(2));
        }
        response
    }
}

/// Renders a plain `{"code","detail"}` response; for middleware that has no `ApiError` at hand.
pub fn error_response(status: StatusCode, code: &str, detail: &str) -> Response {
    (status, Json(ErrorBody { code, detail })).into_response()
}

#[cfg(test)]
mod conflict_tests {
    use super::*;

    #[test]
    fn a_key_still_running_says_when_to_ask_again() {
        let in_flight = ApiError::Conflict { code: "idempotency_in_flight", detail: "running".into() }.into_response();
        assert_eq!(in_flight.status(), StatusCode::CONFLICT);
        assert_eq!(in_flight.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap()), Some("2"));
        let other = ApiError::Conflict { code: "cursor_mismatch", detail: "another database".into() }.into_response();
        assert!(other.headers().get(header::RETRY_AFTER).is_none(), "asking again does not mend it");
    }
}
