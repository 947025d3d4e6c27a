//! Matching calls against callbacks: plain functions over rows (no HTTP, no SQL).
//!
//! STUB: to be implemented; the types and signatures below are fixed.

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
pub fn reconcile(calls: &[CallRow], callbacks: &[CallbackRow], params: &MatchParams) -> Reconciliation {
    let _ = (calls, callbacks, params);
    todo!("reconcile::reconcile")
}

/// Counts and latency percentiles of a reconciliation.
pub fn summarize(r: &Reconciliation) -> Summary {
    let _ = r;
    todo!()
}
