-- pgsched schema, version 2: the scheduler's SQL.
--
-- Dependency release in the transaction that finishes the last dependency,
-- cycle refusal that holds under concurrent writers, and the idempotent
-- statements of the maintenance services (promote, rescue, prune), each
-- fenced on the state it expects.

-- One NOTIFY per queue on pgsched_wakeup, skipped while the notification
-- queue is more than half full (polling is the guarantee).
CREATE FUNCTION pgsched.wake(queues text[]) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_catalog.pg_notify('pgsched_wakeup', q)
    FROM unnest(queues) AS q
    WHERE pg_catalog.pg_notification_queue_usage() <= 0.5
$$;

-- ---------------------------------------------------------------------------
-- Dependencies
-- ---------------------------------------------------------------------------
ALTER TABLE pgsched.jobs ADD COLUMN has_dependents boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN pgsched.jobs.has_dependents IS
    'Some job depends on this one: finishing it runs the release trigger (jobs without dependents skip it)';

-- Adding an edge: the dependency is marked has_dependents, and an edge that
-- would close a cycle is refused. A transaction-scoped advisory lock orders
-- concurrent writers of the graph, and the check runs after it with a fresh
-- snapshot, so of two transactions racing to close a cycle the second sees
-- the first's edge and fails. Only an edge whose dependent already has
-- dependents of its own can close a cycle; others skip the walk.
CREATE FUNCTION pgsched.check_new_dependency() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(7451983510446851072);  -- "graph" lock
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
CREATE TRIGGER job_deps_check BEFORE INSERT ON pgsched.job_deps
    FOR EACH ROW EXECUTE FUNCTION pgsched.check_new_dependency();

-- A dependency finished: its waiting dependents become queued (or
-- scheduled, for a future run_at) once every dependency succeeded, in this
-- same transaction; when it failed or was cancelled they are cancelled with
-- reason upstream (which cascades through this trigger), unless they were
-- enqueued with run_on_upstream_failure, for which any finish counts.
-- The dependents are locked first, in id order, and decided by a second
-- statement with a fresh snapshot: of two dependencies finishing at once,
-- the later transaction sees the earlier one's result.
CREATE FUNCTION pgsched.release_dependents() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    woken text[];
BEGIN
    PERFORM 1 FROM pgsched.jobs w
    WHERE w.id IN (SELECT e.job_id FROM pgsched.job_deps e WHERE e.depends_on = NEW.id) AND w.state = 'waiting'
    ORDER BY w.id FOR NO KEY UPDATE;

    WITH waiting AS (
        SELECT w.id, w.run_on_upstream_failure,
               bool_and(d.state = 'succeeded') AS all_succeeded,
               bool_and(d.state IN ('succeeded', 'failed', 'cancelled')) AS all_finished,
               bool_or(d.state IN ('failed', 'cancelled')) AS some_failed
        FROM pgsched.jobs w
        JOIN pgsched.job_deps e ON e.job_id = w.id
        JOIN pgsched.jobs d ON d.id = e.depends_on
        WHERE w.state = 'waiting'
          AND w.id IN (SELECT e2.job_id FROM pgsched.job_deps e2 WHERE e2.depends_on = NEW.id)
        GROUP BY w.id, w.run_on_upstream_failure
    ), decided AS (
        SELECT id,
               CASE WHEN some_failed AND NOT run_on_upstream_failure THEN 'cancelled'
                    WHEN all_succeeded OR (run_on_upstream_failure AND all_finished) THEN 'ready'
               END AS verdict
        FROM waiting
    ), moved AS (
        UPDATE pgsched.jobs j
        SET state = CASE WHEN d.verdict = 'cancelled' THEN 'cancelled'
                         WHEN j.run_at > pgsched.now() THEN 'scheduled'
                         ELSE 'queued' END,
            error = CASE WHEN d.verdict = 'cancelled'
                         THEN format('upstream: dependency %s %s', NEW.id, NEW.state) ELSE j.error END,
            finished_at = CASE WHEN d.verdict = 'cancelled' THEN pgsched.now() END
        FROM decided d
        WHERE j.id = d.id AND d.verdict IS NOT NULL AND j.state = 'waiting'
        RETURNING j.queue, j.state
    )
    SELECT array_agg(DISTINCT queue) FILTER (WHERE state = 'queued') INTO woken FROM moved;
    PERFORM pgsched.wake(woken);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_release_dependents AFTER UPDATE OF state ON pgsched.jobs
    FOR EACH ROW
    WHEN (NEW.has_dependents AND NEW.state IN ('succeeded', 'failed', 'cancelled') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION pgsched.release_dependents();

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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsched AS $$
#variable_conflict use_column
DECLARE
    defaults pgsched.tasks;
    deps bigint[] := ARRAY(SELECT DISTINCT d FROM unnest(COALESCE(depends_on, '{}')) AS d);
    dep_states text[];
    initial_state text := 'queued';
    initial_error text;
    existing_id bigint;
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
    SELECT * INTO defaults FROM pgsched.tasks t WHERE t.name = enqueue.task;

    IF cardinality(deps) > 0 THEN
        -- The lock serializes with a concurrent completion of a dependency:
        -- either we see its final state, or its release trigger sees this job.
        -- (NO KEY UPDATE, not SHARE: the job_deps trigger then marks the
        -- dependency has_dependents, which two SHARE holders would deadlock on.)
        SELECT array_agg(j.state) INTO dep_states
        FROM (SELECT s.state FROM pgsched.jobs s WHERE s.id = ANY (deps) ORDER BY s.id FOR NO KEY UPDATE) AS j;
        IF COALESCE(cardinality(dep_states), 0) < cardinality(deps) THEN
            RAISE EXCEPTION 'depends_on names a job that does not exist'
                USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'job_deps_depends_on_fkey',
                      DETAIL = format('missing: %s', ARRAY(SELECT d FROM unnest(deps) AS d
                                                           WHERE NOT EXISTS (SELECT 1 FROM pgsched.jobs s WHERE s.id = d)));
        END IF;
        IF NOT run_on_upstream_failure AND dep_states && ARRAY['failed', 'cancelled'] THEN
            initial_state := 'cancelled';
            initial_error := 'upstream: a dependency failed or was cancelled';
        ELSIF EXISTS (SELECT 1 FROM unnest(dep_states) AS s
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
            COALESCE(priority, (defaults.options ->> 'priority')::integer, 0),
            initial_state,
            COALESCE(run_at, pgsched.now() + delay, pgsched.now()),
            COALESCE(max_attempts, (defaults.options ->> 'max_attempts')::integer, 5),
            COALESCE(timeout_seconds, (defaults.options ->> 'timeout')::double precision),
            dedupe_key, owner, workflow_id, concurrency_key, run_on_upstream_failure,
            initial_error, CASE WHEN initial_state = 'cancelled' THEN pgsched.now() END,
            session_user)
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND state IN ('waiting', 'scheduled', 'queued', 'running')
    DO NOTHING
    RETURNING j.* INTO job;

    IF job.id IS NULL THEN
        SELECT s.id INTO existing_id FROM pgsched.jobs s
        WHERE s.dedupe_key = enqueue.dedupe_key AND s.state IN ('waiting', 'scheduled', 'queued', 'running');
        RAISE EXCEPTION 'a live job with dedupe_key "%" already exists', dedupe_key
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'jobs_dedupe_key_live',
                  DETAIL = format('existing_id=%s', existing_id);
    END IF;

    IF cardinality(deps) > 0 THEN
        INSERT INTO pgsched.job_deps (job_id, depends_on) SELECT job.id, d FROM unnest(deps) AS d;
    END IF;
    RETURN job;
END
$$;

-- ---------------------------------------------------------------------------
-- Maintenance statements. Each is one idempotent statement over at most
-- `batch` rows that skips locked rows, so any number of schedulers may run
-- them at once: two leaders waste work, never duplicate it.
-- ---------------------------------------------------------------------------

-- scheduled -> queued once run_at has passed (jobs_scheduled_idx); one
-- NOTIFY per queue. Returns how many were promoted.
CREATE FUNCTION pgsched.promote(batch integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    promoted integer;
    woken text[];
BEGIN
    WITH due AS (
        SELECT id FROM pgsched.jobs
        WHERE state = 'scheduled' AND run_at <= pgsched.now()
        ORDER BY run_at
        LIMIT batch
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE pgsched.jobs j SET state = 'queued'
        FROM due WHERE j.id = due.id AND j.state = 'scheduled'
        RETURNING j.queue
    )
    SELECT count(*), array_agg(DISTINCT queue) INTO promoted, woken FROM moved;
    PERFORM pgsched.wake(woken);
    RETURN promoted;
END
$$;
COMMENT ON FUNCTION pgsched.promote(integer) IS 'Moves up to batch due scheduled jobs to queued; returns how many';

-- running -> queued (or failed when no attempt is left, or cancelled when a
-- cancel was requested) for jobs whose lease expired (jobs_running_idx), with
-- a runs row per rescued attempt (outcome lease_expired). Fenced on state and
-- lease in the UPDATE itself, so a job that completed meanwhile is untouched.
-- Every row the page selects is rescuable, so a page never hides others.
CREATE FUNCTION pgsched.rescue(batch integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    rescued integer;
    woken text[];
BEGIN
    WITH expired AS (
        SELECT id, worker_id, attempts, started_at FROM pgsched.jobs
        WHERE state = 'running' AND lease_expires_at < pgsched.now()
        ORDER BY lease_expires_at
        LIMIT batch
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE pgsched.jobs j
        SET state = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                         WHEN j.attempts >= j.max_attempts THEN 'failed'
                         ELSE 'queued' END,
            error = CASE WHEN j.cancel_requested_at IS NOT NULL THEN j.error
                         ELSE 'lease expired: the worker stopped heartbeating (crashed or stalled)' END,
            finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL OR j.attempts >= j.max_attempts
                               THEN pgsched.now() END,
            worker_id = NULL, lease_expires_at = NULL
        FROM expired e
        WHERE j.id = e.id AND j.state = 'running' AND j.lease_expires_at < pgsched.now()
        RETURNING j.id, j.queue, j.task, j.owner, j.state, e.worker_id, e.attempts, e.started_at
    ), history AS (
        INSERT INTO pgsched.runs (job_id, attempt, queue, task, owner, worker_id, outcome, error, started_at, finished_at)
        SELECT id, attempts, queue, task, owner, worker_id, 'lease_expired',
               'lease expired: the worker stopped heartbeating (crashed or stalled)',
               COALESCE(started_at, pgsched.now()), pgsched.now()
        FROM moved
    )
    SELECT count(*), array_agg(DISTINCT queue) FILTER (WHERE state = 'queued') INTO rescued, woken FROM moved;
    PERFORM pgsched.wake(woken);
    RETURN rescued;
END
$$;
COMMENT ON FUNCTION pgsched.rescue(integer) IS
    'Re-queues (or fails) up to batch running jobs whose lease expired, recording lease_expired runs; returns how many';

-- Finished jobs past their queue's retention (pgsched.queues, default 7 days
-- for succeeded, 30 for failed and cancelled), at most batch per call
-- (jobs_finished_idx). Their job_deps edges go with them (ON DELETE CASCADE).
DROP INDEX pgsched.jobs_finished_idx;
CREATE INDEX jobs_finished_idx ON pgsched.jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE FUNCTION pgsched.prune_jobs(batch integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    -- The shortest retention of any queue bounds the index range to read.
    shortest interval := (SELECT least(interval '7 days', min(retention_succeeded), min(retention_failed))
                          FROM pgsched.queues);
    pruned integer;
BEGIN
    WITH doomed AS (
        SELECT j.id FROM pgsched.jobs j
        LEFT JOIN pgsched.queues q ON q.name = j.queue
        WHERE j.finished_at < pgsched.now() - shortest
          AND j.state IN ('succeeded', 'failed', 'cancelled')
          AND j.finished_at < pgsched.now() - CASE WHEN j.state = 'succeeded'
                                                   THEN COALESCE(q.retention_succeeded, interval '7 days')
                                                   ELSE COALESCE(q.retention_failed, interval '30 days') END
        ORDER BY j.finished_at
        LIMIT batch
        FOR UPDATE OF j SKIP LOCKED
    ), deleted AS (
        DELETE FROM pgsched.jobs j USING doomed WHERE j.id = doomed.id RETURNING 1
    )
    SELECT count(*) INTO pruned FROM deleted;
    RETURN pruned;
END
$$;
COMMENT ON FUNCTION pgsched.prune_jobs(integer) IS 'Deletes up to batch finished jobs past their retention; returns how many';

-- History partitions older than the longest retention of any queue are
-- dropped whole (a partition mixes queues); rows that fell into the default
-- partition are deleted in batches. SECURITY DEFINER: only the owner may
-- drop partitions.
CREATE FUNCTION pgsched.prune_history(batch integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsched AS $$
DECLARE
    keep interval := (SELECT greatest(interval '30 days', max(greatest(retention_succeeded, retention_failed)))
                      FROM pgsched.queues);
    horizon date := ((pgsched.now() - COALESCE(keep, interval '30 days')) AT TIME ZONE 'UTC')::date;
    part record;
    dropped integer := 0;
    n integer;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent IN ('pgsched.runs'::regclass, 'pgsched.run_logs'::regclass)
          AND c.relname ~ '_[0-9]{8}$'
          AND to_date(right(c.relname, 8), 'YYYYMMDD') < horizon
    LOOP
        EXECUTE format('DROP TABLE pgsched.%I', part.relname);
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
COMMENT ON FUNCTION pgsched.prune_history(integer) IS
    'Drops runs/run_logs partitions older than the longest retention; returns partitions dropped plus default rows deleted';

-- Workers whose heartbeat stopped more than ten minutes ago.
CREATE FUNCTION pgsched.prune_workers() RETURNS integer
LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM pgsched.workers WHERE expires_at < pgsched.now() - interval '10 minutes' RETURNING 1)
    SELECT count(*)::integer FROM gone
$$;

REVOKE EXECUTE ON FUNCTION pgsched.wake(text[]), pgsched.promote(integer), pgsched.rescue(integer), pgsched.prune_jobs(integer),
    pgsched.prune_history(integer), pgsched.prune_workers(), pgsched.check_new_dependency(),
    pgsched.release_dependents() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsched.wake(text[]), pgsched.promote(integer), pgsched.rescue(integer),
    pgsched.prune_jobs(integer), pgsched.prune_history(integer), pgsched.prune_workers()
    TO pgsched_worker, pgsched_admin;

-- ---------------------------------------------------------------------------
-- Workflows: act on every unfinished job of one workflow_id.
-- ---------------------------------------------------------------------------

-- Cancels the workflow's unfinished jobs (a running one is asked to stop, as
-- with pgsched.cancel); returns how many it cancelled or marked.
CREATE FUNCTION pgsched.cancel_workflow(workflow uuid, reason text DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    job_id bigint;
    touched integer := 0;
BEGIN
    FOR job_id IN
        SELECT id FROM pgsched.jobs
        WHERE workflow_id = workflow AND state IN ('waiting', 'scheduled', 'queued', 'running')
        ORDER BY id
    LOOP
        -- An earlier cancel may have cascaded to this one already; cancel() then returns it as is.
        PERFORM pgsched.cancel(job_id, COALESCE(reason, 'workflow cancelled'));
        touched := touched + 1;
    END LOOP;
    RETURN touched;
END
$$;
COMMENT ON FUNCTION pgsched.cancel_workflow(uuid, text) IS 'Cancels every unfinished job of a workflow';

-- Runs the workflow's failed and cancelled jobs again: those whose
-- dependencies all succeeded are queued now, the others wait for them again.
CREATE FUNCTION pgsched.retry_workflow(workflow uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    retried integer;
    woken text[];
BEGIN
    WITH again AS (
        UPDATE pgsched.jobs j
        SET state = CASE WHEN EXISTS (
                             SELECT 1 FROM pgsched.job_deps e JOIN pgsched.jobs d ON d.id = e.depends_on
                             WHERE e.job_id = j.id AND d.state <> 'succeeded')
                         THEN 'waiting' ELSE 'queued' END,
            run_at = pgsched.now(), max_attempts = greatest(j.max_attempts, j.attempts + 1),
            finished_at = NULL, cancel_requested_at = NULL
        WHERE j.workflow_id = workflow AND j.state IN ('failed', 'cancelled')
        RETURNING j.queue, j.state
    )
    SELECT count(*), array_agg(DISTINCT queue) FILTER (WHERE state = 'queued') INTO retried, woken FROM again;
    PERFORM pgsched.wake(woken);
    RETURN retried;
END
$$;
COMMENT ON FUNCTION pgsched.retry_workflow(uuid) IS 'Runs the failed and cancelled jobs of a workflow again';

REVOKE EXECUTE ON FUNCTION pgsched.cancel_workflow(uuid, text), pgsched.retry_workflow(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsched.cancel_workflow(uuid, text), pgsched.retry_workflow(uuid) TO pgsched_worker, pgsched_admin;

-- Schedules of command jobs (shell, http) may only be written by roles that may create such jobs:
-- otherwise a schedule would be a way around the jobs table's guard.
CREATE TRIGGER schedules_guard_commands BEFORE INSERT OR UPDATE OF task ON pgsched.schedules
    FOR EACH ROW WHEN (NEW.task IN ('shell', 'http'))
    EXECUTE FUNCTION pgsched.guard_command_jobs();
