//! `GET /v1/reconciliation`, `GET /v1/feed` (NDJSON, resumable, optional long-poll) and
//! `GET /v1/audit/head`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::query::{bad_query, parse_range};
use crate::app::SharedState;
use crate::error::ApiError;
use crate::metrics::ReportAnswer;
use crate::report::{self, ReportBasis, ReportQuery};
use crate::store::{Store, StoreError};

/// Routes of this module.
pub fn router() -> axum::Router<SharedState> {
    axum::Router::new()
        .route("/v1/reconciliation", get(get_reconciliation))
        .route("/v1/feed", get(get_feed))
        .route("/v1/audit/head", get(get_audit_head))
}

#[derive(Debug, Deserialize)]
// A misspelt parameter is refused: ignored, it would silently answer without its filter.
#[serde(deny_unknown_fields)]
struct ReconciliationQuery {
    since: Option<String>,
    until: Option<String>,
    status: Option<String>,
    owner: Option<String>,
    friend: Option<String>,
    call_id: Option<i64>,
    limit: Option<i64>,
    cursor: Option<String>,
    as_of: Option<String>,
}

async fn get_reconciliation(
    State(state): State<SharedState>,
    query: Result<Query<ReconciliationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(bad_query)?;
    if let Some(s) = &q.status
        && !report::STATUSES.contains(&s.as_str())
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`status` must be one of {}, got `{s}`", report::STATUSES.join(", ")),
        ));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("invalid_query", format!("`limit` must be between 1 and 1000, got {limit}")));
    }
    let limit = limit as usize;
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| {
            report::decode_cursor(c).ok_or_else(|| {
                ApiError::bad_request("invalid_query", "`cursor` must be a `next_cursor` from a previous page")
            })
        })
        .transpose()?;
    let named = q
        .as_of
        .as_deref()
        .map(|a| {
            report::AsOf::parse(a).ok_or_else(|| {
                ApiError::bad_request("invalid_query", "`as_of` must be the `as_of` of a previous report")
            })
        })
        .transpose()?;
    if let (Some((_, from_cursor, _)), Some(named)) = (&cursor, named)
        && *from_cursor != named
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`as_of` differs from the one in `cursor`; a cursor continues its own report, so pass one or the other",
        ));
    }
    let as_of = cursor.as_ref().map(|(_, a, _)| *a).or(named);
    if let Some(as_of) = as_of {
        let facts = state.store.point_facts(as_of.point).await?;
        as_of.check(&facts, state.clock.now_ms()).map_err(|problem| {
            ApiError::bad_request(
                "invalid_query",
                format!("`as_of` {problem}; use the `as_of` of a report from this service, as it was given"),
            )
        })?;
    }
    let (since_ms, until_ms) = parse_range(q.since.as_deref(), q.until.as_deref())?;
    let mut rq = ReportQuery {
        since_ms,
        until_ms,
        status: q.status,
        owner: crate::http::query::non_empty("owner", q.owner)?,
        friend: crate::http::query::non_empty("friend", q.friend)?,
        call_id: q.call_id,
        limit,
        after: cursor.as_ref().map(|(key, ..)| *key),
        as_of,
    };
    let cursor_filters = cursor.and_then(|(.., tag)| tag);
    let id = rq.call_id.unwrap_or_default();
    match report::narrow_to_call(&state.store, &mut rq).await? {
        report::OneCall::Judged => {}
        report::OneCall::NotRecorded => {
            return Err(ApiError::NotFound(format!("no call with id {id}; `GET /v1/calls` lists the calls recorded")));
        }
        report::OneCall::AfterAsOf => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "call {id} was recorded after this `as_of`, so that report cannot hold it; ask without `as_of`"
                ),
            ));
        }
    }
    // Compared with the filters as the report applies them (a call's own range included).
    if let Some(tag) = cursor_filters
        && tag != report::filters_tag(&rq)
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`cursor` continues a report with other filters (since, until, status, owner, friend or call_id); ask \
             with the filters of its first page, or leave `cursor` out to start from the first page of these",
        ));
    }
    let slot = state.reports.enter().await.inspect_err(|_| state.metrics.report(ReportAnswer::Busy))?;
    let params = state.match_params();
    // A report of now is judged as of when it starts, not when it queued.
    let as_of = report::AsOf::given_or_now(rq.as_of, &state.store, params.now_ms).await?;
    let (computed, answer) = slot.reconciliation(&state.store, ReportBasis::new(as_of, &rq, params)).await?;
    state.metrics.report(answer);
    let mut report = report::page(&computed, &rq);
    let point = computed.basis.as_of.point;
    // Let the slot go before the answer is completed and written out.
    drop((computed, slot));
    report::attach_outcome_details(&state.store, &mut report, point).await?;
    Ok(Json(report).into_response())
}

/// Lets one reconciliation report be computed at a time, and keeps the last one for its next
/// pages.
///
/// A report holds both sides of its window in memory while it matches them (380-470 MB for a
/// million calls and a million callbacks, see the README's Performance section). Unlimited, a few
/// auditors reading everything at once would multiply that until the receiver itself ran out of
/// memory, and a receiver killed for memory loses callbacks. Queued, a report waits for the one
/// before it (a one-hour window takes milliseconds, everything about a second per million rows);
/// one that cannot start within `wait` is answered 503 `reconciliation_busy` with `Retry-After`,
/// not left to run into the request deadline. `/metrics` has its own one-at-a-time summary, which
/// holds far less.
///
/// The pages of one report share its [`ReportBasis`] (the cursor carries its point), and a basis
/// always gives the same reconciliation, so the last one computed is kept for
/// [`ReportGate::KEEP_FOR`] after its last use: paging through a report computes it once. At most
/// one is kept, and it is let go before another is computed, so keeping it adds no second
/// report's worth of memory.
#[derive(Debug)]
pub struct ReportGate {
    slot: Arc<tokio::sync::Semaphore>,
    waiting: AtomicUsize,
    wait: Duration,
    /// The last computed report, with a number that changes whenever it is used (for its expiry).
    /// Only taken and put back by the holder of `slot`, and by the expiry task.
    kept: std::sync::Mutex<Option<(Arc<report::Computed>, u64)>>,
    uses: AtomicU64,
}

impl ReportGate {
    /// How long the last report is kept for its next pages after its last use.
    pub const KEEP_FOR: Duration = Duration::from_secs(30);

    /// A gate whose queued reports give up after `wait`.
    pub fn new(wait: Duration) -> Self {
        Self {
            slot: Arc::new(tokio::sync::Semaphore::new(1)),
            waiting: AtomicUsize::new(0),
            wait,
            kept: std::sync::Mutex::new(None),
            uses: AtomicU64::new(0),
        }
    }

    /// Waits (at most `wait`) until no other report is being computed; the report may run while
    /// the returned slot lives.
    pub async fn enter(self: &Arc<Self>) -> Result<ReportSlot, ApiError> {
        let permit = match self.slot.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                tracing::debug!("a reconciliation report waits for the one being computed");
                let _queued = Queued::new(&self.waiting);
                match tokio::time::timeout(self.wait, self.slot.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    // The semaphore is never closed; answer as if busy rather than panic.
                    Ok(Err(_)) | Err(_) => {
                        return Err(ApiError::Unavailable {
                            code: "reconciliation_busy",
                            detail: format!(
                                "another reconciliation report was still being computed after {} ms; reports \
                                 run one at a time because each holds its window's calls and callbacks in \
                                 memory. Retry shortly, or narrow the window with `since`/`until`",
                                self.wait.as_millis()
                            ),
                            retry_after_secs: 2,
                        });
                    }
                }
            }
        };
        Ok(ReportSlot { _permit: permit, gate: self.clone() })
    }

    /// Reports waiting for their turn right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The number of the kept report's last use, if a report is kept.
    pub fn kept_use(&self) -> Option<u64> {
        self.kept().as_ref().map(|(_, n)| *n)
    }

    /// Lets the kept report go if `use_number` is still its last use; `true` if it was let go.
    /// Each use runs this [`ReportGate::KEEP_FOR`] after it, so a report is let go once it has
    /// not been used for that long, and a later use renews it.
    pub fn let_go_unless_used_since(&self, use_number: u64) -> bool {
        let mut kept = self.kept();
        if kept.as_ref().is_some_and(|(_, n)| *n == use_number) {
            *kept = None;
            return true;
        }
        false
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Option<(Arc<report::Computed>, u64)>> {
        // A panic while holding this lock cannot leave the Option half-written.
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The right to compute a report, while it lives.
pub struct ReportSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gate: Arc<ReportGate>,
}

impl ReportSlot {
    /// The reconciliation of `basis`: the kept one if it has this basis ([`ReportAnswer::Reused`]),
    /// otherwise computed now (after letting the kept one go) and kept in its place.
    pub async fn reconciliation(
        &self,
        store: &Store,
        basis: ReportBasis,
    ) -> Result<(Arc<report::Computed>, ReportAnswer), StoreError> {
        let gate = &self.gate;
        let taken = gate.kept().take();
        let (computed, answer) = match taken {
            Some((kept, _)) if kept.basis == basis => (kept, ReportAnswer::Reused),
            other => {
                drop(other);
                (Arc::new(report::compute(store, basis).await?), ReportAnswer::Computed)
            }
        };
        let use_number = gate.uses.fetch_add(1, Ordering::Relaxed);
        *gate.kept() = Some((computed.clone(), use_number));
        // Let it go once it has not been used for a while; a later use renews it.
        let weak = Arc::downgrade(gate);
        tokio::spawn(async move {
            tokio::time::sleep(ReportGate::KEEP_FOR).await;
            if let Some(gate) = weak.upgrade() {
                gate.let_go_unless_used_since(use_number);
            }
        });
        Ok((computed, answer))
    }
}

/// Counts a waiting report for as long as it waits, however the wait ends (a request cut off by
/// its deadline or by the client drops it).
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Deserialize)]
// A misspelt parameter is refused: ignored, it would silently answer without its filter.
#[serde(deny_unknown_fields)]
struct FeedQuery {
    after: Option<i64>,
    /// The `X-Last-Hash` that came with `after`: checked against the record at `after`.
    after_hash: Option<String>,
    limit: Option<i64>,
    wait: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// How often a waiting long-poll looks for records committed by another process.
const FEED_RECHECK: Duration = Duration::from_secs(1);

/// Longest long-poll a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// One page of the feed, with a WARN when it spans seqs no record has (see
/// [`crate::store::FeedPage::missing`]): the first read and each read of a long-poll alike.
async fn read_feed_page(
    state: &SharedState,
    after: i64,
    limit: i64,
    (since, until): (i64, i64),
) -> Result<crate::store::FeedPage, ApiError> {
    let page = state.store.feed_page(after, limit, since, until).await?;
    if let Some(note) = page.missing_note(after) {
        tracing::warn!(after, "{note}");
    }
    Ok(page)
}

async fn get_feed(
    State(state): State<SharedState>,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(bad_query)?;
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`after` must be 0 (from the start) or the `X-Last-Seq` of a previous page",
        ));
    }
    let limit = q.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`limit` must be between 1 and 10000, got {limit}"),
        ));
    }
    let wait = match q.wait.as_deref() {
        None => Duration::ZERO,
        Some(w) => crate::config::parse_duration(w)
            .map_err(|e| ApiError::bad_request("invalid_query", format!("`wait`: {e}")))?,
    };
    // Refused rather than cut short, as `limit` is: a reader that set its own HTTP timeout to a
    // longer wait would otherwise get an empty page early and not know why.
    if wait > MAX_WAIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "`wait` is at most 60s, got {w}: ask again when a page comes back empty (each answer carries the cursor \
                 to ask with)",
                w = q.wait.as_deref().unwrap_or_default()
            ),
        ));
    }
    let (since, until) = parse_range(q.since.as_deref(), q.until.as_deref())?;
    let (since, until) = (since.unwrap_or(i64::MIN), until.unwrap_or(i64::MAX));

    // Long-poll: subscribe before reading, so a commit between the read and the wait is not
    // missed; what is committed already is marked seen, since the read below covers it.
    let mut committed = state.store.committed();
    committed.borrow_and_update();
    let mut page = read_feed_page(&state, after, limit, (since, until)).await?;
    if after > page.head_seq {
        return Err(ApiError::bad_request(
            "cursor_ahead",
            format!(
                "`after` ({after}) is beyond this journal's last seq ({}); a cursor from another database, or \
                 one restored from a backup, would skip everything below it: start again from 0 or from \
                 an `X-Last-Seq` this service gave",
                page.head_seq
            ),
        ));
    }
    // A cursor from another database, or from a newer state of this one than the file now
    // holds, looks like any other once the journal has grown past it: only the link can tell.
    if let Some(given) = q.after_hash.as_deref() {
        let Some(expected) = crate::store::chain::parse_link(given) else {
            return Err(ApiError::bad_request(
                "invalid_query",
                "`after_hash` must be the 64 hex digits of the X-Last-Hash that came with `after`",
            ));
        };
        let found = state.store.link_at(after).await?;
        let Some(found) = found else {
            return Err(ApiError::Conflict {
                code: "cursor_mismatch",
                detail: crate::store::journal::removed_cursor_note(after, page.head_seq),
            });
        };
        if found != expected {
            return Err(ApiError::Conflict {
                code: "cursor_mismatch",
                detail: format!(
                    "the record at seq {after} carries the link {found}, not the `after_hash` {expected} your cursor \
                     was read with: this is another database, or an older copy of the one you read (restored from \
                     a backup, replaced), so the records after seq {after} here are not the ones that followed \
                     your cursor. Find the last seq both agree on (its link is X-Last-Hash of a page that ended \
                     there, or GET /v1/audit/head on the old file), drop what you stored past it, and read on \
                     from there; or start again from after=0"
                ),
            });
        }
    }
    // Where the reader stands: past every record this request has looked at, matching or not.
    let mut resume_after = page.resume_after(after);
    if page.count == 0 && !wait.is_zero() {
        let deadline = tokio::time::Instant::now() + wait;
        let _waiting = state.metrics.feed_long_poll();
        loop {
            // Woken by this service's commits, and at least every FEED_RECHECK: another process
            // may commit to the same file (`quarantine reverify` promoting held requests), and
            // its commits do not pass through this service's writer. A stop ends the wait with
            // the empty page, so that the poll does not hold the shutdown for its whole wait.
            let wake_at = deadline.min(tokio::time::Instant::now() + FEED_RECHECK);
            let woken = tokio::select! {
                () = state.stopping.wait() => break,
                woken = tokio::time::timeout_at(wake_at, committed.changed()) => woken,
            };
            match woken {
                Ok(Ok(())) => {
                    if *committed.borrow_and_update() <= resume_after {
                        continue;
                    }
                }
                Ok(Err(_)) => break, // the writer stopped
                Err(_) if tokio::time::Instant::now() >= deadline => break,
                Err(_) => {}
            }
            // Only what was committed since the last read is read again.
            page = read_feed_page(&state, resume_after, limit, (since, until)).await?;
            resume_after = page.resume_after(resume_after);
            if page.count > 0 {
                break;
            }
        }
    }
    let last = resume_after;
    // Stored records never change, so reading the link apart from the page is safe.
    let last_hash = state.store.link_at(last).await?.unwrap_or_default();
    let mut out = page.ndjson;
    if !out.is_empty() {
        out.push('\n');
    }
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::HeaderName::from_static("x-last-seq"), &last.to_string()),
            (header::HeaderName::from_static("x-last-hash"), &last_hash),
        ],
        Body::from(out),
    )
        .into_response())
}

async fn get_audit_head(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let head = state.store.chain_head().await?;
    Ok(Json(head).into_response())
}
