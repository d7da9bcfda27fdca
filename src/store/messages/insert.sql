WITH writer AS (
    SELECT CAST(EXTRACT(EPOCH FROM CASE
               WHEN set_config('application_name', $1, true) IS NOT NULL
               THEN clock_timestamp() END) * 1000000 AS BIGINT) AS now
), batch AS (
    SELECT * FROM unnest($4::bytea[], $5::bytea[], $6::int4[], $7::bytea[], $8::bytea[],
                         $9::bytea[])
        AS b (message_id, session_id, epoch, nonce, ciphertext, associated_data)
), refused AS (
    SELECT 1 FROM batch b
    WHERE NOT CASE WHEN $10 THEN EXISTS (
              SELECT 1 FROM session_keys k
              WHERE k.recipient_user_id = $2 AND k.recipient_device_id = $3
                AND k.session_id = b.session_id AND k.epoch = b.epoch AND k.revoked_at IS NULL)
          ELSE EXISTS (
              SELECT 1 FROM sessions s
              WHERE s.session_id = b.session_id AND s.deleted_at IS NULL
                AND s.current_epoch >= b.epoch)
          END
    LIMIT 1
)
INSERT INTO messages (message_id, session_id, epoch, author_user_id, author_device_id, nonce,
                      ciphertext, associated_data, created_at)
SELECT b.message_id, b.session_id, b.epoch, $2, $3, b.nonce, b.ciphertext, b.associated_data,
       writer.now
FROM writer, batch b
WHERE NOT EXISTS (SELECT 1 FROM refused)
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id, created_at
