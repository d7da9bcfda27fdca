-- The commit-time bound on message writes (issue 10; the proof is in
-- src/store/messages/horizon.rs). A PutMessages transaction names itself
-- `keyhold:put-messages/<bound in ms>` in application_name before it inserts; at its commit,
-- this deferred check refuses every message row it inserted if the transaction began more
-- than that bound ago, so a writer older than its bound can never make a message visible.
-- Listings rely on that to stop waiting for such a writer. A transaction without the name
-- (psql, an older Keyhold) is not checked, and listings wait for it as before.
CREATE FUNCTION keyhold_message_commit_deadline() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    writer text := current_setting('application_name');
    bound text;
BEGIN
    IF starts_with(writer, 'keyhold:put-messages/') THEN
        bound := split_part(writer, '/', 2);
        IF bound ~ '^[0-9]{1,9}$'
           AND clock_timestamp() > transaction_timestamp()
                                   + CAST(bound AS bigint) * interval '1 millisecond' THEN
            RAISE EXCEPTION 'message write not committed: its transaction began more than % ms ago', bound
                USING ERRCODE = 'query_canceled';
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;

-- One check per transaction is enough: only its first inserted message row queues the check
-- (a transaction-local mark, rolled back with a rolled-back savepoint like the row's event), so
-- a batch of 500 messages costs one trigger call at commit, not 500.
CREATE FUNCTION keyhold_message_deadline_unqueued() RETURNS boolean
LANGUAGE sql VOLATILE AS $fn$
    SELECT CASE
        WHEN current_setting('keyhold.message_deadline_queued', true) = 'yes' THEN false
        ELSE set_config('keyhold.message_deadline_queued', 'yes', true) = 'yes'
    END
$fn$;

CREATE CONSTRAINT TRIGGER messages_commit_deadline
    AFTER INSERT ON messages
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (keyhold_message_deadline_unqueued())
    EXECUTE FUNCTION keyhold_message_commit_deadline();
