-- Scheduled wake-ups (SPEC §5): one row per event directory of an agent,
-- written by `replace_timers` (after each turn or API edit) and advanced by
-- the scheduler (`record_fired`). Times are Unix milliseconds.
-- `next_fire_ms`: when the scheduler must look at the timer next (NULL:
-- never, e.g. done, malformed or spent). `last_fired_ms`: the due instant of
-- the last tick consumed (fired or recorded missed). `file_sha256`: hex
-- SHA-256 of the event.json the row was computed from (empty when missing).
-- `state`: platform-owned JSON (status, session). `error`: the error.txt
-- text of a malformed event file. No foreign key: `delete_agent` removes the
-- rows explicitly.
CREATE TABLE timers (
    agent_id       TEXT NOT NULL,
    name           TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    next_fire_ms   INTEGER,
    last_fired_ms  INTEGER,
    file_sha256    TEXT NOT NULL,
    state          TEXT NOT NULL DEFAULT '{}',
    error          TEXT,
    updated_ms     INTEGER NOT NULL,
    PRIMARY KEY (agent_id, name)
);
CREATE INDEX timers_due ON timers(next_fire_ms) WHERE next_fire_ms IS NOT NULL;
