-- friendhook schema, version 7: why a call ended as it did, in the call's own record.
--
-- Why: a call that failed or was refused kept only Easemob's status and error type; the client's
-- own account (it gave up because a `Retry-After` would pass --easemob-max-retry-time; an earlier
-- attempt answered 5xx may have been carried out, so check before sending again; no app token)
-- went to the log only, where an auditor or an operator reading `GET /v1/calls` does not look.
-- `outcome_detail` keeps that sentence, written with the outcome, once, and chained with it (a
-- record without one hashes as it did before this column existed, so existing chains stay valid).
--
-- Cost: none on an existing database (a column added with no default rewrites no row).
ALTER TABLE calls ADD COLUMN outcome_detail TEXT;

DROP TRIGGER calls_outcome_once;
CREATE TRIGGER calls_outcome_once BEFORE UPDATE OF
    completed_at_ms, outcome, upstream_status, upstream_error, attempts, response_body, outcome_detail,
    seq, prev_hash, chain_hash ON calls
WHEN OLD.outcome IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'a call outcome is recorded once'); END;
