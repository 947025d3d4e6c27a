-- friendhook schema, version 9: a promotion from quarantine, once recorded, is kept as it is.
--
-- Why: reconciliation measures a promoted event's lateness and latency to its promotion
-- (`promoted_at_ms`, through `promoted_seq` and `promoted_as_new`), since it could not be matched
-- while it was held. Those columns are not chained (the promotion is not an event), so until now
-- anyone who could write the file could delete a promoted row or move its promotion time, and a
-- report would call other calls late or on time without any error. Like the events, they are
-- now append-only: a held row can still be purged, and a promotion is written once (its time
-- when the row is claimed, then its seq in the same transaction), never changed or removed.
-- `audit verify` fails when these triggers are missing or altered, and compares each promoted
-- row that stored its event with that event.
--
-- Cost: two triggers; no row is read or rewritten.
CREATE TRIGGER quarantine_promotion_once BEFORE UPDATE OF
    received_at_ms, remote_addr, reason, headers_json, raw_body, body_sha256,
    promoted_seq, promoted_at_ms, promoted_as_new ON quarantine
WHEN OLD.promoted_seq IS NOT NULL
  OR (OLD.promoted_at_ms IS NOT NULL AND (NEW.promoted_at_ms IS NOT OLD.promoted_at_ms
      OR NEW.received_at_ms IS NOT OLD.received_at_ms OR NEW.raw_body IS NOT OLD.raw_body
      OR NEW.body_sha256 IS NOT OLD.body_sha256))
BEGIN SELECT RAISE(ABORT, 'a promotion from quarantine is recorded once'); END;
CREATE TRIGGER quarantine_promoted_no_delete BEFORE DELETE ON quarantine
WHEN OLD.promoted_at_ms IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'a promotion from quarantine is kept'); END;
