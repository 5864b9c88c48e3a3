-- Dedup keys move into `jobs`: a partial UNIQUE index over the keys that a
-- job still holds replaces the `job_dedup` table. An enqueue is then one
-- insert into one table (`INSERT OR IGNORE`: a held key skips the row)
-- instead of an upsert into a second table and its expiry index, which
-- was about a third of the enqueue writer's time (BENCHMARKS.md, ingest).
--
-- A key is held by the job that took it until `created_ms + queue.dedup_ttl`;
-- after that the next enqueue naming it releases it (`dedup_released = 1`)
-- and takes it. Keys now live as long as their job's row: deleting a job
-- (`dlq purge`, agent deletion) frees its key.
ALTER TABLE jobs ADD COLUMN dedup_released INTEGER NOT NULL DEFAULT 0;
-- A job whose key row is gone (expired and purged) or names another job
-- (taken over after expiry) no longer holds its key.
UPDATE jobs SET dedup_released = 1 WHERE NOT EXISTS
    (SELECT 1 FROM job_dedup d WHERE d.key = jobs.dedup_key AND d.job_id = jobs.id);
CREATE UNIQUE INDEX jobs_dedup ON jobs(dedup_key) WHERE dedup_released = 0;
DROP TABLE job_dedup;
