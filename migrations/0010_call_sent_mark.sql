-- friendhook schema, version 10: whether a call had been sent when friendhook stopped.
--
-- Why: a start closes every call left without an outcome as `unknown` ("Easemob may or may not
-- have acted"). For a call still waiting for its turn under the rate limit (most of a large
-- batch cut off by a kill -9) that is wrong the other way: nothing reached Easemob, it is safe
-- to send again, and an operator who checks each `unknown` pair by hand checks hundreds for
-- nothing. `sent_at_ms` is written, and committed, after a call's turn and before its first
-- request leaves; a start closes a call without it as `failed` with 0 attempts (not sent), and
-- one with it as `unknown`, as before.
--
-- Calls in flight when an earlier version stopped may have been sent: they are marked so here,
-- and closed as `unknown`, as that version would have.
--
-- Cost: on an existing database, reading the calls in flight through their index; the column is
-- added with no default, which rewrites no row.
ALTER TABLE calls ADD COLUMN sent_at_ms INTEGER;
UPDATE calls SET sent_at_ms = requested_at_ms WHERE outcome IS NULL;

-- The mark is written once, before the outcome, and kept with it.
CREATE TRIGGER calls_sent_once BEFORE UPDATE OF sent_at_ms ON calls
WHEN OLD.sent_at_ms IS NOT NULL OR OLD.outcome IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'a call is marked sent once, before its outcome'); END;
