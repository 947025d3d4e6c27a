//! The tamper-evident hash chain: canonical record content and link computation. Pure.
//!
//! Every stored callback event and every recorded call outcome gets the next `seq` and a link
//! `chain_hash = sha256_hex(prev_hash || "\n" || canonical)`, where `canonical` is a JSON array of
//! the record's fields in a fixed order (the raw body enters through its SHA-256, and
//! `audit verify` recomputes that digest from the stored raw body). Editing, inserting or deleting
//! any record breaks every later link; publishing the head (`GET /v1/audit/head`) elsewhere makes
//! rewriting the whole chain detectable too.

use serde_json::json;
use sha2::{Digest, Sha256};

/// Whether `text` has the form of a chain link: 64 lower-case hex digits.
pub fn is_link(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A link given by a person or a program (an `--after-hash`, a feed's `after_hash`, a published
/// head), in either case, as the lower-case link it names; `None` if it is not one.
pub fn parse_link(text: &str) -> Option<String> {
    let link = text.to_ascii_lowercase();
    is_link(&link).then_some(link)
}

/// The `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The next link of the chain.
pub fn link(prev_hash: &str, canonical: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(canonical.as_bytes());
    hex::encode(h.finalize())
}

/// The chained fields of a callback event.
#[derive(Debug, Clone)]
pub struct CallbackContent<'a> {
    /// Position in the journal.
    pub seq: i64,
    /// Dedup key.
    pub dedup_key: &'a str,
    /// callId.
    pub call_id: &'a str,
    /// msg_id.
    pub msg_id: Option<&'a str>,
    /// appkey.
    pub appkey: Option<&'a str>,
    /// eventType.
    pub event_type: Option<&'a str>,
    /// chat_type.
    pub chat_type: Option<&'a str>,
    /// payload.operation.
    pub operation: Option<&'a str>,
    /// Normalised from.
    pub from_user: Option<&'a str>,
    /// Normalised to.
    pub to_user: Option<&'a str>,
    /// Event time.
    pub timestamp_ms: i64,
    /// First receipt.
    pub received_at_ms: i64,
    /// Verifying scheme.
    pub scheme: &'a str,
    /// Verifying secret's index.
    pub secret_index: i64,
    /// SHA-256 of the raw body.
    pub body_sha256: &'a str,
}

impl CallbackContent<'_> {
    /// Canonical text that the link hashes.
    pub fn canonical(&self) -> String {
        json!([
            "callback",
            self.seq,
            self.dedup_key,
            self.call_id,
            self.msg_id,
            self.appkey,
            self.event_type,
            self.chat_type,
            self.operation,
            self.from_user,
            self.to_user,
            self.timestamp_ms,
            self.received_at_ms,
            self.scheme,
            self.secret_index,
            self.body_sha256,
        ])
        .to_string()
    }
}

/// The chained fields of a call with its outcome.
#[derive(Debug, Clone)]
pub struct CallContent<'a> {
    /// Position in the journal.
    pub seq: i64,
    /// Call id.
    pub id: i64,
    /// add / remove.
    pub op: &'a str,
    /// Owner.
    pub owner: &'a str,
    /// Friend.
    pub friend: &'a str,
    /// Idempotency key, if any.
    pub idempotency_key: Option<&'a str>,
    /// Intent time.
    pub requested_at_ms: i64,
    /// Outcome time.
    pub completed_at_ms: i64,
    /// Outcome.
    pub outcome: &'a str,
    /// Easemob's HTTP status.
    pub upstream_status: Option<i64>,
    /// Easemob's error type.
    pub upstream_error: Option<&'a str>,
    /// HTTP attempts.
    pub attempts: i64,
    /// Easemob's response body.
    pub response_body: Option<&'a str>,
    /// Why it ended so (schema 7). Hashed only when present, so that a record without one (every
    /// record written before the column existed) hashes as it always did.
    pub outcome_detail: Option<&'a str>,
}

impl CallContent<'_> {
    /// Canonical text that the link hashes.
    pub fn canonical(&self) -> String {
        let mut fields = json!([
            "call",
            self.seq,
            self.id,
            self.op,
            self.owner,
            self.friend,
            self.idempotency_key,
            self.requested_at_ms,
            self.completed_at_ms,
            self.outcome,
            self.upstream_status,
            self.upstream_error,
            self.attempts,
            self.response_body.map(|b| sha256_hex(b.as_bytes())),
        ]);
        if let (Some(detail), Some(fields)) = (self.outcome_detail, fields.as_array_mut()) {
            fields.push(json!(detail));
        }
        fields.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_read_in_either_case_and_given_back_lower_case() {
        let upper = "AB".repeat(32);
        assert_eq!(parse_link(&upper), Some("ab".repeat(32)));
        assert_eq!(parse_link(GENESIS).as_deref(), Some(GENESIS));
        for not_one in ["", &"a".repeat(63), &"g".repeat(64), &format!("{} ", "a".repeat(64))] {
            assert_eq!(parse_link(not_one), None, "{not_one:?}");
        }
    }

    #[test]
    fn link_depends_on_previous_link_and_content() {
        let a = link(GENESIS, "x");
        assert_ne!(a, link(GENESIS, "y"));
        assert_ne!(a, link(&link(GENESIS, "z"), "x"));
        assert_eq!(a, link(GENESIS, "x"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn a_call_without_an_outcome_detail_hashes_as_before_the_field_existed() {
        let mut call = CallContent {
            seq: 7,
            id: 3,
            op: "add",
            owner: "alice",
            friend: "bob",
            idempotency_key: None,
            requested_at_ms: 1,
            completed_at_ms: 2,
            outcome: "failed",
            upstream_status: Some(503),
            upstream_error: None,
            attempts: 5,
            response_body: None,
            outcome_detail: None,
        };
        // The text schema 6 and earlier chained: existing databases must still verify.
        assert_eq!(call.canonical(), r#"["call",7,3,"add","alice","bob",null,1,2,"failed",503,null,5,null]"#);
        call.outcome_detail = Some("gave up");
        assert_eq!(call.canonical(), r#"["call",7,3,"add","alice","bob",null,1,2,"failed",503,null,5,null,"gave up"]"#);
    }

    #[test]
    fn sha256_hex_matches_known_vector() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
