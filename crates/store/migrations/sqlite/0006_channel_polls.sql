-- Channel pollers (IMAP today): one row per agent and channel. The row is a
-- lease, so only one process polls a mailbox at a time (`owner` holds it
-- until `lease_until_ms`), and the poller's cursor (`cursor`: the channel's
-- own text, for IMAP the mailbox, UIDVALIDITY and the last UID enqueued).
-- The cursor is written only by the lease holder and only after the
-- messages it covers were durably enqueued. Deleting the agent deletes it.
CREATE TABLE channel_polls (
    agent_id        TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    channel         TEXT NOT NULL,
    owner           TEXT NOT NULL,
    lease_until_ms  INTEGER NOT NULL,
    cursor          TEXT NOT NULL DEFAULT '',
    updated_ms      INTEGER NOT NULL,
    PRIMARY KEY (agent_id, channel)
);
