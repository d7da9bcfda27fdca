-- Keyhold's first schema (SQLite). The same logical schema as migrations/postgres/.
--
-- Conventions: times are INTEGER unix microseconds set by the server; UUIDs, key ids and
-- hashes are raw BLOBs; user and device ids are TEXT. STRICT tables make SQLite refuse a
-- value of the wrong type instead of storing it, as PostgreSQL would.

-- A device's public key bundle, one row per key version.
CREATE TABLE user_keys (
    key_id            BLOB    PRIMARY KEY NOT NULL CHECK (length(key_id) = 16),
    user_id           TEXT    NOT NULL,
    device_id         TEXT    NOT NULL,
    version           INTEGER NOT NULL CHECK (version >= 1),
    suite             INTEGER NOT NULL,
    encapsulation_key BLOB    NOT NULL,
    identity_key      BLOB    NOT NULL,
    signature         BLOB    NOT NULL,
    created_at        INTEGER NOT NULL,
    superseded_at     INTEGER,
    revoked_at        INTEGER,
    -- Its index also serves lookups by (user_id, device_id).
    CONSTRAINT user_keys_device_version_key UNIQUE (user_id, device_id, version)
) STRICT;
-- At most one current key per device; also the index for "current keys of these users".
CREATE UNIQUE INDEX user_keys_one_current_per_device ON user_keys (user_id, device_id)
    WHERE superseded_at IS NULL AND revoked_at IS NULL;

-- An encryption session. mode: 1 service-wrapped, 2 client-wrapped.
CREATE TABLE sessions (
    session_id       BLOB    PRIMARY KEY NOT NULL CHECK (length(session_id) = 16),
    author_user_id   TEXT    NOT NULL,
    author_device_id TEXT,
    mode             INTEGER NOT NULL CHECK (mode IN (1, 2)),
    suite            INTEGER NOT NULL,
    current_epoch    INTEGER NOT NULL CHECK (current_epoch >= 1),
    created_at       INTEGER NOT NULL,
    deleted_at       INTEGER
) STRICT;

-- A session epoch's DEK wrapped for one recipient device. id orders rows for sync.
CREATE TABLE session_keys (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id          BLOB    NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    epoch               INTEGER NOT NULL CHECK (epoch >= 1),
    recipient_user_id   TEXT    NOT NULL,
    recipient_device_id TEXT    NOT NULL,
    key_id              BLOB    NOT NULL CHECK (length(key_id) = 16),
    envelope            BLOB    NOT NULL,
    created_at          INTEGER NOT NULL,
    revoked_at          INTEGER,
    -- Its index also serves lookups by (session_id, epoch).
    CONSTRAINT session_keys_recipient_key
        UNIQUE (session_id, epoch, recipient_user_id, recipient_device_id)
) STRICT;
CREATE INDEX session_keys_by_recipient
    ON session_keys (recipient_user_id, recipient_device_id, id);

-- The recipient devices of a session, with the epoch they joined and left.
CREATE TABLE session_members (
    session_id    BLOB    NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    user_id       TEXT    NOT NULL,
    device_id     TEXT    NOT NULL,
    key_id        BLOB    NOT NULL CHECK (length(key_id) = 16),
    added_epoch   INTEGER NOT NULL CHECK (added_epoch >= 1),
    removed_epoch INTEGER,
    PRIMARY KEY (session_id, user_id, device_id)
) STRICT;

-- A session epoch's DEK sealed to the staff escrow key.
CREATE TABLE staff_keys (
    session_id    BLOB    NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    epoch         INTEGER NOT NULL CHECK (epoch >= 1),
    escrow_key_id BLOB    NOT NULL CHECK (length(escrow_key_id) = 16),
    envelope      BLOB    NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (session_id, epoch)
) STRICT;

-- A service-wrapped session epoch's DEK under the service KEK.
CREATE TABLE service_keys (
    session_id  BLOB    NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    epoch       INTEGER NOT NULL CHECK (epoch >= 1),
    kek_version INTEGER NOT NULL,
    envelope    BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (session_id, epoch)
) STRICT;

-- The append-only, hash-chained audit log (see src/store/audit.rs for the hash).
CREATE TABLE audit_events (
    seq       INTEGER PRIMARY KEY NOT NULL CHECK (seq >= 1),
    at        INTEGER NOT NULL,
    actor     TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    target    TEXT    NOT NULL,
    reason    TEXT,
    prev_hash BLOB    NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB    NOT NULL CHECK (length(hash) = 32)
) STRICT;

-- API tokens, kept as SHA-256 hashes only. role: 1 app, 2 device, 3 staff, 4 admin.
CREATE TABLE api_tokens (
    token_id   BLOB    PRIMARY KEY NOT NULL CHECK (length(token_id) = 16),
    token_hash BLOB    NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    role       INTEGER NOT NULL CHECK (role BETWEEN 1 AND 4),
    user_id    TEXT,
    device_id  TEXT,
    label      TEXT,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) STRICT;
