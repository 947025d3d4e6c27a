//! Read queries. Each function is one statement (or one streamed statement) over the read pool.

use serde::Serialize;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::writer::ChainHead;
use super::{CallRecord, SELECT_CALL, Store, StoreError, chain};
use crate::model::Outcome;

/// Loads the chain head (highest seq of either table). Both lookups use the unique seq indexes.
pub(super) async fn load_head(conn: &mut SqliteConnection) -> Result<ChainHead, StoreError> {
    let a: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, chain_hash FROM callbacks WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let b: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, chain_hash FROM calls WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let best = match (a, b) {
        (Some(a), Some(b)) => Some(if a.0 > b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    Ok(match best {
        Some((seq, hash)) => ChainHead { seq, hash },
        None => ChainHead { seq: 0, hash: chain::GENESIS.to_string() },
    })
}

/// Filters of `GET /v1/callbacks`.
#[derive(Debug, Clone, Default)]
pub struct CallbackFilter {
    /// Exact callId.
    pub call_id: Option<String>,
    /// Exact payload.operation.
    pub operation: Option<String>,
    /// Exact normalised from.
    pub from_user: Option<String>,
    /// Exact normalised to.
    pub to_user: Option<String>,
    /// Event time lower bound (inclusive, epoch ms).
    pub since_ms: Option<i64>,
    /// Event time upper bound (exclusive, epoch ms).
    pub until_ms: Option<i64>,
    /// Only seq greater than this (the cursor).
    pub after_seq: Option<i64>,
    /// Page size.
    pub limit: i64,
}

/// A stored callback event as listed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CallbackItem {
    /// Sequence number.
    pub seq: i64,
    /// callId.
    pub call_id: String,
    /// msg_id.
    pub msg_id: Option<String>,
    /// eventType.
    pub event_type: Option<String>,
    /// chat_type.
    pub chat_type: Option<String>,
    /// payload.operation.
    pub operation: Option<String>,
    /// Normalised from.
    pub from_user: Option<String>,
    /// Normalised to.
    pub to_user: Option<String>,
    /// appkey.
    pub appkey: Option<String>,
    /// Event time (epoch ms).
    pub timestamp: i64,
    /// First receipt (epoch ms).
    pub received_at: i64,
    /// Number of deliveries received.
    pub deliveries: i64,
    /// Scheme that verified it.
    pub scheme: String,
    /// Index of the verifying secret.
    pub secret_index: i64,
    /// Hex SHA-256 of the raw body.
    pub body_sha256: String,
    /// Hash-chain link.
    pub chain_hash: Option<String>,
    /// When `quarantine reverify` promoted it from the quarantine (epoch ms); `null` for an event
    /// stored as it arrived. A promoted event's `secret_index` counts among the secrets given to
    /// `reverify`, not the service's.
    pub promoted_at: Option<i64>,
}

/// One callback with its raw body and delivery times.
#[derive(Debug, Clone, Serialize)]
pub struct CallbackDetail {
    /// The listed fields.
    #[serde(flatten)]
    pub item: CallbackItem,
    /// The exact body as received.
    pub raw_body: String,
    /// Every delivery: time and source.
    pub delivery_log: Vec<Delivery>,
}

/// One delivery of an event.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// When (epoch ms).
    pub received_at: i64,
    /// From where.
    pub remote_addr: Option<String>,
}

const CALLBACK_COLUMNS: &str = "seq, call_id, msg_id, event_type, chat_type, operation, from_user, to_user, appkey, \
     timestamp_ms, received_at_ms, deliveries, scheme, secret_index, body_sha256, chain_hash, \
     (SELECT q.promoted_at_ms FROM quarantine AS q WHERE q.promoted_seq = callbacks.seq AND q.promoted_as_new = 1) \
     AS promoted_at_ms";

fn callback_item(row: &sqlx::sqlite::SqliteRow) -> Result<CallbackItem, sqlx::Error> {
    Ok(CallbackItem {
        seq: row.try_get("seq")?,
        call_id: row.try_get("call_id")?,
        msg_id: row.try_get("msg_id")?,
        event_type: row.try_get("event_type")?,
        chat_type: row.try_get("chat_type")?,
        operation: row.try_get("operation")?,
        from_user: row.try_get("from_user")?,
        to_user: row.try_get("to_user")?,
        appkey: row.try_get("appkey")?,
        timestamp: row.try_get("timestamp_ms")?,
        received_at: row.try_get("received_at_ms")?,
        deliveries: row.try_get("deliveries")?,
        scheme: row.try_get("scheme")?,
        secret_index: row.try_get("secret_index")?,
        body_sha256: row.try_get("body_sha256")?,
        chain_hash: row.try_get("chain_hash")?,
        promoted_at: row.try_get("promoted_at_ms")?,
    })
}

/// Filters of `GET /v1/calls`.
#[derive(Debug, Clone, Default)]
pub struct CallFilter {
    /// Exact owner.
    pub owner: Option<String>,
    /// Exact friend.
    pub friend: Option<String>,
    /// add / remove.
    pub op: Option<crate::model::CallOp>,
    /// Outcome (`in_flight` = none yet).
    pub outcome: Option<Outcome>,
    /// requested_at lower bound (inclusive).
    pub since_ms: Option<i64>,
    /// requested_at upper bound (exclusive).
    pub until_ms: Option<i64>,
    /// Only ids greater than this (the cursor).
    pub after_id: Option<i64>,
    /// Page size.
    pub limit: i64,
}

/// Counts for `/readyz` and the logs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RejectionStats {
    /// Rows currently in the rejection log.
    pub rejected_deliveries: i64,
}

impl Store {
    /// Whether any stored callback has this `payload.operation` (through `callbacks_by_operation`).
    pub async fn any_callback_with_operation(&self, operation: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar::<_, i64>("SELECT 1 FROM callbacks WHERE operation = ?1 LIMIT 1")
            .bind(operation)
            .fetch_optional(self.read_pool())
            .await?
            .is_some())
    }

    /// `GET /v1/callbacks`: a page in sequence order.
    pub async fn list_callbacks(&self, f: &CallbackFilter) -> Result<Vec<CallbackItem>, StoreError> {
        let rows = list_callbacks_query(f).build().fetch_all(self.read_pool()).await?;
        Ok(rows.iter().map(callback_item).collect::<Result<_, _>>()?)
    }

    /// `GET /v1/callbacks/{seq}`.
    pub async fn get_callback(&self, seq: i64) -> Result<Option<CallbackDetail>, StoreError> {
        let row = sqlx::query(&format!("SELECT id, raw_body, {CALLBACK_COLUMNS} FROM callbacks WHERE seq = ?1"))
            .bind(seq)
            .fetch_optional(self.read_pool())
            .await?;
        let Some(row) = row else { return Ok(None) };
        let id: i64 = row.try_get("id")?;
        let deliveries = sqlx::query(
            "SELECT received_at_ms, remote_addr FROM callbacks WHERE id = ?1
             UNION ALL
             SELECT received_at_ms, remote_addr FROM (
                 SELECT received_at_ms, remote_addr FROM callback_deliveries WHERE callback_id = ?1 ORDER BY rowid)",
        )
        .bind(id)
        .fetch_all(self.read_pool())
        .await?
        .iter()
        .map(|r| Ok(Delivery { received_at: r.try_get(0)?, remote_addr: r.try_get(1)? }))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Some(CallbackDetail {
            item: callback_item(&row)?,
            raw_body: row.try_get("raw_body")?,
            delivery_log: deliveries,
        }))
    }

    /// Number of rows in the rejection log.
    pub async fn rejection_stats(&self) -> Result<RejectionStats, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rejected_deliveries").fetch_one(self.read_pool()).await?;
        Ok(RejectionStats { rejected_deliveries: n })
    }

    /// Number of stored callback events (not deliveries).
    pub async fn count_callbacks(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM callbacks").fetch_one(self.read_pool()).await?)
    }

    /// The seq of the event stored under this dedup key, if any (`quarantine reverify --dry-run`
    /// tells a promotion from a duplicate with it).
    pub async fn seq_of_dedup_key(&self, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar("SELECT seq FROM callbacks WHERE dedup_key = ?1")
            .bind(key)
            .fetch_optional(self.read_pool())
            .await?)
    }

    /// `GET /v1/calls/{id}`.
    pub async fn get_call(&self, id: i64) -> Result<Option<CallRecord>, StoreError> {
        let row =
            sqlx::query(&format!("{SELECT_CALL} WHERE id = ?1")).bind(id).fetch_optional(self.read_pool()).await?;
        Ok(row.as_ref().map(CallRecord::from_row).transpose()?)
    }

    /// The call recorded under this idempotency key, if any.
    pub async fn get_call_by_idempotency_key(&self, key: &str) -> Result<Option<CallRecord>, StoreError> {
        let row = sqlx::query(&format!("{SELECT_CALL} WHERE idempotency_key = ?1"))
            .bind(key)
            .fetch_optional(self.read_pool())
            .await?;
        Ok(row.as_ref().map(CallRecord::from_row).transpose()?)
    }

    /// The calls recorded under keys that start with `prefix` (a batch's `KEY `, whose pairs are
    /// keyed `KEY 0`, `KEY 1`, ...), with their keys, at most `limit`. Through the key's unique
    /// index: keys from `prefix` up to the next string past every one that starts with it.
    pub async fn calls_by_idempotency_prefix(&self, prefix: &str, limit: i64) -> Result<Vec<CallRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "{SELECT_CALL} WHERE idempotency_key >= ?1 AND idempotency_key < ?1 || char(1114111) ORDER BY id LIMIT ?2"
        ))
        .bind(prefix)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        Ok(rows.iter().map(CallRecord::from_row).collect::<Result<_, _>>()?)
    }

    /// `GET /v1/calls`: a page in id order.
    pub async fn list_calls(&self, f: &CallFilter) -> Result<Vec<CallRecord>, StoreError> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!("{SELECT_CALL} WHERE 1 = 1"));
        if let Some(v) = &f.owner {
            q.push(" AND owner = ").push_bind(v.clone());
        }
        if let Some(v) = &f.friend {
            q.push(" AND friend = ").push_bind(v.clone());
        }
        if let Some(op) = f.op {
            q.push(" AND op = ").push_bind(op.as_str());
        }
        match f.outcome {
            Some(Outcome::InFlight) => {
                q.push(" AND outcome IS NULL");
            }
            Some(o) => {
                q.push(" AND outcome = ").push_bind(o.as_str());
            }
            None => {}
        }
        if let Some(v) = f.since_ms {
            q.push(" AND requested_at_ms >= ").push_bind(v);
        }
        if let Some(v) = f.until_ms {
            q.push(" AND requested_at_ms < ").push_bind(v);
        }
        if let Some(v) = f.after_id {
            q.push(" AND id > ").push_bind(v);
        }
        q.push(" ORDER BY id LIMIT ").push_bind(f.limit);
        let rows = q.build().fetch_all(self.read_pool()).await?;
        Ok(rows.iter().map(CallRecord::from_row).collect::<Result<_, _>>()?)
    }
}

/// The statement of [`Store::list_callbacks`].
fn list_callbacks_query(f: &CallbackFilter) -> QueryBuilder<'static, Sqlite> {
    let mut q: QueryBuilder<Sqlite> =
        QueryBuilder::new(format!("SELECT {CALLBACK_COLUMNS} FROM callbacks WHERE seq IS NOT NULL"));
    // A user filter is answered through callback_users for what the writer has indexed and
    // by scanning the newer tail (seq > upto_seq, through the seq index) for the rest, so the
    // answer is complete whatever the indexing progress. `from` drives when both are given;
    // the other is checked on each row below.
    let by_user = match (&f.from_user, &f.to_user) {
        (Some(u), _) => Some((0, "from_user", u)),
        (None, Some(u)) => Some((1, "to_user", u)),
        (None, None) => None,
    };
    if let Some((role, column, user)) = by_user {
        // Never below 0 (the HTTP layer refuses negative cursors too): the walk below takes one
        // step per bucket from here.
        let after = f.after_seq.unwrap_or(0).max(0);
        // One key lookup per bucket of 65,536 sequence numbers (see migration 0002), from the
        // cursor's bucket to the last indexed one.
        q.push(" AND seq IN (WITH RECURSIVE buckets (b) AS (SELECT ")
            .push_bind(after)
            .push(" >> 16 UNION ALL SELECT b + 1 FROM buckets")
            .push(" WHERE b < coalesce((SELECT upto_seq FROM callback_users_progress), 0) >> 16)")
            // CROSS JOIN: SQLite keeps `buckets` as the outer loop, one key lookup per bucket.
            .push(" SELECT u.seq FROM buckets CROSS JOIN callback_users AS u ON u.role = ")
            .push_bind(role)
            .push(" AND u.bucket = buckets.b AND u.user_id = ")
            .push_bind(user.clone())
            .push(" AND u.seq > ")
            .push_bind(after)
            .push(" UNION ALL SELECT seq FROM callbacks WHERE seq > max(")
            .push_bind(after)
            .push(", coalesce((SELECT upto_seq FROM callback_users_progress), 0)) AND lower(")
            .push(column)
            .push(") = ")
            .push_bind(user.clone())
            .push(")");
    }
    if let Some(v) = &f.call_id {
        q.push(" AND call_id = ").push_bind(v.clone());
    }
    if let Some(v) = &f.operation {
        q.push(" AND operation = ").push_bind(v.clone());
    }
    // lower(): rows stored before user IDs were lower-cased on arrival keep their case.
    if let Some(v) = &f.from_user {
        q.push(" AND lower(from_user) = ").push_bind(v.clone());
    }
    if let Some(v) = &f.to_user {
        q.push(" AND lower(to_user) = ").push_bind(v.clone());
    }
    if let Some(v) = f.since_ms {
        q.push(" AND timestamp_ms >= ").push_bind(v);
    }
    if let Some(v) = f.until_ms {
        q.push(" AND timestamp_ms < ").push_bind(v);
    }
    if let Some(v) = f.after_seq {
        q.push(" AND seq > ").push_bind(v);
    }
    q.push(" ORDER BY seq LIMIT ").push_bind(f.limit);
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewCallback, StoreOptions};
    use sqlx::Connection;

    const FROMS: [&str; 3] = ["ann", "bo", "cy"];
    const TOS: [&str; 2] = ["xi", "yu"];

    fn new_callback(n: usize) -> NewCallback {
        let (from, to) = (FROMS[n % 3], TOS[n % 2]);
        let body = format!(
            r#"{{"chat_type":"roster","callId":"demo-org#demo-app_{n}","security":"x","payload":{{"operation":"add"}},"appkey":"demo-org#demo-app","from":"{from}","to":"{to}","eventType":"chat","msg_id":"{n}","timestamp":1700000000000}}"#
        );
        crate::store::test_callback(&body, 1_000)
    }

    /// Every (from, to) filter combination, paged three at a time through the cursor.
    async fn check_user_filters(store: &Store, stored: &[(i64, &str, &str)], state: &str) {
        let filters = [(Some("ann"), None), (None, Some("yu")), (Some("bo"), Some("xi")), (Some("cy"), Some("nobody"))];
        for (from, to) in filters {
            let expected: Vec<i64> = stored
                .iter()
                .filter(|(_, f, t)| from.is_none_or(|u| u == *f) && to.is_none_or(|u| u == *t))
                .map(|(seq, ..)| *seq)
                .collect();
            let mut got = Vec::new();
            let mut after = None;
            loop {
                let page = store
                    .list_callbacks(&CallbackFilter {
                        from_user: from.map(str::to_string),
                        to_user: to.map(str::to_string),
                        after_seq: after,
                        limit: 3,
                        ..CallbackFilter::default()
                    })
                    .await
                    .expect("list");
                let Some(last) = page.last() else { break };
                after = Some(last.seq);
                got.extend(page.iter().map(|c| c.seq));
            }
            assert_eq!(got, expected, "from={from:?} to={to:?} with {state}");
        }
    }

    /// Queries by user are complete however far the writer has got with `callback_users`: fully
    /// indexed (a closed store indexes what is pending), nothing indexed, and part way; across
    /// two buckets of entries (a call outcome stored at seq 70,000 makes the later callbacks
    /// start in the second bucket).
    #[tokio::test]
    async fn user_filters_are_complete_whatever_the_indexing_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let mut stored = Vec::new();
        for part in 0..2 {
            let store = Store::open(StoreOptions::new(url.clone()), crate::clock::system()).await.expect("open");
            for n in part * 20..part * 20 + 20 {
                let ack = store.insert_callback(new_callback(n)).await.expect("insert");
                stored.push((ack.seq, FROMS[n % 3], TOS[n % 2]));
            }
            store.close().await;
            if part == 0 {
                let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("connect");
                sqlx::query(
                    "INSERT INTO calls (op, owner, friend, pair_key, requested_at_ms, outcome, seq, prev_hash, chain_hash)
                     VALUES ('add', 'p', 'q', 'p\x1fq', 0, 'unknown', 70000, 'x', 'y')",
                )
                .execute(&mut conn)
                .await
                .expect("skip ahead");
                conn.close().await.expect("close");
            }
        }
        assert_eq!((stored[19].0, stored[20].0), (20, 70_001), "the second half starts in bucket 1");

        let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("connect");
        let upto: i64 = sqlx::query_scalar("SELECT upto_seq FROM callback_users_progress")
            .fetch_one(&mut conn)
            .await
            .expect("progress");
        assert_eq!(upto, 70_020, "closing the store indexes everything pending, in several steps");
        let reader = Store::open_read_only(&url).await.expect("read-only");
        check_user_filters(&reader, &stored, "everything indexed").await;

        sqlx::query("DELETE FROM callback_users").execute(&mut conn).await.expect("wipe");
        sqlx::query("UPDATE callback_users_progress SET upto_seq = 0").execute(&mut conn).await.expect("reset");
        check_user_filters(&reader, &stored, "nothing indexed").await;

        crate::store::writer::index_users(&mut conn, 0, 17).await.expect("index part of bucket 0");
        check_user_filters(&reader, &stored, "seq 1..=17 indexed").await;
        crate::store::writer::index_users(&mut conn, 17, 70_010).await.expect("index into bucket 1");
        check_user_filters(&reader, &stored, "seq 1..=70,010 indexed").await;

        // Emptied again under a writer that read the progress (70,010) before: its next step
        // starts from the stored progress instead, as long as it asked for.
        sqlx::query("DELETE FROM callback_users").execute(&mut conn).await.expect("wipe");
        sqlx::query("UPDATE callback_users_progress SET upto_seq = 0").execute(&mut conn).await.expect("reset");
        let reached = crate::store::writer::index_users(&mut conn, 70_010, 70_020).await.expect("stale step");
        assert_eq!(reached, 10, "the step went back to the stored progress");
        check_user_filters(&reader, &stored, "emptied, then a stale writer's step").await;
        let reached = crate::store::writer::index_users(&mut conn, reached, 70_020).await.expect("the rest");
        assert_eq!(reached, 70_020);
        check_user_filters(&reader, &stored, "emptied, then indexed again").await;
        conn.close().await.expect("close");
    }

    /// A user filter reads callback_users through its key and the tail through the seq index; it
    /// never scans the callbacks table.
    #[tokio::test]
    async fn a_user_filter_uses_the_user_entries_and_the_seq_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = crate::store::open_test_store(&dir).await;
        let filter = CallbackFilter { to_user: Some("yu".into()), after_seq: Some(5), limit: 10, ..Default::default() };
        let plan = crate::store::query_plan(&store, list_callbacks_query(&filter).sql()).await;
        assert!(
            plan.iter().any(|d| d.contains("SEARCH u USING PRIMARY KEY (role=? AND bucket=? AND user_id=? AND seq>?)")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|d| d.starts_with("SCAN callbacks")), "{plan:?}");
        store.close().await;
    }
}
