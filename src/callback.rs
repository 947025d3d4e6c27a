//! Parsing an Easemob post-send callback body into a typed event. Pure; no I/O.
//!
//! STUB: to be implemented; the types and signatures below are fixed.

/// The fields friendhook reads from a callback body. The raw body itself is stored byte-exact
/// elsewhere, so anything not listed here is kept, just not interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCallback {
    /// `callId`.
    pub call_id: String,
    /// `msg_id`, if present.
    pub msg_id: Option<String>,
    /// `appkey` (`org#app`), if present.
    pub appkey: Option<String>,
    /// `eventType` (`chat`, `chat_offline`).
    pub event_type: Option<String>,
    /// `chat_type` (`roster` for friend events).
    pub chat_type: Option<String>,
    /// `payload.operation` (`add`, `remove`, `accept`, ...), if the payload has one.
    pub operation: Option<String>,
    /// `from` with the JID decoration (`{appkey}_` prefix, `@domain` suffix) removed.
    pub from_user: Option<String>,
    /// `to`, normalised the same way.
    pub to_user: Option<String>,
    /// `timestamp` as an integer (epoch ms).
    pub timestamp_ms: i64,
    /// `timestamp` exactly as written in the body (the signature covers this text).
    pub timestamp_text: String,
    /// `security`, if present.
    pub security: Option<String>,
    /// The deduplication key, see [`dedup_key`].
    pub dedup_key: String,
}

/// Why a body could not be parsed. Each maps to a 400 with `code()` and `detail()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not valid JSON (includes invalid UTF-8, truncation, nesting too deep, duplicate keys).
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// Valid JSON but not an object.
    #[error("body must be a JSON object")]
    NotObject,
    /// A required field is absent.
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong type or an impossible value.
    #[error("invalid field `{field}`: {detail}")]
    InvalidField {
        /// The JSON field name.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl ParseError {
    /// Stable machine code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            ParseError::NotJson(_) => "invalid_json",
            ParseError::NotObject => "invalid_json",
            ParseError::MissingField(_) => "missing_field",
            ParseError::InvalidField { .. } => "invalid_field",
        }
    }
}

/// Parses a callback body. `require_security`: the easemob scheme needs `security`.
pub fn parse(body: &[u8], require_security: bool) -> Result<ParsedCallback, ParseError> {
    let _ = (body, require_security);
    todo!("callback::parse")
}

/// Strips `{appkey}_` and `@domain` from a JID-form user; returns plain IDs unchanged.
pub fn normalize_user(raw: &str, appkey: Option<&str>) -> String {
    let _ = (raw, appkey);
    todo!()
}

/// The deduplication key: (callId, eventType, to, payload.operation), unambiguously encoded.
pub fn dedup_key(call_id: &str, event_type: Option<&str>, to: Option<&str>, operation: Option<&str>) -> String {
    let _ = (call_id, event_type, to, operation);
    todo!()
}
