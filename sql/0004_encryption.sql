-- pgsched schema, version 4: payload encryption at rest (README, "Encrypted payloads").
--
-- Encryption happens in the clients and workers, which hold the keys; the
-- database never sees a key nor a plaintext payload of an encrypted job. What
-- lives here is the safety net: a job inserted into a queue whose
-- pgsched.queues.encrypt is true must carry encrypted args.

-- The statement-level insert trigger already reads the transition table once
-- per statement to send one NOTIFY per queue; it now also refuses a statement
-- that puts plaintext args into an encrypting queue. When no queue encrypts
-- (the common case) the added cost is one probe of the tiny queues table per
-- statement, not per row: bench W1a/W1b measure it (docs/architecture.md).
CREATE OR REPLACE FUNCTION pgsched.notify_inserted_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    plain_queue text;
BEGIN
    IF EXISTS (SELECT 1 FROM pgsched.queues WHERE encrypt) THEN
        SELECT i.queue INTO plain_queue
        FROM inserted i JOIN pgsched.queues q ON q.name = i.queue AND q.encrypt
        WHERE NOT (i.args @> '{"pgsched_encrypted": 1}')
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'queue "%" stores encrypted payloads: args must be an encrypted envelope', plain_queue
                USING ERRCODE = 'check_violation', CONSTRAINT = 'jobs_args_encrypted',
                      HINT = 'enqueue with a pgsched client that has PGSCHED_ENCRYPTION_KEYS (reopen apps after changing pgsched.queues.encrypt)';
        END IF;
    END IF;
    IF pg_catalog.pg_notification_queue_usage() <= 0.5 THEN
        PERFORM pg_catalog.pg_notify('pgsched_wakeup', q.queue)
        FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'queued') AS q;
    END IF;
    RETURN NULL;
END
$$;

-- Clients read which queues encrypt when they connect; an enqueuer may read that, nothing more.
GRANT SELECT (name, encrypt) ON pgsched.queues TO pgsched_enqueuer, pgsched_reader;
