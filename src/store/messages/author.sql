SELECT m.message_id, m.session_id, m.epoch, m.author_user_id, m.author_device_id, m.nonce,
       m.ciphertext, m.associated_data, m.created_at, m.deleted_at
FROM messages m
WHERE m.author_user_id = $1 AND m.deleted_at IS NULL
  AND m.created_at < $2 AND (m.created_at, m.message_id) < ($3, $4)
  AND m.session_id || int4send(m.epoch) = ANY (ARRAY(
        SELECT k.session_id || int4send(k.epoch) FROM session_keys k
        WHERE k.recipient_user_id = $5 AND k.recipient_device_id = $6
          AND k.revoked_at IS NULL))
ORDER BY m.created_at DESC, m.message_id DESC
LIMIT $7
