//! Reconciliation reports: load the rows a window needs from the store, as they stood at one
//! point of the journal ([`AsOf`]), run the pure matcher ([`crate::reconcile`]), then filter and
//! page. [`compute`] does the first two and [`page`] the rest, so that the service can cut every
//! page of a report from one computation; [`build`] does both. Shared by `GET /v1/reconciliation`
//! and `friendhook reconcile`; `/metrics` uses the leaner [`summary`] through
//! [`TrailingReconciliation`].
//!
//! To judge calls requested in [since, until) fairly, the matcher also sees the calls and
//! callbacks just outside it: callbacks up to `window + skew` beyond either edge (a call's
//! callback may come later, or Easemob's clock may run behind), and calls up to the same margin
//! before `since` and after `until` (they compete for the same callbacks), as well as calls
//! requested earlier that were still running then (a paced batch's last calls: their callbacks
//! fall in the window). Only calls requested inside the range, and orphans whose event time is
//! inside it, are reported.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use serde::Serialize;

use crate::clock::Reused;
use crate::metrics::ReconciliationFigures;
use crate::model::Outcome;
use crate::reconcile::{self, CallRow, CallStatus, CallbackRow, MatchParams, Summary};
use crate::store::{JournalPoint, OutcomeDetails, PointFacts, Store, StoreError};

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
    /// Only the call with this id (and no orphans): its verdict. [`narrow_to_call`] sets the range
    /// to the call's own time when none is given.
    pub call_id: Option<i64>,
    /// Page size.
    pub limit: usize,
    /// Resume after this item (the key [`decode_cursor`] reads from a `next_cursor`).
    pub after: Option<ItemKey>,
    /// Judge as of this point (a cursor's, or one a previous report named); `None`: now.
    pub as_of: Option<AsOf>,
}

/// Where an item sorts in a report: (time, 0 for a call or 1 for a callback, id or seq).
pub type ItemKey = (i64, u8, i64);

/// What a report is judged on: the calls, outcomes and callbacks stored up to a point of the
/// journal, and windows open or closed as of a time.
///
/// Every report names its own (`as_of` in the answer, and inside each `next_cursor`), so the
/// pages of one report agree with each other however much is stored meanwhile, and the same
/// `as_of` gives the same report again later: an auditor can cite it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsOf {
    /// The journal up to here.
    pub point: JournalPoint,
    /// Windows judged as of this time (epoch ms): `pending` or `missing`.
    pub now_ms: i64,
}

impl AsOf {
    /// The journal as it stands, judged at `now_ms`.
    pub async fn now(store: &Store, now_ms: i64) -> Result<AsOf, StoreError> {
        Ok(AsOf { point: store.journal_point().await?, now_ms })
    }

    /// `given` (a cursor's or a named point), or else [`AsOf::now`].
    pub async fn given_or_now(given: Option<AsOf>, store: &Store, now_ms: i64) -> Result<AsOf, StoreError> {
        match given {
            Some(as_of) => Ok(as_of),
            None => AsOf::now(store, now_ms).await,
        }
    }

    /// `<seq>.<last call id>.<now, epoch ms>`, as the API shows it.
    pub fn token(&self) -> String {
        format!("{}.{}.{}", self.point.seq, self.point.last_call_id, self.now_ms)
    }

    /// Reads [`AsOf::token`]'s form.
    pub fn parse(s: &str) -> Option<AsOf> {
        let mut it = s.split('.');
        let as_of = AsOf::from_parts(&mut it)?;
        it.next().is_none().then_some(as_of)
    }

    fn from_parts<'a>(it: &mut impl Iterator<Item = &'a str>) -> Option<AsOf> {
        let seq = it.next()?.parse().ok().filter(|v: &i64| *v >= 0)?;
        let last_call_id = it.next()?.parse().ok().filter(|v: &i64| *v >= 0)?;
        let now_ms = it.next()?.parse().ok()?;
        Some(AsOf { point: JournalPoint { seq, last_call_id }, now_ms })
    }

    /// Whether the journal has reached this point (a point beyond it would take in whatever is
    /// stored next, and the report could not be given again).
    pub fn reached_by(&self, head: JournalPoint) -> bool {
        self.point.seq <= head.seq && self.point.last_call_id <= head.last_call_id
    }

    /// Whether a report could ever have been judged at this point, given what the journal says
    /// about it: the journal has reached it; its seq is not below where the journal stood when
    /// its last call was recorded; no call created after its last call has an outcome at or below
    /// its seq (the two were read together); its time is not before the record at
    /// its seq or its last call, nor after `now_ms`. An `as_of` edited by hand to hide calls or
    /// to keep windows open is refused, instead of being answered with the journal's genuine
    /// chain link beside it. `Err` says what does not fit.
    pub fn check(&self, facts: &PointFacts, now_ms: i64) -> Result<(), String> {
        let head = facts.head;
        if !self.reached_by(head) {
            return Err(format!(
                "names a point this database has not reached (it stands at seq {}, call {})",
                head.seq, head.last_call_id
            ));
        }
        if let Some(seq) = facts.last_call_head_seq.filter(|seq| *seq > self.point.seq) {
            return Err(format!(
                "names call {} as the last one, but seq {seq} was stored before that call was recorded: no report \
                 that saw the call stopped at seq {}",
                self.point.last_call_id, self.point.seq
            ));
        }
        if let Some(seq) = facts.first_seq_of_later_calls.filter(|seq| *seq <= self.point.seq) {
            return Err(format!(
                "names call {} as the last one, but a later call's outcome is at seq {seq}, within seq {}: no \
                 report had this point",
                self.point.last_call_id, self.point.seq
            ));
        }
        let stored_before = facts.stored_at_ms.into_iter().chain(facts.last_call_requested_at_ms).max();
        if let Some(stored_at_ms) = stored_before.filter(|at| self.now_ms < at - AS_OF_CLOCK_SLACK_MS) {
            return Err(format!(
                "is judged at {}, before what it names was stored ({stored_at_ms}): no report had this time",
                self.now_ms
            ));
        }
        if self.now_ms > now_ms + AS_OF_CLOCK_SLACK_MS {
            return Err(format!("is judged at {}, which is still to come (now is {now_ms})", self.now_ms));
        }
        Ok(())
    }
}

/// How far an `as_of`'s time may lie outside what its point allows: a report reads the clock
/// just before its journal point, and clocks step.
const AS_OF_CLOCK_SLACK_MS: i64 = 60_000;

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
    /// When promoted from quarantine (`null` for a callback that verified on arrival).
    pub promoted_at: Option<i64>,
}

impl From<&CallbackRow> for CallbackRef {
    fn from(c: &CallbackRow) -> Self {
        Self {
            seq: c.seq,
            operation: c.operation.to_string(),
            from_user: c.from_user.to_string(),
            to_user: c.to_user.to_string(),
            timestamp: c.timestamp_ms,
            received_at: c.received_at_ms,
            promoted_at: c.promoted_at_ms,
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
        /// Easemob's status and error type and friendhook's reason, as the outcome recorded them
        /// (filled in for a page by [`attach_outcome_details`]; all `null` while in flight).
        #[serde(flatten)]
        details: OutcomeDetails,
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

/// The report: summary over everything selected, plus one page of items.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Counts and latency over the whole selection (before paging).
    pub summary: Summary,
    /// One page of items, ordered by time.
    pub items: Vec<ReportItem>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
    /// What the report is judged on ([`AsOf::token`]); pass as `as_of` to get the same report.
    pub as_of: String,
    /// The stored hash chain link at `as_of`'s seq: the journal the report was computed over
    /// (so a report can be tied to the chain head published at the time; `friendhook audit
    /// verify` checks the chain up to it).
    pub as_of_chain_hash: Option<String>,
    /// The `--match-skew` the verdicts were judged with (ms): the same `as_of` with another
    /// skew or window is another report.
    pub match_skew_ms: i64,
    /// The `--match-window` the verdicts were judged with (ms).
    pub match_window_ms: i64,
}

/// The next page's cursor: the last item's key, and the point the report is judged on.
fn encode_cursor(k: ItemKey, as_of: AsOf, filters: &str) -> String {
    format!("{}.{}.{}.{}.{filters}", k.0, k.1, k.2, as_of.token())
}

/// What a page's filters are, in a cursor: the next page must be asked with the same ones, or it
/// would go on from a place in another list and skip what the new filters add before it. Eight
/// hex digits of a digest: a cursor stays short, and a mix-up of filters is what it catches.
pub fn filters_tag(q: &ReportQuery) -> String {
    let text = format!("{:?}|{:?}|{:?}|{:?}|{:?}|{:?}", q.since_ms, q.until_ms, q.status, q.owner, q.friend, q.call_id);
    crate::store::chain::sha256_hex(text.as_bytes())[..8].to_string()
}

/// Parses a cursor produced by a previous page: its item, its report's point, and the tag of the
/// filters it was read with ([`filters_tag`]; `None` for a cursor from a release before it).
pub fn decode_cursor(s: &str) -> Option<(ItemKey, AsOf, Option<String>)> {
    let mut it = s.split('.');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    let c = it.next()?.parse().ok()?;
    let as_of = AsOf::from_parts(&mut it)?;
    let tag = match it.next() {
        None => None,
        Some(tag) if tag.len() == 8 && tag.bytes().all(|b| b.is_ascii_hexdigit()) => Some(tag.to_ascii_lowercase()),
        Some(_) => return None,
    };
    it.next().is_none().then_some(((a, b, c), as_of, tag))
}

/// Whether a report on one call (`q.call_id`) can be made ([`narrow_to_call`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneCall {
    /// No call asked about, or the call is there to judge.
    Judged,
    /// No call has that id.
    NotRecorded,
    /// The call was recorded after the report's `as_of`: that report cannot hold it.
    AfterAsOf,
}

/// For a report on one call (`q.call_id`) with no range given: the range of that call's own
/// request time, so that only what competes with it is read and judged (a report with no range
/// reads the whole history); the call is judged beside everything that competes for its
/// callbacks, as in any report over a range.
pub async fn narrow_to_call(store: &Store, q: &mut ReportQuery) -> Result<OneCall, StoreError> {
    let Some(id) = q.call_id else { return Ok(OneCall::Judged) };
    let Some(call) = store.get_call(id).await? else { return Ok(OneCall::NotRecorded) };
    if q.as_of.is_some_and(|as_of| id > as_of.point.last_call_id) {
        return Ok(OneCall::AfterAsOf);
    }
    if q.since_ms.is_none() && q.until_ms.is_none() {
        q.since_ms = Some(call.requested_at_ms);
        q.until_ms = Some(call.requested_at_ms.saturating_add(1));
    }
    Ok(OneCall::Judged)
}

/// Builds a report, as of `q.as_of` (or of now: the journal as it stands, `params.now_ms`).
pub async fn build(store: &Store, q: &ReportQuery, params: MatchParams) -> Result<Report, StoreError> {
    let as_of = AsOf::given_or_now(q.as_of, store, params.now_ms).await?;
    let computed = compute(store, ReportBasis::new(as_of, q, params)).await?;
    let mut report = page(&computed, q);
    attach_outcome_details(store, &mut report, as_of.point).await?;
    Ok(report)
}

/// Fills in each call item's [`OutcomeDetails`], as recorded by `at` (the report's point): read
/// for the page's calls only, so that a report over a million calls does not hold them all.
pub async fn attach_outcome_details(store: &Store, report: &mut Report, at: JournalPoint) -> Result<(), StoreError> {
    let ids: Vec<i64> = report
        .items
        .iter()
        .filter_map(|item| match item {
            ReportItem::Call { id, .. } => Some(*id),
            ReportItem::Callback { .. } => None,
        })
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let mut found = store.call_outcome_details(&ids, at).await?;
    for item in &mut report.items {
        if let ReportItem::Call { id, details, .. } = item {
            *details = found.remove(id).unwrap_or_default();
        }
    }
    Ok(())
}

/// Everything that decides a report's verdicts: what it is judged on, its range, and how calls
/// are matched. Two requests with the same basis get the same reconciliation, whatever their
/// filters and page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportBasis {
    /// The point and the time it is judged on.
    pub as_of: AsOf,
    /// `[since, until)` (`i64::MIN` / `i64::MAX` when open).
    pub range: (i64, i64),
    /// `--match-skew` and `--match-window` (ms).
    pub skew_and_window: (i64, i64),
}

impl ReportBasis {
    /// The basis of `q` judged as of `as_of` (whatever `q.as_of` says) with `params`' matching.
    pub fn new(as_of: AsOf, q: &ReportQuery, params: MatchParams) -> Self {
        Self {
            as_of,
            range: (q.since_ms.unwrap_or(i64::MIN), q.until_ms.unwrap_or(i64::MAX)),
            skew_and_window: (params.skew_ms, params.window_ms),
        }
    }
}

/// A reconciliation computed for a [`ReportBasis`]: the rows it read and its verdicts, from which
/// [`page`] cuts any page with any filter. Immutable, because the basis names a point of the
/// append-only journal: the service keeps the last one for the next pages of the same report.
#[derive(Debug)]
pub struct Computed {
    /// What it was computed for.
    pub basis: ReportBasis,
    calls: Vec<CallRow>,
    callbacks: Vec<CallbackRow>,
    result: reconcile::Reconciliation,
    as_of_chain_hash: Option<String>,
}

/// Reads the rows of `basis` (both sides at once, both stopping at its point) and reconciles them.
pub async fn compute(store: &Store, basis: ReportBasis) -> Result<Computed, StoreError> {
    let as_of = basis.as_of;
    let (skew_ms, window_ms) = basis.skew_and_window;
    let params = MatchParams { skew_ms, window_ms, now_ms: as_of.now_ms };
    let margin = window_ms.saturating_add(skew_ms);
    let (since, until) = basis.range;
    let (lo, hi) = (since.saturating_sub(margin), until.saturating_add(margin));
    let (mut calls, mut callbacks, as_of_chain_hash) = tokio::try_join!(
        store.calls_for_reconcile(lo, hi, as_of.point),
        store.roster_callbacks_for_reconcile(lo, hi, as_of.point),
        store.chain_hash_at(as_of.point.seq),
    )?;
    read_past_the_range(store, (since, until), hi, as_of.point, &params, &mut calls, &mut callbacks).await?;
    let result = reconcile::reconcile(&calls, &callbacks, &params);
    Ok(Computed { basis, calls, callbacks, result, as_of_chain_hash })
}

/// One page of the report `computed` holds, for `q`'s filters, status and cursor (`q`'s range and
/// `as_of` are the ones `computed` was computed for).
pub fn page(computed: &Computed, q: &ReportQuery) -> Report {
    let Computed { basis, calls, callbacks, result, as_of_chain_hash } = computed;
    let (since, until) = basis.range;
    let as_of = basis.as_of;
    let by_seq = SeqIndex::new(callbacks);
    // User IDs are stored lower-cased (as Easemob keeps them), so filters are compared that way,
    // as `/v1/calls` does.
    let (owner, friend) =
        (q.owner.as_deref().map(str::to_ascii_lowercase), q.friend.as_deref().map(str::to_ascii_lowercase));
    let (owner, friend) = (owner.as_deref(), friend.as_deref());
    let call_involves = |c: &CallRow| {
        q.call_id.is_none_or(|id| id == c.id)
            && owner.is_none_or(|x| x == c.owner)
            && friend.is_none_or(|x| x == c.friend)
    };
    // An orphan is no call's: a question about one call lists none.
    let cb_involves = |cb: &CallbackRow| {
        let side = |x: &str| x == cb.from_user || x == cb.to_user;
        q.call_id.is_none() && owner.is_none_or(side) && friend.is_none_or(side)
    };

    // Keep only what lies inside the requested range; context rows were there to compete fairly.
    // Items are only materialised for the page: everything else is (key, status, where) entries,
    // pointing into `calls` (and `result.calls`, which has one verdict per call, in order) or
    // into `callbacks`.
    let mut entries: Vec<(ItemKey, &'static str, usize)> = Vec::with_capacity(calls.len() + result.orphans.len());
    for (idx, (call, verdict)) in calls.iter().zip(&result.calls).enumerate() {
        if call.requested_at_ms < since || call.requested_at_ms >= until {
            continue;
        }
        if call_involves(call) {
            entries.push(((call.requested_at_ms, 0, call.id), status_name(verdict.status), idx));
        }
    }
    // Call entries come first.
    let n_calls = entries.len();
    for seq in &result.orphans {
        let Some(k) = by_seq.get(*seq) else { continue };
        let cb = &callbacks[k];
        if cb.timestamp_ms < since || cb.timestamp_ms >= until {
            continue;
        }
        if cb_involves(cb) {
            entries.push(((cb.timestamp_ms, 1, cb.seq), "orphan", k));
        }
    }
    let in_range_calls = entries[..n_calls].iter().map(|&(_, _, idx)| &result.calls[idx]);
    let summary = reconcile::summarize_parts(in_range_calls, (entries.len() - n_calls) as u64);

    let mut sel: Vec<(ItemKey, usize)> = Vec::with_capacity(entries.len());
    let after = q.after;
    for (pos, (key, status, _)) in entries.iter().enumerate() {
        if q.status.as_deref().is_some_and(|s| s != *status) {
            continue;
        }
        if after.is_some_and(|a| *key <= a) {
            continue;
        }
        sel.push((*key, pos));
    }
    let limit = q.limit.max(1);
    let more = sel.len() > limit;
    if more {
        sel.select_nth_unstable(limit);
        sel.truncate(limit);
    }
    sel.sort_unstable();
    let next_cursor = more.then(|| encode_cursor(sel[limit - 1].0, as_of, &filters_tag(q)));
    let items = sel
        .iter()
        .map(|&(_, pos)| {
            let (_, _, idx) = entries[pos];
            if pos < n_calls {
                call_item(&calls[idx], &result.calls[idx], callbacks, &by_seq)
            } else {
                ReportItem::Callback { status: "orphan", callback: CallbackRef::from(&callbacks[idx]) }
            }
        })
        .collect();
    let (match_skew_ms, match_window_ms) = basis.skew_and_window;
    Report {
        summary,
        items,
        next_cursor,
        as_of: as_of.token(),
        as_of_chain_hash: as_of_chain_hash.clone(),
        match_skew_ms,
        match_window_ms,
    }
}

/// The summary [`build`] gives for calls requested (and orphans timestamped) in `[since, until)`,
/// holding only the callbacks that a call could explain.
///
/// [`build`] loads every roster callback near the range, because its items list the orphans one
/// by one. A summary only counts them, and a callback of a pair with no call near the range is
/// an orphan whatever else happens: those are counted as the window is read, page by page, and
/// not kept, so this needs memory for the calls and their pairs' callbacks only (for `/metrics`,
/// where a busy app's client-side friend additions, all orphans, would otherwise be held in
/// memory at every scrape).
pub async fn summary(store: &Store, since: i64, until: i64, params: MatchParams) -> Result<Summary, StoreError> {
    let margin = params.window_ms.saturating_add(params.skew_ms);
    let (lo, hi) = (since.saturating_sub(margin), until.saturating_add(margin));
    // Both reads stop at the same point, so a callback stored between them is not counted as
    // an orphan of a call read before its outcome.
    let at = store.journal_point().await?;
    let calls = store.calls_for_reconcile(lo, hi, at).await?;
    // Hashes of the called pairs: a collision only keeps a callback that did not need keeping,
    // which the matcher then treats like any other.
    let called: HashSet<u64> = calls.iter().map(|c| pair_hash(&c.owner, &c.friend)).collect();
    let (mut callbacks, in_range_total) = store
        .roster_callbacks_kept(lo, hi, at, (since, until), |cb| called.contains(&pair_hash(&cb.from_user, &cb.to_user)))
        .await?;
    let mut calls = calls;
    read_past_the_range(store, (since, until), hi, at, &params, &mut calls, &mut callbacks).await?;
    let result = reconcile::reconcile(&calls, &callbacks, &params);
    let in_range = |ts: i64| ts >= since && ts < until;
    let loaded_in_range = callbacks.iter().filter(|cb| in_range(cb.timestamp_ms)).count() as u64;
    let by_seq = SeqIndex::new(&callbacks);
    let loaded_orphans_in_range = result
        .orphans
        .iter()
        .filter_map(|seq| by_seq.get(*seq))
        .filter(|&k| in_range(callbacks[k].timestamp_ms))
        .count() as u64;
    let orphans = in_range_total.saturating_sub(loaded_in_range) + loaded_orphans_in_range;
    let verdicts = calls.iter().zip(&result.calls).filter(|(c, _)| in_range(c.requested_at_ms)).map(|(_, v)| v);
    Ok(reconcile::summarize_parts(verdicts, orphans))
}

/// Adds what lies past `hi` (the end of what was read) that a call requested in `range` can
/// still match. A call's window ends `window` after it completed, or after now while in flight,
/// and a call can complete long after its request: paced behind a batch, held back by 429s, or
/// cut off by a stop and closed `unknown` at the next start. Read only for the pairs of such
/// calls (a callback is only ever a call of its own pair's): their callbacks up to the last
/// window's end, and the calls of those pairs requested after `hi` that compete for them (the
/// nearest call takes a callback, so a later call keeps its own).
async fn read_past_the_range(
    store: &Store,
    (since, until): (i64, i64),
    hi: i64,
    at: JournalPoint,
    params: &MatchParams,
    calls: &mut Vec<CallRow>,
    callbacks: &mut Vec<CallbackRow>,
) -> Result<(), StoreError> {
    let mut reach = i64::MIN;
    let mut pairs = HashSet::new();
    for call in calls.iter().filter(|c| c.requested_at_ms >= since && c.requested_at_ms < until) {
        let end = reconcile::window_end(call, params);
        if end >= hi {
            reach = reach.max(end);
            pairs.insert(pair_hash(&call.owner, &call.friend));
        }
    }
    if pairs.is_empty() {
        return Ok(());
    }
    let of_pairs = |a: &str, b: &str| pairs.contains(&pair_hash(a, b));
    let (more, _) = store
        .roster_callbacks_kept(hi, reach.saturating_add(1), at, (0, 0), |cb| of_pairs(&cb.from_user, &cb.to_user))
        .await?;
    let later = store.calls_for_reconcile(hi, reach.saturating_add(params.skew_ms).saturating_add(1), at).await?;
    // Calls requested before `hi` were read with the range (those still running at its start too).
    calls.extend(later.into_iter().filter(|c| c.requested_at_ms >= hi && of_pairs(&c.owner, &c.friend)));
    if !more.is_empty() {
        callbacks.extend(more);
        // Kept ascending by seq, as read, for the report's lookups by seq.
        callbacks.sort_unstable_by_key(|c| c.seq);
    }
    Ok(())
}

/// A hash of an unordered user pair.
fn pair_hash(a: &str, b: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (a.min(b), a.max(b)).hash(&mut h);
    h.finish()
}

fn status_name(s: CallStatus) -> &'static str {
    match s {
        CallStatus::Matched => "matched",
        CallStatus::Pending => "pending",
        CallStatus::Missing => "missing",
        CallStatus::NotExpected => "not_expected",
        CallStatus::Unexpected => "unexpected",
    }
}

/// Finds a callback by seq: binary search when the rows are ascending by seq (as loaded), else
/// a hash map (the last row of a seq wins).
enum SeqIndex<'a> {
    Sorted(&'a [CallbackRow]),
    Map(HashMap<i64, usize>),
}

impl<'a> SeqIndex<'a> {
    fn new(callbacks: &'a [CallbackRow]) -> Self {
        if callbacks.windows(2).all(|w| w[0].seq < w[1].seq) {
            SeqIndex::Sorted(callbacks)
        } else {
            SeqIndex::Map(callbacks.iter().enumerate().map(|(i, c)| (c.seq, i)).collect())
        }
    }

    fn get(&self, seq: i64) -> Option<usize> {
        match self {
            SeqIndex::Sorted(cbs) => cbs.binary_search_by_key(&seq, |c| c.seq).ok(),
            SeqIndex::Map(m) => m.get(&seq).copied(),
        }
    }
}

fn call_item(
    call: &CallRow,
    v: &reconcile::CallReport,
    callbacks: &[CallbackRow],
    by_seq: &SeqIndex<'_>,
) -> ReportItem {
    let cb_ref = |s: &i64| by_seq.get(*s).map(|k| CallbackRef::from(&callbacks[k]));
    ReportItem::Call {
        id: call.id,
        op: call.op.as_str(),
        owner: call.owner.to_string(),
        friend: call.friend.to_string(),
        requested_at: call.requested_at_ms,
        completed_at: call.completed_at_ms,
        outcome: call.outcome,
        details: OutcomeDetails::default(),
        status: v.status,
        late: v.late,
        latency_ms: v.latency_ms,
        matched: v.matched.as_ref().and_then(cb_ref),
        extras: v.extras.iter().filter_map(cb_ref).collect(),
    }
}

/// Valid values of the `status` filter.
pub const STATUSES: [&str; 6] = ["matched", "pending", "missing", "not_expected", "unexpected", "orphan"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_roster_add;

    /// `summary` loads only the callbacks a call could explain; it must count exactly what
    /// `build` reports, over a seeded history with every status and with orphans of both kinds
    /// (pairs nobody called: counted in SQLite; called pairs outside every call's window: loaded).
    #[tokio::test]
    async fn the_summary_counts_what_the_full_report_does_without_loading_every_orphan() {
        const START: i64 = crate::store::SEED_START_MS;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::seeded_test_store(&dir, 3_000, 3_600).await;
        // Seeded call n is user{n} -> peer{7n}, requested at START + n s. These callbacks of the
        // first 20 calls' pairs come long after those calls' windows have closed.
        for k in 0..20u64 {
            let ts = START + 3_500_000 + k as i64;
            let late =
                test_roster_add(&format!("late{k}"), &format!("user{k}"), &format!("peer{}", k * 7), ts, ts + 100);
            store.insert_callback(late).await.expect("insert");
        }
        // Calls whose window is still open at `now` are pending.
        let params = MatchParams { skew_ms: 5_000, window_ms: 300_000, now_ms: START + 1_500_000 };

        let windows = [
            (None, None),
            (Some(START), Some(START + 600_000)),
            (Some(START + 1_000_000), Some(START + 2_000_000)),
            (Some(START + 2_900_000), None),
            (Some(START + 3_400_000), Some(START + 3_600_000)),
        ];
        for (since, until) in windows {
            let q = ReportQuery { since_ms: since, until_ms: until, limit: 1, ..ReportQuery::default() };
            let full = build(&store, &q, params).await.expect("report").summary;
            let lean =
                summary(&store, since.unwrap_or(i64::MIN), until.unwrap_or(i64::MAX), params).await.expect("summary");
            assert_eq!(lean, full, "window {since:?}..{until:?}");
        }
        let all = summary(&store, i64::MIN, i64::MAX, params).await.expect("summary");
        assert!(all.matched > 0 && all.pending > 0 && all.missing > 0 && all.not_expected > 0, "{all:?}");
        let late = summary(&store, START + 3_400_000, START + 3_600_000, params).await.expect("summary");
        assert_eq!(late.orphan, 20, "the called pairs' late callbacks are orphans: {late:?}");
        assert!(all.orphan > 20, "and so are the seeded ones of pairs nobody called: {all:?}");
        store.close().await;
    }

    /// A report as of a point sees the journal as it stood there: a call whose outcome came later
    /// is in flight, a later call or callback is not there, and the same point gives the same
    /// report however much is stored after it.
    #[tokio::test]
    async fn a_report_as_of_a_point_sees_only_what_was_stored_by_then() {
        use crate::store::{IntentResult, test_intent as intent, test_succeeded as succeeded};
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = crate::store::open_test_store(&dir).await;
        let IntentResult::Created(call) = store.insert_call_intent(intent("alice", "bob")).await.expect("intent")
        else {
            panic!("a new call")
        };
        let params = MatchParams { skew_ms: 5_000, window_ms: 300_000, now_ms: call.requested_at_ms + 1_000 };
        let q = ReportQuery { limit: 10, ..ReportQuery::default() };
        let before = build(&store, &q, params).await.expect("report");
        let as_of = AsOf::parse(&before.as_of).expect("a report names its point");

        // After the point: the call's outcome, its callback, another call, an orphan.
        store.mark_call_outcome(succeeded(call.clone())).await.expect("outcome");
        let ts = call.requested_at_ms;
        for (msg, from, to) in [("1", "alice", "bob"), ("2", "carol", "dave")] {
            store.insert_callback(test_roster_add(msg, from, to, ts, ts + 100)).await.expect("insert");
        }
        store.insert_call_intent(intent("erin", "frank")).await.expect("intent");

        let again = build(&store, &ReportQuery { as_of: Some(as_of), ..q.clone() }, params).await.expect("report");
        let json = |r: &Report| serde_json::to_value(r).expect("json");
        assert_eq!(json(&again), json(&before), "the same point, the same report");
        assert_eq!((again.summary.pending, again.items.len()), (1, 1), "{:?}", again.summary);
        assert!(matches!(again.items[0], ReportItem::Call { outcome: Outcome::InFlight, .. }));
        // Easemob's answer came with the outcome, after the point: not shown as of it.
        let ReportItem::Call { details, .. } = &again.items[0] else { panic!("a call") };
        assert_eq!(details, &OutcomeDetails::default());

        let now = build(&store, &q, params).await.expect("report");
        assert_eq!((now.summary.matched, now.summary.pending, now.summary.orphan), (1, 1, 1), "{:?}", now.summary);
        let Some(ReportItem::Call { details, .. }) =
            now.items.iter().find(|i| matches!(i, ReportItem::Call { id, .. } if *id == call.id))
        else {
            panic!("the call is reported")
        };
        assert_eq!(details.upstream_status, Some(200), "{details:?}");
        assert_ne!(now.as_of, before.as_of);
        store.close().await;
    }

    /// Four calls requested at `T0` as one paced batch: alice -> bob completed at once and no
    /// callback came; carol -> dave waited ten minutes for its turn; erin -> frank is still
    /// running; gus -> hal acted at Easemob after 30 minutes, its outcome not recorded yet. Each
    /// of the last three got its callback when Easemob acted. Returns the calls and the seq of
    /// gus -> hal's callback; the clock is left at `T0` + 30 minutes.
    async fn paced_batch(store: &Store, clock: &crate::clock::ManualClock) -> (Vec<crate::store::CallRecord>, i64) {
        use crate::store::{IntentResult, test_intent as intent, test_succeeded as succeeded};
        const MINUTE: i64 = 60_000;
        let t0 = crate::clock::Clock::now_ms(clock);
        let mut calls = Vec::new();
        for (owner, friend) in [("alice", "bob"), ("carol", "dave"), ("erin", "frank"), ("gus", "hal")] {
            let IntentResult::Created(call) = store.insert_call_intent(intent(owner, friend)).await.expect("intent")
            else {
                panic!("a new call")
            };
            calls.push(call);
        }
        let callback = |msg: &str, from: &str, to: &str, ts: i64| test_roster_add(msg, from, to, ts, ts + 100);
        store.mark_call_outcome(succeeded(calls[0].clone())).await.expect("outcome");
        clock.advance_ms(10 * MINUTE);
        store.mark_call_outcome(succeeded(calls[1].clone())).await.expect("outcome");
        store.insert_callback(callback("1", "carol", "dave", t0 + 10 * MINUTE)).await.expect("insert");
        store.insert_callback(callback("2", "erin", "frank", t0 + 10 * MINUTE)).await.expect("insert");
        clock.advance_ms(20 * MINUTE);
        let gus = store.insert_callback(callback("3", "gus", "hal", t0 + 30 * MINUTE)).await.expect("insert");
        (calls, gus.seq)
    }

    /// A paced batch records its intents at once and completes its last calls long after: a
    /// window that begins after such a call was requested, while it still ran, must see it, or
    /// its callback inside the window reads `orphan`. Each way the store finds such calls is
    /// used: completed soon after the window's start, running longer than ten minutes, running
    /// still.
    #[tokio::test]
    async fn a_window_sees_the_calls_requested_before_it_that_still_ran_inside_it() {
        use crate::store::test_succeeded as succeeded;
        const T0: i64 = 1_700_000_000_000;
        const MINUTE: i64 = 60_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = crate::clock::ManualClock::new(T0);
        let (store, _) = crate::store::open_test_store_with(&dir, clock.clone()).await;
        let (calls, _) = paced_batch(&store, &clock).await;
        clock.advance_ms(90 * MINUTE);
        store.mark_call_outcome(succeeded(calls[3].clone())).await.expect("outcome");
        let params = MatchParams { skew_ms: 5_000, window_ms: MINUTE, now_ms: T0 + 122 * MINUTE };

        // No call was requested in these windows, and each callback in them is a call's.
        for (since, until) in
            [(T0 + 5 * MINUTE, i64::MAX), (T0 + 5 * MINUTE, T0 + 15 * MINUTE), (T0 + 25 * MINUTE, T0 + 35 * MINUTE)]
        {
            let q = ReportQuery { since_ms: Some(since), until_ms: Some(until), limit: 10, ..ReportQuery::default() };
            let report = build(&store, &q, params).await.expect("report");
            assert_eq!(report.summary, Summary::default(), "window {since}..{until}: {:?}", report.summary);
            assert_eq!(summary(&store, since, until, params).await.expect("summary"), report.summary);
        }
        let all = build(&store, &ReportQuery { limit: 10, ..ReportQuery::default() }, params).await.expect("report");
        let s = all.summary;
        assert_eq!((s.matched, s.missing, s.orphan), (3, 1, 0), "all but alice's call matched: {s:?}");
        store.close().await;
    }

    /// The other edge: a window that holds a call's request but ends long before the call's own
    /// window (paced, held back, or closed at a restart, it completed late). Its callbacks past
    /// the window are still its, and a later call of its pair keeps the one that is its own.
    /// Before, such a call read `missing` in any report ending soon after its request, and in
    /// every report on it alone.
    #[tokio::test]
    async fn a_window_reads_the_callbacks_of_its_calls_that_completed_long_after_it() {
        use crate::store::{IntentResult, test_intent as intent, test_succeeded as succeeded};
        const T0: i64 = 1_700_000_000_000;
        const MINUTE: i64 = 60_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = crate::clock::ManualClock::new(T0);
        let (store, _) = crate::store::open_test_store_with(&dir, clock.clone()).await;
        // As in the test above, and another gus -> hal, an hour in, got its own callback at once.
        let (calls, gus_first) = paced_batch(&store, &clock).await;
        clock.advance_ms(30 * MINUTE);
        let IntentResult::Created(again) = store.insert_call_intent(intent("gus", "hal")).await.expect("intent") else {
            panic!("a new call")
        };
        store.mark_call_outcome(succeeded(again)).await.expect("outcome");
        let later = test_roster_add("4", "gus", "hal", T0 + 60 * MINUTE, T0 + 60 * MINUTE + 100);
        store.insert_callback(later).await.expect("insert");
        clock.advance_ms(60 * MINUTE);
        store.mark_call_outcome(succeeded(calls[3].clone())).await.expect("outcome");
        let params = MatchParams { skew_ms: 5_000, window_ms: MINUTE, now_ms: T0 + 122 * MINUTE };

        let q = ReportQuery { since_ms: Some(T0), until_ms: Some(T0 + MINUTE), limit: 10, ..ReportQuery::default() };
        let report = build(&store, &q, params).await.expect("report");
        let s = report.summary;
        assert_eq!((s.matched, s.missing, s.orphan), (3, 1, 0), "all but alice's call matched: {s:?}");
        assert_eq!(summary(&store, T0, T0 + MINUTE, params).await.expect("summary"), report.summary);
        let gus = report.items.iter().find(|i| matches!(i, ReportItem::Call { id, .. } if *id == calls[3].id));
        let Some(ReportItem::Call { matched: Some(matched), extras, .. }) = gus else { panic!("{gus:?}") };
        assert_eq!(matched.seq, gus_first, "its own callback");
        assert!(extras.is_empty(), "the later call's callback stays the later call's: {extras:?}");

        // On one call alone, as `call_id` asks.
        let mut one = ReportQuery { call_id: Some(calls[1].id), limit: 10, ..ReportQuery::default() };
        assert_eq!(narrow_to_call(&store, &mut one).await.expect("narrow"), OneCall::Judged);
        let report = build(&store, &one, params).await.expect("report");
        assert_eq!((report.summary.matched, report.items.len()), (1, 1), "{:?}", report.summary);
        store.close().await;
    }

    #[test]
    fn an_as_of_is_checked_against_what_the_journal_says_about_its_point() {
        let at = |seq, last_call_id, now_ms| AsOf { point: JournalPoint { seq, last_call_id }, now_ms };
        let facts = PointFacts {
            head: JournalPoint { seq: 10, last_call_id: 4 },
            first_seq_of_later_calls: Some(9),
            stored_at_ms: Some(1_000_000),
            last_call_requested_at_ms: Some(900_000),
            last_call_head_seq: Some(7),
        };
        let now_ms = 2_000_000;
        assert_eq!(at(8, 3, 1_000_500).check(&facts, now_ms), Ok(()), "a point as a report had it");
        assert_eq!(at(8, 3, 950_000).check(&facts, now_ms), Ok(()), "a clock a little behind is allowed for");
        let refused = |as_of: AsOf| as_of.check(&facts, now_ms).expect_err("refused");
        assert!(refused(at(11, 3, 1_000_500)).contains("not reached"));
        assert!(refused(at(8, 5, 1_000_500)).contains("not reached"));
        assert!(refused(at(9, 3, 1_000_500)).contains("later call's outcome is at seq 9"), "call 4 ended at seq 9");
        assert!(refused(at(6, 3, 1_000_500)).contains("seq 7 was stored before that call"), "call 3 came after seq 7");
        assert_eq!(at(7, 3, 1_000_500).check(&facts, now_ms), Ok(()), "seen together with call 3");
        assert!(refused(at(8, 3, 900_000)).contains("before what it names was stored"));
        assert!(refused(at(8, 3, now_ms + 60_001)).contains("still to come"));
        let empty = PointFacts {
            head: JournalPoint { seq: 0, last_call_id: 0 },
            first_seq_of_later_calls: None,
            stored_at_ms: None,
            last_call_requested_at_ms: None,
            last_call_head_seq: None,
        };
        assert_eq!(at(0, 0, 5).check(&empty, now_ms), Ok(()), "the empty journal");
    }

    #[test]
    fn cursor_round_trips() {
        let as_of = AsOf { point: JournalPoint { seq: 7, last_call_id: 3 }, now_ms: 1_700_000_000_000 };
        let tag = filters_tag(&ReportQuery { status: Some("missing".into()), ..ReportQuery::default() });
        assert_eq!(
            decode_cursor(&encode_cursor((-5, 1, 42), as_of, &tag)),
            Some(((-5, 1, 42), as_of, Some(tag.clone())))
        );
        assert_ne!(tag, filters_tag(&ReportQuery::default()), "the filters are in it");
        assert_eq!(decode_cursor("-5.1.42.7.3.1700000000000"), Some(((-5, 1, 42), as_of, None)), "an older cursor");
        assert_eq!(decode_cursor("-5.1.42.7.3.1700000000000.xyz"), None, "not a tag");
        assert_eq!(AsOf::parse(&as_of.token()), Some(as_of));
        assert_eq!(decode_cursor("1.2.3"), None, "a cursor names its point");
        assert_eq!(decode_cursor("a.b.c.7.3.0"), None);
        assert_eq!(decode_cursor("1.0.3.7.3.0.9"), None);
        assert_eq!(AsOf::parse("-1.3.0"), None);
        assert_eq!(AsOf::parse("7.3"), None);
    }
}

/// The reconciliation of a trailing window behind `/metrics`: calls requested within the last
/// `window`, judged as `GET /v1/reconciliation?since=<now - window>` would judge them.
///
/// Computed by [`summary`], which holds the window's calls and only the callbacks they could
/// explain (12-17 ms for an hour of 6,000 calls, 1.0-1.2 s for an hour at Easemob's 100 calls/s),
/// and reused for [`TrailingReconciliation::REUSE_MS`], so that several Prometheus servers
/// scraping every few seconds do not multiply that. One
/// computation at a time; scrapes that arrive meanwhile wait for it and share its result. A failed
/// computation is not reused, so the next scrape tries again.
#[derive(Debug)]
pub struct TrailingReconciliation {
    window_ms: i64,
    last: Reused<ReconciliationFigures>,
}

impl TrailingReconciliation {
    /// How long a computed result is served again.
    pub const REUSE_MS: i64 = 10_000;

    /// Reconciles the last `window`.
    pub fn new(window: std::time::Duration) -> Self {
        Self { window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX), last: Reused::new(Self::REUSE_MS) }
    }

    /// The figures as of `params.now_ms`: computed now, or reused if computed less than
    /// [`Self::REUSE_MS`] before (a clock that went back recomputes).
    pub async fn figures(&self, store: &Store, params: MatchParams) -> ReconciliationFigures {
        let now = params.now_ms;
        // A failure is shown (as NaN) but not reused: its figures are the `Err` side.
        let computed = self.last.get(now, || async {
            let started = std::time::Instant::now();
            let result = summary(store, now.saturating_sub(self.window_ms), i64::MAX, params).await;
            let figures =
                |summary| ReconciliationFigures { window_ms: self.window_ms, summary, took: started.elapsed() };
            result.map(|s| figures(Some(s))).map_err(|err| {
                tracing::warn!(error = %err, "could not reconcile the trailing window for /metrics; exported as NaN");
                figures(None)
            })
        });
        computed.await.unwrap_or_else(|unreadable| unreadable)
    }
}
