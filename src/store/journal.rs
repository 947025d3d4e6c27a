//! Reads over the journal (everything with a `seq`): the feed, the audit chain, the chain head,
//! and the rows reconciliation needs.

use std::collections::HashMap;
use std::marker::PhantomData;

use compact_str::CompactString;
use serde::Serialize;
use serde::de::{DeserializeOwned, Deserializer as _, SeqAccess, Visitor};
use sqlx::Row;

use super::chain::{self, CallContent, CallbackContent};
use super::writer::ChainHead;
use super::{Store, StoreError};
use crate::model::{CallOp, Outcome};
use crate::reconcile::{CallRow, CallbackRow};

/// The triggers the migrations create to keep calls and callbacks append-only (a record written
/// once, an outcome and a chain link set once, nothing deleted), and promotions from quarantine
/// (written once, never removed).
pub const APPEND_ONLY_TRIGGERS: [&str; 10] = [
    "callbacks_no_delete",
    "callbacks_immutable",
    "callbacks_chain_once",
    "callback_deliveries_no_delete",
    "calls_no_delete",
    "calls_immutable",
    "calls_outcome_once",
    "calls_sent_once",
    "quarantine_promotion_once",
    "quarantine_promoted_no_delete",
];

/// The migrations, in order: the append-only triggers are checked against the definitions
/// they hold (a test keeps this list in step with the directory).
const MIGRATIONS: [&str; 10] = [
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_callback_users.sql"),
    include_str!("../../migrations/0003_writer_probe_ballast.sql"),
    include_str!("../../migrations/0004_roster_reconcile_index.sql"),
    include_str!("../../migrations/0005_callback_users_lower_case.sql"),
    include_str!("../../migrations/0006_calls_by_completion.sql"),
    include_str!("../../migrations/0007_call_outcome_detail.sql"),
    include_str!("../../migrations/0008_call_head_at_intent.sql"),
    include_str!("../../migrations/0009_quarantine_promotions_kept.sql"),
    include_str!("../../migrations/0010_call_sent_mark.sql"),
];

/// The trigger `name` as the last migration that creates it defines it, as SQLite keeps it
/// (from `CREATE` to `END`, without the semicolon).
fn migrated_trigger(name: &str) -> Option<String> {
    let start = format!("CREATE TRIGGER {name} ");
    MIGRATIONS.iter().rev().find_map(|text| {
        let from = text.find(&start)?;
        let len = text[from..].find("END;")? + "END".len();
        Some(text[from..from + len].to_string())
    })
}

/// Every index the migrations leave, by name, with its definition as SQLite keeps it (from
/// `CREATE INDEX` to the statement's end, without the semicolon); one a later migration drops is
/// not among them. Comments are cut first: a migration explains an index in `--` lines, which are
/// not part of it.
fn migrated_indexes() -> Vec<(String, String)> {
    let mut indexes: Vec<(String, String)> = Vec::new();
    for text in MIGRATIONS {
        let code: String =
            text.lines().map(|line| line.split("--").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        // Trigger bodies hold semicolons too; the pieces they leave start with neither keyword.
        for statement in code.split(';').map(str::trim) {
            let words: Vec<&str> = statement.split_whitespace().take(3).collect();
            match words.as_slice() {
                ["CREATE", "INDEX", name] => {
                    indexes.retain(|(n, _)| n != name);
                    indexes.push(((*name).to_string(), statement.to_string()));
                }
                ["DROP", "INDEX", name] => indexes.retain(|(n, _)| n != name),
                _ => {}
            }
        }
    }
    indexes
}

/// SQL with each run of whitespace made one space, for comparing definitions.
fn squeeze(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The triggers of [`Store::schema_unlike_migrations`], from the schema's `objects` (type, name, SQL).
fn guards_unlike_migrations(objects: &[(String, String, Option<String>)]) -> Vec<String> {
    let present: Vec<(&str, Option<&str>)> =
        objects.iter().filter(|(kind, ..)| kind == "trigger").map(|(_, n, sql)| (n.as_str(), sql.as_deref())).collect();
    let missing = APPEND_ONLY_TRIGGERS.iter().filter(|name| !present.iter().any(|(p, _)| p == *name));
    let mut problems: Vec<String> = missing.map(|name| (*name).to_string()).collect();
    // Every trigger there is, not only the guards: one added by hand (`BEFORE INSERT ... RAISE
    // (IGNORE)`) can make callbacks vanish as surely as a dropped guard lets them be deleted.
    for (name, sql) in &present {
        match migrated_trigger(name) {
            None => problems.push(format!("{name} (not friendhook's)")),
            Some(migrated) if sql.map(squeeze) != Some(squeeze(&migrated)) => {
                problems.push(format!("{name} (altered)"));
            }
            Some(_) => {}
        }
    }
    problems
}

/// The indexes of [`Store::schema_unlike_migrations`], from the schema's `objects` (type, name, SQL).
fn indexes_unlike_migrations(objects: &[(String, String, Option<String>)]) -> Vec<(String, String)> {
    let present: Vec<(&str, &str)> = objects
        .iter()
        .filter(|(kind, ..)| kind == "index")
        .filter_map(|(_, n, sql)| Some((n.as_str(), sql.as_deref()?)))
        .collect();
    let migrated = migrated_indexes();
    let mut problems = Vec::new();
    for (name, sql) in &migrated {
        // On one line, to be pasted into a shell (no index of ours has a literal with a run of
        // spaces in it).
        let sql = squeeze(sql);
        match present.iter().find(|(p, _)| p == name) {
            None => problems.push((format!("{name} (missing)"), format!("{sql};"))),
            Some((_, have)) if squeeze(have) != sql => {
                problems.push((format!("{name} (altered)"), format!("DROP INDEX {name}; {sql};")));
            }
            Some(_) => {}
        }
    }
    let added = present.iter().filter(|(p, _)| !migrated.iter().any(|(m, _)| m == p));
    for (name, _) in added.filter(|(_, sql)| squeeze(sql).to_ascii_uppercase().starts_with("CREATE UNIQUE ")) {
        // A name of other characters than SQL's plain ones is bracketed, which SQLite takes and
        // a shell leaves alone inside the double quotes the verdict puts the SQL in.
        let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let quoted = if plain { (*name).to_string() } else { format!("[{name}]") };
        problems.push((format!("{name} (not friendhook's)"), format!("DROP INDEX {quoted};")));
    }
    problems
}

/// One normalised feed record.
///
/// Every key is always present (`null` when it does not apply), so consumers see one schema.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FeedRecord {
    /// Journal position.
    pub seq: i64,
    /// `call` or `callback`.
    pub kind: String,
    /// Call: owner. Callback: normalised `from`.
    pub owner: Option<String>,
    /// Call: friend. Callback: normalised `to`.
    pub friend: Option<String>,
    /// Call: add/remove. Callback: payload.operation.
    pub operation: Option<String>,
    /// Call: its outcome (calls enter the feed once it is final).
    pub outcome: Option<String>,
    /// Callback: its chat_type (`roster` for friend events).
    pub chat_type: Option<String>,
    /// Call: when it was requested. Callback: the event's own timestamp. Epoch ms.
    pub event_time: i64,
    /// Call: when the outcome was recorded. Callback: when friendhook stored it. Epoch ms.
    pub received_time: i64,
    /// Call id or callback callId.
    pub id: String,
    /// Callback: msg_id.
    pub msg_id: Option<String>,
    /// Call: Easemob's HTTP status.
    pub upstream_status: Option<i64>,
    /// Call: Easemob's error type.
    pub upstream_error: Option<String>,
    /// Call: why it did not succeed, in a sentence (`null` for a success, a callback, and calls
    /// recorded before schema 7).
    pub outcome_detail: Option<String>,
}

/// Every roster add/remove callback stored up to seq `?4` ([`JournalPoint`]), one page of 100,000
/// by id (`?3`: after this id; `?1 < ?2` only binds the window parameters the paging reader always
/// passes).
///
/// Read through the narrow partial index of migration 0004 rather than the table, so a cold
/// database reads tens of megabytes instead of every raw body. `INDEXED BY` makes a plan without
/// it an error instead of a silent table scan; its WHERE terms are repeated verbatim here, which
/// is how SQLite knows the index covers this query.
const ROSTER_CALLBACKS_ALL: &str = "\
SELECT count(*), max(id), json_group_array(json_array(seq, operation, from_user, to_user, timestamp_ms,
       received_at_ms)) FROM (
  SELECT id, seq, operation, from_user, to_user, timestamp_ms, received_at_ms
  FROM callbacks INDEXED BY callbacks_roster_by_id
  WHERE chat_type = 'roster' AND operation IN ('add', 'remove') AND seq IS NOT NULL
    AND id > ?3 AND ?1 < ?2 AND seq <= ?4
  ORDER BY id LIMIT 100000)";

/// Roster add/remove callbacks with `?1 <= timestamp_ms < ?2` (and id after `?3`, seq up to `?4`),
/// in one query
/// through the time index. `+` keeps the planner off the operation and roster indexes (each a
/// walk over every `add`).
const ROSTER_CALLBACKS_IN_WINDOW: &str = "\
SELECT count(*), max(id), json_group_array(json_array(seq, operation, from_user, to_user, timestamp_ms,
       received_at_ms)) FROM (
  SELECT id, seq, operation, from_user, to_user, timestamp_ms, received_at_ms FROM callbacks
  WHERE +chat_type = 'roster' AND +operation IN ('add', 'remove') AND +seq IS NOT NULL
    AND timestamp_ms >= ?1 AND timestamp_ms < ?2 AND id > ?3 AND +seq <= ?4)";

/// Rows per page of [`ROSTER_CALLBACKS_PAGE_BY_TIME`] (its LIMIT): small, because a reader of
/// it keeps few of them and the page is what it holds besides.
const KEPT_PAGE_ROWS: i64 = 10_000;

/// Roster add/remove callbacks with `?1 <= timestamp_ms < ?2` and seq up to `?5`, one page of
/// 10,000 in (timestamp, id) order after (`?3`, `?4`), through the time index (no sort: the index holds
/// the id too). For readers that keep only some rows of a large window.
const ROSTER_CALLBACKS_PAGE_BY_TIME: &str = "\
SELECT count(*), json_group_array(json_array(seq, operation, from_user, to_user, timestamp_ms,
       received_at_ms, id)) FROM (
  SELECT id, seq, operation, from_user, to_user, timestamp_ms, received_at_ms FROM callbacks
  WHERE +chat_type = 'roster' AND +operation IN ('add', 'remove') AND +seq IS NOT NULL
    AND timestamp_ms >= ?1 AND timestamp_ms < ?2 AND timestamp_ms >= ?3 AND (timestamp_ms > ?3 OR id > ?4)
    AND +seq <= ?5
  ORDER BY timestamp_ms, id LIMIT 10000)";

/// One page of the feed as NDJSON, rendered by SQLite itself: one text value per page instead of
/// one row per record keeps sqlx's per-row cost off the export path. Both halves walk their
/// `seq` index (`+` on the time columns keeps the planner from scanning by time and sorting).
/// Each half picks up to a page of (seq, id); only the page's records, once merged, are rendered
/// (rendering both halves' candidates rendered up to twice the page and threw half away).
///
/// The fourth column is the journal's head in the same snapshot: a page shorter than the limit
/// holds every matching record up to it, so a filtered reader resumes from there instead of
/// walking the same non-matching records again.
const FEED_PAGE: &str = "\
SELECT count(*), max(seq), group_concat(line, char(10) ORDER BY seq),
       max(coalesce((SELECT max(seq) FROM callbacks), 0), coalesce((SELECT max(seq) FROM calls), 0)) FROM (
  SELECT seq, CASE WHEN is_call THEN (
      SELECT json_object('seq', seq, 'kind', 'call', 'owner', owner, 'friend', friend, 'operation', op,
             'outcome', outcome, 'chat_type', NULL, 'event_time', requested_at_ms,
             'received_time', completed_at_ms, 'id', CAST(id AS TEXT), 'msg_id', NULL,
             'upstream_status', upstream_status, 'upstream_error', upstream_error,
             'outcome_detail', outcome_detail)
      FROM calls WHERE id = page.id)
    ELSE (
      SELECT json_object('seq', seq, 'kind', 'callback', 'owner', from_user, 'friend', to_user,
             'operation', operation, 'outcome', NULL, 'chat_type', chat_type, 'event_time', timestamp_ms,
             'received_time', received_at_ms, 'id', call_id, 'msg_id', msg_id,
             'upstream_status', NULL, 'upstream_error', NULL, 'outcome_detail', NULL)
      FROM callbacks WHERE id = page.id) END AS line
  FROM (
    SELECT seq, is_call, id FROM (
      SELECT seq, 1 AS is_call, id FROM calls
      WHERE seq > ?1 AND +requested_at_ms >= ?3 AND +requested_at_ms < ?4 ORDER BY seq LIMIT ?2)
    UNION ALL
    SELECT seq, is_call, id FROM (
      SELECT seq, 0 AS is_call, id FROM callbacks
      WHERE seq > ?1 AND +timestamp_ms >= ?3 AND +timestamp_ms < ?4 ORDER BY seq LIMIT ?2)
    ORDER BY seq LIMIT ?2) AS page)";

/// A page of the feed: NDJSON lines (no trailing newline) and where to resume.
#[derive(Debug, Clone, Default)]
pub struct FeedPage {
    /// Records in the page.
    pub count: i64,
    /// Seq of the last record.
    pub last_seq: Option<i64>,
    /// The records, one JSON object per line.
    pub ndjson: String,
    /// The journal's last seq when the page was read.
    pub head_seq: i64,
    /// Whether the page holds every matching record up to `head_seq` (it was not cut at the
    /// limit).
    pub complete: bool,
    /// Seqs between `after` and the page's last record that no record has, in a page not
    /// filtered by event time. Seqs are handed out without gaps and records are never deleted
    /// through friendhook, so anything but 0 means records were removed from the file behind its
    /// back (`audit verify` names the first).
    pub missing: i64,
}

/// What a reader is told when its cursor's seq has no record although the journal goes on past
/// it: the record was removed behind friendhook's back, which is not the "another database" a
/// link that differs means.
pub fn removed_cursor_note(seq: i64, head: i64) -> String {
    format!(
        "there is no record at seq {seq}, although this journal goes on to seq {head}: it was removed from the \
         database outside friendhook (seqs are handed out without gaps, and friendhook deletes none), so nothing can \
         vouch that the records after it are the ones that followed it. Keep the file as it is and run `friendhook \
         audit verify` on it, which names what was removed"
    )
}

impl FeedPage {
    /// What a reader is told of [`FeedPage::missing`]; `None` when nothing is missing.
    pub fn missing_note(&self, after: i64) -> Option<String> {
        let last = self.last_seq.filter(|_| self.missing > 0)?;
        Some(format!(
            "the journal lacks {} record(s) between seq {} and {last}: records were removed from the database \
             outside friendhook (seqs are handed out without gaps, and friendhook deletes none); the feed goes on \
             without them. Keep the file as it is and run `friendhook audit verify` on it, which names the first",
            self.missing,
            after + 1
        ))
    }

    /// The seq to read the next page after: the page's last record if it was cut at the limit,
    /// else the head it was read at (or `after`, if that is further), since nothing up to the
    /// head is left to match. With a time filter that matches little, this is what keeps a
    /// reader from walking the same records on every page.
    pub fn resume_after(&self, after: i64) -> i64 {
        match (self.complete, self.last_seq) {
            (false, Some(last)) => last,
            _ => self.head_seq.max(after),
        }
    }
}

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
    /// Why the row could not be decoded (its other fields are then empty).
    pub unreadable: Option<String>,
}

impl ChainRecord {
    /// A row whose columns could not be read as friendhook wrote them. Its seq, if even that is
    /// unreadable, is taken as `i64::MIN`, so the walk meets it first.
    fn unreadable(row: &sqlx::sqlite::SqliteRow, kind: &'static str, error: &sqlx::Error) -> Self {
        Self {
            seq: row.try_get("seq").unwrap_or(i64::MIN),
            kind,
            id: row.try_get("id").unwrap_or_default(),
            prev_hash: String::new(),
            chain_hash: String::new(),
            recomputed: String::new(),
            body_digest_ok: false,
            unreadable: Some(error.to_string()),
        }
    }
}

fn callback_chain_record(r: &sqlx::sqlite::SqliteRow) -> Result<ChainRecord, sqlx::Error> {
    let prev: String = r.try_get::<Option<String>, _>("prev_hash")?.unwrap_or_default();
    // The bytes as stored: a body edited to something that is not UTF-8 is still hashed, and
    // fails its digest like any other edit.
    let raw: Vec<u8> = r.try_get_unchecked("raw_body")?;
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
    Ok(ChainRecord {
        seq: content.seq,
        kind: "callback",
        id: r.try_get("id")?,
        recomputed: chain::link(&prev, &content.canonical()),
        prev_hash: prev,
        chain_hash: r.try_get::<Option<String>, _>("chain_hash")?.unwrap_or_default(),
        body_digest_ok: chain::sha256_hex(&raw) == body_sha,
        unreadable: None,
    })
}

/// Column `column` of `r`, refused when NULL (sqlx reads an SQLite NULL as 0 or "" otherwise).
fn not_null<'r, T>(r: &'r sqlx::sqlite::SqliteRow, column: &str) -> Result<T, sqlx::Error>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    r.try_get::<Option<T>, _>(column)?.ok_or_else(|| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: "NULL where friendhook always writes a value".into(),
    })
}

fn call_chain_record(r: &sqlx::sqlite::SqliteRow) -> Result<ChainRecord, sqlx::Error> {
    let prev: String = r.try_get::<Option<String>, _>("prev_hash")?.unwrap_or_default();
    let content = CallContent {
        seq: r.try_get("seq")?,
        id: r.try_get("id")?,
        op: r.try_get("op")?,
        owner: r.try_get("owner")?,
        friend: r.try_get("friend")?,
        idempotency_key: r.try_get("idempotency_key")?,
        requested_at_ms: r.try_get("requested_at_ms")?,
        // A chained call always has these (friendhook writes them with its link): a NULL is an
        // edit, and is named as one rather than hashed like the 0 or "" it would be read as
        // (`attempts` NULL and 0 would otherwise carry the same link).
        completed_at_ms: not_null(r, "completed_at_ms")?,
        outcome: not_null(r, "outcome")?,
        upstream_status: r.try_get("upstream_status")?,
        upstream_error: r.try_get("upstream_error")?,
        attempts: not_null(r, "attempts")?,
        response_body: r.try_get("response_body")?,
        outcome_detail: r.try_get("outcome_detail")?,
    };
    Ok(ChainRecord {
        seq: content.seq,
        kind: "call",
        id: content.id,
        recomputed: chain::link(&prev, &content.canonical()),
        prev_hash: prev,
        chain_hash: r.try_get::<Option<String>, _>("chain_hash")?.unwrap_or_default(),
        body_digest_ok: true,
        unreadable: None,
    })
}

/// What a call's outcome recorded besides the outcome itself ([`Store::call_outcome_details`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeDetails {
    /// Easemob's HTTP status, when it answered.
    pub upstream_status: Option<i64>,
    /// Easemob's error type (`exceed_limit`, ...).
    pub upstream_error: Option<String>,
    /// Why the call ended so, in friendhook's words, when it did not succeed.
    pub outcome_detail: Option<String>,
}

/// A point in the journal: everything a reconciliation may see.
///
/// A report reads calls and callbacks one after the other (and page by page, and its pages are
/// separate requests), while the service goes on storing both. Reads that stop at one point all
/// see the same history, so the report neither pairs a callback with a call whose outcome it
/// has not seen yet nor changes between its pages, and the same point gives the same report
/// later: calls and callbacks are append-only, and an outcome is recorded once, with the seq it
/// is chained under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalPoint {
    /// Events and outcomes with a seq up to this one are seen.
    pub seq: i64,
    /// Calls up to this id are seen (an intent has no seq until its outcome is recorded: such
    /// a call is seen in flight).
    pub last_call_id: i64,
}

/// See [`Store::user_index_mismatches`]: the entries the events up to the indexed seq make (as
/// the writer's `INDEX_USERS` makes them), against the table, both ways, in one snapshot.
const USER_INDEX_MISMATCHES: &str = "\
WITH upto AS (SELECT coalesce((SELECT upto_seq FROM callback_users_progress), 0) AS seq),
expected AS (
  SELECT 0 AS role, seq >> 16 AS bucket, lower(from_user) AS user_id, seq FROM callbacks
  WHERE seq IS NOT NULL AND seq <= (SELECT seq FROM upto) AND from_user IS NOT NULL
  UNION ALL
  SELECT 1, seq >> 16, lower(to_user), seq FROM callbacks
  WHERE seq IS NOT NULL AND seq <= (SELECT seq FROM upto) AND to_user IS NOT NULL),
indexed AS (SELECT role, bucket, user_id, seq FROM callback_users WHERE seq <= (SELECT seq FROM upto))
SELECT (SELECT count(*) FROM (SELECT * FROM expected EXCEPT SELECT * FROM indexed)),
       (SELECT count(*) FROM (SELECT * FROM indexed EXCEPT SELECT * FROM expected))";

/// The current [`JournalPoint`], in one statement (one snapshot).
const JOURNAL_POINT: &str = "\
SELECT max(coalesce((SELECT max(seq) FROM callbacks), 0), coalesce((SELECT max(seq) FROM calls), 0)),
       coalesce((SELECT max(id) FROM calls), 0)";

/// What the journal says about the point an `as_of` names (see `report::AsOf::check`), read in
/// one statement: where the journal stands, the lowest seq of a call created after the point's
/// last call, when the record at the point's seq was stored, and when its last call was
/// requested and where the journal stood then.
const POINT_FACTS: &str = "\
SELECT max(coalesce((SELECT max(seq) FROM callbacks), 0), coalesce((SELECT max(seq) FROM calls), 0)),
       coalesce((SELECT max(id) FROM calls), 0),
       (SELECT min(seq) FROM calls WHERE id > ?2),
       coalesce((SELECT received_at_ms FROM callbacks WHERE seq = ?1), (SELECT completed_at_ms FROM calls WHERE seq = ?1)),
       (SELECT requested_at_ms FROM calls WHERE id = ?2),
       (SELECT head_seq_at_intent FROM calls WHERE id = ?2)";

/// See [`Store::point_facts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointFacts {
    /// Where the journal stands now.
    pub head: JournalPoint,
    /// The lowest seq among calls with an id above the point's last call (`None`: no such call
    /// has an outcome yet).
    pub first_seq_of_later_calls: Option<i64>,
    /// When the record with the point's seq was stored (`None` for seq 0).
    pub stored_at_ms: Option<i64>,
    /// When the point's last call was requested (`None` for call 0).
    pub last_call_requested_at_ms: Option<i64>,
    /// The journal's seq when the point's last call was recorded (`None` for call 0 and for
    /// calls recorded before schema 8).
    pub last_call_head_seq: Option<i64>,
}

/// The highest seq the file refers to beyond `head` (the last stored record's), with what refers
/// to it, from the references that can be read without a table scan: the lookup by user's
/// progress and its newest bucket, promoted quarantined callbacks, and the journal head the
/// newest call saw at its intent (a call's intent sees a head no lower than any earlier call's).
/// Read when a writer opens the file, so that records removed from the journal's end are not
/// silently replaced by new ones with their seqs; `audit verify` reads every reference
/// ([`Store::references_past_head`]).
pub(super) async fn references_past_head_at_start(
    conn: &mut sqlx::SqliteConnection,
    head: i64,
) -> Result<Option<(&'static str, i64)>, StoreError> {
    type Seqs = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);
    let (progress, entries, promoted, intent): Seqs = sqlx::query_as(
        "SELECT (SELECT upto_seq FROM callback_users_progress),
                (SELECT max(seq) FROM callback_users
                  WHERE (role, bucket) IN (SELECT 0, max(bucket) FROM callback_users WHERE role = 0
                                           UNION ALL SELECT 1, max(bucket) FROM callback_users WHERE role = 1)),
                (SELECT max(promoted_seq) FROM quarantine WHERE promoted_as_new = 1),
                (SELECT head_seq_at_intent FROM calls ORDER BY id DESC LIMIT 1)",
    )
    .fetch_one(&mut *conn)
    .await?;
    let named = [
        ("the lookup by user's progress (callback_users_progress.upto_seq)", progress),
        ("an entry of the lookup by user (callback_users.seq)", entries),
        ("a callback promoted from quarantine (quarantine.promoted_seq)", promoted),
        ("the journal head the last call saw when it was requested (calls.head_seq_at_intent)", intent),
    ];
    Ok(named
        .into_iter()
        .filter_map(|(what, seq)| seq.filter(|seq| *seq > head).map(|seq| (what, seq)))
        .max_by_key(|(_, seq)| *seq))
}

impl Store {
    /// What the journal says about `point`, for checking that a given `as_of` is one a report
    /// could have had.
    pub async fn point_facts(&self, point: JournalPoint) -> Result<PointFacts, StoreError> {
        let (seq, last_call_id, first_seq_of_later_calls, stored_at_ms, last_call_requested_at_ms, last_call_head_seq) =
            sqlx::query_as(POINT_FACTS).bind(point.seq).bind(point.last_call_id).fetch_one(self.read_pool()).await?;
        Ok(PointFacts {
            head: JournalPoint { seq, last_call_id },
            first_seq_of_later_calls,
            stored_at_ms,
            last_call_requested_at_ms,
            last_call_head_seq,
        })
    }

    /// Where the journal stands now.
    pub async fn journal_point(&self) -> Result<JournalPoint, StoreError> {
        let (seq, last_call_id) = sqlx::query_as(JOURNAL_POINT).fetch_one(self.read_pool()).await?;
        Ok(JournalPoint { seq, last_call_id })
    }

    /// The chain link of the record with this seq ([`chain::GENESIS`] for 0); `None` if no
    /// record has it.
    pub async fn chain_hash_at(&self, seq: i64) -> Result<Option<String>, StoreError> {
        if seq == 0 {
            return Ok(Some(chain::GENESIS.to_string()));
        }
        Ok(sqlx::query_scalar(
            "SELECT chain_hash FROM callbacks WHERE seq = ?1 UNION ALL SELECT chain_hash FROM calls WHERE seq = ?1",
        )
        .bind(seq)
        .fetch_optional(self.read_pool())
        .await?
        .flatten())
    }

    /// One page of the feed after `after`, in seq order; `event_time` within [since, until).
    pub async fn feed_page(
        &self,
        after: i64,
        limit: i64,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<FeedPage, StoreError> {
        let row = sqlx::query(FEED_PAGE)
            .bind(after)
            .bind(limit)
            .bind(since_ms)
            .bind(until_ms)
            .fetch_one(self.read_pool())
            .await?;
        let count: i64 = row.try_get(0)?;
        let last_seq: Option<i64> = row.try_get(1)?;
        let unfiltered = since_ms == i64::MIN && until_ms == i64::MAX;
        let missing = match last_seq {
            Some(last) if unfiltered => (last.saturating_sub(after) - count).max(0),
            _ => 0,
        };
        Ok(FeedPage {
            count,
            last_seq,
            ndjson: row.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
            head_seq: row.try_get(3)?,
            complete: count < limit,
            missing,
        })
    }

    /// The chain link of the record at `seq` (the chain's start, [`chain::GENESIS`], at 0);
    /// `None` when no record has that seq. A feed reader keeps it with its cursor: the same
    /// seq with another link means another database, or an older copy of this one.
    pub async fn link_at(&self, seq: i64) -> Result<Option<String>, StoreError> {
        if seq == 0 {
            return Ok(Some(chain::GENESIS.to_string()));
        }
        Ok(sqlx::query_scalar(
            "SELECT chain_hash FROM callbacks WHERE seq = ?1 UNION ALL SELECT chain_hash FROM calls WHERE seq = ?1 LIMIT 1",
        )
        .bind(seq)
        .fetch_optional(self.read_pool())
        .await?)
    }

    /// The current chain head.
    pub async fn chain_head(&self) -> Result<ChainHead, StoreError> {
        let mut conn = self.read_pool().acquire().await?;
        super::reads::load_head(&mut conn).await
    }

    /// One page of chain records from seq `from` on (inclusive, so that a walk can start at
    /// `i64::MIN` and meet a row forged with that seq), with links recomputed from stored content.
    ///
    /// Both tables are read in one transaction: two separate reads on a live database could see
    /// two moments, a call with seq N+1 without the callback with seq N, and report a deleted
    /// record that is not. A row that cannot be decoded (a column edited to another type or to
    /// bytes that are not UTF-8) comes back as a record with `unreadable` set, so the walk names
    /// it instead of failing.
    pub async fn chain_page(&self, from: i64, limit: i64) -> Result<Vec<ChainRecord>, StoreError> {
        let mut snapshot = self.read_pool().begin().await?;
        let callbacks = sqlx::query(
            "SELECT id, seq, dedup_key, call_id, msg_id, appkey, event_type, chat_type, operation, from_user, to_user,
                    timestamp_ms, received_at_ms, scheme, secret_index, raw_body, body_sha256, prev_hash, chain_hash
             FROM callbacks WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(from)
        .bind(limit)
        .fetch_all(&mut *snapshot)
        .await?;
        let calls = sqlx::query(
            "SELECT id, seq, op, owner, friend, idempotency_key, requested_at_ms, completed_at_ms, outcome,
                    upstream_status, upstream_error, attempts, response_body, outcome_detail, prev_hash, chain_hash
             FROM calls WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(from)
        .bind(limit)
        .fetch_all(&mut *snapshot)
        .await?;
        snapshot.commit().await?;
        let mut out = Vec::with_capacity(callbacks.len() + calls.len());
        for r in &callbacks {
            out.push(callback_chain_record(r).unwrap_or_else(|e| ChainRecord::unreadable(r, "callback", &e)));
        }
        for r in &calls {
            out.push(call_chain_record(r).unwrap_or_else(|e| ChainRecord::unreadable(r, "call", &e)));
        }
        out.sort_by_key(|r| r.seq);
        // Cut after the page's last seq, never within it: a seq is unique in each table, but a
        // row forged into the other table with the same seq would sort after the real one, and
        // cut off here it would be skipped by the next page (from the last seq + 1) and never checked.
        if let Some(last) = out.get((limit as usize).saturating_sub(1)).map(|r| r.seq) {
            out.truncate(out.partition_point(|r| r.seq <= last));
        }
        Ok(out)
    }

    /// Records that should carry a chain link but do not (callbacks without seq, and calls with
    /// an outcome but no seq): how many, and the first of them (`callback id 7`).
    pub async fn unchained(&self) -> Result<(i64, Option<String>), StoreError> {
        const CALLBACKS: &str = "FROM callbacks WHERE seq IS NULL OR chain_hash IS NULL";
        const CALLS: &str = "FROM calls WHERE outcome IS NOT NULL AND (seq IS NULL OR chain_hash IS NULL)";
        let mut count = 0;
        let mut first = None;
        for (kind, from) in [("callback", CALLBACKS), ("call", CALLS)] {
            let (n, id): (i64, Option<i64>) =
                sqlx::query_as(&format!("SELECT count(*), min(id) {from}")).fetch_one(self.read_pool()).await?;
            count += n;
            if first.is_none() {
                first = id.map(|id| format!("{kind} id {id}"));
            }
        }
        Ok((count, first))
    }

    /// Calls without an outcome (in flight, or interrupted by a stop and not yet closed as
    /// `unknown` by the next start), in id order: their intents carry no chain link until the
    /// outcome is recorded. How many, and the first `limit` ids.
    pub async fn calls_without_outcome(&self, limit: i64) -> Result<(i64, Vec<i64>), StoreError> {
        self.calls_counted_and_listed("outcome IS NULL", None, limit).await
    }

    /// Calls closed as `unknown` (interrupted by a stop, closed by the next start), in id order:
    /// the chain vouches for the closing, not for the intent, which carried no link while in
    /// flight. How many, and the first `limit` ids.
    pub async fn calls_closed_unknown(&self, limit: i64) -> Result<(i64, Vec<i64>), StoreError> {
        self.calls_counted_and_listed("outcome = 'unknown'", None, limit).await
    }

    /// Calls closed as `failed`, not sent, by a start (interrupted while they waited for their
    /// turn): like [`Store::calls_closed_unknown`], the chain vouches for the closing only.
    pub async fn calls_closed_not_sent(&self, limit: i64) -> Result<(i64, Vec<i64>), StoreError> {
        let condition = "outcome = 'failed' AND attempts = 0 AND outcome_detail = ?1";
        self.calls_counted_and_listed(condition, Some(super::writer::CLOSED_NOT_SENT_DETAIL), limit).await
    }

    /// How many calls match `condition` (a constant SQL condition; `?1` in it is `text`), and the
    /// first `limit` ids.
    async fn calls_counted_and_listed(
        &self,
        condition: &'static str,
        text: Option<&str>,
        limit: i64,
    ) -> Result<(i64, Vec<i64>), StoreError> {
        let count_sql = format!("SELECT count(*) FROM calls WHERE {condition}");
        let list_sql =
            format!("SELECT id FROM calls WHERE {condition} ORDER BY id LIMIT ?{}", 1 + text.is_some() as u8);
        let (mut count, mut list) = (sqlx::query_scalar(&count_sql), sqlx::query_scalar(&list_sql));
        if let Some(text) = text {
            (count, list) = (count.bind(text), list.bind(text));
        }
        let count: i64 = count.fetch_one(self.read_pool()).await?;
        let ids: Vec<i64> = list.bind(limit).fetch_all(self.read_pool()).await?;
        Ok((count, ids))
    }

    /// How far the lookup by user (`callback_users`, which answers `from`/`to` queries) is from
    /// what the events say, over the events it claims to cover (`callback_users_progress`):
    /// entries missing, and entries no event has. Not chained (it is derived from the events), so
    /// `audit verify` compares it with them instead.
    pub async fn user_index_mismatches(&self) -> Result<(i64, i64), StoreError> {
        Ok(sqlx::query_as(USER_INDEX_MISMATCHES).fetch_one(self.read_pool()).await?)
    }

    /// Promotions from quarantine that disagree with the event they name, as (quarantine id,
    /// promoted seq), at most `limit`, and how many there are: no callback at `promoted_seq`, or,
    /// for a promotion that stored its event (`promoted_as_new`), one with another body or
    /// arrival time than the held request's. The promotion is not chained, but reconciliation
    /// measures such an event's lateness to it: a row forged to name an event that was never held
    /// would move a call from late to on time. Reads every promoted row (verify reads everything).
    pub async fn promotions_unlike_their_event(
        &self,
        limit: i64,
    ) -> Result<(i64, Vec<(i64, Option<i64>)>), StoreError> {
        const UNLIKE: &str = "FROM quarantine q
            WHERE q.promoted_at_ms IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM callbacks c WHERE c.seq = q.promoted_seq
                  AND (q.promoted_as_new IS NOT 1
                       OR (c.body_sha256 = q.body_sha256 AND c.received_at_ms = q.received_at_ms)))";
        let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) {UNLIKE}")).fetch_one(self.read_pool()).await?;
        let first: Vec<(i64, Option<i64>)> =
            sqlx::query_as(&format!("SELECT q.id, q.promoted_seq {UNLIKE} ORDER BY q.id LIMIT ?1"))
                .bind(limit)
                .fetch_all(self.read_pool())
                .await?;
        Ok((count, first))
    }

    /// What SQLite's integrity check (PRAGMA integrity_check) finds wrong with the file, at most
    /// `max` problems; none when it answers `ok`. Beyond the pages' structure it compares every
    /// index with its table (row for row, a partial index with its condition) and checks the
    /// NOT NULL and CHECK constraints, which nothing else reads back. One read transaction over
    /// the whole file: on a live database the WAL cannot be reset meanwhile, only grow.
    pub async fn integrity_problems(&self, max: u32) -> Result<Vec<String>, StoreError> {
        let found: Vec<String> =
            sqlx::query_scalar(&format!("PRAGMA integrity_check({max})")).fetch_all(self.read_pool()).await?;
        Ok(if found.len() == 1 && found[0] == "ok" { Vec::new() } else { found })
    }

    /// Seqs the file still refers to beyond the last stored record, each as what refers to it:
    /// the lookup by user's progress, its entries, quarantined callbacks promoted into the
    /// journal, and the journal head each call saw at its intent. A chain that is consistent
    /// but shorter than these lost records from its end. Read in one statement, so a record
    /// stored meanwhile by a running service is counted in the head it is compared with.
    pub async fn references_past_head(&self) -> Result<Vec<(&'static str, i64)>, StoreError> {
        type Seqs = (Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<i64>);
        let (head, progress, entries, promoted, intents): Seqs = sqlx::query_as(
            "SELECT max(coalesce((SELECT max(seq) FROM callbacks), 0), coalesce((SELECT max(seq) FROM calls), 0)),
                        (SELECT max(upto_seq) FROM callback_users_progress),
                        (SELECT max(seq) FROM callback_users),
                        (SELECT max(promoted_seq) FROM quarantine),
                        (SELECT max(head_seq_at_intent) FROM calls)",
        )
        .fetch_one(self.read_pool())
        .await?;
        let head = head.unwrap_or(0);
        let named = [
            ("the lookup by user's progress (callback_users_progress.upto_seq)", progress),
            ("an entry of the lookup by user (callback_users.seq)", entries),
            ("a callback promoted from quarantine (quarantine.promoted_seq)", promoted),
            ("the journal head a call saw when it was requested (calls.head_seq_at_intent)", intents),
        ];
        Ok(named.into_iter().filter_map(|(what, seq)| seq.filter(|seq| *seq > head).map(|seq| (what, seq))).collect())
    }

    /// What of the schema differs from what the migrations leave, from one read of it:
    ///
    /// - the append-only triggers of the migrations that are missing from the database, then the
    ///   triggers defined otherwise than the migrations define them or not by them at all
    ///   (`calls_no_delete`, `calls_immutable (altered)`, `zz (not friendhook's)`): dropped,
    ///   redefined or added outside friendhook (a guard recreated with `WHEN 0` keeps its name and
    ///   guards nothing), rows can be deleted, rewritten or kept out without an error;
    /// - the indexes that differ from the ones the migrations leave: missing (`calls_by_owner
    ///   (missing)`), defined otherwise (`(altered)`) or unique ones added outside friendhook
    ///   (`(not friendhook's)`), each with the SQL that puts friendhook's back. An index someone
    ///   added for their own queries, not unique, changes no answer and refuses nothing: it is
    ///   theirs to keep. SQLite's own indexes of UNIQUE columns are part of their tables.
    pub async fn schema_unlike_migrations(&self) -> Result<(Vec<String>, Vec<(String, String)>), StoreError> {
        // Type, name and definition of the triggers and of the indexes defined by SQL (not
        // SQLite's own of UNIQUE columns), by name.
        let objects: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT type, name, sql FROM sqlite_master WHERE type = 'trigger' OR (type = 'index' AND sql IS NOT NULL)
             ORDER BY name",
        )
        .fetch_all(self.read_pool())
        .await?;
        Ok((guards_unlike_migrations(&objects), indexes_unlike_migrations(&objects)))
    }

    /// Calls requested in [since, until), and calls requested before `since` that were still
    /// running at `since` (completed at or after it, or not completed), for reconciliation, as
    /// they were at `at`: a later call is left out, a later outcome is not known yet (the call
    /// is in flight).
    ///
    /// The second kind matters to a window: a paced batch records all its intents at once and
    /// completes its last calls long after, so their callbacks fall in windows that begin after
    /// their request. Read without reading older calls (SQLite's multi-index OR): those that
    /// completed before `until` + 10 minutes through `calls_by_completed`, those that ran longer
    /// than 10 minutes through the partial index `calls_long_running` (its condition is
    /// repeated here word for word, or SQLite would not use it; see migration 0006), those
    /// still running through `calls_by_outcome`. A call that ran at most 10 minutes and was
    /// running at `since` completed before `since` + 10 minutes, so the three cover them all.
    pub async fn calls_for_reconcile(
        &self,
        since_ms: i64,
        until_ms: i64,
        at: JournalPoint,
    ) -> Result<Vec<CallRow>, StoreError> {
        // A bounded window is read through the time index in one go; everything is read in id
        // order, page by page (the planner cannot know which is cheaper, so say it).
        let sql = (
            "SELECT count(*), max(id), json_group_array(json_array(id, op, owner, friend, requested_at_ms,
                    completed_at_ms, outcome)) FROM (
               SELECT id, op, owner, friend, requested_at_ms,
                      CASE WHEN seq <= ?4 THEN completed_at_ms END AS completed_at_ms,
                      CASE WHEN seq <= ?4 THEN outcome END AS outcome FROM calls
               WHERE id > ?3 AND id <= ?5 AND ?1 < ?2 ORDER BY id LIMIT 100000)",
            "SELECT count(*), max(id), json_group_array(json_array(id, op, owner, friend, requested_at_ms,
                    completed_at_ms, outcome)) FROM (
               SELECT id, op, owner, friend, requested_at_ms,
                      CASE WHEN seq <= ?4 THEN completed_at_ms END AS completed_at_ms,
                      CASE WHEN seq <= ?4 THEN outcome END AS outcome FROM calls
               WHERE ((requested_at_ms >= ?1 AND requested_at_ms < ?2)
                      OR (requested_at_ms < ?1 AND completed_at_ms >= ?1 AND completed_at_ms < ?2 + 600000)
                      OR (completed_at_ms - requested_at_ms > 600000 AND requested_at_ms < ?1
                          AND completed_at_ms >= ?1)
                      OR (requested_at_ms < ?1 AND outcome IS NULL))
                 AND +id > ?3 AND +id <= ?5)",
        );
        // CompactString: user names of up to 24 bytes are decoded into the row itself, with no
        // allocation of their own (at a million rows a side, 5 million small allocations less).
        type Raw = (i64, CallOp, CompactString, CompactString, i64, Option<i64>, Option<Outcome>);
        let bounds = [at.seq, at.last_call_id];
        // Calls are numbered from 1 without gaps (append-only), so everything up to the point is
        // `last_call_id` rows: reserved at once instead of grown page by page.
        let expected = usize::try_from(at.last_call_id).unwrap_or(0);
        self.read_json_pages(sql, (since_ms, until_ms), &bounds, expected, "calls", |row: Raw| {
            let (id, op, owner, friend, requested_at_ms, completed_at_ms, outcome) = row;
            CallRow {
                id,
                op,
                owner,
                friend,
                requested_at_ms,
                completed_at_ms,
                outcome: outcome.unwrap_or(Outcome::InFlight),
            }
        })
        .await
    }

    /// Easemob's status and error type and friendhook's reason, by call id, for the calls `ids`
    /// whose outcome was recorded by `at` (a report's page shows them beside each verdict; a
    /// call with a later outcome was in flight as of `at` and has none). Read for one page of a
    /// report, not kept with it: a report over a million calls would hold them all.
    pub async fn call_outcome_details(
        &self,
        ids: &[i64],
        at: JournalPoint,
    ) -> Result<HashMap<i64, OutcomeDetails>, StoreError> {
        type Row = (i64, Option<i64>, Option<String>, Option<String>);
        let mut details = HashMap::with_capacity(ids.len());
        // In slices, so that one statement's list stays bounded whatever the page holds.
        for slice in ids.chunks(10_000) {
            let list = format!("[{}]", slice.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT id, upstream_status, upstream_error, outcome_detail FROM calls
                 WHERE id IN (SELECT value FROM json_each(?1)) AND seq <= ?2",
            )
            .bind(list)
            .bind(at.seq)
            .fetch_all(self.read_pool())
            .await?;
            details.extend(rows.into_iter().map(|(id, upstream_status, upstream_error, outcome_detail)| {
                (id, OutcomeDetails { upstream_status, upstream_error, outcome_detail })
            }));
        }
        Ok(details)
    }

    /// Roster add/remove callbacks whose event time is in [since, until), stored by `at`, for
    /// reconciliation; read like [`Store::calls_for_reconcile`].
    pub async fn roster_callbacks_for_reconcile(
        &self,
        since_ms: i64,
        until_ms: i64,
        at: JournalPoint,
    ) -> Result<Vec<CallbackRow>, StoreError> {
        let sql = (ROSTER_CALLBACKS_ALL, ROSTER_CALLBACKS_IN_WINDOW);
        let promoted = self.promotions_upto(at.seq).await?;
        self.read_json_pages(sql, (since_ms, until_ms), &[at.seq], 0, "callbacks", |raw| {
            with_promotion(callback_row(raw), &promoted)
        })
        .await
    }

    /// When each event that a promotion from quarantine stored (by seq `upto`) was promoted, by
    /// seq: few, read through the partial index of migration 0008 (the quarantine's rows hold
    /// whole bodies). A promotion that only added a delivery to an event stored already is not
    /// one: that event was there to match from its own arrival.
    async fn promotions_upto(&self, upto: i64) -> Result<HashMap<i64, i64>, StoreError> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT promoted_seq, promoted_at_ms FROM quarantine INDEXED BY quarantine_promoted
             WHERE promoted_as_new = 1 AND promoted_seq <= ?1",
        )
        .bind(upto)
        .fetch_all(self.read_pool())
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// The roster add/remove callbacks stored by `at` with an event time in `[since, until)` that
    /// `keep` keeps, and how many of all of them have an event time in `counted` (a range).
    ///
    /// Reads the window a page at a time, so memory follows the rows kept, not the window: a
    /// reconciliation summary keeps only the callbacks of pairs somebody called, however many
    /// friendships client apps make meanwhile.
    pub async fn roster_callbacks_kept(
        &self,
        since_ms: i64,
        until_ms: i64,
        at: JournalPoint,
        counted: (i64, i64),
        keep: impl Fn(&CallbackRow) -> bool,
    ) -> Result<(Vec<CallbackRow>, u64), StoreError> {
        let promoted = self.promotions_upto(at.seq).await?;
        let mut kept = Vec::new();
        let mut counted_total = 0u64;
        let mut after = (i64::MIN, i64::MIN);
        loop {
            let row = sqlx::query(ROSTER_CALLBACKS_PAGE_BY_TIME)
                .bind(since_ms)
                .bind(until_ms)
                .bind(after.0)
                .bind(after.1)
                .bind(at.seq)
                .fetch_one(self.read_pool())
                .await?;
            let n: i64 = row.try_get(0)?;
            let text: &str = row.try_get(1)?;
            let page: Vec<RosterRawWithId> =
                serde_json::from_str(text).map_err(|e| StoreError::Write(format!("decoding callbacks: {e}")))?;
            for (seq, operation, from, to, timestamp_ms, received_at_ms, id) in page {
                // The page is the first rows in (timestamp, id) order, but the aggregate does not
                // promise to list them in that order: the next page starts after the largest.
                after = after.max((timestamp_ms, id));
                counted_total += u64::from(timestamp_ms >= counted.0 && timestamp_ms < counted.1);
                let cb =
                    with_promotion(callback_row((seq, operation, from, to, timestamp_ms, received_at_ms)), &promoted);
                if keep(&cb) {
                    kept.push(cb);
                }
            }
            if n < KEPT_PAGE_ROWS {
                break;
            }
        }
        Ok((kept, counted_total))
    }

    /// Runs one of `sql` = (everything, a window) (each selects `count(*), max(id),
    /// json_group_array(...)` with `?1` since, `?2` until, `?3` after-id, then `bounds` as `?4`,
    /// `?5`...) and maps every decoded row. `expected`: how many rows everything holds at most,
    /// when the caller knows it without a query (0 if not).
    ///
    /// Reconciling everything reads millions of rows: one JSON text per page of 100,000 avoids
    /// sqlx's per-row hand-over between threads, and the next page is read while this one is
    /// decoded. Everything (no `since`, no `until`) is read with the first statement, in pages
    /// while they come back full (id keyset); a window with the second, in one query.
    async fn read_json_pages<Raw, Out>(
        &self,
        sql: (&'static str, &'static str),
        (since_ms, until_ms): (i64, i64),
        bounds: &[i64],
        expected: usize,
        what: &str,
        map: impl Fn(Raw) -> Out,
    ) -> Result<Vec<Out>, StoreError>
    where
        Raw: DeserializeOwned,
    {
        let paged = since_ms == i64::MIN && until_ms == i64::MAX;
        let sql = if paged { sql.0 } else { sql.1 };
        let query = |after: i64| {
            let q = sqlx::query(sql).bind(since_ms).bind(until_ms).bind(after);
            bounds.iter().fold(q, |q, b| q.bind(*b)).fetch_one(self.read_pool())
        };
        let mut out = Vec::new();
        if paged {
            // A hint only: if it cannot be had, the vector grows page by page as usual.
            let _ = out.try_reserve_exact(expected);
        }
        let mut after = i64::MIN;
        let mut prefetched = None;
        loop {
            let row = match prefetched.take() {
                Some(row) => row,
                None => query(after).await?,
            };
            let n: i64 = row.try_get(0)?;
            if n == 0 {
                break;
            }
            after = row.try_get(1)?;
            let text: &str = row.try_get(2)?;
            let more = paged && n == 100_000;
            out.reserve(usize::try_from(n).unwrap_or(0));
            let decode = async { decode_json_rows_into(text, &mut out, &map) };
            let decoded = if more {
                let (next, decoded) = tokio::join!(query(after), decode);
                prefetched = Some(next?);
                decoded
            } else {
                decode.await
            };
            decoded.map_err(|e| StoreError::Sqlx(sqlx::Error::Decode(format!("decoding {what}: {e}").into())))?;
            if !more {
                break;
            }
        }
        Ok(out)
    }
}

/// Decodes `text`, a JSON array of rows, mapping each row into `out` as it is read.
///
/// Decoding into a `Vec<Raw>` first grew that vector by doubling without knowing its length
/// (100,000 rows a page) and then copied every row once more: under jemalloc each growth of a
/// large vector is a copy into fresh pages, the largest source of page faults in a report of
/// everything.
fn decode_json_rows_into<Raw: DeserializeOwned, Out>(
    text: &str,
    out: &mut Vec<Out>,
    map: impl Fn(Raw) -> Out,
) -> serde_json::Result<()> {
    struct Rows<'a, Raw, Out, F>(&'a mut Vec<Out>, F, PhantomData<fn() -> Raw>);

    impl<'de, Raw: DeserializeOwned, Out, F: Fn(Raw) -> Out> Visitor<'de> for Rows<'_, Raw, Out, F> {
        type Value = ();

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of rows")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let Rows(out, map, _) = self;
            while let Some(raw) = seq.next_element::<Raw>()? {
                out.push(map(raw));
            }
            Ok(())
        }
    }

    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_seq(Rows(out, map, PhantomData))?;
    de.end()
}

/// A stored user ID as reconciliation compares it: lower-case. Callbacks are stored lower-cased
/// since schema version 5's release; rows stored before keep the case they came with (they are
/// part of the hash chain), and are lower-cased as they are read. A check, not a copy, for the
/// rows already lower-case.
fn lower_user(user: Option<CompactString>) -> CompactString {
    match user {
        Some(user) if user.bytes().any(|b| b.is_ascii_uppercase()) => user.to_ascii_lowercase(),
        Some(user) => user,
        None => CompactString::default(),
    }
}

/// A roster callback as the reconciliation queries render it: seq, operation, from, to,
/// timestamp, received at.
type RosterRaw = (i64, CompactString, Option<CompactString>, Option<CompactString>, i64, i64);

/// [`RosterRaw`] followed by the row's id (the paging key).
type RosterRawWithId = (i64, CompactString, Option<CompactString>, Option<CompactString>, i64, i64, i64);

fn with_promotion(mut cb: CallbackRow, promoted: &HashMap<i64, i64>) -> CallbackRow {
    cb.promoted_at_ms = promoted.get(&cb.seq).copied();
    cb
}

fn callback_row((seq, operation, from, to, timestamp_ms, received_at_ms): RosterRaw) -> CallbackRow {
    CallbackRow {
        seq,
        operation,
        from_user: lower_user(from),
        to_user: lower_user(to),
        timestamp_ms,
        received_at_ms,
        promoted_at_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every migration is in `MIGRATIONS`, in order: a trigger redefined by a migration left out
    /// would be reported as altered on every database.
    #[test]
    fn the_migration_list_is_the_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<_> = std::fs::read_dir(dir).expect("migrations").map(|e| e.expect("entry").path()).collect();
        files.sort();
        let texts: Vec<String> = files.iter().map(|f| std::fs::read_to_string(f).expect("read")).collect();
        assert_eq!(texts, MIGRATIONS.map(str::to_string).to_vec());
        for name in APPEND_ONLY_TRIGGERS {
            let sql = migrated_trigger(name).unwrap_or_else(|| panic!("{name} is defined by a migration"));
            assert!(sql.starts_with(&format!("CREATE TRIGGER {name} ")) && sql.ends_with("END"), "{sql}");
        }
        assert!(
            migrated_trigger("calls_immutable").is_some_and(|sql| sql.contains("head_seq_at_intent")),
            "the latest"
        );
    }

    /// The migrations' indexes are read from their statements, not their comments, with the
    /// ones a later migration drops left out; a new database has exactly them, and an index
    /// dropped, redefined or added by hand is named with the SQL that undoes it.
    #[tokio::test]
    async fn indexes_are_compared_with_the_migrations() {
        let migrated = migrated_indexes();
        let names: Vec<&str> = migrated.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"callbacks_roster_by_id") && names.contains(&"quarantine_promoted"), "{names:?}");
        assert!(!names.contains(&"callbacks_by_from"), "dropped by migration 0002: {names:?}");
        assert!(
            migrated
                .iter()
                .all(|(n, sql)| squeeze(sql).starts_with(&format!("CREATE INDEX {n} ON ")) && !sql.contains("--"))
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let (store, url) = crate::store::open_test_store(&dir).await;
        assert_eq!(store.schema_unlike_migrations().await.expect("read").1, Vec::<(String, String)>::new());
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await.expect("connect");
        sqlx::raw_sql(
            "DROP INDEX calls_by_owner; DROP INDEX calls_in_flight; CREATE INDEX calls_in_flight ON calls (id); \
             CREATE UNIQUE INDEX one_event_per_sender ON callbacks (from_user); \
             CREATE INDEX \"for the data team\" ON calls (outcome_detail); \
             create unique index [odd name] ON calls (idempotency_key, owner);",
        )
        .execute(&mut conn)
        .await
        .expect("edit");
        let problems = store.schema_unlike_migrations().await.expect("read").1;
        let named: Vec<&str> = problems.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            named,
            [
                "calls_in_flight (altered)",
                "calls_by_owner (missing)",
                "odd name (not friendhook's)",
                "one_event_per_sender (not friendhook's)"
            ],
            "an index added for other queries, not unique, is left alone"
        );
        let remedy: Vec<&str> = problems.iter().map(|(_, sql)| sql.as_str()).collect();
        sqlx::raw_sql(&remedy.join(" ")).execute(&mut conn).await.expect("the remedy runs");
        assert_eq!(store.schema_unlike_migrations().await.expect("read").1, Vec::<(String, String)>::new());
        sqlx::Connection::close(conn).await.expect("close");
        store.close().await;
    }

    /// Rows are mapped into the vector in order, after what it already holds; anything but one
    /// JSON array of rows is an error, not a partial read taken for the whole.
    #[test]
    fn json_rows_are_decoded_into_the_vector_in_order() {
        let mut out = vec![0_i64];
        decode_json_rows_into(r#"[[1,"a"],[2,"bb"]]"#, &mut out, |(n, s): (i64, String)| n * 10 + s.len() as i64)
            .expect("decodes");
        assert_eq!(out, [0, 11, 22]);
        let pair = |(n, _): (i64, String)| n;
        for bad in [r#"[[1,"a"]] [[2,"b"]]"#, r#"{"a":1}"#, r#"[[1,"a"],[2]]"#, r#"[[1,"a"]"#] {
            assert!(decode_json_rows_into(bad, &mut Vec::new(), pair).is_err(), "{bad}");
        }
    }

    /// A feed page merges the calls and the callbacks by seq and renders only the records it
    /// keeps: paging through everything, or a window, in pages smaller than either side's
    /// candidates gives each record of the range once, in seq order, rendered from its own row.
    #[tokio::test]
    async fn feed_pages_merge_calls_and_callbacks_in_seq_order() {
        const START: i64 = crate::store::SEED_START_MS;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::seeded_test_store(&dir, 300, 400).await;
        for (since, until) in [(i64::MIN, i64::MAX), (START + 50_000, START + 200_000)] {
            let expected: Vec<(i64, String, String)> = sqlx::query_as(
                "SELECT seq, 'call', CAST(id AS TEXT) FROM calls
                 WHERE seq IS NOT NULL AND requested_at_ms >= ?1 AND requested_at_ms < ?2
                 UNION ALL
                 SELECT seq, 'callback', call_id FROM callbacks
                 WHERE seq IS NOT NULL AND timestamp_ms >= ?1 AND timestamp_ms < ?2
                 ORDER BY seq",
            )
            .bind(since)
            .bind(until)
            .fetch_all(store.read_pool())
            .await
            .expect("reference");
            let kinds = |k: &str| expected.iter().filter(|e| e.1 == k).count();
            assert!(kinds("call") > 7 && kinds("callback") > 7, "both sides fill pages: {}", expected.len());
            let mut got = Vec::new();
            let mut after = 0;
            loop {
                let page = store.feed_page(after, 7, since, until).await.expect("page");
                let Some(last) = page.last_seq else { break };
                assert!((1..=7).contains(&page.count), "{}", page.count);
                for line in page.ndjson.lines() {
                    let r: FeedRecord = serde_json::from_str(line).expect("record");
                    got.push((r.seq, r.kind, r.id));
                }
                after = last;
            }
            assert_eq!(got, expected, "range {since}..{until}");
        }
        store.close().await;
    }

    /// Reconciling everything never reads the callbacks table itself: a cold table costs seconds
    /// (raw bodies), the narrow index of migration 0004 a fraction of that.
    #[tokio::test]
    async fn reconciling_everything_reads_only_the_roster_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = crate::store::open_test_store(&dir).await;
        let plan = crate::store::query_plan(&store, ROSTER_CALLBACKS_ALL).await;
        assert!(
            plan.iter().any(|d| d == "SEARCH callbacks USING COVERING INDEX callbacks_roster_by_id (id>?)"),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|d| d.starts_with("SCAN callbacks")), "{plan:?}");
        store.close().await;
    }
}
