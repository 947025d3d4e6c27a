//! Easemob's error responses: which HTTP status, `error` type, Java `exception` class and
//! `error_description` text each failure gets, and the five-field body they share.
//!
//! The texts are the documented ones (reference §2, §3, §5, §7). The `exception` class names are
//! only documented for a few cases; the others are plausible placeholders, which is harmless
//! because clients read `error` and `error_description` only.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A failure the sandbox answers the way Easemob would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EasemobError {
    /// 400 `illegal_argument` with a request-specific description.
    IllegalArgument(String),
    /// 400 `invalid_grant`: wrong `client_id` or `client_secret`.
    InvalidGrant(&'static str),
    /// 400 `unsupported_grant_type`: the token endpoint only plays `client_credentials`.
    UnsupportedGrantType(String),
    /// 400 `json_parse`: the body is not JSON.
    JsonParse(String),
    /// 400 `duplicate_unique_property_exists`: registering a username that exists.
    DuplicateUsername { application: String, username: String },
    /// 401 `unauthorized`: token missing, unknown or expired.
    Unauthorized,
    /// 401 `auth_bad_access_token`: the token is not even shaped like one of ours.
    CorruptToken,
    /// 403 `exceed_limit`: owner or friend already has the maximum number of friends.
    ExceedLimit,
    /// 404 `service_resource_not_found`: a user in the path does not exist.
    ResourceNotFound,
    /// 404 `organization_application_not_found`: unknown `{org}/{app}`.
    AppNotFound { org: String, app: String, uri_path: String },
    /// 404 `web_application`: no such route (Easemob's JAX-RS layer answers this way).
    RouteNotFound,
    /// 405 `web_application`: the route exists but not with this method.
    MethodNotAllowed,
    /// 415 `web_application`: a JSON body without `Content-Type: application/json`.
    UnsupportedMediaType,
    /// 429 `reach_limit`: the App Key's per-second request budget is spent.
    ReachLimit,
    /// 403 `service_not_enabled`: the exception cache is a paid add-on, off
    /// (`--exception-cache false`). Easemob documents the 403, not its error type.
    ServiceNotEnabled,
    /// 429 `resource_limited`: the plan's limit (more than 100 users on the free plan).
    ResourceLimited,
    /// A status forced by `POST /_sandbox/faults`, with Easemob's body for that status, or for
    /// the error type the fault names.
    Injected(StatusCode, Option<String>),
}

/// The body every Easemob error response has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    /// Error type, e.g. `unauthorized`.
    pub error: String,
    /// Java exception class of the server; informational.
    pub exception: String,
    /// When the error was produced (ms since epoch, from the injected clock).
    pub timestamp: i64,
    /// How long the request took (ms, from the injected clock).
    pub duration: i64,
    /// Human-readable text; the one field the official SDKs read.
    pub error_description: String,
}

const SECURITY_EXCEPTION: &str = "org.apache.usergrid.rest.exceptions.SecurityException";
const WEB_APPLICATION_EXCEPTION: &str = "javax.ws.rs.WebApplicationException";

impl EasemobError {
    /// The HTTP status Easemob uses for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::IllegalArgument(_)
            | Self::InvalidGrant(_)
            | Self::UnsupportedGrantType(_)
            | Self::JsonParse(_)
            | Self::DuplicateUsername { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized | Self::CorruptToken => StatusCode::UNAUTHORIZED,
            Self::ExceedLimit | Self::ServiceNotEnabled => StatusCode::FORBIDDEN,
            Self::ResourceNotFound | Self::AppNotFound { .. } | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::ReachLimit | Self::ResourceLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Injected(status, _) => *status,
        }
    }

    /// `(error, exception, error_description)` for this failure.
    fn parts(&self) -> (String, &'static str, String) {
        match self {
            Self::IllegalArgument(text) => {
                ("illegal_argument".into(), "java.lang.IllegalArgumentException", text.clone())
            }
            Self::InvalidGrant(text) => (
                "invalid_grant".into(),
                "org.apache.usergrid.rest.exceptions.OAuthProblemException",
                (*text).to_owned(),
            ),
            Self::UnsupportedGrantType(grant) => (
                "unsupported_grant_type".into(),
                "org.apache.usergrid.rest.exceptions.OAuthProblemException",
                format!("unsupported grant_type: {grant}"),
            ),
            Self::JsonParse(detail) => (
                "json_parse".into(),
                "org.codehaus.jackson.JsonParseException",
                format!("Unexpected character ({detail})"),
            ),
            Self::DuplicateUsername { application, username } => (
                "duplicate_unique_property_exists".into(),
                "org.apache.usergrid.persistence.exceptions.DuplicateUniquePropertyExistsException",
                format!(
                    "Application {application} Entity user requires that property named username be unique, value of {username} exists"
                ),
            ),
            Self::Unauthorized => {
                ("unauthorized".into(), SECURITY_EXCEPTION, "Unable to authenticate due to expired access token".into())
            }
            Self::CorruptToken => (
                "auth_bad_access_token".into(),
                SECURITY_EXCEPTION,
                "Unable to authenticate due to corrupt access token".into(),
            ),
            Self::ExceedLimit => {
                ("exceed_limit".into(), "EasemobForbiddenOpException", "user contact number exceed limit".into())
            }
            Self::ServiceNotEnabled => (
                "service_not_enabled".into(),
                "EasemobForbiddenOpException",
                "the callback exception cache is not enabled for this app".into(),
            ),
            Self::ResourceNotFound => {
                ("service_resource_not_found".into(), "UserNotFoundException", "Service resource not found".into())
            }
            Self::AppNotFound { org, app, uri_path } => (
                "organization_application_not_found".into(),
                "org.apache.usergrid.rest.exceptions.OrganizationApplicationNotFoundException",
                format!("Could not find application for {org}/{app} from URI: {uri_path}"),
            ),
            Self::RouteNotFound => ("web_application".into(), WEB_APPLICATION_EXCEPTION, "HTTP 404 Not Found".into()),
            Self::MethodNotAllowed => {
                ("web_application".into(), WEB_APPLICATION_EXCEPTION, "HTTP 405 Method Not Allowed".into())
            }
            Self::UnsupportedMediaType => {
                ("web_application".into(), WEB_APPLICATION_EXCEPTION, "Unsupported Media Type".into())
            }
            Self::ReachLimit => (
                "reach_limit".into(),
                "EasemobServiceUnavailableException",
                "This request has reached api limit".into(),
            ),
            Self::ResourceLimited => (
                "resource_limited".into(),
                "EasemobServiceUnavailableException",
                "You have exceeded the limit of the community edition,Please upgrade to the enterprise edition".into(),
            ),
            Self::Injected(status, error) => injected_parts(*status, error.as_deref()),
        }
    }

    /// The five-field body, stamped with the given times.
    pub fn body(&self, timestamp: i64, duration: i64) -> ErrorBody {
        let (error, exception, error_description) = self.parts();
        ErrorBody { error, exception: exception.to_owned(), timestamp, duration, error_description }
    }

    /// Ready to return from a handler.
    pub fn at(self, timestamp: i64, duration: i64) -> ApiError {
        ApiError { status: self.status(), body: self.body(timestamp, duration) }
    }
}

/// Easemob's body for a status that a test forces: the documented error for the error type the
/// test names or else for the status, a generic one for the rest.
fn injected_parts(status: StatusCode, error: Option<&str>) -> (String, &'static str, String) {
    let documented = match (status.as_u16(), error) {
        (429, Some("resource_limited")) => Some(EasemobError::ResourceLimited),
        (_, Some(_)) => None,
        (400, None) => Some(EasemobError::IllegalArgument("illegal argument".into())),
        (401, None) => Some(EasemobError::Unauthorized),
        (403, None) => Some(EasemobError::ExceedLimit),
        (404, None) => Some(EasemobError::ResourceNotFound),
        (415, None) => Some(EasemobError::UnsupportedMediaType),
        (429, None) => Some(EasemobError::ReachLimit),
        _ => None,
    };
    if let Some(error) = documented {
        return error.parts();
    }
    // Generic: the error type the fault names, or one made from the status's reason phrase.
    let reason = status.canonical_reason().unwrap_or("Unknown Status");
    let error = error.map_or_else(|| reason.to_ascii_lowercase().replace([' ', '-'], "_"), str::to_owned);
    let exception = if status.is_server_error() { "java.lang.RuntimeException" } else { WEB_APPLICATION_EXCEPTION };
    (error, exception, reason.to_owned())
}

/// An error response: status plus Easemob's body.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_errors_have_the_documented_type_and_text() {
        let cases = [
            (EasemobError::Unauthorized, 401, "unauthorized", "Unable to authenticate due to expired access token"),
            (EasemobError::ExceedLimit, 403, "exceed_limit", "user contact number exceed limit"),
            (EasemobError::ResourceNotFound, 404, "service_resource_not_found", "Service resource not found"),
            (EasemobError::ReachLimit, 429, "reach_limit", "This request has reached api limit"),
            (
                EasemobError::InvalidGrant("client_secret does not match"),
                400,
                "invalid_grant",
                "client_secret does not match",
            ),
        ];
        for (error, status, kind, text) in cases {
            assert_eq!(error.status().as_u16(), status);
            let body = error.body(7, 1);
            assert_eq!(body.error, kind);
            assert_eq!(body.error_description, text);
            assert_eq!((body.timestamp, body.duration), (7, 1));
        }
    }

    #[test]
    fn unknown_app_names_the_uri() {
        let error = EasemobError::AppNotFound { org: "o".into(), app: "a".into(), uri_path: "o/a/token".into() };
        assert_eq!(error.body(0, 0).error_description, "Could not find application for o/a from URI: o/a/token");
    }

    #[test]
    fn injected_statuses_reuse_documented_bodies_and_fall_back_to_the_reason() {
        let body = EasemobError::Injected(StatusCode::TOO_MANY_REQUESTS, None).body(0, 0);
        assert_eq!(body.error, "reach_limit");
        let body = EasemobError::Injected(StatusCode::SERVICE_UNAVAILABLE, None).body(0, 0);
        assert_eq!(body.error, "service_unavailable");
        assert_eq!(body.error_description, "Service Unavailable");
        let body = EasemobError::Injected(StatusCode::INTERNAL_SERVER_ERROR, None).body(0, 0);
        assert_eq!(body.error, "internal_server_error");
        let body = EasemobError::Injected(StatusCode::TOO_MANY_REQUESTS, Some("resource_limited".into())).body(0, 0);
        assert_eq!(body.error, "resource_limited");
        assert!(body.error_description.contains("community edition"), "{}", body.error_description);
    }

    #[test]
    fn the_body_has_exactly_the_five_easemob_fields() {
        let value = serde_json::to_value(EasemobError::Unauthorized.body(1, 2)).expect("serialises");
        let mut keys: Vec<&str> = value.as_object().expect("object").keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["duration", "error", "error_description", "exception", "timestamp"]);
    }
}
