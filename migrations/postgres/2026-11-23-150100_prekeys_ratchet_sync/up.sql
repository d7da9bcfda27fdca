-- Prekeys, their claim rate windows, ratchet state backups and key-sync inboxes (PostgreSQL).
-- migrations/sqlite/ holds the same logical schema; conventions as in the first migration.

-- A device's signed X-Wing prekeys. kind: 1 one-time (deleted when claimed), 2 last-resort
-- (kept, one per device). identity_key is the device identity key the signature was checked
-- against at upload: claims hand out only prekeys signed by the device's current identity key.
-- id orders one-time prekeys oldest first.
CREATE TABLE prekeys (
    id                BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id            BYTEA    NOT NULL UNIQUE CHECK (octet_length(key_id) = 16),
    user_id           TEXT     NOT NULL,
    device_id         TEXT     NOT NULL,
    kind              SMALLINT NOT NULL CHECK (kind IN (1, 2)),
    suite             SMALLINT NOT NULL,
    encapsulation_key BYTEA    NOT NULL,
    identity_key      BYTEA    NOT NULL CHECK (octet_length(identity_key) = 32),
    signature         BYTEA    NOT NULL CHECK (octet_length(signature) = 64),
    created_at        BIGINT   NOT NULL
);
-- Claims (FOR UPDATE SKIP LOCKED walks it oldest first) and counts.
CREATE INDEX prekeys_by_device ON prekeys (user_id, device_id, kind, id);
-- At most one last-resort prekey per device.
CREATE UNIQUE INDEX prekeys_one_last_resort_per_device ON prekeys (user_id, device_id)
    WHERE kind = 2;

-- Prekey claims counted per (target device, claimer) in fixed time windows, so that the rate
-- limit holds across replicas. window_start is unix microseconds, a multiple of the window.
CREATE TABLE prekey_claim_windows (
    user_id      TEXT    NOT NULL,
    device_id    TEXT    NOT NULL,
    claimer      TEXT    NOT NULL,
    window_start BIGINT  NOT NULL,
    claims       INTEGER NOT NULL CHECK (claims >= 1),
    PRIMARY KEY (user_id, device_id, claimer, window_start)
);

-- A device's Double Ratchet state for one conversation, sealed under the KEK with the row
-- identity (user, device, conversation) as associated data. version: compare-and-swap.
CREATE TABLE ratchet_states (
    user_id         TEXT    NOT NULL,
    device_id       TEXT    NOT NULL,
    conversation_id TEXT    NOT NULL,
    version         BIGINT  NOT NULL CHECK (version >= 1),
    kek_version     INTEGER NOT NULL,
    envelope        BYTEA   NOT NULL,
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    PRIMARY KEY (user_id, device_id, conversation_id)
);

-- Sealed key packages from one device of a user to another: the recipient device's inbox.
-- Sends to one inbox hold a per-inbox advisory lock while drawing ids, so ids follow commit
-- order and inbox cursors never skip a package (src/store/key_packages.rs).
CREATE TABLE key_packages (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id             TEXT   NOT NULL,
    sender_device_id    TEXT   NOT NULL,
    recipient_device_id TEXT   NOT NULL,
    recipient_key_id    BYTEA  NOT NULL CHECK (octet_length(recipient_key_id) = 16),
    payload             BYTEA  NOT NULL,
    created_at          BIGINT NOT NULL
);
CREATE INDEX key_packages_inbox ON key_packages (user_id, recipient_device_id, id);
