//! The JSON shapes Easemob sends and receives: the success envelope, user entities, the error
//! body, and the new-user request body.
//!
//! Parsing is lenient on purpose. Easemob's documentation reconstructs most examples from field
//! lists, so a field may be missing, `null`, or of an unexpected type (a number sent as a string).
//! A surprise in one field must not turn a successful friend addition into a failure, so every
//! field is optional and a field of the wrong type reads as absent. Unknown fields are ignored.
//! The raw JSON is always kept next to the typed view (`ApiSuccess::body`, `ApiFailure::body`).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// A user to register with `POST /{org}/{app}/users`.
#[derive(Clone, Debug, Serialize)]
pub struct NewUser {
    /// The user ID: 1 to 64 bytes of `a-z 0-9 _ - .`; Easemob stores it lower-cased.
    pub username: String,
    /// The user's login password (at most 64 characters).
    pub password: String,
    /// Display name (at most 100 characters); omitted from the request when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nickname: Option<String>,
}

/// A successful (2xx) answer from Easemob.
#[derive(Clone, Debug)]
pub struct ApiSuccess {
    /// The HTTP status (normally 200).
    pub status: u16,
    /// The raw JSON body (`Value::Null` when the body was empty, a JSON string holding the text
    /// when it was not JSON).
    pub body: Value,
    /// The typed, leniently parsed view of `body`.
    pub envelope: Envelope,
    /// How many HTTP attempts the call took (token fetches not counted).
    pub attempts: u32,
    /// The connection failed before the body's end: `body` is what arrived (a call that changes
    /// something is done by its 2xx status alone; a read is asked again instead).
    pub cut_short: bool,
}

/// The success envelope most user and contact endpoints answer with.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Envelope {
    /// Lower-case HTTP verb of the request (`"post"`, `"get"`, `"delete"`).
    #[serde(deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The application's UUID.
    #[serde(deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
    /// Request path; for contact endpoints it names the owner by UUID, not by username.
    #[serde(deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Request URL.
    #[serde(deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The entities concerned: for add/delete friend the friend's user entity, for register the
    /// created users. Elements that are not objects are skipped.
    #[serde(deserialize_with = "lenient_entities")]
    pub entities: Vec<Entity>,
    /// Endpoint-specific payload: the friend list (array of usernames), a batch register's
    /// per-user failures, and so on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Server time of the answer, Unix milliseconds.
    #[serde(deserialize_with = "lenient_i64", skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    /// Server-side processing time in milliseconds.
    #[serde(deserialize_with = "lenient_i64", skip_serializing_if = "Option::is_none")]
    pub duration: Option<i64>,
    /// The org name of the App Key.
    #[serde(deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    /// The app name of the App Key.
    #[serde(rename = "applicationName", deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// Number of items, sent by list and get endpoints.
    #[serde(deserialize_with = "lenient_i64", skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
}

impl Envelope {
    /// Reads an envelope out of any JSON value; a value that is not an object gives the empty
    /// envelope, so a success is never lost to a parsing surprise.
    pub fn from_value(value: &Value) -> Self {
        Self::deserialize(value).unwrap_or_default()
    }
}

/// A user (or group) entity inside an envelope.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Entity {
    /// Easemob's internal ID of the user.
    #[serde(deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// `"user"` or `"group"`.
    #[serde(rename = "type", deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub r#type: Option<String>,
    /// Creation time, Unix milliseconds.
    #[serde(deserialize_with = "lenient_i64", skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    /// Last modification time, Unix milliseconds.
    #[serde(deserialize_with = "lenient_i64", skip_serializing_if = "Option::is_none")]
    pub modified: Option<i64>,
    /// The user ID (lower case).
    #[serde(deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// `false` when the user is banned.
    #[serde(deserialize_with = "lenient_bool", skip_serializing_if = "Option::is_none")]
    pub activated: Option<bool>,
    /// Display name; absent when never set.
    #[serde(deserialize_with = "lenient_string", skip_serializing_if = "Option::is_none")]
    pub nickname: Option<String>,
}

/// Easemob's error body, e.g.
/// `{"error":"exceed_limit","exception":"...","timestamp":1700000000000,"duration":0,"error_description":"user contact number exceed limit"}`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ErrorBody {
    /// The error type (`unauthorized`, `exceed_limit`, `service_resource_not_found`, `reach_limit`, ...).
    pub error: String,
    /// The server's Java exception class, simple or fully qualified.
    #[serde(default, deserialize_with = "lenient_string")]
    pub exception: Option<String>,
    /// Server time, Unix milliseconds.
    #[serde(default, deserialize_with = "lenient_i64")]
    pub timestamp: Option<i64>,
    /// Server-side processing time in milliseconds.
    #[serde(default, deserialize_with = "lenient_i64")]
    pub duration: Option<i64>,
    /// Human-readable explanation.
    #[serde(default, deserialize_with = "lenient_string")]
    pub error_description: Option<String>,
}

impl ErrorBody {
    /// Reads an error body out of a JSON value; `None` unless it is an object with a string
    /// `error` field.
    pub fn from_value(value: &Value) -> Option<Self> {
        Self::deserialize(value).ok()
    }

    /// `error` plus the description when there is one, for messages: `exceed_limit (user contact
    /// number exceed limit)`.
    pub fn summary(&self) -> String {
        match &self.error_description {
            Some(description) if !description.is_empty() => {
                format!("{} ({description})", self.error)
            }
            _ => self.error.clone(),
        }
    }
}

/// Turns raw response bytes into JSON: empty is `Null`, text that is not JSON is kept as a JSON
/// string (cut to a few KB, since it only serves diagnosis).
pub(crate) fn body_to_value(bytes: &[u8]) -> Value {
    const MAX_TEXT_BYTES: usize = 4 * 1024;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(_) => {
            let text = String::from_utf8_lossy(bytes);
            let mut end = text.len().min(MAX_TEXT_BYTES);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            Value::String(text[..end].to_owned())
        }
    }
}

fn lenient_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(s) => Some(s),
        // An ID sent as a number is still an ID.
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

fn lenient_i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

fn lenient_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::Bool(b) => Some(b),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

fn lenient_entities<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Entity>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::Array(items) => {
            items.iter().filter(|item| item.is_object()).filter_map(|item| Entity::deserialize(item).ok()).collect()
        }
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documented_error_bodies_parse() {
        let examples = [
            (
                r#"{"error":"unauthorized","exception":"org.apache.usergrid.rest.exceptions.SecurityException","timestamp":1700000000000,"duration":0,"error_description":"Unable to authenticate due to expired access token"}"#,
                "unauthorized",
                "Unable to authenticate due to expired access token",
            ),
            (
                r#"{"error":"auth_bad_access_token","exception":"org.apache.usergrid.rest.exceptions.SecurityException","timestamp":1700000000000,"duration":0,"error_description":"Unable to authenticate due to corrupt access token"}"#,
                "auth_bad_access_token",
                "Unable to authenticate due to corrupt access token",
            ),
            (
                r#"{"error":"service_resource_not_found","exception":"UserNotFoundException","timestamp":1700000000000,"duration":0,"error_description":"Service resource not found"}"#,
                "service_resource_not_found",
                "Service resource not found",
            ),
            (
                r#"{"error":"exceed_limit","exception":"...","timestamp":1700000000000,"duration":0,"error_description":"user contact number exceed limit"}"#,
                "exceed_limit",
                "user contact number exceed limit",
            ),
            (
                r#"{"error":"reach_limit","exception":"EasemobServiceUnavailableException","timestamp":1700000000000,"duration":0,"error_description":"This request has reached api limit"}"#,
                "reach_limit",
                "This request has reached api limit",
            ),
            (
                r#"{"error":"invalid_grant","error_description":"client_secret does not match"}"#,
                "invalid_grant",
                "client_secret does not match",
            ),
        ];
        for (raw, error, description) in examples {
            let value: Value = serde_json::from_str(raw).expect("example is JSON");
            let parsed = ErrorBody::from_value(&value).expect("example parses");
            assert_eq!(parsed.error, error);
            assert_eq!(parsed.error_description.as_deref(), Some(description));
        }
    }

    #[test]
    fn error_body_keeps_all_documented_fields() {
        let value = json!({"error":"unauthorized","exception":"X","timestamp":1700000000000_i64,"duration":3,"error_description":"d"});
        let parsed = ErrorBody::from_value(&value).expect("parses");
        assert_eq!(
            parsed,
            ErrorBody {
                error: "unauthorized".into(),
                exception: Some("X".into()),
                timestamp: Some(1_700_000_000_000),
                duration: Some(3),
                error_description: Some("d".into()),
            }
        );
        assert_eq!(parsed.summary(), "unauthorized (d)");
    }

    #[test]
    fn error_body_tolerates_odd_types_but_needs_an_error_string() {
        let odd = json!({"error":"x","timestamp":"1700000000000","duration":1.5,"exception":null,"extra":true});
        let parsed = ErrorBody::from_value(&odd).expect("parses");
        assert_eq!(parsed.timestamp, Some(1_700_000_000_000));
        assert_eq!(parsed.duration, Some(1));
        assert_eq!(parsed.exception, None);

        assert!(ErrorBody::from_value(&json!({"message":"nope"})).is_none());
        assert!(ErrorBody::from_value(&json!("text")).is_none());
    }

    #[test]
    fn add_friend_example_envelope_parses() {
        let value = json!({
          "action": "post",
          "application": "8be024f0-0000-11e8-b697-5d598d5f8402",
          "path": "/users/4759aa70-0000-11e8-b697-5d598d5f8402/contacts",
          "uri": "https://a1.easemob.com/demo-org/demo-app/users/4759aa70-0000-11e8-b697-5d598d5f8402/contacts",
          "entities": [{
            "uuid": "b2aade90-0000-11e8-b697-5d598d5f8402", "type": "user",
            "created": 1542356523769_i64, "modified": 1542597334500_i64,
            "username": "user2", "activated": true, "nickname": "testuser"
          }],
          "timestamp": 1542598913819_i64, "duration": 63,
          "organization": "demo-org", "applicationName": "demo-app"
        });
        let envelope = Envelope::from_value(&value);
        assert_eq!(envelope.action.as_deref(), Some("post"));
        assert_eq!(envelope.application_name.as_deref(), Some("demo-app"));
        assert_eq!(envelope.entities.len(), 1);
        let friend = &envelope.entities[0];
        assert_eq!(friend.username.as_deref(), Some("user2"));
        assert_eq!(friend.r#type.as_deref(), Some("user"));
        assert_eq!(friend.activated, Some(true));
        assert_eq!(friend.created, Some(1_542_356_523_769));
        assert_eq!(envelope.data, None);
        assert_eq!(envelope.count, None);
    }

    #[test]
    fn envelope_survives_surprises() {
        let value = json!({"action":"get","entities":[1, {"username":"a","activated":"true"}],"data":["b","c"],"count":"2","unknown":{}});
        let envelope = Envelope::from_value(&value);
        assert_eq!(envelope.entities.len(), 1);
        assert_eq!(envelope.entities[0].activated, Some(true));
        assert_eq!(envelope.count, Some(2));
        assert_eq!(envelope.data, Some(json!(["b", "c"])));

        assert_eq!(Envelope::from_value(&json!("not an object")), Envelope::default());
        assert_eq!(Envelope::from_value(&json!({"entities": "nope"})).entities, Vec::new());
    }

    #[test]
    fn envelope_round_trips_the_application_name_field() {
        let envelope = Envelope { application_name: Some("demo-app".into()), ..Envelope::default() };
        let value = serde_json::to_value(&envelope).expect("serialises");
        assert_eq!(value, json!({"applicationName":"demo-app","entities":[]}));
    }

    #[test]
    fn new_user_omits_a_missing_nickname() {
        let user = NewUser { username: "alice".into(), password: "pw".into(), nickname: None };
        assert_eq!(serde_json::to_value(&user).expect("serialises"), json!({"username":"alice","password":"pw"}));
    }

    #[test]
    fn raw_bodies_become_json_values() {
        assert_eq!(body_to_value(b""), Value::Null);
        assert_eq!(body_to_value(b" \n"), Value::Null);
        assert_eq!(body_to_value(br#"{"a":1}"#), json!({"a":1}));
        assert_eq!(body_to_value(b"<html>bad gateway</html>"), json!("<html>bad gateway</html>"));
    }
}
