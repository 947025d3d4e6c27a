//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>), for a relay in front of
//! friendhook that re-signs Easemob's callbacks.
//!
//! Owns secret parsing (`whsec_<base64>`), signing and verification of the three headers
//! `webhook-id`, `webhook-timestamp` and `webhook-signature`. Unlike Easemob's scheme this one
//! covers the whole body and carries a timestamp that is checked against a tolerance, so a
//! captured request cannot be replayed later. "Now" is passed in; nothing here reads a clock.

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{ConfigError, VerifyError};

/// Header carrying the message id (the first part of the signed content).
pub const HEADER_ID: &str = "webhook-id";
/// Header carrying the send time, integer seconds since the epoch.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// Prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// The only signature version this module produces and checks; other versions are skipped so a
/// sender can add a new scheme alongside `v1` without breaking us.
const VERSION: &str = "v1";
/// HMAC-SHA256 output length.
const TAG_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Standard alphabet; padding optional on input because some senders strip it, always written
/// on output as the spec's examples do.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_encode_padding(true).with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes a `whsec_<base64>` secret into the HMAC key.
///
/// The error message never contains the secret (not even the offending byte), because it ends up
/// in start-up logs.
pub fn parse_secret(s: &str) -> Result<Vec<u8>, ConfigError> {
    let encoded = s.strip_prefix(SECRET_PREFIX).ok_or_else(|| {
        ConfigError(format!(
            "a standard-webhooks secret must start with `{SECRET_PREFIX}` followed by base64 \
             (copy it exactly as the sender shows it)"
        ))
    })?;
    let key = BASE64.decode(encoded).map_err(|_| {
        ConfigError(format!(
            "the part of the standard-webhooks secret after `{SECRET_PREFIX}` is not valid base64 \
             (copy it exactly as the sender shows it)"
        ))
    })?;
    if key.is_empty() {
        return Err(ConfigError(format!(
            "the standard-webhooks secret is empty after `{SECRET_PREFIX}`; an empty key would let anyone sign"
        )));
    }
    Ok(key)
}

/// The raw HMAC-SHA256 tag over `{msg_id}.{timestamp}.{body}`.
fn tag(msg_id: &str, timestamp_secs: i64, body: &[u8], key: &[u8]) -> [u8; TAG_LEN] {
    // HMAC pads or hashes the key to the block size, so `new_from_slice` accepts every length and
    // this cannot fail. Panicking is still better than any fallback key.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Signs a message: returns one `webhook-signature` entry, `v1,<base64>`.
pub fn sign(msg_id: &str, timestamp_secs: i64, body: &[u8], key: &[u8]) -> String {
    format!("{VERSION},{}", BASE64.encode(tag(msg_id, timestamp_secs, body, key)))
}

/// Reads a header as visible ASCII text.
fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, VerifyError> {
    headers.get(name).ok_or(VerifyError::MissingHeader(name))?.to_str().map_err(|_| VerifyError::Malformed(name))
}

/// Parses `webhook-timestamp`: decimal digits only (no sign, no spaces, no fraction), so that the
/// number we check against the tolerance is unambiguously the number that was signed.
fn parse_timestamp(text: &str) -> Result<i64, VerifyError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::Malformed(HEADER_TIMESTAMP));
    }
    text.parse().map_err(|_| VerifyError::Malformed(HEADER_TIMESTAMP))
}

/// Verifies a request and returns the index of the first key whose HMAC matches one `v1` entry.
///
/// Order of checks: headers present and well-formed, then `|now_secs - timestamp| <= tolerance_secs`
/// (both directions: a timestamp far in the future is as suspicious as an old one), then the HMAC.
/// Entries with another version, or a `v1` entry that is not 32 bytes of base64, never match but do
/// not fail the request on their own, so one valid entry among others is enough. A header with no
/// entries at all is `Malformed`.
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    keys: &[Vec<u8>],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<usize, VerifyError> {
    let msg_id = header(headers, HEADER_ID)?;
    if msg_id.is_empty() {
        return Err(VerifyError::Malformed(HEADER_ID));
    }
    let timestamp = parse_timestamp(header(headers, HEADER_TIMESTAMP)?)?;
    let signatures = header(headers, HEADER_SIGNATURE)?;

    let entries: Vec<&str> = signatures.split(' ').filter(|entry| !entry.is_empty()).collect();
    if entries.is_empty() {
        return Err(VerifyError::Malformed(HEADER_SIGNATURE));
    }

    // i128 so that extreme values on either side cannot overflow the subtraction.
    let skew = (i128::from(now_secs) - i128::from(timestamp)).abs();
    if skew > i128::from(tolerance_secs) {
        return Err(VerifyError::TimestampOutOfTolerance);
    }

    let candidates: Vec<[u8; TAG_LEN]> = entries
        .iter()
        .filter_map(|entry| {
            let (version, encoded) = entry.split_once(',')?;
            if version != VERSION {
                return None;
            }
            BASE64.decode(encoded).ok()?.try_into().ok()
        })
        .collect();

    // One HMAC per key (the body may be large), then cheap constant-time compares per entry.
    // Every key and entry is compared even after a match, so timing does not reveal which matched.
    let mut matched = None;
    for (index, key) in keys.iter().enumerate() {
        let expected = tag(msg_id, timestamp, body, key);
        let hit = candidates.iter().fold(subtle::Choice::from(0), |acc, candidate| acc | expected.ct_eq(candidate));
        if bool::from(hit) && matched.is_none() {
            matched = Some(index);
        }
    }
    matched.ok_or(VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    // The spec's published example (standard-webhooks README / svix docs), confirmed with
    // python3 -c 'import hmac,hashlib,base64; k=base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"); print("v1,"+base64.b64encode(hmac.new(k,b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{\"test\": 2432232314}",hashlib.sha256).digest()).decode())'
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    // Our own vector with a non-ASCII body. The secret was made with
    // python3 -c 'import base64; print("whsec_"+base64.b64encode(b"friendhook-standard-webhooks-key").decode())'
    // and the signature with
    // python3 -c 'import hmac,hashlib,base64; k=base64.b64decode("ZnJpZW5kaG9vay1zdGFuZGFyZC13ZWJob29rcy1rZXk="); print("v1,"+base64.b64encode(hmac.new(k,"msg_friendhook_0001.1700000000.{\"callId\":\"demo-org#demo-app_1187654321098765432\",\"payload\":{\"reason\":\"你好\",\"operation\":\"add\"},\"timestamp\":1700000000123}".encode(),hashlib.sha256).digest()).decode())'
    const OWN_SECRET: &str = "whsec_ZnJpZW5kaG9vay1zdGFuZGFyZC13ZWJob29rcy1rZXk=";
    const OWN_ID: &str = "msg_friendhook_0001";
    const OWN_TS: i64 = 1700000000;
    const OWN_BODY: &str = r#"{"callId":"demo-org#demo-app_1187654321098765432","payload":{"reason":"你好","operation":"add"},"timestamp":1700000000123}"#;
    const OWN_SIG: &str = "v1,f5CnfppU1tmYTq0HWy35LgpBBwfP73zixKXgdhMY0fk=";

    // Empty body, timestamp 0:
    // python3 -c 'import hmac,hashlib,base64; k=base64.b64decode("ZnJpZW5kaG9vay1zdGFuZGFyZC13ZWJob29rcy1rZXk="); print("v1,"+base64.b64encode(hmac.new(k,b"msg_empty.0.",hashlib.sha256).digest()).decode())'
    const EMPTY_SIG: &str = "v1,oSP3SSRNq3u12OvRRzjAsT2+LfXTye+Yami/E0V1hP4=";

    const TOLERANCE: i64 = 300;

    fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in [(HEADER_ID, id), (HEADER_TIMESTAMP, timestamp), (HEADER_SIGNATURE, signature)] {
            map.insert(name, HeaderValue::from_str(value).expect("test header is valid"));
        }
        map
    }

    fn spec_key() -> Vec<u8> {
        parse_secret(SPEC_SECRET).expect("spec secret parses")
    }

    fn spec_headers(signature: &str) -> HeaderMap {
        headers(SPEC_ID, &SPEC_TS.to_string(), signature)
    }

    #[test]
    fn sign_matches_the_spec_example() {
        assert_eq!(sign(SPEC_ID, SPEC_TS, SPEC_BODY, &spec_key()), SPEC_SIG);
    }

    #[test]
    fn verify_accepts_the_spec_example() {
        let result = verify(&spec_headers(SPEC_SIG), SPEC_BODY, &[spec_key()], SPEC_TS, TOLERANCE);
        assert_eq!(result, Ok(0));
    }

    #[test]
    fn sign_and_verify_match_python_for_a_utf8_body() {
        let key = parse_secret(OWN_SECRET).expect("own secret parses");
        assert_eq!(key, b"friendhook-standard-webhooks-key");
        assert_eq!(sign(OWN_ID, OWN_TS, OWN_BODY.as_bytes(), &key), OWN_SIG);
        let map = headers(OWN_ID, &OWN_TS.to_string(), OWN_SIG);
        assert_eq!(verify(&map, OWN_BODY.as_bytes(), &[key], OWN_TS + 10, TOLERANCE), Ok(0));
    }

    #[test]
    fn sign_matches_python_for_an_empty_body() {
        let key = parse_secret(OWN_SECRET).expect("own secret parses");
        assert_eq!(sign("msg_empty", 0, b"", &key), EMPTY_SIG);
    }

    #[test]
    fn parse_secret_accepts_unpadded_base64() {
        let unpadded = OWN_SECRET.trim_end_matches('=');
        assert_eq!(parse_secret(unpadded).expect("unpadded parses"), b"friendhook-standard-webhooks-key");
    }

    #[test]
    fn parse_secret_rejects_bad_secrets_without_echoing_them() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_",
            "whsec_not*base64!",
            "WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ] {
            let err = parse_secret(bad).expect_err(bad);
            assert!(err.0.contains("whsec_"), "message tells the user the format: {}", err.0);
            assert!(!err.0.contains("MfKQ") && !err.0.contains("base64!"), "message leaks the secret: {}", err.0);
        }
    }

    #[test]
    fn wrong_key_is_a_mismatch() {
        let other = parse_secret(OWN_SECRET).expect("own secret parses");
        let result = verify(&spec_headers(SPEC_SIG), SPEC_BODY, &[other], SPEC_TS, TOLERANCE);
        assert_eq!(result, Err(VerifyError::Mismatch));
    }

    #[test]
    fn rotation_returns_the_index_of_the_matching_key() {
        let other = parse_secret(OWN_SECRET).expect("own secret parses");
        let result = verify(&spec_headers(SPEC_SIG), SPEC_BODY, &[other, spec_key()], SPEC_TS, TOLERANCE);
        assert_eq!(result, Ok(1));
    }

    #[test]
    fn no_keys_is_a_mismatch() {
        assert_eq!(verify(&spec_headers(SPEC_SIG), SPEC_BODY, &[], SPEC_TS, TOLERANCE), Err(VerifyError::Mismatch));
    }

    #[test]
    fn each_signed_part_is_covered() {
        let key = [spec_key()];
        let tampered_id = headers("msg_p5jXN8AQM9LWM0D4loKWxJeK", &SPEC_TS.to_string(), SPEC_SIG);
        assert_eq!(verify(&tampered_id, SPEC_BODY, &key, SPEC_TS, TOLERANCE), Err(VerifyError::Mismatch));
        let tampered_ts = headers(SPEC_ID, &(SPEC_TS + 1).to_string(), SPEC_SIG);
        assert_eq!(verify(&tampered_ts, SPEC_BODY, &key, SPEC_TS, TOLERANCE), Err(VerifyError::Mismatch));
        let tampered_body = br#"{"test": 2432232315}"#;
        assert_eq!(
            verify(&spec_headers(SPEC_SIG), tampered_body, &key, SPEC_TS, TOLERANCE),
            Err(VerifyError::Mismatch)
        );
        let tampered_sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=";
        assert_eq!(
            verify(&spec_headers(tampered_sig), SPEC_BODY, &key, SPEC_TS, TOLERANCE),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn tolerance_is_inclusive_in_both_directions() {
        let key = [spec_key()];
        let map = spec_headers(SPEC_SIG);
        // Request sent TOLERANCE seconds ago / TOLERANCE seconds in the future: accepted.
        assert_eq!(verify(&map, SPEC_BODY, &key, SPEC_TS + TOLERANCE, TOLERANCE), Ok(0));
        assert_eq!(verify(&map, SPEC_BODY, &key, SPEC_TS - TOLERANCE, TOLERANCE), Ok(0));
        // One second further either way: rejected before the HMAC is even looked at.
        assert_eq!(
            verify(&map, SPEC_BODY, &key, SPEC_TS + TOLERANCE + 1, TOLERANCE),
            Err(VerifyError::TimestampOutOfTolerance)
        );
        assert_eq!(
            verify(&map, SPEC_BODY, &key, SPEC_TS - TOLERANCE - 1, TOLERANCE),
            Err(VerifyError::TimestampOutOfTolerance)
        );
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let key = [spec_key()];
        let map = headers(SPEC_ID, &i64::MAX.to_string(), SPEC_SIG);
        assert_eq!(verify(&map, SPEC_BODY, &key, i64::MIN, i64::MAX), Err(VerifyError::TimestampOutOfTolerance));
        assert_eq!(verify(&map, SPEC_BODY, &key, i64::MAX, 0), Err(VerifyError::Mismatch));
    }

    #[test]
    fn one_valid_signature_among_invalid_ones_is_enough() {
        let header =
            format!("v1,Zm9v v1,notbase64!! v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA= garbage {SPEC_SIG}");
        assert_eq!(verify(&spec_headers(&header), SPEC_BODY, &[spec_key()], SPEC_TS, TOLERANCE), Ok(0));
    }

    #[test]
    fn entries_with_another_version_are_ignored() {
        // The correct digest under a `v2` label must not be accepted as v1.
        let as_v2 = SPEC_SIG.replacen("v1,", "v2,", 1);
        assert_eq!(
            verify(&spec_headers(&as_v2), SPEC_BODY, &[spec_key()], SPEC_TS, TOLERANCE),
            Err(VerifyError::Mismatch)
        );
        // ...and a v2 entry next to a valid v1 entry does not get in the way.
        let both = format!("v2,AAAA {SPEC_SIG}");
        assert_eq!(verify(&spec_headers(&both), SPEC_BODY, &[spec_key()], SPEC_TS, TOLERANCE), Ok(0));
    }

    #[test]
    fn missing_headers_are_named() {
        let key = [spec_key()];
        for name in [HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE] {
            let mut map = spec_headers(SPEC_SIG);
            map.remove(name);
            assert_eq!(verify(&map, SPEC_BODY, &key, SPEC_TS, TOLERANCE), Err(VerifyError::MissingHeader(name)));
        }
    }

    #[test]
    fn malformed_headers_are_named() {
        let key = [spec_key()];
        for bad_ts in ["", "abc", "-1614265330", "+1614265330", "1614265330.0", " 1614265330", "99999999999999999999"] {
            let map = headers(SPEC_ID, bad_ts, SPEC_SIG);
            assert_eq!(
                verify(&map, SPEC_BODY, &key, SPEC_TS, TOLERANCE),
                Err(VerifyError::Malformed(HEADER_TIMESTAMP)),
                "{bad_ts:?}"
            );
        }
        let empty_sig = spec_headers("   ");
        assert_eq!(
            verify(&empty_sig, SPEC_BODY, &key, SPEC_TS, TOLERANCE),
            Err(VerifyError::Malformed(HEADER_SIGNATURE))
        );
        let empty_id = headers("", &SPEC_TS.to_string(), SPEC_SIG);
        assert_eq!(verify(&empty_id, SPEC_BODY, &key, SPEC_TS, TOLERANCE), Err(VerifyError::Malformed(HEADER_ID)));
        let mut non_ascii_id = spec_headers(SPEC_SIG);
        non_ascii_id.insert(HEADER_ID, HeaderValue::from_bytes(b"msg_\xff").expect("obs-text is a valid header value"));
        assert_eq!(verify(&non_ascii_id, SPEC_BODY, &key, SPEC_TS, TOLERANCE), Err(VerifyError::Malformed(HEADER_ID)));
    }

    proptest! {
        #[test]
        fn verify_never_panics(
            id in proptest::collection::vec(any::<u8>(), 0..40),
            timestamp in proptest::collection::vec(any::<u8>(), 0..24),
            signature in proptest::collection::vec(any::<u8>(), 0..200),
            body in proptest::collection::vec(any::<u8>(), 0..200),
            keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..3),
            now in any::<i64>(),
            tolerance in any::<i64>(),
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in [(HEADER_ID, id), (HEADER_TIMESTAMP, timestamp), (HEADER_SIGNATURE, signature)] {
                // Bytes a client cannot send as a header value are rejected by HTTP parsing first.
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    map.insert(name, value);
                }
            }
            let _ = verify(&map, &body, &keys, now, tolerance);
        }

        #[test]
        fn flipping_any_body_byte_breaks_verification(
            body in proptest::collection::vec(any::<u8>(), 1..300),
            index in any::<prop::sample::Index>(),
            mask in 1u8..=255,
            key in proptest::collection::vec(any::<u8>(), 1..64),
            id in "[a-zA-Z0-9_]{1,32}",
            timestamp in 0i64..=4_000_000_000,
        ) {
            let signature = sign(&id, timestamp, &body, &key);
            let map = headers(&id, &timestamp.to_string(), &signature);
            let keys = [key];
            prop_assert_eq!(verify(&map, &body, &keys, timestamp, TOLERANCE), Ok(0));
            let mut tampered = body.clone();
            tampered[index.index(body.len())] ^= mask;
            prop_assert_eq!(verify(&map, &tampered, &keys, timestamp, TOLERANCE), Err(VerifyError::Mismatch));
        }
    }
}
