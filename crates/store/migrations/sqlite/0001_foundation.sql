-- Foundation tables. Times are Unix milliseconds (INTEGER) so the same
-- values work in SQLite and PostgreSQL.

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE COLLATE NOCASE,
    created_ms  INTEGER NOT NULL
);

CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    email       TEXT NOT NULL UNIQUE COLLATE NOCASE,
    owner_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    model       TEXT NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE INDEX agents_owner ON agents(owner_id);

CREATE TABLE allowed_senders (
    agent_id    TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    pattern     TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, pattern)
);

CREATE TABLE secrets (
    agent_id    TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, name)
);

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    user_id      TEXT REFERENCES users(id) ON DELETE CASCADE,
    token_hash   TEXT NOT NULL UNIQUE,
    created_ms   INTEGER NOT NULL,
    revoked_ms   INTEGER
);
