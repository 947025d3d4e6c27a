//! Easemob's own post-send callback signature: `security = md5Hex(callId + secret + timestamp)`.
//!
//! Owns signing (the sandbox uses it to emit callbacks) and verification against several active
//! secrets. It signs only those three fields: the payload, `from`, `to` and the rest of the body are
//! not covered, so a verified callback proves "Easemob sent an event with this callId and time", not
//! that the body is untouched. It deliberately does not check the timestamp's age: Easemob's retry
//! reuses the event time and exception-cache re-delivery can arrive days later (easemob-api.md §8.3).

use md5::{Digest, Md5};
use subtle::{Choice, ConstantTimeEq};

use super::VerifyError;
use crate::secret::Secret;

/// Length of an MD5 digest in bytes (32 hex characters).
const DIGEST_LEN: usize = 16;

/// The raw digest of `callId + secret + timestamp`, plain concatenation with no separators.
fn digest(call_id: &str, secret: &str, timestamp_text: &str) -> [u8; DIGEST_LEN] {
    let mut md5 = Md5::new();
    md5.update(call_id.as_bytes());
    md5.update(secret.as_bytes());
    md5.update(timestamp_text.as_bytes());
    md5.finalize().into()
}

/// Computes `security` the way Easemob does (commons-codec `DigestUtils.md5Hex`): 32 lower-case
/// hex characters. `timestamp_text` is the decimal text of the body's `timestamp`, exactly as sent.
///
/// ```
/// use friendhook::signature::easemob::sign;
/// // The known-answer vector of the README's curl example.
/// let security = sign("demo-org#demo-app_966725899779049516", "test-secret", "1642648213494");
/// assert_eq!(security, "bac67bdb1f935f86b3eaa30286975387");
/// ```
pub fn sign(call_id: &str, secret: &str, timestamp_text: &str) -> String {
    hex::encode(digest(call_id, secret, timestamp_text))
}

/// Checks `security` against every secret and returns the index of the first one that matches.
///
/// Either hex case is accepted (Easemob sends lower case; a relay might not). `security` that is
/// not exactly 32 hex characters is `Malformed("security")`; no match (or no secrets) is `Mismatch`.
/// Digests are compared in constant time, and every secret is tried even after a match, so the
/// time taken does not depend on which secret (if any) matched.
pub fn verify(call_id: &str, timestamp_text: &str, security: &str, secrets: &[Secret]) -> Result<usize, VerifyError> {
    let mut given = [0u8; DIGEST_LEN];
    // `decode_to_slice` insists on exactly 2 * DIGEST_LEN hex digits, either case.
    hex::decode_to_slice(security, &mut given).map_err(|_| VerifyError::Malformed("security"))?;

    let mut matched = None;
    for (index, secret) in secrets.iter().enumerate() {
        let expected = digest(call_id, secret.expose(), timestamp_text);
        let equal: Choice = expected.ct_eq(&given);
        if bool::from(equal) && matched.is_none() {
            matched = Some(index);
        }
    }
    matched.ok_or(VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Self-made vector from easemob-api.md §8.3, confirmed independently with
    // python3 -c 'import hashlib; print(hashlib.md5(b"demo-org#demo-app_966725899779049516test-secret1642648213494").hexdigest())'
    const CALL_ID: &str = "demo-org#demo-app_966725899779049516";
    const SECRET: &str = "test-secret";
    const TIMESTAMP: &str = "1642648213494";
    const SECURITY: &str = "bac67bdb1f935f86b3eaa30286975387";

    fn secrets(values: &[&str]) -> Vec<Secret> {
        values.iter().map(|s| Secret::new(*s)).collect()
    }

    #[test]
    fn sign_matches_the_known_answer_vector() {
        assert_eq!(sign(CALL_ID, SECRET, TIMESTAMP), SECURITY);
    }

    #[test]
    fn verify_accepts_the_known_answer_vector() {
        assert_eq!(verify(CALL_ID, TIMESTAMP, SECURITY, &secrets(&[SECRET])), Ok(0));
    }

    #[test]
    fn wrong_secret_is_a_mismatch() {
        assert_eq!(verify(CALL_ID, TIMESTAMP, SECURITY, &secrets(&["other-secret"])), Err(VerifyError::Mismatch));
    }

    #[test]
    fn no_secrets_is_a_mismatch() {
        assert_eq!(verify(CALL_ID, TIMESTAMP, SECURITY, &[]), Err(VerifyError::Mismatch));
    }

    #[test]
    fn tampered_call_id_is_a_mismatch() {
        let tampered = "demo-org#demo-app_966725899779049517";
        assert_eq!(verify(tampered, TIMESTAMP, SECURITY, &secrets(&[SECRET])), Err(VerifyError::Mismatch));
    }

    #[test]
    fn tampered_timestamp_is_a_mismatch() {
        assert_eq!(verify(CALL_ID, "1642648213495", SECURITY, &secrets(&[SECRET])), Err(VerifyError::Mismatch));
        // Same number, different text: the signature covers the text.
        assert_eq!(verify(CALL_ID, "1642648213494.0", SECURITY, &secrets(&[SECRET])), Err(VerifyError::Mismatch));
    }

    #[test]
    fn tampered_security_is_a_mismatch() {
        let tampered = "bac67bdb1f935f86b3eaa30286975388";
        assert_eq!(verify(CALL_ID, TIMESTAMP, tampered, &secrets(&[SECRET])), Err(VerifyError::Mismatch));
    }

    #[test]
    fn rotation_returns_the_index_of_the_matching_secret() {
        assert_eq!(verify(CALL_ID, TIMESTAMP, SECURITY, &secrets(&["old-secret", SECRET])), Ok(1));
    }

    #[test]
    fn first_matching_secret_wins() {
        assert_eq!(verify(CALL_ID, TIMESTAMP, SECURITY, &secrets(&["x", SECRET, SECRET])), Ok(1));
    }

    #[test]
    fn upper_case_hex_is_accepted() {
        let upper = SECURITY.to_ascii_uppercase();
        assert_eq!(verify(CALL_ID, TIMESTAMP, &upper, &secrets(&[SECRET])), Ok(0));
    }

    #[test]
    fn malformed_security_is_rejected_before_any_comparison() {
        for bad in [
            "",
            "bac67bdb1f935f86b3eaa3028697538",    // 31 chars
            "bac67bdb1f935f86b3eaa302869753870",  // 33 chars
            "bac67bdb1f935f86b3eaa3028697538z",   // not hex
            " bac67bdb1f935f86b3eaa30286975387",  // whitespace
            "bac67bdb1f935f86b3eaa30286975387\n", // trailing newline
            "bac67bdb-f935-f86b-3eaa-30286975387",
            "ｂac67bdb1f935f86b3eaa3028697538", // multi-byte character
        ] {
            assert_eq!(
                verify(CALL_ID, TIMESTAMP, bad, &secrets(&[SECRET])),
                Err(VerifyError::Malformed("security")),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn verify_never_panics(
            call_id in any::<String>(),
            timestamp in any::<String>(),
            security in any::<String>(),
            keys in proptest::collection::vec(any::<String>(), 0..4),
        ) {
            let keys: Vec<Secret> = keys.into_iter().map(Secret::new).collect();
            let _ = verify(&call_id, &timestamp, &security, &keys);
        }

        #[test]
        fn sign_then_verify_round_trips(
            call_id in any::<String>(),
            secret in any::<String>(),
            timestamp in "[0-9]{1,13}",
        ) {
            let security = sign(&call_id, &secret, &timestamp);
            prop_assert_eq!(verify(&call_id, &timestamp, &security, &[Secret::new(secret)]), Ok(0));
        }

        #[test]
        fn changing_the_call_id_breaks_verification(
            call_id in any::<String>(),
            other in any::<String>(),
            secret in any::<String>(),
            timestamp in "[0-9]{1,13}",
        ) {
            prop_assume!(call_id != other);
            let security = sign(&call_id, &secret, &timestamp);
            prop_assert_eq!(verify(&other, &timestamp, &security, &[Secret::new(secret)]), Err(VerifyError::Mismatch));
        }

        #[test]
        fn changing_the_timestamp_text_breaks_verification(
            call_id in any::<String>(),
            secret in any::<String>(),
            timestamp in "[0-9]{1,13}",
            other in "[0-9]{0,14}",
        ) {
            prop_assume!(timestamp != other);
            let security = sign(&call_id, &secret, &timestamp);
            prop_assert_eq!(verify(&call_id, &other, &security, &[Secret::new(secret)]), Err(VerifyError::Mismatch));
        }
    }
}
