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
//!   `op.expected_callback_operation()`, it is between O and F in either direction, its
//!   `timestamp_ms` lies in the call's window, and neither it nor its twin (below) was received
//!   before the call was requested (`received_at_ms >= t0`: both are our own clock, so such a
//!   callback reports an event the call cannot have caused, e.g. one made from a client app).
//! - **Distance** of a callback to a call: 0 inside `[t0, t1]`, else the distance to the nearer
//!   of `t0` and `t1`. **Reversed**: the callback goes from F to O.
//! - **Twins.** One operation can be told to both users: two callbacks of the pair and
//!   operation with the same `timestamp_ms` in opposite directions (Easemob's accept pair shares
//!   its timestamp and callId; the sandbox sends an add's second callback that way). Per
//!   timestamp, the i-th callback (by seq) from the lower user name is the twin of the i-th from
//!   the higher one.
//! - **Primary matches** come from one global greedy pass over all candidate pairs in the total
//!   order `(weighted distance, reversed, callback.timestamp_ms, callback.seq, |timestamp_ms -
//!   t0|, call.requested_at_ms, call.id)`: a pair is taken when neither its call nor its callback
//!   is taken yet, and the taken callback's twin, if not taken yet, is taken with it as the same
//!   call's extra (so the other half of one event never becomes the primary of a neighbouring
//!   call of the pair, such as a rejected attempt just before a succeeded retry). The order never
//!   looks at input positions, so the result does not depend on input order.
//!   - The weighted distance is the distance, plus `skew_ms` for a call that does not expect a
//!     callback (neither succeeded nor in flight). Easemob's clock may be `skew_ms` off ours, so
//!     a succeeded call's callback can fall inside the span of a failed call of the same pair;
//!     taken by the failed call it would make two false alarms (the succeeded call `missing`,
//!     the failed one `unexpected`). A callback well inside a failed call's span and far from
//!     any succeeded call's still goes to the failed call: that is what `unexpected` is for.
//!   - `|timestamp_ms - t0|` decides between calls the callback is equally near: the one
//!     requested nearest to the event. A call whose span is long (in flight while its outcome
//!     cannot be recorded, `unknown` after a restart) would otherwise take the callbacks of
//!     every later call of its pair.
//! - **Extras.** Besides twins, a callback that is some call's candidate but nobody's primary (a
//!   re-delivery Easemob stamped anew, a second event) attaches to its nearest candidate call,
//!   by (distance, `call.requested_at_ms`, `call.id`) whatever the call's outcome. It is never
//!   an orphan. (Whether Easemob tells a REST add to both users, and with one timestamp, is not
//!   documented; an other-direction callback with a timestamp of its own is matched like any
//!   other callback, so next to a failed call of the pair it can read `unexpected`.)
//! - **Orphans** are callbacks that are no call's candidate.
//! - **Status**, by outcome:
//!   - succeeded: primary → matched; else pending while `now_ms <= t1 + window_ms`, then missing;
//!   - in flight: primary → matched; else pending;
//!   - rejected / failed: primary → unexpected; else not expected;
//!   - unknown: primary → matched (the callback proves Easemob acted); else not expected.
//! - **Late**: the primary became available after `t1 + window_ms`, i.e. after the call would
//!   have been declared missing. Available: `received_at_ms`, or for a callback promoted from
//!   quarantine the promotion (it could not be matched while it was held).
//! - **Latency**: primary available minus `requested_at_ms` (trigger to stored callback), never
//!   negative.
//!
//! Two edge conventions the rules above leave open: a call that has an outcome other than in
//! flight but no `completed_at_ms` uses `t1 = t0` (it finished, we just do not know when, and
//! Easemob acts right after the request); and `t1` is clamped to at least `t0` so a completion
//! recorded "before" the request (clock step) still yields a well-formed span.
//!
//! # Cost
//!
//! Calls and callbacks are sorted once by (unordered user pair, operation), through 32-byte
//! entries that point at their rows (no string copied), then matched group by group, so
//! unrelated pairs never meet:
//! `O(n log n + m log m)` for the grouping plus, per group, `O(c log c)` for its `c` candidate
//! pairs. `c` is the sum over the group's calls of the callbacks inside each call's window, so
//! it only grows beyond linear when one pair has many calls whose windows overlap (k calls a
//! second apart under a 60 s window give about 60k candidates). Scratch buffers are reused
//! across groups, so peak extra memory is the two sorted indexes plus the largest group's
//! candidates.
//!
//! Measured (release, 2 cores): 1,000,000 calls and 1,000,000 callbacks over 100,000 pairs in
//! about 1.4 s before the two changes below (0.45 s after), most of it the two sorts; 50,000 calls and callbacks on one single pair in about
//! 0.2–0.4 s. Interning the keys in a `HashMap` and sorting integers instead was tried and was
//! slower (SipHash over three strings per row outweighs the string comparisons it saves).
//! What helps instead: each sort key starts with a cheap FNV-1a hash of the group key (most
//! comparisons end on that integer), and the two sorts run on two threads for large inputs.

use compact_str::CompactString;
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
    pub owner: CompactString,
    /// The other user.
    pub friend: CompactString,
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
    pub operation: CompactString,
    /// Normalised `from`.
    pub from_user: CompactString,
    /// Normalised `to`.
    pub to_user: CompactString,
    /// The event's own timestamp (epoch ms).
    pub timestamp_ms: i64,
    /// When friendhook first stored it (epoch ms).
    pub received_at_ms: i64,
    /// When it was promoted from quarantine by `friendhook quarantine reverify`, if it was: held
    /// until then, it was not an event anyone could match before.
    pub promoted_at_ms: Option<i64>,
}

impl CallbackRow {
    /// When the event became available to match: its arrival, or its promotion from quarantine.
    /// Lateness and latency are measured to this.
    pub fn available_at_ms(&self) -> i64 {
        self.promoted_at_ms.map_or(self.received_at_ms, |at| at.max(self.received_at_ms))
    }
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
    /// The primary callback became available after the window had closed: it was received then,
    /// or promoted from quarantine then (see `CallbackRow::available_at_ms`).
    pub late: bool,
    /// When the primary callback became available (received, or promoted from quarantine) minus
    /// the call's `requested_at_ms`.
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
    let call_key = |e: &Entry| call_group(calls, e);
    let cb_key = |e: &Entry| callback_group(callbacks, e);
    let mut call_order: Vec<Entry> = (0..calls.len()).map(|i| call_entry(calls, i)).collect();
    let mut cb_order: Vec<Entry> = (0..callbacks.len()).map(|i| callback_entry(callbacks, i)).collect();
    let sort_calls = |v: &mut Vec<Entry>| v.sort_unstable_by(|a, b| by_group_then_time(call_key, a, b));
    let sort_cbs = |v: &mut Vec<Entry>| v.sort_unstable_by(|a, b| by_group_then_time(cb_key, a, b));
    // The two sorts are most of the cost on large inputs: run them on two cores.
    if call_order.len().min(cb_order.len()) >= PARALLEL_SORT_MIN {
        std::thread::scope(|s| {
            s.spawn(|| sort_cbs(&mut cb_order));
            sort_calls(&mut call_order);
        });
    } else {
        sort_calls(&mut call_order);
        sort_cbs(&mut cb_order);
    }

    let mut out =
        Assignments { primary: vec![None; calls.len()], extras: vec![Vec::new(); calls.len()], orphans: Vec::new() };
    // Buffers reused across groups: with a million small groups, per-group allocation would
    // dominate.
    let mut scratch = Scratch::default();

    // Merge-walk the two sorted lists group by group.
    let (mut i, mut j) = (0, 0);
    while i < call_order.len() || j < cb_order.len() {
        let key = match (call_order.get(i), cb_order.get(j)) {
            (Some(c), Some(b)) => call_key(c).min(cb_key(b)),
            (Some(c), None) => call_key(c),
            (None, Some(b)) => cb_key(b),
            (None, None) => break,
        };
        let i_end = i + call_order[i..].iter().take_while(|c| call_key(c) == key).count();
        let j_end = j + cb_order[j..].iter().take_while(|b| cb_key(b) == key).count();
        let group_calls = &call_order[i..i_end];
        let group_cbs = &cb_order[j..j_end];
        if group_calls.is_empty() {
            // No call for this pair and operation: every callback is an orphan.
            out.orphans.extend(group_cbs.iter().map(|b| b.2));
        } else if !group_cbs.is_empty() {
            match_group(group_calls, group_cbs, calls, callbacks, params, &mut scratch, &mut out);
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
    Reconciliation { calls: reports, orphans: out.orphans }
}

/// The latest event time a callback can have and still be `call`'s (its window's end: `window_ms`
/// after it completed, or after now while it is in flight), for a reader that must know how far
/// past a range to read.
pub fn window_end(call: &CallRow, params: &MatchParams) -> i64 {
    Span::of(call, params).close
}

/// Counts and latency percentiles of a reconciliation.
///
/// Percentiles use the nearest-rank method (`sorted[ceil(q * n) - 1]`) over every call that has
/// a `latency_ms`, i.e. every call with a primary callback (matched, and unexpected too); all are
/// `None` when there is none.
pub fn summarize(r: &Reconciliation) -> Summary {
    summarize_parts(&r.calls, r.orphans.len() as u64)
}

/// [`summarize`] over some of a reconciliation's calls and a count of orphans, without
/// collecting them into a [`Reconciliation`] of their own first.
pub fn summarize_parts<'a>(calls: impl IntoIterator<Item = &'a CallReport>, orphans: u64) -> Summary {
    let mut s = Summary::default();
    let mut latencies: Vec<i64> = Vec::new();
    for c in calls {
        let counter = match c.status {
            CallStatus::Matched => &mut s.matched,
            CallStatus::Pending => &mut s.pending,
            CallStatus::Missing => &mut s.missing,
            CallStatus::NotExpected => &mut s.not_expected,
            CallStatus::Unexpected => &mut s.unexpected,
        };
        *counter += 1;
        latencies.extend(c.latency_ms);
    }
    s.orphan = orphans;
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

/// Below this many rows on either side both sorts run on the calling thread.
const PARALLEL_SORT_MIN: usize = 20_000;

/// (hash of the parts, (lower user, higher user, operation)): the unordered pair makes both
/// directions one group.
///
/// Sorting compares the hashes first, so the string comparisons (most of the sorting cost) only
/// happen between rows of one group or on a hash collision. Groups come out in hash order, which
/// no result depends on; equal keys are still contiguous because ties on the hash are broken by
/// the parts themselves.
type GroupKey<'a> = (u64, (&'a str, &'a str, &'a str));

/// A row's place in the sort: (hash of its group key, time, id or seq, input index). The key's
/// strings are read from the row when needed rather than copied in: at a million rows a side that
/// is 96 MB less to hold and to move while sorting.
type Entry = (u64, i64, i64, usize);

fn call_group<'a>(calls: &'a [CallRow], e: &Entry) -> GroupKey<'a> {
    let c = &calls[e.3];
    (e.0, group_parts(&c.owner, &c.friend, c.op.expected_callback_operation()))
}

fn callback_group<'a>(callbacks: &'a [CallbackRow], e: &Entry) -> GroupKey<'a> {
    let b = &callbacks[e.3];
    (e.0, group_parts(&b.from_user, &b.to_user, &b.operation))
}

fn call_entry(calls: &[CallRow], i: usize) -> Entry {
    let c = &calls[i];
    (key_hash(group_parts(&c.owner, &c.friend, c.op.expected_callback_operation())), c.requested_at_ms, c.id, i)
}

fn callback_entry(callbacks: &[CallbackRow], i: usize) -> Entry {
    let b = &callbacks[i];
    (key_hash(group_parts(&b.from_user, &b.to_user, &b.operation)), b.timestamp_ms, b.seq, i)
}

/// The sort order of one side: group (hash first; the parts are only looked up when the hashes
/// are equal, i.e. within a group or on a collision), then time, then id or seq.
fn by_group_then_time<'a>(key: impl Fn(&Entry) -> GroupKey<'a>, a: &Entry, b: &Entry) -> std::cmp::Ordering {
    a.0.cmp(&b.0).then_with(|| key(a).1.cmp(&key(b).1)).then((a.1, a.2).cmp(&(b.1, b.2)))
}

fn group_parts<'a>(a: &'a str, b: &'a str, operation: &'a str) -> (&'a str, &'a str, &'a str) {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    (lo, hi, operation)
}

/// FNV-1a over the three parts, each followed by its length (so part boundaries count).
fn key_hash((a, b, c): (&str, &str, &str)) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [a, b, c] {
        for &byte in part.as_bytes() {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h = (h ^ part.len() as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
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
        Span { t0, t1, open: t0.saturating_sub(params.skew_ms), close: t1.saturating_add(params.window_ms) }
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
    /// Candidate pairs as (weighted distance, reversed, local callback, |timestamp - t0|, local
    /// call). Because local positions follow (timestamp, seq) and (requested_at, id), the tuple
    /// order is the required total order.
    candidates: Vec<(i64, bool, usize, i64, usize)>,
    /// Per local callback: its twin (local), the other direction's callback of the same event.
    twin: Vec<Option<usize>>,
    /// Local callbacks of one timestamp, from the lower and from the higher user name.
    ups: Vec<usize>,
    downs: Vec<usize>,
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
    group_calls: &[Entry],
    group_cbs: &[Entry],
    calls: &[CallRow],
    callbacks: &[CallbackRow],
    params: &MatchParams,
    s: &mut Scratch,
    out: &mut Assignments,
) {
    find_twins(group_cbs, callbacks, s);
    s.candidates.clear();
    s.cb_taken.clear();
    s.cb_taken.resize(group_cbs.len(), false);
    s.call_taken.clear();
    s.call_taken.resize(group_calls.len(), false);
    s.nearest.clear();
    s.nearest.resize(group_cbs.len(), None);

    for (c, &(_, _, _, ci)) in group_calls.iter().enumerate() {
        let span = Span::of(&calls[ci], params);
        let weight = if expects_callback(calls[ci].outcome) { 0 } else { params.skew_ms };
        // Callbacks are sorted by timestamp, so the window is one contiguous slice.
        let lo = group_cbs.partition_point(|b| b.1 < span.open);
        let hi = group_cbs.partition_point(|b| b.1 <= span.close);
        for (k, b) in group_cbs.iter().enumerate().take(hi).skip(lo) {
            let row = &callbacks[b.3];
            // Stored before the call was requested (this half of the event or its twin): not
            // something the call caused.
            let twin_received = s.twin[k].map_or(i64::MAX, |t| callbacks[group_cbs[t].3].received_at_ms);
            if row.received_at_ms.min(twin_received) < span.t0 {
                continue;
            }
            let d = span.distance(b.1);
            let from_t0 = b.1.abs_diff(span.t0).try_into().unwrap_or(i64::MAX);
            let reversed = row.from_user != calls[ci].owner;
            s.candidates.push((d.saturating_add(weight), reversed, k, from_t0, c));
            // Calls are visited in (t0, id) order, so on equal distance the first one seen is
            // already the smaller in the total order: only a strictly nearer call replaces it.
            if s.nearest[k].is_none_or(|(best, _)| d < best) {
                s.nearest[k] = Some((d, c));
            }
        }
    }

    s.candidates.sort_unstable();
    let (mut calls_left, mut cbs_left) = (group_calls.len(), group_cbs.len());
    for &(_, _, k, _, c) in &s.candidates {
        if calls_left == 0 || cbs_left == 0 {
            break;
        }
        if !s.cb_taken[k] && !s.call_taken[c] {
            s.cb_taken[k] = true;
            s.call_taken[c] = true;
            out.primary[group_calls[c].3] = Some(group_cbs[k].3);
            calls_left -= 1;
            cbs_left -= 1;
            // The same event told to the other user belongs to the same call, not to a
            // neighbouring call of the pair that would otherwise take it as its primary.
            if let Some(t) = s.twin[k].filter(|&t| !s.cb_taken[t]) {
                s.cb_taken[t] = true;
                cbs_left -= 1;
                out.extras[group_calls[c].3].push(group_cbs[t].2);
            }
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

/// Pairs up the callbacks of one group that tell both users of one event: the same timestamp,
/// opposite directions. Per timestamp, the i-th callback from the lower user name (by seq) is the
/// twin of the i-th from the higher one. `group_cbs` is sorted by (timestamp, seq).
fn find_twins(group_cbs: &[Entry], callbacks: &[CallbackRow], s: &mut Scratch) {
    s.twin.clear();
    s.twin.resize(group_cbs.len(), None);
    let mut start = 0;
    while start < group_cbs.len() {
        let ts = group_cbs[start].1;
        let end = start + group_cbs[start..].iter().take_while(|b| b.1 == ts).count();
        if end - start >= 2 {
            s.ups.clear();
            s.downs.clear();
            for k in start..end {
                let row = &callbacks[group_cbs[k].3];
                if row.from_user < row.to_user { s.ups.push(k) } else { s.downs.push(k) }
            }
            for (&u, &d) in s.ups.iter().zip(&s.downs) {
                s.twin[u] = Some(d);
                s.twin[d] = Some(u);
            }
        }
        start = end;
    }
}

/// Whether the call's outcome says Easemob acted, so a callback is due (the matching's weight).
fn expects_callback(outcome: Outcome) -> bool {
    matches!(outcome, Outcome::Succeeded | Outcome::InFlight)
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
        late: primary.is_some_and(|cb| cb.available_at_ms() > span.close),
        latency_ms: primary.map(|cb| cb.available_at_ms().saturating_sub(call.requested_at_ms)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const SKEW: i64 = 2_000;
    const WINDOW: i64 = 60_000;
    /// Far after every window in these tests, unless a test says otherwise.
    const LATER: i64 = 10_000_000;
    /// How long after its own timestamp a test callback is stored.
    const DELIVERY: i64 = 50;

    fn params(now_ms: i64) -> MatchParams {
        MatchParams { skew_ms: SKEW, window_ms: WINDOW, now_ms }
    }

    fn call(id: i64, op: CallOp, t0: i64, t1: Option<i64>, outcome: Outcome) -> CallRow {
        CallRow {
            id,
            op,
            owner: "alice".into(),
            friend: "bob".into(),
            requested_at_ms: t0,
            completed_at_ms: t1,
            outcome,
        }
    }

    /// A succeeded add from alice to bob.
    fn add(id: i64, t0: i64, t1: i64) -> CallRow {
        call(id, CallOp::Add, t0, Some(t1), Outcome::Succeeded)
    }

    fn cb(seq: i64, operation: &str, from: &str, to: &str, ts: i64) -> CallbackRow {
        CallbackRow {
            seq,
            operation: operation.into(),
            from_user: from.into(),
            to_user: to.into(),
            timestamp_ms: ts,
            received_at_ms: ts + DELIVERY,
            promoted_at_ms: None,
        }
    }

    /// An `add` callback from alice to bob.
    fn add_cb(seq: i64, ts: i64) -> CallbackRow {
        cb(seq, "add", "alice", "bob", ts)
    }

    /// `cb` stored at `at` (our clock) instead of `DELIVERY` after its own timestamp (Easemob's).
    fn received_at(cb: CallbackRow, at: i64) -> CallbackRow {
        CallbackRow { received_at_ms: at, ..cb }
    }

    fn single(r: &Reconciliation) -> &CallReport {
        assert_eq!(r.calls.len(), 1, "{r:?}");
        &r.calls[0]
    }

    #[test]
    fn a_callback_from_owner_to_friend_matches_the_call() {
        let r = reconcile(&[add(1, 100_000, 100_500)], &[add_cb(10, 100_200)], &params(LATER));
        let c = single(&r);
        assert_eq!(c.call_id, 1);
        assert_eq!(c.status, CallStatus::Matched);
        assert_eq!(c.matched, Some(10));
        assert!(c.extras.is_empty());
        assert!(!c.late);
        assert!(r.orphans.is_empty());
    }

    #[test]
    fn a_callback_from_friend_to_owner_matches_the_call() {
        let r = reconcile(&[add(1, 100_000, 100_500)], &[cb(10, "add", "bob", "alice", 100_200)], &params(LATER));
        assert_eq!(single(&r).status, CallStatus::Matched);
        assert_eq!(single(&r).matched, Some(10));
    }

    #[test]
    fn latency_runs_from_request_to_receipt_of_the_callback() {
        let r = reconcile(&[add(1, 100_000, 100_500)], &[add_cb(10, 100_200)], &params(LATER));
        assert_eq!(single(&r).latency_ms, Some(100_200 + DELIVERY - 100_000));
    }

    #[test]
    fn a_callback_exactly_skew_before_t0_matches() {
        // Easemob's clock runs `SKEW` behind ours: the event is stamped before the request, but
        // reaches us after it.
        let callback = received_at(add_cb(10, 100_000 - SKEW), 100_300);
        let r = reconcile(&[add(1, 100_000, 100_500)], &[callback], &params(LATER));
        assert_eq!(single(&r).matched, Some(10));
        assert!(r.orphans.is_empty());
    }

    #[test]
    fn a_callback_one_ms_before_the_skew_edge_is_an_orphan() {
        let callback = received_at(add_cb(10, 100_000 - SKEW - 1), 100_300);
        let r = reconcile(&[add(1, 100_000, 100_500)], &[callback], &params(LATER));
        assert_eq!(single(&r).status, CallStatus::Missing);
        assert_eq!(single(&r).matched, None);
        assert_eq!(r.orphans, vec![10]);
    }

    #[test]
    fn a_callback_exactly_window_after_t1_matches() {
        let r = reconcile(&[add(1, 100_000, 100_500)], &[add_cb(10, 100_500 + WINDOW)], &params(LATER));
        assert_eq!(single(&r).matched, Some(10));
        assert!(r.orphans.is_empty());
    }

    #[test]
    fn a_callback_one_ms_after_the_window_is_an_orphan() {
        let r = reconcile(&[add(1, 100_000, 100_500)], &[add_cb(10, 100_500 + WINDOW + 1)], &params(LATER));
        assert_eq!(single(&r).status, CallStatus::Missing);
        assert_eq!(r.orphans, vec![10]);
    }

    #[test]
    fn a_succeeded_call_without_callback_is_pending_until_the_window_closes() {
        let close = 100_500 + WINDOW;
        let r = reconcile(&[add(1, 100_000, 100_500)], &[], &params(close));
        assert_eq!(single(&r).status, CallStatus::Pending);
    }

    #[test]
    fn a_succeeded_call_without_callback_is_missing_once_the_window_has_closed() {
        let close = 100_500 + WINDOW;
        let r = reconcile(&[add(1, 100_000, 100_500)], &[], &params(close + 1));
        let c = single(&r);
        assert_eq!(c.status, CallStatus::Missing);
        assert_eq!((c.matched, c.late, c.latency_ms), (None, false, None));
    }

    #[test]
    fn an_in_flight_call_without_callback_stays_pending() {
        let r = reconcile(&[call(1, CallOp::Add, 100_000, None, Outcome::InFlight)], &[], &params(LATER));
        assert_eq!(single(&r).status, CallStatus::Pending);
    }

    #[test]
    fn an_in_flight_call_spans_until_now_and_matches_a_callback_there() {
        // Long after t0 but before now: inside [t0, now], so distance 0.
        let r = reconcile(
            &[call(1, CallOp::Add, 100_000, None, Outcome::InFlight)],
            &[add_cb(10, 400_000)],
            &params(500_000),
        );
        assert_eq!(single(&r).status, CallStatus::Matched);
        assert_eq!(single(&r).matched, Some(10));
    }

    #[test]
    fn a_callback_received_after_the_window_closed_is_matched_but_late() {
        let close = 100_500 + WINDOW;
        let mut late = add_cb(10, 100_200);
        late.received_at_ms = close + 1;
        let r = reconcile(&[add(1, 100_000, 100_500)], &[late], &params(LATER));
        let c = single(&r);
        assert_eq!(c.status, CallStatus::Matched);
        assert!(c.late);
        assert_eq!(c.latency_ms, Some(close + 1 - 100_000));
    }

    #[test]
    fn a_callback_received_exactly_as_the_window_closes_is_not_late() {
        let mut edge = add_cb(10, 100_200);
        edge.received_at_ms = 100_500 + WINDOW;
        let r = reconcile(&[add(1, 100_000, 100_500)], &[edge], &params(LATER));
        assert!(!single(&r).late);
    }

    #[test]
    fn two_adds_a_minute_apart_each_get_their_nearest_callback() {
        let calls = [add(1, 100_000, 100_500), add(2, 160_000, 160_500)];
        // Both callbacks lie in both windows; listed newest first on purpose.
        let r = reconcile(&calls, &[add_cb(10, 160_300), add_cb(11, 100_300)], &params(LATER));
        assert_eq!(r.calls[0].matched, Some(11));
        assert_eq!(r.calls[1].matched, Some(10));
        assert!(r.calls.iter().all(|c| c.status == CallStatus::Matched && c.extras.is_empty()));
        assert!(r.orphans.is_empty());
    }

    #[test]
    fn one_callback_for_two_calls_goes_to_the_nearest_and_the_other_is_missing() {
        let calls = [add(1, 100_000, 100_500), add(2, 160_000, 160_500)];
        let r = reconcile(&calls, &[add_cb(10, 160_300)], &params(LATER));
        assert_eq!(r.calls[1].status, CallStatus::Matched);
        assert_eq!(r.calls[1].matched, Some(10));
        assert_eq!(r.calls[0].status, CallStatus::Missing);
        assert_eq!(r.calls[0].matched, None);
        // Someone's primary is nobody's extra.
        assert!(r.calls[0].extras.is_empty());
    }

    #[test]
    fn one_callback_for_two_calls_leaves_the_other_pending_while_its_window_is_open() {
        let calls = [add(1, 100_000, 100_500), add(2, 160_000, 160_500)];
        let r = reconcile(&calls, &[add_cb(10, 160_300)], &params(160_400));
        assert_eq!(r.calls[0].status, CallStatus::Pending);
        assert_eq!(r.calls[1].status, CallStatus::Matched);
    }

    #[test]
    fn a_callback_equally_near_two_calls_goes_to_the_earlier_request() {
        let calls = [add(2, 102_000, 102_000), add(1, 100_000, 100_000)];
        let r = reconcile(&calls, &[add_cb(10, 101_000)], &params(LATER));
        assert_eq!(r.calls[1].matched, Some(10));
        assert_eq!(r.calls[0].matched, None);
    }

    #[test]
    fn the_other_direction_callback_and_a_redelivery_attach_as_extras() {
        let callbacks = [
            // Re-delivery of seq 10 (same event timestamp), stored again under a new seq.
            add_cb(12, 100_200),
            cb(11, "add", "bob", "alice", 100_250),
            add_cb(10, 100_200),
        ];
        let r = reconcile(&[add(1, 100_000, 100_500)], &callbacks, &params(LATER));
        let c = single(&r);
        assert_eq!(c.status, CallStatus::Matched);
        assert_eq!(c.matched, Some(10));
        assert_eq!(c.extras, vec![11, 12]);
        assert!(r.orphans.is_empty());
    }

    #[test]
    fn an_extra_attaches_to_its_nearest_call() {
        let calls = [add(1, 100_000, 100_500), add(2, 130_000, 130_500)];
        let callbacks = [
            add_cb(1, 100_100),
            add_cb(2, 130_100),
            // In both windows; 500 ms from call 1, 29 s from call 2.
            add_cb(3, 101_000),
            // In both windows; 1 s before call 2 (within skew), 28.5 s after call 1; received
            // after call 2 was requested.
            received_at(add_cb(4, 129_000), 130_300),
        ];
        let r = reconcile(&calls, &callbacks, &params(LATER));
        assert_eq!((r.calls[0].matched, r.calls[0].extras.clone()), (Some(1), vec![3]));
        assert_eq!((r.calls[1].matched, r.calls[1].extras.clone()), (Some(2), vec![4]));
        assert!(r.orphans.is_empty());
    }

    #[test]
    fn a_rejected_or_failed_call_with_a_callback_is_unexpected() {
        for outcome in [Outcome::Rejected, Outcome::Failed] {
            let r = reconcile(
                &[call(1, CallOp::Add, 100_000, Some(100_500), outcome)],
                &[add_cb(10, 100_200)],
                &params(LATER),
            );
            let c = single(&r);
            assert_eq!(c.status, CallStatus::Unexpected, "{outcome:?}");
            assert_eq!(c.matched, Some(10));
            assert!(c.latency_ms.is_some());
        }
    }

    #[test]
    fn a_rejected_or_failed_call_without_callback_is_not_expected() {
        for outcome in [Outcome::Rejected, Outcome::Failed] {
            let r = reconcile(&[call(1, CallOp::Add, 100_000, Some(100_500), outcome)], &[], &params(LATER));
            assert_eq!(single(&r).status, CallStatus::NotExpected, "{outcome:?}");
        }
    }

    #[test]
    fn an_unknown_call_with_a_callback_is_matched() {
        let r =
            reconcile(&[call(1, CallOp::Add, 100_000, None, Outcome::Unknown)], &[add_cb(10, 100_200)], &params(LATER));
        assert_eq!(single(&r).status, CallStatus::Matched);
        assert_eq!(single(&r).matched, Some(10));
    }

    #[test]
    fn an_unknown_call_without_callback_is_not_expected() {
        let r = reconcile(&[call(1, CallOp::Add, 100_000, None, Outcome::Unknown)], &[], &params(LATER));
        assert_eq!(single(&r).status, CallStatus::NotExpected);
    }

    #[test]
    fn a_callback_with_no_call_is_an_orphan_and_orphans_ascend_by_seq() {
        let callbacks = [
            cb(9, "add", "carol", "dave", 100_000),
            cb(3, "remove", "dave", "carol", 100_000),
            cb(5, "add", "erin", "frank", 100_000),
        ];
        let r = reconcile(&[], &callbacks, &params(LATER));
        assert!(r.calls.is_empty());
        assert_eq!(r.orphans, vec![3, 5, 9]);
    }

    #[test]
    fn a_callback_between_other_users_does_not_match() {
        let r = reconcile(&[add(1, 100_000, 100_500)], &[cb(10, "add", "alice", "carol", 100_200)], &params(LATER));
        assert_eq!(single(&r).status, CallStatus::Missing);
        assert_eq!(r.orphans, vec![10]);
    }

    #[test]
    fn a_remove_call_matches_only_remove_callbacks() {
        let r = reconcile(
            &[call(1, CallOp::Remove, 100_000, Some(100_500), Outcome::Succeeded)],
            &[add_cb(10, 100_200), cb(11, "remove", "bob", "alice", 100_300)],
            &params(LATER),
        );
        assert_eq!(single(&r).matched, Some(11));
        assert!(single(&r).extras.is_empty());
        assert_eq!(r.orphans, vec![10]);
    }

    #[test]
    fn an_add_call_ignores_remove_callbacks() {
        let r = reconcile(&[add(1, 100_000, 100_500)], &[cb(10, "remove", "alice", "bob", 100_200)], &params(LATER));
        assert_eq!(single(&r).status, CallStatus::Missing);
        assert_eq!(r.orphans, vec![10]);
    }

    #[test]
    fn reports_come_back_in_input_order() {
        let calls = [add(5, 300_000, 300_100), add(1, 100_000, 100_100), add(3, 200_000, 200_100)];
        let r = reconcile(&calls, &[], &params(LATER));
        assert_eq!(r.calls.iter().map(|c| c.call_id).collect::<Vec<_>>(), vec![5, 1, 3]);
    }

    fn report_with(status: CallStatus, latency_ms: Option<i64>) -> CallReport {
        CallReport { call_id: 0, status, matched: latency_ms.map(|_| 0), extras: Vec::new(), late: false, latency_ms }
    }

    /// Easemob's clock 250 ms ahead puts a succeeded add's callback inside the span of a later
    /// failed add of the same pair. The failed call does not take it: that would make two false
    /// alarms (the succeeded call missing, the failed one unexpected).
    #[test]
    fn a_failed_call_does_not_take_the_callback_of_a_succeeded_one_a_skew_away() {
        let calls = [add(1, 0, 300), call(2, CallOp::Add, 400, Some(3_000), Outcome::Failed)];
        let r = reconcile(&calls, &[add_cb(10, 550)], &params(LATER));
        let status: Vec<_> = r.calls.iter().map(|c| (c.call_id, c.status, c.matched)).collect();
        assert_eq!(status, [(1, CallStatus::Matched, Some(10)), (2, CallStatus::NotExpected, None)], "{r:?}");

        // Far from any succeeded call, a callback inside the failed call's span is its own.
        let r = reconcile(&[add(1, 0, 300), calls[1].clone()], &[add_cb(10, 2_900)], &params(LATER));
        let status: Vec<_> = r.calls.iter().map(|c| (c.call_id, c.status)).collect();
        assert_eq!(status, [(1, CallStatus::Missing), (2, CallStatus::Unexpected)], "{r:?}");
    }

    /// A call in flight for an hour (its outcome not recorded yet) spans every later call of its
    /// pair. A callback as near to both goes to the call requested nearest to it.
    #[test]
    fn a_long_span_does_not_take_the_callbacks_of_later_calls() {
        let hour = 3_600_000;
        let calls = [call(1, CallOp::Add, 0, None, Outcome::InFlight), add(2, hour - 2_000, hour - 1_800)];
        let r = reconcile(&calls, &[add_cb(10, hour - 1_900)], &params(hour));
        let status: Vec<_> = r.calls.iter().map(|c| (c.call_id, c.status, c.matched)).collect();
        assert_eq!(status, [(1, CallStatus::Pending, None), (2, CallStatus::Matched, Some(10))], "{r:?}");
    }

    /// An add told to both users (same timestamp, both directions) right after a rejected attempt
    /// of the pair: both callbacks belong to the retry; the rejected attempt expected nothing.
    #[test]
    fn both_halves_of_one_event_go_to_the_same_call() {
        let calls = [call(1, CallOp::Add, 100_000, Some(100_050), Outcome::Rejected), add(2, 101_000, 101_100)];
        let callbacks = [cb(10, "add", "bob", "alice", 101_040), add_cb(11, 101_040)];
        let r = reconcile(&calls, &callbacks, &params(LATER));
        assert_eq!(r.calls[0].status, CallStatus::NotExpected, "{r:?}");
        assert_eq!((r.calls[1].status, r.calls[1].matched), (CallStatus::Matched, Some(11)), "owner to friend first");
        assert_eq!(r.calls[1].extras, vec![10]);
        assert!(r.orphans.is_empty());
    }

    /// A repeated add of an existing friendship that Easemob answers without a new event: the
    /// first add's other half is not mistaken for the second add's callback.
    #[test]
    fn a_repeated_add_without_its_own_event_is_missing() {
        let calls = [add(1, 100_000, 100_100), add(2, 101_000, 101_100)];
        let callbacks = [add_cb(10, 100_050), cb(11, "add", "bob", "alice", 100_050)];
        let r = reconcile(&calls, &callbacks, &params(LATER));
        assert_eq!(
            (r.calls[0].status, r.calls[0].matched, r.calls[0].extras.clone()),
            (CallStatus::Matched, Some(10), vec![11])
        );
        assert_eq!(r.calls[1].status, CallStatus::Missing, "{r:?}");
    }

    /// Two events a second apart, each told one way only: no twins, each call gets its nearest.
    #[test]
    fn callbacks_with_their_own_timestamps_are_not_twins() {
        let calls = [add(1, 100_000, 100_100), add(2, 101_000, 101_100)];
        let callbacks = [add_cb(10, 100_050), cb(11, "add", "bob", "alice", 101_050)];
        let r = reconcile(&calls, &callbacks, &params(LATER));
        let matched: Vec<_> = r.calls.iter().map(|c| (c.status, c.matched)).collect();
        assert_eq!(matched, [(CallStatus::Matched, Some(10)), (CallStatus::Matched, Some(11))]);
    }

    /// Both times are our own clock: a callback stored before the call was requested reports an
    /// event the call did not cause (made from a client app, say), however near its timestamp.
    #[test]
    fn a_callback_stored_before_the_call_was_requested_is_not_its_match() {
        let early = received_at(add_cb(10, 99_900), 99_950);
        let r = reconcile(&[add(1, 100_000, 100_100)], &[early], &params(LATER));
        assert_eq!((single(&r).status, single(&r).matched), (CallStatus::Missing, None));
        assert_eq!(r.orphans, vec![10]);

        // Nor is the other half of an event whose first half was stored before the request.
        let first_half = received_at(add_cb(10, 99_900), 99_950);
        let second_half = received_at(cb(11, "add", "bob", "alice", 99_900), 100_300);
        let r = reconcile(&[add(1, 100_000, 100_100)], &[first_half, second_half], &params(LATER));
        assert_eq!((single(&r).status, single(&r).matched), (CallStatus::Missing, None));
        assert_eq!(r.orphans, vec![10, 11]);

        // Next to a call requested before it, it is that call's.
        let r = reconcile(
            &[add(1, 90_000, 90_100), add(2, 100_000, 100_100)],
            &[received_at(add_cb(10, 99_900), 99_950)],
            &params(LATER),
        );
        let matched: Vec<_> = r.calls.iter().map(|c| (c.status, c.matched, c.latency_ms)).collect();
        assert_eq!(matched, [(CallStatus::Matched, Some(10), Some(9_950)), (CallStatus::Missing, None, None)]);
    }

    #[test]
    fn summarize_counts_every_status_and_the_orphans() {
        let calls = [
            add(1, 100_000, 100_500),                                         // matched
            add(2, 9_000_000, 9_000_500),                                     // pending
            add(3, 50_000, 50_500),                                           // missing
            call(4, CallOp::Add, 100_000, Some(100_500), Outcome::Rejected),  // unexpected
            call(5, CallOp::Remove, 100_000, Some(100_500), Outcome::Failed), // not expected
            call(6, CallOp::Remove, 500_000, None, Outcome::Unknown),         // not expected
            call(7, CallOp::Add, 9_500_000, None, Outcome::InFlight),         // pending
        ];
        let mut rejected_cb = cb(11, "add", "bob", "alice", 100_250);
        rejected_cb.received_at_ms = 100_000 + 900;
        let callbacks = [add_cb(10, 100_200), rejected_cb, cb(12, "add", "x", "y", 1), cb(13, "add", "x", "y", 2)];
        let r = reconcile(&calls, &callbacks, &params(9_000_600));
        let s = summarize(&r);
        assert_eq!(
            (s.matched, s.pending, s.missing, s.unexpected, s.not_expected, s.orphan),
            (1, 2, 1, 1, 2, 2),
            "{r:?}"
        );
        // Latency covers every call with a primary, the unexpected one included.
        assert_eq!(s.match_latency_ms.max, Some(900));
        assert_eq!(s.match_latency_ms.p50, Some(200 + DELIVERY));
    }

    #[test]
    fn summarize_uses_nearest_rank_percentiles() {
        // 20 latencies 10, 20, ..., 200 (shuffled): ranks ceil(0.5*20)=10, ceil(0.95*20)=19, ceil(0.99*20)=20.
        let calls = (1..=20)
            .map(|i| report_with(CallStatus::Matched, Some((i * 7 % 20 + 1) * 10)))
            .chain([report_with(CallStatus::Missing, None)])
            .collect();
        let s = summarize(&Reconciliation { calls, orphans: vec![] });
        assert_eq!(
            s.match_latency_ms,
            LatencySummary { p50: Some(100), p95: Some(190), p99: Some(200), max: Some(200) }
        );
        assert_eq!((s.matched, s.missing), (20, 1));
    }

    #[test]
    fn nearest_rank_of_one_hundred_values_is_the_value_at_that_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!([50, 95, 99, 100].map(|p| nearest_rank(&v, p)), [Some(50), Some(95), Some(99), Some(100)]);
        assert_eq!(nearest_rank(&[7], 50), Some(7));
        assert_eq!(nearest_rank(&[7], 99), Some(7));
    }

    #[test]
    fn summarize_without_matched_calls_has_no_percentiles() {
        let s = summarize(&Reconciliation { calls: vec![report_with(CallStatus::Pending, None)], orphans: vec![1, 2] });
        assert_eq!(s.match_latency_ms, LatencySummary::default());
        assert_eq!((s.pending, s.orphan), (1, 2));
    }

    // ---- generated scenarios ----

    /// Knuth's MMIX LCG: deterministic and dependency-free.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = self.below(i as u64 + 1) as usize;
                v.swap(i, j);
            }
        }
    }

    /// A small scenario: whole-second timestamps (so distances and timestamps tie often and the
    /// tie-breakers matter), every outcome, stray operations. `users` (at most 4) and `span_s`
    /// set the density: 2 users over 60 s packs many overlapping calls into each group.
    fn scenario(rng: &mut Lcg, users: u64, span_s: u64) -> (Vec<CallRow>, Vec<CallbackRow>, MatchParams) {
        const USERS: [&str; 4] = ["ann", "ben", "cat", "dan"];
        let user = |rng: &mut Lcg| -> CompactString { USERS[rng.below(users) as usize].into() };
        let n_calls = rng.below(30) as i64;
        let n_cbs = rng.below(40) as i64;
        let calls = (0..n_calls)
            .map(|i| {
                let t0 = rng.below(span_s) as i64 * 1_000;
                let done = Some(t0 + rng.below(6) as i64 * 1_000);
                let (outcome, t1) = match rng.below(6) {
                    0 => (Outcome::Rejected, done),
                    1 => (Outcome::Failed, done),
                    2 => (Outcome::Unknown, None),
                    3 => (Outcome::InFlight, None),
                    _ => (Outcome::Succeeded, done),
                };
                CallRow {
                    // Ids deliberately unrelated to time.
                    id: (i * 37) % 101,
                    op: if rng.below(3) == 0 { CallOp::Remove } else { CallOp::Add },
                    owner: user(rng),
                    friend: user(rng),
                    requested_at_ms: t0,
                    completed_at_ms: t1,
                    outcome,
                }
            })
            .collect();
        let callbacks = (0..n_cbs)
            .map(|i| {
                let ts = rng.below(span_s + span_s / 3) as i64 * 1_000 - 5_000;
                CallbackRow {
                    seq: (i * 53) % 211,
                    operation: ["add", "add", "remove", "update"][rng.below(4) as usize].into(),
                    from_user: user(rng),
                    to_user: user(rng),
                    timestamp_ms: ts,
                    received_at_ms: ts + rng.below(120) as i64 * 1_000,
                    promoted_at_ms: None,
                }
            })
            .collect::<Vec<_>>();
        // Some events told to both users: the same timestamp the other way round.
        let mut twins = Vec::new();
        for (i, b) in callbacks.iter().enumerate() {
            if rng.below(4) == 0 {
                twins.push(CallbackRow {
                    seq: 1_000 + i as i64,
                    from_user: b.to_user.clone(),
                    to_user: b.from_user.clone(),
                    received_at_ms: b.received_at_ms + rng.below(3) as i64 * 1_000,
                    ..b.clone()
                });
            }
        }
        let callbacks = callbacks.into_iter().chain(twins).collect();
        let p =
            MatchParams { skew_ms: 2_000, window_ms: 20_000, now_ms: rng.below(span_s + span_s / 3) as i64 * 1_000 };
        (calls, callbacks, p)
    }

    /// The rules read literally: every (call, callback) pair, one global sort, one greedy pass.
    fn brute_force(calls: &[CallRow], callbacks: &[CallbackRow], p: &MatchParams) -> Reconciliation {
        // The module's edge conventions: no completion time means t1 = t0, and t1 >= t0 (the
        // generator does produce in-flight calls with now before t0).
        let t1_of = |c: &CallRow| {
            match c.outcome {
                Outcome::InFlight => p.now_ms,
                _ => c.completed_at_ms.unwrap_or(c.requested_at_ms),
            }
            .max(c.requested_at_ms)
        };
        let same_pair = |c: &CallRow, b: &CallbackRow| {
            (c.owner == b.from_user && c.friend == b.to_user) || (c.owner == b.to_user && c.friend == b.from_user)
        };
        let twin = brute_force_twins(callbacks);
        let mut cands = Vec::new();
        for (i, c) in calls.iter().enumerate() {
            let (t0, t1) = (c.requested_at_ms, t1_of(c));
            for (k, b) in callbacks.iter().enumerate() {
                let ts = b.timestamp_ms;
                let event_received =
                    twin[k].map_or(b.received_at_ms, |t| b.received_at_ms.min(callbacks[t].received_at_ms));
                if b.operation == c.op.expected_callback_operation()
                    && same_pair(c, b)
                    && t0 - p.skew_ms <= ts
                    && ts <= t1 + p.window_ms
                    && event_received >= t0
                {
                    let d = if ts < t0 {
                        t0 - ts
                    } else if ts > t1 {
                        ts - t1
                    } else {
                        0
                    };
                    let weight = if expects_callback(c.outcome) { 0 } else { p.skew_ms };
                    let reversed = b.from_user != c.owner;
                    cands.push(((d + weight, reversed, ts, b.seq, (ts - t0).abs(), t0, c.id, d), i, k));
                }
            }
        }
        cands.sort();
        let mut primary = vec![None; calls.len()];
        let mut taken = vec![false; callbacks.len()];
        let mut extras = vec![Vec::new(); calls.len()];
        for &(_, i, k) in &cands {
            if primary[i].is_none() && !taken[k] {
                primary[i] = Some(k);
                taken[k] = true;
                if let Some(t) = twin[k].filter(|&t| !taken[t]) {
                    taken[t] = true;
                    extras[i].push(callbacks[t].seq);
                }
            }
        }
        let mut orphans = Vec::new();
        for (k, b) in callbacks.iter().enumerate() {
            if taken[k] {
                continue;
            }
            // Extras go to the nearest call: (distance, t0, id), whatever its outcome.
            match cands.iter().filter(|c| c.2 == k).min_by_key(|((_, _, _, _, _, t0, id, d), _, _)| (*d, *t0, *id)) {
                Some(&(_, i, _)) => extras[i].push(b.seq),
                None => orphans.push(b.seq),
            }
        }
        orphans.sort();
        let calls = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let close = t1_of(c) + p.window_ms;
                let prim = primary[i].map(|k| &callbacks[k]);
                let status = match (c.outcome, prim) {
                    (Outcome::Rejected | Outcome::Failed, Some(_)) => CallStatus::Unexpected,
                    (_, Some(_)) => CallStatus::Matched,
                    (Outcome::Succeeded, None) if p.now_ms <= close => CallStatus::Pending,
                    (Outcome::Succeeded, None) => CallStatus::Missing,
                    (Outcome::InFlight, None) => CallStatus::Pending,
                    (_, None) => CallStatus::NotExpected,
                };
                let mut ex = std::mem::take(&mut extras[i]);
                ex.sort();
                CallReport {
                    call_id: c.id,
                    status,
                    matched: prim.map(|b| b.seq),
                    extras: ex,
                    late: prim.is_some_and(|b| b.available_at_ms() > close),
                    latency_ms: prim.map(|b| b.available_at_ms() - c.requested_at_ms),
                }
            })
            .collect();
        Reconciliation { calls, orphans }
    }

    /// Twins read literally: per (unordered pair, operation, timestamp), callbacks from the lower
    /// name and from the higher one, each by seq, zipped.
    fn brute_force_twins(callbacks: &[CallbackRow]) -> Vec<Option<usize>> {
        type BySeq = Vec<(i64, usize)>;
        let mut sides: HashMap<(String, String, String, i64), (BySeq, BySeq)> = HashMap::new();
        for (k, b) in callbacks.iter().enumerate() {
            let (lo, hi) =
                if b.from_user <= b.to_user { (&b.from_user, &b.to_user) } else { (&b.to_user, &b.from_user) };
            let e = sides.entry((lo.to_string(), hi.to_string(), b.operation.to_string(), b.timestamp_ms)).or_default();
            if b.from_user < b.to_user { e.0.push((b.seq, k)) } else { e.1.push((b.seq, k)) }
        }
        let mut twin = vec![None; callbacks.len()];
        for (mut ups, mut downs) in sides.into_values() {
            ups.sort();
            downs.sort();
            for (&(_, u), &(_, d)) in ups.iter().zip(&downs) {
                twin[u] = Some(d);
                twin[d] = Some(u);
            }
        }
        twin
    }

    /// Reports keyed by call id, so results can be compared across input orders.
    fn by_id(r: &Reconciliation) -> HashMap<i64, CallReport> {
        r.calls.iter().map(|c| (c.call_id, c.clone())).collect()
    }

    /// Every callback is exactly one of: someone's primary, someone's extra, an orphan.
    fn assert_each_callback_accounted_once(r: &Reconciliation, callbacks: &[CallbackRow]) {
        let mut seen: Vec<i64> = r
            .calls
            .iter()
            .flat_map(|c| c.matched.iter().chain(&c.extras).copied())
            .chain(r.orphans.iter().copied())
            .collect();
        seen.sort_unstable();
        let mut all: Vec<i64> = callbacks.iter().map(|b| b.seq).collect();
        all.sort_unstable();
        assert_eq!(seen, all);
    }

    #[test]
    fn generated_scenarios_agree_with_the_literal_global_greedy() {
        let mut rng = Lcg(0x5eed);
        let mut total = Summary::default();
        let mut extras = 0;
        for round in 0..600 {
            let (calls, callbacks, p) =
                if round % 2 == 0 { scenario(&mut rng, 4, 300) } else { scenario(&mut rng, 2, 60) };
            let r = reconcile(&calls, &callbacks, &p);
            assert_eq!(r, brute_force(&calls, &callbacks, &p), "calls {calls:?}\ncallbacks {callbacks:?}");
            assert_each_callback_accounted_once(&r, &callbacks);
            let s = summarize(&r);
            total.matched += s.matched;
            total.pending += s.pending;
            total.missing += s.missing;
            total.not_expected += s.not_expected;
            total.unexpected += s.unexpected;
            total.orphan += s.orphan;
            extras += r.calls.iter().map(|c| c.extras.len()).sum::<usize>();
        }
        // Guard against a generator too sparse to exercise the rules.
        for (what, n) in [
            ("matched", total.matched),
            ("pending", total.pending),
            ("missing", total.missing),
            ("not_expected", total.not_expected),
            ("unexpected", total.unexpected),
            ("orphan", total.orphan),
            ("extras", extras as u64),
        ] {
            assert!(n >= 20, "only {n} {what} over all scenarios");
        }
    }

    #[test]
    fn results_do_not_depend_on_input_order() {
        let mut rng = Lcg(42);
        for round in 0..200 {
            let (mut calls, mut callbacks, p) =
                if round % 2 == 0 { scenario(&mut rng, 4, 300) } else { scenario(&mut rng, 2, 60) };
            let first = reconcile(&calls, &callbacks, &p);
            for _ in 0..5 {
                rng.shuffle(&mut calls);
                rng.shuffle(&mut callbacks);
                let again = reconcile(&calls, &callbacks, &p);
                // Same reports, still in (the new) input order, same orphans.
                assert_eq!(
                    again.calls.iter().map(|c| c.call_id).collect::<Vec<_>>(),
                    calls.iter().map(|c| c.id).collect::<Vec<_>>()
                );
                assert_eq!(by_id(&again), by_id(&first));
                assert_eq!(again.orphans, first.orphans);
            }
        }
    }

    #[test]
    fn two_hundred_thousand_calls_and_callbacks_over_twenty_thousand_pairs_reconcile() {
        const PAIRS: i64 = 20_000;
        const PER_PAIR: i64 = 10;
        let mut rng = Lcg(7);
        let users: Vec<CompactString> = (0..PAIRS * 2).map(|u| compact_str::format_compact!("user{u}")).collect();
        let mut calls = Vec::new();
        let mut callbacks = Vec::new();
        for pair in 0..PAIRS {
            let (a, b) = (&users[(pair * 2) as usize], &users[(pair * 2 + 1) as usize]);
            for k in 0..PER_PAIR {
                let id = pair * PER_PAIR + k;
                // Calls 30 s apart with a 60 s window, so neighbouring windows overlap.
                let t0 = k * 30_000 + rng.below(1_000) as i64;
                calls.push(CallRow {
                    id,
                    op: CallOp::Add,
                    owner: a.clone(),
                    friend: b.clone(),
                    requested_at_ms: t0,
                    completed_at_ms: Some(t0 + 200),
                    outcome: Outcome::Succeeded,
                });
                let (from, to) = if rng.below(2) == 0 { (a, b) } else { (b, a) };
                let ts = t0 + rng.below(5_000) as i64 - 1_000;
                callbacks.push(CallbackRow {
                    seq: id,
                    operation: "add".into(),
                    from_user: from.clone(),
                    to_user: to.clone(),
                    timestamp_ms: ts,
                    // Easemob's clock may run behind ours; ours puts it after the request.
                    received_at_ms: ts.max(t0) + 100,
                    promoted_at_ms: None,
                });
            }
        }
        rng.shuffle(&mut calls);
        rng.shuffle(&mut callbacks);
        let r = reconcile(&calls, &callbacks, &params(LATER));
        let s = summarize(&r);
        assert_eq!(r.calls.len(), calls.len());
        assert_eq!(s.matched + s.pending + s.missing + s.not_expected + s.unexpected, calls.len() as u64);
        assert_each_callback_accounted_once(&r, &callbacks);
        // One callback per call, each nearest its own call: everything pairs up.
        assert_eq!(s.matched, calls.len() as u64);
        assert_eq!(s.orphan, 0);
    }
}
