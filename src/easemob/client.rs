//! The HTTP side of the client: the endpoints, and the attempt loop every call goes through.
//!
//! One call = pacer, token (taken after the turn, so a call that waited never sends a token that
//! expired or was renewed meanwhile), HTTP attempt, then by the answer:
//! - 2xx: done; for a call that changes something, even when the body is cut short (the status
//!   line says it was done).
//! - 401: the token is dropped, a new one fetched, and the call re-sent once; a second 401 is
//!   final (`Rejected`). The docs warn that a token can stop working before `expires_in`. A 401
//!   to a token another call has renewed since gets one retry with the new token, without using
//!   up that one renewal.
//! - 429 (but `resource_limited`, the plan's limit), 5xx, transport error or timeout: back off
//!   (see [`backoff`](super::backoff); at least the answer's `Retry-After`) and try again, while
//!   fewer than `max_attempts` attempts were made and `max_retry_time` since the first attempt is
//!   not used up; then `Failed`. A 429 also holds every call of the client back for a second.
//! - any other status, and a 500 whose error type says the method or URL is wrong
//!   (`unsupported_service_operation`, `web_application`, `no_full_text_index`): final
//!   (`Rejected`), with Easemob's error body; but `Failed` if an earlier
//!   attempt got a 5xx or no answer, since that attempt may have done what the final answer
//!   says was not done (a retried add refused with 403 `exceed_limit` because the first one added).
//!
//! The token request is not paced (Easemob limits `/token` separately, at 300/s) and is not
//! counted in `attempts`.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Method, Url};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::backoff::backoff_delay;
use super::body::{ApiSuccess, Envelope, ErrorBody, NewUser, body_to_value};
use super::config::ClientConfig;
use super::error::{ApiFailure, ClientError, NoAnswer, TIMED_OUT, TOKEN_REASON_PREFIX};
use super::pacer::{Lane, RequestPacer};
use super::token::{AppToken, FetchedToken, TokenCache, TokenFailure};
use super::username::validate_username;
use crate::clock::SharedClock;
use crate::secret::Secret;

/// What a caller runs once a changing call's turn under the rate limit has come, before its
/// first request leaves: its chance to record, durably, that the call is about to be sent, so
/// that a stop between then and the answer can be told from one before it. An `Err` ends the
/// call as [`ApiFailure::NotSent`] with that text as its reason, nothing sent.
pub type BeforeFirstSend = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// How a call that changes something is sent ([`EasemobClient::change_friendship_with`]).
#[derive(Default)]
pub struct Sending {
    /// Its queue under the rate limit.
    pub lane: Lane,
    /// Run once its turn has come, before its first request leaves.
    pub before_first_send: Option<BeforeFirstSend>,
}

/// Most of an answer the client reads. Easemob's answers are a few KB (a full friend list of
/// 3,000 names some 60 KB); anything longer is not Easemob (a wrong base URL serving a large
/// page, say), and read whole it would be held by each of up to 1,000 concurrent calls and stored
/// in each call's record. The rest is left unread; what was read is kept for diagnosis.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// How long a 429 holds every call of the client back (Easemob counts requests per second).
const RATE_LIMITED_PAUSE: Duration = Duration::from_secs(1);

/// Longest `Retry-After` honoured: a larger one would outlast any retry budget.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A `Retry-After` in seconds (the HTTP-date form is not used by API gateways in practice),
/// capped at [`MAX_RETRY_AFTER`].
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// The answer's body, cut at [`MAX_ANSWER_BYTES`]; with the error that cut it short, if the
/// connection failed before its end (what arrived until then is kept).
async fn read_capped(mut response: reqwest::Response) -> (Bytes, Option<reqwest::Error>) {
    let mut body = bytes::BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ANSWER_BYTES - body.len();
                if chunk.len() >= room {
                    body.extend_from_slice(&chunk[..room]);
                    return (body.freeze(), None);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return (body.freeze(), None),
            Err(error) => return (body.freeze(), Some(error)),
        }
    }
}

/// Most users Easemob accepts in one batch registration; larger input is sent in chunks.
pub const MAX_USERS_PER_REGISTER: usize = 60;

const USER_AGENT: &str = concat!("friendhook/", env!("CARGO_PKG_VERSION"));
const JSON: &str = "application/json";

/// One bucket of Easemob's exception cache, as `callbacks/storage/info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheBucket {
    /// The bucket's key: its start, `yyyyMMddHHmm` (pass it back as it is).
    pub date: String,
    /// Callbacks in it.
    pub size: u64,
    /// Re-sends asked for so far (Easemob recommends at most 10 per bucket).
    #[serde(default)]
    pub retry: u32,
}

/// Client for one Easemob App Key. Cheap to clone: clones share the token cache, the rate
/// limiter and the connection pool, so build one per App Key and clone it.
#[derive(Clone)]
pub struct EasemobClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    /// `base_url` + `/{org}/{app}`, validated once.
    app_url: Url,
    http: reqwest::Client,
    tokens: TokenCache,
    pacer: RequestPacer,
    /// Set by [`EasemobClient::stop_sending`].
    stopped: tokio::sync::watch::Sender<bool>,
    /// Calls that ended [`ApiFailure::NotSent`] because of it.
    not_sent: std::sync::atomic::AtomicU64,
    /// The calls after which Easemob sends callbacks, for [`EasemobClient::callbacks_settled`].
    callback_calls: tokio::sync::watch::Sender<CallbackCalls>,
    jitter: Mutex<StdRng>,
}

impl fmt::Debug for EasemobClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config's Debug redacts the secret; the token is never shown.
        f.debug_struct("EasemobClient")
            .field("app_url", &self.inner.app_url.as_str())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// One request as the attempt loop sees it.
struct Call {
    method: Method,
    url: Url,
    body: Option<Bytes>,
}

/// What one HTTP attempt produced.
enum Answer {
    Received {
        status: u16,
        body: Value,
        retry_after: Option<Duration>,
        cut_short: bool,
    },
    /// No (whole) answer. `sent` is false when the connection could not even be made, so that
    /// Easemob cannot have seen the request.
    NotReceived {
        reason: String,
        sent: bool,
        /// How it ended, for the call's `upstream_error`.
        how: NoAnswer,
    },
}

/// A call's last answer (status, error body, raw body), kept for a failure that follows it.
type LastAnswer = (Option<u16>, Option<ErrorBody>, Option<Value>);

/// How one token request failed.
enum TokenTry {
    /// A 429, a 5xx or no (whole) answer: asking again may pass, not before `wait` (from a
    /// `Retry-After`, or the second a 429 asks for).
    Transient(TokenFailure, Option<Duration>),
    /// Refused credentials, an unknown App Key, an answer without a token: asking again will not.
    Final(TokenFailure),
}

/// The calls after which Easemob sends callbacks: how many are running, when the last one ended.
#[derive(Debug, Clone, Copy, Default)]
struct CallbackCalls {
    running: u32,
    last_answered: Option<Instant>,
}

impl EasemobClient {
    /// Builds a client; nothing is sent until the first call (the token is fetched lazily).
    pub fn new(config: ClientConfig, clock: SharedClock) -> Result<Self, ClientError> {
        let app_url = app_url(&config)?;
        let rate = NonZeroU32::new(config.rate_limit_per_sec)
            .ok_or_else(|| ClientError::InvalidConfig("rate_limit_per_sec must be at least 1".into()))?;
        if config.max_attempts == 0 {
            return Err(ClientError::InvalidConfig("max_attempts must be at least 1 (1 means no retries)".into()));
        }

        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(JSON));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // Easemob does not redirect; following one could turn a POST into a GET, and a 3xx
            // is better reported than guessed at.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(ClientError::Http)?;

        let jitter = match config.jitter_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };

        Ok(Self {
            inner: Arc::new(Inner {
                app_url,
                http,
                tokens: TokenCache::new(clock),
                pacer: RequestPacer::new(rate),
                stopped: tokio::sync::watch::Sender::new(false),
                not_sent: std::sync::atomic::AtomicU64::new(0),
                callback_calls: tokio::sync::watch::Sender::new(CallbackCalls::default()),
                jitter: Mutex::new(jitter),
                config,
            }),
        })
    }

    /// The App Key, `org#app`.
    pub fn app_key(&self) -> String {
        self.inner.config.app_key()
    }

    /// Makes `owner` and `friend` friends of each other:
    /// `POST /{org}/{app}/users/{owner}/contacts/users/{friend}`. Easemob adds both directions and
    /// fires the roster `add` callback. `envelope.entities[0]` is the friend.
    pub async fn add_friend(&self, owner: &str, friend: &str) -> Result<ApiSuccess, ApiFailure> {
        self.change_friendship(Method::POST, owner, friend, Sending::default()).await
    }

    /// Ends the friendship in both directions:
    /// `DELETE /{org}/{app}/users/{owner}/contacts/users/{friend}`; fires the roster `remove` callback.
    pub async fn delete_friend(&self, owner: &str, friend: &str) -> Result<ApiSuccess, ApiFailure> {
        self.change_friendship(Method::DELETE, owner, friend, Sending::default()).await
    }

    /// [`EasemobClient::add_friend`] (`remove` false) or [`EasemobClient::delete_friend`]
    /// (`remove` true), sent as `sending` says.
    pub async fn change_friendship_with(
        &self,
        remove: bool,
        owner: &str,
        friend: &str,
        sending: Sending,
    ) -> Result<ApiSuccess, ApiFailure> {
        let method = if remove { Method::DELETE } else { Method::POST };
        self.change_friendship(method, owner, friend, sending).await
    }

    async fn change_friendship(
        &self,
        method: Method,
        owner: &str,
        friend: &str,
        sending: Sending,
    ) -> Result<ApiSuccess, ApiFailure> {
        check_usernames(&[owner, friend]).map_err(|f| *f)?;
        let url = self.app_path(&["users", owner, "contacts", "users", friend]);
        self.followed_by_callbacks(self.send_with(method, url, None, sending)).await
    }

    /// The usernames `owner` is friends with: `GET /{org}/{app}/users/{owner}/contacts/users`
    /// (Easemob answers them in `data`).
    ///
    /// A 2xx whose `data` is not a list of usernames is reported as `Failed` rather than read as
    /// "no friends", so that reconciliation never acts on a misread list.
    pub async fn list_friends(&self, owner: &str) -> Result<Vec<String>, ApiFailure> {
        check_usernames(&[owner]).map_err(|f| *f)?;
        let url = self.app_path(&["users", owner, "contacts", "users"]);
        let success = self.send(Method::GET, url, None).await?;
        match usernames_in(success.envelope.data.as_ref()) {
            Some(friends) => Ok(friends),
            None => Err(ApiFailure::Failed {
                status: Some(success.status),
                error: None,
                reason: format!(
                    "Easemob answered {} to the friend list request, but its `data` is not a list of usernames; see `body`",
                    success.status
                ),
                body: Some(success.body),
                attempts: success.attempts,
                no_answer: None,
            }),
        }
    }

    /// Registers users with `POST /{org}/{app}/users` and an array body.
    ///
    /// Easemob takes at most [`MAX_USERS_PER_REGISTER`] (60) users per request, so longer input is
    /// sent in consecutive chunks of 60 and the answers merged: `entities` and `data` are
    /// concatenated, `attempts` summed, `status` is the last chunk's. Per-user failures (such as
    /// "already exists") arrive in `data` with a 200, as Easemob reports them. If a chunk fails,
    /// the call stops there and returns that failure (its `attempts` include the earlier chunks');
    /// the users of earlier chunks stay registered, which a warning in the log records. An empty
    /// slice is sent as `[]` and Easemob decides.
    pub async fn register_users(&self, users: &[NewUser]) -> Result<ApiSuccess, ApiFailure> {
        let url = self.app_path(&["users"]);
        if users.len() <= MAX_USERS_PER_REGISTER {
            return self.send(Method::POST, url, Some(json_bytes(&users))).await;
        }

        let mut merged: Option<ApiSuccess> = None;
        for (index, chunk) in users.chunks(MAX_USERS_PER_REGISTER).enumerate() {
            let earlier_attempts = merged.as_ref().map_or(0, |m| m.attempts);
            match self.send(Method::POST, url.clone(), Some(json_bytes(&chunk))).await {
                Ok(next) => {
                    merged = Some(match merged {
                        None => next,
                        Some(so_far) => merge_register_answers(so_far, next),
                    });
                }
                Err(failure) => {
                    let sent_before = index * MAX_USERS_PER_REGISTER;
                    if sent_before > 0 {
                        tracing::warn!(
                            registered_chunks = index,
                            users_before_failure = sent_before,
                            total_users = users.len(),
                            "batch registration stopped part-way; users of earlier chunks were registered"
                        );
                    }
                    return Err(add_attempts(failure, earlier_attempts, sent_before));
                }
            }
        }
        // More than 60 users means at least two chunks, so `merged` is set.
        merged.ok_or_else(|| ApiFailure::Failed {
            status: None,
            error: None,
            body: None,
            attempts: 0,
            reason: "internal: batch registration sent no chunk".into(),
            no_answer: None,
        })
    }

    /// Registers one user with `POST /{org}/{app}/users` and an object body.
    pub async fn register_user(&self, user: &NewUser) -> Result<ApiSuccess, ApiFailure> {
        let url = self.app_path(&["users"]);
        self.send(Method::POST, url, Some(json_bytes(user))).await
    }

    /// One user's details: `GET /{org}/{app}/users/{username}`; 404 `service_resource_not_found`
    /// (as `Rejected`) when there is no such user.
    pub async fn get_user(&self, username: &str) -> Result<ApiSuccess, ApiFailure> {
        check_usernames(&[username]).map_err(|f| *f)?;
        let url = self.app_path(&["users", username]);
        self.send(Method::GET, url, None).await
    }

    /// The buckets of Easemob's exception cache (回调异常缓存, a paid add-on that keeps callbacks
    /// whose delivery failed for 3 days, in 10-minute buckets):
    /// `GET /{org}/{app}/callbacks/storage/info`. Without the add-on Easemob answers 403.
    ///
    /// A 2xx whose `data` is not a list of buckets is `Failed`, like a misread friend list.
    pub async fn exception_cache_buckets(&self) -> Result<Vec<CacheBucket>, ApiFailure> {
        let url = self.app_path(&["callbacks", "storage", "info"]);
        let success = self.send(Method::GET, url, None).await?;
        match success.envelope.data.clone().map(serde_json::from_value::<Vec<CacheBucket>>) {
            Some(Ok(buckets)) => Ok(buckets),
            _ => Err(ApiFailure::Failed {
                status: Some(success.status),
                error: None,
                reason: format!(
                    "Easemob answered {} to the exception cache request, but its `data` is not a list of buckets; see `body`",
                    success.status
                ),
                body: Some(success.body),
                attempts: success.attempts,
                no_answer: None,
            }),
        }
    }

    /// Asks Easemob to send the callbacks of one exception-cache bucket again:
    /// `POST /{org}/{app}/callbacks/storage/retry` with `date` (the bucket's key), `retry` (the
    /// caller's count of earlier re-sends of it) and `targetUrl` (default: the rule's URL). True
    /// when Easemob answers `"success"` (the re-send is started; the callbacks arrive by the
    /// usual way), false for `"failure"` (no such bucket, say). An answer cut short after its
    /// 200 counts as started: which it was cannot be read, and the bucket's `retry` count in the
    /// next listing tells.
    pub async fn exception_cache_resend(
        &self,
        date: &str,
        retry: u32,
        target_url: Option<&str>,
    ) -> Result<bool, ApiFailure> {
        let url = self.app_path(&["callbacks", "storage", "retry"]);
        let mut body = serde_json::json!({"date": date, "retry": retry});
        if let Some(target) = target_url {
            body["targetUrl"] = serde_json::json!(target);
        }
        let success = self.followed_by_callbacks(self.send(Method::POST, url, Some(json_bytes(&body)))).await?;
        Ok(success.cut_short || success.envelope.data.as_ref().and_then(Value::as_str) == Some("success"))
    }

    /// `{base}/{org}/{app}/{segments...}`, each segment percent-encoded.
    fn app_path(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.app_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        url
    }

    /// The attempt loop (see the module docs).
    async fn send(&self, method: Method, url: Url, body: Option<Bytes>) -> Result<ApiSuccess, ApiFailure> {
        self.send_with(method, url, body, Sending::default()).await
    }

    /// [`Self::send`], in `sending`'s lane, running its `before_first_send` after the first turn
    /// and token.
    async fn send_with(
        &self,
        method: Method,
        url: Url,
        body: Option<Bytes>,
        sending: Sending,
    ) -> Result<ApiSuccess, ApiFailure> {
        let Sending { lane, mut before_first_send } = sending;
        let call = Call { method, url, body };
        let config = &self.inner.config;
        let mut attempts: u32 = 0;
        let mut retries: u32 = 0;
        let mut renewed_after_401 = false;
        let mut retried_with_a_renewed_token = false;
        let mut first_attempt_at: Option<Instant> = None;
        // Why an earlier attempt's fate is unknown (a 5xx or no answer: Easemob may have acted).
        // A final answer after one is not final about the operation: a retried add can get 403
        // exceed_limit because the first attempt did add, a retried delete 404 because the first
        // did delete. A GET changes nothing, so its final answer stays final.
        let mut uncertain: Option<String> = None;
        let mut last: LastAnswer = (None, None, None);

        loop {
            let token = self.token_at_turn(attempts, uncertain.as_deref(), &last, lane).await?;
            if let Some(note) = before_first_send.take() {
                note.await.map_err(|reason| ApiFailure::NotSent { reason })?;
            }
            attempts += 1;
            let first_attempt_at = *first_attempt_at.get_or_insert_with(Instant::now);

            let (status, body, transport_reason, retry_after, cut_short, sent, no_answer) =
                match self.attempt(&call, &token).await {
                    Answer::Received { status, body, retry_after, cut_short } => {
                        tracing::debug!(
                            method = %call.method,
                            path = call.url.path(),
                            attempt = attempts,
                            status,
                            "Easemob answered"
                        );
                        (Some(status), body, None, retry_after, cut_short, true, None)
                    }
                    Answer::NotReceived { reason, sent, how } => {
                        tracing::debug!(
                            method = %call.method,
                            path = call.url.path(),
                            attempt = attempts,
                            reason = %reason,
                            "no answer from Easemob"
                        );
                        (None, Value::Null, Some(reason), None, false, sent, Some(how))
                    }
                };
            let error = ErrorBody::from_value(&body);
            let body = (!body.is_null()).then_some(body);
            last = (status, error.clone(), body.clone());

            let answered = |status: u16| match &error {
                Some(error) => format!("HTTP {status} {}", error.summary()),
                None => format!("HTTP {status}"),
            };
            // A 401 to a token another call has renewed since says nothing about the new one:
            // this call gets one retry with it, and keeps its own renewal for later.
            let renewed_elsewhere = status == Some(401) && self.inner.tokens.renewed_since(token.generation).await;
            let reason = match status {
                // Easemob answers a change with a JSON object. A success status with anything else
                // (an HTML page, nothing) is some proxy or portal answering in its place, or a
                // wrong base URL: not a success to record, and not one to send again either (it
                // may have passed the request on). A body cut short is the exception above.
                Some(status)
                    if (200..300).contains(&status)
                        && call.method != Method::GET
                        && !cut_short
                        && !body.as_ref().is_some_and(Value::is_object) =>
                {
                    let shown = match &body {
                        None => "no body".to_owned(),
                        Some(Value::String(text)) => format!("`{}`", text.chars().take(80).collect::<String>()),
                        Some(other) => format!("`{}`", other.to_string().chars().take(80).collect::<String>()),
                    };
                    tracing::warn!(
                        method = %call.method,
                        path = call.url.path(),
                        status,
                        "a success status without Easemob's JSON: is --easemob-base-url Easemob's REST host?"
                    );
                    return Err(ApiFailure::Failed {
                        status: Some(status),
                        error: None,
                        body,
                        attempts,
                        reason: format!(
                            "answered HTTP {status} with {shown}, not Easemob's JSON: something other than Easemob \
                             answered (check --easemob-base-url and any proxy on the way); Easemob may or may not \
                             have acted, so check the pair's friend list before sending again"
                        ),
                        no_answer: None,
                    });
                }
                Some(status) if (200..300).contains(&status) => {
                    let body = body.unwrap_or(Value::Null);
                    return Ok(ApiSuccess { status, envelope: Envelope::from_value(&body), body, attempts, cut_short });
                }
                Some(401) if renewed_elsewhere && !retried_with_a_renewed_token => {
                    retried_with_a_renewed_token = true;
                    tracing::debug!(
                        method = %call.method,
                        path = call.url.path(),
                        attempt = attempts,
                        "Easemob refused a token another call has renewed since; retrying with the new one"
                    );
                    continue;
                }
                Some(401) if !renewed_after_401 => {
                    renewed_after_401 = true;
                    self.inner.tokens.invalidate(token.generation).await;
                    tracing::warn!(
                        method = %call.method,
                        path = call.url.path(),
                        attempt = attempts,
                        error = error.as_ref().map(|e| e.error.as_str()),
                        "Easemob refused the app token; fetching a new one and retrying once"
                    );
                    continue;
                }
                // `resource_limited` is the plan's limit (users on the free plan), not the rate
                // limit: retrying cannot help.
                Some(429) if error.as_ref().is_none_or(|e| e.error != "resource_limited") => {
                    // The App Key's budget for this second is spent, for every call of this
                    // client: hold them all back, not only this one.
                    self.inner.pacer.hold_for(RATE_LIMITED_PAUSE);
                    answered(429)
                }
                Some(status) if (500..600).contains(&status) && !names_a_wrong_request(error.as_ref()) => {
                    answered(status)
                }
                Some(status) => {
                    return Err(match uncertain {
                        None => ApiFailure::Rejected { status, error, body, attempts },
                        Some(earlier) => {
                            let answer = answered(status);
                            ApiFailure::Failed {
                                status: Some(status),
                                error,
                                body,
                                attempts,
                                no_answer: None,
                                reason: format!(
                                    "attempt {attempts} was answered {answer}, but an earlier attempt ({earlier}) may \
                                     have been carried out: check the result in Easemob before trying again"
                                ),
                            }
                        }
                    });
                }
                None => transport_reason.unwrap_or_default(),
            };
            // A 5xx or no answer: this attempt may have acted (a 429 was refused before acting,
            // and a request whose connection could not be made never reached Easemob).
            if call.method != Method::GET && sent && status.is_none_or(|s| (500..600).contains(&s)) {
                uncertain = Some(reason.clone());
            }

            let failed = |reason: String| ApiFailure::Failed {
                status,
                error: error.clone(),
                body: body.clone(),
                attempts,
                reason,
                no_answer,
            };
            // A give-up after an attempt that may have acted says so, and what to check.
            // A changing call none of whose attempts can have acted (refused 429s, connections
            // never made) says that too: it is safe to send again.
            let may_have_acted = match &uncertain {
                Some(earlier) => format!(
                    "; an attempt ({earlier}) may have been carried out: check the result in Easemob before trying \
                     again"
                ),
                None if call.method != Method::GET => {
                    "; no attempt can have been carried out: safe to send again".into()
                }
                None => String::new(),
            };
            // Easemob documents no Retry-After, but a gateway in front of it may send one.
            let delay = self.next_backoff(retries).max(retry_after.unwrap_or_default());
            let elapsed = first_attempt_at.elapsed();
            let give_up = if attempts >= config.max_attempts {
                Some(format!("gave up after {attempts} attempt(s) (max_attempts); last: {reason}{may_have_acted}"))
            } else if elapsed + delay > config.max_retry_time {
                Some(format!(
                    "gave up after {attempts} attempt(s): a retry in {delay:?} would pass max_retry_time ({:?}, {elapsed:?} used); last: {reason}{may_have_acted}",
                    config.max_retry_time
                ))
            } else {
                None
            };
            if let Some(reason) = give_up {
                // The retries were logged one by one; so is their end.
                tracing::warn!(method = %call.method, path = call.url.path(), attempts, reason = %reason,
                    "Easemob call failed for good");
                return Err(failed(reason));
            }
            tracing::warn!(
                method = %call.method,
                path = call.url.path(),
                attempt = attempts,
                status,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                reason = %reason,
                "Easemob call failed; retrying after backoff"
            );
            tokio::time::sleep(delay).await;
            retries += 1;
        }
    }

    /// One HTTP exchange.
    async fn attempt(&self, call: &Call, token: &AppToken) -> Answer {
        let mut request = self
            .inner
            .http
            .request(call.method.clone(), call.url.clone())
            // bearer_auth marks the header sensitive, so reqwest's own Debug hides it too.
            .bearer_auth(token.value.expose());
        if let Some(body) = &call.body {
            request = request.body(body.clone());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                // A failed connect (refused, unreachable, TLS handshake) sent nothing; any other
                // error may have come after the request went out.
                return Answer::NotReceived {
                    reason: self.describe_transport_error(&error),
                    sent: !error.is_connect(),
                    how: no_answer(&error),
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        match read_capped(response).await {
            (bytes, None) => Answer::Received { status, body: body_to_value(&bytes), retry_after, cut_short: false },
            // A 2xx status line to a call that changes something says it was done: sent again,
            // an add could be answered 403 exceed_limit (or a delete 404) and a success recorded
            // as a failure. A read is simply asked again; it needs the whole body.
            (bytes, Some(error)) if (200..300).contains(&status) && call.method != Method::GET => {
                tracing::warn!(
                    method = %call.method,
                    path = call.url.path(),
                    status,
                    error = %self.describe_transport_error(&error),
                    "Easemob's answer was cut short after its success status; taken as done"
                );
                Answer::Received { status, body: body_to_value(&bytes), retry_after, cut_short: true }
            }
            (_, Some(error)) => Answer::NotReceived {
                reason: format!("answer {status} cut short: {}", self.describe_transport_error(&error)),
                sent: true,
                how: no_answer(&error),
            },
        }
    }

    /// The token for the next attempt, taken after the call's turn in the pacer: behind a batch
    /// a call can wait there for seconds, and a token taken before could have expired or been
    /// renewed meanwhile, so a whole queue would be sent with a dead token. No turn is spent
    /// while no token can be had; and when the token has to be fetched after the turn (it went
    /// away while the call waited), the call fetches it and queues again, because every call
    /// whose turn came during the fetch would otherwise leave together when it arrives, a burst
    /// the pacer is there to prevent.
    async fn token_at_turn(
        &self,
        attempts: u32,
        uncertain: Option<&str>,
        last: &LastAnswer,
        lane: Lane,
    ) -> Result<AppToken, ApiFailure> {
        let no_token = |failure| token_failure(failure, attempts, uncertain, last.clone());
        // Bounded: a token endpoint handing out tokens that expire before a turn comes would
        // otherwise keep the call queueing; the third time, the fetched token is used.
        for _ in 0..2 {
            self.token().await.map_err(no_token)?;
            if attempts == 0 {
                // A call not sent yet is not sent once the service stops: its callback would
                // come to a receiver that no longer listens.
                tokio::select! {
                    biased;
                    () = self.stopped() => {
                        self.inner.not_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Err(ApiFailure::NotSent {
                            reason: "not sent: the service was stopping before the call's turn came; nothing reached \
                                     Easemob, so it is safe to send again"
                                .into(),
                        });
                    }
                    () = self.inner.pacer.wait_turn(lane) => {}
                }
            } else {
                self.inner.pacer.wait_turn(lane).await;
            }
            if let Some(token) = self.inner.tokens.cached().await {
                return Ok(token);
            }
        }
        self.token().await.map_err(no_token)
    }

    /// Gets an app token ready (from the cache, or fetched now), so that a caller can learn that
    /// nothing could be sent before it records anything: the failure is the one a call would get,
    /// with no attempts.
    pub async fn ensure_token(&self) -> Result<(), ApiFailure> {
        self.token().await.map(drop).map_err(|failure| token_failure(failure, 0, None, (None, None, None)))
    }

    /// The app token's state, for `/readyz` (nothing is asked of Easemob).
    pub async fn token_health(&self) -> crate::easemob::TokenHealth {
        self.inner.tokens.health().await
    }

    /// Sends no call that has not been sent yet: each one waiting for its turn (behind a batch,
    /// say) or starting from now on ends as [`ApiFailure::NotSent`]. Calls already sent finish,
    /// with their retries. For a service that is stopping.
    pub fn stop_sending(&self) {
        self.inner.stopped.send_replace(true);
    }

    /// Calls left unsent by [`EasemobClient::stop_sending`] so far.
    pub fn not_sent_at_stop(&self) -> u64 {
        self.inner.not_sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether [`EasemobClient::stop_sending`] was called.
    pub fn is_stopping(&self) -> bool {
        *self.inner.stopped.borrow()
    }

    /// Runs `call`, one after which Easemob sends callbacks (an add, a removal, a re-send of the
    /// exception cache), counted for [`EasemobClient::callbacks_settled`].
    async fn followed_by_callbacks<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, ApiFailure>>,
    ) -> Result<T, ApiFailure> {
        /// Counts the call out however it ends (a request dropped mid-call included).
        struct Ended<'a> {
            calls: &'a tokio::sync::watch::Sender<CallbackCalls>,
            sent: bool,
        }
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                self.calls.send_modify(|calls| {
                    calls.running -= 1;
                    if self.sent {
                        calls.last_answered = Some(Instant::now());
                    }
                });
            }
        }
        self.inner.callback_calls.send_modify(|calls| calls.running += 1);
        let mut ended = Ended { calls: &self.inner.callback_calls, sent: true };
        let result = call.await;
        // Left unsent by a stop: no callback will follow.
        ended.sent = !matches!(result, Err(ApiFailure::NotSent { .. }));
        result
    }

    /// Resolves once no call after which Easemob sends callbacks is running and the last one
    /// ended at least `linger` ago (at once if there was none). A stopping service keeps
    /// receiving callbacks until then: Easemob sends a call's callback after answering it, and
    /// one that finds the port closed is retried once and then dropped (and failing deliveries
    /// get the callback rule banned).
    pub async fn callbacks_settled(&self, linger: Duration) {
        let mut calls = self.inner.callback_calls.subscribe();
        loop {
            let now = *calls.borrow_and_update();
            if now.running > 0 {
                // The sender lives as long as the client.
                let _ = calls.changed().await;
                continue;
            }
            let since = now.last_answered.map_or(linger, |at| at.elapsed());
            if since >= linger {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(linger - since) => {}
                _ = calls.changed() => {}
            }
        }
    }

    async fn stopped(&self) {
        let mut stopped = self.inner.stopped.subscribe();
        // The sender lives as long as the client, so the wait ends only when stopped.
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }

    async fn token(&self) -> Result<AppToken, TokenFailure> {
        self.inner.tokens.get(|| self.fetch_token()).await
    }

    /// Obtains a token, retrying what may pass (429, 5xx, no answer) like an API call: up to
    /// `max_attempts` requests, none started later than `max_retry_time` after the first. Every
    /// call waiting for a token waits for this one fetch, so one lost answer from the token
    /// endpoint does not fail them all for the cooldown that follows a failed fetch.
    async fn fetch_token(&self) -> Result<FetchedToken, TokenFailure> {
        let config = &self.inner.config;
        let first_try_at = Instant::now();
        let mut tries: u32 = 0;
        loop {
            tries += 1;
            let failure = match self.fetch_token_once().await {
                Ok(fetched) => return Ok(fetched),
                Err(TokenTry::Final(failure)) => failure,
                Err(TokenTry::Transient(failure, wait)) => {
                    let delay = self.next_backoff(tries - 1).max(wait.unwrap_or_default());
                    let elapsed = first_try_at.elapsed();
                    if tries < config.max_attempts && elapsed + delay <= config.max_retry_time {
                        tracing::warn!(
                            try_number = tries,
                            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                            reason = %failure.reason,
                            "could not obtain an Easemob app token; asking again after backoff"
                        );
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    TokenFailure {
                        reason: format!(
                            "{} (after {tries} tr{}; asked again in {} s)",
                            failure.reason,
                            if tries == 1 { "y" } else { "ies" },
                            super::token::FAILURE_COOLDOWN_MS / 1000
                        ),
                        ..failure
                    }
                }
            };
            tracing::warn!(status = failure.status, reason = %failure.reason, "could not obtain an Easemob app token");
            return Err(failure);
        }
    }

    /// One `POST /{org}/{app}/token` with the client credentials.
    async fn fetch_token_once(&self) -> Result<FetchedToken, TokenTry> {
        let config = &self.inner.config;
        let url = self.app_path(&["token"]);
        tracing::debug!(path = url.path(), "fetching an Easemob app token");
        let request = json!({
            "grant_type": "client_credentials",
            "client_id": config.client_id,
            "client_secret": config.client_secret.expose(),
        });
        let failure = |status, reason| TokenFailure { status, reason };

        let response = self.inner.http.post(url.clone()).body(json_bytes(&request)).send().await.map_err(|error| {
            TokenTry::Transient(
                failure(
                    None,
                    format!(
                        "could not reach the token endpoint {url}: {}; check --easemob-base-url and the network",
                        self.describe_transport_error(&error)
                    ),
                ),
                None,
            )
        })?;
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        let (bytes, cut) = read_capped(response).await;
        if let Some(error) = cut {
            return Err(TokenTry::Transient(
                failure(
                    Some(status),
                    format!("the token endpoint's answer was cut short: {}", self.describe_transport_error(&error)),
                ),
                wait,
            ));
        }
        let body = body_to_value(&bytes);
        tracing::debug!(path = url.path(), status, "token endpoint answered");

        if (200..300).contains(&status) {
            let access_token = body.get("access_token").and_then(Value::as_str).filter(|token| !token.is_empty());
            let Some(access_token) = access_token else {
                // The body is not kept: it may hold a token under another name.
                return Err(TokenTry::Final(failure(
                    Some(status),
                    format!(
                        "the token endpoint answered {status} without an access_token; is --easemob-base-url ({}) Easemob's REST API?",
                        config.base_url
                    ),
                )));
            };
            // Missing or unreadable `expires_in` is treated as "no known expiry": the token is
            // then renewed when Easemob answers 401.
            let expires_in_secs = body
                .get("expires_in")
                .and_then(|v| v.as_i64().or_else(|| v.as_str()?.trim().parse().ok()))
                .unwrap_or(0);
            tracing::debug!(expires_in_secs, "obtained an Easemob app token");
            return Ok(FetchedToken { access_token: Secret::new(access_token), expires_in_secs });
        }

        let error = ErrorBody::from_value(&body);
        let summary = match &error {
            Some(error) => format!("{status} {}", error.summary()),
            None => format!("{status}"),
        };
        let reason = match status {
            400 | 401 | 403 => format!(
                "Easemob refused the app credentials ({summary}); check --easemob-client-id and --easemob-client-secret (Easemob console, application details)"
            ),
            404 => format!(
                "Easemob does not know the App Key {} ({summary}); check --easemob-org, --easemob-app and --easemob-base-url (each data centre has its own host)",
                config.app_key()
            ),
            _ => format!("the token endpoint answered {summary}"),
        };
        let failed = failure(Some(status), reason);
        Err(match status {
            // Like a call's 429, the token endpoint's asks for a second (it counts requests per
            // second: 300 for the App Key).
            429 => TokenTry::Transient(failed, Some(wait.unwrap_or_default().max(RATE_LIMITED_PAUSE))),
            500..=599 => TokenTry::Transient(failed, wait),
            _ => TokenTry::Final(failed),
        })
    }

    fn next_backoff(&self, retry: u32) -> Duration {
        let config = &self.inner.config;
        // A poisoned lock only means another call panicked mid-draw; the RNG is still usable.
        let mut rng = self.inner.jitter.lock().unwrap_or_else(PoisonError::into_inner);
        backoff_delay(retry, config.base_backoff, config.max_backoff, &mut rng)
    }

    fn describe_transport_error(&self, error: &reqwest::Error) -> String {
        let config = &self.inner.config;
        let chain = error_chain(error);
        if error.is_timeout() {
            format!(
                "request {TIMED_OUT} (connect_timeout {:?}, request_timeout {:?}): {chain}",
                config.connect_timeout, config.request_timeout
            )
        } else if error.is_connect() {
            format!("could not connect: {chain}")
        } else {
            format!("transport error: {chain}")
        }
    }
}

/// How a request that got no (whole) answer ended.
fn no_answer(error: &reqwest::Error) -> NoAnswer {
    if error.is_timeout() { NoAnswer::TimedOut } else { NoAnswer::Transport }
}

/// Checks usernames bound for a URL path: a name like `..` or `a/b` would address another
/// resource, so it is answered like Easemob would (400 `illegal_argument`) without sending
/// anything.
fn check_usernames(usernames: &[&str]) -> Result<(), Box<ApiFailure>> {
    for name in usernames {
        validate_username(name)
            .map_err(|problem| ApiFailure::Rejected {
                status: 400,
                error: Some(ErrorBody {
                    error: "illegal_argument".into(),
                    exception: None,
                    timestamp: None,
                    duration: None,
                    error_description: Some(format!("not sent: {problem}")),
                }),
                body: None,
                attempts: 0,
            })
            .map_err(Box::new)?;
    }
    Ok(())
}

/// `base_url` plus `/{org}/{app}`, checked once so that calls cannot fail on URL building.
fn app_url(config: &ClientConfig) -> Result<Url, ClientError> {
    let invalid = |reason: String| ClientError::InvalidBaseUrl { url: config.base_url.clone(), reason };
    let mut url = Url::parse(&config.base_url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("scheme {:?} is not http or https", url.scheme())));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host".into()));
    }
    for (name, value) in [("org", &config.org), ("app", &config.app)] {
        if value.is_empty() || value == "." || value == ".." || value.contains(['/', '#']) {
            return Err(ClientError::InvalidConfig(format!(
                "{name} {value:?} cannot be part of the App Key; expected the {name} name from the Easemob console"
            )));
        }
    }
    url.set_query(None);
    url.set_fragment(None);
    url.path_segments_mut()
        .map_err(|()| invalid("it cannot carry a path".into()))?
        .pop_if_empty()
        .extend([config.org.as_str(), config.app.as_str()]);
    Ok(url)
}

fn json_bytes<T: serde::Serialize + ?Sized>(value: &T) -> Bytes {
    // Serialising these plain structs cannot fail (string keys, no maps with other keys).
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Reads the friend list out of `data`: strings, or objects with a `username` (as the paged
/// endpoint answers). `None` when `data` is anything else.
fn usernames_in(data: Option<&Value>) -> Option<Vec<String>> {
    data?
        .as_array()?
        .iter()
        .map(|item| match item {
            Value::String(name) => Some(name.clone()),
            other => other.get("username")?.as_str().map(str::to_owned),
        })
        .collect()
}

fn merge_register_answers(mut so_far: ApiSuccess, next: ApiSuccess) -> ApiSuccess {
    for key in ["entities", "data"] {
        let Some(more) = next.body.get(key) else {
            continue;
        };
        match (so_far.body.get_mut(key), more) {
            (Some(Value::Array(items)), Value::Array(more)) => items.extend(more.iter().cloned()),
            (None, _) => {
                if let Some(object) = so_far.body.as_object_mut() {
                    object.insert(key.to_owned(), more.clone());
                }
            }
            _ => {}
        }
    }
    if let Some(object) = so_far.body.as_object_mut()
        && object.contains_key("count")
    {
        let count = object.get("entities").and_then(Value::as_array).map_or(0, Vec::len);
        object.insert("count".into(), json!(count));
    }
    ApiSuccess {
        status: next.status,
        envelope: Envelope::from_value(&so_far.body),
        body: so_far.body,
        attempts: so_far.attempts + next.attempts,
        cut_short: so_far.cut_short || next.cut_short,
    }
}

/// A chunk's failure, counted as the whole batch call's: earlier chunks' attempts added, and
/// (for `Failed`) the reason saying how many users went through before.
fn add_attempts(failure: ApiFailure, earlier: u32, users_before: usize) -> ApiFailure {
    let said = |reason: String| {
        if users_before > 0 {
            format!("{reason} (the first {users_before} users were sent in earlier chunks and registered)")
        } else {
            reason
        }
    };
    match failure {
        ApiFailure::Rejected { status, error, body, attempts } => {
            ApiFailure::Rejected { status, error, body, attempts: attempts + earlier }
        }
        ApiFailure::Failed { status, error, body, attempts, reason, no_answer } => {
            ApiFailure::Failed { status, error, body, attempts: attempts + earlier, reason: said(reason), no_answer }
        }
        ApiFailure::NotSent { reason } => ApiFailure::NotSent { reason: said(reason) },
        ApiFailure::NoToken { status, error, body, attempts, token_status, may_have_acted, reason } => {
            ApiFailure::NoToken {
                status,
                error,
                body,
                attempts: attempts + earlier,
                token_status,
                may_have_acted,
                reason: said(reason),
            }
        }
    }
}

/// Whether a 5xx answer's error type says the request itself is wrong (Easemob answers a wrong
/// method or URL with 500 `unsupported_service_operation`, `web_application` or
/// `no_full_text_index`): final, like a 4xx; sent again it would only be refused again.
fn names_a_wrong_request(error: Option<&ErrorBody>) -> bool {
    error.is_some_and(|e| {
        matches!(e.error.as_str(), "unsupported_service_operation" | "web_application" | "no_full_text_index")
    })
}

/// The failure of a call for want of an app token, after `attempts` attempts whose last answer
/// was `last`. `uncertain` is why an earlier attempt may have acted (a 5xx or no answer): a call
/// that loses its token after one has to say so, like any other give-up after one.
fn token_failure(failure: TokenFailure, attempts: u32, uncertain: Option<&str>, last: LastAnswer) -> ApiFailure {
    let (status, error, body) = last;
    let fate = match (uncertain, status) {
        (Some(earlier), _) => format!(
            "; an earlier attempt ({earlier}) may have been carried out: check the result in Easemob before trying \
             again"
        ),
        (None, Some(401)) => {
            "; Easemob had refused the call's token (HTTP 401), so the call was not carried out".into()
        }
        (None, _) if attempts == 0 => "; nothing was sent".into(),
        (None, _) => String::new(),
    };
    ApiFailure::NoToken {
        status,
        error,
        body,
        attempts,
        token_status: failure.status,
        may_have_acted: uncertain.is_some(),
        reason: format!("{TOKEN_REASON_PREFIX}{}{fate}", failure.reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn config(base_url: &str) -> ClientConfig {
        ClientConfig::new(base_url, "demo-org", "demo-app", "id", Secret::new("hunter2"))
    }

    fn client(base_url: &str) -> EasemobClient {
        EasemobClient::new(config(base_url), ManualClock::new(0)).expect("client")
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let headers = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_str(value).expect("header"));
            h
        };
        assert_eq!(retry_after(&headers("2")), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&headers(" 0 ")), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers("86400")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&headers("Wed, 21 Oct 2026 07:28:00 GMT")), None);
        assert_eq!(retry_after(&headers("-1")), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    /// Whatever a server sends, an answer is read up to the cap and no further (3 MiB here, as
    /// one body and as a stream of small chunks).
    #[tokio::test]
    async fn an_answer_is_read_up_to_the_cap() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let app = axum::Router::new()
            .route("/whole", axum::routing::get(|| async { vec![b'x'; 3 << 20] }))
            .route(
                "/streamed",
                axum::routing::get(|| async {
                    let chunks = (0..3 * 256).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 4096])));
                    axum::body::Body::from_stream(futures_util::stream::iter(chunks))
                }),
            )
            .route("/small", axum::routing::get(|| async { "{\"ok\":true}" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        for path in ["/whole", "/streamed"] {
            let response = http.get(format!("{base}{path}")).send().await.expect("answer");
            let (body, cut) = read_capped(response).await;
            assert!(cut.is_none(), "{path}: {cut:?}");
            assert_eq!(body.len(), MAX_ANSWER_BYTES, "{path}");
        }
        let response = http.get(format!("{base}/small")).send().await.expect("answer");
        let (body, cut) = read_capped(response).await;
        assert!(cut.is_none(), "{cut:?}");
        assert_eq!(&body[..], b"{\"ok\":true}");
    }

    /// A request whose connection could not be made never reached Easemob, so a final answer
    /// after it stays final; one whose connection dropped without an answer may have.
    #[tokio::test]
    async fn only_a_failed_connect_counts_as_not_sent() {
        let token = AppToken { value: Secret::new("t"), issued_at_ms: 0, expires_at_ms: None, generation: 1 };
        let post = |base: &str| Call {
            method: Method::POST,
            url: Url::parse(&format!("{base}/demo-org/demo-app/users/a/contacts/users/b")).expect("url"),
            body: None,
        };
        // Nothing listens on a port whose listener has been dropped.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let base = format!("http://127.0.0.1:{port}");
        match client(&base).attempt(&post(&base), &token).await {
            Answer::NotReceived { sent, reason, .. } => assert!(!sent, "refused: {reason}"),
            Answer::Received { status, .. } => panic!("answered {status}"),
        }
        // A server that reads the request and hangs up without answering.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
        });
        match client(&base).attempt(&post(&base), &token).await {
            Answer::NotReceived { sent, reason, .. } => assert!(sent, "hung up: {reason}"),
            Answer::Received { status, .. } => panic!("answered {status}"),
        }
    }

    #[test]
    fn paths_are_built_under_the_app_key() {
        let client = client("https://a1.easemob.com");
        assert_eq!(
            client.app_path(&["users", "alice", "contacts", "users", "bob"]).as_str(),
            "https://a1.easemob.com/demo-org/demo-app/users/alice/contacts/users/bob"
        );
        assert_eq!(client.app_path(&["token"]).as_str(), "https://a1.easemob.com/demo-org/demo-app/token");
    }

    #[test]
    fn base_url_prefix_and_trailing_slash_are_kept_tidy() {
        let client = client("http://127.0.0.1:8080/prefix/?x=1#f");
        assert_eq!(client.app_path(&["users"]).as_str(), "http://127.0.0.1:8080/prefix/demo-org/demo-app/users");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        let client = client("https://a1.easemob.com");
        assert_eq!(client.app_path(&["users", "a b/c#d?e"]).path(), "/demo-org/demo-app/users/a%20b%2Fc%23d%3Fe");
    }

    #[test]
    fn usernames_that_would_escape_the_path_are_rejected_without_a_request() {
        for name in ["..", "a/b", ""] {
            let failure = check_usernames(&["alice", name]).expect_err(name);
            assert_eq!(failure.upstream_status(), Some(400));
            assert_eq!(failure.upstream_error(), Some("illegal_argument"));
            assert_eq!(failure.attempts(), 0);
        }
    }

    #[test]
    fn bad_settings_are_refused_with_advice() {
        let clock = ManualClock::new(0);
        for url in ["not a url", "ftp://x", "mailto:a@b"] {
            let err = EasemobClient::new(config(url), clock.clone()).expect_err(url);
            assert!(matches!(err, ClientError::InvalidBaseUrl { .. }), "{url}: {err}");
        }
        let mut zero_rate = config("http://x");
        zero_rate.rate_limit_per_sec = 0;
        assert!(EasemobClient::new(zero_rate, clock.clone()).is_err());
        let mut zero_attempts = config("http://x");
        zero_attempts.max_attempts = 0;
        assert!(EasemobClient::new(zero_attempts, clock.clone()).is_err());
        let mut bad_org = config("http://x");
        bad_org.org = "a/b".into();
        assert!(EasemobClient::new(bad_org, clock).is_err());
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let debug = format!("{:?}", client("https://a1.easemob.com"));
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("demo-org"), "{debug}");
    }

    #[test]
    fn friend_lists_are_read_from_strings_or_username_objects() {
        assert_eq!(
            usernames_in(Some(&json!(["a", {"username": "b", "remark": null}]))),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(usernames_in(Some(&json!([]))), Some(vec![]));
        assert_eq!(usernames_in(Some(&json!([1]))), None);
        assert_eq!(usernames_in(Some(&json!({"contacts": []}))), None);
        assert_eq!(usernames_in(None), None);
    }

    #[test]
    fn register_answers_merge_entities_data_and_attempts() {
        let answer = |body: Value, attempts| ApiSuccess {
            status: 200,
            envelope: Envelope::from_value(&body),
            body,
            attempts,
            cut_short: false,
        };
        let merged = merge_register_answers(
            answer(json!({"action":"post","entities":[{"username":"a"}],"data":[],"count":1}), 1),
            answer(
                json!({"action":"post","entities":[{"username":"b"}],"data":[{"username":"c","registerUserFailReason":"exists"}]}),
                2,
            ),
        );
        assert_eq!(merged.attempts, 3);
        assert_eq!(merged.envelope.entities.len(), 2);
        assert_eq!(merged.envelope.count, Some(2));
        assert_eq!(merged.body["data"], json!([{"username":"c","registerUserFailReason":"exists"}]));
    }

    #[test]
    fn error_chain_lists_each_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&error), "outer: inner");
    }
}
