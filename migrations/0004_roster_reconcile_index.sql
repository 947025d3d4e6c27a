-- friendhook schema, version 4: reconciling everything reads the roster callbacks through a narrow
-- index instead of through the table.
--
-- Why: the full reconciliation needs seven small columns of every roster add/remove callback, but
-- a table scan reads every row whole, raw body included (about 800 bytes a row). With the pages
-- in the OS cache that costs little; on a service that has run for weeks they are not, and the
-- full summary over 1,000,000 callbacks took 2.4 s, reading 780 MB from disk. This index holds
-- only what reconciliation reads, in `id` order so that it pages exactly like the table did
-- (store::journal), and only for the callbacks reconciliation looks at: about 60 MB per million,
-- read cold in 0.5 s.
--
-- Cost on the receive path: one more entry per roster add/remove callback, appended at the
-- right edge (ids only grow), so a batch touches one or two pages of it; other callbacks do not
-- touch it at all.
--
-- On an existing database this builds the index once, reading the table once (about a second per
-- million callbacks on the benchmark machine).
CREATE INDEX callbacks_roster_by_id
    ON callbacks (id, chat_type, operation, seq, from_user, to_user, timestamp_ms, received_at_ms)
    WHERE chat_type = 'roster' AND operation IN ('add', 'remove') AND seq IS NOT NULL;
