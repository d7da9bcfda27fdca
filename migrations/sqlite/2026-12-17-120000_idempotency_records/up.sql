-- The answers of calls made with an idempotency key (issue 10), so that a retry with the same
-- key returns the first answer and writes nothing. scope is the calling token's principal
-- (keys of different callers never meet); rpc the call the key was first used for;
-- request_hash SHA-256 of the canonical request without its key. response is the encoded
-- answer without its secrets: NULL only inside the transaction that claims the key and does
-- the work, never once committed. sealed_secret is the one secret an answer may need again
-- (CreateToken's token), sealed under the service KEK with (scope, key) as associated data.
-- Records older than the retention window count as absent and are purged by later calls.
CREATE TABLE idempotency_records (
    id              INTEGER PRIMARY KEY,
    scope           TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL CHECK (length(CAST(idempotency_key AS BLOB)) BETWEEN 1 AND 128),
    rpc             TEXT    NOT NULL,
    request_hash    BLOB    NOT NULL CHECK (length(request_hash) = 32),
    response        BLOB,
    sealed_secret   BLOB,
    created_at      INTEGER NOT NULL,
    UNIQUE (scope, idempotency_key)
) STRICT;
-- The purge walks records oldest first.
CREATE INDEX idempotency_records_by_age ON idempotency_records (created_at);
