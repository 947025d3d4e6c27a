//! `POST /{org}/{app}/token`: app tokens by `client_credentials`.
//!
//! Checks run in Easemob's documented order of messages: body shape, `grant_type`, presence of
//! `client_id` and `client_secret`, then whether they match. Other grant types (user tokens)
//! are not played and get 400 `unsupported_grant_type`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::Serialize;
use serde_json::Value;

use super::error::{ApiError, EasemobError};
use super::state::{SandboxState, Timing};
use super::wire::json_body;

/// The 200 body.
#[derive(Debug, Serialize)]
pub struct TokenResponse {
    /// The bearer token.
    pub access_token: String,
    /// Lifetime in seconds (0 = never expires).
    pub expires_in: i64,
    /// Application uuid.
    pub application: String,
}

/// Issues an app token.
pub async fn issue_token(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<TokenResponse>, ApiError> {
    let request = json_body(&headers, &body).map_err(|e| state.reject(&timing, e))?;
    let config = state.config();
    let ttl = check_token_request(&request, &config.client_id, config.client_secret.expose())
        .map_err(|e| state.reject(&timing, e))?
        .unwrap_or(config.token_ttl_secs);
    let access_token = state.issue_token(ttl);
    Ok(Json(TokenResponse { access_token, expires_in: ttl, application: state.application().to_owned() }))
}

/// Validates a token request; `Ok(Some(ttl))` when the request asks for its own lifetime.
pub fn check_token_request(request: &Value, client_id: &str, client_secret: &str) -> Result<Option<i64>, EasemobError> {
    let Some(fields) = request.as_object() else {
        return Err(EasemobError::IllegalArgument("request body must be a JSON object".into()));
    };
    match fields.get("grant_type").and_then(Value::as_str) {
        None => {
            return Err(EasemobError::IllegalArgument("grant_type must be provided.".into()));
        }
        Some("client_credentials") => {}
        Some(other) => return Err(EasemobError::UnsupportedGrantType(other.to_owned())),
    }
    let given_id = fields
        .get("client_id")
        .and_then(Value::as_str)
        .ok_or_else(|| EasemobError::IllegalArgument("client_id must be provided.".into()))?;
    let given_secret = fields
        .get("client_secret")
        .and_then(Value::as_str)
        .ok_or_else(|| EasemobError::IllegalArgument("client_secret must be provided".into()))?;
    if given_id != client_id {
        return Err(EasemobError::InvalidGrant("client_id does not match"));
    }
    if given_secret != client_secret {
        return Err(EasemobError::InvalidGrant("client_secret does not match"));
    }
    parse_ttl(fields.get("ttl"))
}

/// `ttl` as a number or a numeric string (one Easemob doc example sends a string), in seconds.
pub fn parse_ttl(ttl: Option<&Value>) -> Result<Option<i64>, EasemobError> {
    let seconds = match ttl {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(number)) => number.as_i64(),
        Some(Value::String(text)) => text.trim().parse::<i64>().ok(),
        Some(_) => None,
    };
    match seconds {
        Some(seconds) if seconds >= 0 => Ok(Some(seconds)),
        _ => Err(EasemobError::IllegalArgument("ttl must be a non-negative integer number of seconds".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(request: Value) -> Result<Option<i64>, EasemobError> {
        check_token_request(&request, "id", "secret")
    }

    #[test]
    fn a_correct_request_is_accepted_with_or_without_ttl() {
        let base = json!({"grant_type": "client_credentials", "client_id": "id", "client_secret": "secret"});
        assert_eq!(check(base), Ok(None));
        let with_ttl =
            json!({"grant_type": "client_credentials", "client_id": "id", "client_secret": "secret", "ttl": "1024000"});
        assert_eq!(check(with_ttl), Ok(Some(1_024_000)));
    }

    #[test]
    fn wrong_credentials_are_an_invalid_grant() {
        let wrong_id = json!({"grant_type": "client_credentials", "client_id": "x", "client_secret": "secret"});
        assert_eq!(check(wrong_id), Err(EasemobError::InvalidGrant("client_id does not match")));
        let wrong_secret = json!({"grant_type": "client_credentials", "client_id": "id", "client_secret": "x"});
        assert_eq!(check(wrong_secret), Err(EasemobError::InvalidGrant("client_secret does not match")));
    }

    #[test]
    fn missing_fields_are_illegal_arguments() {
        let missing_secret = json!({"grant_type": "client_credentials", "client_id": "id"});
        assert_eq!(check(missing_secret), Err(EasemobError::IllegalArgument("client_secret must be provided".into())));
        assert!(matches!(check(json!({"client_id": "id"})), Err(EasemobError::IllegalArgument(_))));
        assert!(matches!(check(json!([1])), Err(EasemobError::IllegalArgument(_))));
        assert!(matches!(check(json!({"grant_type": "password"})), Err(EasemobError::UnsupportedGrantType(_))));
    }

    #[test]
    fn ttl_accepts_numbers_and_numeric_strings_only() {
        assert_eq!(parse_ttl(Some(&json!(60))), Ok(Some(60)));
        assert_eq!(parse_ttl(Some(&json!(" 60 "))), Ok(Some(60)));
        assert_eq!(parse_ttl(Some(&json!(0))), Ok(Some(0)));
        assert_eq!(parse_ttl(None), Ok(None));
        assert!(parse_ttl(Some(&json!(-1))).is_err());
        assert!(parse_ttl(Some(&json!(1.5))).is_err());
        assert!(parse_ttl(Some(&json!("soon"))).is_err());
        assert!(parse_ttl(Some(&json!(true))).is_err());
    }
}
