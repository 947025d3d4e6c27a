-- friendhook schema, version 1. Never edit once landed; add a new numbered file instead.
--
-- One sequence (`seq`) orders everything friendhook stores for the outside world: each callback
-- event gets one when it is first stored, each call gets one when its outcome is recorded. The
-- feed pages by it and the SHA-256 hash chain links records in its order. Only the single writer
-- assigns it, inside the transaction that stores the record, so readers never see a gap.

-- One row per distinct callback event. Deduplicated by `dedup_key` =
-- (callId, eventType, to, payload.operation): callId alone is not unique for roster events
-- (accept and remote_accept share it), while Easemob's retry and exception-cache re-delivery
-- repeat all four. A re-delivery bumps `deliveries` and appends to callback_deliveries.
CREATE TABLE callbacks (
    id              INTEGER PRIMARY KEY,
    seq             INTEGER UNIQUE,
    dedup_key       TEXT    NOT NULL UNIQUE,
    call_id         TEXT    NOT NULL,
    msg_id          TEXT,
    appkey          TEXT,
    event_type      TEXT,
    chat_type       TEXT,
    operation       TEXT,
    from_user       TEXT,
    to_user         TEXT,
    -- min(from,to) || x'1f' || max(from,to): reconciliation looks callbacks up by unordered pair.
    pair_key        TEXT,
    timestamp_ms    INTEGER NOT NULL,
    received_at_ms  INTEGER NOT NULL,
    scheme          TEXT    NOT NULL,
    secret_index    INTEGER NOT NULL,
    raw_body        TEXT    NOT NULL,
    body_sha256     TEXT    NOT NULL,
    remote_addr     TEXT,
    deliveries      INTEGER NOT NULL DEFAULT 1,
    last_received_at_ms INTEGER,
    last_remote_addr    TEXT,
    prev_hash       TEXT,
    chain_hash      TEXT
);
CREATE INDEX callbacks_by_timestamp ON callbacks (timestamp_ms);
CREATE INDEX callbacks_by_call_id ON callbacks (call_id);
CREATE INDEX callbacks_by_from ON callbacks (from_user, timestamp_ms);
CREATE INDEX callbacks_by_to ON callbacks (to_user, timestamp_ms);
CREATE INDEX callbacks_by_operation ON callbacks (operation, seq);
-- Every index costs each insert a B-tree update on the hot path, so there is one per filter the
-- API offers and no more; reconciliation reads roster events by timestamp through
-- callbacks_by_timestamp.

-- Further deliveries of stored events (re-deliveries): when and from where. The first delivery
-- is the event row itself (received_at_ms, remote_addr), which keeps the hot path to one row.
CREATE TABLE callback_deliveries (
    callback_id     INTEGER NOT NULL REFERENCES callbacks (id),
    received_at_ms  INTEGER NOT NULL,
    remote_addr     TEXT
);
CREATE INDEX callback_deliveries_by_callback ON callback_deliveries (callback_id);

-- Written by a trigger inside the writer's single upsert statement (one statement per batch
-- matters for throughput): when the upsert bumps `deliveries`, it has set last_* from the new
-- delivery, and the trigger appends them here.
CREATE TRIGGER callbacks_log_redelivery AFTER UPDATE OF deliveries ON callbacks
BEGIN
    INSERT INTO callback_deliveries (callback_id, received_at_ms, remote_addr)
    VALUES (NEW.id, NEW.last_received_at_ms, NEW.last_remote_addr);
END;

-- Requests that failed verification: metadata only (never the body, which is untrusted).
-- Bounded: the writer prunes the oldest rows beyond the configured cap.
CREATE TABLE rejected_deliveries (
    id              INTEGER PRIMARY KEY,
    received_at_ms  INTEGER NOT NULL,
    remote_addr     TEXT,
    reason          TEXT    NOT NULL,
    body_sha256     TEXT    NOT NULL,
    body_size       INTEGER NOT NULL
);

-- Calls friendhook made to Easemob. The intent is inserted before anything is sent; the outcome
-- columns are filled exactly once afterwards. A row whose outcome is still NULL at start-up was
-- cut off by a crash and is closed as `unknown`.
CREATE TABLE calls (
    id               INTEGER PRIMARY KEY,
    op               TEXT    NOT NULL CHECK (op IN ('add', 'remove')),
    owner            TEXT    NOT NULL,
    friend           TEXT    NOT NULL,
    pair_key         TEXT    NOT NULL,
    idempotency_key  TEXT    UNIQUE,
    requested_at_ms  INTEGER NOT NULL,
    completed_at_ms  INTEGER,
    outcome          TEXT CHECK (outcome IN ('succeeded', 'rejected', 'failed', 'unknown')),
    upstream_status  INTEGER,
    upstream_error   TEXT,
    attempts         INTEGER,
    response_body    TEXT,
    seq              INTEGER UNIQUE,
    prev_hash        TEXT,
    chain_hash       TEXT
);
CREATE INDEX calls_in_flight ON calls (id) WHERE outcome IS NULL;
CREATE INDEX calls_by_requested ON calls (requested_at_ms);
CREATE INDEX calls_by_pair ON calls (pair_key, requested_at_ms);
CREATE INDEX calls_by_owner ON calls (owner, id);
CREATE INDEX calls_by_friend ON calls (friend, id);
CREATE INDEX calls_by_outcome ON calls (outcome, id);

-- Append-only, enforced by the database as well as by the API: events and calls are never
-- deleted, and their content never changes once written. (Someone with write access to the file
-- can drop these triggers; the hash chain is what makes that detectable.)
CREATE TRIGGER callbacks_no_delete BEFORE DELETE ON callbacks
BEGIN SELECT RAISE(ABORT, 'callbacks are append-only'); END;
CREATE TRIGGER callbacks_immutable BEFORE UPDATE OF
    dedup_key, call_id, msg_id, appkey, event_type, chat_type, operation, from_user, to_user,
    pair_key, timestamp_ms, received_at_ms, scheme, secret_index, raw_body, body_sha256, remote_addr
    ON callbacks
BEGIN SELECT RAISE(ABORT, 'callbacks are append-only'); END;
CREATE TRIGGER callbacks_chain_once BEFORE UPDATE OF seq, prev_hash, chain_hash ON callbacks
WHEN OLD.seq IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'a callback is chained once'); END;
CREATE TRIGGER callback_deliveries_no_delete BEFORE DELETE ON callback_deliveries
BEGIN SELECT RAISE(ABORT, 'deliveries are append-only'); END;
CREATE TRIGGER calls_no_delete BEFORE DELETE ON calls
BEGIN SELECT RAISE(ABORT, 'calls are append-only'); END;
CREATE TRIGGER calls_immutable BEFORE UPDATE OF
    op, owner, friend, pair_key, idempotency_key, requested_at_ms ON calls
BEGIN SELECT RAISE(ABORT, 'calls are append-only'); END;
CREATE TRIGGER calls_outcome_once BEFORE UPDATE OF
    completed_at_ms, outcome, upstream_status, upstream_error, attempts, response_body,
    seq, prev_hash, chain_hash ON calls
WHEN OLD.outcome IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'a call outcome is recorded once'); END;

-- Requests that failed verification in `--on-bad-signature quarantine` mode, kept whole so that
-- `friendhook quarantine reverify` can promote them once the right secret is known. Not events.
CREATE TABLE quarantine (
    id              INTEGER PRIMARY KEY,
    received_at_ms  INTEGER NOT NULL,
    remote_addr     TEXT,
    reason          TEXT    NOT NULL,
    headers_json    TEXT    NOT NULL,
    raw_body        BLOB    NOT NULL,
    body_sha256     TEXT    NOT NULL,
    promoted_seq    INTEGER,
    promoted_at_ms  INTEGER
);
CREATE INDEX quarantine_pending ON quarantine (id) WHERE promoted_at_ms IS NULL;

-- One row that `/readyz` rewrites through the writer: a real commit proves the database takes
-- writes (lock, space, permissions), which a read or an empty transaction would not.
CREATE TABLE writer_probe (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at_ms    INTEGER NOT NULL
);
