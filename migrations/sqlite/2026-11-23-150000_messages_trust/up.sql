-- Encrypted messages and trust relationships (SQLite). The same logical schema as
-- migrations/postgres/. See src/store/messages/ for how the listings use these indexes.

-- A message sealed by its author under a session epoch's DEK. The service stores the bytes as
-- given; (created_at, message_id) orders every listing.
CREATE TABLE messages (
    message_id       BLOB    PRIMARY KEY NOT NULL CHECK (length(message_id) = 16),
    session_id       BLOB    NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    epoch            INTEGER NOT NULL CHECK (epoch >= 1),
    author_user_id   TEXT    NOT NULL,
    author_device_id TEXT,
    nonce            BLOB    NOT NULL CHECK (length(nonce) = 12),
    ciphertext       BLOB    NOT NULL,
    associated_data  BLOB,
    created_at       INTEGER NOT NULL,
    deleted_at       INTEGER
) STRICT;
-- Messages by session epoch and time: one backward range scan per epoch a reader holds a key
-- for serves the timeline and ListSessionMessages; deleted messages are not in it.
CREATE INDEX messages_by_session_epoch_time
    ON messages (session_id, epoch, created_at, message_id) WHERE deleted_at IS NULL;
-- Messages by author and time (ListAuthorMessages).
CREATE INDEX messages_by_author_time
    ON messages (author_user_id, created_at, message_id) WHERE deleted_at IS NULL;

-- The epochs a device can read, without visiting the 1 KiB envelope rows: the timeline's
-- first step, and the key check of ListAuthorMessages and PutMessages.
CREATE INDEX session_keys_live_by_recipient
    ON session_keys (recipient_user_id, recipient_device_id, session_id, epoch)
    WHERE revoked_at IS NULL;

-- An author's trusted users: the recipients of a session created "with my trusted users".
-- The primary key is the index for "trusted users of an author".
CREATE TABLE trusted_users (
    author_user_id  TEXT    NOT NULL,
    trusted_user_id TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (author_user_id, trusted_user_id),
    CHECK (author_user_id <> trusted_user_id)
) STRICT;
