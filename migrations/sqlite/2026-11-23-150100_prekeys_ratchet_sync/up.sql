-- Prekeys, their claim rate windows, ratchet state backups and key-sync inboxes (SQLite).
-- The same logical schema as migrations/postgres/; conventions as in the first migration.

-- A device's signed X-Wing prekeys. kind: 1 one-time (deleted when claimed), 2 last-resort
-- (kept, one per device). identity_key is the device identity key the signature was checked
-- against at upload: claims hand out only prekeys signed by the device's current identity key.
-- id orders one-time prekeys oldest first.
CREATE TABLE prekeys (
    id                INTEGER PRIMARY KEY,
    key_id            BLOB    NOT NULL UNIQUE CHECK (length(key_id) = 16),
    user_id           TEXT    NOT NULL,
    device_id         TEXT    NOT NULL,
    kind              INTEGER NOT NULL CHECK (kind IN (1, 2)),
    suite             INTEGER NOT NULL,
    encapsulation_key BLOB    NOT NULL,
    identity_key      BLOB    NOT NULL CHECK (length(identity_key) = 32),
    signature         BLOB    NOT NULL CHECK (length(signature) = 64),
    created_at        INTEGER NOT NULL
) STRICT;
-- Claims and counts: a device's prekeys of one kind, oldest first.
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
    window_start INTEGER NOT NULL,
    claims       INTEGER NOT NULL CHECK (claims >= 1),
    PRIMARY KEY (user_id, device_id, claimer, window_start)
) STRICT;

-- A device's Double Ratchet state for one conversation, sealed under the KEK with the row
-- identity (user, device, conversation) as associated data. version: compare-and-swap.
CREATE TABLE ratchet_states (
    user_id         TEXT    NOT NULL,
    device_id       TEXT    NOT NULL,
    conversation_id TEXT    NOT NULL,
    version         INTEGER NOT NULL CHECK (version >= 1),
    kek_version     INTEGER NOT NULL,
    envelope        BLOB    NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, conversation_id)
) STRICT;

-- Sealed key packages from one device of a user to another: the recipient device's inbox.
-- AUTOINCREMENT: ids are never reused after a package is acknowledged (deleted), so inbox
-- cursors only move forward.
CREATE TABLE key_packages (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id             TEXT    NOT NULL,
    sender_device_id    TEXT    NOT NULL,
    recipient_device_id TEXT    NOT NULL,
    recipient_key_id    BLOB    NOT NULL CHECK (length(recipient_key_id) = 16),
    payload             BLOB    NOT NULL,
    created_at          INTEGER NOT NULL
) STRICT;
CREATE INDEX key_packages_inbox ON key_packages (user_id, recipient_device_id, id);
