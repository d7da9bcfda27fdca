-- Encrypted messages and trust relationships (PostgreSQL). migrations/sqlite/ holds the same
-- logical schema. See src/store/messages/ for how the listings use these indexes.

-- A message sealed by its author under a session epoch's DEK. The service stores the bytes as
-- given and never holds the DEK of a CLIENT_WRAPPED session. created_at is the database
-- server's clock (one clock for every replica); (created_at, message_id) orders every listing.
CREATE TABLE messages (
    message_id       BYTEA   PRIMARY KEY CHECK (octet_length(message_id) = 16),
    session_id       BYTEA   NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    epoch            INTEGER NOT NULL CHECK (epoch >= 1),
    author_user_id   TEXT    NOT NULL,
    author_device_id TEXT,
    nonce            BYTEA   NOT NULL CHECK (octet_length(nonce) = 12),
    ciphertext       BYTEA   NOT NULL,
    associated_data  BYTEA,
    created_at       BIGINT  NOT NULL,
    deleted_at       BIGINT
);
-- Ciphertext does not compress: store it without trying (large values still go out of line).
ALTER TABLE messages ALTER COLUMN ciphertext SET STORAGE EXTERNAL;
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
    author_user_id  TEXT   NOT NULL,
    trusted_user_id TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (author_user_id, trusted_user_id),
    CHECK (author_user_id <> trusted_user_id)
);
