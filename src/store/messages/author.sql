SELECT message_id, session_id, epoch, author_user_id, author_device_id, nonce, ciphertext,
       associated_data, created_at, deleted_at, page_rows
FROM (
    SELECT p.*,
           sum(octet_length(p.nonce) + octet_length(p.ciphertext)
               + coalesce(octet_length(p.associated_data), 0)) OVER listed AS running_bytes,
           row_number() OVER listed AS n,
           count(*) OVER () AS page_rows
    FROM (
        SELECT m.message_id, m.session_id, m.epoch, m.author_user_id, m.author_device_id,
               m.nonce, m.ciphertext, m.associated_data, m.created_at, m.deleted_at
        FROM messages m
        WHERE m.author_user_id = $1 AND m.deleted_at IS NULL
          AND m.created_at < $2 AND (m.created_at, m.message_id) < ($3, $4)
          AND m.session_id || int4send(m.epoch) = ANY (ARRAY(
                SELECT k.session_id || int4send(k.epoch) FROM session_keys k
                WHERE k.recipient_user_id = $5 AND k.recipient_device_id = $6
                  AND k.revoked_at IS NULL))
        ORDER BY m.created_at DESC, m.message_id DESC
        LIMIT $7
    ) p
    WINDOW listed AS (ORDER BY p.created_at DESC, p.message_id DESC ROWS UNBOUNDED PRECEDING)
) s
WHERE n = 1 OR running_bytes <= $8
ORDER BY created_at DESC, message_id DESC
