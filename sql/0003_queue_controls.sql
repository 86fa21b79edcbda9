-- pgsched schema, version 3: queue controls.
--
-- Pause, a global cap on running jobs, a rate limit of starts, per-key caps
-- and fair sharing, all read from pgsched.queues (and a task's max_per_key
-- from the catalog) by one claim function. A queue with none of them set is
-- claimed by the worker's plain claim statement, whose plan does not change.

-- Every change of a queue's settings is announced, so workers re-read them at
-- once (pause within a second, resume at once); the claim predicates are the
-- guarantee, the notice only the shortcut.
CREATE FUNCTION pgsched.notify_queue_settings() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('pgsched_queue_settings', COALESCE(NEW.name, OLD.name));
    RETURN NULL;
END
$$;
CREATE TRIGGER queues_notify_settings AFTER INSERT OR UPDATE OR DELETE ON pgsched.queues
    FOR EACH ROW EXECUTE FUNCTION pgsched.notify_queue_settings();

-- True when claims of the queue must go through pgsched.claim_controlled.
CREATE FUNCTION pgsched.queue_is_controlled(q pgsched.queues) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT q.paused OR q.fair OR q.max_running IS NOT NULL OR q.rate_limit IS NOT NULL OR q.max_per_key IS NOT NULL
$$;

-- The starts of the last rate_period of each rate-limited queue (a sliding
-- window log): a start is allowed while fewer than rate_limit rows are newer
-- than now - rate_period. The claim function deletes what slid out.
CREATE TABLE pgsched.queue_starts (
    queue      text NOT NULL,
    started_at timestamptz NOT NULL
);
CREATE INDEX queue_starts_queue_idx ON pgsched.queue_starts (queue, started_at);
COMMENT ON TABLE pgsched.queue_starts IS
    'Job starts of rate-limited queues within their rate_period (the sliding window the rate limit counts)';

-- Groups of queued jobs for fair sharing and per-key caps: one group per
-- (owner, concurrency_key). Only rows that have an owner or a key are in it,
-- so plain enqueues (neither) pay nothing for it; ownerless, keyless jobs
-- form one more group, read from jobs_claim_idx.
CREATE INDEX jobs_group_idx ON pgsched.jobs
    (queue, COALESCE(owner, ''), COALESCE(concurrency_key, ''), priority DESC, run_at, id)
    WHERE state = 'queued' AND (owner IS NOT NULL OR concurrency_key IS NOT NULL);

-- Claim up to want jobs from controlled queues, in the order given.
--
-- Claims of one controlled queue take turns (a transaction-scoped advisory
-- lock per queue), and everything after the lock runs with a fresh snapshot
-- (read committed, a volatile function): the running count and the window
-- of starts include every claim committed before this one, so caps hold
-- across all workers. Order within a queue: priority first; then, when the
-- queue is fair, the job's rank within its (owner, concurrency_key) group at
-- that priority (every group's first job before any group's second); then
-- run_at and id. A job whose key already has max_per_key running jobs (the
-- task's max_per_key, else the queue's) is passed over, so other keys run.
--
-- Returns the claimed rows and, when a queue's rate window is full, one row
-- without a job whose next_claim_in says in how many seconds the next start
-- is allowed (the worker waits that long instead of polling).
-- Recorded starts use clock_timestamp() after the lock, not the
-- transaction's start, so a start is never recorded before the finish of a
-- job whose slot it took.
CREATE FUNCTION pgsched.claim_controlled(
    queues  text[],
    tasks   text[],
    want    integer,
    worker  uuid,
    lease   double precision
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
    keyed boolean;
BEGIN
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
            SELECT count(*), min(w.started_at) INTO window_count, window_oldest
            FROM pgsched.queue_starts w WHERE w.queue = q;
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
                picked := ARRAY(
                    SELECT j.id FROM pgsched.jobs j
                    WHERE j.state = 'queued' AND j.queue = q AND j.task = ANY (tasks)
                    ORDER BY j.priority DESC, j.run_at, j.id
                    LIMIT room);
            END IF;
            RETURN QUERY
            WITH locked AS MATERIALIZED (
                SELECT j.id FROM pgsched.jobs j
                WHERE j.id = ANY (picked) AND j.state = 'queued'
                FOR UPDATE SKIP LOCKED
            ), claimed_rows AS (
                UPDATE pgsched.jobs j
                SET state = 'running', attempts = j.attempts + 1, worker_id = worker, started_at = started,
                    lease_expires_at = started + make_interval(secs => lease)
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
COMMENT ON FUNCTION pgsched.claim_controlled(text[], text[], integer, uuid, double precision) IS
    'Claims jobs of paused, capped, rate-limited, keyed or fair queues, holding every limit across all workers';

-- The ids of up to room queued jobs of queue q, in claim order (see
-- claim_controlled), passing over jobs whose key is at its cap (its running
-- jobs plus those picked before it). Two ways to find the candidates:
--
-- * lookahead given (a queue that is not fair): the first lookahead jobs of
--   the claim index. While caps rarely bind that is all it takes, at the cost
--   of the plain claim. If fewer than room of them may run and there are
--   more behind them, the answer is NULL: ask again without lookahead.
-- * lookahead NULL: group by group. The groups, one per (owner,
--   concurrency_key), are found by a loose scan of jobs_group_idx (one probe
--   per group), and each gives at most room of its first jobs; so the cost
--   grows with the number of groups that have queued jobs, not with the
--   backlog (a key with 10,000 queued jobs at its cap costs one probe).
CREATE FUNCTION pgsched.pick_jobs(
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
        (SELECT COALESCE(j.owner, '') AS o, COALESCE(j.concurrency_key, '') AS k,
                j.id, j.task, j.priority, j.run_at, j.concurrency_key
         FROM pgsched.jobs j
         WHERE lookahead IS NOT NULL AND j.state = 'queued' AND j.queue = q AND j.task = ANY (tasks)
         ORDER BY j.priority DESC, j.run_at, j.id
         LIMIT lookahead)
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
        (SELECT '', '', j.id, j.task, j.priority, j.run_at, j.concurrency_key FROM pgsched.jobs j
         WHERE lookahead IS NULL AND j.state = 'queued' AND j.queue = q
           AND j.owner IS NULL AND j.concurrency_key IS NULL AND j.task = ANY (tasks)
         ORDER BY j.priority DESC, j.run_at, j.id
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

GRANT SELECT, INSERT, DELETE ON pgsched.queue_starts TO pgsched_worker;
GRANT ALL ON pgsched.queue_starts TO pgsched_admin;
GRANT EXECUTE ON FUNCTION pgsched.claim_controlled(text[], text[], integer, uuid, double precision),
                          pgsched.pick_jobs(text, text[], integer, boolean, integer, integer),
                          pgsched.queue_is_controlled(pgsched.queues)
    TO pgsched_worker, pgsched_admin;
