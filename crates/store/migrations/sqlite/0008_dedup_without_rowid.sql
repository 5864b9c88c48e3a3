-- Dedup keys are written on every enqueue, so each b-tree they touch costs
-- every job: the table becomes WITHOUT ROWID (the key is the row's one
-- b-tree; the rowid table and its separate key index were two), and the
-- index by agent goes (only `delete_agent` reads by agent, rarely, and a
-- scan of the unexpired keys serves it).
CREATE TABLE job_dedup_keyed (
    key         TEXT PRIMARY KEY,
    job_id      TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    expires_ms  INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO job_dedup_keyed (key, job_id, agent_id, expires_ms)
    SELECT key, job_id, agent_id, expires_ms FROM job_dedup;
DROP TABLE job_dedup;
ALTER TABLE job_dedup_keyed RENAME TO job_dedup;
CREATE INDEX job_dedup_expiry ON job_dedup(expires_ms);
