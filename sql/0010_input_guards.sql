-- pgsched schema, version 10: bad input is refused by the SQL doors too (issue 19).
--
-- The Python client and the CLI validate every field before writing; a plain
-- INSERT and pgsched.enqueue relied on the table's constraints alone, which
-- let through:
-- * a run_at before 2000 or past now + 100 years ('1970-01-01', 'infinity',
--   '-infinity'): a job that jumps every queue or never runs;
-- * a timeout_seconds of NaN or Infinity (NaN > 0 holds in PostgreSQL);
-- * args nested deeper than the clients' 64 levels: every JSON decoder on the
--   way (the worker's included) recurses once per level;
-- * in pgsched.enqueue, a negative delay (a run_at in the past) and a
--   priority outside smallint, which failed the column's conversion without
--   naming it.
--
-- A trigger, not CHECK constraints: PostgreSQL re-checks every CHECK on every
-- UPDATE of a row, and the claim and the completion update every job; this
-- trigger fires on INSERT and on UPDATE OF args only, and its WHEN clause
-- keeps the common row free of any function call. The depth walk runs only
-- for args of at least 520 bytes, the smallest jsonb that nests 65 levels
-- (65 empty arrays); measured at about 0.5 µs a row for 650-byte args, and
-- no difference within noise on a 100,000-row insert of small ones.

CREATE FUNCTION pgsched.refuse_bad_job_input() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.run_at < '2000-01-01 00:00:00+00' OR NEW.run_at > pgsched.now() + interval '36600 days' THEN
        RAISE EXCEPTION 'run_at must be between 2000-01-01 and 100 years from now, got %', NEW.run_at
            USING ERRCODE = 'check_violation', CONSTRAINT = 'jobs_run_at_range';
    END IF;
    IF NOT (NEW.timeout_seconds > 0 AND NEW.timeout_seconds <= 3162240000) THEN
        RAISE EXCEPTION 'timeout_seconds must be a finite number of seconds above 0 and at most 100 years, got %',
                        NEW.timeout_seconds
            USING ERRCODE = 'check_violation', CONSTRAINT = 'jobs_timeout_positive';
    END IF;
    RAISE EXCEPTION 'args nest objects and arrays more than 64 levels deep'
        USING ERRCODE = 'check_violation', CONSTRAINT = 'jobs_args_depth';
END
$$;
COMMENT ON FUNCTION pgsched.refuse_bad_job_input() IS
    'Refuses a job whose run_at, timeout_seconds or args nesting the table''s constraints cannot check cheaply';

-- The WHEN clause is the check; the function only names what failed. `strict $.**{64}` is every
-- value inside 64 containers: an object or array there is the 65th level (the args object is the
-- first), the clients' limit (pgsched.validation.MAX_JSON_DEPTH).
CREATE TRIGGER jobs_refuse_bad_input BEFORE INSERT OR UPDATE OF args ON pgsched.jobs
    FOR EACH ROW
    WHEN (NEW.run_at < '2000-01-01 00:00:00+00' OR NEW.run_at > pgsched.now() + interval '36600 days'
          OR NOT (NEW.timeout_seconds > 0 AND NEW.timeout_seconds <= 3162240000)
          OR (pg_catalog.pg_column_size(NEW.args) >= 520
              AND pg_catalog.jsonb_path_exists(
                  NEW.args, 'strict $.**{64} ? (@.type() == "object" || @.type() == "array")')))
    EXECUTE FUNCTION pgsched.refuse_bad_job_input();

-- ---------------------------------------------------------------------------
-- pgsched.enqueue, as in 0005 with the priority and delay checked first
-- (CREATE OR REPLACE keeps its owner, pgsched_owner, and its grants).
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
    -- Workers and admins read every job anyway; others see their owner's jobs only.
    sees_all pg_catalog.bool := pg_catalog.has_table_privilege(session_user, 'pgsched.jobs', 'SELECT');
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

REVOKE EXECUTE ON FUNCTION pgsched.refuse_bad_job_input() FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- pgsched_admin had every table privilege (GRANT ALL), TRIGGER included: a
-- trigger it created on jobs ran its code as whoever inserted next, the
-- owner of pgsched.enqueue or a superuser among them (tests/test_role_attacks.py).
-- It keeps the data of every table; triggers belong to the migrations. The
-- migration history is the migrator's too: clients trust its checksums.
-- ---------------------------------------------------------------------------
REVOKE TRIGGER ON ALL TABLES IN SCHEMA pgsched FROM pgsched_admin;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON pgsched.schema_migrations FROM pgsched_admin;
