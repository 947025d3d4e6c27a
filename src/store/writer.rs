//! The single group-commit writer: the only code that writes to the database.
//!
//! Requests hand their row to this task (on a thread of its own) over a bounded channel and wait
//! for a oneshot answer. The task takes everything queued (up to `max_batch`) and writes it with a
//! constant number of statements: under load, callbacks go as one autocommit statement per 64
//! rows with the rows as bound parameters (`insert_callbacks_sql`); anything else goes in ONE
//! transaction with one statement per kind of row. Only after the commit does it answer. Why this
//! shape (see shared/reference/performance-probe.md):
//! - SQLite has one writer; more write connections only add lock contention.
//! - One commit per request tops out at a few thousand per second (one fsync each); a batch
//!   shares one fsync among all its rows.
//! - sqlx-sqlite pays a cross-thread round trip per statement, so the statement count per batch
//!   is kept constant rather than proportional to the rows.
//!
//! Because only this task assigns `seq` and extends the hash chain, both are gap-free and in
//! commit order. Another process may run a writer of its own on the same file
//! (`friendhook quarantine reverify`); each transaction takes SQLite's write lock first and starts
//! from the head as committed (`refresh_head`), so the numbering stays one sequence.
//! Deduplication is still atomic in the database (`INSERT ... ON CONFLICT` on the unique dedup
//! key), not a check in memory.
//!
//! Behind the commits, the writer adds each callback's entries to `callback_users` (the lookup by
//! `from`/`to`) in chunks (`index_users`): per-user index entries land on random pages, and
//! keeping them up to date in every small commit cost as much as storing the callback itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot, watch};

use super::chain::{self, CallContent, CallbackContent};
use super::checkpoint::CheckpointWatch;
use super::{CallRecord, NewCall, RecoveredCalls, StoreError};
use crate::callback::ParsedCallback;
use crate::clock::SharedClock;
use crate::metrics::{LogThrottle, WriterMetrics};
use crate::model::Outcome;

/// A verified callback to store.
#[derive(Debug, Clone)]
pub struct NewCallback {
    /// Parsed fields.
    pub event: ParsedCallback,
    /// The exact body (valid UTF-8: it parsed as JSON).
    pub raw_body: String,
    /// Hex SHA-256 of the body.
    pub body_sha256: String,
    /// When this delivery arrived.
    pub received_at_ms: i64,
    /// Peer address of this delivery.
    pub remote_addr: Option<String>,
    /// Scheme that verified it.
    pub scheme: &'static str,
    /// Index of the secret that verified it.
    pub secret_index: i64,
}

/// What the writer answers for a stored callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallbackAck {
    /// The event's sequence number.
    pub seq: i64,
    /// This delivery repeated an event already stored.
    pub duplicate: bool,
}

/// A delivery that failed verification (metadata only).
#[derive(Debug, Clone)]
pub struct Rejection {
    /// Arrival time.
    pub received_at_ms: i64,
    /// Peer address.
    pub remote_addr: Option<String>,
    /// Short reason code.
    pub reason: &'static str,
    /// Hex SHA-256 of the body.
    pub body_sha256: String,
    /// Body size in bytes.
    pub body_size: i64,
}

/// A request kept in quarantine.
#[derive(Debug, Clone)]
pub struct QuarantineEntry {
    /// Arrival time.
    pub received_at_ms: i64,
    /// Peer address.
    pub remote_addr: Option<String>,
    /// Why verification failed.
    pub reason: &'static str,
    /// The signature-relevant headers, as a JSON object.
    pub headers_json: String,
    /// The exact body.
    pub raw_body: Vec<u8>,
}

/// A quarantined request that now verifies: to store as an event and mark promoted, atomically.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// The quarantine row.
    pub quarantine_id: i64,
    /// The event, exactly as the receive path would have stored it on arrival.
    pub callback: NewCallback,
}

/// What promoting one quarantined request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromotionResult {
    /// Stored as an event (`duplicate`: the event was already stored, e.g. delivered again
    /// correctly signed; this request was counted as one more delivery of it).
    Promoted(CallbackAck),
    /// Another run promoted this row first; nothing was written.
    AlreadyPromoted,
}

/// The outcome of a call, to record once.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// The call as its intent was stored.
    pub call: CallRecord,
    /// succeeded / rejected / failed / unknown.
    pub outcome: Outcome,
    /// Easemob's HTTP status.
    pub upstream_status: Option<i64>,
    /// Easemob's error type.
    pub upstream_error: Option<String>,
    /// HTTP attempts.
    pub attempts: i64,
    /// Easemob's response body (JSON text).
    pub response_body: Option<String>,
    /// Why it ended so, when it did not succeed.
    pub outcome_detail: Option<String>,
}

/// Result of recording an intent.
#[derive(Debug, Clone)]
pub enum IntentResult {
    /// A new call row.
    Created(CallRecord),
    /// The idempotency key was already used; the existing row.
    Existing(CallRecord),
}

pub(super) enum Job {
    Callback(Box<NewCallback>, oneshot::Sender<Result<CallbackAck, StoreError>>),
    Rejection(Rejection, oneshot::Sender<Result<(), StoreError>>),
    Quarantine(Box<QuarantineEntry>, oneshot::Sender<Result<Option<i64>, StoreError>>),
    Promote(Box<Promotion>, oneshot::Sender<Result<PromotionResult, StoreError>>),
    Intent(NewCall, oneshot::Sender<Result<IntentResult, StoreError>>),
    Outcome(Box<CallOutcome>, oneshot::Sender<Result<CallRecord, StoreError>>),
    /// A call's turn has come: marked sent before its first request leaves (migration 0010).
    Sent(i64, oneshot::Sender<Result<Option<String>, StoreError>>),
    Probe(oneshot::Sender<Result<(), StoreError>>),
    Purge(PurgeFilter, oneshot::Sender<Result<Purged, StoreError>>),
}

/// Which held quarantine rows `friendhook quarantine purge` deletes: held (never promoted) ones
/// only, and of those the ones every given condition picks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeFilter {
    /// Received before this time (epoch ms).
    pub received_before_ms: Option<i64>,
    /// These row ids only (empty: any).
    pub ids: Vec<i64>,
    /// Held for this reason only (`signature_mismatch`, ...).
    pub reason: Option<String>,
}

/// What a purge deleted (or, counted without deleting, would).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Purged {
    /// Rows.
    pub requests: u64,
    /// Bytes of their bodies.
    pub body_bytes: u64,
}

impl Purged {
    /// From the body size of each row.
    pub(super) fn from_sizes(sizes: &[i64]) -> Purged {
        Purged { requests: sizes.len() as u64, body_bytes: sizes.iter().map(|n| n.unsigned_abs()).sum() }
    }
}

impl Job {
    fn fail(self, err: &StoreError) {
        let e = || err.clone_for_ack();
        match self {
            Job::Callback(_, tx) => drop(tx.send(Err(e()))),
            Job::Rejection(_, tx) => drop(tx.send(Err(e()))),
            Job::Quarantine(_, tx) => drop(tx.send(Err(e()))),
            Job::Promote(_, tx) => drop(tx.send(Err(e()))),
            Job::Intent(_, tx) => drop(tx.send(Err(e()))),
            Job::Outcome(_, tx) => drop(tx.send(Err(e()))),
            Job::Sent(_, tx) => drop(tx.send(Err(e()))),
            Job::Probe(tx) => drop(tx.send(Err(e()))),
            Job::Purge(_, tx) => drop(tx.send(Err(e()))),
        }
    }
}

/// The head of the hash chain: last assigned seq and its link.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainHead {
    /// Last sequence number (0 when empty).
    pub seq: i64,
    /// Its chain hash ([`chain::GENESIS`] when empty).
    pub hash: String,
}

/// Health of the write path, for `/readyz`.
#[derive(Debug, Default)]
pub struct WriterHealth {
    last_error: Mutex<Option<String>>,
}

impl WriterHealth {
    /// The last write error, if the most recent write failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map(|g| g.clone()).unwrap_or(None)
    }

    fn set(&self, err: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = err;
        }
    }

    /// Adds to the error shown that a probe commits again, once: the fault may be over (space
    /// freed, a lock released), and `/readyz` says what it waits for rather than repeat a fault
    /// that no longer holds.
    fn note_recovering(&self) {
        if let Ok(mut g) = self.last_error.lock()
            && let Some(err) = g.as_mut()
            && !err.ends_with(RECOVERING)
        {
            err.push_str(RECOVERING);
        }
    }
}

/// What [`WriterHealth::note_recovering`] adds.
const RECOVERING: &str = " (recovering: a write probe commits again; ready once no callback has failed to commit for \
                          10 s, or at once when one commits)";

/// Limits the writer enforces.
#[derive(Debug, Clone, Copy)]
pub struct WriterLimits {
    /// Most jobs per transaction.
    pub max_batch: usize,
    /// Rejection log cap.
    pub rejection_cap: i64,
    /// Quarantine cap.
    pub quarantine_cap: i64,
}

pub(super) struct Writer {
    pub conn: SqliteConnection,
    /// How to open `conn` again after a failed write (see [`Writer::reopen`]).
    pub connect: sqlx::sqlite::SqliteConnectOptions,
    /// The last batch failed: open a fresh connection before the next one.
    pub reopen_pending: bool,
    pub head: ChainHead,
    pub clock: SharedClock,
    pub limits: WriterLimits,
    pub committed: watch::Sender<i64>,
    pub health: Arc<WriterHealth>,
    /// `PRAGMA data_version` when `head` was last known to be current; `None`: reload it before
    /// the next write. See [`refresh_head`].
    pub data_version: Option<i64>,
    /// The fast path's [`insert_callbacks_sql`] by row count (index `n - 1`), built on first use.
    pub fast_sql: Vec<String>,
    /// Every callback up to this seq has its `callback_users` entries (see [`index_users`]).
    pub users_indexed_upto: i64,
    /// When [`Writer::maybe_index_users`] last ran.
    pub users_indexed_at: std::time::Instant,
    /// Commit sizes, durations and failures, for `/metrics`.
    pub metrics: WriterMetrics,
    /// Throttles the log line of failed batches.
    pub failure_log: LogThrottle,
    /// Throttles the log line of failed `callback_users` steps (they fail with the batches while
    /// a fault lasts).
    pub users_failure_log: LogThrottle,
    /// Batches failed since the last commit (a recovery is logged once).
    pub failed_since_commit: u64,
    /// When a batch holding the service's own writes (not only `/readyz` probes) last failed.
    pub write_failed_at_ms: Option<i64>,
    /// The database file as opened, checked after every commit (see [`DatabaseFile`]).
    pub database_file: Option<DatabaseFile>,
    /// The service's claim on the database file (see `StoreOptions::instance_lock`), released
    /// when the writer ends.
    pub _instance_lock: Option<std::fs::File>,
    /// Whether checkpoints keep up (see [`CheckpointWatch`]).
    pub checkpoints: CheckpointWatch,
}

/// The database file the writer opened, as the file system knew it then (device and inode).
///
/// A file removed (or replaced by another) while the service runs stays open: SQLite goes on
/// committing into it, and every such commit is lost when the service stops, with nothing said.
/// Checked after each commit, before its requests are answered (a `stat`, about a microsecond a
/// batch), so no 200 is given for a write into a file nobody will find again.
#[derive(Debug)]
pub struct DatabaseFile {
    path: std::path::PathBuf,
    identity: Option<(u64, u64)>,
    /// Its WAL's, which lives as long as the service's connections do.
    wal_identity: Option<(u64, u64)>,
}

impl DatabaseFile {
    /// Notes the file at `path` and its WAL as they are now.
    pub fn note(path: &std::path::Path) -> Self {
        let wal_identity = Self::identity_of(&super::wal_path(path));
        Self { path: path.to_path_buf(), identity: Self::identity_of(path), wal_identity }
    }

    #[cfg(unix)]
    fn identity_of(path: &std::path::Path) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    #[cfg(not(unix))]
    fn identity_of(_: &std::path::Path) -> Option<(u64, u64)> {
        None
    }

    /// `Err` when the path no longer leads to the file noted (removed, renamed, replaced).
    pub fn check(&self) -> Result<(), StoreError> {
        let Some(noted) = self.identity else { return Ok(()) };
        if Self::identity_of(&self.path) == Some(noted) {
            return Ok(());
        }
        Err(StoreError::FileGone(format!(
            "the database file {} was removed or replaced while the service ran: writes still go to the file \
             it opened, which is lost when the service stops, so none is acknowledged. If it was removed by \
             mistake, copy it back while the service still runs (`ls -l /proc/{}/fd` shows it as deleted; \
             copy the -wal file too), then restart the service; a stop saves a copy as <file>.rescued-<ms> \
             and logs how to put it back",
            self.path.display(),
            std::process::id()
        )))
    }
}

impl DatabaseFile {
    /// Moves the WAL a stopped writer left beside its removed or replaced database file to
    /// `<path>-wal.stale-<ms>`. SQLite could not checkpoint it (the file it belongs to is gone),
    /// and left at its name it would be replayed into whatever file is opened there next: a new
    /// database, or a backup put back, both of which it would corrupt. Only the WAL noted at the
    /// start (one brought along with a replacement file is that file's), and kept, not deleted:
    /// its pages are in the rescued copy if there is one, but it is the operator's evidence.
    fn set_wal_aside(&self, rescued: bool, now_ms: i64) {
        let wal = super::wal_path(&self.path);
        if self.wal_identity.is_none() || Self::identity_of(&wal) != self.wal_identity {
            return;
        }
        let mut aside = wal.as_os_str().to_owned();
        aside.push(format!(".stale-{now_ms}"));
        let aside = std::path::PathBuf::from(aside);
        match std::fs::rename(&wal, &aside) {
            Ok(()) => tracing::warn!(wal = %wal.display(), moved_to = %aside.display(), rescued,
                "moved the WAL of the removed database file aside, so that it is not replayed into the file opened \
                 at that path next"),
            Err(err) => tracing::error!(wal = %wal.display(), error = %err,
                "could not move the WAL of the removed database file aside: move it away by hand before the next \
                 start, or SQLite replays it into the file opened at that path"),
        }
    }
}

/// How long after a failed batch of the service's own writes a commit of `/readyz` probes alone
/// still does not count as a recovery.
const PROBE_TRUSTED_AFTER_MS: i64 = 10_000;

/// Whether a commit of `writes` of the service's own writes (0: only `/readyz` probes) ends a
/// fault: a real write always does; probes alone only once no real write has failed for
/// [`PROBE_TRUSTED_AFTER_MS`]. The probe row is rewritten in place, so on a nearly full disk it
/// can commit while new callbacks cannot: trusted at once, `/readyz` said ready (and the log "writes
/// commit again") while every callback got 503. Trusted later, a service whose traffic stopped
/// (taken out of a load balancer by its `/readyz`) still becomes ready again without a write.
fn probe_commit_clears(writes: usize, write_failed_at_ms: Option<i64>, now_ms: i64) -> bool {
    writes > 0 || write_failed_at_ms.is_none_or(|failed| now_ms - failed >= PROBE_TRUSTED_AFTER_MS)
}

/// Under steady load, the writer adds `callback_users` entries once this many sequence numbers
/// have been assigned since the last time: a chunk this size puts many entries on each index page
/// it touches, where per-batch maintenance wrote a whole page per entry.
const USER_INDEX_CHUNK: i64 = 4096;

/// When no request is waiting, the writer indexes what is pending, at most this often (a quiet
/// service keeps its tail short without a commit per trickling callback).
const USER_INDEX_IDLE_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Most sequence numbers indexed in one transaction.
const USER_INDEX_MOST: i64 = 4 * USER_INDEX_CHUNK;

const INDEX_USERS: &str = "\
INSERT OR IGNORE INTO callback_users (role, bucket, user_id, seq)
SELECT 0, seq >> 16, lower(from_user), seq FROM callbacks WHERE seq > ?1 AND seq <= ?2 AND from_user IS NOT NULL
UNION ALL
SELECT 1, seq >> 16, lower(to_user), seq FROM callbacks WHERE seq > ?1 AND seq <= ?2 AND to_user IS NOT NULL
ORDER BY 1, 2, 3, 4";

/// Adds the `callback_users` entries of callbacks with `after < seq <= upto` and records the
/// progress, in one transaction; returns the progress reached. Idempotent (`OR IGNORE`), so a
/// writer in another process that indexed some of the same range does no harm; progress only
/// moves forward.
///
/// `after` is the caller's idea of the progress, read when it opened. If the stored progress is
/// lower, the index was emptied since (`audit rebuild-user-index` while a `quarantine` command's
/// writer was open: only the service holds the instance lock), and the step starts there
/// instead, as long as the caller asked for: recording `upto` over an emptied index would make
/// queries by user skip every callback below `after`.
pub(super) async fn index_users(conn: &mut SqliteConnection, after: i64, upto: i64) -> Result<i64, StoreError> {
    let mut tx = conn.begin_with(BEGIN_WRITE).await?;
    let stored: i64 = sqlx::query_scalar("SELECT coalesce((SELECT upto_seq FROM callback_users_progress), 0)")
        .fetch_one(&mut *tx)
        .await?;
    let (after, upto) = if stored < after { (stored, stored + (upto - after)) } else { (after, upto) };
    sqlx::query(INDEX_USERS).bind(after).bind(upto).execute(&mut *tx).await?;
    sqlx::query("UPDATE callback_users_progress SET upto_seq = max(upto_seq, ?1)").bind(upto).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(upto)
}

/// What the `/readyz` write probe rewrites on each run: more than one callback needs (its row and
/// a page per index), so a disk too full for callbacks fails the probe too (migration 0003).
const PROBE_BALLAST_BYTES: i64 = 64 * 1024;

/// Every write transaction starts with this: it takes the write lock at once (rather than at the
/// first write), so the head checked by [`refresh_head`] cannot change before the commit.
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// Brings `head` up to date when another connection committed since this writer last looked.
///
/// This task is the only writer inside one process, but not the only possible writer of the file:
/// `friendhook quarantine reverify` stores events from its own process while the service runs.
/// Without this check the service would go on numbering from a stale head: the next callback would
/// collide on `seq` (every batch failing until a restart) and the next call outcome would silently
/// fork the hash chain. `PRAGMA data_version` changes exactly when another connection has
/// committed, so the common case costs one cheap statement per batch, not a reload. Must run
/// inside a transaction begun with [`BEGIN_WRITE`].
async fn refresh_head(
    tx: &mut SqliteConnection,
    seen: &mut Option<i64>,
    head: &mut ChainHead,
) -> Result<(), StoreError> {
    let version: i64 = sqlx::query_scalar("PRAGMA data_version").fetch_one(&mut *tx).await?;
    if *seen != Some(version) {
        *head = super::reads::load_head(tx).await?;
        *seen = Some(version);
    }
    Ok(())
}

/// Most callbacks in one fast-path statement. Each row binds [`FAST_COLUMNS`] parameters and the
/// statement text depends only on the row count, so this bounds both the parameters per statement
/// and the number of statements the connection keeps prepared. A larger batch is written as
/// several statements, each committed (and answered) on its own.
const FAST_ROWS: usize = 64;

/// Parameters per callback row (see [`insert_callbacks_sql`]).
const FAST_COLUMNS: usize = 20;

/// The statement that stores `rows` callbacks, chain links included; with `guarded`, the fast
/// path's ONE autocommit statement.
///
/// The writer computes `seq` and the chain links in advance ([`plan_callbacks`]): a row of a new
/// event carries them, a row repeating an event (stored before, or earlier in the same batch)
/// carries none and lands in `ON CONFLICT` as another delivery.
///
/// On the fast path the writer assumes, without looking, that every distinct key is new and that
/// it knows the chain head. Two guards make that safe inside the same atomic statement: the head
/// in the database must equal the writer's (another process, such as `quarantine reverify`, may
/// have written), and none of the batch's keys may exist yet. If either fails, the statement
/// inserts nothing and the callbacks go the transactional way, which looks the keys up first
/// under the write lock and runs the same statement unguarded. Because the SELECT reads the
/// target table, SQLite evaluates it fully before inserting, so the guards see the state before
/// this statement.
///
/// Rows are bound as plain parameters rather than as one JSON array read through `json_each`:
/// extracting 20 fields per row from JSON text cost SQLite about as much as inserting the row.
/// The placeholders are anonymous (`?`) on purpose, the keys of the guard bound a second time:
/// with numbered ones (`?21`) sqlx looks each parameter's name up, which SQLite answers by a
/// linear search, quadratic in the row count.
fn insert_callbacks_sql(rows: usize, guarded: bool) -> String {
    let row = format!("({})", vec!["?"; FAST_COLUMNS].join(","));
    let guard = if guarded {
        format!(
            "max(coalesce((SELECT max(seq) FROM callbacks), 0), coalesce((SELECT max(seq) FROM calls), 0)) = ?\n\
             AND NOT EXISTS (SELECT 1 FROM callbacks WHERE dedup_key IN ({}))",
            vec!["?"; rows].join(",")
        )
    } else {
        // `WHERE true`: SQLite needs a WHERE to tell the upsert's ON from a join's.
        "true".to_string()
    };
    format!(
        "INSERT INTO callbacks (dedup_key, call_id, msg_id, appkey, event_type, chat_type, operation, \
         from_user, to_user, pair_key, timestamp_ms, received_at_ms, scheme, secret_index, raw_body, \
         body_sha256, remote_addr, seq, prev_hash, chain_hash)\n\
         SELECT * FROM (VALUES {rows_sql})\n\
         WHERE {guard}\n\
         ON CONFLICT (dedup_key) DO UPDATE SET deliveries = deliveries + 1, \
         last_received_at_ms = excluded.received_at_ms, last_remote_addr = excluded.remote_addr",
        rows_sql = vec![row.as_str(); rows].join(",\n"),
    )
}

/// Callback rows about to be stored, with what storing them does to the chain.
struct PlannedCallbacks<'a> {
    callbacks: Vec<&'a NewCallback>,
    /// `(seq, prev_hash, chain_hash)` for a new event; `None` for a repeat.
    links: Vec<Option<(i64, String, String)>>,
    /// The answer for each row.
    acks: Vec<CallbackAck>,
    /// The chain head once these rows are stored.
    head: ChainHead,
}

/// Assigns the next seqs, in order, to rows whose key is not in `stored` (key -> seq of events
/// already stored, or planned earlier), and records them there.
fn plan_callbacks<'a>(
    callbacks: Vec<&'a NewCallback>,
    mut head: ChainHead,
    stored: &mut HashMap<String, i64>,
) -> PlannedCallbacks<'a> {
    let mut links = Vec::with_capacity(callbacks.len());
    let mut acks = Vec::with_capacity(callbacks.len());
    for cb in &callbacks {
        let key = cb.event.dedup_key.as_str();
        if let Some(&seq) = stored.get(key) {
            links.push(None);
            acks.push(CallbackAck { seq, duplicate: true });
            continue;
        }
        let seq = head.seq + 1;
        let hash = chain::link(&head.hash, &callback_content(seq, cb).canonical());
        let prev = std::mem::replace(&mut head, ChainHead { seq, hash: hash.clone() }).hash;
        stored.insert(key.to_string(), seq);
        links.push(Some((seq, prev, hash)));
        acks.push(CallbackAck { seq, duplicate: false });
    }
    PlannedCallbacks { callbacks, links, acks, head }
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds the rows of [`insert_callbacks_sql`] (not the guard's parameters).
fn bind_callback_rows<'q>(mut query: SqliteQuery<'q>, plan: &'q PlannedCallbacks<'_>) -> SqliteQuery<'q> {
    for (cb, link) in plan.callbacks.iter().zip(&plan.links) {
        let e = &cb.event;
        let pair = match (&e.from_user, &e.to_user) {
            (Some(f), Some(t)) => Some(pair_key(f, t)),
            _ => None,
        };
        let (seq, prev, hash) = match link {
            Some((seq, prev, hash)) => (Some(*seq), Some(prev.as_str()), Some(hash.as_str())),
            None => (None, None, None),
        };
        query = query
            .bind(e.dedup_key.as_str())
            .bind(e.call_id.as_str())
            .bind(e.msg_id.as_deref())
            .bind(e.appkey.as_deref())
            .bind(e.event_type.as_deref())
            .bind(e.chat_type.as_deref())
            .bind(e.operation.as_deref())
            .bind(e.from_user.as_deref())
            .bind(e.to_user.as_deref())
            .bind(pair)
            .bind(e.timestamp_ms)
            .bind(cb.received_at_ms)
            .bind(cb.scheme)
            .bind(cb.secret_index)
            .bind(cb.raw_body.as_str())
            .bind(cb.body_sha256.as_str())
            .bind(cb.remote_addr.as_deref())
            .bind(seq)
            .bind(prev)
            .bind(hash);
    }
    query
}

/// Both callback paths check that [`insert_callbacks_sql`] wrote exactly one row per callback;
/// anything else is a surprise that must never be answered with a 200.
fn unexpected_rows_written(expected: usize, written: u64) -> StoreError {
    StoreError::Write(format!("expected {expected} callback rows written, SQLite reports {written}"))
}

/// Events of these keys already stored, with their seq.
const STORED_KEYS: &str = "SELECT dedup_key, seq FROM callbacks WHERE dedup_key IN (SELECT value FROM json_each(?1))";

const INSERT_REJECTIONS: &str = "\
INSERT INTO rejected_deliveries (received_at_ms, remote_addr, reason, body_sha256, body_size)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4 FROM json_each(?1)";

const PRUNE_REJECTIONS: &str = "\
DELETE FROM rejected_deliveries WHERE id <= (SELECT max(id) FROM rejected_deliveries) - ?1";

/// Claims held rows by id and body digest (`?1`: `[[id, sha256], ...]`): a row purged and its id
/// taken by a later request (rowids are reused) is not the one that was verified.
const CLAIM_QUARANTINE: &str = "\
UPDATE quarantine SET promoted_at_ms = ?2
WHERE promoted_at_ms IS NULL
  AND EXISTS (SELECT 1 FROM json_each(?1) AS j WHERE j.value->>0 = quarantine.id AND j.value->>1 = quarantine.body_sha256)
RETURNING id";

const MARK_QUARANTINE_PROMOTED: &str = "\
UPDATE quarantine SET promoted_seq = j.value->>1, promoted_as_new = j.value->>2
FROM json_each(?1) AS j WHERE quarantine.id = j.value->>0";

/// The chained fields of a callback about to be stored as `seq`.
fn callback_content(seq: i64, cb: &NewCallback) -> CallbackContent<'_> {
    let e = &cb.event;
    CallbackContent {
        seq,
        dedup_key: &e.dedup_key,
        call_id: &e.call_id,
        msg_id: e.msg_id.as_deref(),
        appkey: e.appkey.as_deref(),
        event_type: e.event_type.as_deref(),
        chat_type: e.chat_type.as_deref(),
        operation: e.operation.as_deref(),
        from_user: e.from_user.as_deref(),
        to_user: e.to_user.as_deref(),
        timestamp_ms: e.timestamp_ms,
        received_at_ms: cb.received_at_ms,
        scheme: cb.scheme,
        secret_index: cb.secret_index,
        body_sha256: &cb.body_sha256,
    }
}

/// The pair key both tables use: the two users in a fixed order, joined by a unit separator.
pub fn pair_key(a: &str, b: &str) -> String {
    if a <= b { format!("{a}\u{1f}{b}") } else { format!("{b}\u{1f}{a}") }
}

/// The detail of a call a start closed as `unknown` (it had been sent).
const CLOSED_UNKNOWN_DETAIL: &str = "friendhook stopped before Easemob's answer was recorded: Easemob may or may \
    not have acted; check the pair's friend list (GET /users/{owner}/contacts/users) before sending it again";

/// The detail of a call a start closed as `failed` because it had not been sent: with 0
/// attempts, this is how `audit verify` finds the calls a restart closed so.
pub(super) const CLOSED_NOT_SENT_DETAIL: &str = "not sent: friendhook stopped while the call waited for its turn \
    under the rate limit; nothing reached Easemob, so it is safe to send again";

impl Writer {
    /// Closes calls that were cut off between intent and outcome (crash, kill): as `unknown` if
    /// they had been sent, as `failed` with no attempt if they were still waiting for their turn.
    pub async fn close_interrupted_calls(&mut self) -> Result<RecoveredCalls, StoreError> {
        let rows = sqlx::query(
            "SELECT id, op, owner, friend, idempotency_key, requested_at_ms, sent_at_ms FROM calls
             WHERE outcome IS NULL ORDER BY id",
        )
        .fetch_all(&mut self.conn)
        .await?;
        let mut recovered = RecoveredCalls::default();
        if rows.is_empty() {
            return Ok(recovered);
        }
        let now = self.clock.now_ms();
        let mut head = self.head.clone();
        let mut tx = self.conn.begin_with(BEGIN_WRITE).await?;
        refresh_head(&mut tx, &mut self.data_version, &mut head).await?;
        for row in &rows {
            let call = CallRecord::intent_from_row(row)?;
            let sent = row.try_get::<Option<i64>, _>("sent_at_ms")?.is_some();
            recovered.count(call.op, sent);
            let (outcome, detail) = if sent {
                (Outcome::Unknown, CLOSED_UNKNOWN_DETAIL)
            } else {
                (Outcome::Failed, CLOSED_NOT_SENT_DETAIL)
            };
            let outcome = CallOutcome {
                call,
                outcome,
                upstream_status: None,
                upstream_error: None,
                attempts: 0,
                response_body: None,
                outcome_detail: Some(detail.to_owned()),
            };
            record_outcome(&mut tx, &mut head, &outcome, now).await?;
        }
        tx.commit().await?;
        self.head = head;
        let _ = self.committed.send(self.head.seq);
        Ok(recovered)
    }

    /// Runs until every sender is gone, then returns (after committing what was queued).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(self.limits.max_batch);
        let mut stats = BatchStats::default();
        // A backlog of the lookup by user (emptied by `audit rebuild-user-index`, or left by a
        // crash) is caught up while nothing is queued: one step at a time, so a request that
        // arrives meanwhile waits for one step at most.
        while self.head.seq > self.users_indexed_upto && rx.is_empty() && self.index_users_step().await {}
        while rx.recv_many(&mut batch, self.limits.max_batch).await > 0 {
            let started = std::time::Instant::now();
            let jobs = batch.len();
            self.commit_batch(&mut batch).await;
            stats.record(jobs, started.elapsed());
            // Not on a connection a failed batch left for replacing: its error would be the
            // batch's, not the checkpoint's.
            if !self.reopen_pending && self.failed_since_commit == 0 {
                self.checkpoints.maybe_check(&mut self.conn, &self.metrics, self.clock.now_ms()).await;
            }
            let chunk_started = std::time::Instant::now();
            if self.maybe_index_users(rx.is_empty()).await {
                stats.record_user_chunk(chunk_started.elapsed());
            }
        }
        // A stopped service leaves every entry in place.
        while self.head.seq > self.users_indexed_upto && self.index_users_step().await {}
        let failed_batches = self.failure_log.take_unreported();
        let failed_user_steps = self.users_failure_log.take_unreported();
        if failed_batches + failed_user_steps > 0 {
            tracing::error!(
                failed_batches,
                failed_user_steps,
                "write failures since the last line of their kind, not logged before the stop (logged at most every 10 s)"
            );
        }
        // The file removed or replaced under the service: what it holds goes with the process.
        let gone = self.database_file.as_ref().filter(|file| file.check().is_err()).map(|file| file.path.clone());
        let rescued = match &gone {
            Some(path) => self.rescue(path).await,
            None => None,
        };
        // Closing (rather than dropping) the connection runs SQLite's final checkpoint before the
        // process exits, so a stopped service leaves a clean database file.
        if let Err(err) = self.conn.close().await {
            tracing::warn!(error = %err, "closing the write connection failed");
        }
        if let Some(file) = self.database_file.as_ref().filter(|_| gone.is_some()) {
            file.set_wal_aside(rescued.is_some(), self.clock.now_ms());
        }
        tracing::debug!("writer: channel closed, exited");
    }

    /// Copies the database the writer still has open, though its file was removed or replaced,
    /// to `<path>.rescued-<ms>` beside it (`VACUUM INTO`: everything committed, the WAL's part
    /// included); the copy's path, or `None` (logged) if it could not be made.
    async fn rescue(&mut self, path: &std::path::Path) -> Option<std::path::PathBuf> {
        let mut copy = path.as_os_str().to_owned();
        copy.push(format!("{}{}", super::RESCUED_SUFFIX, self.clock.now_ms()));
        let copy = std::path::PathBuf::from(copy);
        let Some(target) = copy.to_str() else {
            tracing::error!(path = %path.display(), "the database file was removed or replaced while the service ran, \
                and its path is not UTF-8, so no copy could be saved: what it held since is lost with this stop");
            return None;
        };
        match sqlx::query("VACUUM INTO ?1").bind(target).execute(&mut self.conn).await {
            Ok(_) => {
                // Private, as friendhook makes a new database file (SQLite makes this one 0644).
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600));
                }
                tracing::error!(
                    path = %path.display(),
                    copy = %copy.display(),
                    head_seq = self.head.seq,
                    "the database file was removed or replaced while the service ran; what the service held (up to \
                     head_seq) is saved in `copy`. To go on with it, with no service running: move the file now at \
                     `path` (if any) away and move `copy` to `path`, then start the service"
                );
                Some(copy)
            }
            Err(err) => {
                tracing::error!(
                    path = %path.display(),
                    error = %err,
                    "the database file was removed or replaced while the service ran, and saving a copy of it failed: \
                     what it held since is lost with this stop"
                );
                None
            }
        }
    }

    /// Adds pending `callback_users` entries when a chunk is full or when the writer is idle (at
    /// most every [`USER_INDEX_IDLE_EVERY`]). `true` if a chunk ran.
    async fn maybe_index_users(&mut self, idle: bool) -> bool {
        let pending = self.head.seq - self.users_indexed_upto;
        let due = pending >= USER_INDEX_CHUNK || (idle && self.users_indexed_at.elapsed() >= USER_INDEX_IDLE_EVERY);
        if pending > 0 && due {
            self.index_users_step().await;
            return true;
        }
        false
    }

    /// One transaction of `callback_users` entries, for at most [`USER_INDEX_MOST`] pending
    /// sequence numbers (a long backlog is taken in steps, not in one long stall). Never fails a
    /// request: readers scan the unindexed tail, so an error only costs query speed until the
    /// next try. `false` on error.
    async fn index_users_step(&mut self) -> bool {
        self.users_indexed_at = std::time::Instant::now();
        let upto = self.head.seq.min(self.users_indexed_upto + USER_INDEX_MOST);
        match index_users(&mut self.conn, self.users_indexed_upto, upto).await {
            Ok(reached) => {
                self.users_indexed_upto = reached;
                true
            }
            Err(err) => {
                if let Some(failures) = self.users_failure_log.hit(self.clock.now_ms()) {
                    tracing::warn!(error = %err, pending = self.head.seq - self.users_indexed_upto,
                        failures_since_last_line = failures,
                        "adding callback user entries failed; queries scan the tail meanwhile");
                }
                self.reopen_pending = true;
                false
            }
        }
    }

    /// Replaces the write connection after a failed batch. A failed COMMIT (disk full, I/O error)
    /// can leave the connection inside a transaction that sqlx still counts as open, and every
    /// later batch would fail on it; a fresh connection starts clean (SQLite rolls back what the
    /// old one left). It runs when the next batch arrives rather than right after the failure: a
    /// connection opened while the fault lasts (a read-only file opens read-only) would keep
    /// failing afterwards. So the service recovers by itself once the fault is gone.
    async fn reopen(&mut self) {
        use sqlx::ConnectOptions;
        // Not onto whatever now has the path: SQLite would create an empty database there.
        if let Some(Err(gone)) = self.database_file.as_ref().map(DatabaseFile::check) {
            tracing::debug!(error = %gone, "not reopening the write connection");
            return;
        }
        match self.connect.connect().await {
            Ok(fresh) => {
                let old = std::mem::replace(&mut self.conn, fresh);
                // `PRAGMA data_version` is per connection: the value noted on the old one says
                // nothing about commits the new one has not seen, so reload the head.
                self.data_version = None;
                if let Err(err) = old.close().await {
                    tracing::debug!(error = %err, "closing the failed write connection");
                }
                tracing::debug!("write connection reopened after a failed batch");
            }
            Err(err) => {
                // Asked again before the next batch (which would otherwise run on the connection
                // that failed, and only its failure would ask again).
                self.reopen_pending = true;
                tracing::warn!(error = %err, "could not reopen the write connection; will retry before the next batch")
            }
        }
    }

    async fn commit_batch(&mut self, batch: &mut Vec<Job>) {
        // Reopen lazily, when there is something to write: a connection opened while the fault
        // lasts (a read-only file opens read-only) would keep failing after the fault is gone.
        if self.reopen_pending {
            self.reopen_pending = false;
            self.reopen().await;
        }
        // Under load almost every job is a callback: those go in one statement if they can.
        if batch.iter().any(|j| matches!(j, Job::Callback(..))) {
            let (mut callbacks, rest): (Vec<Job>, Vec<Job>) =
                batch.drain(..).partition(|j| matches!(j, Job::Callback(..)));
            *batch = rest;
            if let Err(err) = self.write_callbacks_fast(&mut callbacks).await {
                callbacks.append(batch);
                self.batch_failed(&err, callbacks);
                return;
            }
            // Left over only when a guard tripped: those go the transactional way.
            batch.append(&mut callbacks);
            if batch.is_empty() {
                return;
            }
        }
        let now = self.clock.now_ms();
        let mut head = self.head.clone();
        let started = std::time::Instant::now();
        let written = self.write(batch, &mut head, now).await;
        let written = match (written, self.database_file.as_ref().map(DatabaseFile::check)) {
            (Ok(_), Some(Err(gone))) => Err(gone),
            (written, _) => written,
        };
        match written {
            Ok(answers) => {
                self.head = head;
                // `/readyz`'s probes are not the service's writes: a readiness probe every second
                // would otherwise fill the group-commit figures with one-write commits.
                let probes = batch.iter().filter(|job| matches!(job, Job::Probe(_))).count();
                if probes > 0 {
                    self.metrics.probe_commits.inc();
                }
                self.record_commit(batch.len() - probes, started.elapsed());
                let _ = self.committed.send(self.head.seq);
                for (job, answer) in batch.drain(..).zip(answers) {
                    answer.send(job);
                }
            }
            Err(err) => self.batch_failed(&err, std::mem::take(batch)),
        }
    }

    /// After a commit, before its writes are answered (so whoever got an answer also sees the
    /// commit in `/metrics`): records its size and duration (unless it held only probes), clears
    /// the error `/readyz` reports, and says so once after a fault.
    fn record_commit(&mut self, writes: usize, took: std::time::Duration) {
        if writes > 0 {
            self.metrics.commit_writes.observe(writes as f64);
            self.metrics.commit_seconds.observe(took.as_secs_f64());
        }
        if !probe_commit_clears(writes, self.write_failed_at_ms, self.clock.now_ms()) {
            self.health.note_recovering();
            return;
        }
        self.health.set(None);
        self.write_failed_at_ms = None;
        if self.failed_since_commit > 0 {
            tracing::info!(failed_batches = self.failed_since_commit, "writes commit again after a fault");
            self.failed_since_commit = 0;
        }
    }

    /// Answers every job of a batch that did not commit with the error (the requests get 503)
    /// and prepares the next batch to start clean. Logged at most every ten seconds: during a
    /// fault (disk full, read-only file) every batch fails the same way.
    fn batch_failed(&mut self, err: &StoreError, jobs: Vec<Job>) {
        let now_ms = self.clock.now_ms();
        if jobs.iter().any(|job| !matches!(job, Job::Probe(_))) {
            self.write_failed_at_ms = Some(now_ms);
        }
        self.metrics.failed_commits.inc();
        self.failed_since_commit += 1;
        if let Some(batches) = self.failure_log.hit(now_ms) {
            tracing::error!(error = %err, jobs = jobs.len(), failed_batches_since_last_line = batches,
                "write batch failed; its requests were answered 503 (see /readyz)");
        }
        self.health.set(Some(err.to_string()));
        // The head may have been refreshed for a transaction that did not commit.
        self.data_version = None;
        for job in jobs {
            job.fail(err);
        }
        self.reopen_pending = true;
    }

    /// Stores callbacks through the fast path ([`insert_callbacks_sql`], guarded), at most
    /// [`FAST_ROWS`] per statement, answering each statement's callbacks once it has committed.
    /// Written jobs are removed from `jobs`; what is left when a guard trips goes the
    /// transactional way.
    async fn write_callbacks_fast(&mut self, jobs: &mut Vec<Job>) -> Result<(), StoreError> {
        while !jobs.is_empty() {
            let n = jobs.len().min(FAST_ROWS);
            let started = std::time::Instant::now();
            let Some(acks) = self.write_fast_chunk(&jobs[..n]).await? else { return Ok(()) };
            if let Some(file) = &self.database_file {
                file.check()?;
            }
            self.record_commit(n, started.elapsed());
            let _ = self.committed.send(self.head.seq);
            for (job, ack) in jobs.drain(..n).zip(acks) {
                if let Job::Callback(_, tx) = job {
                    let _ = tx.send(Ok(ack));
                }
            }
        }
        Ok(())
    }

    /// One fast-path statement over `chunk` (callback jobs only). `None`: a guard tripped and
    /// nothing was written.
    async fn write_fast_chunk(&mut self, chunk: &[Job]) -> Result<Option<Vec<CallbackAck>>, StoreError> {
        let callbacks: Vec<&NewCallback> = chunk
            .iter()
            .filter_map(|j| match j {
                Job::Callback(cb, _) => Some(&**cb),
                _ => None,
            })
            .collect();
        let rows = callbacks.len();
        // Assumed new, all of them: the statement's guard checks that.
        let plan = plan_callbacks(callbacks, self.head.clone(), &mut HashMap::with_capacity(rows));
        if self.fast_sql.len() < rows {
            self.fast_sql.resize_with(rows, String::new);
        }
        let sql = &mut self.fast_sql[rows - 1];
        if sql.is_empty() {
            *sql = insert_callbacks_sql(rows, true);
        }
        let mut query = bind_callback_rows(sqlx::query(sql.as_str()), &plan).bind(self.head.seq);
        for cb in &plan.callbacks {
            query = query.bind(cb.event.dedup_key.as_str());
        }
        // `execute`, not RETURNING: sqlx would hand each returned row across threads one by one.
        // The guards make the count enough: either every row was inserted or upserted (all new
        // keys with exactly the seqs planned), or a guard tripped and nothing was written.
        let done = query.execute(&mut self.conn).await?;
        match done.rows_affected() {
            0 => return Ok(None),
            n if n == rows as u64 => {}
            n => {
                // Cannot happen while the guards hold; never answer 200 on a surprise.
                self.data_version = None;
                return Err(unexpected_rows_written(rows, n));
            }
        }
        self.head = plan.head;
        Ok(Some(plan.acks))
    }

    async fn write(&mut self, batch: &[Job], head: &mut ChainHead, now: i64) -> Result<Vec<Answer>, StoreError> {
        let mut tx = self.conn.begin_with(BEGIN_WRITE).await?;
        refresh_head(&mut tx, &mut self.data_version, head).await?;
        let mut answers: Vec<Answer> = (0..batch.len()).map(|_| Answer::Pending).collect();

        // Promotions first claim their quarantine row, so that a row another process promoted in
        // the meantime (two `quarantine reverify` runs at once) is skipped instead of counting its
        // event's delivery twice. A claimed promotion is then stored exactly like a callback.
        let promote_ids: Vec<Value> = batch
            .iter()
            .filter_map(|j| match j {
                Job::Promote(p, _) => Some(json!([p.quarantine_id, p.callback.body_sha256])),
                _ => None,
            })
            .collect();
        let mut claimed: std::collections::HashSet<i64> = if promote_ids.is_empty() {
            std::collections::HashSet::new()
        } else {
            sqlx::query_scalar(CLAIM_QUARANTINE)
                .bind(Value::Array(promote_ids).to_string())
                .bind(now)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect()
        };

        // Callbacks: look up which events are stored already (true until the commit: this
        // transaction holds the write lock), then the same statement as the fast path, unguarded.
        let cb_jobs: Vec<(usize, &NewCallback)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, j)| match j {
                Job::Callback(cb, _) => Some((i, &**cb)),
                // `remove`: the same row twice in one batch is promoted once.
                Job::Promote(p, _) if claimed.remove(&p.quarantine_id) => Some((i, &p.callback)),
                _ => None,
            })
            .collect();
        if !cb_jobs.is_empty() {
            let keys: Vec<&str> = cb_jobs.iter().map(|(_, cb)| cb.event.dedup_key.as_str()).collect();
            let mut stored: HashMap<String, i64> = sqlx::query_as(STORED_KEYS)
                .bind(json!(keys).to_string())
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            for chunk in cb_jobs.chunks(FAST_ROWS) {
                let plan = plan_callbacks(chunk.iter().map(|&(_, cb)| cb).collect(), head.clone(), &mut stored);
                let sql = insert_callbacks_sql(chunk.len(), false);
                // Not kept prepared: this path is rare, and the fast path's statements should stay.
                let done = bind_callback_rows(sqlx::query(&sql).persistent(false), &plan).execute(&mut *tx).await?;
                if done.rows_affected() != chunk.len() as u64 {
                    return Err(unexpected_rows_written(chunk.len(), done.rows_affected()));
                }
                *head = plan.head;
                for (&(i, _), ack) in chunk.iter().zip(plan.acks) {
                    answers[i] = Answer::Callback(ack);
                }
            }
        }

        // Promotions: record which event each claimed row became, in this same transaction, so a
        // row is marked promoted if and only if its event is stored.
        let mut marks = Vec::new();
        for (i, job) in batch.iter().enumerate() {
            let Job::Promote(p, _) = job else { continue };
            answers[i] = match &answers[i] {
                Answer::Callback(ack) => {
                    // Whether this promotion stored the event, or added a delivery to one stored
                    // already (reconciliation measures lateness to the first kind only).
                    marks.push(json!([p.quarantine_id, ack.seq, i64::from(!ack.duplicate)]));
                    Answer::Promote(PromotionResult::Promoted(*ack))
                }
                _ => Answer::Promote(PromotionResult::AlreadyPromoted),
            };
        }
        if !marks.is_empty() {
            sqlx::query(MARK_QUARANTINE_PROMOTED).bind(Value::Array(marks).to_string()).execute(&mut *tx).await?;
        }

        // Rejections: metadata rows, then prune beyond the cap.
        let rejections: Vec<Value> = batch
            .iter()
            .filter_map(|j| match j {
                Job::Rejection(r, _) => {
                    Some(json!([r.received_at_ms, r.remote_addr, r.reason, r.body_sha256, r.body_size]))
                }
                _ => None,
            })
            .collect();
        if !rejections.is_empty() {
            sqlx::query(INSERT_REJECTIONS).bind(Value::Array(rejections).to_string()).execute(&mut *tx).await?;
            sqlx::query(PRUNE_REJECTIONS).bind(self.limits.rejection_cap).execute(&mut *tx).await?;
        }

        // Everything else is low volume: one statement per job.
        for (i, job) in batch.iter().enumerate() {
            match job {
                Job::Rejection(..) => answers[i] = Answer::Unit,
                Job::Probe(..) => {
                    // A real commit, larger than one callback's (see migration 0003): a full disk
                    // or read-only file shows up here too, not only a lock held elsewhere. Several
                    // probes in one batch rewrite the same pages, written once.
                    sqlx::query(
                        "INSERT INTO writer_probe (id, probed_at_ms, ballast) VALUES (1, ?1, zeroblob(?2))
                         ON CONFLICT (id) DO UPDATE SET probed_at_ms = excluded.probed_at_ms, ballast = excluded.ballast",
                    )
                    .bind(now)
                    .bind(PROBE_BALLAST_BYTES)
                    .execute(&mut *tx)
                    .await?;
                    answers[i] = Answer::Unit;
                }
                Job::Purge(filter, _) => {
                    let sizes: Vec<i64> = super::quarantine::purge_query(super::quarantine::PURGE_HELD, filter)
                        .fetch_all(&mut *tx)
                        .await?;
                    answers[i] = Answer::Purged(Purged::from_sizes(&sizes));
                }
                Job::Quarantine(q, _) => {
                    let held: i64 = sqlx::query_scalar(super::quarantine::COUNT_HELD).fetch_one(&mut *tx).await?;
                    if held >= self.limits.quarantine_cap {
                        answers[i] = Answer::Quarantine(None);
                    } else {
                        let id: i64 = sqlx::query_scalar(
                            "INSERT INTO quarantine (received_at_ms, remote_addr, reason, headers_json, raw_body, body_sha256)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                        )
                        .bind(q.received_at_ms)
                        .bind(&q.remote_addr)
                        .bind(q.reason)
                        .bind(&q.headers_json)
                        .bind(&q.raw_body)
                        .bind(chain::sha256_hex(&q.raw_body))
                        .fetch_one(&mut *tx)
                        .await?;
                        answers[i] = Answer::Quarantine(Some(id));
                    }
                }
                Job::Intent(new, _) => {
                    let inserted: Option<i64> = sqlx::query_scalar(
                        "INSERT INTO calls (op, owner, friend, pair_key, idempotency_key, requested_at_ms, head_seq_at_intent)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                         ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                    )
                    .bind(new.op.as_str())
                    .bind(&new.owner)
                    .bind(&new.friend)
                    .bind(pair_key(&new.owner, &new.friend))
                    .bind(&new.idempotency_key)
                    .bind(now)
                    // Every seq up to here commits no later than this call (see migration 0008).
                    .bind(head.seq)
                    .fetch_optional(&mut *tx)
                    .await?;
                    answers[i] = match inserted {
                        Some(id) => Answer::Intent(Box::new(IntentResult::Created(CallRecord {
                            id,
                            op: new.op,
                            owner: new.owner.clone(),
                            friend: new.friend.clone(),
                            idempotency_key: new.idempotency_key.clone(),
                            requested_at_ms: now,
                            ..CallRecord::default()
                        }))),
                        None => {
                            let row = sqlx::query(&format!("{} WHERE idempotency_key = ?1", super::SELECT_CALL))
                                .bind(&new.idempotency_key)
                                .fetch_one(&mut *tx)
                                .await?;
                            Answer::Intent(Box::new(IntentResult::Existing(CallRecord::from_row(&row)?)))
                        }
                    };
                }
                Job::Outcome(o, _) => {
                    let rec = record_outcome(&mut tx, head, o, now).await?;
                    answers[i] = Answer::Outcome(Box::new(rec));
                }
                Job::Sent(id, _) => {
                    // Marked already (a retry whose first try committed after all) is as good.
                    let marked = sqlx::query(
                        "UPDATE calls SET sent_at_ms = ?1 WHERE id = ?2 AND sent_at_ms IS NULL AND outcome IS NULL",
                    )
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    let refused = if marked == 0 {
                        let state: Option<(Option<i64>, Option<String>)> =
                            sqlx::query_as("SELECT sent_at_ms, outcome FROM calls WHERE id = ?1")
                                .bind(id)
                                .fetch_optional(&mut *tx)
                                .await?;
                        // This job's own answer, not the batch's: the jobs sharing it commit.
                        match state {
                            Some((Some(_), None)) => None,
                            Some((_, Some(outcome))) => {
                                Some(format!("call {id} already has its outcome ({outcome}); it is not sent again"))
                            }
                            _ => Some(format!("call {id} has no recorded intent")),
                        }
                    } else {
                        None
                    };
                    answers[i] = Answer::Sent(refused);
                }
                Job::Callback(..) | Job::Promote(..) => {}
            }
        }
        tx.commit().await?;
        Ok(answers)
    }
}

async fn record_outcome(
    tx: &mut SqliteConnection,
    head: &mut ChainHead,
    o: &CallOutcome,
    now: i64,
) -> Result<CallRecord, StoreError> {
    let seq = head.seq + 1;
    let c = &o.call;
    let content = CallContent {
        seq,
        id: c.id,
        op: c.op.as_str(),
        owner: &c.owner,
        friend: &c.friend,
        idempotency_key: c.idempotency_key.as_deref(),
        requested_at_ms: c.requested_at_ms,
        completed_at_ms: now,
        outcome: o.outcome.as_str(),
        upstream_status: o.upstream_status,
        upstream_error: o.upstream_error.as_deref(),
        attempts: o.attempts,
        response_body: o.response_body.as_deref(),
        outcome_detail: o.outcome_detail.as_deref(),
    };
    let hash = chain::link(&head.hash, &content.canonical());
    let done: Option<Option<i64>> = sqlx::query_scalar(
        "UPDATE calls SET completed_at_ms = ?1, outcome = ?2, upstream_status = ?3, upstream_error = ?4,
                attempts = ?5, response_body = ?6, seq = ?7, prev_hash = ?8, chain_hash = ?9, outcome_detail = ?11
         WHERE id = ?10 AND outcome IS NULL RETURNING sent_at_ms",
    )
    .bind(now)
    .bind(o.outcome.as_str())
    .bind(o.upstream_status)
    .bind(&o.upstream_error)
    .bind(o.attempts)
    .bind(&o.response_body)
    .bind(seq)
    .bind(&head.hash)
    .bind(&hash)
    .bind(c.id)
    .bind(&o.outcome_detail)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(sent_at_ms) = done else {
        // Recorded already: a retry whose earlier attempt committed after all (its answer was an
        // error). The first outcome stands, and the retry gets it, instead of failing the batch
        // and every callback that shares it.
        let row = sqlx::query(&format!("{} WHERE id = ?1 AND outcome IS NOT NULL", super::SELECT_CALL))
            .bind(c.id)
            .fetch_optional(&mut *tx)
            .await?;
        return match row {
            Some(row) => Ok(CallRecord::from_row(&row)?),
            None => Err(StoreError::Write(format!("call {} has no recorded intent", c.id))),
        };
    };
    let record_hash = hash.clone();
    *head = ChainHead { seq, hash };
    Ok(CallRecord {
        completed_at_ms: Some(now),
        outcome: o.outcome,
        upstream_status: o.upstream_status,
        upstream_error: o.upstream_error.clone(),
        attempts: Some(o.attempts),
        response_body: o.response_body.clone(),
        outcome_detail: o.outcome_detail.clone(),
        seq: Some(seq),
        chain_hash: Some(record_hash),
        sent_at_ms,
        ..c.clone()
    })
}

/// Batch sizes and time spent writing, logged at debug level every 10 s: the first thing to look
/// at when ingest is slower than expected (small batches under load mean the writer is not the
/// bottleneck; long write times mean the disk or SQLite is).
#[derive(Default)]
struct BatchStats {
    since: Option<std::time::Instant>,
    batches: u64,
    jobs: u64,
    busy: std::time::Duration,
    user_chunks: u64,
    user_chunks_busy: std::time::Duration,
}

impl BatchStats {
    fn record_user_chunk(&mut self, took: std::time::Duration) {
        self.user_chunks += 1;
        self.user_chunks_busy += took;
    }

    fn record(&mut self, jobs: usize, took: std::time::Duration) {
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        self.batches += 1;
        self.jobs += jobs as u64;
        self.busy += took;
        let elapsed = since.elapsed();
        if elapsed >= std::time::Duration::from_secs(10) {
            tracing::debug!(
                batches = self.batches,
                jobs = self.jobs,
                avg_batch = self.jobs as f64 / self.batches.max(1) as f64,
                busy_pct = 100.0 * self.busy.as_secs_f64() / elapsed.as_secs_f64(),
                avg_write_ms = 1e3 * self.busy.as_secs_f64() / self.batches.max(1) as f64,
                user_chunks = self.user_chunks,
                user_chunks_pct = 100.0 * self.user_chunks_busy.as_secs_f64() / elapsed.as_secs_f64(),
                "writer activity"
            );
            *self = BatchStats::default();
        }
    }
}

enum Answer {
    Pending,
    Unit,
    Callback(CallbackAck),
    Quarantine(Option<i64>),
    Promote(PromotionResult),
    Intent(Box<IntentResult>),
    Outcome(Box<CallRecord>),
    /// Why the call is not to be sent, if it is not.
    Sent(Option<String>),
    Purged(Purged),
}

impl Answer {
    fn send(self, job: Job) {
        // A dropped receiver means the request went away (client disconnect, timeout): the data
        // is committed regardless, which is what matters.
        match (job, self) {
            (Job::Callback(_, tx), Answer::Callback(a)) => drop(tx.send(Ok(a))),
            (Job::Rejection(_, tx), Answer::Unit) => drop(tx.send(Ok(()))),
            (Job::Probe(tx), Answer::Unit) => drop(tx.send(Ok(()))),
            (Job::Sent(_, tx), Answer::Sent(refused)) => drop(tx.send(Ok(refused))),
            (Job::Quarantine(_, tx), Answer::Quarantine(id)) => drop(tx.send(Ok(id))),
            (Job::Promote(_, tx), Answer::Promote(r)) => drop(tx.send(Ok(r))),
            (Job::Intent(_, tx), Answer::Intent(r)) => drop(tx.send(Ok(*r))),
            (Job::Outcome(_, tx), Answer::Outcome(r)) => drop(tx.send(Ok(*r))),
            (Job::Purge(_, tx), Answer::Purged(r)) => drop(tx.send(Ok(r))),
            (job, _) => job.fail(&StoreError::Write("writer produced no answer for a job".into())),
        }
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;

    #[test]
    fn probes_alone_end_a_fault_only_once_real_writes_have_not_failed_for_a_while() {
        let now = 1_000_000;
        assert!(probe_commit_clears(0, None, now), "no fault of real writes: a probe is a recovery");
        assert!(probe_commit_clears(3, Some(now), now), "a real write is always a recovery");
        assert!(!probe_commit_clears(0, Some(now - 1), now), "callbacks just failed: the probe's word is not enough");
        assert!(!probe_commit_clears(0, Some(now - PROBE_TRUSTED_AFTER_MS + 1), now));
        assert!(probe_commit_clears(0, Some(now - PROBE_TRUSTED_AFTER_MS), now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: u64) -> String {
        let call_id = format!("demo-org#demo-app_{n}");
        let ts = "1700000000000";
        let security = crate::signature::easemob::sign(&call_id, "s", ts);
        format!(
            r#"{{"chat_type":"roster","callId":"{call_id}","security":"{security}","payload":{{"operation":"add"}},"appkey":"demo-org#demo-app","from":"u{n}","to":"v{n}","eventType":"chat","msg_id":"{n}","timestamp":{ts}}}"#
        )
    }

    fn new_callback(n: u64) -> NewCallback {
        crate::store::test_callback(&body(n), 1_000 + n as i64)
    }

    #[test]
    fn insert_sql_has_one_placeholder_per_bound_value() {
        for rows in [1, 2, FAST_ROWS] {
            let guarded = insert_callbacks_sql(rows, true);
            assert_eq!(guarded.matches('?').count(), rows * FAST_COLUMNS + 1 + rows, "{rows} rows, guarded");
            let plain = insert_callbacks_sql(rows, false);
            assert_eq!(plain.matches('?').count(), rows * FAST_COLUMNS, "{rows} rows, unguarded");
        }
    }

    /// A writer of its own on `url`'s database, as another process would run one (the service's
    /// store keeps its writer running meanwhile): driven batch by batch by the test.
    async fn second_writer(url: &str) -> Writer {
        use sqlx::ConnectOptions;
        let connect = super::super::connect_options(url).expect("options");
        let mut conn = connect.connect().await.expect("connect");
        let head = super::super::reads::load_head(&mut conn).await.expect("head");
        let (committed, _) = watch::channel(head.seq);
        Writer {
            conn,
            connect,
            reopen_pending: false,
            head,
            clock: crate::clock::system(),
            limits: WriterLimits { max_batch: 64, rejection_cap: 1_000, quarantine_cap: 1_000 },
            committed,
            health: Arc::new(WriterHealth::default()),
            data_version: None,
            fast_sql: Vec::new(),
            users_indexed_upto: 0,
            users_indexed_at: std::time::Instant::now(),
            metrics: WriterMetrics::default(),
            failure_log: LogThrottle::new(10_000),
            users_failure_log: LogThrottle::new(10_000),
            failed_since_commit: 0,
            write_failed_at_ms: None,
            database_file: None,
            _instance_lock: None,
            checkpoints: CheckpointWatch::default(),
        }
    }

    /// `PRAGMA data_version` counts the commits of other connections as seen by one connection,
    /// so a value read on the connection a writer replaced says nothing about the new one. A
    /// writer that kept it across a reopen (after a failed `callback_users` chunk, say) took its
    /// stale head for current when another process had stored an event meanwhile, and gave the
    /// next call outcome that event's seq: two records on one seq, a forked chain, no error.
    #[tokio::test]
    async fn a_reopened_connection_reloads_the_head_another_writer_moved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, url) = crate::store::open_test_store(&dir).await;
        let mut writer = second_writer(&url).await;

        let (tx, rx) = oneshot::channel();
        writer.commit_batch(&mut vec![Job::Intent(crate::store::test_intent("alice", "bob"), tx)]).await;
        let Ok(Ok(IntentResult::Created(call))) = rx.await else { panic!("intent not created") };
        assert!(writer.data_version.is_some(), "the transactional write noted the connection's data_version");

        // The other writer stores an event: seq 1.
        let ack = store.insert_callback(new_callback(1)).await.expect("stored");
        assert_eq!(ack.seq, 1);

        // This writer's connection is replaced, then it records the call's outcome.
        writer.reopen_pending = true;
        let (tx, rx) = oneshot::channel();
        let outcome = Box::new(crate::store::test_succeeded(call));
        writer.commit_batch(&mut vec![Job::Outcome(outcome, tx)]).await;
        let recorded = rx.await.expect("answered").expect("recorded");
        assert_eq!(recorded.seq, Some(2), "the next seq after the other writer's event");
        let verdict = crate::commands::audit::verify(&store).await.expect("verify");
        assert!(matches!(verdict, crate::commands::audit::Verdict::Intact { records: 2, .. }), "{verdict:?}");
        writer.conn.close().await.expect("close");
        store.close().await;
    }

    /// Stores callbacks `from..from + 50` in one batch through `writer`.
    async fn store_fifty(writer: &mut Writer, from: u64) {
        let (mut batch, answers): (Vec<Job>, Vec<_>) = (from..from + 50)
            .map(|n| {
                let (tx, rx) = oneshot::channel();
                (Job::Callback(Box::new(new_callback(n)), tx), rx)
            })
            .unzip();
        writer.commit_batch(&mut batch).await;
        for answer in answers {
            answer.await.expect("answered").expect("stored");
        }
    }

    /// A reader that keeps a snapshot open stops checkpoints short of the frames written after
    /// it began: the writer's check exports the lag and flags it, and once the reader ends the
    /// next check copies everything and clears it. Real SQLite file, real second connection.
    #[tokio::test]
    async fn a_reader_holding_a_snapshot_shows_as_checkpoint_lag_until_it_ends() {
        use sqlx::{ConnectOptions, Connection};
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, url) = crate::store::open_test_store(&dir).await;
        let mut writer = second_writer(&url).await;
        let clock = crate::clock::ManualClock::new(1_700_000_000_000);
        writer.clock = clock.clone();
        writer.checkpoints.warn_frames = 10;
        store_fifty(&mut writer, 1).await;
        writer.checkpoints.maybe_check(&mut writer.conn, &writer.metrics, writer.clock.now_ms()).await;
        assert_eq!(writer.metrics.checkpoint_lag_frames.get(), 0, "nobody reads: everything is copied");

        let mut reader = super::super::connect_options(&url).expect("options").connect().await.expect("reader");
        let mut snapshot = reader.begin().await.expect("begin");
        let seen: i64 =
            sqlx::query_scalar("SELECT count(*) FROM callbacks").fetch_one(&mut *snapshot).await.expect("read");
        assert_eq!(seen, 50);
        for round in 0..4 {
            store_fifty(&mut writer, 100 + round * 50).await;
        }
        writer.checkpoints.maybe_check(&mut writer.conn, &writer.metrics, writer.clock.now_ms()).await;
        assert_eq!(writer.metrics.checkpoint_lag_frames.get(), 0, "checked less than 10 s ago: not run again");
        clock.advance_ms(super::super::checkpoint::CHECK_EVERY_MS);
        writer.checkpoints.maybe_check(&mut writer.conn, &writer.metrics, writer.clock.now_ms()).await;
        let lag = writer.metrics.checkpoint_lag_frames.get();
        assert!(lag >= 10, "four commits after the reader's snapshot stay in the WAL: {lag}");
        assert!(writer.checkpoints.behind());
        assert_eq!(writer.metrics.checkpoint_failures.get(), 0, "held back is not failed");

        snapshot.rollback().await.expect("end the read");
        clock.advance_ms(super::super::checkpoint::CHECK_EVERY_MS);
        writer.checkpoints.maybe_check(&mut writer.conn, &writer.metrics, writer.clock.now_ms()).await;
        assert_eq!(writer.metrics.checkpoint_lag_frames.get(), 0, "the reader is gone: everything is copied");
        assert!(!writer.checkpoints.behind());
        reader.close().await.expect("close");
        writer.conn.close().await.expect("close");
        store.close().await;
    }

    /// Recording an outcome is retried when a commit reports failure, and a commit can report
    /// failure and still have happened: the repeat then gets the outcome already recorded (the
    /// first stands), not an error that would fail every write batched with it.
    #[tokio::test]
    async fn an_outcome_recorded_again_gets_the_first_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = crate::store::open_test_store(&dir).await;
        let IntentResult::Created(call) =
            store.insert_call_intent(crate::store::test_intent("alice", "bob")).await.expect("intent")
        else {
            panic!("intent not created")
        };
        let first = store.mark_call_outcome(crate::store::test_succeeded(call.clone())).await.expect("recorded");
        let mut again = crate::store::test_succeeded(call);
        again.outcome = Outcome::Failed;
        let ack = store.insert_callback(new_callback(1)).await.expect("stored");
        let repeated = store.mark_call_outcome(again).await.expect("no error");
        assert_eq!(repeated, first, "the first outcome stands");
        assert_eq!(ack.seq, 2, "the callback came after the outcome");
        let verdict = crate::commands::audit::verify(&store).await.expect("verify");
        assert!(matches!(verdict, crate::commands::audit::Verdict::Intact { records: 2, .. }), "{verdict:?}");
        store.close().await;
    }

    /// More callbacks than one fast-path statement takes, queued before the writer looks (a
    /// current-thread runtime runs every spawned sender first), with repeats both inside a chunk
    /// and across chunks: a repeat in a later chunk trips that chunk's guard, so the batch is
    /// written partly fast, partly transactionally. Whatever the path, every distinct event gets
    /// one gap-free seq, repeats are answered as duplicates of it, and the chain verifies.
    #[tokio::test]
    async fn batches_larger_than_one_statement_with_repeats_store_each_event_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = crate::store::open_test_store(&dir).await;
        // 300 events; every 10th is delivered again right after itself, every 25th once more at
        // the end (a later chunk).
        let mut order: Vec<u64> = Vec::new();
        for n in 1..=300 {
            order.push(n);
            if n % 10 == 0 {
                order.push(n);
            }
        }
        order.extend((1..=300).filter(|n| n % 25 == 0));
        let handles: Vec<_> = order
            .iter()
            .map(|&n| {
                let store = store.clone();
                tokio::spawn(async move { (n, store.insert_callback(new_callback(n)).await) })
            })
            .collect();
        let mut seq_of: HashMap<u64, i64> = HashMap::new();
        let mut firsts: HashMap<u64, usize> = HashMap::new();
        for h in handles {
            let (n, ack) = h.await.expect("join");
            let ack = ack.expect("stored");
            assert_eq!(*seq_of.entry(n).or_insert(ack.seq), ack.seq, "event {n} answered with two seqs");
            if !ack.duplicate {
                *firsts.entry(n).or_default() += 1;
            }
        }
        assert_eq!(seq_of.len(), 300);
        assert!(firsts.values().all(|&c| c == 1) && firsts.len() == 300, "one first delivery per event");
        let mut seqs: Vec<i64> = seq_of.values().copied().collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=300).collect::<Vec<i64>>(), "gap-free numbering");
        assert_eq!(store.count_callbacks().await.expect("count"), 300);
        let deliveries: i64 = sqlx::query_scalar("SELECT sum(deliveries) FROM callbacks")
            .fetch_one(store.read_pool())
            .await
            .expect("sum");
        assert_eq!(deliveries, order.len() as i64, "every delivery counted");
        let verdict = crate::commands::audit::verify(&store).await.expect("verify");
        assert!(matches!(verdict, crate::commands::audit::Verdict::Intact { records: 300, .. }), "{verdict:?}");
        store.close().await;
    }
}
