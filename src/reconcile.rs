//! Matching calls against callbacks: plain functions over rows (no HTTP, no SQL, no clock reads;
//! "now" arrives in [`MatchParams`]).
//!
//! # Rules
//!
//! A call (`op` add or remove, owner O, friend F) spans `[t0, t1]`: `t0` is `requested_at_ms`,
//! `t1` is `completed_at_ms`, or `now_ms` while the call is in flight. Its *window* is
//! `[t0 - skew_ms, t1 + window_ms]`, inclusive at both ends.
//!
//! - **Candidates.** A callback is a candidate for a call when its `operation` is
//!   `op.expected_callback_operation()`, it is between O and F in either direction, and its
//!   `timestamp_ms` lies in the call's window.
//! - **Distance** of a callback to a call: 0 inside `[t0, t1]`, else the distance to the nearer
//!   of `t0` and `t1`.
//! - **Primary matches** come from one global greedy pass over all candidate pairs in the total
//!   order `(distance, callback.timestamp_ms, callback.seq, call.requested_at_ms, call.id)`:
//!   a pair is taken when neither its call nor its callback is taken yet. The order never looks
//!   at input positions, so the result does not depend on input order.
//! - **Extras.** A callback inside some call's window that is nobody's primary (the
//!   other-direction echo, a re-delivery) attaches to its nearest candidate call in the same
//!   order. It is never an orphan.
//! - **Orphans** are callbacks inside no call's window.
//! - **Status**, by outcome:
//!   - succeeded: primary → matched; else pending while `now_ms <= t1 + window_ms`, then missing;
//!   - in flight: primary → matched; else pending;
//!   - rejected / failed: primary → unexpected; else not expected;
//!   - unknown: primary → matched (the callback proves Easemob acted); else not expected.
//! - **Late**: the primary's `received_at_ms` is after `t1 + window_ms`, i.e. it reached us after
//!   the call would have been declared missing.
//! - **Latency**: primary `received_at_ms - requested_at_ms` (trigger to stored callback).
//!
//! Two edge conventions the rules above leave open: a call that has an outcome other than in
//! flight but no `completed_at_ms` uses `t1 = t0` (it finished, we just do not know when, and
//! Easemob acts right after the request); and `t1` is clamped to at least `t0` so a completion
//! recorded "before" the request (clock step) still yields a well-formed span.
//!
//! # Cost
//!
//! Calls and callbacks are sorted once by (unordered user pair, operation) with borrowed `&str`
//! keys, then matched group by group, so unrelated pairs never meet: `O((n + m) log(n + m))` for
//! the grouping plus, per group, `O(c log c)` for its `c` candidate pairs. Candidates are only
//! enumerated inside a group, so `c` is bounded by the calls of one pair times the callbacks that
//! fall in each call's window.

use serde::Serialize;

use crate::model::{CallOp, Outcome};

/// A triggered call, as reconciliation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRow {
    /// Call id (stable, unique).
    pub id: i64,
    /// Add or remove.
    pub op: CallOp,
    /// The user the call was made for.
    pub owner: String,
    /// The other user.
    pub friend: String,
    /// When the intent was recorded (epoch ms): t0.
    pub requested_at_ms: i64,
    /// When the outcome was recorded (epoch ms): t1. `None` while in flight.
    pub completed_at_ms: Option<i64>,
    /// How the call ended.
    pub outcome: Outcome,
}

/// A stored roster callback with operation `add` or `remove`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackRow {
    /// Sequence number (stable, unique).
    pub seq: i64,
    /// `payload.operation`.
    pub operation: String,
    /// Normalised `from`.
    pub from_user: String,
    /// Normalised `to`.
    pub to_user: String,
    /// The event's own timestamp (epoch ms).
    pub timestamp_ms: i64,
    /// When friendhook first stored it (epoch ms).
    pub received_at_ms: i64,
}

/// Matching parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchParams {
    /// How far before t0 a callback's timestamp may lie (clock skew between us and Easemob).
    pub skew_ms: i64,
    /// How long after t1 a callback's timestamp may lie.
    pub window_ms: i64,
    /// Now (epoch ms): decides pending vs missing.
    pub now_ms: i64,
}

/// Status of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// An expected callback came.
    Matched,
    /// No callback yet and the window is still open.
    Pending,
    /// The window closed and nothing came.
    Missing,
    /// The call did not succeed and no callback came (nothing was expected).
    NotExpected,
    /// The call was rejected or failed, yet a matching callback arrived.
    Unexpected,
}

/// The verdict for one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallReport {
    /// The call's id.
    pub call_id: i64,
    /// Its status.
    pub status: CallStatus,
    /// Seq of the primary (nearest) callback.
    pub matched: Option<i64>,
    /// Seqs of further callbacks attached to this call (other direction, re-deliveries).
    pub extras: Vec<i64>,
    /// The primary callback was received after the window had closed.
    pub late: bool,
    /// Primary callback's `received_at_ms` minus the call's `requested_at_ms`.
    pub latency_ms: Option<i64>,
}

/// The result of reconciling a set of calls and callbacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    /// One report per input call, in input order.
    pub calls: Vec<CallReport>,
    /// Seqs of callbacks no call explains, ascending.
    pub orphans: Vec<i64>,
}

/// Latency percentiles over matched calls (ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: Option<i64>,
    /// 95th percentile.
    pub p95: Option<i64>,
    /// 99th percentile.
    pub p99: Option<i64>,
    /// Maximum.
    pub max: Option<i64>,
}

/// Counts per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Calls matched.
    pub matched: u64,
    /// Calls pending.
    pub pending: u64,
    /// Calls missing.
    pub missing: u64,
    /// Calls not expecting a callback and without one.
    pub not_expected: u64,
    /// Failed or rejected calls that got a callback anyway.
    pub unexpected: u64,
    /// Callbacks no call explains.
    pub orphan: u64,
    /// Match latency percentiles.
    pub match_latency_ms: LatencySummary,
}

/// Reconciles calls against callbacks.
///
/// Returns one [`CallReport`] per call in input order, and the orphan callbacks ascending by
/// seq. See the module documentation for the rules.
pub fn reconcile(calls: &[CallRow], callbacks: &[CallbackRow], params: &MatchParams) -> Reconciliation {
    // Sort both sides by group, then by the within-group order the total order needs:
    // calls by (requested_at_ms, id), callbacks by (timestamp_ms, seq). After that, local
    // positions inside a group compare exactly like those tie-breakers, so candidate pairs can
    // be sorted on small integers instead of re-reading rows.
    let mut call_order: Vec<(GroupKey<'_>, i64, i64, usize)> = calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let key = group_key(&c.owner, &c.friend, c.op.expected_callback_operation());
            (key, c.requested_at_ms, c.id, i)
        })
        .collect();
    call_order.sort_unstable();
    let mut cb_order: Vec<(GroupKey<'_>, i64, i64, usize)> = callbacks
        .iter()
        .enumerate()
        .map(|(i, cb)| {
            (
                group_key(&cb.from_user, &cb.to_user, &cb.operation),
                cb.timestamp_ms,
                cb.seq,
                i,
            )
        })
        .collect();
    cb_order.sort_unstable();

    let mut out = Assignments {
        primary: vec![None; calls.len()],
        extras: vec![Vec::new(); calls.len()],
        orphans: Vec::new(),
    };
    // Buffers reused across groups: with a million small groups, per-group allocation would
    // dominate.
    let mut scratch = Scratch::default();

    // Merge-walk the two sorted lists group by group.
    let (mut i, mut j) = (0, 0);
    while i < call_order.len() || j < cb_order.len() {
        let key = match (call_order.get(i), cb_order.get(j)) {
            (Some(c), Some(b)) => c.0.min(b.0),
            (Some(c), None) => c.0,
            (None, Some(b)) => b.0,
            (None, None) => break,
        };
        let i_end = i + call_order[i..].iter().take_while(|c| c.0 == key).count();
        let j_end = j + cb_order[j..].iter().take_while(|b| b.0 == key).count();
        let group_calls = &call_order[i..i_end];
        let group_cbs = &cb_order[j..j_end];
        if group_calls.is_empty() {
            // No call for this pair and operation: every callback is an orphan.
            out.orphans.extend(group_cbs.iter().map(|b| b.2));
        } else if !group_cbs.is_empty() {
            match_group(group_calls, group_cbs, calls, params, &mut scratch, &mut out);
        }
        i = i_end;
        j = j_end;
    }

    out.orphans.sort_unstable();
    let reports = calls
        .iter()
        .zip(out.primary)
        .zip(out.extras)
        .map(|((call, primary), mut extras)| {
            extras.sort_unstable();
            report(call, primary.map(|k| &callbacks[k]), extras, params)
        })
        .collect();
    Reconciliation {
        calls: reports,
        orphans: out.orphans,
    }
}

/// Counts and latency percentiles of a reconciliation.
///
/// Percentiles use the nearest-rank method (`sorted[ceil(q * n) - 1]`) over every call that has
/// a `latency_ms`, i.e. every call with a primary callback (matched, and unexpected too); all are
/// `None` when there is none.
pub fn summarize(r: &Reconciliation) -> Summary {
    let mut s = Summary::default();
    for c in &r.calls {
        let counter = match c.status {
            CallStatus::Matched => &mut s.matched,
            CallStatus::Pending => &mut s.pending,
            CallStatus::Missing => &mut s.missing,
            CallStatus::NotExpected => &mut s.not_expected,
            CallStatus::Unexpected => &mut s.unexpected,
        };
        *counter += 1;
    }
    s.orphan = r.orphans.len() as u64;

    let mut latencies: Vec<i64> = r.calls.iter().filter_map(|c| c.latency_ms).collect();
    latencies.sort_unstable();
    s.match_latency_ms = LatencySummary {
        p50: nearest_rank(&latencies, 50),
        p95: nearest_rank(&latencies, 95),
        p99: nearest_rank(&latencies, 99),
        max: latencies.last().copied(),
    };
    s
}

/// The nearest-rank `percent`-th percentile of an ascending slice: `sorted[ceil(p/100 * n) - 1]`,
/// computed in integers so that e.g. the 95th of 20 values is exactly rank 19. `None` when empty.
pub fn nearest_rank(sorted: &[i64], percent: u32) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (percent as usize * sorted.len()).div_ceil(100);
    // Rank 0 only for percent 0; treat it as the minimum rather than underflow.
    sorted.get(rank.saturating_sub(1).min(sorted.len() - 1)).copied()
}

/// (lower user, higher user, operation): the unordered pair makes both directions one group.
type GroupKey<'a> = (&'a str, &'a str, &'a str);

fn group_key<'a>(a: &'a str, b: &'a str, operation: &'a str) -> GroupKey<'a> {
    if a <= b { (a, b, operation) } else { (b, a, operation) }
}

/// Where a call sits on the time line.
#[derive(Debug, Clone, Copy)]
struct Span {
    /// `requested_at_ms`.
    t0: i64,
    /// Completion (or now while in flight), never before `t0`.
    t1: i64,
    /// `t0 - skew_ms`: earliest candidate timestamp.
    open: i64,
    /// `t1 + window_ms`: latest candidate timestamp; also the pending/missing and late edge.
    close: i64,
}

impl Span {
    fn of(call: &CallRow, params: &MatchParams) -> Self {
        let t0 = call.requested_at_ms;
        let t1 = match call.outcome {
            Outcome::InFlight => params.now_ms,
            _ => call.completed_at_ms.unwrap_or(t0),
        }
        .max(t0);
        Span {
            t0,
            t1,
            open: t0.saturating_sub(params.skew_ms),
            close: t1.saturating_add(params.window_ms),
        }
    }

    /// 0 inside `[t0, t1]`, else the gap to the nearer end.
    fn distance(&self, ts: i64) -> i64 {
        if ts < self.t0 {
            self.t0.saturating_sub(ts)
        } else if ts > self.t1 {
            ts.saturating_sub(self.t1)
        } else {
            0
        }
    }
}

/// Results accumulated over all groups, indexed by input position.
struct Assignments {
    /// Input index of each call's primary callback.
    primary: Vec<Option<usize>>,
    /// Seqs of each call's extras (sorted at the end).
    extras: Vec<Vec<i64>>,
    /// Seqs of orphans (sorted at the end).
    orphans: Vec<i64>,
}

#[derive(Default)]
struct Scratch {
    /// Candidate pairs as (distance, local callback, local call). Because local positions follow
    /// (timestamp, seq) and (requested_at, id), the tuple order is the required total order.
    candidates: Vec<(i64, usize, usize)>,
    /// Per local callback: taken as a primary.
    cb_taken: Vec<bool>,
    /// Per local call: has a primary.
    call_taken: Vec<bool>,
    /// Per local callback: nearest candidate call as (distance, local call), for extras.
    nearest: Vec<Option<(i64, usize)>>,
}

/// Matches one (pair, operation) group. `group_calls` is sorted by (t0, id) and `group_cbs` by
/// (timestamp, seq); the last tuple field is the input index.
fn match_group(
    group_calls: &[(GroupKey<'_>, i64, i64, usize)],
    group_cbs: &[(GroupKey<'_>, i64, i64, usize)],
    calls: &[CallRow],
    params: &MatchParams,
    s: &mut Scratch,
    out: &mut Assignments,
) {
    s.candidates.clear();
    s.cb_taken.clear();
    s.cb_taken.resize(group_cbs.len(), false);
    s.call_taken.clear();
    s.call_taken.resize(group_calls.len(), false);
    s.nearest.clear();
    s.nearest.resize(group_cbs.len(), None);

    for (c, &(_, _, _, ci)) in group_calls.iter().enumerate() {
        let span = Span::of(&calls[ci], params);
        // Callbacks are sorted by timestamp, so the window is one contiguous slice.
        let lo = group_cbs.partition_point(|b| b.1 < span.open);
        let hi = group_cbs.partition_point(|b| b.1 <= span.close);
        for (k, b) in group_cbs.iter().enumerate().take(hi).skip(lo) {
            let d = span.distance(b.1);
            s.candidates.push((d, k, c));
            // Calls are visited in (t0, id) order, so on equal distance the first one seen is
            // already the smaller in the total order: only a strictly nearer call replaces it.
            if s.nearest[k].is_none_or(|(best, _)| d < best) {
                s.nearest[k] = Some((d, c));
            }
        }
    }

    s.candidates.sort_unstable();
    let mut left = group_calls.len().min(group_cbs.len());
    for &(_, k, c) in &s.candidates {
        if left == 0 {
            break;
        }
        if !s.cb_taken[k] && !s.call_taken[c] {
            s.cb_taken[k] = true;
            s.call_taken[c] = true;
            out.primary[group_calls[c].3] = Some(group_cbs[k].3);
            left -= 1;
        }
    }

    for (k, b) in group_cbs.iter().enumerate() {
        if s.cb_taken[k] {
            continue;
        }
        match s.nearest[k] {
            Some((_, c)) => out.extras[group_calls[c].3].push(b.2),
            None => out.orphans.push(b.2),
        }
    }
}

/// The verdict for one call given its primary callback, if any.
fn report(call: &CallRow, primary: Option<&CallbackRow>, extras: Vec<i64>, params: &MatchParams) -> CallReport {
    let span = Span::of(call, params);
    let status = match (call.outcome, primary.is_some()) {
        (Outcome::Succeeded | Outcome::InFlight | Outcome::Unknown, true) => CallStatus::Matched,
        (Outcome::Rejected | Outcome::Failed, true) => CallStatus::Unexpected,
        (Outcome::Succeeded, false) if params.now_ms <= span.close => CallStatus::Pending,
        (Outcome::Succeeded, false) => CallStatus::Missing,
        (Outcome::InFlight, false) => CallStatus::Pending,
        (Outcome::Rejected | Outcome::Failed | Outcome::Unknown, false) => CallStatus::NotExpected,
    };
    CallReport {
        call_id: call.id,
        status,
        matched: primary.map(|cb| cb.seq),
        extras,
        late: primary.is_some_and(|cb| cb.received_at_ms > span.close),
        latency_ms: primary.map(|cb| cb.received_at_ms.saturating_sub(call.requested_at_ms)),
    }
}
