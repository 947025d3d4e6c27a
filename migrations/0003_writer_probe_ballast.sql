-- friendhook schema, version 3: the write probe behind `/readyz` commits about as much as a batch
-- of callbacks, not one small row.
--
-- Why: a disk with a few kilobytes left refused every callback (each needs several pages: the row
-- and one page per index) while the probe's single-page update still fit, so `/readyz` reported
-- ready while every callback got a 503. The probe now rewrites this column with 64 KiB (the
-- store::writer `PROBE_BALLAST_BYTES`), which needs more room than a callback: if callbacks
-- cannot be stored, the probe cannot either.
ALTER TABLE writer_probe ADD COLUMN ballast BLOB;
