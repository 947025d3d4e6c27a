//! How a client call or the client's construction can fail.
//!
//! [`ApiFailure`] separates the two outcomes a caller must treat differently: `Rejected` means
//! Easemob gave a final answer (the operation was not done, and repeating it unchanged will not
//! help), `Failed` means the client gave up (retries exhausted, transport trouble, or a refusal
//! after an attempt whose fate is unknown), so the operation may or may not have happened, and
//! `NoToken` that no app token could be had for an attempt (which of the two that amounts to is
//! told by [`ApiFailure::may_have_acted`]).

use serde_json::Value;

use super::body::ErrorBody;

/// Why an API call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    /// Easemob answered a final 4xx (e.g. 403 exceed_limit, 404 service_resource_not_found,
    /// 401 after one refresh+retry).
    ///
    /// The client answers a username that cannot be put into a URL path (see
    /// [`validate_username`](super::validate_username)) the way Easemob would, with 400
    /// `illegal_argument`, without sending anything: `attempts` is then 0.
    #[error("Easemob rejected the request: HTTP {status} {}", describe(.error.as_ref(), .body.as_ref()))]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The parsed error body, when the body was one.
        error: Option<ErrorBody>,
        /// The raw body, when there was one.
        body: Option<Value>,
        /// HTTP attempts made for this call.
        attempts: u32,
    },
    /// Retries exhausted on 429/5xx, or a transport error/timeout; or a final 4xx after an
    /// attempt that got a 5xx or no answer, which may have done the operation (`reason` says so).
    #[error("Easemob call failed after {attempts} attempt(s): {reason}")]
    Failed {
        /// The last HTTP status, if an answer was received at all.
        status: Option<u16>,
        /// The last parsed error body.
        error: Option<ErrorBody>,
        /// The last raw body.
        body: Option<Value>,
        /// HTTP attempts made for this call (0 when no token could be had).
        attempts: u32,
        /// What went wrong and, where there is something to do, what to do.
        reason: String,
        /// When the last attempt got no answer at all: how it ended ([`NoAnswer`]). Its own,
        /// not read from `reason`, which also tells of earlier attempts.
        no_answer: Option<NoAnswer>,
    },
    /// No app token could be had for an attempt: before the first one (the token endpoint refused
    /// the credentials or did not answer), or after Easemob refused the call's token with 401 and
    /// its renewal failed (the console's client secret was changed, say), or before a retry.
    ///
    /// `status`, `error` and `body` are the call's own last answer, if it was sent at all; the
    /// token endpoint's answer is in `reason` (which says what to fix) and `token_status`.
    #[error("{}", no_token_text(*.attempts, .reason))]
    NoToken {
        /// The call's last HTTP status, if an attempt was answered.
        status: Option<u16>,
        /// The call's last parsed error body.
        error: Option<ErrorBody>,
        /// The call's last raw body.
        body: Option<Value>,
        /// HTTP attempts made for this call.
        attempts: u32,
        /// The token endpoint's status, if it answered.
        token_status: Option<u16>,
        /// Whether an earlier attempt got a 5xx or no answer after it was sent, so that the
        /// operation may have been done.
        may_have_acted: bool,
        /// Why no token could be had, what to fix, and what became of the call.
        reason: String,
    },
    /// The client was stopped ([`EasemobClient::stop_sending`](super::EasemobClient::stop_sending):
    /// the service is shutting down) before the call's first attempt, or the caller's
    /// [`BeforeFirstSend`](super::BeforeFirstSend) failed; nothing was sent.
    #[error("{reason}")]
    NotSent {
        /// Why, and that it is safe to send again.
        reason: String,
    },
}

/// [`ApiFailure::NoToken`]'s text: "not sent" when it never was.
fn no_token_text(attempts: u32, reason: &str) -> String {
    match attempts {
        0 => format!("Easemob call not sent, for want of an app token: {reason}"),
        n => format!("Easemob call failed for want of an app token after {n} attempt(s): {reason}"),
    }
}

/// How the `reason` of a failure for want of an app token starts.
pub(crate) const TOKEN_REASON_PREFIX: &str = "token: ";

impl ApiFailure {
    /// Whether no app token could be had: see [`ApiFailure::NoToken`].
    pub fn is_token_failure(&self) -> bool {
        matches!(self, ApiFailure::NoToken { .. })
    }

    /// Whether the operation may have been done: never after a refusal, always after a `Failed`
    /// give-up, and after a missing token only if an earlier attempt may have acted.
    pub fn may_have_acted(&self) -> bool {
        match self {
            ApiFailure::Rejected { .. } | ApiFailure::NotSent { .. } => false,
            ApiFailure::Failed { .. } => true,
            ApiFailure::NoToken { may_have_acted, .. } => *may_have_acted,
        }
    }

    /// Whether what failed may pass later by itself (429, 5xx, no answer), as opposed to an
    /// answer that stays the same until something is fixed (wrong credentials, say).
    pub fn may_pass_later(&self) -> bool {
        let transient = |status: &Option<u16>| status.is_none_or(|s| s == 429 || s >= 500);
        match self {
            ApiFailure::Rejected { .. } => false,
            ApiFailure::Failed { status, .. } => transient(status),
            ApiFailure::NoToken { token_status, .. } => transient(token_status),
            ApiFailure::NotSent { .. } => true,
        }
    }

    /// HTTP attempts made for this call (token fetches not counted).
    pub fn attempts(&self) -> u32 {
        match self {
            ApiFailure::Rejected { attempts, .. }
            | ApiFailure::Failed { attempts, .. }
            | ApiFailure::NoToken { attempts, .. } => *attempts,
            ApiFailure::NotSent { .. } => 0,
        }
    }

    /// The last HTTP status Easemob answered the call with, if any.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            ApiFailure::Rejected { status, .. } => Some(*status),
            ApiFailure::Failed { status, .. } | ApiFailure::NoToken { status, .. } => *status,
            ApiFailure::NotSent { .. } => None,
        }
    }

    /// Easemob's error type (`ErrorBody::error`), or `"timeout"`/`"transport"` for a failure
    /// where no answer arrived at all.
    pub fn upstream_error(&self) -> Option<&str> {
        match self {
            ApiFailure::Rejected { error, .. } => error.as_ref().map(|e| e.error.as_str()),
            ApiFailure::Failed { error: Some(error), .. } | ApiFailure::NoToken { error: Some(error), .. } => {
                Some(error.error.as_str())
            }
            // The call was answered without an error body, or not sent at all for want of a token.
            ApiFailure::NoToken { .. } | ApiFailure::NotSent { .. } => None,
            ApiFailure::Failed { no_answer: Some(NoAnswer::TimedOut), .. } => Some("timeout"),
            ApiFailure::Failed { no_answer: Some(NoAnswer::Transport), .. } => Some("transport"),
            // Answered (an HTML 502 page, an empty 503), or Easemob's answer was not usable.
            ApiFailure::Failed { no_answer: None, .. } => None,
        }
    }

    /// What to keep with the call's record: for a refusal, Easemob's answer (status, error type
    /// and description); for a failure, why the client gave up and what to check.
    pub fn detail(&self) -> String {
        match self {
            ApiFailure::Rejected { .. } => self.to_string(),
            ApiFailure::Failed { reason, .. } | ApiFailure::NoToken { reason, .. } | ApiFailure::NotSent { reason } => {
                reason.clone()
            }
        }
    }

    /// The raw body of the last answer, if there was one.
    pub fn body(&self) -> Option<&Value> {
        match self {
            ApiFailure::Rejected { body, .. } | ApiFailure::Failed { body, .. } | ApiFailure::NoToken { body, .. } => {
                body.as_ref()
            }
            ApiFailure::NotSent { .. } => None,
        }
    }
}

/// Marker the client puts into a `Failed` reason when the request (or the connection) ran out
/// of time, which is how [`ApiFailure::upstream_error`] tells a timeout from other transport
/// trouble.
pub(crate) const TIMED_OUT: &str = "timed out";

/// How an attempt that got no answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// The connect or request timeout passed.
    TimedOut,
    /// The connection could not be made or broke.
    Transport,
}

fn describe(error: Option<&ErrorBody>, body: Option<&Value>) -> String {
    match (error, body) {
        (Some(error), _) => error.summary(),
        (None, Some(Value::String(text))) => text.chars().take(200).collect(),
        (None, Some(body)) => body.to_string().chars().take(200).collect(),
        (None, None) => "(no body)".into(),
    }
}

/// Why an [`EasemobClient`](super::EasemobClient) could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL does not parse or cannot carry a path.
    #[error("invalid Easemob base URL {url:?}: {reason}; expected something like https://a1.easemob.com")]
    InvalidBaseUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid Easemob client setting: {0}")]
    InvalidConfig(String),
    /// The HTTP client (TLS backend, connection pool) could not be initialised.
    #[error("could not initialise the HTTP client for Easemob: {0}")]
    Http(#[source] reqwest::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn failed(reason: &str, error: Option<ErrorBody>, no_answer: Option<NoAnswer>) -> ApiFailure {
        ApiFailure::Failed { status: None, error, body: None, attempts: 3, reason: reason.into(), no_answer }
    }

    #[test]
    fn upstream_error_names_the_error_type_or_the_kind_of_transport_failure() {
        let body = ErrorBody {
            error: "reach_limit".into(),
            exception: None,
            timestamp: None,
            duration: None,
            error_description: None,
        };
        assert_eq!(failed("x", Some(body.clone()), None).upstream_error(), Some("reach_limit"));
        assert_eq!(
            failed("request timed out after 15s", None, Some(NoAnswer::TimedOut)).upstream_error(),
            Some("timeout")
        );
        assert_eq!(failed("connection refused", None, Some(NoAnswer::Transport)).upstream_error(), Some("transport"));
        // The last attempt decides, not an earlier one the reason also tells of.
        let refused_after_a_timeout = failed(
            "gave up after 2 attempt(s); last: could not connect: connection refused; an attempt (request timed \
             out) may have been carried out: check the result in Easemob before trying again",
            None,
            Some(NoAnswer::Transport),
        );
        assert_eq!(refused_after_a_timeout.upstream_error(), Some("transport"));
        let rejected = ApiFailure::Rejected { status: 404, error: None, body: Some(json!("not found")), attempts: 1 };
        assert_eq!(rejected.upstream_error(), None);
        assert_eq!(rejected.upstream_status(), Some(404));
        assert_eq!(rejected.body(), Some(&json!("not found")));
        assert_eq!(rejected.attempts(), 1);

        let html_502 = ApiFailure::Failed {
            status: Some(502),
            error: None,
            body: Some(json!("<html>")),
            attempts: 5,
            reason: "x".into(),
            no_answer: None,
        };
        assert_eq!(html_502.upstream_error(), None);
        assert_eq!(html_502.upstream_status(), Some(502));
    }

    #[test]
    fn messages_carry_the_error_summary() {
        let rejected = ApiFailure::Rejected {
            status: 403,
            error: Some(ErrorBody {
                error: "exceed_limit".into(),
                exception: None,
                timestamp: None,
                duration: None,
                error_description: Some("user contact number exceed limit".into()),
            }),
            body: None,
            attempts: 1,
        };
        assert_eq!(
            rejected.to_string(),
            "Easemob rejected the request: HTTP 403 exceed_limit (user contact number exceed limit)"
        );
    }
}
