//! Reads over the journal (everything with a `seq`): the feed, the audit chain, the chain head,
//! and the rows reconciliation needs.

use serde::Serialize;
use sqlx::Row;

use super::chain::{self, CallContent, CallbackContent};
use super::writer::ChainHead;
use super::{Store, StoreError};
use crate::model::{CallOp, Outcome};
use crate::reconcile::{CallRow, CallbackRow};

/// One normalised feed record.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FeedRecord {
    /// Journal position.
    pub seq: i64,
    /// `call` or `callback`.
    pub kind: &'static str,
    /// Call: owner. Callback: normalised `from`.
    pub owner: Option<String>,
    /// Call: friend. Callback: normalised `to`.
    pub friend: Option<String>,
    /// Call: add/remove. Callback: payload.operation.
    pub operation: Option<String>,
    /// Call: its outcome (calls enter the feed once it is final).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Callback: its chat_type (`roster` for friend events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_type: Option<String>,
    /// Call: when it was requested. Callback: the event's own timestamp. Epoch ms.
    pub event_time: i64,
    /// Call: when the outcome was recorded. Callback: when friendhook stored it. Epoch ms.
    pub received_time: i64,
    /// Call id or callback callId.
    pub id: String,
    /// Callback: msg_id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// Call: Easemob's HTTP status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<i64>,
    /// Call: Easemob's error type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_error: Option<String>,
}

const FEED_PAGE: &str = "\
SELECT * FROM (
  SELECT seq, 'call' AS kind, owner AS a, friend AS b, op AS operation, outcome, NULL AS chat_type,
         requested_at_ms AS event_time, completed_at_ms AS received_time, CAST(id AS TEXT) AS ident,
         NULL AS msg_id, upstream_status, upstream_error
  FROM calls WHERE seq > ?1 AND requested_at_ms >= ?3 AND requested_at_ms < ?4 ORDER BY seq LIMIT ?2)
UNION ALL
SELECT * FROM (
  SELECT seq, 'callback', from_user, to_user, operation, NULL, chat_type,
         timestamp_ms, received_at_ms, call_id, msg_id, NULL, NULL
  FROM callbacks WHERE seq > ?1 AND timestamp_ms >= ?3 AND timestamp_ms < ?4 ORDER BY seq LIMIT ?2)
ORDER BY seq LIMIT ?2";

/// A record of the chain as stored, for verification.
#[derive(Debug, Clone)]
pub struct ChainRecord {
    /// Journal position.
    pub seq: i64,
    /// `call` or `callback`.
    pub kind: &'static str,
    /// Row id within its table.
    pub id: i64,
    /// Stored previous link.
    pub prev_hash: String,
    /// Stored link.
    pub chain_hash: String,
    /// Link recomputed from the stored content and the stored previous link.
    pub recomputed: String,
    /// Whether the stored body digest matches the stored raw body (callbacks; true for calls).
    pub body_digest_ok: bool,
}

impl Store {
    /// One page of the feed after `after`, in seq order; `event_time` within [since, until).
    pub async fn feed_page(&self, after: i64, limit: i64, since_ms: i64, until_ms: i64) -> Result<Vec<FeedRecord>, StoreError> {
        let rows = sqlx::query(FEED_PAGE)
            .bind(after)
            .bind(limit)
            .bind(since_ms)
            .bind(until_ms)
            .fetch_all(self.read_pool())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let kind: String = r.try_get(1)?;
            out.push(FeedRecord {
                seq: r.try_get(0)?,
                kind: if kind == "call" { "call" } else { "callback" },
                owner: r.try_get(2)?,
                friend: r.try_get(3)?,
                operation: r.try_get(4)?,
                outcome: r.try_get(5)?,
                chat_type: r.try_get(6)?,
                event_time: r.try_get(7)?,
                received_time: r.try_get::<Option<i64>, _>(8)?.unwrap_or_default(),
                id: r.try_get(9)?,
                msg_id: r.try_get(10)?,
                upstream_status: r.try_get(11)?,
                upstream_error: r.try_get(12)?,
            });
        }
        Ok(out)
    }

    /// The current chain head.
    pub async fn chain_head(&self) -> Result<ChainHead, StoreError> {
        let mut conn = self.read_pool().acquire().await?;
        super::reads::load_head(&mut conn).await
    }

    /// One page of chain records after `after`, with links recomputed from stored content.
    pub async fn chain_page(&self, after: i64, limit: i64) -> Result<Vec<ChainRecord>, StoreError> {
        let callbacks = sqlx::query(
            "SELECT id, seq, dedup_key, call_id, msg_id, appkey, event_type, chat_type, operation, from_user, to_user,
                    timestamp_ms, received_at_ms, scheme, secret_index, raw_body, body_sha256, prev_hash, chain_hash
             FROM callbacks WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        let calls = sqlx::query(
            "SELECT id, seq, op, owner, friend, idempotency_key, requested_at_ms, completed_at_ms, outcome,
                    upstream_status, upstream_error, attempts, response_body, prev_hash, chain_hash
             FROM calls WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        let mut out = Vec::with_capacity(callbacks.len() + calls.len());
        for r in &callbacks {
            let prev: String = r.try_get::<Option<String>, _>("prev_hash")?.unwrap_or_default();
            let raw: String = r.try_get("raw_body")?;
            let body_sha: String = r.try_get("body_sha256")?;
            let content = CallbackContent {
                seq: r.try_get("seq")?,
                dedup_key: r.try_get("dedup_key")?,
                call_id: r.try_get("call_id")?,
                msg_id: r.try_get("msg_id")?,
                appkey: r.try_get("appkey")?,
                event_type: r.try_get("event_type")?,
                chat_type: r.try_get("chat_type")?,
                operation: r.try_get("operation")?,
                from_user: r.try_get("from_user")?,
                to_user: r.try_get("to_user")?,
                timestamp_ms: r.try_get("timestamp_ms")?,
                received_at_ms: r.try_get("received_at_ms")?,
                scheme: r.try_get("scheme")?,
                secret_index: r.try_get("secret_index")?,
                body_sha256: &body_sha,
            };
            out.push(ChainRecord {
                seq: content.seq,
                kind: "callback",
                id: r.try_get("id")?,
                recomputed: chain::link(&prev, &content.canonical()),
                prev_hash: prev,
                chain_hash: r.try_get::<Option<String>, _>("chain_hash")?.unwrap_or_default(),
                body_digest_ok: chain::sha256_hex(raw.as_bytes()) == body_sha,
            });
        }
        for r in &calls {
            let prev: String = r.try_get::<Option<String>, _>("prev_hash")?.unwrap_or_default();
            let content = CallContent {
                seq: r.try_get("seq")?,
                id: r.try_get("id")?,
                op: r.try_get("op")?,
                owner: r.try_get("owner")?,
                friend: r.try_get("friend")?,
                idempotency_key: r.try_get("idempotency_key")?,
                requested_at_ms: r.try_get("requested_at_ms")?,
                completed_at_ms: r.try_get::<Option<i64>, _>("completed_at_ms")?.unwrap_or_default(),
                outcome: r.try_get::<Option<&str>, _>("outcome")?.unwrap_or_default(),
                upstream_status: r.try_get("upstream_status")?,
                upstream_error: r.try_get("upstream_error")?,
                attempts: r.try_get::<Option<i64>, _>("attempts")?.unwrap_or_default(),
                response_body: r.try_get("response_body")?,
            };
            out.push(ChainRecord {
                seq: content.seq,
                kind: "call",
                id: content.id,
                recomputed: chain::link(&prev, &content.canonical()),
                prev_hash: prev,
                chain_hash: r.try_get::<Option<String>, _>("chain_hash")?.unwrap_or_default(),
                body_digest_ok: true,
            });
        }
        out.sort_by_key(|r| r.seq);
        out.truncate(limit as usize);
        Ok(out)
    }

    /// Records that should carry a chain link but do not: callbacks without seq, and calls with
    /// an outcome but no seq.
    pub async fn count_unchained(&self) -> Result<i64, StoreError> {
        let a: i64 = sqlx::query_scalar("SELECT count(*) FROM callbacks WHERE seq IS NULL OR chain_hash IS NULL")
            .fetch_one(self.read_pool())
            .await?;
        let b: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM calls WHERE outcome IS NOT NULL AND (seq IS NULL OR chain_hash IS NULL)",
        )
        .fetch_one(self.read_pool())
        .await?;
        Ok(a + b)
    }

    /// Calls requested in [since, until) (all when `None`), for reconciliation.
    pub async fn calls_for_reconcile(&self, since_ms: i64, until_ms: i64) -> Result<Vec<CallRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, op, owner, friend, requested_at_ms, completed_at_ms, outcome FROM calls
             WHERE requested_at_ms >= ?1 AND requested_at_ms < ?2",
        )
        .bind(since_ms)
        .bind(until_ms)
        .fetch_all(self.read_pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let op: &str = r.try_get(1)?;
            let outcome: Option<&str> = r.try_get(6)?;
            out.push(CallRow {
                id: r.try_get(0)?,
                op: CallOp::parse(op).unwrap_or(CallOp::Add),
                owner: r.try_get(2)?,
                friend: r.try_get(3)?,
                requested_at_ms: r.try_get(4)?,
                completed_at_ms: r.try_get(5)?,
                outcome: outcome.and_then(Outcome::parse).unwrap_or(Outcome::InFlight),
            });
        }
        Ok(out)
    }

    /// Roster add/remove callbacks whose event time is in [since, until), for reconciliation.
    pub async fn roster_callbacks_for_reconcile(&self, since_ms: i64, until_ms: i64) -> Result<Vec<CallbackRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, operation, from_user, to_user, timestamp_ms, received_at_ms FROM callbacks
             WHERE chat_type = 'roster' AND operation IN ('add', 'remove')
               AND timestamp_ms >= ?1 AND timestamp_ms < ?2 AND seq IS NOT NULL",
        )
        .bind(since_ms)
        .bind(until_ms)
        .fetch_all(self.read_pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(CallbackRow {
                seq: r.try_get(0)?,
                operation: r.try_get(1)?,
                from_user: r.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
                to_user: r.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
                timestamp_ms: r.try_get(4)?,
                received_at_ms: r.try_get(5)?,
            });
        }
        Ok(out)
    }

    /// Callback rows by seq (for reconciliation items).
    pub async fn callbacks_by_seq(&self, seqs: &[i64]) -> Result<Vec<CallbackRow>, StoreError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT seq, operation, from_user, to_user, timestamp_ms, received_at_ms FROM callbacks
             WHERE seq IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(seqs).unwrap_or_else(|_| "[]".into()))
        .fetch_all(self.read_pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CallbackRow {
                    seq: r.try_get(0)?,
                    operation: r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                    from_user: r.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
                    to_user: r.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
                    timestamp_ms: r.try_get(4)?,
                    received_at_ms: r.try_get(5)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}
