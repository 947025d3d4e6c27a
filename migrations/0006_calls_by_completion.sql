-- friendhook schema, version 6: finding the calls that were still running at a given time.
--
-- Why: a reconciliation of a time window also needs the calls requested before it that were
-- still running inside it (a batch paced by the rate limiter records every intent at once and
-- completes its last calls minutes later). Found by request time only, such a call was left
-- out, so its callback, inside the window, read `orphan`, and a call of the same pair inside the
-- window could take it. Both indexes find them without reading older calls: most such calls
-- complete within minutes of the window's start (`calls_by_completed`, read over the window);
-- the few that ran longer than ten minutes (cut off by a long outage, say) are all in
-- `calls_long_running`. The ten minutes are repeated in the query (store::journal), which
-- SQLite only reads through a partial index whose condition it states word for word.
--
-- Cost: entries written with a call's outcome (calls only, not the receive path). On an existing
-- database this builds the two indexes once, reading the calls once.
CREATE INDEX calls_by_completed ON calls (completed_at_ms);
CREATE INDEX calls_long_running ON calls (requested_at_ms) WHERE completed_at_ms - requested_at_ms > 600000;
