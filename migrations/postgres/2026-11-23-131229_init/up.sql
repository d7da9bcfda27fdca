-- Keyhold's first schema (PostgreSQL). migrations/sqlite/ holds the same logical schema.
--
-- Conventions: times are BIGINT unix microseconds set by the server; UUIDs, key ids and
-- hashes are raw bytes; user and device ids are TEXT as the app names them. Soft deletes and
-- revocations set a time and keep the row.

-- A device's public key bundle, one row per key version.
CREATE TABLE user_keys (
    key_id            BYTEA    PRIMARY KEY CHECK (octet_length(key_id) = 16),
    user_id           TEXT     NOT NULL,
    device_id         TEXT     NOT NULL,
    version           INTEGER  NOT NULL CHECK (version >= 1),
    suite             SMALLINT NOT NULL,
    encapsulation_key BYTEA    NOT NULL,
    identity_key      BYTEA    NOT NULL,
    signature         BYTEA    NOT NULL,
    created_at        BIGINT   NOT NULL,
    superseded_at     BIGINT,
    revoked_at        BIGINT,
    -- Its index also serves lookups by (user_id, device_id).
    CONSTRAINT user_keys_device_version_key UNIQUE (user_id, device_id, version)
);
-- At most one current key per device; also the index for "current keys of these users".
CREATE UNIQUE INDEX user_keys_one_current_per_device ON user_keys (user_id, device_id)
    WHERE superseded_at IS NULL AND revoked_at IS NULL;

-- An encryption session. mode: 1 service-wrapped, 2 client-wrapped.
CREATE TABLE sessions (
    session_id       BYTEA    PRIMARY KEY CHECK (octet_length(session_id) = 16),
    author_user_id   TEXT     NOT NULL,
    author_device_id TEXT,
    mode             SMALLINT NOT NULL CHECK (mode IN (1, 2)),
    suite            SMALLINT NOT NULL,
    current_epoch    INTEGER  NOT NULL CHECK (current_epoch >= 1),
    created_at       BIGINT   NOT NULL,
    deleted_at       BIGINT
);

-- A session epoch's DEK wrapped for one recipient device. id orders rows for sync.
CREATE TABLE session_keys (
    id                  BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id          BYTEA    NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    epoch               INTEGER  NOT NULL CHECK (epoch >= 1),
    recipient_user_id   TEXT     NOT NULL,
    recipient_device_id TEXT     NOT NULL,
    key_id              BYTEA    NOT NULL CHECK (octet_length(key_id) = 16),
    envelope            BYTEA    NOT NULL,
    created_at          BIGINT   NOT NULL,
    revoked_at          BIGINT,
    -- Its index also serves lookups by (session_id, epoch).
    CONSTRAINT session_keys_recipient_key
        UNIQUE (session_id, epoch, recipient_user_id, recipient_device_id)
);
CREATE INDEX session_keys_by_recipient
    ON session_keys (recipient_user_id, recipient_device_id, id);

-- The recipient devices of a session, with the epoch they joined and left.
CREATE TABLE session_members (
    session_id    BYTEA   NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    user_id       TEXT    NOT NULL,
    device_id     TEXT    NOT NULL,
    key_id        BYTEA   NOT NULL CHECK (octet_length(key_id) = 16),
    added_epoch   INTEGER NOT NULL CHECK (added_epoch >= 1),
    removed_epoch INTEGER,
    PRIMARY KEY (session_id, user_id, device_id)
);

-- A session epoch's DEK sealed to the staff escrow key.
CREATE TABLE staff_keys (
    session_id    BYTEA  NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    epoch         INTEGER NOT NULL CHECK (epoch >= 1),
    escrow_key_id BYTEA  NOT NULL CHECK (octet_length(escrow_key_id) = 16),
    envelope      BYTEA  NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (session_id, epoch)
);

-- A service-wrapped session epoch's DEK under the service KEK.
CREATE TABLE service_keys (
    session_id  BYTEA   NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    epoch       INTEGER NOT NULL CHECK (epoch >= 1),
    kek_version INTEGER NOT NULL,
    envelope    BYTEA   NOT NULL,
    created_at  BIGINT  NOT NULL,
    PRIMARY KEY (session_id, epoch)
);

-- The append-only, hash-chained audit log (see src/store/audit.rs for the hash).
CREATE TABLE audit_events (
    seq       BIGINT PRIMARY KEY CHECK (seq >= 1),
    at        BIGINT NOT NULL,
    actor     TEXT   NOT NULL,
    action    TEXT   NOT NULL,
    target    TEXT   NOT NULL,
    reason    TEXT,
    prev_hash BYTEA  NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash      BYTEA  NOT NULL CHECK (octet_length(hash) = 32)
);

-- API tokens, kept as SHA-256 hashes only. role: 1 app, 2 device, 3 staff, 4 admin.
CREATE TABLE api_tokens (
    token_id   BYTEA    PRIMARY KEY CHECK (octet_length(token_id) = 16),
    token_hash BYTEA    NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    role       SMALLINT NOT NULL CHECK (role BETWEEN 1 AND 4),
    user_id    TEXT,
    device_id  TEXT,
    label      TEXT,
    created_at BIGINT   NOT NULL,
    revoked_at BIGINT
);
