-- pgsched schema, version 7: claims that stay index range scans whatever
-- tasks are queued, retry_workflow that serializes with finishing
-- dependencies, and schedules that cannot be evaluated marked once.

-- ---------------------------------------------------------------------------
-- The claim index, with task. A worker claims only the tasks it can run: with
-- (queue, priority, run_at, id) alone, 300,000 queued jobs of a task it cannot
-- run made every claim a sequential scan and a sort. With task second, each
-- (queue, task) is one ordered slice: the claims read the first rows of the
-- slices of the tasks they run and merge them (a top-N of at most
-- tasks x limit rows), however many jobs of other tasks are queued.
-- ---------------------------------------------------------------------------
CREATE INDEX jobs_claim_task_idx ON pgsched.jobs (queue, task, priority DESC, run_at, id) WHERE state = 'queued';
DROP INDEX pgsched.jobs_claim_idx;
ALTER INDEX pgsched.jobs_claim_task_idx RENAME TO jobs_claim_idx;

-- The first n queued jobs of queue q among the given tasks, in claim order
-- (priority, run_at, id), without locking them: n rows of each task's slice
-- of jobs_claim_idx, merged. Callers lock what they take themselves.
CREATE FUNCTION pgsched.first_queued(q text, tasks text[], n integer)
RETURNS TABLE (id bigint, task text, owner text, concurrency_key text, priority smallint, run_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.id, c.task, c.owner, c.concurrency_key, c.priority, c.run_at
    FROM (SELECT DISTINCT t FROM unnest(tasks) AS t) AS t(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.task, j.owner, j.concurrency_key, j.priority, j.run_at FROM pgsched.jobs j
        WHERE j.state = 'queued' AND j.queue = q AND j.task = t.name
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT n) AS c
    ORDER BY c.priority DESC, c.run_at, c.id
    LIMIT n
$$;
COMMENT ON FUNCTION pgsched.first_queued(text, text[], integer) IS
    'The first n queued jobs of a queue among the given tasks, in claim order (unlocked)';

-- As in version 3, with the candidates of the lookahead and of the
-- ownerless, keyless group read slice by slice (jobs_claim_idx). A group of
-- jobs_group_idx is still read in its own order with the task as a filter.
CREATE OR REPLACE FUNCTION pgsched.pick_jobs(
    q text, tasks text[], room integer, fair boolean, queue_max_per_key integer, lookahead integer
) RETURNS bigint[]
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE grp(o, k) AS (
        (SELECT COALESCE(j.owner, ''), COALESCE(j.concurrency_key, '') FROM pgsched.jobs j
         WHERE j.state = 'queued' AND j.queue = q AND (j.owner IS NOT NULL OR j.concurrency_key IS NOT NULL)
         ORDER BY 1, 2 LIMIT 1)
        UNION ALL
        SELECT n.o, n.k FROM grp g CROSS JOIN LATERAL (
            SELECT COALESCE(j.owner, '') AS o, COALESCE(j.concurrency_key, '') AS k FROM pgsched.jobs j
            WHERE j.state = 'queued' AND j.queue = q AND (j.owner IS NOT NULL OR j.concurrency_key IS NOT NULL)
              AND (COALESCE(j.owner, ''), COALESCE(j.concurrency_key, '')) > (g.o, g.k)
            ORDER BY 1, 2 LIMIT 1) AS n
    ), candidates AS MATERIALIZED (
        SELECT COALESCE(f.owner, '') AS o, COALESCE(f.concurrency_key, '') AS k,
               f.id, f.task, f.priority, f.run_at, f.concurrency_key
        FROM pgsched.first_queued(q, tasks, COALESCE(lookahead, 0)) AS f
        UNION ALL
        SELECT grp.o, grp.k, c.* FROM grp CROSS JOIN LATERAL (
            SELECT j.id, j.task, j.priority, j.run_at, j.concurrency_key FROM pgsched.jobs j
            WHERE j.state = 'queued' AND j.queue = q AND (j.owner IS NOT NULL OR j.concurrency_key IS NOT NULL)
              AND COALESCE(j.owner, '') = grp.o AND COALESCE(j.concurrency_key, '') = grp.k
              AND j.task = ANY (tasks)
            ORDER BY j.priority DESC, j.run_at, j.id
            LIMIT room) AS c
        WHERE lookahead IS NULL
        UNION ALL
        (SELECT '', '', c.id, c.task, c.priority, c.run_at, c.concurrency_key
         FROM (SELECT DISTINCT t FROM unnest(tasks) AS t) AS t(name)
         CROSS JOIN LATERAL (
             SELECT j.id, j.task, j.priority, j.run_at, j.concurrency_key FROM pgsched.jobs j
             WHERE lookahead IS NULL AND j.state = 'queued' AND j.queue = q AND j.task = t.name
               AND j.owner IS NULL AND j.concurrency_key IS NULL
             ORDER BY j.priority DESC, j.run_at, j.id
             LIMIT room) AS c
         ORDER BY c.priority DESC, c.run_at, c.id
         LIMIT room)
    ), ranked AS (
        SELECT c.*,
               CASE WHEN fair THEN row_number() OVER (PARTITION BY c.priority, c.o, c.k ORDER BY c.run_at, c.id)
                    ELSE 0 END AS fair_rank,
               COALESCE((SELECT (t.options ->> 'max_per_key')::integer FROM pgsched.tasks t WHERE t.name = c.task),
                        queue_max_per_key) AS key_cap
        FROM candidates c
    ), running AS (
        SELECT j.concurrency_key, count(*) AS n FROM pgsched.jobs j
        WHERE j.state = 'running' AND j.queue = q AND j.concurrency_key IS NOT NULL
        GROUP BY j.concurrency_key
    ), allowed AS (
        SELECT r.* FROM (
            SELECT r.*, COALESCE(running.n, 0)
                        + row_number() OVER (PARTITION BY r.concurrency_key
                                             ORDER BY r.priority DESC, r.fair_rank, r.run_at, r.id) AS key_load
            FROM ranked r LEFT JOIN running ON running.concurrency_key = r.concurrency_key
        ) AS r
        WHERE r.concurrency_key IS NULL OR r.key_cap IS NULL OR r.key_load <= r.key_cap
        ORDER BY r.priority DESC, r.fair_rank, r.run_at, r.id
        LIMIT room
    )
    SELECT CASE
        WHEN lookahead IS NOT NULL AND (SELECT count(*) FROM allowed) < room
             AND (SELECT count(*) FROM candidates) >= lookahead THEN NULL
        ELSE ARRAY(SELECT id FROM allowed ORDER BY priority DESC, fair_rank, run_at, id)
    END
$$;

-- The number of rows of each queue in queue_starts, kept by claim_controlled
-- (under the queue's lock) as it deletes and adds them: counting the window on
-- every claim cost 7 ms at 100,000 starts per period, inside the lock.
CREATE TABLE pgsched.queue_windows (
    queue  text PRIMARY KEY,
    starts integer NOT NULL
);
COMMENT ON TABLE pgsched.queue_windows IS
    'How many rows each queue has in queue_starts (the rate window), kept by claim_controlled; write neither table by hand';

-- As in version 3, but a queue without fairness or keys takes its jobs from
-- first_queued (slice by slice) instead of filtering the claim order by task,
-- the rate window is counted by queue_windows instead of count(*), and (since
-- migration 6, which dropped the version with a lease parameter) the claim is
-- made only for a live worker incarnation and sets no per-job lease.
CREATE FUNCTION pgsched.claim_controlled(
    queues  text[],
    tasks   text[],
    want    integer,
    worker  uuid
) RETURNS TABLE (job pgsched.jobs, next_claim_in double precision)
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    q text;
    settings pgsched.queues;
    started timestamptz;
    room integer;
    window_count integer;
    window_oldest timestamptz;
    picked bigint[];
    claimed integer;
    expired integer;
    keyed boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgsched.workers w WHERE w.id = worker AND w.lease_expires_at > pgsched.now()) THEN
        RETURN;
    END IF;
    FOREACH q IN ARRAY queues LOOP
        EXIT WHEN want <= 0;
        PERFORM pg_catalog.pg_advisory_xact_lock(1885827939, pg_catalog.hashtext(q));  -- "pgsc", queue
        SELECT * INTO settings FROM pgsched.queues s WHERE s.name = q;
        CONTINUE WHEN settings.paused IS TRUE;
        started := pg_catalog.clock_timestamp() + (pgsched.now() - pg_catalog.now());
        room := want;
        IF settings.max_running IS NOT NULL THEN
            room := LEAST(room, settings.max_running
                                - (SELECT count(*) FROM pgsched.jobs j WHERE j.state = 'running' AND j.queue = q));
        END IF;
        IF settings.rate_limit IS NOT NULL THEN
            DELETE FROM pgsched.queue_starts w WHERE w.queue = q AND w.started_at <= started - settings.rate_period;
            GET DIAGNOSTICS expired = ROW_COUNT;
            UPDATE pgsched.queue_windows c SET starts = c.starts - expired WHERE c.queue = q
            RETURNING c.starts INTO window_count;
            IF NOT FOUND THEN  -- the queue's first rate-limited claim since this migration: count once
                INSERT INTO pgsched.queue_windows (queue, starts)
                SELECT q, count(*) FROM pgsched.queue_starts w WHERE w.queue = q
                RETURNING starts INTO window_count;
            END IF;
            -- The oldest start: the first entry of queue_starts_queue_idx.
            SELECT min(w.started_at) INTO window_oldest FROM pgsched.queue_starts w WHERE w.queue = q;
            room := LEAST(room, settings.rate_limit - window_count);
        END IF;
        IF room > 0 THEN
            keyed := settings.max_per_key IS NOT NULL OR EXISTS (
                SELECT 1 FROM pgsched.tasks t WHERE t.name = ANY (tasks) AND t.options ? 'max_per_key');
            IF settings.fair IS TRUE THEN
                picked := pgsched.pick_jobs(q, tasks, room, true, settings.max_per_key, NULL);
            ELSIF keyed THEN
                picked := COALESCE(pgsched.pick_jobs(q, tasks, room, false, settings.max_per_key, 4 * room),
                                   pgsched.pick_jobs(q, tasks, room, false, settings.max_per_key, NULL));
            ELSE
                picked := ARRAY(SELECT f.id FROM pgsched.first_queued(q, tasks, room) AS f);
            END IF;
            -- The claimed attempts start now, after the count: a job whose outcome committed
            -- between the first reading of the clock and the count (freeing the slot taken
            -- here) finished before this instant, so the history never shows the cap exceeded.
            started := pg_catalog.clock_timestamp() + (pgsched.now() - pg_catalog.now());
            RETURN QUERY
            WITH locked AS MATERIALIZED (
                SELECT j.id FROM pgsched.jobs j
                WHERE j.id = ANY (picked) AND j.state = 'queued'
                FOR UPDATE SKIP LOCKED
            ), claimed_rows AS (
                UPDATE pgsched.jobs j
                SET state = 'running', attempts = j.attempts + 1, worker_id = worker, started_at = started
                FROM locked
                WHERE j.id = locked.id
                RETURNING j
            )
            SELECT c.j, NULL::double precision FROM claimed_rows c;
            GET DIAGNOSTICS claimed = ROW_COUNT;
            want := want - claimed;
            IF settings.rate_limit IS NOT NULL AND claimed > 0 THEN
                INSERT INTO pgsched.queue_starts (queue, started_at)
                SELECT q, started FROM generate_series(1, claimed);
                UPDATE pgsched.queue_windows c SET starts = c.starts + claimed WHERE c.queue = q;
                window_oldest := COALESCE(window_oldest, started);
                window_count := window_count + claimed;
            END IF;
        END IF;
        IF settings.rate_limit IS NOT NULL AND window_count >= settings.rate_limit THEN
            job := NULL;
            next_claim_in := extract(epoch FROM window_oldest + settings.rate_period - started);
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------
-- retry_workflow, locking as the release trigger does. It decided from its
-- snapshot alone: a dependency finishing at the same time released nobody
-- (the retried job was not waiting yet in the finisher's snapshot) while the
-- retry saw the dependency unfinished, so the job waited forever. Now the
-- dependencies of the jobs to retry are locked first (FOR SHARE, in id order:
-- a finish in progress is waited for, and a finish that comes later waits for
-- this transaction and then sees the job waiting), and the states are decided
-- by the next statement, whose snapshot includes every finish it waited for.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgsched.retry_workflow(workflow uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    retried integer;
    woken text[];
BEGIN
    PERFORM 1 FROM pgsched.jobs d
    WHERE d.id IN (SELECT e.depends_on FROM pgsched.job_deps e JOIN pgsched.jobs j ON j.id = e.job_id
                   WHERE j.workflow_id = workflow AND j.state IN ('failed', 'cancelled'))
    ORDER BY d.id FOR SHARE;

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

-- ---------------------------------------------------------------------------
-- Schedules that cannot be evaluated (a cron expression or time zone written
-- by plain SQL that pgsched cannot read, or a zone removed from the system's
-- time zone database) are marked once with the reason, and the materializer
-- passes over them from then on; writing the schedule again clears the mark.
-- ---------------------------------------------------------------------------
ALTER TABLE pgsched.schedules ADD COLUMN invalid_reason text;
COMMENT ON COLUMN pgsched.schedules.invalid_reason IS
    'Why the materializer cannot evaluate this schedule (NULL: it can); set once, cleared when the schedule is written again';
DROP INDEX pgsched.schedules_due_idx;
CREATE INDEX schedules_due_idx ON pgsched.schedules (next_run_at) WHERE enabled AND NOT paused AND invalid_reason IS NULL;

COMMENT ON COLUMN pgsched.tasks.options IS
    'Default job options (priority, max_attempts, timeout, encrypt: from the app that last registered the task) '
    'and execution options (max_per_key, backoff: only from an app that runs the task, i.e. a worker)';

GRANT SELECT, INSERT, UPDATE ON pgsched.queue_windows TO pgsched_worker;
GRANT ALL ON pgsched.queue_windows TO pgsched_admin;
REVOKE EXECUTE ON FUNCTION pgsched.first_queued(text, text[], integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsched.first_queued(text, text[], integer) TO pgsched_worker, pgsched_admin;
COMMENT ON FUNCTION pgsched.claim_controlled(text[], text[], integer, uuid) IS
    'Claims jobs of paused, capped, rate-limited, keyed or fair queues, holding every limit across all workers';
REVOKE EXECUTE ON FUNCTION pgsched.claim_controlled(text[], text[], integer, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsched.claim_controlled(text[], text[], integer, uuid) TO pgsched_worker, pgsched_admin;
