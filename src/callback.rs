//! Parsing an Easemob post-send callback body into a typed event. Pure; no I/O.
//!
//! Owns the shape of a callback body: which fields are required (`callId`, `timestamp`; the
//! easemob scheme's verifier also needs `security`), which are read leniently (everything else; a wrong type
//! reads as absent, because Easemob's documented shapes disagree with each other, easemob-api.md
//! §10 item 6), how `from`/`to` lose their JID decoration, and the dedup key. It does not verify
//! the signature (see [`crate::signature`]) and does not store anything: the raw body is kept
//! byte-exact by the caller.
//!
//! The body is hostile until verified, so parsing is bounded: invalid UTF-8, nesting deeper than
//! serde_json's own limit, duplicate keys for the fields we read, and a `timestamp` whose text is
//! not a plain non-negative integer (bare or quoted) are all refused with an error, never a panic.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

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

    /// Human-readable detail for the JSON error body. It only describes the client's own body
    /// (serde_json positions, field names), never server state, so it is safe to send back.
    pub fn detail(&self) -> String {
        self.to_string()
    }
}

/// Deepest nesting accepted, counting the outer object as 1; the figure serde_json uses for its
/// recursion limit. serde_json only enforces its limit while building values: skipping an unknown
/// field or capturing a [`RawValue`] walks nesting of any depth (iteratively, so safely, but
/// without bound), so the limit is applied once to the whole body up front.
const MAX_NESTING: usize = 128;

/// Largest accepted `timestamp`: 13 digits of epoch milliseconds (until the year 2286). Anything
/// longer is not a time Easemob could have sent.
const MAX_TIMESTAMP_MS: u64 = 9_999_999_999_999;

/// The top-level fields we read, each captured as raw JSON text so that we decide how strict to be
/// field by field. A derived struct refuses a duplicate of any of these keys ("duplicate field"),
/// which matters because a duplicate `callId` or `timestamp` could make the signature check and the
/// stored event see different values. Everything else is skipped, including the documented
/// `securityVersion`, `group_id` and `host`: nothing downstream interprets them, and the raw body
/// (stored byte-exact by the caller) keeps them.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "callId", borrow)]
    call_id: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    security: Option<&'a RawValue>,
    #[serde(borrow)]
    msg_id: Option<&'a RawValue>,
    #[serde(borrow)]
    appkey: Option<&'a RawValue>,
    #[serde(rename = "eventType", borrow)]
    event_type: Option<&'a RawValue>,
    #[serde(borrow)]
    chat_type: Option<&'a RawValue>,
    #[serde(borrow)]
    from: Option<&'a RawValue>,
    #[serde(borrow)]
    to: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

/// The part of `payload` we read. `reason` (string in the examples, object in one table) and the
/// rest are skipped.
#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(borrow)]
    operation: Option<&'a RawValue>,
}

/// What a body that starts with a UTF-8 byte-order mark is told (serde would say "expected
/// value at line 1 column 1" of a character no editor shows); the trigger API says it too.
pub const STARTS_WITH_BOM: &str = "the body starts with a byte-order mark (bytes EF BB BF), which JSON does not allow";

/// Parses a callback body. `security` is read if it is a string and is `None` otherwise: whether
/// a callback without one is acceptable is the verifier's decision (the easemob scheme refuses it
/// as unauthenticated, a 401, not as unreadable), not the parser's.
pub fn parse(body: &[u8]) -> Result<ParsedCallback, ParseError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ParseError::NotJson(format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    if text.starts_with('\u{feff}') {
        return Err(ParseError::NotJson(format!(
            "{STARTS_WITH_BOM}; whatever adds it (a relay, a script writing the body) must send the JSON as it is"
        )));
    }
    if nesting_exceeds(text.as_bytes(), MAX_NESTING) {
        return Err(ParseError::NotJson(format!("nested deeper than {MAX_NESTING} levels")));
    }
    // A derived struct would also accept a JSON array (fields by position), so only an object
    // may reach it. Anything else is classified: broken JSON vs. JSON of the wrong kind.
    if text.trim_start_matches([' ', '\t', '\n', '\r']).as_bytes().first() != Some(&b'{') {
        return match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => Err(ParseError::NotObject),
            Err(e) => Err(ParseError::NotJson(e.to_string())),
        };
    }
    let fields: Fields<'_> = serde_json::from_str(text).map_err(|e| ParseError::NotJson(e.to_string()))?;

    let call_id = required_string(fields.call_id, "callId")?;
    if call_id.is_empty() {
        return Err(invalid("callId", "must not be empty"));
    }
    let (timestamp_ms, timestamp_text) = timestamp(fields.timestamp)?;
    let security = lenient_string(fields.security);
    let appkey = lenient_string(fields.appkey);
    let event_type = lenient_string(fields.event_type);
    let operation = operation(fields.payload)?;
    let msg_id = lenient_string(fields.msg_id);
    // Without an `appkey` field, a roster callId (`{appkey}_{msg_id}`) still names it.
    let users_appkey = appkey.clone().or_else(|| appkey_from_call_id(&call_id, msg_id.as_deref()));
    let from_user = lenient_string(fields.from).map(|from| normalize_user(&from, users_appkey.as_deref()));
    let to = lenient_string(fields.to);
    let to_user = to.as_deref().map(|to| normalize_user(to, users_appkey.as_deref()));
    // From `to` as it came, its prefix cut with the `appkey` field only (not with one taken from
    // the callId), so that the keys of events stored by earlier releases still match their
    // re-deliveries.
    let to_keyed_apart = if appkey.is_none() && users_appkey.is_some() {
        to.as_deref().map(|to| normalize_user(to, None))
    } else {
        None
    };
    let to_as_keyed = to_keyed_apart.as_deref().or(to_user.as_deref());
    let dedup_key = dedup_key(&call_id, event_type.as_deref(), to_as_keyed, operation.as_deref());
    // Easemob stores user IDs lower-case, and the trigger API lower-cases them: so are they here,
    // or a call for alice/bob and a callback for Bob would never meet.
    let from_user = from_user.map(|user| user.to_ascii_lowercase());
    let to_user = to_user.map(|user| user.to_ascii_lowercase());

    Ok(ParsedCallback {
        call_id,
        msg_id,
        appkey,
        event_type,
        chat_type: lenient_string(fields.chat_type),
        operation,
        from_user,
        to_user,
        timestamp_ms,
        timestamp_text,
        security,
        dedup_key,
    })
}

fn invalid(field: &'static str, detail: &str) -> ParseError {
    ParseError::InvalidField { field, detail: detail.to_owned() }
}

/// True if `[`/`{` nest deeper than `limit` outside strings. Only meaningful for valid JSON, which
/// is all that matters: invalid JSON is refused by serde_json afterwards either way.
fn nesting_exceeds(json: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A field that must be present (JSON `null` counts as absent) and a string.
fn required_string(raw: Option<&RawValue>, field: &'static str) -> Result<String, ParseError> {
    let raw = raw.ok_or(ParseError::MissingField(field))?;
    serde_json::from_str(raw.get()).map_err(|e| {
        if !raw.get().starts_with('"') {
            return invalid(field, "must be a string");
        }
        // A string in valid JSON that still cannot be read: its escapes name half of a UTF-16
        // surrogate pair (`\ud800` alone), which is no character. Saying "not a string" of a
        // value in quotes would send the sender looking in the wrong place. (serde_json's own
        // words vary with where the half stands, "unexpected end of hex escape" among them.)
        tracing::debug!(field, error = %e, "a quoted field that is not text");
        invalid(
            field,
            "must be text, and this string is not: a `\\uD800`-`\\uDFFF` escape must be one of a high-low pair",
        )
    })
}

/// An optional string field: absent, `null` or any other type all read as `None`.
fn lenient_string(raw: Option<&RawValue>) -> Option<String> {
    raw.and_then(|raw| serde_json::from_str(raw.get()).ok())
}

/// `timestamp`: epoch milliseconds as a JSON integer. Returns the number and its exact text,
/// because the easemob signature covers the text (so `1.642648213494e12`, even if it were the same
/// number, would not verify, and is refused here rather than silently re-rendered).
///
/// Easemob documents a number. A string of digits (`"1642648213494"`) is accepted too, its digits
/// being the signed text: a sender that quotes it would sign the same characters, and refusing it
/// would lose the event (a 400 gets one retry, then Easemob drops it).
fn timestamp(raw: Option<&RawValue>) -> Result<(i64, String), ParseError> {
    let raw = raw.ok_or(ParseError::MissingField("timestamp"))?.get();
    // A quoted value is taken only without escapes: `"\u0031..."` would sign other characters
    // than the ones it stands for.
    let text = raw.strip_prefix('"').and_then(|inner| inner.strip_suffix('"')).unwrap_or(raw);
    // RawValue holds the value's text without surrounding whitespace, so digits-only rules out
    // signs, fractions, exponents and escapes in one check. A bare number cannot have leading
    // zeros (JSON forbids them); a quoted one is refused with them, as no sender writes them.
    let leading_zero = text.len() > 1 && text.starts_with('0');
    if text.is_empty() || leading_zero || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            "timestamp",
            "must be a non-negative integer of epoch milliseconds (a JSON number, or a string of digits)",
        ));
    }
    let value = text
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms <= MAX_TIMESTAMP_MS)
        .and_then(|ms| i64::try_from(ms).ok())
        .ok_or_else(|| invalid("timestamp", "out of range for epoch milliseconds"))?;
    Ok((value, text.to_owned()))
}

/// `payload.operation` if the payload is an object with a string `operation`. A payload of another
/// shape has no operation; a duplicated `operation` key is refused because it feeds the dedup key.
fn operation(payload: Option<&RawValue>) -> Result<Option<String>, ParseError> {
    let Some(payload) = payload else {
        return Ok(None);
    };
    // Same reason as at the top level: a derived struct would read an array positionally.
    if !payload.get().starts_with('{') {
        return Ok(None);
    }
    let payload: Payload<'_> = serde_json::from_str(payload.get())
        .map_err(|e| ParseError::InvalidField { field: "payload", detail: e.to_string() })?;
    Ok(lenient_string(payload.operation))
}

/// Strips `{appkey}_` and `@domain` from a JID-form user; returns plain IDs unchanged.
///
/// Roster callbacks send `from` as `{org}#{app}_{user}@easemob.com` and `to` as a plain ID. The
/// suffix is removed from the last `@` only when what follows looks like a domain (has a dot,
/// letters/digits/`-`/`.` only); the prefix only when the app key is known and matches exactly. It
/// never splits on `_`: user IDs may contain `_`, and without the app key there is no way to tell
/// where a prefix would end.
pub fn normalize_user(raw: &str, appkey: Option<&str>) -> String {
    let without_domain = match raw.rsplit_once('@') {
        Some((user, domain)) if !user.is_empty() && looks_like_domain(domain) => user,
        _ => raw,
    };
    let without_prefix = appkey
        .filter(|key| !key.is_empty())
        .and_then(|key| without_domain.strip_prefix(key))
        .and_then(|rest| rest.strip_prefix('_'))
        .filter(|user| !user.is_empty())
        .unwrap_or(without_domain);
    without_prefix.to_owned()
}

/// The app key a roster callId carries: `{appkey}_{msg_id}` when it ends with `_` and the
/// body's `msg_id`, and what is left looks like `org#app`.
fn appkey_from_call_id(call_id: &str, msg_id: Option<&str>) -> Option<String> {
    let msg_id = msg_id.filter(|id| !id.is_empty())?;
    let appkey = call_id.strip_suffix(msg_id)?.strip_suffix('_')?;
    let (org, app) = appkey.split_once('#')?;
    (!org.is_empty() && !app.is_empty()).then(|| appkey.to_owned())
}

/// `easemob.com`, `im.example.cn`: at least one dot, not at either end, DNS characters only.
fn looks_like_domain(s: &str) -> bool {
    s.contains('.')
        && !s.starts_with('.')
        && !s.ends_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The deduplication key: (callId, eventType, to, payload.operation), unambiguously encoded.
///
/// The encoding is a compact JSON array, e.g. `["org#app_1","chat","bob","add"]`, with `null` for
/// an absent value: JSON string escaping makes it injective (no separator can be forged inside a
/// value, and absent differs from empty), and it stays readable in the database. `callId` alone is
/// not enough: the accept/remote_accept pair shares it and differs only in `to` and operation.
pub fn dedup_key(call_id: &str, event_type: Option<&str>, to: Option<&str>, operation: Option<&str>) -> String {
    serde_json::json!([call_id, event_type, to, operation]).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reconstructed roster `add` callback of easemob-api.md §8.4 (security filled in).
    const ROSTER_ADD: &str = r#"{
  "chat_type": "roster",
  "callId": "demo-org#demo-app_1187654321098765432",
  "security": "0123456789abcdef0123456789abcdef",
  "payload": {"reason": "", "operation": "add"},
  "host": "msync-api-01",
  "appkey": "demo-org#demo-app",
  "from": "demo-org#demo-app_alice@easemob.com",
  "to": "bob",
  "eventType": "chat",
  "msg_id": "1187654321098765432",
  "timestamp": 1700000000123
}"#;

    const REMOTE_ACCEPT: &str = r#"{"chat_type":"roster","callId":"demo-org#demo-app_966725899779049516","security":"bac67bdb1f935f86b3eaa30286975387","payload":{"roster_ver":"DD6E14FE5EE5A9ABC52CA86C5DE1601CF729BFD6","operation":"remote_accept"},"host":"h","appkey":"demo-org#demo-app","from":"demo-org#demo-app_bob@easemob.com","to":"alice","eventType":"chat","msg_id":"966725899779049516","timestamp":1642648213494}"#;
    const ACCEPT: &str = r#"{"chat_type":"roster","callId":"demo-org#demo-app_966725899779049516","security":"bac67bdb1f935f86b3eaa30286975387","payload":{"roster_ver":"DD6E14FE5EE5A9ABC52CA86C5DE1601CF729BFD6","operation":"accept"},"host":"h","appkey":"demo-org#demo-app","from":"demo-org#demo-app_bob@easemob.com","to":"bob","eventType":"chat","msg_id":"966725899779049516","timestamp":1642648213494}"#;

    fn parse_str(body: &str) -> Result<ParsedCallback, ParseError> {
        parse(body.as_bytes())
    }

    fn invalid_field(result: Result<ParsedCallback, ParseError>) -> Option<&'static str> {
        match result {
            Err(ParseError::InvalidField { field, .. }) => Some(field),
            _ => None,
        }
    }

    fn is_not_json(result: &Result<ParsedCallback, ParseError>) -> bool {
        matches!(result, Err(ParseError::NotJson(_)))
    }

    #[test]
    fn roster_add_example_is_parsed_in_full() {
        let parsed = parse_str(ROSTER_ADD).expect("example parses");
        assert_eq!(
            parsed,
            ParsedCallback {
                call_id: "demo-org#demo-app_1187654321098765432".into(),
                msg_id: Some("1187654321098765432".into()),
                appkey: Some("demo-org#demo-app".into()),
                event_type: Some("chat".into()),
                chat_type: Some("roster".into()),
                operation: Some("add".into()),
                from_user: Some("alice".into()),
                to_user: Some("bob".into()),
                timestamp_ms: 1_700_000_000_123,
                timestamp_text: "1700000000123".into(),
                security: Some("0123456789abcdef0123456789abcdef".into()),
                dedup_key: r#"["demo-org#demo-app_1187654321098765432","chat","bob","add"]"#.into(),
            }
        );
    }

    #[test]
    fn users_are_lower_cased_and_a_missing_appkey_is_read_from_the_call_id() {
        let body = r#"{"callId":"demo-org#demo-app_9661","msg_id":"9661","timestamp":1,"security":"s",
            "from":"demo-org#demo-app_Alice@easemob.com","to":"Bob","payload":{"operation":"add"}}"#;
        let parsed = parse_str(body).expect("parses");
        assert_eq!(parsed.from_user.as_deref(), Some("alice"), "prefix from the callId, then lower-cased");
        assert_eq!(parsed.to_user.as_deref(), Some("bob"));
        assert_eq!(parsed.appkey, None, "the stored appkey is what the body said");
        assert!(parsed.dedup_key.contains("\"Bob\""), "the key keeps `to` as sent: {}", parsed.dedup_key);
        // A prefixed `to` is stored without the prefix taken from the callId, but keyed as earlier
        // releases keyed it (they knew the prefix from an `appkey` field only).
        let prefixed = body.replace(r#""to":"Bob""#, r#""to":"demo-org#demo-app_Bob@easemob.com""#);
        let parsed = parse_str(&prefixed).expect("parses");
        assert_eq!(parsed.to_user.as_deref(), Some("bob"));
        assert!(parsed.dedup_key.contains("\"demo-org#demo-app_Bob\""), "{}", parsed.dedup_key);
        let with_appkey = prefixed.replace(r#""timestamp":1"#, r#""timestamp":1,"appkey":"demo-org#demo-app""#);
        assert!(parse_str(&with_appkey).expect("parses").dedup_key.contains("\"Bob\""));
        // A callId that does not end with the msg_id names no app key: nothing is stripped.
        let body = body.replace(r#""msg_id":"9661""#, r#""msg_id":"1234""#);
        assert_eq!(parse_str(&body).expect("parses").from_user.as_deref(), Some("demo-org#demo-app_alice"));
    }

    #[test]
    fn accept_and_remote_accept_share_a_call_id_but_not_a_dedup_key() {
        let remote = parse_str(REMOTE_ACCEPT).expect("remote_accept parses");
        let local = parse_str(ACCEPT).expect("accept parses");
        assert_eq!(remote.call_id, local.call_id);
        assert_ne!(remote.dedup_key, local.dedup_key);
        assert_eq!(remote.to_user.as_deref(), Some("alice"));
        assert_eq!(local.operation.as_deref(), Some("accept"));
    }

    #[test]
    fn a_redelivery_has_the_same_dedup_key() {
        let first = parse_str(ACCEPT).expect("parses");
        // Same event, different formatting and key order, as a re-send through another path might be.
        let again = r#"{ "timestamp" : 1642648213494, "to":"bob", "eventType":"chat", "appkey":"demo-org#demo-app",
            "payload": {"operation":"accept"}, "callId":"demo-org#demo-app_966725899779049516",
            "security":"BAC67BDB1F935F86B3EAA30286975387"}"#;
        assert_eq!(parse_str(again).expect("parses").dedup_key, first.dedup_key);
    }

    #[test]
    fn chat_offline_variant_gets_its_own_dedup_key() {
        let offline = ACCEPT.replace(r#""eventType":"chat""#, r#""eventType":"chat_offline""#);
        assert_ne!(parse_str(&offline).expect("parses").dedup_key, parse_str(ACCEPT).expect("parses").dedup_key);
    }

    #[test]
    fn from_with_underscores_in_the_user_id_keeps_them() {
        let body = ROSTER_ADD.replace("demo-app_alice@", "demo-app_al_ice_@");
        assert_eq!(parse_str(&body).expect("parses").from_user.as_deref(), Some("al_ice_"));
    }

    #[test]
    fn reason_may_be_an_object() {
        let body = ROSTER_ADD.replace(r#""reason": """#, r#""reason": {"text": "hi", "extra": [1, 2]}"#);
        assert_eq!(parse_str(&body).expect("parses").operation.as_deref(), Some("add"));
    }

    #[test]
    fn payload_without_an_operation_string_has_no_operation() {
        for payload in [r#""add""#, r#"["add"]"#, r#"{"operation": 1}"#, r#"{"reason": "x"}"#, "null", "{}"] {
            let body = format!(r#"{{"callId":"c","timestamp":1,"security":"s","payload":{payload}}}"#);
            let parsed = parse_str(&body).expect(payload);
            assert_eq!(parsed.operation, None, "{payload}");
            assert_eq!(parsed.dedup_key, r#"["c",null,null,null]"#);
        }
    }

    #[test]
    fn duplicate_operation_in_payload_is_refused() {
        let body = r#"{"callId":"c","timestamp":1,"security":"s","payload":{"operation":"add","operation":"remove"}}"#;
        assert_eq!(invalid_field(parse_str(body)), Some("payload"));
    }

    #[test]
    fn optional_fields_of_the_wrong_type_read_as_absent() {
        let body = r#"{"callId":"c","timestamp":1,"security":"s","msg_id":123,"appkey":["a"],"eventType":null,
            "chat_type":{},"from":true,"to":1.5,"securityVersion":1,"group_id":[],"host":0}"#;
        let parsed = parse_str(body).expect("lenient");
        assert_eq!(
            (parsed.msg_id, parsed.appkey, parsed.event_type, parsed.chat_type, parsed.from_user, parsed.to_user),
            (None, None, None, None, None, None)
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let body = ROSTER_ADD.replacen('{', r#"{"brand_new": {"deep": [1, {"x": null}]}, "n": 1e400,"#, 1);
        assert_eq!(parse_str(&body).expect("parses"), parse_str(ROSTER_ADD).expect("parses"));
    }

    #[test]
    fn missing_required_fields_are_named() {
        let without = |key: &str| {
            let mut value: serde_json::Value = serde_json::from_str(ROSTER_ADD).expect("example is JSON");
            value.as_object_mut().expect("object").remove(key);
            value.to_string()
        };
        assert_eq!(parse_str(&without("callId")), Err(ParseError::MissingField("callId")));
        assert_eq!(parse_str(&without("timestamp")), Err(ParseError::MissingField("timestamp")));
        assert_eq!(parse_str(&without("security")).expect("read without it").security, None);
        // null counts as absent.
        let null_call_id =
            ROSTER_ADD.replace(r#""callId": "demo-org#demo-app_1187654321098765432""#, r#""callId": null"#);
        assert_eq!(parse_str(&null_call_id), Err(ParseError::MissingField("callId")));
    }

    #[test]
    fn security_that_is_absent_or_not_a_string_reads_as_none() {
        let body = r#"{"callId":"c","timestamp":1}"#;
        assert_eq!(parse(body.as_bytes()).expect("parses").security, None);
        let numeric = r#"{"callId":"c","timestamp":1,"security":5}"#;
        assert_eq!(parse(numeric.as_bytes()).expect("lenient").security, None);
    }

    #[test]
    fn call_id_must_be_a_non_empty_string() {
        for call_id in [r#""""#, "123", "[]", r#"{"a":1}"#, "true"] {
            let body = format!(r#"{{"callId":{call_id},"timestamp":1,"security":"s"}}"#);
            assert_eq!(invalid_field(parse_str(&body)), Some("callId"), "{call_id}");
        }
        let number = parse_str(r#"{"callId":123,"timestamp":1,"security":"s"}"#).expect_err("a number");
        assert_eq!(number.to_string(), "invalid field `callId`: must be a string");
    }

    /// A quoted callId whose escapes are half a surrogate pair is a string that is not text: the
    /// detail says that, not "must be a string".
    #[test]
    fn a_call_id_with_a_lone_surrogate_is_told_apart_from_one_that_is_not_a_string() {
        for call_id in [r#""\ud800""#, r#""a\udc00b""#, r#""\ud800\u0041""#] {
            let body = format!(r#"{{"callId":{call_id},"timestamp":1,"security":"s"}}"#);
            let err = parse_str(&body).expect_err(call_id);
            let text = err.to_string();
            assert_eq!(
                text,
                r"invalid field `callId`: must be text, and this string is not: a `\uD800`-`\uDFFF` escape must be one of a high-low pair"
            );
        }
        // A whole pair is a character (U+1F600), and a fine callId.
        let pair = parse_str(r#"{"callId":"\ud83d\ude00","timestamp":1,"security":"s"}"#).expect("a pair");
        assert_eq!(pair.call_id, "\u{1F600}");
    }

    #[test]
    fn timestamp_must_be_a_bare_integer_in_range() {
        for bad in [
            "12345678901234567890", // 20 digits
            "99999999999999999999999999",
            "10000000000000", // 14 digits, just over the maximum
            "-1",
            "-1642648213494",
            "1642648213494.0",
            "1642648213494.5",
            r#""""#,
            r#"" 1642648213494""#,
            r#""01642648213494""#,
            r#""\u00316""#,
            r#""-1""#,
            r#""1e3""#,
            "1e3",
            "1E3",
            "16e11",
            "true",
            "[1642648213494]",
            r#"{"ms":1}"#,
        ] {
            let body = format!(r#"{{"callId":"c","timestamp":{bad},"security":"s"}}"#);
            assert_eq!(invalid_field(parse_str(&body)), Some("timestamp"), "{bad}");
        }
    }

    #[test]
    fn a_timestamp_sent_as_a_string_of_digits_is_read_and_signed_by_its_digits() {
        let body = r#"{"callId":"c","timestamp":"1642648213494","security":"s"}"#;
        let parsed = parse_str(body).expect("parses");
        assert_eq!((parsed.timestamp_ms, parsed.timestamp_text.as_str()), (1_642_648_213_494, "1642648213494"));
        let out_of_range = r#"{"callId":"c","timestamp":"10000000000000","security":"s"}"#;
        assert_eq!(invalid_field(parse_str(out_of_range)), Some("timestamp"));
    }

    #[test]
    fn timestamp_bounds_are_inclusive() {
        for (text, ms) in [("0", 0), ("9999999999999", 9_999_999_999_999)] {
            let body = format!(r#"{{"callId":"c","timestamp":{text},"security":"s"}}"#);
            let parsed = parse_str(&body).expect(text);
            assert_eq!((parsed.timestamp_ms, parsed.timestamp_text.as_str()), (ms, text));
        }
    }

    #[test]
    fn timestamp_text_is_kept_exactly_without_surrounding_whitespace() {
        let body = "{\"callId\":\"c\",\"security\":\"s\",\"timestamp\" :\n\t 1642648213494 \r\n}";
        let parsed = parse_str(body).expect("parses");
        assert_eq!(parsed.timestamp_text, "1642648213494");
        assert_eq!(parsed.timestamp_ms, 1_642_648_213_494);
    }

    #[test]
    fn leading_zeros_are_not_json() {
        let body = r#"{"callId":"c","timestamp":01642648213494,"security":"s"}"#;
        assert!(is_not_json(&parse_str(body)));
    }

    #[test]
    fn duplicate_keys_we_read_are_refused() {
        for body in [
            r#"{"callId":"a","callId":"b","timestamp":1,"security":"s"}"#,
            r#"{"callId":"a","timestamp":1,"timestamp":2,"security":"s"}"#,
            r#"{"callId":"a","timestamp":1,"security":"s","security":"t"}"#,
            r#"{"callId":"a","timestamp":1,"security":"s","to":"bob","to":"eve"}"#,
            // An escaped key is the same key.
            r#"{"callId":"a","call\u0049d":"b","timestamp":1,"security":"s"}"#,
        ] {
            let result = parse_str(body);
            assert!(is_not_json(&result), "{body}: {result:?}");
        }
        // Duplicates among fields we ignore are none of our business.
        let body = r#"{"callId":"a","timestamp":1,"security":"s","x":1,"x":2}"#;
        assert!(parse_str(body).is_ok());
    }

    #[test]
    fn hostile_bodies_are_refused_as_not_json() {
        let deep_open = "[".repeat(100_000);
        let deep_in_field = format!(r#"{{"callId":"c","timestamp":1,"security":"s","x":{deep_open}"#);
        let deep_closed = format!(
            r#"{{"callId":"c","timestamp":1,"security":"s","x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let deep_payload = format!(
            r#"{{"callId":"c","timestamp":1,"security":"s","payload":{}{}}}"#,
            r#"{"a":"#.repeat(10_000),
            "}".repeat(10_000)
        );
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", b"".to_vec()),
            ("whitespace", b"  \n ".to_vec()),
            ("invalid UTF-8", b"{\"callId\":\"\xff\xfe\",\"timestamp\":1,\"security\":\"s\"}".to_vec()),
            ("lone continuation byte", b"\x80".to_vec()),
            ("100,000 [", deep_open.clone().into_bytes()),
            ("deep unterminated field", deep_in_field.into_bytes()),
            ("deep closed field", deep_closed.into_bytes()),
            ("deep payload", deep_payload.into_bytes()),
            ("NUL in a string", b"{\"callId\":\"a\x00b\",\"timestamp\":1,\"security\":\"s\"}".to_vec()),
            ("NUL outside strings", b"{\"callId\":\"a\",\x00\"timestamp\":1,\"security\":\"s\"}".to_vec()),
            ("NUL alone", b"\x00".to_vec()),
            ("truncated", ROSTER_ADD.as_bytes()[..ROSTER_ADD.len() / 2].to_vec()),
            ("missing closing brace", ROSTER_ADD.trim_end().trim_end_matches('}').as_bytes().to_vec()),
            ("trailing garbage", format!("{ROSTER_ADD}x").into_bytes()),
            ("two objects", format!("{ROSTER_ADD}{ROSTER_ADD}").into_bytes()),
            ("byte order mark", format!("\u{feff}{ROSTER_ADD}").into_bytes()),
            ("single quotes", b"{'callId':'c'}".to_vec()),
        ];
        for (name, body) in cases {
            let result = parse(&body);
            assert!(is_not_json(&result), "{name}: {result:?}");
        }
    }

    #[test]
    fn nesting_limit_is_exactly_128_levels() {
        // The outer object is level 1, so 127 more brackets reach the limit.
        let at_limit =
            format!(r#"{{"callId":"c","timestamp":1,"security":"s","x":{}{}}}"#, "[".repeat(127), "]".repeat(127));
        assert!(parse_str(&at_limit).is_ok());
        let beyond =
            format!(r#"{{"callId":"c","timestamp":1,"security":"s","x":{}{}}}"#, "[".repeat(128), "]".repeat(128));
        assert!(is_not_json(&parse_str(&beyond)));
        // Brackets inside strings do not count.
        let in_string = format!(r#"{{"callId":"{}","timestamp":1,"security":"s"}}"#, "[".repeat(1000));
        assert!(parse_str(&in_string).is_ok());
        let escaped_quote = format!(r#"{{"callId":"\"{}","timestamp":1,"security":"s"}}"#, "{".repeat(1000));
        assert!(parse_str(&escaped_quote).is_ok());
    }

    #[test]
    fn escaped_nul_is_valid_json() {
        // `\u0000` is legal JSON; only a raw control byte is not.
        let body = r#"{"callId":"a\u0000b","timestamp":1,"security":"s"}"#;
        assert_eq!(parse_str(body).expect("parses").call_id, "a\0b");
    }

    #[test]
    fn json_that_is_not_an_object_is_not_an_object() {
        for body in ["[]", r#"["c", 1, "s"]"#, r#""callId""#, "1642648213494", "-1", "null", "true", " [1] "] {
            assert_eq!(parse_str(body), Err(ParseError::NotObject), "{body}");
        }
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(ParseError::NotJson(String::new()).code(), "invalid_json");
        assert_eq!(ParseError::NotObject.code(), "invalid_json");
        assert_eq!(ParseError::MissingField("callId").code(), "missing_field");
        assert_eq!(invalid("timestamp", "x").code(), "invalid_field");
        assert_eq!(ParseError::MissingField("callId").detail(), "missing required field `callId`");
    }

    #[test]
    fn normalize_user_strips_only_known_decoration() {
        let appkey = Some("demo-org#demo-app");
        for (raw, key, expected) in [
            ("demo-org#demo-app_alice@easemob.com", appkey, "alice"),
            ("demo-org#demo-app_al_ice_@easemob.com", appkey, "al_ice_"),
            ("demo-org#demo-app_alice@im.example.cn", appkey, "alice"),
            ("demo-org#demo-app_alice", appkey, "alice"),
            ("bob", appkey, "bob"),
            ("bob", None, "bob"),
            ("x_bob@easemob.com", appkey, "x_bob"),
            ("x_bob", appkey, "x_bob"),
            // Without the app key there is no safe way to find where a prefix ends.
            ("demo-org#demo-app_alice@easemob.com", None, "demo-org#demo-app_alice"),
            ("other-org#other-app_alice@easemob.com", appkey, "other-org#other-app_alice"),
            // Only the last `@`, and only if a domain follows.
            ("a@b@easemob.com", appkey, "a@b"),
            ("alice@home", appkey, "alice@home"),
            ("alice@", appkey, "alice@"),
            ("@easemob.com", appkey, "@easemob.com"),
            ("alice@.com", appkey, "alice@.com"),
            ("alice@ex ample.com", appkey, "alice@ex ample.com"),
            // The prefix must be followed by `_` and a non-empty user.
            ("demo-org#demo-appalice", appkey, "demo-org#demo-appalice"),
            ("demo-org#demo-app_", appkey, "demo-org#demo-app_"),
            ("demo-org#demo-app_demo-org#demo-app_x", appkey, "demo-org#demo-app_x"),
            ("", appkey, ""),
            ("demo-org#demo-app_bob", Some(""), "demo-org#demo-app_bob"),
        ] {
            assert_eq!(normalize_user(raw, key), expected, "{raw:?} with {key:?}");
        }
    }

    #[test]
    fn dedup_key_is_unambiguous() {
        assert_eq!(dedup_key("c", Some("chat"), Some("bob"), Some("add")), r#"["c","chat","bob","add"]"#);
        assert_eq!(dedup_key("c", None, None, None), r#"["c",null,null,null]"#);
        // Absent is not empty, and separators inside values cannot shift fields.
        assert_ne!(dedup_key("c", None, None, None), dedup_key("c", Some(""), None, None));
        assert_ne!(dedup_key("a\",\"b", None, None, None), dedup_key("a", Some("b"), None, None));
        assert_ne!(dedup_key("c", Some("chat"), Some("bob"), None), dedup_key("c", Some("chat"), None, Some("bob")));
    }

    /// Any JSON value, a few levels deep.
    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-zA-Z]{0,8}|operation|reason", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// An object using our field names with arbitrary values, each present or not.
    fn arb_callback_object() -> impl Strategy<Value = String> {
        let keys = [
            "callId",
            "timestamp",
            "security",
            "msg_id",
            "appkey",
            "eventType",
            "chat_type",
            "from",
            "to",
            "securityVersion",
            "group_id",
            "host",
            "payload",
            "other",
        ];
        proptest::collection::vec(proptest::option::of(arb_json()), keys.len()).prop_map(move |values| {
            let object: serde_json::Map<String, serde_json::Value> =
                keys.iter().zip(values).filter_map(|(key, value)| value.map(|v| ((*key).to_owned(), v))).collect();
            serde_json::Value::Object(object).to_string()
        })
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&body);
        }

        #[test]
        fn parse_never_panics_on_json_ish_text(body in r#"[\[\]{}:,"0-9a-zA-Z_#@.\\ \-eE+]{0,256}"#) {
            let _ = parse(body.as_bytes());
        }

        #[test]
        fn parse_never_panics_on_objects_with_our_fields(body in arb_callback_object()) {
            if let Ok(parsed) = parse(body.as_bytes()) {
                // Whatever was accepted is self-consistent.
                prop_assert_eq!(parsed.timestamp_text.parse::<i64>().ok(), Some(parsed.timestamp_ms));
                prop_assert!(!parsed.call_id.is_empty());
            }
        }

        #[test]
        fn valid_callbacks_round_trip(
            call_id in ".+",
            timestamp in 0u64..=MAX_TIMESTAMP_MS,
            to in proptest::option::of(any::<String>()),
            operation in proptest::option::of(any::<String>()),
        ) {
            let body = serde_json::json!({
                "callId": call_id, "timestamp": timestamp, "security": "s", "to": to,
                "payload": {"operation": operation},
            });
            let parsed = parse(body.to_string().as_bytes());
            prop_assert!(parsed.is_ok(), "{:?}", parsed);
            let parsed = parsed.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&parsed.call_id, &call_id);
            prop_assert_eq!(parsed.timestamp_text, timestamp.to_string());
            prop_assert_eq!(&parsed.operation, &operation);
            // The key takes `to` as it came (normalised, not lower-cased); the stored user is
            // lower-cased.
            let to_as_sent = to.as_deref().map(|to| normalize_user(to, None));
            let expected_key = dedup_key(&call_id, None, to_as_sent.as_deref(), parsed.operation.as_deref());
            prop_assert_eq!(parsed.dedup_key, expected_key);
            prop_assert_eq!(parsed.to_user, to_as_sent.map(|to| to.to_ascii_lowercase()));
        }
    }
}
