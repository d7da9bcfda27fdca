WITH readable AS (
    SELECT session_id, epoch FROM session_keys
    WHERE recipient_user_id = $1 AND recipient_device_id = $2 AND revoked_at IS NULL{session}
), page AS (
    SELECT p.message_id AS id FROM readable r
    CROSS JOIN LATERAL (
        SELECT m.created_at, m.message_id FROM messages m
        WHERE m.session_id = r.session_id AND m.epoch = r.epoch AND m.deleted_at IS NULL
          AND m.created_at < $3 AND (m.created_at, m.message_id) < ($4, $5)
        ORDER BY m.created_at DESC, m.message_id DESC
        LIMIT $6
    ) p
    ORDER BY p.created_at DESC, p.message_id DESC
    LIMIT $6
), sized AS (
    SELECT m.message_id, m.session_id, m.epoch, m.author_user_id, m.author_device_id, m.nonce,
           m.ciphertext, m.associated_data, m.created_at, m.deleted_at,
           sum(octet_length(m.nonce) + octet_length(m.ciphertext)
               + coalesce(octet_length(m.associated_data), 0)) OVER listed AS running_bytes,
           row_number() OVER listed AS n,
           count(*) OVER () AS page_rows
    FROM messages m
    WHERE m.message_id = ANY (ARRAY(SELECT id FROM page))
    WINDOW listed AS (ORDER BY m.created_at DESC, m.message_id DESC ROWS UNBOUNDED PRECEDING)
)
SELECT message_id, session_id, epoch, author_user_id, author_device_id, nonce, ciphertext,
       associated_data, created_at, deleted_at, page_rows
FROM sized
WHERE n = 1 OR running_bytes <= $7
ORDER BY created_at DESC, message_id DESC
