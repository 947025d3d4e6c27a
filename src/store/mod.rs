//! All SQL lives here: opening the database, migrations, the group-commit writer, and every
//! query the service and the CLI run. No other module knows a table name, so moving to
//! PostgreSQL later means rewriting this module only.
//!
//! Writes go through one task ([`writer`]) that owns the only write connection; reads use a
//! separate pool (WAL lets them run while the writer commits).

pub mod chain;
mod checkpoint;
pub mod journal;
pub mod quarantine;
mod reads;
pub mod seed;
pub mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch};

pub use journal::*;
pub use reads::*;
pub use writer::{
    CallOutcome, CallbackAck, ChainHead, IntentResult, NewCallback, Promotion, PromotionResult, PurgeFilter, Purged,
    QuarantineEntry, Rejection, WriterHealth, WriterLimits, pair_key,
};

use crate::clock::SharedClock;
use crate::config::SqliteSynchronous as SyncMode;
use crate::metrics::WriterMetrics;
use crate::model::{CallOp, Outcome};
use writer::{Job, Writer};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The write queue is full: the caller should answer 503 and let the client retry.
    #[error("the write queue is full")]
    QueueFull,
    /// The writer task is gone (shutting down).
    #[error("the writer has stopped")]
    WriterGone,
    /// A write batch failed; nothing in it was committed.
    #[error("database write failed: {0}")]
    Write(String),
    /// The database file was removed or replaced under the running service: writes would go to
    /// a file that is lost when it stops, so none is made. Unlike [`StoreError::Write`], this
    /// does not pass by waiting: an operator has to put the file back and restart the service.
    #[error("database write failed: {0}")]
    FileGone(String),
    /// A WAL file without its database (missing or empty): the file was removed while a service
    /// wrote to it, and the WAL holds its last writes. Opening would make a new, empty database
    /// beside it, and the history would be gone without a word.
    #[error(
        "{wal} is there but {database} is {state}: the database file was removed (or lost) while a service wrote \
         to it, and this WAL holds its last writes, not a database. Starting would make a new, empty database \
         beside it. Put the database back (the copy a stopped service saved as {database}.rescued-*, or a \
         backup) and start again; to start afresh on purpose, move {wal} and {database}-shm away first. \
         Nothing was changed"
    )]
    LoneWal {
        /// The database file's path.
        database: String,
        /// Its WAL's path.
        wal: String,
        /// `missing` or `empty`.
        state: &'static str,
    },
    /// The database file is missing (or empty) and a copy a stopped service saved of it, when it
    /// was removed under the service, lies beside it.
    #[error(
        "{database} is {state}, and {copy} is there: the copy a service saved when its database file was removed \
         under it. To go on with that history, move {copy} to {database}; to start afresh on purpose, move the \
         copy elsewhere first. Nothing was changed"
    )]
    Rescued {
        /// The database file's path.
        database: String,
        /// The newest rescued copy's path.
        copy: String,
        /// `missing` or `empty`.
        state: &'static str,
    },
    /// A database error. Its text includes sqlx's (which includes SQLite's), so it is not also
    /// returned as the `source`: `error: {err:#}` would print each cause two or three times.
    #[error("database error: {0}")]
    Sqlx(sqlx::Error),
    /// Applying migrations failed (text included as for [`StoreError::Sqlx`]).
    #[error("database migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// The database was last opened by a newer friendhook: this one does not know its schema.
    #[error(
        "{database}: schema version {found}, written by a newer friendhook (this one knows up to \
         version {known}); use that release or a later one. Nothing was changed"
    )]
    SchemaAhead {
        /// The database URL as given.
        database: String,
        /// Latest migration applied to the file.
        found: i64,
        /// Latest migration this binary has.
        known: i64,
    },
    /// Another `friendhook serve` holds this database.
    #[error(
        "{database} is in use by another friendhook service ({lock} is locked{holder}); stop it first, or give \
         this command a database of its own. Nothing was changed"
    )]
    InUse {
        /// The database URL as given.
        database: String,
        /// The lock file.
        lock: String,
        /// `, by process N` when the lock file names its holder.
        holder: String,
    },
    /// The journal is shorter than the file's own references to it: records were removed from
    /// its end. Appending would hand their seqs to new records and erase the trace.
    #[error(
        "the journal ends at seq {head}, but the file still refers to seq {seq} ({what}): records \
         were removed from the end of the journal, or the file was replaced by an older copy of itself. Appending \
         now would give those seqs to new records and erase this trace, so nothing was changed. Keep a copy of the \
         file as it is and check it with `friendhook audit verify --database-url {database}`; to go on writing to \
         this file anyway, start the service once with --accept-journal-cut (FRIENDHOOK_ACCEPT_JOURNAL_CUT=true)"
    )]
    JournalCut {
        /// The database URL as given.
        database: String,
        /// The last stored record's seq.
        head: i64,
        /// The highest seq referred to.
        seq: i64,
        /// What refers to it.
        what: &'static str,
    },
    /// The service was pointed at an in-memory database.
    #[error(
        "{database} is an in-memory database: each connection would see its own, so callbacks \
         acknowledged by the writer would be invisible to reads and gone at exit; give a file, e.g. \
         sqlite://friendhook.db"
    )]
    InMemory {
        /// The database URL as given.
        database: String,
    },
    /// A command that reads was pointed at an in-memory database: a new, empty one of its own.
    #[error(
        "{database} is an in-memory database, new and empty for this command alone: there is nothing in it to \
         read. Give the service's database file, e.g. sqlite://friendhook.db"
    )]
    InMemoryRead {
        /// The database URL as given.
        database: String,
    },
    /// `--database-url` names no file (empty, or `sqlite://` alone): SQLite would open a private
    /// temporary database per connection, so acknowledged callbacks would be invisible and lost.
    #[error(
        "--database-url (FRIENDHOOK_DATABASE_URL) `{database}` names no database file; give one, e.g. sqlite://friendhook.db. Nothing was \
         changed"
    )]
    NoFileName {
        /// The database URL as given.
        database: String,
    },
    /// A command that writes was given a URL that opens the database read-only.
    #[error(
        "{database} opens the database read-only (`mode=ro` or `immutable`), and this command writes to it; drop \
         that parameter (the read-only commands open a service's database without it). Nothing was changed"
    )]
    ReadOnlyUrl {
        /// The database URL as given.
        database: String,
    },
    /// The service was pointed at an SQLite database of something else.
    #[error(
        "{database} is an SQLite database of something else (it has a table `{table}`, but not friendhook's schema); \
         give friendhook a file of its own, e.g. sqlite://friendhook.db. Nothing was changed"
    )]
    Foreign {
        /// The database URL as given.
        database: String,
        /// One of its tables, to recognise it by.
        table: String,
    },
    /// A read-only command could not open a database file that exists.
    #[error(
        "{database}: SQLite cannot open it ({cause}). Even a reader of a friendhook database (WAL mode) \
         creates `<file>-shm` beside it: if its directory is read-only (a mounted backup, say), copy the \
         file, with its `-wal` if there is one, to a writable directory and point --database-url there"
    )]
    CannotOpen {
        /// The database URL as given.
        database: String,
        /// SQLite's message.
        cause: String,
    },
    /// `--database-url` is not an SQLite URL.
    #[error(
        "{database}: this release stores in SQLite only; give sqlite://<file>, e.g. sqlite://friendhook.db. \
         Nothing was changed"
    )]
    NotSqliteUrl {
        /// The database URL as given.
        database: String,
    },
    /// A read-only command was pointed at a file that does not exist.
    #[error(
        "{database}: no such database file (is --database-url right? `friendhook serve` creates it \
         on first start)"
    )]
    NoDatabase {
        /// The database URL as given.
        database: String,
    },
    /// `--database-url` names a directory.
    #[error("{database} is a directory; give a database file, e.g. sqlite://{example}. Nothing was changed")]
    IsDirectory {
        /// The database URL as given.
        database: String,
        /// A file path inside the directory, for the example.
        example: String,
    },
    /// `--database-url` names a file in a directory that does not exist.
    #[error("{database}: the directory {directory} does not exist; create it first (nothing was created)")]
    NoDirectory {
        /// The database URL as given.
        database: String,
        /// The directory that is missing.
        directory: String,
    },
    /// `--database-url` names a file that is not an SQLite database.
    #[error(
        "{database} is not an SQLite database (the file does not start with SQLite's header); is \
         --database-url right? Give a friendhook database, or a new path for `friendhook serve` to \
         create one. Nothing was changed"
    )]
    NotSqlite {
        /// The database URL as given.
        database: String,
    },
    /// A read-only command found an SQLite file without friendhook's schema.
    #[error(
        "{database} has no friendhook schema (is --database-url right? `friendhook serve` creates \
         the schema in a new file)"
    )]
    NoSchema {
        /// The database URL as given.
        database: String,
    },
    /// A query names an index the file does not have: it was dropped or renamed outside friendhook
    /// (the migrations create every index, and nothing of friendhook's drops one it reads through).
    #[error(
        "the database has no index `{name}`, which friendhook reads through: it was dropped or renamed outside \
         friendhook. `friendhook audit verify --database-url <the same URL>` names every index unlike friendhook's \
         and prints the one-line SQL that puts each back (run it with the service stopped)"
    )]
    IndexMissing {
        /// The index SQLite could not find.
        name: String,
    },
    /// A read-only command found a database whose schema is older than this binary's: it cannot
    /// upgrade it (read-only), and queries would fail on what is missing.
    #[error(
        "{database}: schema version {found}, this friendhook reads version {needed}; start \
         `friendhook serve --database-url {database}` once (it upgrades the schema at start-up, \
         keeping every row), then run this command again"
    )]
    SchemaBehind {
        /// The database URL as given.
        database: String,
        /// Latest migration applied to the file.
        found: i64,
        /// Latest migration this binary has.
        needed: i64,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // Reads name their index (`INDEXED BY`) so that SQLite cannot pick a slow plan; on a file
        // whose index was dropped or renamed by hand they fail with SQLite's bare "no such index",
        // which says nothing of the cause or the cure.
        if let sqlx::Error::Database(db) = &e
            && let Some(name) = db.message().strip_prefix("no such index: ")
        {
            return StoreError::IndexMissing { name: name.to_owned() };
        }
        StoreError::Sqlx(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(e)
    }
}

impl StoreError {
    /// SQLite's primary result code (the extended code's low byte) of the database error this
    /// carries, if it carries one.
    fn sqlite_primary_code(&self) -> Option<i32> {
        let (StoreError::Sqlx(sqlx::Error::Database(db))
        | StoreError::Migrate(sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(db)))) = self
        else {
            return None;
        };
        db.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff)
    }

    /// Whether SQLite refused to write because the file, its `-wal`/`-shm` files or their
    /// directory are read-only (permissions, a read-only mount, `chattr +i`).
    pub fn is_read_only(&self) -> bool {
        match self {
            // The writer's failures reach here as text (they are shared by every job of a batch).
            StoreError::Write(text) => text.contains("readonly database"),
            // SQLITE_READONLY and its extended codes (1544: the directory, 264: the file moved, ...).
            _ => self.sqlite_primary_code() == Some(8),
        }
    }

    /// Whether SQLite found the file damaged: `database disk image is malformed` (SQLITE_CORRUPT)
    /// or `file is not a database` (SQLITE_NOTADB), extended codes included.
    pub fn is_damaged(&self) -> bool {
        matches!(self.sqlite_primary_code(), Some(11 | 26))
    }

    /// Whether the message already names the database (so a caller should not prefix it with
    /// the URL again).
    pub fn names_the_database(&self) -> bool {
        matches!(
            self,
            StoreError::SchemaAhead { .. }
                | StoreError::SchemaBehind { .. }
                | StoreError::InUse { .. }
                | StoreError::InMemory { .. }
                | StoreError::InMemoryRead { .. }
                | StoreError::NotSqliteUrl { .. }
                | StoreError::NoDatabase { .. }
                | StoreError::IsDirectory { .. }
                | StoreError::NoDirectory { .. }
                | StoreError::NotSqlite { .. }
                | StoreError::NoSchema { .. }
                | StoreError::LoneWal { .. }
                | StoreError::Rescued { .. }
        )
    }

    pub(crate) fn clone_for_ack(&self) -> StoreError {
        match self {
            StoreError::QueueFull => StoreError::QueueFull,
            StoreError::WriterGone => StoreError::WriterGone,
            // Kept as it is: wrapped again, its text would read "database write failed: database
            // write failed: ..." in the answers and in /readyz.
            StoreError::Write(text) => StoreError::Write(text.clone()),
            StoreError::FileGone(text) => StoreError::FileGone(text.clone()),
            other => StoreError::Write(other.to_string()),
        }
    }
}

/// A call intent to record before anything is sent.
#[derive(Debug, Clone)]
pub struct NewCall {
    /// add / remove.
    pub op: CallOp,
    /// Owner user.
    pub owner: String,
    /// Friend user.
    pub friend: String,
    /// Optional client idempotency key.
    pub idempotency_key: Option<String>,
}

/// A stored call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// Call id.
    pub id: i64,
    /// add / remove.
    pub op: CallOp,
    /// Owner user.
    pub owner: String,
    /// Friend user.
    pub friend: String,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Intent time (epoch ms).
    pub requested_at_ms: i64,
    /// Outcome time.
    pub completed_at_ms: Option<i64>,
    /// Outcome (`InFlight` while none).
    pub outcome: Outcome,
    /// Easemob's HTTP status.
    pub upstream_status: Option<i64>,
    /// Easemob's error type.
    pub upstream_error: Option<String>,
    /// HTTP attempts.
    pub attempts: Option<i64>,
    /// Easemob's response body (JSON text).
    pub response_body: Option<String>,
    /// Why the call ended so, in friendhook's words, when it did not succeed (why the client
    /// gave up, whether an earlier attempt may have acted, what to check).
    pub outcome_detail: Option<String>,
    /// Journal position once the outcome is recorded.
    pub seq: Option<i64>,
    /// The chain link of the record at `seq`, once the outcome is recorded.
    pub chain_hash: Option<String>,
    /// When its turn under the rate limit came and it was about to be sent (migration 0010;
    /// not chained). `None` while it waits, and for a call that never was.
    pub sent_at_ms: Option<i64>,
}

impl Default for CallRecord {
    fn default() -> Self {
        Self {
            id: 0,
            op: CallOp::Add,
            owner: String::new(),
            friend: String::new(),
            idempotency_key: None,
            requested_at_ms: 0,
            completed_at_ms: None,
            outcome: Outcome::InFlight,
            upstream_status: None,
            upstream_error: None,
            attempts: None,
            response_body: None,
            outcome_detail: None,
            seq: None,
            chain_hash: None,
            sent_at_ms: None,
        }
    }
}

pub(crate) const SELECT_CALL: &str = "SELECT id, op, owner, friend, idempotency_key, requested_at_ms, completed_at_ms, \
     outcome, upstream_status, upstream_error, attempts, response_body, outcome_detail, seq, chain_hash, sent_at_ms \
     FROM calls";

impl CallRecord {
    pub(crate) fn from_row(row: &SqliteRow) -> Result<Self, sqlx::Error> {
        let outcome: Option<String> = row.try_get("outcome")?;
        Ok(Self {
            completed_at_ms: row.try_get("completed_at_ms")?,
            outcome: outcome.as_deref().and_then(Outcome::parse).unwrap_or(Outcome::InFlight),
            upstream_status: row.try_get("upstream_status")?,
            upstream_error: row.try_get("upstream_error")?,
            attempts: row.try_get("attempts")?,
            response_body: row.try_get("response_body")?,
            outcome_detail: row.try_get("outcome_detail")?,
            seq: row.try_get("seq")?,
            chain_hash: row.try_get("chain_hash")?,
            sent_at_ms: row.try_get("sent_at_ms")?,
            ..Self::intent_from_row(row)?
        })
    }

    /// The intent columns only (what exists before the outcome is recorded).
    pub(crate) fn intent_from_row(row: &SqliteRow) -> Result<Self, sqlx::Error> {
        let op: String = row.try_get("op")?;
        Ok(Self {
            id: row.try_get("id")?,
            op: CallOp::parse(&op).ok_or_else(|| sqlx::Error::Decode(format!("bad op {op}").into()))?,
            owner: row.try_get("owner")?,
            friend: row.try_get("friend")?,
            idempotency_key: row.try_get("idempotency_key")?,
            requested_at_ms: row.try_get("requested_at_ms")?,
            ..Self::default()
        })
    }
}

/// Options for opening the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite://path`.
    pub database_url: String,
    /// `synchronous` of the write connection.
    pub synchronous: SyncMode,
    /// Bounded queue in front of the writer.
    pub write_queue: usize,
    /// Writer limits.
    pub limits: WriterLimits,
    /// Read pool size.
    pub read_connections: u32,
    /// Close calls left without an outcome by a previous stop when opening (`unknown` if they were
    /// marked sent, `failed` not sent if not). Only the
    /// service itself may do this: another process opening the database while the service runs
    /// (e.g. `friendhook quarantine reverify`) would close calls that are still in flight.
    pub recover_interrupted_calls: bool,
    /// How long the writer waits for a lock held by another process before the write fails
    /// (and the request gets 503).
    pub busy_timeout: Duration,
    /// Hold `<database>.lock` exclusively while the writer runs, and refuse to open if another
    /// process holds it: for the service, of which one may run per database file (a second one
    /// would close the first one's calls in flight as `unknown`). Off for the commands that may
    /// run beside it (`quarantine reverify`).
    pub instance_lock: bool,
    /// Where the writer records its batches (the service registers these for `/metrics`).
    pub metrics: WriterMetrics,
    /// Open a file whose journal lost records from its end (see [`StoreError::JournalCut`]),
    /// with an ERROR in the log, instead of refusing it.
    pub accept_journal_cut: bool,
}

impl StoreOptions {
    /// Defaults for `database_url`.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            synchronous: SyncMode::Full,
            write_queue: 8192,
            limits: WriterLimits { max_batch: 512, rejection_cap: 10_000, quarantine_cap: 10_000 },
            read_connections: 4,
            recover_interrupted_calls: true,
            busy_timeout: Duration::from_secs(5),
            instance_lock: false,
            metrics: WriterMetrics::default(),
            accept_journal_cut: false,
        }
    }
}

/// Handle to the database: a read pool and the writer's queue. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    read: SqlitePool,
    jobs: mpsc::Sender<Job>,
    committed: watch::Receiver<i64>,
    health: Arc<WriterHealth>,
    database_url: String,
    /// Fires when the writer thread has committed what was queued and closed its connection.
    writer_task: Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>,
    /// Set by [`Store::close`], so that work that would keep a clone alive (an outcome waiting to
    /// be retried) lets go instead of holding up the stop.
    closing: Arc<watch::Sender<bool>>,
    /// Calls closed at start-up (interrupted by a previous stop).
    pub recovered_calls: RecoveredCalls,
}

/// Calls closed at start-up (cut off by a previous stop), by what they asked: `unknown` those
/// that had been sent, `failed` (not sent) those still waiting for their turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveredCalls {
    pub unknown: OpCounts,
    pub not_sent: OpCounts,
}

/// Calls counted by their operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub add: u64,
    pub remove: u64,
}

impl OpCounts {
    pub fn total(self) -> u64 {
        self.add + self.remove
    }

    pub fn by_op(self) -> [(CallOp, u64); 2] {
        [(CallOp::Add, self.add), (CallOp::Remove, self.remove)]
    }
}

impl RecoveredCalls {
    fn count(&mut self, op: CallOp, sent: bool) {
        let counts = if sent { &mut self.unknown } else { &mut self.not_sent };
        match op {
            CallOp::Add => counts.add += 1,
            CallOp::Remove => counts.remove += 1,
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// The schema, applied in order by [`Store::open`].
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The latest migration applied to the database; 0 when it has none (not a friendhook database).
async fn schema_version(conn: &mut SqliteConnection) -> Result<i64, StoreError> {
    let tracked: bool = sqlx::query_scalar("SELECT count(*) > 0 FROM sqlite_schema WHERE name = '_sqlx_migrations'")
        .fetch_one(&mut *conn)
        .await?;
    if !tracked {
        return Ok(0);
    }
    Ok(sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut *conn)
        .await?)
}

/// The newest schema version this binary knows.
fn known_schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Refuses a database a newer friendhook has migrated past what this binary knows (sqlx's own
/// error for it names a migration, not what to do).
async fn refuse_newer_schema(conn: &mut SqliteConnection, database_url: &str) -> Result<i64, StoreError> {
    let found = schema_version(conn).await?;
    let known = known_schema_version();
    if found > known {
        return Err(StoreError::SchemaAhead { database: database_url.to_string(), found, known });
    }
    Ok(found)
}

/// A read-only open needs exactly this binary's schema: it cannot migrate an older one.
async fn check_readable_schema(read: &SqlitePool, database_url: &str) -> Result<(), StoreError> {
    let found = refuse_newer_schema(&mut *read.acquire().await?, database_url).await?;
    let needed = known_schema_version();
    let database = database_url.to_string();
    match found {
        0 => Err(StoreError::NoSchema { database }),
        found if found < needed => Err(StoreError::SchemaBehind { database, found, needed }),
        _ => Ok(()),
    }
}

/// The options of an SQLite URL (`sqlite://file`, or a bare path, which sqlx takes as a file);
/// the URL of another database (`postgres://...`) is refused by name rather than taken for a
/// file name.
fn sqlite_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    if let Some((scheme, _)) = url.split_once("://")
        && !scheme.eq_ignore_ascii_case("sqlite")
    {
        return Err(StoreError::NotSqliteUrl { database: url.to_string() });
    }
    let options = SqliteConnectOptions::from_str(url)?;
    if options.get_filename().as_os_str().is_empty() {
        return Err(StoreError::NoFileName { database: url.to_string() });
    }
    Ok(options)
}

/// SQLite's "unable to open database file" (code 14) on a file that exists, for a read: most
/// likely a read-only directory, where a WAL database cannot create the `-shm` file that even a
/// reader needs. Said so, with what to do; any other error is returned as it is.
fn explain_cannot_open(err: StoreError, database_url: &str) -> StoreError {
    match &err {
        StoreError::Sqlx(sqlx::Error::Database(db)) if db.code().as_deref() == Some("14") => {
            StoreError::CannotOpen { database: database_url.to_string(), cause: db.message().to_string() }
        }
        _ => err,
    }
}

/// Whether the URL's query opens the database read-only (`mode=ro`, `immutable=1`).
fn opens_read_only(database_url: &str) -> bool {
    let Some((_, query)) = database_url.split_once('?') else { return false };
    query.split('&').any(|param| match param.split_once('=') {
        Some(("mode", mode)) => mode.eq_ignore_ascii_case("ro"),
        Some(("immutable", on)) => ["1", "true", "yes", "on"].iter().any(|v| on.eq_ignore_ascii_case(v)),
        _ => false,
    })
}

/// Refuses an SQLite file that holds tables but not friendhook's, before anything is written to
/// it: the migrations would add friendhook's tables beside them (and `friendhook demo` would later
/// take the file for its own to delete), and even opening it for writing turns it to WAL and puts
/// a lock file beside it. Looked at through a read-only connection, and only when the file has
/// something in it. Friendhook's own files have `_sqlx_migrations` and `callbacks`; a file with
/// only `_sqlx_migrations` is one whose first migration was interrupted.
async fn refuse_foreign(options: &SqliteConnectOptions, database_url: &str) -> Result<(), StoreError> {
    let path = options.get_filename();
    if std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true) {
        return Ok(());
    }
    match tables_in(options).await? {
        TablesIn { first_table: Some(table), callbacks, migrations, .. } if !(callbacks && migrations) => {
            Err(StoreError::Foreign { database: database_url.to_string(), table })
        }
        _ => Ok(()),
    }
}

/// What a command that writes refuses before it opens the file for writing (which alone would turn
/// it to WAL and put a lock file beside it): an unusable path, a URL that opens the database
/// read-only, and another program's database. Nothing is created or changed here.
async fn refuse_to_write(database_url: &str) -> Result<(), StoreError> {
    // Plain options: the writers' set WAL mode on connect, which the look inside must not do.
    let options = sqlite_options(database_url)?;
    check_database_path(database_url, options.get_filename())?;
    if opens_read_only(database_url) {
        return Err(StoreError::ReadOnlyUrl { database: database_url.to_string() });
    }
    refuse_foreign(&options, database_url).await
}

/// Creates the empty file a new database starts as, readable by its owner only: it will hold
/// every event, user ID and quarantined body, and SQLite gives its `-wal` and `-shm` the same
/// mode (left to SQLite, all three would be 0644 under the usual umask).
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        // Made meanwhile by someone else: SQLite opens it as it is.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Write(format!("cannot create the database file {}: {e}", path.display()))),
    }
}

/// `<path>-wal`: where SQLite keeps the write-ahead log of the database at `path`.
fn wal_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    std::path::PathBuf::from(wal)
}

/// What follows a database file's name in the copy a stopping writer saves of it when the file
/// was removed under the service (`<file>.rescued-<ms>`), and a start looks for.
const RESCUED_SUFFIX: &str = ".rescued-";

/// Fails with [`StoreError::LoneWal`] when `path` is missing or empty while its `-wal` holds
/// something; otherwise says whether the file is about to be created.
fn refuse_lone_wal(path: &std::path::Path) -> Result<bool, StoreError> {
    let len = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| m.len());
    let wal = wal_path(path);
    let database = len(path);
    if database.is_some_and(|n| n > 0) {
        return Ok(false);
    }
    let state = if database.is_none() { "missing" } else { "empty" };
    if len(&wal).is_some_and(|n| n > 0) {
        return Err(StoreError::LoneWal {
            database: path.display().to_string(),
            wal: wal.display().to_string(),
            state,
        });
    }
    // What a service saved when its file was removed under it: a restart, the usual first
    // reaction, would otherwise begin an empty history beside it.
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
        let prefix = format!("{}{RESCUED_SUFFIX}", name.to_string_lossy());
        let dir = if dir.as_os_str().is_empty() { std::path::Path::new(".") } else { dir };
        let mut copies: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.starts_with(&prefix))
            .collect();
        copies.sort();
        if let Some(last) = copies.last() {
            return Err(StoreError::Rescued {
                database: path.display().to_string(),
                copy: dir.join(last).display().to_string(),
                state,
            });
        }
    }
    Ok(database.is_none())
}

/// What an existing SQLite file holds, by table: the first (by name) that is not sqlx's
/// bookkeeping, and whether friendhook's own are there.
struct TablesIn {
    first_table: Option<String>,
    callbacks: bool,
    calls: bool,
    migrations: bool,
}

/// Reads [`TablesIn`] through a read-only connection of its own, which changes nothing in the
/// file (`serve` and `demo` ask before they decide to write to it or delete it).
async fn tables_in(options: &SqliteConnectOptions) -> Result<TablesIn, StoreError> {
    let mut conn = options.clone().read_only(true).create_if_missing(false).connect().await?;
    let found: Result<(Option<String>, bool, bool, bool), sqlx::Error> = sqlx::query_as(
        "SELECT (SELECT min(name) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
                   AND name <> '_sqlx_migrations'),
                EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'callbacks'),
                EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'calls'),
                EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
    )
    .fetch_one(&mut conn)
    .await;
    let _ = conn.close().await;
    let (first_table, callbacks, calls, migrations) = found?;
    Ok(TablesIn { first_table, callbacks, calls, migrations })
}

fn connect_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    Ok(sqlite_options(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5))
        // 64 MiB of page cache per connection would be too much for 5 connections under the
        // 100 MB RSS target; 8 MiB keeps indexes hot enough.
        .pragma("cache_size", "-8192")
        .log_statements(tracing::log::LevelFilter::Trace)
        // sqlx's WARN on a statement over a second prints the whole statement (the writer's batch
        // insert runs to some 900 characters) for what the service reports in its own words: a
        // commit waiting on a lock is the writer's ERROR and /readyz, a full reconciliation takes
        // its second by design.
        .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1)))
}

/// Runs the writer on a thread of its own, with a single-threaded runtime.
///
/// On the service's runtime the writer task would wait in the same run queue as every request
/// task: under load, each batch's hand-over (the database answered, answer the requests, take the
/// next batch) queued behind dozens of HTTP tasks, and the writer, the one serial stage, sat idle
/// meanwhile. Its own thread is scheduled by the OS as soon as it has work.
fn spawn_writer(writer: Writer, rx: mpsc::Receiver<Job>) -> Result<tokio::sync::oneshot::Receiver<()>, StoreError> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Write(format!("cannot start the writer's runtime: {e}")))?;
    std::thread::Builder::new()
        .name("friendhook-writer".into())
        .spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(writer.run(rx))));
            if ran.is_err() {
                // Without its writer the service could only answer 503 to every write, forever,
                // while looking alive to a supervisor. Nothing acknowledged is lost by exiting:
                // every 200 was given after its commit.
                tracing::error!("the database writer stopped on a bug (see the panic above); exiting so that the service is restarted");
                std::process::exit(70);
            }
            let _ = done_tx.send(());
        })
        .map_err(|e| StoreError::Write(format!("cannot start the writer thread: {e}")))?;
    Ok(done_rx)
}

/// How many names the file at `path` has besides this one (hard links; 0 when it cannot be read).
fn other_names(path: &std::path::Path) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map_or(0, |meta| meta.nlink().saturating_sub(1))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        0
    }
}

/// Whether the URL names an in-memory database rather than a file.
fn is_in_memory(database_url: &str, path: &std::path::Path) -> bool {
    database_url.contains(":memory:")
        || database_url.contains("mode=memory")
        || path == std::path::Path::new(":memory:")
}

/// Takes `<database file>.lock` for this process (released when the file is closed, so also
/// when the process dies), or says who holds it.
fn lock_instance(database_url: &str, options: &SqliteConnectOptions) -> Result<std::fs::File, StoreError> {
    let path = options.get_filename();
    if is_in_memory(database_url, path) {
        return Err(StoreError::InMemory { database: database_url.to_string() });
    }
    // The lock of the file, not of the name it was given by: a symbolic link to the database (or
    // to its directory) must find the same lock.
    let real = std::fs::canonicalize(path).ok().or_else(|| {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
    });
    let mut lock_path = real.as_deref().unwrap_or(path).as_os_str().to_os_string();
    lock_path.push(".lock");
    let lock_path = std::path::PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Write(format!("could not create the lock file {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the refusal a second service gets (best effort: the lock is what
            // counts).
            let _ = file
                .set_len(0)
                .and_then(|()| std::io::Write::write_all(&mut &file, std::process::id().to_string().as_bytes()));
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&lock_path)
                .ok()
                .and_then(|pid| pid.trim().parse::<u32>().ok())
                .map(|pid| format!(", by process {pid}"))
                .unwrap_or_default();
            Err(StoreError::InUse { database: database_url.to_string(), lock: lock_path.display().to_string(), holder })
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Write(format!("could not lock {}: {e}", lock_path.display())))
        }
    }
}

/// Free space under which a file system counts as full: less than SQLite needs for a commit that
/// grows the file by a page or two (with its WAL frames and the `-shm` index), so every callback
/// would be answered 503. Not 0: some file systems never report exactly 0 (ext4 keeps a few blocks
/// back for its journal even from what `f_bavail` shows).
pub const FULL_BELOW_BYTES: u64 = 64 << 10;

/// Whether `free` bytes (from [`disk_free_bytes`]) is a full file system for SQLite.
pub fn is_full(free: Option<u64>) -> bool {
    free.is_some_and(|free| free < FULL_BELOW_BYTES)
}

/// [`Store::disk_free_bytes`] for a database not opened (yet): a start that fails on a full disk
/// says so.
pub fn disk_free_bytes(database_url: &str) -> Option<u64> {
    free_bytes_at(&database_path(database_url)?)
}

/// The file a `sqlite:` URL names; `None` if it is not one.
fn database_path(database_url: &str) -> Option<std::path::PathBuf> {
    Some(SqliteConnectOptions::from_str(database_url).ok()?.get_filename().to_path_buf())
}

/// Free bytes for this user on the file system of `path` (or of its directory, before the file
/// exists; the working directory for a bare file name).
#[cfg(unix)]
fn free_bytes_at(path: &std::path::Path) -> Option<u64> {
    let on = if path.exists() {
        path
    } else {
        path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."))
    };
    let fs = rustix::fs::statvfs(on).ok()?;
    // What the kernel lets this process have: the share reserved for root (ext4's 5 %) is open to
    // a process with CAP_SYS_RESOURCE, not to root as such (a service in a container usually
    // lacks it), so `df`'s "available" for everyone else.
    let blocks = if may_use_reserved_blocks() { fs.f_bfree } else { fs.f_bavail };
    Some(blocks.saturating_mul(fs.f_frsize))
}

/// Whether this process holds CAP_SYS_RESOURCE, read once: a service does not change its
/// capabilities while it runs.
#[cfg(unix)]
fn may_use_reserved_blocks() -> bool {
    static HELD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HELD.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|status| holds_cap_sys_resource(&status))
    })
}

/// Whether a `/proc/<pid>/status` text's effective capability set (`CapEff`, hex) has
/// CAP_SYS_RESOURCE (bit 24).
fn holds_cap_sys_resource(status: &str) -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

#[cfg(not(unix))]
fn free_bytes_at(_: &std::path::Path) -> Option<u64> {
    None
}

/// Whether the file at `path` starts with SQLite's header (`Err` if it cannot be read).
fn has_sqlite_header(path: &std::path::Path) -> std::io::Result<bool> {
    let mut magic = [0u8; 16];
    let mut file = std::fs::File::open(path)?;
    match std::io::Read::read_exact(&mut file, &mut magic) {
        Ok(()) => Ok(&magic == b"SQLite format 3\0"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Refuses a directory, or a non-empty file that is not SQLite, before anything is created
/// beside it (the lock file) or SQLite answers with its own terse error ("file is not a
/// database", "disk I/O error"). A file that cannot be read is left to SQLite to report.
fn check_database_path(database_url: &str, path: &std::path::Path) -> Result<(), StoreError> {
    let database = database_url.to_string();
    if let Some(directory) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        return Err(StoreError::NoDirectory { database, directory: directory.display().to_string() });
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            Err(StoreError::IsDirectory { database, example: path.join("friendhook.db").display().to_string() })
        }
        Ok(meta) if meta.len() > 0 && matches!(has_sqlite_header(path), Ok(false)) => {
            Err(StoreError::NotSqlite { database })
        }
        _ => Ok(()),
    }
}

/// What a database file that is about to be recreated (the demo's) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaceable {
    /// No file, or an empty one.
    Nothing,
    /// A friendhook database that no service holds.
    FriendhookDatabase,
    /// Something else: not SQLite, or SQLite without friendhook's tables. Not to be deleted.
    Foreign,
}

/// Looks at the database at `database_url` before it is deleted and created afresh: fails with
/// [`StoreError::InUse`] if a service holds it, and says whether it is friendhook's to delete.
pub async fn check_replaceable(database_url: &str) -> Result<Replaceable, StoreError> {
    let options = sqlite_options(database_url)?;
    let path = options.get_filename().to_path_buf();
    let len = match std::fs::metadata(&path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Replaceable::Nothing),
        Err(e) => return Err(StoreError::Write(format!("cannot look at {}: {e}", path.display()))),
    };
    if len == 0 {
        return Ok(Replaceable::Nothing);
    }
    if !has_sqlite_header(&path).unwrap_or(false) {
        return Ok(Replaceable::Foreign);
    }
    let tables = tables_in(&options).await?;
    if !(tables.callbacks && tables.calls && tables.migrations) {
        return Ok(Replaceable::Foreign);
    }
    // Only for friendhook's own files (the lock file is created beside it), and released at
    // once: the caller deletes the file and then opens it as a service, which locks.
    drop(lock_instance(database_url, &options)?);
    Ok(Replaceable::FriendhookDatabase)
}

/// The `appkey` of a stored callback that is not `appkey` (one sent by another Easemob app than
/// the sandbox's: real events), if the database at `database_url` holds one. For a command that is
/// about to delete a database it made itself.
pub async fn other_apps_event(database_url: &str, appkey: &str) -> Result<Option<String>, StoreError> {
    let options = sqlite_options(database_url)?;
    let mut conn = options.read_only(true).create_if_missing(false).connect().await?;
    let found = sqlx::query_scalar("SELECT coalesce(appkey, '(none)') FROM callbacks WHERE appkey IS NOT ?1 LIMIT 1")
        .bind(appkey)
        .fetch_optional(&mut conn)
        .await;
    let _ = conn.close().await;
    Ok(found?)
}

impl Store {
    /// Opens (creating if missing) the database, applies migrations, closes calls interrupted by
    /// a previous crash, as `unknown` or as not sent (unless `recover_interrupted_calls` is off), and starts the
    /// writer task.
    pub async fn open(opts: StoreOptions, clock: SharedClock) -> Result<Store, StoreError> {
        let sync = match opts.synchronous {
            SyncMode::Full => SqliteSynchronous::Full,
            SyncMode::Normal => SqliteSynchronous::Normal,
        };
        // The writer keeps SQLite's default page cache (2 MB). Measured: a larger one made every
        // commit slower, because SQLite walks the whole cache at the end of each write transaction;
        // pages it misses come from the OS page cache at little cost.
        let write_options = connect_options(&opts.database_url)?
            .synchronous(sync)
            .pragma("cache_size", "-2000")
            // The WAL is reused from its start after each checkpoint, not shrunk: one that grew
            // while checkpoints could not finish (a reader holding a snapshot, a full disk) would
            // keep its size for good. SQLite truncates it to this at the next reset; normal use
            // (checkpoints every ~4 MB) never reaches it.
            .pragma("journal_size_limit", "67108864")
            // Room for the fast path's statement per row count (up to 64) besides the others.
            .statement_cache_capacity(128)
            .busy_timeout(opts.busy_timeout);
        refuse_to_write(&opts.database_url).await?;
        let instance_lock =
            if opts.instance_lock { Some(lock_instance(&opts.database_url, &write_options)?) } else { None };
        // After the lock: a service running on the file has it, and its WAL is no orphan.
        let created = refuse_lone_wal(write_options.get_filename())?;
        if created {
            create_private(write_options.get_filename())?;
        }
        let mut conn = write_options.connect().await?;
        // Only for the opens that take the lock this warns about (the service's).
        let path = write_options.get_filename();
        let other_names = if opts.instance_lock { other_names(path) } else { 0 };
        if other_names > 0 {
            tracing::warn!(
                database = %opts.database_url,
                path = %path.display(),
                other_names,
                "the database file has other names (hard links): SQLite keeps its WAL beside the name a program \
                 opened, so one that opens the file by another name works on another WAL and can corrupt it, and \
                 this service's lock (beside this name) does not stop a second service started by another name. \
                 Keep one name: remove the other links (`find / -xdev -samefile PATH` lists them) while no program has the file open"
            );
        }
        let version = refuse_newer_schema(&mut conn, &opts.database_url).await?;
        MIGRATOR.run(&mut conn).await?;
        // Where a relative URL (the default's) put the file is the working directory's doing: said
        // once, when it is made, so that a service started in the wrong directory is noticed.
        let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        // An empty file (version 0) is a new database too.
        if created || version == 0 {
            tracing::info!(path = %shown.display(), schema = known_schema_version(), "created a new database");
        } else if version < known_schema_version() {
            tracing::info!(path = %shown.display(), from = version, to = known_schema_version(),
                "upgraded the database's schema (an older friendhook cannot open it any more)");
        }
        // Never creating the file: a read connection opened after it was removed (the pool
        // grows, or replaces one) would otherwise leave a new, empty database at its path.
        let read = SqlitePoolOptions::new()
            .max_connections(opts.read_connections.max(1))
            .min_connections(1)
            .connect_with(connect_options(&opts.database_url)?.read_only(false).create_if_missing(false))
            .await?;
        let head = reads::load_head(&mut conn).await?;
        // Before anything is appended (closing interrupted calls appends their outcomes).
        if let Some((what, seq)) = journal::references_past_head_at_start(&mut conn, head.seq).await? {
            if !opts.accept_journal_cut {
                return Err(StoreError::JournalCut { database: opts.database_url.clone(), head: head.seq, seq, what });
            }
            tracing::error!(
                "the journal ends at seq {}, but the file still refers to seq {seq} ({what}): records were removed \
                 from its end, or the file was replaced by an older copy of itself. Going on as --accept-journal-cut \
                 asks: seqs {} to {seq} will be given to new records (if `friendhook audit verify` then finds the \
                 lookup by user disagreeing with the events, rebuild it as it says)",
                head.seq,
                head.seq + 1
            );
        }
        let users_indexed_upto: i64 = sqlx::query_scalar("SELECT upto_seq FROM callback_users_progress")
            .fetch_optional(&mut conn)
            .await?
            .unwrap_or(0);
        let (committed_tx, committed_rx) = watch::channel(head.seq);
        let health = Arc::new(WriterHealth::default());
        let mut writer = Writer {
            connect: write_options.clone(),
            reopen_pending: false,
            conn,
            head,
            clock,
            limits: opts.limits,
            committed: committed_tx,
            health: health.clone(),
            data_version: None,
            fast_sql: Vec::new(),
            users_indexed_upto,
            users_indexed_at: std::time::Instant::now(),
            metrics: opts.metrics,
            failure_log: crate::metrics::LogThrottle::new(10_000),
            users_failure_log: crate::metrics::LogThrottle::new(10_000),
            failed_since_commit: 0,
            write_failed_at_ms: None,
            database_file: Some(writer::DatabaseFile::note(write_options.get_filename())),
            _instance_lock: instance_lock,
            checkpoints: Default::default(),
        };
        let recovered_calls = if opts.recover_interrupted_calls {
            writer.close_interrupted_calls().await?
        } else {
            RecoveredCalls::default()
        };
        let RecoveredCalls { unknown, not_sent } = recovered_calls;
        if unknown.total() > 0 {
            tracing::warn!(
                calls = unknown.total(),
                add = unknown.add,
                remove = unknown.remove,
                "closed calls interrupted by a previous stop after they were sent as outcome=unknown (Easemob may or may not have acted; see GET /v1/calls?outcome=unknown and the reconciliation)"
            );
        }
        if not_sent.total() > 0 {
            tracing::warn!(
                calls = not_sent.total(),
                add = not_sent.add,
                remove = not_sent.remove,
                "closed calls interrupted by a previous stop before they were sent as outcome=failed with 0 attempts (nothing reached Easemob: safe to send again; see GET /v1/calls?outcome=failed)"
            );
        }
        let (jobs, rx) = mpsc::channel(opts.write_queue.max(1));
        let writer_task = Arc::new(std::sync::Mutex::new(Some(spawn_writer(writer, rx)?)));
        Ok(Store {
            read,
            jobs,
            committed: committed_rx,
            health,
            database_url: opts.database_url,
            writer_task,
            closing: Arc::new(watch::Sender::new(false)),
            recovered_calls,
        })
    }

    /// Empties the lookup by user (`callback_users`) and its progress, so that the service rebuilds
    /// it from the events, in the background, at its next start (queries by user stay complete
    /// meanwhile, only slower). The remedy `audit verify` gives for a lookup that disagrees with the
    /// events. Takes the instance lock, so it refuses a database a service holds: the writer keeps
    /// how far the lookup goes in memory. Returns the entries removed.
    pub async fn reset_user_index(database_url: &str) -> Result<u64, StoreError> {
        let options = sqlite_options(database_url)?.create_if_missing(false).busy_timeout(Duration::from_secs(5));
        if !options.get_filename().exists() {
            return Err(StoreError::NoDatabase { database: database_url.to_string() });
        }
        refuse_to_write(database_url).await?;
        let _lock = lock_instance(database_url, &options)?;
        let mut conn = options.connect().await.map_err(|e| explain_cannot_open(e.into(), database_url))?;
        refuse_newer_schema(&mut conn, database_url).await?;
        let mut tx = sqlx::Connection::begin(&mut conn).await?;
        let removed = sqlx::query("DELETE FROM callback_users").execute(&mut *tx).await?.rows_affected();
        sqlx::query("UPDATE callback_users_progress SET upto_seq = 0").execute(&mut *tx).await?;
        tx.commit().await?;
        let _ = sqlx::Connection::close(conn).await;
        Ok(removed)
    }

    /// Opens an existing database for reading only: no migrations, no writer, no recovery. For the
    /// CLI commands that inspect a database a running service may be writing to.
    pub async fn open_read_only(database_url: &str) -> Result<Store, StoreError> {
        let opts = sqlite_options(database_url)?
            .create_if_missing(false)
            .read_only(true)
            .busy_timeout(Duration::from_secs(5))
            // The commands that read (audit, reconcile, export) run whole-table statements by
            // design; sqlx's warning on every one over a second would read as a problem.
            .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1));
        if is_in_memory(database_url, opts.get_filename()) {
            return Err(StoreError::InMemoryRead { database: database_url.to_string() });
        }
        if !opts.get_filename().exists() {
            return Err(StoreError::NoDatabase { database: database_url.to_string() });
        }
        check_database_path(database_url, opts.get_filename())?;
        let read = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(opts)
            .await
            .map_err(|e| explain_cannot_open(e.into(), database_url))?;
        if let Err(e) = check_readable_schema(&read, database_url).await {
            read.close().await;
            return Err(explain_cannot_open(e, database_url));
        }
        let (jobs, _) = mpsc::channel(1);
        let (_, committed) = watch::channel(0);
        Ok(Store {
            read,
            jobs,
            committed,
            health: Arc::new(WriterHealth::default()),
            database_url: database_url.to_string(),
            writer_task: Arc::new(std::sync::Mutex::new(None)),
            closing: Arc::new(watch::Sender::new(false)),
            recovered_calls: RecoveredCalls::default(),
        })
    }

    /// Resolves once [`Store::close`] has been called on some clone of this store.
    pub async fn closing(&self) {
        let mut closing = self.closing.subscribe();
        // The sender lives as long as this store, so the wait can only end by the flag.
        let _ = closing.wait_for(|c| *c).await;
    }

    /// The read pool (for the query functions in this module).
    pub(crate) fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    /// Subscribe to the last committed seq (the feed's long-poll waits on it).
    pub fn committed(&self) -> watch::Receiver<i64> {
        self.committed.clone()
    }

    /// Health of the write path.
    pub fn writer_health(&self) -> &WriterHealth {
        &self.health
    }

    /// Sizes in bytes of the database file and of its write-ahead log (0 when there is none, e.g.
    /// after a clean stop); `None` if the file cannot be found. For `/metrics`: the WAL grows
    /// between checkpoints and should drop back; the file grows with history.
    pub fn file_sizes(&self) -> Option<(u64, u64)> {
        let path = database_path(&self.database_url)?;
        let database = std::fs::metadata(&path).ok()?.len();
        Some((database, std::fs::metadata(wal_path(&path)).map_or(0, |m| m.len())))
    }

    /// Bytes this process may still write on the database's file system (`statvfs`'s
    /// `f_bavail`, what `df` shows as available, or `f_bfree` with CAP_SYS_RESOURCE, which may
    /// write into root's reserved share); `None` if it cannot be read. The write probe
    /// cannot say it: a checkpointed WAL is rewritten in place, so a probe commits on
    /// a full disk, and the first callback that needs a new page gets 503.
    pub fn disk_free_bytes(&self) -> Option<u64> {
        disk_free_bytes(&self.database_url)
    }

    /// Writes waiting for the writer now, and the queue's size (the 503 threshold).
    pub fn write_queue(&self) -> (usize, usize) {
        let size = self.jobs.max_capacity();
        (size - self.jobs.capacity(), size)
    }

    /// Hands a job to the writer now (without waiting), and returns where its answer will come.
    fn enqueue<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.try_send(make(tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => StoreError::WriterGone,
        })?;
        Ok(rx)
    }

    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        self.enqueue(make)?.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Stores a verified callback (or counts another delivery of it); returns after commit.
    pub async fn insert_callback(&self, cb: NewCallback) -> Result<CallbackAck, StoreError> {
        self.submit(|tx| Job::Callback(Box::new(cb), tx)).await
    }

    /// Records a delivery that failed verification; returns after commit.
    pub async fn insert_rejection(&self, r: Rejection) -> Result<(), StoreError> {
        self.submit(|tx| Job::Rejection(r, tx)).await
    }

    /// Keeps a request in quarantine; `None` if the quarantine is full.
    pub async fn insert_quarantine(&self, q: QuarantineEntry) -> Result<Option<i64>, StoreError> {
        self.submit(|tx| Job::Quarantine(Box::new(q), tx)).await
    }

    /// Records a call intent (before anything is sent).
    pub async fn insert_call_intent(&self, call: NewCall) -> Result<IntentResult, StoreError> {
        self.queue_call_intent(call)?.await
    }

    /// Hands a call intent to the writer now and returns its answer to wait for. The writer
    /// takes jobs in the order they were queued, so intents queued one after the other are
    /// numbered in that order however their answers are awaited: a batch's calls get ids in
    /// request order.
    pub fn queue_call_intent(
        &self,
        call: NewCall,
    ) -> Result<impl Future<Output = Result<IntentResult, StoreError>> + Send + 'static, StoreError> {
        let answer = self.enqueue(|tx| Job::Intent(call, tx))?;
        Ok(async move { answer.await.map_err(|_| StoreError::WriterGone)? })
    }

    /// Records that a call is about to be sent (once, before its first request leaves), and
    /// returns after commit: a start after a crash closes a call without the mark as not sent.
    /// `Ok(Some(why))` when the call is not to be sent (it has an outcome already).
    pub async fn mark_call_sent(&self, call_id: i64) -> Result<Option<String>, StoreError> {
        self.submit(|tx| Job::Sent(call_id, tx)).await
    }

    /// Records a call's outcome (once).
    pub async fn mark_call_outcome(&self, outcome: CallOutcome) -> Result<CallRecord, StoreError> {
        self.submit(|tx| Job::Outcome(Box::new(outcome), tx)).await
    }

    /// Checks that the writer can take a write lock and commit; used by `/readyz`.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        self.submit(Job::Probe).await
    }

    /// Checks that the database answers reads.
    pub async fn probe_read(&self) -> Result<(), StoreError> {
        let mut conn = self.read.acquire().await?;
        conn.ping().await?;
        Ok(())
    }

    /// Closes the read pool, then waits for the writer to commit what is queued and close its
    /// connection. Other clones of this store must be dropped first, or the writer keeps running.
    pub async fn close(self) {
        self.close_within(Duration::from_secs(30)).await;
    }

    /// [`Store::close`], waiting at most `limit` for the writer. Handles held elsewhere (a call
    /// still retrying Easemob, say) keep the writer alive; past `limit` it is left to the end of
    /// the process. Nothing acknowledged is at stake: a request is answered after its commit, and
    /// a call whose outcome is not recorded is closed at the next start (`unknown`, having been
    /// sent).
    pub async fn close_within(self, limit: Duration) {
        self.closing.send_replace(true);
        let task = self.writer_task.lock().ok().and_then(|mut t| t.take());
        // The reads close first, so that the writer's connection is the last one: its close then
        // checkpoints and removes the WAL, and a stopped service leaves a clean file.
        self.read.close().await;
        // sqlx's close (0.8) can return with a connection parked idle after its last look (one
        // its upkeep of `min_connections` was opening as the close began). Left there, it would be
        // closed when the last handle drops, on its own thread, at a moment nobody chose: a
        // `sqlite3` or `audit verify` started right after the stop was told "database is locked"
        // (about one stop in ten, right after a start). Nothing is opened once a close has
        // begun, so a second close finds whatever the first left. Unconditionally: the pool's
        // count of idle connections is not one to decide by (its close does not lower it).
        self.read.close().await;
        drop(self.jobs);
        if let Some(done) = task
            && tokio::time::timeout(limit, done).await.is_err()
        {
            tracing::warn!(
                limit = ?limit,
                "the writer did not finish in time: calls still waiting for Easemob hold it (their outcomes \
                 are closed as unknown at the next start)"
            );
        }
    }
}

/// A store on a new database file in `dir`, for store tests, with the file's URL (to open it a
/// second time).
#[cfg(test)]
pub(crate) async fn open_test_store(dir: &tempfile::TempDir) -> (Store, String) {
    open_test_store_with(dir, crate::clock::system()).await
}

/// [`open_test_store`] whose times (request, outcome) come from `clock`.
#[cfg(test)]
pub(crate) async fn open_test_store_with(dir: &tempfile::TempDir, clock: SharedClock) -> (Store, String) {
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let store = Store::open(StoreOptions::new(url.clone()), clock).await.expect("open store");
    (store, url)
}

/// When the first call of [`seeded_test_store`] is requested (epoch ms); call n follows n seconds
/// later.
#[cfg(test)]
pub(crate) const SEED_START_MS: i64 = 1_700_000_000_000;

/// A test store (see [`open_test_store`]) seeded in bulk with `calls` calls and `callbacks`
/// callbacks, one call a second from [`SEED_START_MS`].
#[cfg(test)]
pub(crate) async fn seeded_test_store(dir: &tempfile::TempDir, calls: u64, callbacks: u64) -> Store {
    let (store, _) = open_test_store(dir).await;
    let spec = seed::SeedSpec { calls, callbacks, start_ms: SEED_START_MS, step_ms: 1_000 };
    store.seed_bulk(spec, |_| {}).await.expect("seed");
    store
}

/// The `detail` lines of SQLite's plan for `sql` (parameters left unbound), for tests that pin
/// which index a query uses.
#[cfg(test)]
pub(crate) async fn query_plan(store: &Store, sql: &str) -> Vec<String> {
    sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
        .fetch_all(store.read_pool())
        .await
        .expect("query plan")
        .iter()
        .map(|r| r.try_get::<String, _>("detail").unwrap_or_default())
        .collect()
}

/// An `add` intent of `owner` -> `friend` without an idempotency key, for store tests.
#[cfg(test)]
pub(crate) fn test_intent(owner: &str, friend: &str) -> NewCall {
    NewCall { op: CallOp::Add, owner: owner.into(), friend: friend.into(), idempotency_key: None }
}

/// `call` succeeded at Easemob on its first attempt (200), for store tests.
#[cfg(test)]
pub(crate) fn test_succeeded(call: CallRecord) -> CallOutcome {
    CallOutcome {
        call,
        outcome: Outcome::Succeeded,
        upstream_status: Some(200),
        upstream_error: None,
        attempts: 1,
        response_body: None,
        outcome_detail: None,
    }
}

/// A verified callback as the receive path would hand it to the writer, for store tests.
#[cfg(test)]
pub(crate) fn test_callback(body: &str, received_at_ms: i64) -> NewCallback {
    NewCallback {
        event: crate::callback::parse(body.as_bytes()).expect("test body parses"),
        raw_body: body.to_string(),
        body_sha256: chain::sha256_hex(body.as_bytes()),
        received_at_ms,
        remote_addr: Some("127.0.0.1:1".into()),
        scheme: "easemob",
        secret_index: 0,
    }
}

/// A roster `add` callback from `from` to `to` (plain user names, sent as Easemob's JIDs) with
/// msg_id `msg`, stamped `timestamp_ms` and stored at `received_at_ms`, for store tests.
#[cfg(test)]
pub(crate) fn test_roster_add(msg: &str, from: &str, to: &str, timestamp_ms: i64, received_at_ms: i64) -> NewCallback {
    let body = format!(
        r#"{{"chat_type":"roster","callId":"demo-org#demo-app_{msg}","security":"x","payload":{{"operation":"add"}},"appkey":"demo-org#demo-app","from":"demo-org#demo-app_{from}@easemob.com","to":"{to}","eventType":"chat","msg_id":"{msg}","timestamp":{timestamp_ms}}}"#
    );
    test_callback(&body, received_at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_handed_to_each_job_of_a_failed_batch_says_what_failed_once() {
        let failed = StoreError::Write("the database file was removed".into());
        assert_eq!(failed.clone_for_ack().to_string(), "database write failed: the database file was removed");
        assert!(matches!(StoreError::QueueFull.clone_for_ack(), StoreError::QueueFull));
    }

    #[test]
    fn a_file_system_is_full_below_what_a_commit_needs_and_unknown_is_not_full() {
        assert!(is_full(Some(0)));
        assert!(is_full(Some(FULL_BELOW_BYTES - 1)));
        // CAP_SYS_RESOURCE is bit 24 of CapEff: a root container's usual set lacks it
        // (00000000a80425fb), a full set has it.
        assert!(!holds_cap_sys_resource("Name:\tfriendhook\nCapEff:\t00000000a80425fb\n"));
        assert!(holds_cap_sys_resource("CapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n"));
        assert!(holds_cap_sys_resource("CapEff:\t0000000001000000\n"));
        assert!(!holds_cap_sys_resource("CapPrm:\t000001ffffffffff\n"), "no CapEff line: not held");
        assert!(!is_full(Some(FULL_BELOW_BYTES)));
        assert!(!is_full(None), "a figure that cannot be read is no reason to refuse");
    }

    /// A new database file, and the WAL and shared memory SQLite makes beside it, are the
    /// owner's alone; a file that was there keeps its mode.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_new_database_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_test_store(&dir).await;
        let mode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("test.db"), mode("test.db-wal"), mode("test.db-shm")), (0o600, 0o600, 0o600));
        store.close().await;
        std::fs::set_permissions(dir.path().join("test.db"), std::fs::Permissions::from_mode(0o640)).unwrap();
        let (store, _) = open_test_store(&dir).await;
        assert_eq!(mode("test.db"), 0o640, "an existing file is left as it is");
        store.close().await;
    }

    /// A WAL whose database file is gone (removed under a service that then crashed) is not
    /// opened as if it were nothing: a new database beside it would hide the loss, and SQLite
    /// would replay the WAL's pages into it.
    #[tokio::test]
    async fn a_wal_without_its_database_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("test.db");
        let wal = dir.path().join("test.db-wal");
        let url = format!("sqlite://{}", db.display());
        std::fs::write(&wal, b"frames of a removed database").unwrap();
        let open = || Store::open(StoreOptions::new(url.clone()), crate::clock::system());
        let err = open().await.expect_err("a lone WAL");
        assert!(matches!(err, StoreError::LoneWal { state: "missing", .. }), "{err}");
        assert!(err.to_string().contains(".rescued-*") && err.to_string().ends_with("Nothing was changed"), "{err}");
        assert!(!db.exists() && std::fs::read(&wal).unwrap() == b"frames of a removed database");
        std::fs::write(&db, b"").unwrap();
        let err = open().await.expect_err("an empty file and a WAL");
        assert!(matches!(err, StoreError::LoneWal { state: "empty", .. }), "{err}");
        // Moved away, as the error says: a new database, unless a rescued copy is there.
        std::fs::rename(&wal, dir.path().join("kept-wal")).unwrap();
        std::fs::write(dir.path().join("test.db.rescued-1700000000000"), b"a copy").unwrap();
        let err = open().await.expect_err("a rescued copy beside an empty file");
        assert!(matches!(err, StoreError::Rescued { state: "empty", .. }), "{err}");
        assert!(err.to_string().contains("test.db.rescued-1700000000000 is there"), "{err}");
        std::fs::rename(dir.path().join("test.db.rescued-1700000000000"), dir.path().join("elsewhere")).unwrap();
        open().await.expect("opens afresh").close().await;
    }

    /// When `close` returns, the file is clean: the writer's connection closed last, and its
    /// close checkpointed and removed the `-wal` file. A writer that closes while a read
    /// connection is still open (they used to close in either order) leaves the WAL behind: on
    /// the multi-threaded runtime that happened within a hundred rounds in seven runs of eight. The
    /// integration test `startup::a_stopped_service_has_closed_its_database_file` covers the read
    /// connection sqlx itself left open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_store_leaves_no_connection_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = dir.path().join("test.db-wal");
        for round in 0..100 {
            let (store, _) = open_test_store(&dir).await;
            assert!(wal.exists(), "round {round}: the open store has its WAL");
            store.close().await;
            assert!(!wal.exists(), "round {round}: a connection is still open after close");
        }
    }

    /// The start-up warning about hard links counts the file's other names.
    #[cfg(unix)]
    #[test]
    fn a_file_s_other_names_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.db");
        std::fs::write(&file, b"x").expect("write");
        assert_eq!(other_names(&file), 0);
        std::fs::hard_link(&file, dir.path().join("b.db")).expect("link");
        std::fs::hard_link(&file, dir.path().join("c.db")).expect("link");
        assert_eq!(other_names(&file), 2);
        std::os::unix::fs::symlink(&file, dir.path().join("d.db")).expect("symlink");
        assert_eq!(other_names(&dir.path().join("d.db")), 2, "a symbolic link is not another name of the file");
        assert_eq!(other_names(&dir.path().join("missing.db")), 0);
    }

    /// A bare file name (`sqlite://friendhook.db`, the default) is in the working directory: its
    /// free space is read there before the file exists, not given up on.
    #[cfg(unix)]
    #[test]
    fn free_space_is_read_beside_a_file_not_created_yet() {
        assert!(disk_free_bytes("sqlite://not-created-yet-by-any-test.db").is_some());
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("later.db").display());
        assert!(disk_free_bytes(&url).is_some());
        let missing = format!("sqlite://{}", dir.path().join("no-such-dir").join("x.db").display());
        assert_eq!(disk_free_bytes(&missing), None);
    }

    /// A read-only command cannot upgrade a database; it says so, and what to run, instead of
    /// failing later on a missing index. No command opens a database a newer release migrated.
    #[tokio::test]
    async fn opening_a_database_of_another_schema_version_says_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("old.db").display());
        // A database last served by the previous release: every migration but the newest.
        let needed = known_schema_version();
        let previous = dir.path().join("previous-migrations");
        std::fs::create_dir(&previous).expect("mkdir");
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).expect("migrations") {
            let path = entry.expect("entry").path();
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            let version: i64 = name.split('_').next().and_then(|v| v.parse().ok()).expect("numbered migration");
            if version < needed {
                std::fs::copy(&path, previous.join(&name)).expect("copy");
            }
        }
        let mut conn = connect_options(&url).expect("url").connect().await.expect("create");
        sqlx::migrate::Migrator::new(previous.as_path())
            .await
            .expect("migrator")
            .run(&mut conn)
            .await
            .expect("migrate");
        conn.close().await.expect("close");

        let err = Store::open_read_only(&url).await.expect_err("older schema");
        assert!(
            matches!(err, StoreError::SchemaBehind { found, needed: n, .. } if found == needed - 1 && n == needed),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&format!("friendhook serve --database-url {url}")), "{text}");

        // Serving it once upgrades it; then it opens read-only again.
        Store::open(StoreOptions::new(url.clone()), crate::clock::system()).await.expect("upgrade").close().await;
        Store::open_read_only(&url).await.expect("upgraded");

        // A database a newer friendhook has migrated: neither kind of open touches it.
        let mut conn = connect_options(&url).expect("url").connect().await.expect("connect");
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (?1, 'from a newer release', 1, x'00', 0)",
        )
        .bind(needed + 1)
        .execute(&mut conn)
        .await
        .expect("pretend a newer release migrated it");
        conn.close().await.expect("close");
        let err = Store::open(StoreOptions::new(url.clone()), crate::clock::system()).await.expect_err("newer schema");
        assert!(
            matches!(err, StoreError::SchemaAhead { found, known, .. } if found == needed + 1 && known == needed),
            "{err:?}"
        );
        assert!(err.to_string().contains("written by a newer friendhook"), "{err}");
        let err = Store::open_read_only(&url).await.expect_err("newer schema, read-only");
        assert!(matches!(err, StoreError::SchemaAhead { .. }), "{err:?}");

        let missing = format!("sqlite://{}", dir.path().join("missing.db").display());
        let err = Store::open_read_only(&missing).await.expect_err("no file");
        assert!(matches!(err, StoreError::NoDatabase { .. }), "{err:?}");
        assert!(!dir.path().join("missing.db").exists(), "a read-only open creates nothing");

        // An SQLite file that is not a friendhook database.
        let other = format!("sqlite://{}", dir.path().join("other.db").display());
        let mut conn = SqliteConnectOptions::from_str(&other)
            .expect("url")
            .create_if_missing(true)
            .connect()
            .await
            .expect("create");
        sqlx::query("CREATE TABLE t (x)").execute(&mut conn).await.expect("table");
        conn.close().await.expect("close");
        let err = Store::open_read_only(&other).await.expect_err("foreign file");
        assert!(matches!(err, StoreError::NoSchema { .. }), "{err:?}");
    }
}
