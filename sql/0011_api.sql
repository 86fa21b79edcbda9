-- pgsched schema, version 11: the REST API (issue 21; docs/api.md).
--
-- * pgsched_api: the group of the API's database login. It is subject to row-level security on
--   jobs and schedules: each transaction says whose request it serves with
--   set_config('pgsched.owner', <user name>, true) and set_config('pgsched.role', <user role>, true);
--   a member or viewer sees the jobs of its owner only, an admin or operator every job. The
--   API checks the owner in its own queries too: RLS is the second line, not the only one.
-- * users may create shell/http jobs through the API only when may_create_commands is set, and
--   only when the API's login is a member of pgsched_api_commands.
-- * audit_log records the request id and client address; the API may insert and read audit
--   rows, never change or delete them.
-- * api_idempotency keeps the first response of a POST with an Idempotency-Key for 24 hours.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgsched_api') THEN
        BEGIN
            CREATE ROLE pgsched_api NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

-- pgsched_api_commands: granted to the API's login by an operator who lets the API create shell
-- and http jobs at all (for the users whose may_create_commands is set; the API checks that).
-- Unlike pgsched_admin it gives no other right, and row-level security still applies.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgsched_api_commands') THEN
        BEGIN
            CREATE ROLE pgsched_api_commands NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;
-- (CREATE OR REPLACE keeps its owner and grants; the worker asks it again about a command
-- job's creator before running it.)
CREATE OR REPLACE FUNCTION pgsched.may_create_command_jobs(role_name name) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.pg_has_role(role_name, 'pgsched_admin', 'MEMBER')
        OR pg_catalog.pg_has_role(role_name, 'pgsched_api_commands', 'MEMBER')
$$;
COMMENT ON FUNCTION pgsched.may_create_command_jobs(name) IS
    'True for roles allowed to create shell and http jobs: members of pgsched_admin or pgsched_api_commands, and superusers';

ALTER TABLE pgsched.users ADD COLUMN may_create_commands boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN pgsched.users.may_create_commands IS 'Whether the user may create shell and http jobs through the API';

ALTER TABLE pgsched.audit_log ADD COLUMN request_id text, ADD COLUMN client_addr text;
COMMENT ON COLUMN pgsched.audit_log.request_id IS 'The API request that made the change (its X-Request-ID)';
COMMENT ON COLUMN pgsched.audit_log.client_addr IS 'Address of the API client that made the change';

CREATE TABLE pgsched.api_idempotency (
    user_id      bigint NOT NULL REFERENCES pgsched.users (id) ON DELETE CASCADE,
    key          text NOT NULL,
    request_hash bytea NOT NULL,
    status       integer NOT NULL,
    response     jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT pgsched.now(),
    PRIMARY KEY (user_id, key),
    CONSTRAINT api_idempotency_key_length CHECK (length(key) BETWEEN 1 AND 200)
);
COMMENT ON TABLE pgsched.api_idempotency IS
    'First response of each POST sent with an Idempotency-Key, per user; replayed for 24 hours';

-- What the API does, and nothing more: read and change jobs (cancel, retry and the dependency
-- trigger they fire), enqueue through pgsched.enqueue, read history, the catalog and the
-- monitoring views, pause and resume queues, create schedules, authenticate (users, tokens),
-- manage users and their tokens, append to the audit and read it.
GRANT USAGE ON SCHEMA pgsched TO pgsched_api;
-- (wake: the dependency trigger that a cancel or retry fires wakes the queues it released.)
GRANT EXECUTE ON FUNCTION pgsched.now(), pgsched.may_create_command_jobs(name), pgsched.queue_served(text),
                          pgsched.cancel(bigint, text), pgsched.retry(bigint), pgsched.wake(text[]),
                          pgsched.cancel_workflow(uuid, text), pgsched.retry_workflow(uuid)
    TO pgsched_api;
GRANT EXECUTE ON FUNCTION pgsched.enqueue(text, jsonb, text, integer, timestamptz, integer, text, bigint[], text,
                                          interval, double precision, uuid, text, boolean)
    TO pgsched_api;
GRANT SELECT ON pgsched.jobs, pgsched.job_deps, pgsched.runs, pgsched.run_logs, pgsched.tasks,
                pgsched.schema_migrations, pgsched.queues, pgsched.queue_stats, pgsched.worker_status,
                pgsched.users
    TO pgsched_api;
GRANT UPDATE (state, error, finished_at, run_at, max_attempts, cancel_requested_at, worker_id)
    ON pgsched.jobs TO pgsched_api;
-- Batches go in as App.enqueue_many writes them (ids allocated ahead, one INSERT), and a
-- schedule's job triggered now as App.trigger_schedule writes it, for the user's own owner
-- (jobs_api_insert).
GRANT INSERT (id, task, args, queue, priority, run_at, max_attempts, timeout_seconds, dedupe_key, owner,
              concurrency_key, run_on_upstream_failure, schedule_id)
    ON pgsched.jobs TO pgsched_api;
GRANT USAGE ON SEQUENCE pgsched.jobs_id_seq TO pgsched_api;
-- User management (admins only: the API checks the role).
GRANT INSERT (username, role, may_create_commands),
      UPDATE (role, disabled, may_create_commands, updated_at, last_login_at)
    ON pgsched.users TO pgsched_api;
-- Queue controls (admins and operators only: the API checks the role) through the library's
-- upsert, which also reads which queues exist.
GRANT INSERT (name, paused, max_running, rate_limit, rate_period, max_per_key, fair, encrypt),
      UPDATE (paused, max_running, rate_limit, rate_period, max_per_key, fair, encrypt, updated_at)
    ON pgsched.queues TO pgsched_api;
GRANT SELECT (queues) ON pgsched.workers TO pgsched_api;
-- Schedules: created through the library's upsert, for the user's own owner (policies below).
GRANT SELECT ON pgsched.schedules TO pgsched_api;
GRANT INSERT (name, task, args, cron, every, timezone, queue, priority, max_attempts, timeout_seconds, owner,
              misfire_policy, catch_up_window, overlap_policy, jitter_seconds, start_at, end_at, source, options),
      UPDATE (task, args, cron, every, timezone, queue, priority, max_attempts, timeout_seconds, owner,
              misfire_policy, catch_up_window, overlap_policy, jitter_seconds, start_at, end_at, source, options,
              enabled, updated_at, invalid_reason, next_run_at, paused)
    ON pgsched.schedules TO pgsched_api;
GRANT DELETE ON pgsched.schedules TO pgsched_api;
GRANT SELECT, INSERT ON pgsched.api_tokens TO pgsched_api;
GRANT UPDATE (revoked_at, last_used_at) ON pgsched.api_tokens TO pgsched_api;
GRANT SELECT, INSERT ON pgsched.audit_log TO pgsched_api;
GRANT SELECT, INSERT, DELETE ON pgsched.api_idempotency TO pgsched_api;
GRANT ALL ON pgsched.api_idempotency TO pgsched_admin;
REVOKE TRIGGER ON pgsched.api_idempotency FROM pgsched_admin;

-- ---------------------------------------------------------------------------
-- Row-level security on jobs. The table's owner (the migrator) and superusers are not
-- subject to it; every other role is, so the roles that see every job say so in a policy.
-- pgsched_owner is among them: pgsched.enqueue inserts as it, with the owner its caller gave.
-- ---------------------------------------------------------------------------
ALTER TABLE pgsched.jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY jobs_unrestricted ON pgsched.jobs
    TO pgsched_worker, pgsched_enqueuer, pgsched_reader, pgsched_admin, pgsched_owner
    USING (true) WITH CHECK (true);
-- The API: the rows of the transaction's owner, or all for an admin or operator. Settings not
-- made in this transaction read as '' (or NULL when never made in the session): nothing.
CREATE POLICY jobs_api_read ON pgsched.jobs FOR SELECT TO pgsched_api
    USING (pg_catalog.current_setting('pgsched.role', true) IN ('admin', 'operator')
           OR owner = NULLIF(pg_catalog.current_setting('pgsched.owner', true), ''));
-- New rows (batches): of the transaction's owner for a member, any for an admin or operator.
CREATE POLICY jobs_api_insert ON pgsched.jobs FOR INSERT TO pgsched_api
    WITH CHECK (pg_catalog.current_setting('pgsched.role', true) IN ('admin', 'operator')
                OR (pg_catalog.current_setting('pgsched.role', true) = 'member'
                    AND owner = NULLIF(pg_catalog.current_setting('pgsched.owner', true), '')));
-- Changes (cancel, retry): the same rows, and never for a viewer.
CREATE POLICY jobs_api_change ON pgsched.jobs FOR UPDATE TO pgsched_api
    USING (pg_catalog.current_setting('pgsched.role', true) IN ('admin', 'operator')
           OR (pg_catalog.current_setting('pgsched.role', true) = 'member'
               AND owner = NULLIF(pg_catalog.current_setting('pgsched.owner', true), '')));

-- Schedules, likewise: their owner's for a member or viewer, every one for an admin or operator;
-- a member creates and changes only schedules of its own owner, a viewer none.
ALTER TABLE pgsched.schedules ENABLE ROW LEVEL SECURITY;
CREATE POLICY schedules_unrestricted ON pgsched.schedules
    TO pgsched_worker, pgsched_enqueuer, pgsched_reader, pgsched_admin, pgsched_owner
    USING (true) WITH CHECK (true);
CREATE POLICY schedules_api_read ON pgsched.schedules FOR SELECT TO pgsched_api
    USING (pg_catalog.current_setting('pgsched.role', true) IN ('admin', 'operator')
           OR owner = NULLIF(pg_catalog.current_setting('pgsched.owner', true), ''));
CREATE POLICY schedules_api_insert ON pgsched.schedules FOR INSERT TO pgsched_api
    WITH CHECK (pg_catalog.current_setting('pgsched.role', true) IN ('admin', 'operator')
                OR (pg_catalog.current_setting('pgsched.role', true) = 'member'
                    AND owner = NULLIF(pg_catalog.current_setting('pgsched.owner', true), '')));
CREATE POLICY schedules_api_change ON pgsched.schedules FOR UPDATE TO pgsched_api
    USING (pg_catalog.current_setting('pgsched.role', true) IN ('admin', 'operator')
           OR (pg_catalog.current_setting('pgsched.role', true) = 'member'
               AND owner = NULLIF(pg_catalog.current_setting('pgsched.owner', true), '')))
    WITH CHECK (pg_catalog.current_setting('pgsched.role', true) IN ('admin', 'operator')
                OR (pg_catalog.current_setting('pgsched.role', true) = 'member'
                    AND owner = NULLIF(pg_catalog.current_setting('pgsched.owner', true), '')));

CREATE POLICY schedules_api_delete ON pgsched.schedules FOR DELETE TO pgsched_api
    USING (pg_catalog.current_setting('pgsched.role', true) IN ('admin', 'operator')
           OR (pg_catalog.current_setting('pgsched.role', true) = 'member'
               AND owner = NULLIF(pg_catalog.current_setting('pgsched.owner', true), '')));

-- ---------------------------------------------------------------------------
-- pgsched.enqueue, as in version 10, except who "sees all": for the API's login, the role of
-- the user it acts for (CREATE OR REPLACE keeps its owner, pgsched_owner, and its grants).
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgsched.enqueue(
    task                    text,
    args                    jsonb DEFAULT '{}',
    queue                   text DEFAULT NULL,
    priority                integer DEFAULT NULL,
    run_at                  timestamptz DEFAULT NULL,
    max_attempts            integer DEFAULT NULL,
    dedupe_key              text DEFAULT NULL,
    depends_on              bigint[] DEFAULT NULL,
    owner                   text DEFAULT NULL,
    delay                   interval DEFAULT NULL,
    timeout_seconds         double precision DEFAULT NULL,
    workflow_id             uuid DEFAULT NULL,
    concurrency_key         text DEFAULT NULL,
    run_on_upstream_failure boolean DEFAULT false
) RETURNS pgsched.jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsched, pg_temp AS $$
#variable_conflict use_column
DECLARE
    defaults pgsched.tasks;
    deps pg_catalog.int8[];
    dep_states pg_catalog.text[];
    initial_state pg_catalog.text := 'queued';
    initial_error pg_catalog.text;
    existing_id pg_catalog.int8;
    -- Workers and admins read every job anyway; others see their owner's jobs only. The REST
    -- API's login (a member of pgsched_api) reads jobs through row-level security: it sees all
    -- only for a user whose role (set per transaction) is admin or operator.
    sees_all pg_catalog.bool := CASE
        WHEN pg_catalog.pg_has_role(session_user, 'pgsched_api', 'MEMBER')
             AND NOT pg_catalog.pg_has_role(session_user, 'pgsched_admin', 'MEMBER')
        THEN COALESCE(pg_catalog.current_setting('pgsched.role', true), '') IN ('admin', 'operator')
        ELSE pg_catalog.has_table_privilege(session_user, 'pgsched.jobs', 'SELECT') END;
    job pgsched.jobs;
BEGIN
    IF enqueue.task IN ('shell', 'http') AND NOT pgsched.may_create_command_jobs(session_user) THEN
        RAISE EXCEPTION 'role "%" may not create % jobs', session_user, enqueue.task
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'shell and http jobs need a member of pgsched_admin';
    END IF;
    IF run_at IS NOT NULL AND delay IS NOT NULL THEN
        RAISE EXCEPTION 'give run_at or delay, not both'
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'delay';
    END IF;
    -- Checked here, before the insert: a priority outside smallint would fail the column's
    -- conversion with no name, and a negative delay would make a past run_at that passes.
    IF priority NOT BETWEEN -100 AND 100 THEN
        RAISE EXCEPTION 'priority must be between -100 and 100, got %', priority
            USING ERRCODE = 'check_violation', CONSTRAINT = 'jobs_priority_range';
    END IF;
    IF delay < interval '0' OR delay > interval '36600 days' THEN
        RAISE EXCEPTION 'delay must be between 0 and 100 years, got %', delay
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'delay';
    END IF;
    IF pg_catalog.cardinality(depends_on) > 100 THEN
        RAISE EXCEPTION 'depends_on may list at most 100 jobs, got %', pg_catalog.cardinality(depends_on)
            USING ERRCODE = 'check_violation', CONSTRAINT = 'job_deps_max_per_job';
    END IF;
    deps := ARRAY(SELECT DISTINCT d FROM pg_catalog.unnest(COALESCE(depends_on, '{}')) AS d);
    SELECT * INTO defaults FROM pgsched.tasks t WHERE t.name = enqueue.task;

    IF pg_catalog.cardinality(deps) > 0 THEN
        -- The lock serializes with a concurrent completion of a dependency:
        -- either we see its final state, or its release trigger sees this job.
        -- (NO KEY UPDATE, not SHARE: the job_deps trigger then marks the
        -- dependency has_dependents, which two SHARE holders would deadlock on.)
        -- Jobs the caller may not see are neither locked nor told apart from missing ones.
        SELECT pg_catalog.array_agg(j.state) INTO dep_states
        FROM (SELECT s.state FROM pgsched.jobs s
              WHERE s.id = ANY (deps) AND (sees_all OR s.owner IS NOT DISTINCT FROM enqueue.owner)
              ORDER BY s.id FOR NO KEY UPDATE) AS j;
        IF COALESCE(pg_catalog.cardinality(dep_states), 0) < pg_catalog.cardinality(deps) THEN
            RAISE EXCEPTION 'depends_on names a job that does not exist'
                USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'job_deps_depends_on_fkey',
                      DETAIL = pg_catalog.format('missing: %s', ARRAY(
                          SELECT d FROM pg_catalog.unnest(deps) AS d
                          WHERE NOT EXISTS (SELECT 1 FROM pgsched.jobs s
                                            WHERE s.id = d
                                              AND (sees_all OR s.owner IS NOT DISTINCT FROM enqueue.owner))));
        END IF;
        IF NOT run_on_upstream_failure AND dep_states && ARRAY['failed', 'cancelled']::pg_catalog.text[] THEN
            initial_state := 'cancelled';
            initial_error := 'upstream: a dependency failed or was cancelled';
        ELSIF EXISTS (SELECT 1 FROM pg_catalog.unnest(dep_states) AS s
                      WHERE s NOT IN ('succeeded', 'failed', 'cancelled')
                         OR (s <> 'succeeded' AND NOT run_on_upstream_failure)) THEN
            initial_state := 'waiting';
        END IF;
    END IF;

    INSERT INTO pgsched.jobs AS j (task, args, queue, priority, state, run_at, max_attempts, timeout_seconds,
                                   dedupe_key, owner, workflow_id, concurrency_key, run_on_upstream_failure,
                                   error, finished_at, created_by)
    VALUES (enqueue.task, COALESCE(args, '{}'),
            COALESCE(queue, defaults.queue, 'default'),
            COALESCE(priority, (defaults.options ->> 'priority')::pg_catalog.int4, 0),
            initial_state,
            COALESCE(run_at, pgsched.now() + delay, pgsched.now()),
            COALESCE(max_attempts, (defaults.options ->> 'max_attempts')::pg_catalog.int4, 5),
            COALESCE(timeout_seconds, (defaults.options ->> 'timeout')::pg_catalog.float8),
            dedupe_key, owner, workflow_id, concurrency_key, run_on_upstream_failure,
            initial_error, CASE WHEN initial_state = 'cancelled' THEN pgsched.now() END,
            session_user)
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND state IN ('waiting', 'scheduled', 'queued', 'running')
    DO NOTHING
    RETURNING j.* INTO job;

    IF job.id IS NULL THEN
        -- Named only to a caller who may see that job.
        SELECT s.id INTO existing_id FROM pgsched.jobs s
        WHERE s.dedupe_key = enqueue.dedupe_key AND s.state IN ('waiting', 'scheduled', 'queued', 'running')
          AND (sees_all OR s.owner IS NOT DISTINCT FROM enqueue.owner);
        RAISE EXCEPTION 'a live job with dedupe_key "%" already exists', dedupe_key
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'jobs_dedupe_key_live',
                  DETAIL = CASE WHEN existing_id IS NOT NULL THEN pg_catalog.format('existing_id=%s', existing_id)
                                ELSE 'it belongs to another owner' END;
    END IF;

    IF pg_catalog.cardinality(deps) > 0 THEN
        INSERT INTO pgsched.job_deps (job_id, depends_on) SELECT job.id, d FROM pg_catalog.unnest(deps) AS d;
    END IF;
    RETURN job;
END

$$;
