-- friendhook schema, version 2: callbacks are found by user through `callback_users`, which the
-- writer fills behind the commit, instead of through indexes SQLite updates on every insert.
--
-- Why: user ids are effectively random, so each of the two per-user indexes took one random B-tree
-- leaf per stored callback, and in WAL mode every commit writes each touched page in full: about
-- 8 KiB of WAL (and later of checkpoint) per callback, half the cost of storing it. The writer now
-- adds these entries in chunks of thousands of callbacks (see store::writer), where one page
-- takes many entries. Readers cover the not-yet-indexed tail (seq > upto_seq) by scanning it
-- through the seq index, so a query never misses a stored callback. Derived data: it can be
-- rebuilt from `callbacks` at any time and is not part of the hash chain.
--
-- Entries are grouped by `bucket` = seq >> 16 (65,536 sequence numbers) ahead of the user, so a
-- chunk of new entries lands in the current bucket's few hundred pages however large the table
-- grows; a query by user looks the user up once per bucket.
DROP INDEX callbacks_by_from;
DROP INDEX callbacks_by_to;

CREATE TABLE callback_users (
    role    INTEGER NOT NULL CHECK (role IN (0, 1)), -- 0: the callback's `from`, 1: its `to`
    bucket  INTEGER NOT NULL,                         -- seq >> 16
    user_id TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (role, bucket, user_id, seq)
) WITHOUT ROWID;

-- Every callback with seq <= upto_seq has its entries in callback_users.
CREATE TABLE callback_users_progress (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    upto_seq INTEGER NOT NULL
);

INSERT INTO callback_users (role, bucket, user_id, seq)
SELECT 0, seq >> 16, from_user, seq FROM callbacks WHERE seq IS NOT NULL AND from_user IS NOT NULL
UNION ALL
SELECT 1, seq >> 16, to_user, seq FROM callbacks WHERE seq IS NOT NULL AND to_user IS NOT NULL;

INSERT INTO callback_users_progress (id, upto_seq)
VALUES (1, max(coalesce((SELECT max(seq) FROM callbacks), 0), coalesce((SELECT max(seq) FROM calls), 0)));
