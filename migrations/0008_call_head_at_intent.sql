-- friendhook schema, version 8: where the journal stood when each call was recorded, and when
-- each event promoted from quarantine was promoted.
--
-- Why: a reconciliation `as_of` names a point (seq, last call id) that one snapshot of the
-- journal had. A point edited by hand to a lower seq, keeping the last call, could hide records
-- committed before that call existed (a failed call's callback, say) and still be answered with
-- the journal's genuine chain link. With the head seq at the moment the call's intent was written,
-- such a point is refused: a snapshot that saw the call saw every record up to that seq.
--
-- Cost: on an existing database, reading the quarantine once for the index below; the columns
-- are added with no default, which rewrites no row (calls recorded before this version have none,
-- and their points are checked as before).
ALTER TABLE calls ADD COLUMN head_seq_at_intent INTEGER;

DROP TRIGGER calls_immutable;
CREATE TRIGGER calls_immutable BEFORE UPDATE OF
    op, owner, friend, pair_key, idempotency_key, requested_at_ms, head_seq_at_intent ON calls
BEGIN SELECT RAISE(ABORT, 'calls are append-only'); END;

-- And which promotions from quarantine stored their event (rather than adding one more delivery to
-- an event stored already): reconciliation measures lateness and latency to such a promotion (the
-- event could not be matched while it was held). Rows promoted before this version have NULL
-- and are measured as before, by arrival.
ALTER TABLE quarantine ADD COLUMN promoted_as_new INTEGER;

-- The quarantine's rows hold whole bodies, so a scan would read them all; this index holds the
-- two numbers, for the promotions that stored their event only. Building it reads the quarantine
-- once (on a new column nothing has set yet, so it starts empty).
CREATE INDEX quarantine_promoted ON quarantine (promoted_seq, promoted_at_ms) WHERE promoted_as_new = 1;
