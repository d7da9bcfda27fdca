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
)
SELECT m.message_id, m.session_id, m.epoch, m.author_user_id, m.author_device_id, m.nonce,
       m.ciphertext, m.associated_data, m.created_at, m.deleted_at
FROM messages m
WHERE m.message_id = ANY (ARRAY(SELECT id FROM page))
ORDER BY m.created_at DESC, m.message_id DESC
