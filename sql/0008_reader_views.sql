-- pgsched schema, version 8: what monitoring reads (issue 20, "What people read").
--
-- * queue_stats.oldest_queued_age_seconds is NULL for a queue with nothing queued: 0 said
--   "a job waits, for no time at all", which an alert on age or a chart cannot tell from a
--   healthy queue.
-- * pgsched_reader reads the history of attempts through pgsched.run_history, so Grafana can
--   chart latency and throughput without seeing what jobs carry.

CREATE OR REPLACE VIEW pgsched.queue_stats AS
WITH live AS (
    SELECT queue, state, count(*) AS n, min(run_at) AS oldest_run_at
    FROM pgsched.jobs
    WHERE state IN ('waiting', 'scheduled', 'queued', 'running')
    GROUP BY queue, state
), recent AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           count(*) FILTER (WHERE state = 'succeeded') AS succeeded
    FROM pgsched.jobs
    WHERE finished_at > pgsched.now() - interval '1 hour'
    GROUP BY queue
), unroutable AS (
    -- Queued jobs whose task no live worker serving their queue can run.
    SELECT q.queue, sum(q.n) AS n
    FROM (SELECT queue, task, count(*) AS n FROM pgsched.jobs WHERE state = 'queued' GROUP BY queue, task) AS q
    WHERE NOT EXISTS (SELECT 1 FROM pgsched.workers w
                      WHERE w.lease_expires_at > pgsched.now() AND q.queue = ANY (w.queues) AND q.task = ANY (w.tasks))
    GROUP BY q.queue
), names AS (
    SELECT name AS queue FROM pgsched.queues
    UNION SELECT queue FROM live
    UNION SELECT queue FROM recent
)
SELECT names.queue,
       COALESCE(settings.paused, false) AS paused,
       COALESCE((SELECT n FROM live WHERE live.queue = names.queue AND state = 'waiting'), 0) AS waiting,
       COALESCE((SELECT n FROM live WHERE live.queue = names.queue AND state = 'scheduled'), 0) AS scheduled,
       COALESCE((SELECT n FROM live WHERE live.queue = names.queue AND state = 'queued'), 0) AS queued,
       COALESCE((SELECT n FROM live WHERE live.queue = names.queue AND state = 'running'), 0) AS running,
       COALESCE((SELECT n FROM unroutable WHERE unroutable.queue = names.queue), 0)::bigint AS unroutable,
       (SELECT oldest_run_at FROM live WHERE live.queue = names.queue AND state = 'queued') AS oldest_queued_at,
       -- NULL when nothing is queued (no job has waited at all), never 0.
       extract(epoch FROM pgsched.now()
                      - (SELECT oldest_run_at FROM live WHERE live.queue = names.queue AND state = 'queued'))
           ::double precision AS oldest_queued_age_seconds,
       COALESCE((SELECT failed FROM recent WHERE recent.queue = names.queue), 0) AS failed_last_hour,
       COALESCE((SELECT succeeded FROM recent WHERE recent.queue = names.queue), 0) AS succeeded_last_hour
FROM names
LEFT JOIN pgsched.queues settings ON settings.name = names.queue;
COMMENT ON COLUMN pgsched.queue_stats.oldest_queued_age_seconds IS
    'Seconds the oldest queued job has been due; NULL when nothing is queued';

-- The runs history without payloads: what an attempt was (job, attempt, task, queue, worker),
-- how it ended and when. Left out: error (a traceback quotes the job's arguments and the
-- task's data) and owner (which tenants exist is not the monitoring's business). A plain view
-- (owned by the migrating role, not security_invoker): readers get these columns of runs and
-- nothing else. Selecting by started_at prunes the daily partitions; by job_id uses runs_job_idx.
CREATE VIEW pgsched.run_history AS
SELECT id, job_id, attempt, queue, task, worker_id, outcome, started_at, finished_at, duration_ms
FROM pgsched.runs;
COMMENT ON VIEW pgsched.run_history IS
    'One row per attempt (pgsched.runs) without its error or owner: for monitoring (pgsched_reader)';

GRANT SELECT ON pgsched.run_history TO pgsched_reader, pgsched_worker, pgsched_admin;
