-- pgsched schema, version 5: database security (issue 18; docs/architecture.md,
-- "Database roles and security").
--
-- * Functions that run with their owner's rights (SECURITY DEFINER) put
--   pg_temp last in their search_path and belong to pgsched_owner, a NOLOGIN
--   role that is no superuser and holds only what those functions need.
-- * A worker may update only the columns a worker or scheduler changes; the
--   shell/http guard also covers args, and an allowed editor becomes the
--   job's creator.
-- * A job depends on at most 100 jobs, and pgsched.enqueue neither locks nor
--   names jobs of another owner.
-- * ensure_history_partitions takes days_ahead in 0..60.
-- * No function of the schema is executable by PUBLIC.

-- ---------------------------------------------------------------------------
-- The owner of the definer functions. Cluster-wide like the other groups, so
-- created only when missing, tolerating a concurrent creator.
-- ---------------------------------------------------------------------------
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgsched_owner') THEN
        BEGIN
            CREATE ROLE pgsched_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    -- A migrator that is not a superuser must be able to act as pgsched_owner to give it objects
    -- (ALTER ... OWNER TO); it owns the schema anyway.
    -- (Its creator may hold it with ADMIN but without SET, PostgreSQL 16's default: grant anyway.)
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        BEGIN
            EXECUTE pg_catalog.format('GRANT pgsched_owner TO %I', current_user);
        EXCEPTION WHEN insufficient_privilege OR invalid_grant_operation THEN
            RAISE EXCEPTION 'pgsched: role "%" cannot give objects to pgsched_owner', current_user
                USING ERRCODE = 'insufficient_privilege',
                      HINT = pg_catalog.format('as a superuser: GRANT pgsched_owner TO %I; then migrate again', current_user);
        END;
    END IF;
END
$$;

-- What the definer functions do as pgsched_owner, and nothing more:
-- * enqueue reads the catalog and the jobs it depends on (FOR NO KEY UPDATE needs an UPDATE
--   privilege; the job_deps trigger sets has_dependents), inserts the job and its edges, and
--   returns the whole row; the insert triggers read which queues encrypt and call now() and the
--   shell/http guard.
-- * ensure_history_partitions creates partitions of runs and run_logs: PostgreSQL lets only the
--   owner of a partitioned table add partitions, so pgsched_owner owns both (below), and needs
--   CREATE on the schema for the new tables.
-- * prune_history drops old partitions (it owns them) and reads the queues' retention.
GRANT USAGE, CREATE ON SCHEMA pgsched TO pgsched_owner;
GRANT SELECT ON pgsched.jobs, pgsched.job_deps, pgsched.tasks TO pgsched_owner;
GRANT INSERT (task, args, queue, priority, state, run_at, max_attempts, timeout_seconds, dedupe_key, owner,
              workflow_id, concurrency_key, run_on_upstream_failure, error, finished_at, created_by)
    ON pgsched.jobs TO pgsched_owner;
GRANT UPDATE (has_dependents) ON pgsched.jobs TO pgsched_owner;
GRANT INSERT ON pgsched.job_deps TO pgsched_owner;
GRANT SELECT (name, encrypt, retention_succeeded, retention_failed) ON pgsched.queues TO pgsched_owner;
GRANT EXECUTE ON FUNCTION pgsched.now(), pgsched.may_create_command_jobs(name) TO pgsched_owner;

-- The history tables and every partition they have (ALTER TABLE does not recurse into
-- partitions). Grants made on them so far stay as they are.
DO $$
DECLARE
    rel regclass;
BEGIN
    FOR rel IN
        SELECT 'pgsched.runs'::regclass UNION ALL SELECT 'pgsched.run_logs'::regclass
        UNION ALL
        SELECT i.inhrelid::regclass FROM pg_catalog.pg_inherits i
        WHERE i.inhparent IN ('pgsched.runs'::regclass, 'pgsched.run_logs'::regclass)
    LOOP
        EXECUTE pg_catalog.format('ALTER TABLE %s OWNER TO pgsched_owner', rel);
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------
-- The shell/http guard. It fires on INSERT and on UPDATE OF task or args (a
-- new argv is a new command), on jobs and on schedules. The actor is the
-- current role, except inside a definer function of pgsched_owner, which
-- checked its caller (session_user) itself. On jobs, an allowed actor that
-- changes task or args becomes the job's creator (created_by): the worker
-- checks that creator again before it runs the command.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgsched.guard_command_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    actor name := CASE WHEN current_user = 'pgsched_owner' THEN session_user ELSE current_user END;
BEGIN
    IF NOT pgsched.may_create_command_jobs(actor) THEN
        RAISE EXCEPTION 'role "%" may not create % jobs', actor, NEW.task
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'shell and http jobs need a member of pgsched_admin';
    END IF;
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'jobs' THEN
        NEW.created_by := actor;
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER jobs_guard_commands ON pgsched.jobs;
CREATE TRIGGER jobs_guard_commands BEFORE INSERT OR UPDATE OF task, args ON pgsched.jobs
    FOR EACH ROW WHEN (NEW.task IN ('shell', 'http'))
    EXECUTE FUNCTION pgsched.guard_command_jobs();
DROP TRIGGER schedules_guard_commands ON pgsched.schedules;
CREATE TRIGGER schedules_guard_commands BEFORE INSERT OR UPDATE OF task, args ON pgsched.schedules
    FOR EACH ROW WHEN (NEW.task IN ('shell', 'http'))
    EXECUTE FUNCTION pgsched.guard_command_jobs();

-- A worker (and the scheduler, which runs as one) changes only these columns of jobs:
-- claim (state, attempts, worker_id, started_at, lease), heartbeat (lease), progress,
-- completion (state, result, error, attempts, run_at, finished_at, worker_id, lease,
-- cancel_requested_at), release, cancel and retry (state, error, finished_at, run_at,
-- max_attempts, cancel_requested_at, worker_id, lease), promote, rescue, the dependency
-- trigger (has_dependents). Never task, args, queue, owner or created_by: what a job runs and
-- on whose authority is fixed by whoever created it.
REVOKE UPDATE ON pgsched.jobs FROM pgsched_worker;
GRANT UPDATE (state, attempts, worker_id, started_at, finished_at, result, error, run_at, progress,
              cancel_requested_at, lease_expires_at, max_attempts, has_dependents)
    ON pgsched.jobs TO pgsched_worker;

-- ---------------------------------------------------------------------------
-- Dependencies: at most 100 per job. Each one is locked by the enqueuing
-- transaction until it ends and walked by the cycle check; a wider fan-in is
-- better a tree of jobs. Checked after the graph lock, which orders all
-- writers of job_deps, so two concurrent writers cannot pass it together.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgsched.check_new_dependency() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(7451983510446851072);  -- "graph" lock
    -- job_deps primary key (job_id, depends_on).
    IF (SELECT count(*) FROM (SELECT 1 FROM pgsched.job_deps e WHERE e.job_id = NEW.job_id LIMIT 100) AS d) >= 100 THEN
        RAISE EXCEPTION 'job % may depend on at most 100 jobs', NEW.job_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'job_deps_max_per_job';
    END IF;
    UPDATE pgsched.jobs SET has_dependents = true WHERE id = NEW.depends_on AND NOT has_dependents;
    IF EXISTS (SELECT 1 FROM pgsched.jobs WHERE id = NEW.job_id AND has_dependents) THEN
        IF EXISTS (
            WITH RECURSIVE upstream(id) AS (
                SELECT NEW.depends_on
                UNION
                SELECT e.depends_on FROM pgsched.job_deps e JOIN upstream u ON e.job_id = u.id
            )
            SELECT 1 FROM upstream WHERE id = NEW.job_id
        ) THEN
            RAISE EXCEPTION 'job % cannot depend on job %: that would create a cycle', NEW.job_id, NEW.depends_on
                USING ERRCODE = 'check_violation', CONSTRAINT = 'job_deps_no_cycle';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

-- ---------------------------------------------------------------------------
-- pgsched.enqueue, as in 0002 but:
-- * search_path ends with pg_temp, owned by pgsched_owner (below);
-- * depends_on lists at most 100 ids, checked before anything is read;
-- * a caller who may not read jobs (pgsched_enqueuer) sees only the jobs of
--   the owner it enqueues for: a dependency on another owner's job gets the
--   error of a missing id and is not locked, and a dedupe conflict with
--   another owner's job does not name that job.
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

-- ---------------------------------------------------------------------------
-- History partitions: as in 0001, with days_ahead bounded (a huge value
-- would create a table per day for centuries).
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgsched.ensure_history_partitions(days_ahead integer DEFAULT 7) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsched, pg_temp AS $$
DECLARE
    day pg_catalog.date;
    parent pg_catalog.text;
    child pg_catalog.text;
    created pg_catalog.int4 := 0;
BEGIN
    IF days_ahead IS NULL OR days_ahead < 0 OR days_ahead > 60 THEN
        RAISE EXCEPTION 'days_ahead must be between 0 and 60, got %', days_ahead
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'days_ahead';
    END IF;
    FOR day IN
        SELECT d::pg_catalog.date
        FROM pg_catalog.generate_series((pgsched.now() AT TIME ZONE 'UTC')::pg_catalog.date - 1,
                                        (pgsched.now() AT TIME ZONE 'UTC')::pg_catalog.date + days_ahead,
                                        interval '1 day') AS d
    LOOP
        FOREACH parent IN ARRAY ARRAY['runs', 'run_logs']::pg_catalog.text[] LOOP
            child := parent || '_' || pg_catalog.to_char(day, 'YYYYMMDD');
            CONTINUE WHEN pg_catalog.to_regclass('pgsched.' || child) IS NOT NULL;
            BEGIN
                EXECUTE pg_catalog.format(
                    'CREATE TABLE pgsched.%I PARTITION OF pgsched.%I FOR VALUES FROM (%L) TO (%L)',
                    child, parent,
                    day::pg_catalog.timestamp AT TIME ZONE 'UTC', (day + 1)::pg_catalog.timestamp AT TIME ZONE 'UTC');
                created := created + 1;
            EXCEPTION WHEN check_violation THEN
                RAISE WARNING 'pgsched: rows for % already sit in %_default; partition % not created', day, parent, child;
            END;
        END LOOP;
    END LOOP;
    RETURN created;
END
$$;

-- As in 0002, with the catalogs named in full.
CREATE OR REPLACE FUNCTION pgsched.prune_history(batch integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsched, pg_temp AS $$
DECLARE
    keep interval := (SELECT greatest(interval '30 days', pg_catalog.max(greatest(retention_succeeded, retention_failed)))
                      FROM pgsched.queues);
    horizon pg_catalog.date := ((pgsched.now() - COALESCE(keep, interval '30 days')) AT TIME ZONE 'UTC')::pg_catalog.date;
    part record;
    dropped pg_catalog.int4 := 0;
    n pg_catalog.int4;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent IN ('pgsched.runs'::pg_catalog.regclass, 'pgsched.run_logs'::pg_catalog.regclass)
          AND c.relname ~ '_[0-9]{8}$'
          AND pg_catalog.to_date(pg_catalog.right(c.relname, 8), 'YYYYMMDD') < horizon
    LOOP
        EXECUTE pg_catalog.format('DROP TABLE pgsched.%I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    DELETE FROM pgsched.runs_default WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM pgsched.runs_default WHERE started_at < horizon LIMIT batch));
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM pgsched.run_logs_default WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM pgsched.run_logs_default WHERE logged_at < horizon LIMIT batch));
    RETURN dropped + n;
END
$$;

ALTER FUNCTION pgsched.enqueue(text, jsonb, text, integer, timestamptz, integer, text, bigint[], text, interval,
                               double precision, uuid, text, boolean) OWNER TO pgsched_owner;
ALTER FUNCTION pgsched.ensure_history_partitions(integer) OWNER TO pgsched_owner;
ALTER FUNCTION pgsched.prune_history(integer) OWNER TO pgsched_owner;

-- ---------------------------------------------------------------------------
-- Functions are executable by PUBLIC by default: 0003's were not revoked.
-- Take it back from all, and from the functions later migrations create.
-- ---------------------------------------------------------------------------
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgsched FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA pgsched REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
