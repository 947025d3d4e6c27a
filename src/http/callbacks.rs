//! `POST /callbacks/easemob` (receive, verify, deduplicate, store, then 200) and the read-back
//! endpoints `GET /v1/callbacks` and `GET /v1/callbacks/{seq}`.
//!
//! The receive path takes `HeaderMap + Body`, never a JSON extractor: the signature covers the
//! exact bytes, and the raw body is stored byte-exact.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::json;

use super::query::{bad_path, bad_query, parse_cursor, parse_limit, parse_range};
use super::source::{self, Source};
use crate::app::{AppState, SharedState};
use crate::callback::{self, ParsedCallback};
use crate::clock::Clock;
use crate::config::OnBadSignature;
use crate::error::ApiError;
use crate::metrics::CallbackResult;
use crate::signature::{Scheme, Verifier, VerifyError};
use crate::store::{CallbackAck, CallbackFilter, NewCallback, QuarantineEntry, Rejection, StoreError, chain};

/// Routes of this module.
pub fn router() -> axum::Router<SharedState> {
    axum::Router::new()
        .route("/callbacks/easemob", post(receive_callback))
        .route("/v1/callbacks", get(list_callbacks))
        .route("/v1/callbacks/{seq}", get(get_callback))
}

/// Throttles the log line of [`ApiError::from`]`(StoreError)`: during a fault every request
/// fails the same way (a full disk took one ERROR line per request, 1,995 of 2,000 lines).
static STORAGE_ERRORS: std::sync::LazyLock<crate::metrics::LogThrottle> =
    std::sync::LazyLock::new(|| crate::metrics::LogThrottle::new(10_000));

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        if !matches!(err, StoreError::QueueFull | StoreError::WriterGone) {
            // The system clock: this conversion has no state to take one from, and only the
            // log's spacing depends on it.
            let now_ms = crate::clock::SystemClock.now_ms();
            // Every route's store errors come through here: under the routes' common target, not
            // this module's (a failed reconciliation is not a callback's).
            if let Some(n) = STORAGE_ERRORS.hit(now_ms) {
                tracing::error!(target: "friendhook::http", error = %err, errors_since_last_line = n,
                    "a request failed on the database and was answered 503 (at most one line every 10 s)");
            }
        }
        unavailable(&err)
    }
}

/// The 503 for a write that was not committed.
fn unavailable(err: &StoreError) -> ApiError {
    match err {
        StoreError::QueueFull => ApiError::Unavailable {
            code: "overloaded",
            detail: "the write queue is full; retry shortly".into(),
            retry_after_secs: 1,
        },
        StoreError::WriterGone => ApiError::Unavailable {
            code: "shutting_down",
            detail: "the service is shutting down; retry shortly".into(),
            retry_after_secs: 1,
        },
        // Its own text names files and a process id, which are not for the sender.
        StoreError::FileGone(_) => ApiError::Unavailable {
            code: "storage_unavailable",
            detail: "the service's database file was removed or replaced while it ran: this callback is not \
                     acknowledged (written, if at all, only into the removed file, kept if that file is put back), \
                     and none will be until an operator puts the file back and restarts the service (GET /readyz \
                     says how)"
                .into(),
            retry_after_secs: 30,
        },
        // Waiting does not mend it; the log line above has the index's name and the cure.
        StoreError::IndexMissing { .. } => ApiError::Unavailable {
            code: "index_missing",
            detail: "the database lacks an index this request reads through (dropped or renamed outside friendhook); \
                     the service log names it, and `friendhook audit verify` prints the SQL that puts it back"
                .into(),
            retry_after_secs: 0,
        },
        _ => ApiError::Unavailable {
            code: "storage_unavailable",
            detail: "the database cannot commit right now; nothing was stored, retry shortly".into(),
            retry_after_secs: 1,
        },
    }
}

/// A callback the store did not take. A full queue is logged here, at most every ten seconds,
/// with how many 503s there were since the previous line (those after the last line of a burst
/// show in the next one, and at once in `/metrics`): under a burst every request fails the same
/// way, and a line each would bury the log. Failed commits are logged by the writer, once per
/// batch and throttled the same way.
fn refused_by_store(state: &AppState, err: StoreError) -> ApiError {
    if matches!(err, StoreError::QueueFull)
        && let Some(n) = state.overloads.hit(state.clock.now_ms())
    {
        let (_, queue) = state.store.write_queue();
        tracing::warn!(
            answered_503_since_last_line = n,
            queue,
            "write queue full: callbacks answered 503 (Easemob retries each once); if this recurs, \
             raise --write-queue or --max-batch, or move the database to a faster disk"
        );
    }
    unavailable(&err)
}

/// The body if it fits, else 413; stops reading at the limit instead of buffering the rest (and
/// refuses a declared size over it before reading anything).
pub(crate) async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::PayloadTooLarge { limit }),
        Err(err) => Err(ApiError::bad_request("body_read_failed", format!("could not read the request body: {err}"))),
    }
}

/// A compressed body would otherwise be refused as "invalid UTF-8", which names the symptom, not
/// the cause. Decompressing is not offered: Easemob sends plain JSON, and the stored body is the
/// bytes as they came.
fn check_content_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    refuse_content_encoding(
        headers,
        "send the callback's JSON uncompressed, without a Content-Encoding header (is a proxy between Easemob and \
         friendhook compressing request bodies?)",
    )
}

/// A 415 naming the request's Content-Encoding, unless there is none (or `identity`); `what_to_do`
/// ends the detail.
pub(crate) fn refuse_content_encoding(headers: &HeaderMap, what_to_do: &str) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("(not text)");
    if text.trim().eq_ignore_ascii_case("identity") {
        return Ok(());
    }
    Err(ApiError::UnsupportedMediaType(format!("Content-Encoding `{text}` is not accepted: {what_to_do}")))
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        // Easemob always sends application/json; a missing header is tolerated, a wrong one is not.
        return Ok(());
    };
    let essence = value.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type must be application/json, got `{}`",
            value.to_str().unwrap_or("(not text)")
        )))
    }
}

async fn receive_callback(
    State(state): State<SharedState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let received = receive(&state, peer, &headers, body).await;
    if let Err(
        err @ (ApiError::BadRequest { .. } | ApiError::PayloadTooLarge { .. } | ApiError::UnsupportedMediaType(_)),
    ) = &received
        && let Some(since_last_line) = state.unreadable_callbacks.hit(state.clock.now_ms())
    {
        // Easemob re-sends once, then drops the event: a sender posting what cannot be read
        // (a proxy rewriting bodies, a callback rule pointed at the wrong endpoint) loses events.
        // `source`, as the 401 and 403 lines have it: behind a trusted proxy, the sender it names.
        let source = source::resolve(&state.settings.trusted_proxies, peer, &headers);
        tracing::warn!(%source, status = err.status().as_u16(), code = err.code(), detail = %err, since_last_line,
            "callback refused as unreadable; nothing was stored (if Easemob sent it, the event is lost after its one retry)");
    }
    state.metrics.callback(match &received {
        Ok(Received::Stored(ack)) if ack.duplicate => CallbackResult::Duplicate,
        Ok(Received::Stored(_)) => CallbackResult::Stored,
        Ok(Received::Quarantined) => CallbackResult::Quarantined,
        Err(err) => match err {
            ApiError::Unauthorized => CallbackResult::Rejected,
            ApiError::Forbidden => CallbackResult::Forbidden,
            ApiError::Unavailable { code: "overloaded", .. } => CallbackResult::Overloaded,
            ApiError::Unavailable { .. } | ApiError::Internal(_) => CallbackResult::Unavailable,
            _ => CallbackResult::Invalid,
        },
    });
    // Easemob accepts at most 1,000 characters in the answer; these stay far below.
    Ok(match received? {
        Received::Stored(ack) => Json(json!({"status": "ok", "seq": ack.seq, "duplicate": ack.duplicate})),
        Received::Quarantined => Json(json!({"status": "quarantined"})),
    }
    .into_response())
}

/// What became of a callback answered 200.
enum Received {
    /// Committed (or counted as another delivery of a stored event).
    Stored(CallbackAck),
    /// Failed verification and kept in quarantine.
    Quarantined,
}

/// Whether `--allow-from` (empty: any source) lets `source` post callbacks. Its address is
/// canonical: on a dual-stack listener (`[::]`) an IPv4 sender shows as `::ffff:a.b.c.d`, which an
/// IPv4 network of the list would never contain.
fn source_allowed(allow_from: &[ipnet::IpNet], source: &Source) -> bool {
    allow_from.is_empty() || source.ip.is_some_and(|ip| allow_from.iter().any(|net| net.contains(&ip)))
}

async fn receive(state: &SharedState, peer: SocketAddr, headers: &HeaderMap, body: Body) -> Result<Received, ApiError> {
    let started = tokio::time::Instant::now();
    let source = source::resolve(&state.settings.trusted_proxies, peer, headers);
    if !source_allowed(&state.settings.allow_from, &source) {
        if source.ignored_forwarding {
            tracing::warn!(%source, "callback from a source outside --allow-from; answered 403 (it came with \
                X-Forwarded-For, which is ignored: if friendhook is behind a reverse proxy, name it with --trusted-proxy)");
        } else {
            tracing::warn!(%source, "callback from a source outside --allow-from; answered 403");
        }
        return Err(ApiError::Forbidden);
    }
    check_content_type(headers)?;
    check_content_encoding(headers)?;
    let body = read_body(headers, body, state.settings.max_body_bytes).await?;
    // Counted from the request's start, like the request deadline it must come before; how long
    // the body took is kept to tell a slow sender from a slow database if it passes.
    let commit_deadline = CommitDeadline { at: started + state.settings.commit_timeout, body_wait: started.elapsed() };
    let received_at_ms = state.clock.now_ms();
    let verifier = &state.verifier;

    let (event, secret_index) = match verify_request(verifier, headers, &body, received_at_ms) {
        Ok(v) => v,
        Err(Refusal::Unparseable(err)) => return Err(parse_error(err)),
        Err(Refusal::BadSignature(err)) => {
            return bad_signature(state, &source, headers, body, received_at_ms, err, commit_deadline).await;
        }
    };

    // The body parsed as JSON, so it is valid UTF-8; the fallback is unreachable in practice.
    let raw_body = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request("invalid_json", "body is not valid UTF-8"))?;
    let insert = state.store.insert_callback(NewCallback {
        body_sha256: chain::sha256_hex(raw_body.as_bytes()),
        raw_body,
        received_at_ms,
        remote_addr: Some(source.text.clone()),
        scheme: verifier.scheme().as_str(),
        secret_index: secret_index as i64,
        event,
    });
    let ack = committed_by(state, commit_deadline, insert).await?.map_err(|err| refused_by_store(state, err))?;
    Ok(Received::Stored(ack))
}

/// When a callback's write must have committed, and how much of that time its body took to
/// arrive.
#[derive(Debug, Clone, Copy)]
struct CommitDeadline {
    at: tokio::time::Instant,
    body_wait: Duration,
}

/// Waits for a write of the receive path until `deadline`.
///
/// Behind a batch that waits on a lock held by another process, a write can wait for two busy
/// timeouts, past the request deadline (a 408 without `Retry-After`): it is answered 503 before
/// that, so that Easemob retries. Its row may still commit later; the retry is then answered as a
/// duplicate (or held in quarantine a second time). When the body itself took most of the time,
/// the answer and the log say so instead of blaming the database.
async fn committed_by<T>(
    state: &SharedState,
    deadline: CommitDeadline,
    write: impl std::future::Future<Output = T>,
) -> Result<T, ApiError> {
    tokio::time::timeout_at(deadline.at, write).await.map_err(|_| {
        // The body's fault only when it left too little time for any commit: with more left, a
        // commit that did not finish is the database's (a lock held elsewhere, say).
        if deadline.body_wait >= state.settings.commit_timeout.mul_f64(0.9) {
            let body_wait = humantime::format_duration(Duration::from_millis(deadline.body_wait.as_millis() as u64));
            tracing::warn!(%body_wait, "a callback's body was so slow to arrive that its commit could not finish \
                before the request deadline: answered 503 (it may still commit; a retry is then a duplicate)");
            return ApiError::Unavailable {
                code: "slow_request_body",
                detail: format!(
                    "the request body took {body_wait} to arrive, which left too little of the request deadline to \
                     commit it; retry (if it commits meanwhile, the retry is answered as a duplicate)"
                ),
                retry_after_secs: 1,
            };
        }
        if let Some(n) = state.commit_timeouts.hit(state.clock.now_ms()) {
            tracing::warn!(
                answered_503_since_last_line = n,
                waited = ?state.settings.commit_timeout,
                "callbacks' commits did not finish in time: answered 503 (they may still commit; Easemob's retry is \
                 then a duplicate). Is another process holding the database's write lock?"
            );
        }
        ApiError::Unavailable {
            code: "storage_unavailable",
            detail: "the database did not commit in time; retry shortly (if it commits meanwhile, the retry is \
                     answered as a duplicate)"
                .into(),
            retry_after_secs: 1,
        }
    })
}

/// Why a request is not a verified callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The body is not a callback friendhook can read (answered 400).
    Unparseable(callback::ParseError),
    /// The signature does not verify (answered 401, or quarantined).
    BadSignature(VerifyError),
}

/// Verifies and parses one request: the receive path's whole decision, pure, so that
/// `friendhook quarantine reverify` applies exactly the same rules to a held request later.
/// Returns the event and the index of the secret that verified it.
///
/// The order depends on the scheme. Easemob signs fields of the body, so the body must parse
/// before the signature can be checked; standard-webhooks signs the exact bytes, so the signature
/// is checked before the body is trusted enough to parse. `now_ms` is the instant the
/// standard-webhooks timestamp tolerance is measured from (the arrival time).
pub fn verify_request(
    verifier: &Verifier,
    headers: &HeaderMap,
    body: &[u8],
    now_ms: i64,
) -> Result<(ParsedCallback, usize), Refusal> {
    match verifier.scheme() {
        Scheme::Easemob => {
            // A body without `security` (or with one that is not a string) is a callback that
            // cannot be authenticated: answered like any failed signature (401, or quarantined),
            // not as unreadable.
            let event = callback::parse(body).map_err(Refusal::Unparseable)?;
            let security =
                event.security.as_deref().ok_or(Refusal::BadSignature(VerifyError::Malformed("security")))?;
            let index = verifier
                .verify_easemob(&event.call_id, &event.timestamp_text, security)
                .map_err(Refusal::BadSignature)?;
            Ok((event, index))
        }
        Scheme::StandardWebhooks => {
            let index = verifier.verify_standard(headers, body, now_ms).map_err(Refusal::BadSignature)?;
            Ok((callback::parse(body).map_err(Refusal::Unparseable)?, index))
        }
    }
}

fn parse_error(err: callback::ParseError) -> ApiError {
    ApiError::bad_request(err.code(), err.to_string())
}

async fn bad_signature(
    state: &SharedState,
    source: &Source,
    headers: &HeaderMap,
    body: Bytes,
    received_at_ms: i64,
    err: VerifyError,
    commit_deadline: CommitDeadline,
) -> Result<Received, ApiError> {
    let body_sha256 = chain::sha256_hex(&body);
    let quarantine = state.settings.on_bad_signature == OnBadSignature::Quarantine;
    if quarantine {
        let kept: serde_json::Map<String, serde_json::Value> =
            ["webhook-id", "webhook-timestamp", "webhook-signature", "content-type"]
                .iter()
                .filter_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()).map(|v| (h.to_string(), json!(v))))
                .collect();
        let hold = state.store.insert_quarantine(QuarantineEntry {
            received_at_ms,
            remote_addr: Some(source.text.clone()),
            reason: err.reason(),
            headers_json: serde_json::Value::Object(kept).to_string(),
            raw_body: body.to_vec(),
        });
        let held = committed_by(state, commit_deadline, hold).await??;
        if let Some(id) = held {
            if let Some(since_last_line) = state.bad_signatures.hit(received_at_ms) {
                tracing::warn!(%source, reason = err.reason(), quarantine_id = id, body_sha256, since_last_line,
                    "callback failed verification; QUARANTINED and answered 200 (check the callback secret; see `friendhook quarantine list`)");
            }
            return Ok(Received::Quarantined);
        }
    }
    // One line per failure would let anyone who reaches the endpoint flood the log: at most one
    // every 10 s, with how many failed since the last one (each is in /metrics and the rejection
    // log besides).
    let throttle = if quarantine { &state.quarantine_full } else { &state.bad_signatures };
    if let Some(since_last_line) = throttle.hit(received_at_ms) {
        if quarantine {
            tracing::warn!(%source, reason = err.reason(), body_sha256, size = body.len(), since_last_line,
                "callback failed verification and the quarantine is full (--quarantine-cap); answered 401 (see \
                 `friendhook quarantine list` and `purge`)");
        } else {
            tracing::warn!(%source, reason = err.reason(), body_sha256, size = body.len(), since_last_line,
                "callback failed verification; answered 401 (check the callback secret; the rejection log keeps each one)");
        }
    }
    let rejection = Rejection {
        received_at_ms,
        remote_addr: Some(source.text.clone()),
        reason: err.reason(),
        body_sha256,
        body_size: body.len() as i64,
    };
    // The record is for the operator; the sender's 401 does not wait past the deadline for it
    // (the write stays queued and lands when the database frees up).
    match tokio::time::timeout_at(commit_deadline.at, state.store.insert_rejection(rejection)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not record a rejected delivery"),
        Err(_) => tracing::warn!("a rejected delivery's record did not commit in time; answered 401 without waiting"),
    }
    Err(ApiError::Unauthorized)
}

/// The roster operations Easemob documents (`payload.operation` of a roster callback).
const ROSTER_OPERATIONS: [&str; 8] =
    ["add", "remove", "accept", "remote_accept", "decline", "remote_decline", "ban", "allow"];

#[derive(Debug, Deserialize)]
// A misspelt parameter is refused: ignored, it would silently answer without its filter.
#[serde(deny_unknown_fields)]
struct ListQuery {
    call_id: Option<String>,
    operation: Option<String>,
    from: Option<String>,
    to: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_callbacks(
    State(state): State<SharedState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(bad_query)?;
    let (since_ms, until_ms) = parse_range(q.since.as_deref(), q.until.as_deref())?;
    let limit = parse_limit(q.limit)?;
    let non_empty = crate::http::query::non_empty;
    let filter = CallbackFilter {
        call_id: non_empty("call_id", q.call_id)?,
        operation: non_empty("operation", q.operation)?,
        // Stored lower-cased, like every user ID (see `callback::parse`).
        from_user: non_empty("from", q.from)?.map(|s| s.to_ascii_lowercase()),
        to_user: non_empty("to", q.to)?.map(|s| s.to_ascii_lowercase()),
        since_ms,
        until_ms,
        after_seq: parse_cursor(q.cursor.as_deref())?,
        limit,
    };
    let operation = filter.operation.clone();
    let items = state.store.list_callbacks(&filter).await?;
    // A misspelt operation (`ADD`, `bogus`) would read as "no such events": an empty page for an
    // operation neither Easemob documents nor any stored callback has is refused instead. One
    // that some callback has is served, documented or not (Easemob may add operations).
    if let Some(op) = operation.filter(|op| items.is_empty() && !ROSTER_OPERATIONS.contains(&op.as_str()))
        && !state.store.any_callback_with_operation(&op).await?
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "no callback has `operation` `{op}`, and Easemob documents no such operation; roster operations \
                 are {} (lower-case)",
                ROSTER_OPERATIONS.join(", ")
            ),
        ));
    }
    let next_cursor = (items.len() as i64 == limit).then(|| items.last().map(|i| i.seq.to_string())).flatten();
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})).into_response())
}

async fn get_callback(
    State(state): State<SharedState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(seq) = path.map_err(bad_path)?;
    let seq: i64 =
        seq.parse().map_err(|_| ApiError::bad_request("invalid_path", format!("`{seq}` is not a sequence number")))?;
    match state.store.get_callback(seq).await? {
        Some(detail) => Ok(Json(detail).into_response()),
        None => Err(ApiError::NotFound(format!("no callback with seq {seq}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_from_matches_ipv4_senders_on_a_dual_stack_listener() {
        let loopback: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().expect("cidr")];
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().expect("addr");
        let plain: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let outside: SocketAddr = "[::ffff:10.0.0.1]:5000".parse().expect("addr");
        let from = |peer| source::resolve(&[], peer, &HeaderMap::new());
        assert!(source_allowed(&loopback, &from(mapped)), "::ffff:127.0.0.1 is 127.0.0.1");
        assert!(source_allowed(&loopback, &from(plain)));
        assert!(!source_allowed(&loopback, &from(outside)));
        assert!(source_allowed(&[], &from(outside)), "no list: any source");
    }
}
