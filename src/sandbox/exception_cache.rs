//! The exception cache (回调异常缓存, a paid add-on of Easemob): callbacks whose delivery failed
//! are kept in 10-minute buckets for 3 days, listed by `GET /{org}/{app}/callbacks/storage/info`
//! and sent again, a bucket at a time, on `POST /{org}/{app}/callbacks/storage/retry`
//! (easemob-api.md §8.7).
//!
//! What Easemob documents: the buckets (`date` = the bucket's start as `yyyyMMddHHmm`, `size`,
//! `retry`), the 3-day retention, the request body (`date` required, `retry` the caller's own
//! counter, `targetUrl` defaulting to the rule's URL) and the answer (`"data":"success"` or
//! `"failure"`). What it does not, and the sandbox chooses: the time zone of `date` (UTC here; a
//! receiver should treat the key as opaque), that a callback sent again successfully leaves its
//! bucket and one that fails again stays, that `retry` counts the re-sends asked for (a callback
//! that fails later into a bucket already re-sent shares its count), that at most [`MAX_KEPT`]
//! callbacks are kept (the oldest go first), that a
//! banned rule's callbacks are kept too (they failed to go), and that a dropped one (the drop
//! fault: lost before Easemob tried) is not.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::{ApiError, EasemobError};
use super::state::{SandboxState, Timing};

/// Width of a bucket.
pub const BUCKET_MS: i64 = 10 * 60 * 1000;
/// How long a failed callback is kept.
pub const RETENTION_MS: i64 = 3 * 24 * 60 * 60 * 1000;
/// Most callbacks kept at once (the oldest bucket's oldest go first), so that a long benchmark
/// against a receiver that is down cannot grow the sandbox without bound.
pub const MAX_KEPT: usize = 100_000;

/// A callback kept for a re-send: its record in the callback log and its exact bytes.
#[derive(Debug, Clone)]
pub struct Cached {
    /// Its sequence number in the callback log.
    pub seq: u64,
    /// The body as first sent (same callId, timestamp and signature).
    pub body: Bytes,
}

/// One bucket as the info endpoint lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketInfo {
    /// Start of the bucket, `yyyyMMddHHmm` (UTC).
    pub date: String,
    /// Callbacks in it.
    pub size: usize,
    /// Re-sends asked for so far.
    pub retry: u32,
}

#[derive(Debug, Default)]
struct Bucket {
    items: VecDeque<Cached>,
    retry: u32,
}

/// The buckets, by start time.
#[derive(Debug, Default)]
pub struct ExceptionCache {
    buckets: BTreeMap<i64, Bucket>,
    kept: usize,
}

impl ExceptionCache {
    /// Keeps a callback that failed at `now_ms`.
    pub fn keep(&mut self, now_ms: i64, item: Cached) {
        self.put_back(bucket_of(now_ms), item);
    }

    /// Puts back a callback of the bucket starting at `start` whose re-send failed too.
    pub fn put_back(&mut self, start: i64, item: Cached) {
        self.buckets.entry(start).or_default().items.push_back(item);
        self.kept += 1;
        while self.kept > MAX_KEPT {
            let Some(mut oldest) = self.buckets.first_entry() else { break };
            if oldest.get().items.is_empty() {
                oldest.remove();
                continue;
            }
            oldest.get_mut().items.pop_front();
            self.kept -= 1;
        }
    }

    /// The non-empty buckets kept at `now_ms`, oldest first.
    pub fn info(&mut self, now_ms: i64) -> Vec<BucketInfo> {
        self.expire(now_ms);
        self.buckets
            .iter()
            .filter(|(_, b)| !b.items.is_empty())
            .map(|(start, b)| BucketInfo { date: date_key(*start), size: b.items.len(), retry: b.retry })
            .collect()
    }

    /// Takes the callbacks of the bucket named `date` for a re-send and counts the re-send;
    /// `None` if no such bucket is kept. Returns the bucket's start with them.
    pub fn take(&mut self, now_ms: i64, date: &str) -> Option<(i64, Vec<Cached>)> {
        self.expire(now_ms);
        let (start, bucket) =
            self.buckets.iter_mut().find(|(start, b)| !b.items.is_empty() && date_key(**start) == date)?;
        bucket.retry += 1;
        let items = Vec::from(std::mem::take(&mut bucket.items));
        self.kept -= items.len();
        Some((*start, items))
    }

    fn expire(&mut self, now_ms: i64) {
        let kept = &mut self.kept;
        self.buckets.retain(|start, bucket| {
            let keep = start + BUCKET_MS > now_ms - RETENTION_MS;
            if !keep {
                *kept -= bucket.items.len();
            }
            keep
        });
    }
}

fn bucket_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(BUCKET_MS)
}

/// `yyyyMMddHHmm` of an instant, in UTC.
pub fn date_key(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    // `2026-11-27T10:10:00Z`: its digits, up to the minutes.
    humantime::format_rfc3339_seconds(at).to_string().chars().filter(char::is_ascii_digit).take(12).collect()
}

/// The envelope both endpoints answer in (easemob-api.md §8.7).
fn envelope(state: &SandboxState, timing: &Timing, data: Value) -> Json<Value> {
    let now = state.clock().now_ms();
    let config = state.config();
    Json(json!({
        "path": "/callbacks",
        "uri": format!("{}/callbacks", state.app_url()),
        "timestamp": now,
        "organization": config.org,
        "application": state.application(),
        "action": "post",
        "data": data,
        "duration": timing.elapsed_at(now),
        "applicationName": config.app,
    }))
}

/// `GET /{org}/{app}/callbacks/storage/info`.
pub async fn info(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    Path(_): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if !state.config().exception_cache {
        return Err(state.reject(&timing, EasemobError::ServiceNotEnabled));
    }
    let buckets = state.exception_cache_info();
    Ok(envelope(&state, &timing, json!(buckets)))
}

#[derive(Debug, Deserialize)]
struct RetryBody {
    date: Option<String>,
    #[serde(default)]
    retry: Option<Value>,
    #[serde(rename = "targetUrl")]
    target_url: Option<String>,
}

/// `POST /{org}/{app}/callbacks/storage/retry`: `"success"` once the bucket's callbacks are on
/// their way (each sent with one immediate retry, like a first delivery), `"failure"` for a
/// bucket that is not kept.
pub async fn retry(
    State(state): State<Arc<SandboxState>>,
    timing: Timing,
    Path(_): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    if !state.config().exception_cache {
        return Err(state.reject(&timing, EasemobError::ServiceNotEnabled));
    }
    let request: RetryBody =
        serde_json::from_slice(&body).map_err(|e| state.reject(&timing, EasemobError::JsonParse(e.to_string())))?;
    let _ = request.retry;
    let Some(date) = request.date.filter(|d| !d.is_empty()) else {
        return Err(state.reject(&timing, EasemobError::IllegalArgument("date must be provided".into())));
    };
    let resent = state.resend_from_exception_cache(&date, request.target_url);
    Ok(envelope(&state, &timing, json!(if resent { "success" } else { "failure" })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64) -> Cached {
        Cached { seq, body: Bytes::from(format!("{{\"n\":{seq}}}")) }
    }

    #[test]
    fn date_keys_are_the_buckets_start_to_the_minute() {
        // 2026-11-27T10:14:59.999Z falls in the bucket of 10:10.
        let at = 1_795_774_499_999;
        assert_eq!(date_key(bucket_of(at)), "202611271010");
        assert_eq!(date_key(0), "197001010000");
    }

    #[test]
    fn failed_callbacks_are_kept_by_bucket_and_taken_a_bucket_at_a_time() {
        let mut cache = ExceptionCache::default();
        let t0 = 1_795_774_200_000; // 10:10:00
        cache.keep(t0 + 1, item(1));
        cache.keep(t0 + BUCKET_MS - 1, item(2));
        cache.keep(t0 + BUCKET_MS, item(3));
        let info = cache.info(t0 + BUCKET_MS);
        assert_eq!(
            info,
            vec![
                BucketInfo { date: "202611271010".into(), size: 2, retry: 0 },
                BucketInfo { date: "202611271020".into(), size: 1, retry: 0 },
            ]
        );
        let (start, items) = cache.take(t0 + BUCKET_MS, "202611271010").expect("kept");
        assert_eq!((start, items.iter().map(|i| i.seq).collect::<Vec<_>>()), (t0, vec![1, 2]));
        assert!(cache.take(t0 + BUCKET_MS, "202611271010").is_none(), "an emptied bucket is gone");
        cache.put_back(start, item(2));
        assert_eq!(cache.info(t0 + BUCKET_MS)[0], BucketInfo { date: "202611271010".into(), size: 1, retry: 1 });
        assert!(cache.take(t0, "209901010000").is_none());
    }

    #[test]
    fn past_the_cap_the_oldest_callbacks_go_first() {
        let mut cache = ExceptionCache::default();
        let t0 = 1_795_774_200_000;
        for seq in 0..MAX_KEPT as u64 {
            cache.keep(t0, item(seq));
        }
        cache.keep(t0 + BUCKET_MS, item(u64::MAX));
        let info = cache.info(t0 + BUCKET_MS);
        assert_eq!(info.iter().map(|b| b.size).collect::<Vec<_>>(), [MAX_KEPT - 1, 1]);
        let (_, items) = cache.take(t0 + BUCKET_MS, "202611271010").expect("kept");
        assert_eq!(items[0].seq, 1, "seq 0, the oldest, went");
        cache.keep(t0 + BUCKET_MS, item(7));
        assert_eq!(cache.info(t0 + BUCKET_MS).iter().map(|b| b.size).sum::<usize>(), 2, "room again after a take");
    }

    #[test]
    fn buckets_are_kept_for_three_days() {
        let mut cache = ExceptionCache::default();
        let t0 = 1_795_774_200_000;
        cache.keep(t0, item(1));
        assert_eq!(cache.info(t0 + RETENTION_MS).len(), 1, "its last minute is within three days");
        assert!(cache.info(t0 + RETENTION_MS + BUCKET_MS).is_empty());
    }
}
