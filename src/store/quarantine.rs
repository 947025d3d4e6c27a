//! The quarantine: requests that failed verification in `--on-bad-signature quarantine` mode,
//! kept whole (headers and exact body) until `friendhook quarantine reverify` promotes them.
//!
//! Owns the SQL that reads the `quarantine` table and the promotion of a row into an ordinary
//! event. Inserting a row (with its cap) is the writer's job ([`super::Store::insert_quarantine`]);
//! deciding whether a held request verifies is not SQL and lives with the command.
//!
//! Held rows are the ones with `promoted_at_ms IS NULL`; the partial index `quarantine_pending`
//! covers exactly those, so listing and counting what is held stays cheap however many promoted
//! rows accumulate.

use serde::Serialize;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::writer::{Job, NewCallback, Promotion, PromotionResult, PurgeFilter, Purged};
use super::{Store, StoreError};

/// One quarantined request, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuarantinedRequest {
    /// Row id (stable; the order of arrival).
    pub id: i64,
    /// Arrival time (epoch ms).
    pub received_at_ms: i64,
    /// Peer address.
    pub remote_addr: Option<String>,
    /// Why verification failed on arrival (`signature_mismatch`, ...).
    pub reason: String,
    /// The signature-relevant headers as a JSON object (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`, `content-type`, when present).
    pub headers_json: String,
    /// The exact body. Not valid UTF-8 or JSON necessarily: it is untrusted.
    #[serde(skip)]
    pub raw_body: Vec<u8>,
    /// Hex SHA-256 of the body.
    pub body_sha256: String,
    /// The event's sequence number once promoted.
    pub promoted_seq: Option<i64>,
    /// When it was promoted (epoch ms).
    pub promoted_at_ms: Option<i64>,
}

impl QuarantinedRequest {
    /// Still held: not promoted.
    pub fn is_held(&self) -> bool {
        self.promoted_at_ms.is_none()
    }

    fn from_row(row: &SqliteRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            received_at_ms: row.try_get("received_at_ms")?,
            remote_addr: row.try_get("remote_addr")?,
            reason: row.try_get("reason")?,
            headers_json: row.try_get("headers_json")?,
            raw_body: row.try_get("raw_body")?,
            body_sha256: row.try_get("body_sha256")?,
            promoted_seq: row.try_get("promoted_seq")?,
            promoted_at_ms: row.try_get("promoted_at_ms")?,
        })
    }
}

const QUARANTINE_COLUMNS: &str =
    "id, received_at_ms, remote_addr, reason, headers_json, raw_body, body_sha256, promoted_seq, promoted_at_ms";

impl Store {
    /// A page of quarantined requests in id order, after `after_id`; held ones only unless
    /// `include_promoted`. Bodies are up to `--max-body-bytes` each, so callers page rather than
    /// load the whole quarantine at once.
    pub async fn list_quarantine(
        &self,
        after_id: i64,
        limit: i64,
        include_promoted: bool,
    ) -> Result<Vec<QuarantinedRequest>, StoreError> {
        // Two literal statements rather than one with an OR, so the held-only one can use the
        // partial index (the planner only picks it when the WHERE clause repeats its condition).
        let sql = if include_promoted {
            format!("SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id > ?1 ORDER BY id LIMIT ?2")
        } else {
            format!(
                "SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id > ?1 AND promoted_at_ms IS NULL ORDER BY id LIMIT ?2"
            )
        };
        let rows = sqlx::query(&sql).bind(after_id).bind(limit).fetch_all(self.read_pool()).await?;
        Ok(rows.iter().map(QuarantinedRequest::from_row).collect::<Result<_, _>>()?)
    }

    /// How many requests are held (not promoted). A count over the partial index
    /// `quarantine_pending`, bounded by `--quarantine-cap`; cheap enough for `/readyz`.
    pub async fn count_quarantine_held(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(COUNT_HELD).fetch_one(self.read_pool()).await?)
    }

    /// Stores a quarantined request that now verifies as an ordinary event and marks its row
    /// promoted (`promoted_seq`, `promoted_at_ms`), in ONE transaction: a crash leaves either both
    /// or neither. The event goes through the same batched insert as [`Store::insert_callback`],
    /// so it is deduplicated atomically: if the event was already stored (delivered again,
    /// correctly signed), this counts as one more delivery and the row points at that event.
    pub async fn mark_quarantine_promoted(
        &self,
        quarantine_id: i64,
        callback: NewCallback,
    ) -> Result<PromotionResult, StoreError> {
        self.submit(|tx| Job::Promote(Box::new(Promotion { quarantine_id, callback }), tx)).await
    }
}

pub(super) const COUNT_HELD: &str = "SELECT count(*) FROM quarantine WHERE promoted_at_ms IS NULL";

/// The held rows a [`PurgeFilter`] picks (`?1` received before, `?2` a JSON array of ids, `?3`
/// reason; NULL: any), for the two statements below.
macro_rules! purge_where {
    () => {
        "promoted_at_ms IS NULL AND (?1 IS NULL OR received_at_ms < ?1)
         AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2))) AND (?3 IS NULL OR reason = ?3)"
    };
}

/// Deletes what a purge picks, one body size per row deleted (run by the writer).
pub(super) const PURGE_HELD: &str =
    concat!("DELETE FROM quarantine WHERE ", purge_where!(), " RETURNING length(raw_body)");

/// What a purge would delete, without deleting it.
const PURGE_PREVIEW: &str = concat!("SELECT length(raw_body) FROM quarantine WHERE ", purge_where!());

/// `sql` (one of the two above) with `filter` bound.
pub(super) fn purge_query<'q>(
    sql: &'q str,
    filter: &'q PurgeFilter,
) -> sqlx::query::QueryScalar<'q, sqlx::Sqlite, i64, sqlx::sqlite::SqliteArguments<'q>> {
    let ids = (!filter.ids.is_empty()).then(|| serde_json::json!(filter.ids).to_string());
    sqlx::query_scalar(sql).bind(filter.received_before_ms).bind(ids).bind(filter.reason.as_deref())
}

impl Store {
    /// Deletes the held (never promoted) requests `filter` picks: requests that will never verify
    /// (junk from an unknown sender, a secret that is lost) would otherwise stay, count against
    /// `--quarantine-cap`, and keep `reverify` reporting them. Promoted rows are kept: they record
    /// where an event came from. Safe while the service runs (through this store's writer).
    pub async fn purge_quarantine(&self, filter: PurgeFilter) -> Result<Purged, StoreError> {
        self.submit(|tx| Job::Purge(filter, tx)).await
    }

    /// What [`Store::purge_quarantine`] would delete, read without deleting.
    pub async fn preview_quarantine_purge(&self, filter: &PurgeFilter) -> Result<Purged, StoreError> {
        let sizes = purge_query(PURGE_PREVIEW, filter).fetch_all(self.read_pool()).await?;
        Ok(Purged::from_sizes(&sizes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{QuarantineEntry, StoreOptions, open_test_store, test_callback};

    fn body(msg_id: &str, secret: &str) -> String {
        let call_id = format!("demo-org#demo-app_{msg_id}");
        let ts = "1700000000000";
        let security = crate::signature::easemob::sign(&call_id, secret, ts);
        format!(
            r#"{{"chat_type":"roster","callId":"{call_id}","security":"{security}","payload":{{"operation":"add"}},"appkey":"demo-org#demo-app","from":"alice","to":"bob","eventType":"chat","msg_id":"{msg_id}","timestamp":{ts}}}"#
        )
    }

    async fn hold(store: &Store, body: &str, received_at_ms: i64) -> i64 {
        let entry = QuarantineEntry {
            received_at_ms,
            remote_addr: Some("127.0.0.1:1".into()),
            reason: "signature_mismatch",
            headers_json: "{}".into(),
            raw_body: body.as_bytes().to_vec(),
        };
        store.insert_quarantine(entry).await.expect("insert").expect("below the cap")
    }

    #[tokio::test]
    async fn promotion_stores_the_event_and_marks_the_row_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = open_test_store(&dir).await;
        let b = body("1", "s");
        let id = hold(&store, &b, 1_000).await;
        assert_eq!(store.count_quarantine_held().await.expect("count"), 1);

        let first = store.mark_quarantine_promoted(id, test_callback(&b, 1_000)).await.expect("promote");
        let PromotionResult::Promoted(ack) = first else { panic!("not promoted: {first:?}") };
        assert!(!ack.duplicate);
        let again = store.mark_quarantine_promoted(id, test_callback(&b, 1_000)).await.expect("promote again");
        assert_eq!(again, PromotionResult::AlreadyPromoted, "a row is promoted once");

        assert_eq!(store.count_quarantine_held().await.expect("count"), 0);
        assert!(store.list_quarantine(0, 10, false).await.expect("list").is_empty());
        let all = store.list_quarantine(0, 10, true).await.expect("list all");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].promoted_seq, Some(ack.seq));
        assert!(all[0].promoted_at_ms.is_some());
        assert_eq!(all[0].raw_body, b.as_bytes());
        let stored = store.get_callback(ack.seq).await.expect("get").expect("stored");
        assert_eq!(stored.raw_body, b);
        assert_eq!(stored.item.deliveries, 1, "the refused second promotion added no delivery");
        store.close().await;
    }

    #[tokio::test]
    async fn promoting_an_event_already_stored_is_a_duplicate_pointing_at_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = open_test_store(&dir).await;
        let b = body("2", "s");
        let id = hold(&store, &b, 1_000).await;
        let direct = store.insert_callback(test_callback(&b, 2_000)).await.expect("insert");

        let promoted = store.mark_quarantine_promoted(id, test_callback(&b, 1_000)).await.expect("promote");
        assert_eq!(promoted, PromotionResult::Promoted(crate::store::CallbackAck { seq: direct.seq, duplicate: true }));
        assert_eq!(store.count_callbacks().await.expect("count"), 1);
        let all = store.list_quarantine(0, 10, true).await.expect("list");
        assert_eq!(all[0].promoted_seq, Some(direct.seq));
        store.close().await;
    }

    #[tokio::test]
    async fn counting_held_requests_uses_the_partial_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = open_test_store(&dir).await;
        let plan = crate::store::query_plan(&store, COUNT_HELD).await;
        assert!(plan.iter().any(|d| d.contains("quarantine_pending")), "{plan:?}");
        store.close().await;
    }

    #[tokio::test]
    async fn a_second_process_promoting_while_the_service_writes_keeps_one_chain() {
        // Two stores on one file stand for the service and `quarantine reverify`: each has its
        // own writer, and each must see the other's commits before numbering its own.
        let dir = tempfile::tempdir().expect("tempdir");
        let (service, url) = open_test_store(&dir).await;
        let mut opts = StoreOptions::new(url);
        opts.recover_interrupted_calls = false;
        let cli = Store::open(opts, crate::clock::system()).await.expect("second store");

        let held = hold(&service, &body("10", "s"), 1_000).await;
        service.insert_callback(test_callback(&body("11", "s"), 2_000)).await.expect("service 1");
        let promoted = cli.mark_quarantine_promoted(held, test_callback(&body("10", "s"), 1_000)).await.expect("cli");
        let after = service.insert_callback(test_callback(&body("12", "s"), 3_000)).await.expect("service 2");
        let PromotionResult::Promoted(p) = promoted else { panic!("not promoted") };
        assert_eq!((p.seq, after.seq), (2, 3), "the service numbers after the other process's event");
        cli.close().await;

        let verdict = crate::commands::audit::verify(&service).await.expect("verify");
        assert!(matches!(verdict, crate::commands::audit::Verdict::Intact { records: 3, .. }), "{verdict:?}");
        service.close().await;
    }
}
