-- One channel's deliveries of an agent, newest first (`deliveries_on`):
-- the email filing and the outbox's daily limit read only email rows, which
-- `deliveries_agent` would find only by reading the agent's web and terminal
-- rows too. Deliveries are one or two rows per turn, so the extra b-tree is
-- cheap to keep.
CREATE INDEX deliveries_agent_channel ON deliveries(agent_id, channel, created_ms);
