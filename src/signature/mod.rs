//! Callback signature verification: pure functions, no I/O; "now" is passed in.
//!
//! Owns the choice of scheme, the set of active secrets (several at once, so a secret can be
//! rotated or one receiver can serve several Easemob callback rules) and the reason a request
//! was refused. It does not parse the body (see [`crate::callback`]) and does not decide what the
//! HTTP answer is: the caller maps a [`VerifyError`] to a 401 that does not say which check failed.

pub mod easemob;
pub mod standard_webhooks;

use crate::secret::Secret;

/// Which signature scheme the receiver checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// Easemob's own: `security = md5(callId + secret + timestamp)`; covers those three fields only.
    Easemob,
    /// Standard Webhooks (HMAC-SHA256 over `id.timestamp.body`), for a relay that re-signs.
    StandardWebhooks,
}

impl Scheme {
    /// The name used in config and in stored rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Easemob => "easemob",
            Scheme::StandardWebhooks => "standard-webhooks",
        }
    }
}

/// Why a request failed verification. Stored in the rejection log and logged; never sent to the
/// client (the 401 body does not say which check failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A required header (standard-webhooks) is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header or the `security` field is not in the expected format.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// standard-webhooks: `webhook-timestamp` is outside the tolerance.
    #[error("timestamp outside tolerance")]
    TimestampOutOfTolerance,
    /// No active secret produces the given signature.
    #[error("signature mismatch")]
    Mismatch,
}

impl VerifyError {
    /// Every [`VerifyError::reason`], as `quarantine purge --reason` takes them.
    pub const REASONS: [&'static str; 4] =
        ["missing_header", "malformed_signature", "timestamp_out_of_tolerance", "signature_mismatch"];

    /// A short, stable reason code for the rejection log.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::MissingHeader(_) => "missing_header",
            VerifyError::Malformed(_) => "malformed_signature",
            VerifyError::TimestampOutOfTolerance => "timestamp_out_of_tolerance",
            VerifyError::Mismatch => "signature_mismatch",
        }
    }
}

/// Invalid verifier configuration (e.g. a standard-webhooks secret that is not `whsec_<base64>`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Verifies requests under one configured scheme against the active secrets.
///
/// `Debug` is written by hand so that neither the secrets nor the decoded HMAC keys can reach a log.
#[derive(Clone)]
pub struct Verifier {
    scheme: Scheme,
    secrets: Vec<Secret>,
    hmac_keys: Vec<Vec<u8>>,
    tolerance_secs: i64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("scheme", &self.scheme)
            .field("secrets", &self.secrets.len())
            .field("tolerance_secs", &self.tolerance_secs)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds a verifier. For standard-webhooks every secret must be `whsec_<base64>`.
    ///
    /// Secrets are checked (and standard-webhooks keys decoded) once here, so a bad configuration
    /// stops the service at start-up instead of turning every callback into a 401. Error messages
    /// name the secret by position, never by value.
    pub fn new(scheme: Scheme, secrets: Vec<Secret>, tolerance_secs: i64) -> Result<Self, ConfigError> {
        if secrets.is_empty() {
            return Err(ConfigError(format!(
                "no callback secret configured for the {} scheme: give at least one secret (for easemob, \
                 the secret of the post-send callback rule in the Easemob console; for standard-webhooks, \
                 the whsec_... secret of the signing relay)",
                scheme.as_str()
            )));
        }
        if let Some(position) = secrets.iter().position(|s| s.expose().is_empty()) {
            return Err(ConfigError(format!(
                "callback secret #{} is empty; an empty secret would let anyone sign callbacks, remove it or fill it in",
                position + 1
            )));
        }
        let hmac_keys = match scheme {
            // Easemob hashes the secret text as is; there is nothing to decode.
            Scheme::Easemob => Vec::new(),
            Scheme::StandardWebhooks => {
                if tolerance_secs < 0 {
                    return Err(ConfigError(format!(
                        "the standard-webhooks timestamp tolerance must be zero or more seconds, got {tolerance_secs}"
                    )));
                }
                secrets
                    .iter()
                    .enumerate()
                    .map(|(i, secret)| {
                        standard_webhooks::parse_secret(secret.expose())
                            .map_err(|e| ConfigError(format!("callback secret #{}: {}", i + 1, e.0)))
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(Self { scheme, secrets, hmac_keys, tolerance_secs })
    }

    /// The configured scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Easemob scheme: index of the secret that makes `security` match.
    pub fn verify_easemob(&self, call_id: &str, timestamp_text: &str, security: &str) -> Result<usize, VerifyError> {
        easemob::verify(call_id, timestamp_text, security, &self.secrets)
    }

    /// standard-webhooks scheme: index of the secret whose HMAC matches one signature entry.
    pub fn verify_standard(
        &self,
        headers: &axum::http::HeaderMap,
        body: &[u8],
        now_ms: i64,
    ) -> Result<usize, VerifyError> {
        // Floor division, so a clock before 1970 still rounds towards the past like the sender's.
        let now_secs = now_ms.div_euclid(1000);
        standard_webhooks::verify(headers, body, &self.hmac_keys, now_secs, self.tolerance_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn no_secret_is_a_config_error_that_says_what_to_do() {
        for scheme in [Scheme::Easemob, Scheme::StandardWebhooks] {
            let err = Verifier::new(scheme, vec![], 300).expect_err("no secret");
            assert!(err.0.contains("at least one secret"), "{}", err.0);
        }
    }

    #[test]
    fn every_reason_is_listed_for_purge() {
        let all = [
            VerifyError::MissingHeader("webhook-id"),
            VerifyError::Malformed("x"),
            VerifyError::TimestampOutOfTolerance,
            VerifyError::Mismatch,
        ];
        let reasons: Vec<&str> = all.iter().map(VerifyError::reason).collect();
        assert_eq!(reasons, VerifyError::REASONS);
    }

    #[test]
    fn empty_secret_is_a_config_error() {
        let err = Verifier::new(Scheme::Easemob, vec![Secret::new("a"), Secret::new("")], 300).expect_err("empty");
        assert!(err.0.contains("#2"), "{}", err.0);
    }

    #[test]
    fn standard_webhooks_rejects_a_secret_that_is_not_whsec_and_does_not_echo_it() {
        let secrets = vec![Secret::new(SPEC_SECRET), Secret::new("hunter2-plain")];
        let err = Verifier::new(Scheme::StandardWebhooks, secrets, 300).expect_err("plain secret");
        assert!(err.0.contains("#2") && err.0.contains("whsec_"), "{}", err.0);
        assert!(!err.0.contains("hunter2"), "{}", err.0);
    }

    #[test]
    fn standard_webhooks_rejects_a_negative_tolerance() {
        assert!(Verifier::new(Scheme::StandardWebhooks, vec![Secret::new(SPEC_SECRET)], -1).is_err());
    }

    #[test]
    fn easemob_accepts_any_non_empty_secret_text() {
        let verifier = Verifier::new(Scheme::Easemob, vec![Secret::new("not-base64!")], 0).expect("valid");
        assert_eq!(verifier.scheme(), Scheme::Easemob);
    }

    #[test]
    fn debug_never_shows_secrets_or_keys() {
        let verifier = Verifier::new(Scheme::StandardWebhooks, vec![Secret::new(SPEC_SECRET)], 300).expect("valid");
        let text = format!("{verifier:?}");
        assert!(!text.contains("MfKQ") && !text.contains("hmac_keys"), "{text}");
    }

    #[test]
    fn verify_easemob_uses_the_configured_secrets_in_order() {
        let secrets = vec![Secret::new("old"), Secret::new("test-secret")];
        let verifier = Verifier::new(Scheme::Easemob, secrets, 0).expect("valid");
        let result = verifier.verify_easemob(
            "demo-org#demo-app_966725899779049516",
            "1642648213494",
            "bac67bdb1f935f86b3eaa30286975387",
        );
        assert_eq!(result, Ok(1));
    }

    #[test]
    fn verify_standard_converts_now_from_milliseconds() {
        let verifier = Verifier::new(Scheme::StandardWebhooks, vec![Secret::new(SPEC_SECRET)], 10).expect("valid");
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", HeaderValue::from_static("msg_p5jXN8AQM9LWM0D4loKWxJek"));
        headers.insert("webhook-timestamp", HeaderValue::from_static("1614265330"));
        headers
            .insert("webhook-signature", HeaderValue::from_static("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="));
        let body = br#"{"test": 2432232314}"#;
        // 10 s after the timestamp, to the last millisecond, is within a 10 s tolerance...
        assert_eq!(verifier.verify_standard(&headers, body, 1_614_265_340_999), Ok(0));
        // ...and 11 s is not.
        assert_eq!(
            verifier.verify_standard(&headers, body, 1_614_265_341_000),
            Err(VerifyError::TimestampOutOfTolerance)
        );
    }
}
