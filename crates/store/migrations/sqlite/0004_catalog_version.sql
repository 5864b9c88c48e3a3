-- One counter that every change to agents, their owners or their allowed
-- senders bumps (by trigger, so a change from any process counts). The
-- ingest path caches agents and sender lists in memory and the enqueue
-- writer compares this counter inside its commit: a job admitted under rules
-- that changed since is refused and re-checked (see `catalog.rs`).
CREATE TABLE catalog_version (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL
);
INSERT INTO catalog_version (id, version) VALUES (1, 0);

CREATE TRIGGER catalog_agents_insert AFTER INSERT ON agents
BEGIN UPDATE catalog_version SET version = version + 1; END;
CREATE TRIGGER catalog_agents_update AFTER UPDATE ON agents
BEGIN UPDATE catalog_version SET version = version + 1; END;
CREATE TRIGGER catalog_agents_delete AFTER DELETE ON agents
BEGIN UPDATE catalog_version SET version = version + 1; END;
CREATE TRIGGER catalog_senders_insert AFTER INSERT ON allowed_senders
BEGIN UPDATE catalog_version SET version = version + 1; END;
CREATE TRIGGER catalog_senders_update AFTER UPDATE ON allowed_senders
BEGIN UPDATE catalog_version SET version = version + 1; END;
CREATE TRIGGER catalog_senders_delete AFTER DELETE ON allowed_senders
BEGIN UPDATE catalog_version SET version = version + 1; END;
CREATE TRIGGER catalog_users_update AFTER UPDATE ON users
BEGIN UPDATE catalog_version SET version = version + 1; END;
CREATE TRIGGER catalog_users_delete AFTER DELETE ON users
BEGIN UPDATE catalog_version SET version = version + 1; END;
