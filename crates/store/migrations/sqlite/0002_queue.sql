-- The durable job queue, agent leases, deliveries and daily usage.
-- Times are Unix milliseconds. The queue tables carry no foreign key to
-- agents: `delete_agent` removes their rows explicitly and counts them, and a
-- job whose agent vanished between enqueue and claim is the worker's to drop.

-- One row per job. `state`: queued | running | done | dead (a dead letter).
-- `attempts` counts failures of our own (dead at queue.max_attempts);
-- `failures` counts every failure and drives the backoff exponent.
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    dedup_key         TEXT NOT NULL,
    agent_id          TEXT NOT NULL,
    session           TEXT NOT NULL,
    kind              TEXT NOT NULL,
    payload           TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'dead')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    failures          INTEGER NOT NULL DEFAULT 0,
    next_run_at_ms    INTEGER NOT NULL,
    lease_owner       TEXT,
    lease_expires_ms  INTEGER,
    last_error        TEXT,
    first_failure_ms  INTEGER,
    created_ms        INTEGER NOT NULL,
    updated_ms        INTEGER NOT NULL
);
-- The claim scan: active jobs in due order; done and dead jobs stay out of it.
CREATE INDEX jobs_active ON jobs(next_run_at_ms, id) WHERE state IN ('queued', 'running');
-- One agent's batch (session, oldest first), status and deletion.
CREATE INDEX jobs_agent ON jobs(agent_id, state, session, created_ms);
CREATE INDEX jobs_dead ON jobs(updated_ms) WHERE state = 'dead';
CREATE INDEX jobs_done ON jobs(updated_ms) WHERE state = 'done';

-- Dedup keys live apart from jobs so that purging a job never frees its key
-- early. A key is taken until `expires_ms` (first enqueue + queue.dedup_ttl);
-- an expired key is reassigned by the next enqueue that names it, and the
-- enqueue writer deletes a bounded number of expired keys per batch.
CREATE TABLE job_dedup (
    key         TEXT PRIMARY KEY,
    job_id      TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    expires_ms  INTEGER NOT NULL
);
CREATE INDEX job_dedup_expiry ON job_dedup(expires_ms);
CREATE INDEX job_dedup_agent ON job_dedup(agent_id);

-- One row per agent that was ever leased. `owner IS NULL`: released. The row
-- is never deleted while the agent exists, so `epoch` only grows: every
-- acquisition is epoch + 1, and a holder of an older epoch is fenced out.
CREATE TABLE agent_leases (
    agent_id    TEXT PRIMARY KEY,
    owner       TEXT,
    epoch       INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL
);

-- Outbound messages. `state`: pending | sending | sent | failed.
CREATE TABLE deliveries (
    id                   TEXT PRIMARY KEY,
    idempotency_key      TEXT NOT NULL UNIQUE,
    agent_id             TEXT NOT NULL,
    job_id               TEXT,
    channel              TEXT NOT NULL,
    target               TEXT NOT NULL,
    body                 TEXT NOT NULL,
    state                TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'sent', 'failed')),
    attempts             INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms      INTEGER NOT NULL,
    last_error           TEXT,
    provider_message_id  TEXT,
    created_ms           INTEGER NOT NULL,
    updated_ms           INTEGER NOT NULL
);
CREATE INDEX deliveries_due ON deliveries(next_attempt_ms) WHERE state IN ('pending', 'sending');
CREATE INDEX deliveries_agent ON deliveries(agent_id, created_ms);

-- Token usage per agent per UTC day (`YYYY-MM-DD`).
CREATE TABLE usage_daily (
    agent_id                     TEXT NOT NULL,
    day                          TEXT NOT NULL,
    input_tokens                 INTEGER NOT NULL DEFAULT 0,
    output_tokens                INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens  INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, day)
);
