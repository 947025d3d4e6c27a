//! The trigger API: `POST /v1/friends`, `POST /v1/friends/batch`, `DELETE /v1/friends/{owner}/{friend}`,
//! and the call records `GET /v1/calls`, `GET /v1/calls/{id}`.
//!
//! Every call is recorded before anything is sent (intent), marked once its turn under the rate
//! limit has come and before its first request leaves (sent), and recorded again once Easemob
//! has answered (outcome). The Easemob call runs in its own task, so a client that disconnects
//! mid-call cannot leave a call without an outcome. An outcome the database refuses is retried
//! for up to 10 minutes; a stop (or a crash) before it is recorded leaves the call in flight, and
//! the next start closes it as `unknown` if it was marked sent, or as `failed` with no attempt
//! (not sent, safe to send again) if it was not.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::query::{bad_path, bad_query, parse_cursor, parse_limit, parse_range};
use crate::app::{SharedState, WorkStarted};
use crate::easemob::{self, ApiFailure, BeforeFirstSend, EasemobClient, Lane, Sending};
use crate::error::ApiError;
use crate::model::{CallOp, Outcome};
use crate::store::{CallFilter, CallOutcome, CallRecord, IntentResult, NewCall, StoreError, pair_key};

/// Routes of this module.
pub fn router() -> axum::Router<SharedState> {
    axum::Router::new()
        .route("/v1/friends", post(add_friend))
        .route("/v1/friends/batch", post(add_friends_batch))
        .route("/v1/friends/{owner}/{friend}", delete(remove_friend))
        .route("/v1/calls", get(list_calls))
        .route("/v1/calls/{id}", get(get_call))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
}

/// Largest request body of these endpoints (a full batch of [`MAX_BATCH`] pairs is a few tens
/// of kilobytes); set here so the 413 can say what it is. The exception-cache endpoints read
/// theirs under the same limit (see `app::read_trigger_body_first`).
pub(crate) const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The JSON shape of a call record.
#[derive(Debug, Clone, Serialize)]
pub struct CallView {
    /// Call id.
    pub id: i64,
    /// `add` or `remove`.
    pub op: &'static str,
    /// Owner.
    pub owner: String,
    /// Friend.
    pub friend: String,
    /// Intent time (epoch ms).
    pub requested_at: i64,
    /// When its turn under the rate limit came, just before its first request left (epoch ms):
    /// `null` while it waits, and for a call never sent. Not covered by the audit chain.
    pub sent_at: Option<i64>,
    /// Outcome time (epoch ms).
    pub completed_at: Option<i64>,
    /// succeeded / rejected / failed / unknown / in_flight.
    pub outcome: Outcome,
    /// Easemob's HTTP status.
    pub upstream_status: Option<i64>,
    /// Easemob's error type (`exceed_limit`, `service_resource_not_found`, ...).
    pub upstream_error: Option<String>,
    /// Why a call that did not succeed ended so, and what to check (`null` for a success and
    /// for calls recorded before schema 7).
    pub outcome_detail: Option<String>,
    /// HTTP attempts made; `None` while in flight, and for a call cut off by a stop (`unknown`:
    /// the count was lost with the process; the journal keeps the 0 it was closed with).
    pub attempts: Option<i64>,
    /// Easemob's response body.
    pub response: Option<Value>,
    /// The client's idempotency key.
    pub idempotency_key: Option<String>,
    /// Journal position of the outcome.
    pub seq: Option<i64>,
    /// The chain link of the record at `seq` (what `audit verify` recomputes, and what
    /// `--expect-head SEQ:HASH` takes): a citation of this outcome.
    pub chain_hash: Option<String>,
}

impl From<CallRecord> for CallView {
    fn from(c: CallRecord) -> Self {
        Self {
            id: c.id,
            op: c.op.as_str(),
            owner: c.owner,
            friend: c.friend,
            requested_at: c.requested_at_ms,
            sent_at: c.sent_at_ms,
            completed_at: c.completed_at_ms,
            outcome: c.outcome,
            upstream_status: c.upstream_status,
            upstream_error: c.upstream_error,
            outcome_detail: c.outcome_detail,
            attempts: c.attempts.filter(|_| c.outcome != Outcome::Unknown),
            response: c.response_body.as_deref().and_then(|b| serde_json::from_str(b).ok()),
            idempotency_key: c.idempotency_key,
            seq: c.seq,
            chain_hash: c.chain_hash,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
// A misspelt or misplaced field (`idempotency_key` belongs in a header) is refused, not ignored.
#[serde(deny_unknown_fields)]
struct PairBody {
    owner: Option<String>,
    friend: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    pairs: Vec<Object<PairBody>>,
}

/// A request body (or part of one) that must be a JSON object. serde's derived structs also take
/// an array of their fields in order (`["alice", "bob"]` as owner and friend), which no client
/// means to send and whose meaning would change silently with the fields' order.
#[derive(Debug, Clone)]
pub(super) struct Object<T>(pub T);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Kept as its text and read into `T` from it: through a `Value` a repeated key would
        // silently keep its last value (`{"owner":"alice","owner":"bob"}` adding bob's friend),
        // where `T`'s derived reader refuses it ("duplicate field").
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        let text = raw.get();
        if !text.starts_with('{') {
            return Err(D::Error::custom(format!(
                "expected a JSON object with named fields, found {}",
                json_kind(text)
            )));
        }
        // Read with its path kept (`pairs[3]: friend: invalid type ...`).
        let mut reader = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut reader).map(Object).map_err(|e| {
            let path = e.path().to_string();
            match e.into_inner() {
                inner if path == "." => D::Error::custom(inner),
                inner => D::Error::custom(format!("{path}: {inner}")),
            }
        })
    }
}

/// What kind of JSON value `text` (one whole value, as serde_json hands it over) is.
fn json_kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "a number",
    }
}

/// Largest batch accepted.
pub const MAX_BATCH: usize = 1000;

/// The body, or the error axum found, as 415 (no JSON content type), 413 (over [`BODY_LIMIT`])
/// or 400 (not JSON of the expected shape).
pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|e| match e.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(e.body_text()),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit: BODY_LIMIT },
        _ => ApiError::bad_request("invalid_json", e.body_text()),
    })
}

/// Validates and lower-cases a pair (Easemob stores user IDs lower-case, and its callbacks carry
/// them that way, so matching needs the same form).
fn validate_pair(owner: Option<&str>, friend: Option<&str>) -> Result<(String, String), String> {
    // Not trimmed: a name with spaces is not a valid Easemob user ID, and acting on another
    // name than the one given (" bob" as "bob") would record a call nobody asked for.
    let owner = owner.filter(|s| !s.is_empty()).ok_or("`owner` is required")?;
    let friend = friend.filter(|s| !s.is_empty()).ok_or("`friend` is required")?;
    easemob::validate_username(owner).map_err(|e| format!("`owner`: {e}"))?;
    easemob::validate_username(friend).map_err(|e| format!("`friend`: {e}"))?;
    let (owner, friend) = (owner.to_ascii_lowercase(), friend.to_ascii_lowercase());
    if owner == friend {
        return Err("`owner` and `friend` must be different users".into());
    }
    Ok((owner, friend))
}

/// 503 `easemob_token_unavailable` for a request that needs an app token and has none (wrong
/// credentials, token endpoint down), with `Retry-After` only when waiting may help.
pub(super) fn token_unavailable(failure: &ApiFailure, detail: String) -> ApiError {
    ApiError::Unavailable {
        code: "easemob_token_unavailable",
        detail,
        retry_after_secs: if failure.may_pass_later() { 5 } else { 0 },
    }
}

pub(super) fn client(state: &SharedState) -> Result<EasemobClient, ApiError> {
    state.easemob.clone().ok_or_else(|| ApiError::Unavailable {
        code: "no_easemob_client",
        // `serve` always has one (its own sandbox's, or Easemob's with --easemob-base-url); only
        // a service assembled without one (an embedding, a test) gets here, and waiting cannot help.
        detail: "no Easemob client is configured: start the service with --easemob-base-url and the app's \
                 credentials, or without it to use the built-in sandbox"
            .into(),
        retry_after_secs: 0,
    })
}

/// A call that could not be carried through: `sent` is the id of its intent when the request
/// went to Easemob before the failure (its outcome could not be recorded), `None` when nothing
/// was sent (the intent could not be recorded).
struct CallFailure {
    error: ApiError,
    sent: Option<i64>,
}

impl From<ApiError> for CallFailure {
    fn from(error: ApiError) -> Self {
        Self { error, sent: None }
    }
}

/// A trigger that arrives while the service stops (on a kept-alive connection) is refused before
/// anything is recorded: its call would only be recorded as not sent.
fn refuse_while_stopping(client: &EasemobClient) -> Result<(), ApiError> {
    if client.is_stopping() {
        return Err(ApiError::Unavailable {
            code: "shutting_down",
            detail: "the service is stopping; nothing was recorded or sent to Easemob: send it again once the \
                     service is back"
                .into(),
            retry_after_secs: 5,
        });
    }
    Ok(())
}

/// A call that cannot be sent for want of an app token (wrong credentials, token endpoint down)
/// is answered before anything is recorded: recorded, it would hold its Idempotency-Key to a
/// failure that never reached Easemob.
async fn ensure_token(client: &EasemobClient) -> Result<(), ApiError> {
    client.ensure_token().await.map_err(|failure| {
        // The failure says "nothing was sent" itself when no attempt was made (here, always).
        let text = failure.to_string();
        let said = text.strip_suffix("; nothing was sent").unwrap_or(&text);
        token_unavailable(&failure, format!("{said}; nothing was recorded or sent to Easemob"))
    })
}

/// Records the intent, calls Easemob, records (and counts) the outcome. Runs detached from the
/// request so a disconnect cannot cut it between the two records.
async fn execute(
    state: SharedState,
    client: EasemobClient,
    call: NewCall,
    started: Option<WorkStarted>,
) -> Result<(CallRecord, bool), CallFailure> {
    // A replay is answered from its record before any token is asked for: while none can be had,
    // "nothing was recorded or sent" would be false for it, and a client that believed it could
    // send the call again under a new key. (A replay racing its first request is still caught
    // when the intent is written.)
    if let Some(key) = &call.idempotency_key
        && let Some(existing) = state.store.get_call_by_idempotency_key(key).await.map_err(ApiError::from)?
    {
        return Ok((existing, true));
    }
    refuse_while_stopping(&client)?;
    ensure_token(&client).await?;
    WorkStarted::start(started.as_ref())?;
    let intent = state.store.queue_call_intent(call).map_err(ApiError::from)?;
    carry_out(state, client, intent, started, Lane::Interactive).await
}

/// [`execute`] from a queued intent on: waits for it to be recorded, then calls Easemob (its
/// turn taken in `lane`) and records the outcome.
async fn carry_out(
    state: SharedState,
    client: EasemobClient,
    intent: impl Future<Output = Result<IntentResult, StoreError>>,
    started: Option<WorkStarted>,
    lane: Lane,
) -> Result<(CallRecord, bool), CallFailure> {
    let record = match intent.await.map_err(ApiError::from)? {
        IntentResult::Existing(existing) => return Ok((existing, true)),
        IntentResult::Created(record) => record,
    };
    WorkStarted::note_call(started.as_ref(), record.id);
    let id = record.id;
    let (answer, answered) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let remove = record.op == CallOp::Remove;
        let note = note_sent(state.clone(), id);
        let sending = Sending { lane, before_first_send: Some(note) };
        let result = client.change_friendship_with(remove, &record.owner, &record.friend, sending).await;
        let outcome = match result {
            Ok(ok) => CallOutcome {
                call: record,
                outcome: Outcome::Succeeded,
                upstream_status: Some(i64::from(ok.status)),
                upstream_error: None,
                attempts: i64::from(ok.attempts),
                response_body: Some(ok.body.to_string()),
                outcome_detail: None,
            },
            Err(fail) => {
                if fail.is_token_failure() {
                    tracing::warn!(call = record.id, error = %fail, "call failed for want of an app token");
                }
                CallOutcome {
                    outcome: match fail {
                        ApiFailure::Rejected { .. } => Outcome::Rejected,
                        // Refused with 401 and no new token to be had: Easemob's last word on
                        // the call was a refusal, and no earlier attempt can have acted.
                        ApiFailure::NoToken { status: Some(401), may_have_acted: false, .. } => Outcome::Rejected,
                        // Not sent at all (the service stopped first): ended, not carried out;
                        // its detail says it is safe to send again.
                        ApiFailure::Failed { .. } | ApiFailure::NoToken { .. } | ApiFailure::NotSent { .. } => {
                            Outcome::Failed
                        }
                    },
                    // The call's own last answer; the token endpoint's is in the detail.
                    upstream_status: fail.upstream_status().map(i64::from),
                    upstream_error: fail.upstream_error().map(str::to_string),
                    attempts: i64::from(fail.attempts()),
                    response_body: fail.body().map(Value::to_string),
                    outcome_detail: Some(fail.detail()),
                    call: record,
                }
            }
        };
        record_outcome(&state, outcome, answer).await;
    });
    let sent = |error: ApiError| CallFailure { error, sent: Some(id) };
    let record = answered
        .await
        .map_err(|_| sent(ApiError::internal(anyhow::anyhow!("the task of call {id} ended without an answer"))))?
        .map_err(|e| sent(outcome_not_recorded(id, &e)))?;
    Ok((record, false))
}

/// How long marking a call sent is retried while the database cannot commit, before the call
/// ends not sent: the call waits out a moment's lock rather than failing for it.
const MARK_SENT_RETRY_FOR: Duration = Duration::from_secs(2);

/// Marks call `id` sent, once its turn has come and before its first request leaves (see
/// migration 0010): a crash after this closes the call as `unknown` at the next start, one
/// before it as not sent. A call that cannot be marked is not sent.
fn note_sent(state: SharedState, id: i64) -> BeforeFirstSend {
    Box::pin(async move {
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let err = match state.store.mark_call_sent(id).await {
                Ok(None) => return Ok(()),
                Ok(Some(why)) => return Err(format!("not sent: {why}")),
                Err(err) => err,
            };
            if matches!(err, StoreError::WriterGone) || started.elapsed() + delay > MARK_SENT_RETRY_FOR {
                // The database's own error is for the log, not for the record (it can name files).
                tracing::warn!(call_id = id, error = %err, "could not record that a call was about to be sent; not sending it");
                return Err("not sent: the database could not record that the call was about to be sent (the log \
                            has its error); nothing reached Easemob, so it is safe to send again"
                    .into());
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    })
}

/// How long recording an outcome is retried when the database cannot commit it (locked, full,
/// read-only, the write queue full). Easemob has acted by then, so giving up early would leave
/// the call in flight until a restart closes it as `unknown`.
const OUTCOME_RETRY_FOR: Duration = Duration::from_secs(600);
/// The request waits through this many failed attempts, or this long, then is answered while
/// the retries go on.
const OUTCOME_ATTEMPTS_IN_REQUEST: u32 = 3;
const OUTCOME_WAIT_IN_REQUEST: Duration = Duration::from_secs(2);

/// Records a call's outcome, retrying (0.1 s, doubling up to 2 s) while the database cannot
/// commit, and answers the request on `answer`: with the record, or with the error once the
/// request has waited long enough (the retries go on) or the service is stopping.
async fn record_outcome(
    state: &SharedState,
    outcome: CallOutcome,
    answer: tokio::sync::oneshot::Sender<Result<CallRecord, StoreError>>,
) {
    let (id, kind, attempts) = (outcome.call.id, outcome.outcome, outcome.attempts);
    let started = tokio::time::Instant::now();
    let mut answer = Some(answer);
    let mut delay = Duration::from_millis(100);
    for failed in 1u32.. {
        let err = match state.store.mark_call_outcome(outcome.clone()).await {
            Ok(record) => {
                // As stored: an outcome recorded before (by an earlier attempt of this loop whose
                // answer was lost) is the one that counts.
                state.metrics.call(
                    record.op,
                    record.outcome,
                    u64::try_from(record.attempts.unwrap_or(attempts)).unwrap_or(0),
                );
                if failed > 1 {
                    tracing::info!(call_id = id, attempts = failed, "call outcome recorded after retrying");
                }
                if let Some(answer) = answer.take() {
                    let _ = answer.send(Ok(record));
                }
                return;
            }
            Err(err) => err,
        };
        let stopping = matches!(err, StoreError::WriterGone);
        let give_up = stopping || started.elapsed() >= OUTCOME_RETRY_FOR;
        if failed == 1 || give_up {
            let next = if give_up {
                "giving up: the call stays in flight until a restart closes it as unknown"
            } else {
                "retrying"
            };
            tracing::warn!(call_id = id, outcome = kind.as_str(), error = %err, "could not record a call's outcome; {next}");
        }
        if (give_up || failed >= OUTCOME_ATTEMPTS_IN_REQUEST || started.elapsed() >= OUTCOME_WAIT_IN_REQUEST)
            && let Some(answer) = answer.take()
        {
            let _ = answer.send(Err(err));
        }
        if give_up {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = state.store.closing() => {
                tracing::warn!(call_id = id, "the service is stopping before the call's outcome could be recorded; its next start records it as unknown");
                if let Some(answer) = answer.take() {
                    let _ = answer.send(Err(StoreError::WriterGone));
                }
                return;
            }
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The answer for a call that went to Easemob but whose outcome is not recorded yet. No
/// `Retry-After`: a client that retries 503s by itself would send the call again.
fn outcome_not_recorded(id: i64, err: &StoreError) -> ApiError {
    // The database's own error is not for the client (it can name files); `record_outcome`'s
    // warnings have it in the log.
    let still = if matches!(err, StoreError::WriterGone) {
        "the service is stopping; its next start records the call as `unknown`"
    } else {
        "friendhook keeps trying for up to 10 minutes"
    };
    ApiError::Unavailable {
        code: "outcome_not_recorded",
        detail: format!(
            "call {id} went to Easemob, but the database could not record its outcome; {still}. Do not \
             send it again: GET /v1/calls/{id} shows the outcome once it is recorded"
        ),
        retry_after_secs: 0,
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut given = headers.get_all("idempotency-key").iter();
    let Some(v) = given.next() else { return Ok(None) };
    // Two keys: which one the client meant to be checked is anyone's guess.
    if given.next().is_some() {
        return Err(ApiError::bad_request("invalid_idempotency_key", "give one Idempotency-Key header, not several"));
    }
    let visible = |k: &&str| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic());
    let key = v.to_str().ok().map(str::trim).filter(visible).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters (no spaces or tabs inside)",
        )
    })?;
    Ok(Some(key.to_string()))
}

async fn trigger(
    state: SharedState,
    headers: HeaderMap,
    started: Option<Extension<WorkStarted>>,
    op: CallOp,
    owner: Option<&str>,
    friend: Option<&str>,
) -> Result<Response, ApiError> {
    let (owner, friend) = validate_pair(owner, friend).map_err(|d| ApiError::bad_request("invalid_request", d))?;
    let key = idempotency_key(&headers)?;
    if let Some(key) = &key
        && let Some(first) = state.store.calls_by_idempotency_prefix(&format!("{key} "), 1).await?.first()
    {
        return Err(ApiError::Unprocessable {
            code: "idempotency_key_reused",
            detail: format!(
                "Idempotency-Key was already used for a batch (its first call is {}); use a new key",
                first.id
            ),
        });
    }
    let client = client(&state)?;
    let new = NewCall { op, owner, friend, idempotency_key: key };
    // In a task of its own, from the intent on: a client that disconnects while the intent is
    // being written would otherwise drop this future after the writer committed the intent,
    // leaving a call that was never sent in flight (and its Idempotency-Key answering 409).
    let started = started.map(|Extension(started)| started);
    let (record, replayed) = tokio::spawn(execute(state.clone(), client, new.clone(), started))
        .await
        .map_err(ApiError::internal)?
        .map_err(|f| f.error)?;
    if replayed {
        if record.op != new.op || record.owner != new.owner || record.friend != new.friend {
            return Err(ApiError::Unprocessable {
                code: "idempotency_key_reused",
                detail: format!(
                    "Idempotency-Key was already used for call {} with a different request; use a new key",
                    record.id
                ),
            });
        }
        if record.outcome == Outcome::InFlight {
            return Err(ApiError::Conflict {
                code: "idempotency_in_flight",
                detail: format!(
                    "call {id} with this Idempotency-Key is still running (with its retries, up to \
                     --easemob-max-retry-time plus --easemob-request-timeout); GET /v1/calls/{id} shows its \
                     outcome once recorded, and sending this again then answers with the record",
                    id = record.id
                ),
            });
        }
    }
    let mut response = (StatusCode::CREATED, Json(CallView::from(record))).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

async fn add_friend(
    State(state): State<SharedState>,
    started: Option<Extension<WorkStarted>>,
    headers: HeaderMap,
    body: Result<Json<Object<PairBody>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Object(body) = json_body(body)?;
    trigger(state, headers, started, CallOp::Add, body.owner.as_deref(), body.friend.as_deref()).await
}

async fn remove_friend(
    State(state): State<SharedState>,
    started: Option<Extension<WorkStarted>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((owner, friend)) = path.map_err(bad_path)?;
    trigger(state, headers, started, CallOp::Remove, Some(&owner), Some(&friend)).await
}

async fn add_friends_batch(
    State(state): State<SharedState>,
    started: Option<Extension<WorkStarted>>,
    headers: HeaderMap,
    body: Result<Json<Object<BatchBody>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let Object(body) = json_body(body)?;
    if body.pairs.is_empty() || body.pairs.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("`pairs` must hold 1 to {MAX_BATCH} pairs, got {}", body.pairs.len()),
        ));
    }
    // Validate everything first: a batch with a bad pair sends nothing. A pair given again, in
    // either direction, is one call: friendship is two-way, so a second add of it would be a
    // re-add, which Easemob answers without an event (it would only read `missing`), and run at
    // the same time the two would race for the one event. Each position gets that call's result.
    // Every bad pair is named (up to a point), so a client fixes them in one round.
    let mut bad = Vec::new();
    let mut valid = Vec::with_capacity(body.pairs.len());
    for (i, Object(p)) in body.pairs.iter().enumerate() {
        match validate_pair(p.owner.as_deref(), p.friend.as_deref()) {
            Ok(pair) => valid.push(pair),
            Err(why) => bad.push(format!("pairs[{i}]: {why}")),
        }
    }
    if !bad.is_empty() {
        let named = bad.len().min(BAD_PAIRS_NAMED);
        let more = bad.len() - named;
        let mut detail = bad[..named].join("; ");
        if more > 0 {
            detail.push_str(&format!("; and {more} more"));
        }
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "{} of {} pairs {} invalid, so none was sent: {detail}",
                bad.len(),
                body.pairs.len(),
                if bad.len() == 1 { "is" } else { "are" }
            ),
        ));
    }
    let mut calls = Vec::with_capacity(body.pairs.len());
    let mut first_of: HashMap<String, usize> = HashMap::new();
    let mut position_of = Vec::with_capacity(body.pairs.len());
    for (owner, friend) in valid {
        let next = calls.len();
        let call = *first_of.entry(pair_key(&owner, &friend)).or_insert(next);
        if call == next {
            // Under a batch's key K, its calls are keyed `K 0`, `K 1`, ... in request order: a
            // key of one call holds no space, so the two kinds cannot meet.
            let idempotency_key = key.as_ref().map(|k| batch_call_key(k, next));
            calls.push(NewCall { op: CallOp::Add, owner, friend, idempotency_key });
        }
        position_of.push(call);
    }
    let recorded = match &key {
        Some(key) => check_batch_replay(&state, key, &calls).await?,
        None => Vec::new(),
    };
    // Sent again whole after the first request recorded every call: answered from the records,
    // before any token is asked for (while none can be had, a 503 would say nothing was sent).
    if !calls.is_empty() && recorded.len() == calls.len() {
        let done = recorded.into_iter().map(|r| ((r.owner.clone(), r.friend.clone()), replayed_in_flight((r, true))));
        return batch_response(batch_answer(done.collect())?, &position_of, true);
    }
    let client = client(&state)?;
    refuse_while_stopping(&client)?;
    ensure_token(&client).await?;
    // The intents are queued one after the other, with no await between queueing one and
    // spawning its task (so a disconnect cannot leave an intent without its call): the writer
    // numbers them in request order. Then all run at once; the client's rate limiter paces them
    // to Easemob's limit. Every one is waited for: one failing (storage busy, say) does not stop
    // the others, which may already have gone to Easemob, so the answer has to say what became
    // of each.
    let pairs: Vec<(String, String)> = calls.iter().map(|c| (c.owner.clone(), c.friend.clone())).collect();
    WorkStarted::start(started.as_ref().map(|Extension(started)| started))?;
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|c| {
            let intent = state.store.queue_call_intent(c).map_err(ApiError::from);
            let (state, client) = (state.clone(), client.clone());
            let started = started.as_ref().map(|Extension(started)| started.clone());
            // Behind any single call: a batch must not hold up a call someone waits on.
            tokio::spawn(async move { carry_out(state, client, intent?, started, Lane::Bulk).await })
        })
        .collect();
    let mut done = Vec::with_capacity(tasks.len());
    let mut replayed = false;
    for (t, pair) in tasks.into_iter().zip(pairs) {
        let result = t.await.map_err(|e| CallFailure::from(ApiError::internal(e))).and_then(|r| r);
        replayed |= matches!(result, Ok((_, true)));
        done.push((pair, result.and_then(replayed_in_flight)));
    }
    batch_response(batch_answer(done)?, &position_of, replayed)
}

/// The batch's answer with one result per pair as given (a pair given twice gets its call's
/// result at each position), marked a replay if any call was answered from its record.
fn batch_response(mut answer: Value, position_of: &[usize], replayed: bool) -> Result<Response, ApiError> {
    let results = std::mem::take(&mut answer["results"]);
    answer["results"] = Value::Array(position_of.iter().map(|&call| results[call].clone()).collect());
    let mut response = Json(answer).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The key of a batch's `index`th call (in request order, a pair given twice counted once).
fn batch_call_key(key: &str, index: usize) -> String {
    format!("{key} {index}")
}

/// Which of its batch's calls `record` is, by its key (`K 3`: the fourth).
fn batch_call_index(record: &CallRecord) -> Option<usize> {
    record.idempotency_key.as_deref()?.rsplit(' ').next()?.parse().ok()
}

/// A batch sent again under its key: refused (nothing sent) if the key was used for a single
/// call, or for a batch with other pairs in any position; otherwise the calls already recorded
/// (returned, in key order) answer from their records and the others (those the first request
/// could not record) run.
async fn check_batch_replay(state: &SharedState, key: &str, calls: &[NewCall]) -> Result<Vec<CallRecord>, ApiError> {
    let reused = |detail: String| ApiError::Unprocessable { code: "idempotency_key_reused", detail };
    if let Some(single) = state.store.get_call_by_idempotency_key(key).await? {
        return Err(reused(format!(
            "Idempotency-Key was already used for call {} (a single call, not a batch); use a new key",
            single.id
        )));
    }
    let mut recorded = state.store.calls_by_idempotency_prefix(&format!("{key} "), MAX_BATCH as i64 + 1).await?;
    for record in &recorded {
        let asked = batch_call_index(record).and_then(|i| calls.get(i));
        if !asked.is_some_and(|c| c.op == record.op && c.owner == record.owner && c.friend == record.friend) {
            let now = match asked {
                Some(c) => format!("this batch has {} -> {} there", c.owner, c.friend),
                None => format!("this batch has {} distinct pairs", calls.len()),
            };
            return Err(reused(format!(
                "Idempotency-Key was already used for a batch with other pairs: its call {} ({} -> {}, key `{}`) \
                 differs, {now}; use a new key",
                record.id,
                record.owner,
                record.friend,
                record.idempotency_key.as_deref().unwrap_or_default()
            )));
        }
    }
    // In key order (not id order: a pair the first request could not record has a later id).
    recorded.sort_by_key(|r| batch_call_index(r).unwrap_or(usize::MAX));
    Ok(recorded)
}

/// A batch's call answered from its record while still running (the batch sent again before
/// the first had finished): said so, as for a single call, rather than shown in flight.
fn replayed_in_flight((record, replayed): (CallRecord, bool)) -> Result<CallRecord, CallFailure> {
    if replayed && record.outcome == Outcome::InFlight {
        let id = record.id;
        return Err(CallFailure {
            error: ApiError::Conflict {
                code: "idempotency_in_flight",
                detail: format!(
                    "call {id} under this batch's Idempotency-Key is still running; GET /v1/calls/{id} shows its \
                     outcome once recorded, and sending the batch again then answers with the record"
                ),
            },
            sent: Some(id),
        });
    }
    Ok(record)
}

/// Bad pairs a 400 to a batch names; past this, it says how many more.
const BAD_PAIRS_NAMED: usize = 20;

/// The answer to a batch, one result per pair in request order: the call, or for a pair whose
/// call could not be carried through, `error` with whether it was `sent` (then `call_id` is its
/// record, in flight until its outcome is recorded (retried for up to 10 minutes) or a restart
/// closes it as `unknown`; not sent: safe to send again).
/// When no pair was recorded or sent, the batch failed as a whole: the first error.
fn batch_answer(done: Vec<((String, String), Result<CallRecord, CallFailure>)>) -> Result<Value, ApiError> {
    let mut results = Vec::with_capacity(done.len());
    let mut first_unsent: Option<ApiError> = None;
    let mut anything_happened = false;
    for ((owner, friend), result) in done {
        match result {
            Ok(record) => {
                anything_happened = true;
                results.push(json!(CallView::from(record)));
            }
            Err(CallFailure { error, sent }) => {
                anything_happened |= sent.is_some();
                results.push(json!({
                    "owner": owner,
                    "friend": friend,
                    "error": {"code": error.code(), "detail": error.public_detail()},
                    "sent": sent.is_some(),
                    "call_id": sent,
                }));
                if sent.is_none() && first_unsent.is_none() {
                    first_unsent = Some(error);
                }
            }
        }
    }
    match (anything_happened, first_unsent) {
        (false, Some(error)) => Err(error),
        _ => Ok(json!({ "results": results })),
    }
}

#[derive(Debug, Deserialize)]
// A misspelt parameter is refused: ignored, it would silently answer without its filter.
#[serde(deny_unknown_fields)]
struct CallsQuery {
    owner: Option<String>,
    friend: Option<String>,
    op: Option<String>,
    outcome: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_calls(
    State(state): State<SharedState>,
    query: Result<Query<CallsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(bad_query)?;
    let outcome = q
        .outcome
        .as_deref()
        .map(|o| {
            Outcome::parse(o).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    "`outcome` must be succeeded, rejected, failed, unknown or in_flight",
                )
            })
        })
        .transpose()?;
    let op = q
        .op
        .as_deref()
        .map(|o| {
            CallOp::parse(o)
                .ok_or_else(|| ApiError::bad_request("invalid_query", format!("`op` must be add or remove, got `{o}`")))
        })
        .transpose()?;
    let (since_ms, until_ms) = parse_range(q.since.as_deref(), q.until.as_deref())?;
    let limit = parse_limit(q.limit)?;
    let filter = CallFilter {
        owner: crate::http::query::non_empty("owner", q.owner)?.map(|s| s.to_ascii_lowercase()),
        friend: crate::http::query::non_empty("friend", q.friend)?.map(|s| s.to_ascii_lowercase()),
        op,
        outcome,
        since_ms,
        until_ms,
        after_id: parse_cursor(q.cursor.as_deref())?,
        limit,
    };
    let items: Vec<CallView> = state.store.list_calls(&filter).await?.into_iter().map(CallView::from).collect();
    let next_cursor = (items.len() as i64 == limit).then(|| items.last().map(|c| c.id.to_string())).flatten();
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})).into_response())
}

async fn get_call(
    State(state): State<SharedState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = path.map_err(bad_path)?;
    let id: i64 = id.parse().map_err(|_| ApiError::bad_request("invalid_path", format!("`{id}` is not a call id")))?;
    match state.store.get_call(id).await? {
        Some(c) => Ok(Json(CallView::from(c)).into_response()),
        None => Err(ApiError::NotFound(format!("no call with id {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> ApiError {
        ApiError::from(crate::store::StoreError::QueueFull)
    }

    fn pair(o: &str, f: &str) -> (String, String) {
        (o.to_string(), f.to_string())
    }

    #[test]
    fn a_batch_answer_says_what_became_of_each_pair() {
        let ok = CallRecord { id: 7, owner: "alice".into(), friend: "bob".into(), ..CallRecord::default() };
        let done = vec![
            (pair("alice", "bob"), Ok(ok)),
            (pair("alice", "carol"), Err(CallFailure { error: busy(), sent: None })),
            (pair("alice", "dave"), Err(CallFailure { error: busy(), sent: Some(9) })),
        ];
        let answer = batch_answer(done).expect("some pairs went through");
        let results = answer["results"].as_array().expect("results");
        assert_eq!(results.len(), 3, "{answer}");
        assert_eq!((results[0]["id"].as_i64(), results[0].get("error")), (Some(7), None), "{answer}");
        assert_eq!(results[1]["friend"], "carol");
        assert_eq!(
            (results[1]["error"]["code"].as_str(), results[1]["sent"].as_bool()),
            (Some("overloaded"), Some(false))
        );
        assert!(results[1]["call_id"].is_null());
        assert_eq!(results[2]["friend"], "dave");
        assert_eq!((results[2]["sent"].as_bool(), results[2]["call_id"].as_i64()), (Some(true), Some(9)));
    }

    #[test]
    fn a_batch_of_which_nothing_was_recorded_or_sent_fails_as_a_whole() {
        let done = vec![
            (pair("alice", "bob"), Err(CallFailure { error: busy(), sent: None })),
            (pair("alice", "carol"), Err(CallFailure { error: busy(), sent: None })),
        ];
        let err = batch_answer(done).expect_err("nothing happened");
        assert_eq!(err.code(), "overloaded");
        // One sent is enough for per-pair results: the client must learn which one.
        let done = vec![
            (pair("alice", "bob"), Err(CallFailure { error: busy(), sent: Some(1) })),
            (pair("alice", "carol"), Err(CallFailure { error: busy(), sent: None })),
        ];
        assert!(batch_answer(done).is_ok());
    }

    #[test]
    fn pairs_are_validated_and_lower_cased() {
        assert_eq!(validate_pair(Some("Alice"), Some("bob")), Ok(("alice".into(), "bob".into())));
        assert!(validate_pair(None, Some("bob")).is_err());
        assert!(validate_pair(Some(""), Some("bob")).is_err());
        assert!(validate_pair(Some("bob"), Some("BOB")).is_err());
        assert!(validate_pair(Some("al ice"), Some("bob")).is_err());
    }
}
