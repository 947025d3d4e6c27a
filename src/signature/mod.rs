//! Callback signature verification: pure functions, no I/O; "now" is passed in.
//!
//! STUB: to be implemented (see the interface below; signatures are fixed).

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
#[derive(Debug, Clone)]
pub struct Verifier {
    scheme: Scheme,
    secrets: Vec<Secret>,
    hmac_keys: Vec<Vec<u8>>,
    tolerance_secs: i64,
}

impl Verifier {
    /// Builds a verifier. For standard-webhooks every secret must be `whsec_<base64>`.
    pub fn new(scheme: Scheme, secrets: Vec<Secret>, tolerance_secs: i64) -> Result<Self, ConfigError> {
        let _ = (scheme, &secrets, tolerance_secs);
        todo!("signature::Verifier::new")
    }

    /// The configured scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Easemob scheme: index of the secret that makes `security` match.
    pub fn verify_easemob(&self, call_id: &str, timestamp_text: &str, security: &str) -> Result<usize, VerifyError> {
        let _ = (call_id, timestamp_text, security, &self.secrets);
        todo!()
    }

    /// standard-webhooks scheme: index of the secret whose HMAC matches one signature entry.
    pub fn verify_standard(&self, headers: &axum::http::HeaderMap, body: &[u8], now_ms: i64) -> Result<usize, VerifyError> {
        let _ = (headers, body, now_ms, &self.hmac_keys, self.tolerance_secs);
        todo!()
    }
}
