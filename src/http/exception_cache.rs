//! `GET /v1/easemob/exception-cache` and `POST /v1/easemob/exception-cache/resend`: getting back
//! the callbacks Easemob could not deliver (friendhook down, unreachable, answering 5xx), from
//! Easemob's exception cache (回调异常缓存, a paid add-on that keeps them for 3 days in 10-minute
//! buckets; easemob-api.md §8.7).
//!
//! friendhook only asks: Easemob re-sends the callbacks to the rule's URL (or `target_url`), where
//! they arrive, are verified and are deduplicated like any delivery, so a bucket sent twice, or
//! one holding callbacks that did arrive after all, stores nothing twice. Re-sending is left to
//! an operator (or a cron job) rather than done at start-up: a bucket can be large, and Easemob
//! recommends at most 10 re-sends per bucket.

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::friends::{Object, client, json_body, token_unavailable};
use crate::app::{SharedState, WorkStarted};
use crate::easemob::{ApiFailure, CacheBucket, EasemobClient};
use crate::error::ApiError;

/// Easemob's recommended ceiling of re-sends per bucket.
pub const MAX_RESENDS_PER_BUCKET: u32 = 10;

/// Routes of this module.
pub fn router() -> axum::Router<SharedState> {
    axum::Router::new()
        .route("/v1/easemob/exception-cache", get(list_buckets))
        .route("/v1/easemob/exception-cache/resend", post(resend))
}

/// What went wrong asking Easemob, as an answer to our caller.
fn easemob_refused(failure: &ApiFailure) -> ApiError {
    if failure.is_token_failure() {
        return token_unavailable(failure, failure.to_string());
    }
    match failure {
        ApiFailure::NotSent { reason } => {
            ApiError::Unavailable { code: "shutting_down", detail: reason.clone(), retry_after_secs: 5 }
        }
        ApiFailure::Rejected { status: 403, .. } => ApiError::BadGateway {
            code: "exception_cache_not_enabled",
            detail: format!(
                "{failure}. Most likely the app does not have the exception cache (回调异常缓存), a paid add-on of \
                 Easemob's Pro and Flagship plans; without it, callbacks that could not be delivered are gone"
            ),
        },
        _ => ApiError::BadGateway { code: "easemob_failed", detail: failure.to_string() },
    }
}

async fn buckets(client: &EasemobClient) -> Result<Vec<CacheBucket>, ApiError> {
    client.exception_cache_buckets().await.map_err(|failure| {
        tracing::warn!(error = %failure, "could not read Easemob's exception cache");
        easemob_refused(&failure)
    })
}

async fn list_buckets(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let client = client(&state)?;
    let buckets = buckets(&client).await?;
    let callbacks = buckets.iter().fold(0u64, |total, b| total.saturating_add(b.size));
    Ok(Json(json!({"buckets": buckets, "callbacks": callbacks})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResendBody {
    /// Bucket keys (`date` of the listing).
    #[serde(default)]
    dates: Vec<String>,
    /// Every bucket kept.
    #[serde(default)]
    all: bool,
    /// Where Easemob should send them (default: the callback rule's URL).
    target_url: Option<String>,
}

/// One bucket's result.
#[derive(Debug, Serialize)]
struct Resent {
    date: String,
    /// Callbacks in it when asked (`null` for a date not in the cache).
    size: Option<u64>,
    /// Re-sends asked for before this one.
    retry: Option<u32>,
    /// Easemob accepted the request ("success"); the callbacks then arrive by the usual way.
    resent: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

async fn resend(
    State(state): State<SharedState>,
    started: Option<Extension<WorkStarted>>,
    body: Result<Json<Object<ResendBody>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Object(request) = json_body(body)?;
    // Both given, or neither.
    if request.all != request.dates.is_empty() {
        let detail = if request.all {
            "give `dates` or `\"all\": true`, not both (`all` re-sends every bucket Easemob lists)"
        } else {
            "give one of `dates` (keys from GET /v1/easemob/exception-cache) or `\"all\": true`"
        };
        return Err(ApiError::bad_request("invalid_request", detail));
    }
    // Checked whole: each request counts against the bucket's few re-sends, and Easemob takes
    // any text, so a URL nothing can receive at would spend one for nothing.
    if let Some(target) = &request.target_url {
        let parsed = reqwest::Url::parse(target)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()));
        // The URL parser drops tabs and newlines, and spaces at the ends, without a word.
        let parsed = parsed.filter(|_| !target.chars().any(|c| c.is_whitespace() || c.is_control()));
        if parsed.is_none() {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "`target_url` must be an http:// or https:// URL with a host and no spaces or control \
                     characters (e.g. https://example.com/callbacks/easemob), got {target:?}"
                ),
            ));
        }
    }
    let client = client(&state)?;
    let kept = buckets(&client).await?;
    let mut wanted: Vec<String> =
        if request.all { kept.iter().map(|b| b.date.clone()).collect() } else { request.dates.clone() };
    // A date given twice is asked for once (each request counts against the bucket's re-sends).
    let mut seen = std::collections::HashSet::new();
    wanted.retain(|date| seen.insert(date.clone()));
    // In a task of its own: past --trigger-timeout the request is answered, and the buckets not
    // asked for yet still are (the client is told not to send it again).
    WorkStarted::start(started.as_ref().map(|Extension(started)| started))?;
    let results =
        tokio::spawn(resend_each(client, kept, wanted, request.target_url)).await.map_err(ApiError::internal)?;
    Ok(Json(json!({"results": results})).into_response())
}

/// Whether `date` has the shape of an exception-cache bucket key (`yyyyMMddHHmm`).
fn is_bucket_key(date: &str) -> bool {
    date.len() == 12 && date.bytes().all(|b| b.is_ascii_digit())
}

/// Asks Easemob to re-send each wanted bucket in turn; one result per date.
async fn resend_each(
    client: EasemobClient,
    kept: Vec<CacheBucket>,
    wanted: Vec<String>,
    target_url: Option<String>,
) -> Vec<Resent> {
    let mut results = Vec::with_capacity(wanted.len());
    for date in wanted {
        let Some(bucket) = kept.iter().find(|b| b.date == date) else {
            let reason = if is_bucket_key(&date) {
                "not in Easemob's exception cache (empty, expired after 3 days, or never there)".to_owned()
            } else {
                "not a bucket key: Easemob keys its 10-minute buckets by their start as yyyyMMddHHmm \
                 (e.g. 202109091440); list them with GET /v1/easemob/exception-cache"
                    .to_owned()
            };
            results.push(Resent { date, size: None, retry: None, resent: false, reason: Some(reason) });
            continue;
        };
        let mut result =
            Resent { date, size: Some(bucket.size), retry: Some(bucket.retry), resent: false, reason: None };
        if bucket.retry >= MAX_RESENDS_PER_BUCKET {
            result.reason = Some(format!(
                "re-sent {} times already; Easemob recommends at most {MAX_RESENDS_PER_BUCKET}: is the receiver reachable \
                 from Easemob?",
                bucket.retry
            ));
        } else {
            match client.exception_cache_resend(&result.date, bucket.retry, target_url.as_deref()).await {
                Ok(true) => result.resent = true,
                Ok(false) => {
                    result.reason = Some(
                        "Easemob answered \"failure\": the bucket may have expired or been emptied since it was \
                         listed; list the buckets again with GET /v1/easemob/exception-cache"
                            .into(),
                    )
                }
                Err(failure) => result.reason = Some(easemob_refused(&failure).to_string()),
            }
        }
        tracing::info!(
            date = %result.date, size = bucket.size, earlier_resends = bucket.retry, resent = result.resent,
            reason = result.reason.as_deref().unwrap_or(""), "asked Easemob to re-send an exception-cache bucket"
        );
        results.push(result);
    }
    results
}
