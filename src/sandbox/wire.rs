//! Response shapes Easemob's user and contact endpoints share, and the JSON body reader that
//! answers bad input with Easemob's errors instead of axum's.
//!
//! Bodies are typed structs so the fields come out in the documented order, and optional fields
//! are left out rather than sent as `null` (the add-friend body has no `data` and no `count`).

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use serde::Serialize;
use serde_json::Value;

use super::error::EasemobError;
use super::state::User;

/// A user entity as the user and contact endpoints return it.
#[derive(Debug, Clone, Serialize)]
pub struct UserEntity {
    /// Entity uuid.
    pub uuid: String,
    /// Always `user`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Creation time, ms.
    pub created: i64,
    /// Last modification time, ms.
    pub modified: i64,
    /// Lower-case username.
    pub username: String,
    /// `false` would mean banned; the sandbox bans nobody.
    pub activated: bool,
    /// Present only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nickname: Option<String>,
}

impl UserEntity {
    /// The entity of `user`, registered as `username`.
    pub fn of(username: &str, user: &User) -> Self {
        Self {
            uuid: user.uuid.clone(),
            kind: "user",
            created: user.created,
            modified: user.modified,
            username: username.to_owned(),
            activated: true,
            nickname: user.nickname.clone(),
        }
    }
}

/// The success envelope: `action`, `application`, `path`, `uri`, `entities`, optional `data`,
/// `timestamp`, `duration`, `organization`, `applicationName`, optional `count`.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    /// Lower-case HTTP verb.
    pub action: &'static str,
    /// Application uuid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
    /// Request path relative to the app.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Full URL.
    pub uri: String,
    /// Entities concerned.
    pub entities: Vec<UserEntity>,
    /// Endpoint-specific extra data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Response time, ms (injected clock).
    pub timestamp: i64,
    /// Request duration, ms (injected clock).
    pub duration: i64,
    /// Organisation name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    /// App name.
    #[serde(rename = "applicationName", skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// Number of items, for list and get endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
}

/// Reads a JSON request body the way Easemob does: 415 without a JSON content type, 400
/// `json_parse` when the bytes are not JSON.
pub fn json_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, EasemobError> {
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(EasemobError::UnsupportedMediaType);
    }
    serde_json::from_slice(body).map_err(|error| EasemobError::JsonParse(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn json_headers(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn json_with_a_charset_is_accepted() {
        let value = json_body(&json_headers("application/json; charset=utf-8"), &Bytes::from_static(b"{\"a\":1}"));
        assert_eq!(value, Ok(serde_json::json!({"a": 1})));
    }

    #[test]
    fn a_missing_content_type_is_unsupported_and_bad_json_is_a_parse_error() {
        assert_eq!(json_body(&HeaderMap::new(), &Bytes::from_static(b"{}")), Err(EasemobError::UnsupportedMediaType));
        let error = json_body(&json_headers("application/json"), &Bytes::from_static(b"{oops"));
        assert!(matches!(error, Err(EasemobError::JsonParse(_))));
    }

    #[test]
    fn entities_leave_out_an_unset_nickname() {
        let user = User { uuid: "u".into(), created: 1, modified: 2, nickname: None, friends: Default::default() };
        let value = serde_json::to_value(UserEntity::of("bob", &user)).expect("serialises");
        assert!(value.get("nickname").is_none());
        assert_eq!(value["type"], "user");
        assert_eq!(value["activated"], true);
    }
}
