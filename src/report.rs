//! Reconciliation reports: load the rows a window needs from the store, run the pure matcher
//! ([`crate::reconcile`]), then filter and page. Shared by `GET /v1/reconciliation` and
//! `friendhook reconcile`.
//!
//! To judge calls requested in [since, until) fairly, the matcher also sees the calls and
//! callbacks just outside it: callbacks up to `window + skew` beyond either edge (a call's
//! callback may come later, or Easemob's clock may run behind), and calls up to the same margin
//! before `since` and after `until` (they compete for the same callbacks). Only calls requested inside the range,
//! and orphans whose event time is inside it, are reported.

use std::collections::HashMap;

use serde::Serialize;

use crate::model::Outcome;
use crate::reconcile::{self, CallRow, CallStatus, CallbackRow, MatchParams, Summary};
use crate::store::{Store, StoreError};

/// What to report on.
#[derive(Debug, Clone, Default)]
pub struct ReportQuery {
    /// Lower bound on call request time / orphan event time (epoch ms, inclusive).
    pub since_ms: Option<i64>,
    /// Upper bound (exclusive).
    pub until_ms: Option<i64>,
    /// Only items with this status (`orphan` for callbacks).
    pub status: Option<String>,
    /// Only calls with this owner (orphans: either side equals it).
    pub owner: Option<String>,
    /// Only calls with this friend (orphans: either side equals it).
    pub friend: Option<String>,
    /// Page size.
    pub limit: usize,
    /// Resume after this item key (from `next_cursor`).
    pub cursor: Option<String>,
}

/// A callback as shown in a report.
#[derive(Debug, Clone, Serialize)]
pub struct CallbackRef {
    /// Journal seq.
    pub seq: i64,
    /// payload.operation.
    pub operation: String,
    /// from.
    pub from_user: String,
    /// to.
    pub to_user: String,
    /// Event time.
    pub timestamp: i64,
    /// When stored.
    pub received_at: i64,
}

impl From<&CallbackRow> for CallbackRef {
    fn from(c: &CallbackRow) -> Self {
        Self {
            seq: c.seq,
            operation: c.operation.clone(),
            from_user: c.from_user.clone(),
            to_user: c.to_user.clone(),
            timestamp: c.timestamp_ms,
            received_at: c.received_at_ms,
        }
    }
}

/// One report line: a call with its verdict, or an orphan callback.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReportItem {
    /// A call.
    Call {
        /// Call id.
        id: i64,
        /// add / remove.
        op: &'static str,
        /// Owner.
        owner: String,
        /// Friend.
        friend: String,
        /// Intent time.
        requested_at: i64,
        /// Outcome time.
        completed_at: Option<i64>,
        /// Outcome.
        outcome: Outcome,
        /// Reconciliation status.
        status: CallStatus,
        /// Callback arrived after the window closed.
        late: bool,
        /// Trigger to stored-callback latency.
        latency_ms: Option<i64>,
        /// The nearest callback.
        matched: Option<CallbackRef>,
        /// Further callbacks for the same pair in the window.
        extras: Vec<CallbackRef>,
    },
    /// A callback no call explains.
    Callback {
        /// Always `orphan`.
        status: &'static str,
        /// The callback.
        #[serde(flatten)]
        callback: CallbackRef,
    },
}

impl ReportItem {
    fn key(&self) -> (i64, u8, i64) {
        match self {
            ReportItem::Call { requested_at, id, .. } => (*requested_at, 0, *id),
            ReportItem::Callback { callback, .. } => (callback.timestamp, 1, callback.seq),
        }
    }

    fn status_name(&self) -> &'static str {
        match self {
            ReportItem::Call { status, .. } => match status {
                CallStatus::Matched => "matched",
                CallStatus::Pending => "pending",
                CallStatus::Missing => "missing",
                CallStatus::NotExpected => "not_expected",
                CallStatus::Unexpected => "unexpected",
            },
            ReportItem::Callback { .. } => "orphan",
        }
    }

    fn involves(&self, owner: Option<&str>, friend: Option<&str>) -> bool {
        match self {
            ReportItem::Call { owner: o, friend: f, .. } => {
                owner.is_none_or(|x| x == o) && friend.is_none_or(|x| x == f)
            }
            ReportItem::Callback { callback, .. } => {
                let side = |x: &str| x == callback.from_user || x == callback.to_user;
                owner.is_none_or(side) && friend.is_none_or(side)
            }
        }
    }
}

/// The report: summary over everything selected, plus one page of items.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Counts and latency over the whole selection (before paging).
    pub summary: Summary,
    /// One page of items, ordered by time.
    pub items: Vec<ReportItem>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

fn encode_cursor(k: (i64, u8, i64)) -> String {
    format!("{}.{}.{}", k.0, k.1, k.2)
}

/// Parses a cursor produced by a previous page.
pub fn decode_cursor(s: &str) -> Option<(i64, u8, i64)> {
    let mut it = s.split('.');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    let c = it.next()?.parse().ok()?;
    it.next().is_none().then_some((a, b, c))
}

/// Builds a report.
pub async fn build(store: &Store, q: &ReportQuery, params: MatchParams) -> Result<Report, StoreError> {
    let margin = params.window_ms.saturating_add(params.skew_ms);
    let since = q.since_ms.unwrap_or(i64::MIN);
    let until = q.until_ms.unwrap_or(i64::MAX);
    // Two read connections load both sides at once.
    let (calls, callbacks) = tokio::try_join!(
        store.calls_for_reconcile(since.saturating_sub(margin), until.saturating_add(margin)),
        store.roster_callbacks_for_reconcile(since.saturating_sub(margin), until.saturating_add(margin)),
    )?;
    let result = reconcile::reconcile(&calls, &callbacks, &params);
    let by_seq: HashMap<i64, &CallbackRow> = callbacks.iter().map(|c| (c.seq, c)).collect();

    // Keep only what lies inside the requested range; context rows were there to compete fairly.
    let mut in_range = reconcile::Reconciliation { calls: Vec::new(), orphans: Vec::new() };
    let mut items: Vec<ReportItem> = Vec::new();
    for (call, verdict) in calls.iter().zip(&result.calls) {
        if call.requested_at_ms < since || call.requested_at_ms >= until {
            continue;
        }
        let item = call_item(call, verdict, &by_seq);
        if item.involves(q.owner.as_deref(), q.friend.as_deref()) {
            in_range.calls.push(verdict.clone());
            items.push(item);
        }
    }
    for seq in &result.orphans {
        let Some(cb) = by_seq.get(seq) else { continue };
        if cb.timestamp_ms < since || cb.timestamp_ms >= until {
            continue;
        }
        let item = ReportItem::Callback { status: "orphan", callback: CallbackRef::from(*cb) };
        if item.involves(q.owner.as_deref(), q.friend.as_deref()) {
            in_range.orphans.push(*seq);
            items.push(item);
        }
    }
    let summary = reconcile::summarize(&in_range);

    if let Some(status) = &q.status {
        items.retain(|i| i.status_name() == status);
    }
    items.sort_by_key(ReportItem::key);
    if let Some(after) = q.cursor.as_deref().and_then(decode_cursor) {
        items.retain(|i| i.key() > after);
    }
    let limit = q.limit.max(1);
    let next_cursor = (items.len() > limit).then(|| encode_cursor(items[limit - 1].key()));
    items.truncate(limit);
    Ok(Report { summary, items, next_cursor })
}

fn call_item(call: &CallRow, v: &reconcile::CallReport, by_seq: &HashMap<i64, &CallbackRow>) -> ReportItem {
    ReportItem::Call {
        id: call.id,
        op: call.op.as_str(),
        owner: call.owner.clone(),
        friend: call.friend.clone(),
        requested_at: call.requested_at_ms,
        completed_at: call.completed_at_ms,
        outcome: call.outcome,
        status: v.status,
        late: v.late,
        latency_ms: v.latency_ms,
        matched: v.matched.and_then(|s| by_seq.get(&s)).map(|c| CallbackRef::from(*c)),
        extras: v.extras.iter().filter_map(|s| by_seq.get(s)).map(|c| CallbackRef::from(*c)).collect(),
    }
}

/// Valid values of the `status` filter.
pub const STATUSES: [&str; 6] = ["matched", "pending", "missing", "not_expected", "unexpected", "orphan"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips() {
        assert_eq!(decode_cursor(&encode_cursor((-5, 1, 42))), Some((-5, 1, 42)));
        assert_eq!(decode_cursor("1.2"), None);
        assert_eq!(decode_cursor("a.b.c"), None);
    }
}
