SELECT CAST(EXTRACT(EPOCH FROM LEAST(statement_timestamp(), MIN(xact_start))) * 1000000 AS BIGINT)
       AS micros
FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1
  AND pid <> pg_backend_pid()
