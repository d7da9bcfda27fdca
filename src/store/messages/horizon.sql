SELECT CAST(EXTRACT(EPOCH FROM LEAST(statement_timestamp(), MIN(xact_start))) * 1000000 AS BIGINT)
       AS micros
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND (application_name = $1 OR starts_with(application_name, $1 || '/'))
  -- An aborted transaction can only roll back.
  AND state IS DISTINCT FROM 'idle in transaction (aborted)'
  -- A writer past its bound (plus $2 ms) that waits for its client can never commit.
  AND NOT COALESCE(
        wait_event_type = 'Client' AND wait_event IN ('ClientRead', 'ClientWrite')
        AND xact_start < statement_timestamp() - CASE
              WHEN starts_with(application_name, $1 || '/')
                   AND split_part(application_name, '/', 2) ~ '^[0-9]{1,9}$'
              THEN (CAST(split_part(application_name, '/', 2) AS BIGINT) + $2)
                   * INTERVAL '1 millisecond'
            END,
        FALSE)
