-- One lease per worker incarnation instead of one per job (DESIGN §8
-- "Liveness", revised after the engine review).
--
-- Before: every heartbeat UPDATEd jobs.lease_expires_at of every job the
-- worker held. That rewrote the hottest rows every few seconds, deadlocked
-- with batched completion (rows locked in another order), and waited on any
-- row lock an application transaction held on one of them, so a single slow
-- transaction delayed the renewal of all leases and healthy jobs were
-- rescued and run twice.
--
-- Now: a worker incarnation (a fresh id each time a worker starts or loses
-- its lease) renews workers.lease_expires_at, one row. Jobs carry worker_id
-- and attempts; the rescuer moves the running jobs of incarnations whose
-- lease expired. An incarnation whose lease expired is never renewed: the
-- rescuer marks it lost under its row lock, so a heartbeat racing the rescue
-- either renews first (and the rescue skips it) or finds it lost.
--
-- Upgrade note: workers of an earlier version renew jobs.lease_expires_at,
-- which this migration drops: stop them before migrating.

ALTER TABLE pgsched.workers RENAME COLUMN expires_at TO lease_expires_at;
COMMENT ON TABLE pgsched.workers IS 'One row per worker incarnation; its single lease covers every job it holds';
COMMENT ON COLUMN pgsched.workers.id IS
    'Worker incarnation: chosen at start, and anew each time the worker loses its lease';
COMMENT ON COLUMN pgsched.workers.lease_expires_at IS
    'The incarnation holds its jobs until then unless it heartbeats; -infinity once the rescuer took them back';

-- Running jobs of workers of the previous version keep their lease: their
-- incarnation's lease ends when the last of their job leases would have.
INSERT INTO pgsched.workers (id, host, pid, queues, concurrency, lease_expires_at)
SELECT j.worker_id, 'unknown (before migration 6)', 0, '{}', 1, max(j.lease_expires_at)
FROM pgsched.jobs j
WHERE j.state = 'running' AND NOT EXISTS (SELECT 1 FROM pgsched.workers w WHERE w.id = j.worker_id)
GROUP BY j.worker_id;
UPDATE pgsched.workers w
SET lease_expires_at = greatest(w.lease_expires_at, l.until)
FROM (SELECT worker_id, max(lease_expires_at) AS until FROM pgsched.jobs WHERE state = 'running' GROUP BY worker_id) AS l
WHERE w.id = l.worker_id;

ALTER TABLE pgsched.jobs DROP CONSTRAINT jobs_running_has_lease;
ALTER TABLE pgsched.jobs DROP COLUMN lease_expires_at;
ALTER TABLE pgsched.jobs ADD CONSTRAINT jobs_running_has_worker CHECK (state <> 'running' OR worker_id IS NOT NULL);
COMMENT ON COLUMN pgsched.jobs.worker_id IS 'While running: the worker incarnation holding it (see pgsched.workers)';

DROP VIEW pgsched.worker_status;
CREATE VIEW pgsched.worker_status AS
SELECT w.id, w.host, w.pid, w.queues, w.tasks, w.concurrency, w.with_scheduler, w.version,
       w.started_at, w.heartbeat_at, w.lease_expires_at,
       w.lease_expires_at > pgsched.now() AS alive,
       (SELECT count(*) FROM pgsched.jobs j WHERE j.state = 'running' AND j.worker_id = w.id) AS running
FROM pgsched.workers w;
COMMENT ON VIEW pgsched.worker_status IS
    'Worker incarnations with liveness (alive: lease not expired) and their running job count';
GRANT SELECT ON pgsched.worker_status TO pgsched_reader, pgsched_worker, pgsched_admin;

-- Running jobs of incarnations whose lease expired go back to the queue with
-- a short backoff (a job that kills its worker does not take the next one
-- down at once), or fail when no attempt is left (each rescue counted one),
-- or end cancelled when a cancel was requested; one lease_expired runs row
-- each. First the expired incarnations are marked lost under their row lock
-- (SKIP LOCKED: one whose heartbeat holds the lock is renewing, not dead);
-- a job is rescued only if its incarnation is marked lost or has no row.
-- The job UPDATE is fenced on state and incarnation, so a job completed
-- meanwhile is untouched. jobs_running_idx bounds the scan to running rows.
CREATE OR REPLACE FUNCTION pgsched.rescue(batch integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    rescued integer;
BEGIN
    UPDATE pgsched.workers w SET lease_expires_at = '-infinity'
    FROM (SELECT id FROM pgsched.workers
          WHERE lease_expires_at < pgsched.now() AND lease_expires_at > '-infinity'
          FOR UPDATE SKIP LOCKED) AS expired
    WHERE w.id = expired.id;

    WITH lost AS (
        SELECT j.id, j.worker_id, j.attempts, j.started_at FROM pgsched.jobs j
        WHERE j.state = 'running'
          AND NOT EXISTS (SELECT 1 FROM pgsched.workers w WHERE w.id = j.worker_id AND w.lease_expires_at > '-infinity')
        ORDER BY j.started_at
        LIMIT batch
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE pgsched.jobs j
        SET state = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                         WHEN j.attempts >= j.max_attempts THEN 'failed'
                         ELSE 'scheduled' END,
            -- 1, 2, 4, ... seconds, at most a minute.
            run_at = pgsched.now() + make_interval(secs => least(power(2, j.attempts - 1), 60)),
            error = CASE WHEN j.cancel_requested_at IS NOT NULL THEN j.error
                         ELSE 'lease expired: the worker stopped heartbeating (crashed, killed or stalled)' END,
            finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL OR j.attempts >= j.max_attempts
                               THEN pgsched.now() END,
            worker_id = NULL
        FROM lost l
        WHERE j.id = l.id AND j.state = 'running' AND j.worker_id = l.worker_id
        RETURNING j.id, j.queue, j.task, j.owner, j.state, l.worker_id, l.attempts, l.started_at
    ), history AS (
        INSERT INTO pgsched.runs (job_id, attempt, queue, task, owner, worker_id, outcome, error, started_at, finished_at)
        SELECT id, attempts, queue, task, owner, worker_id, 'lease_expired',
               'lease expired: the worker stopped heartbeating (crashed, killed or stalled)',
               COALESCE(started_at, pgsched.now()), pgsched.now()
        FROM moved
    )
    SELECT count(*) INTO rescued FROM moved;
    RETURN rescued;
END
$$;
COMMENT ON FUNCTION pgsched.rescue(integer) IS
    'Takes back up to batch running jobs of worker incarnations whose lease expired (retried after a backoff, or failed), recording lease_expired runs; returns how many';

-- Incarnations whose lease ended more than ten minutes ago and that hold no
-- running job (a row is kept while a job names it, so the rescuer can tell
-- that job's holder is gone).
CREATE OR REPLACE FUNCTION pgsched.prune_workers() RETURNS integer
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM pgsched.workers w
        WHERE w.lease_expires_at < pgsched.now() - interval '10 minutes'
          AND NOT EXISTS (SELECT 1 FROM pgsched.jobs j WHERE j.state = 'running' AND j.worker_id = w.id)
        RETURNING 1)
    SELECT count(*)::integer FROM gone
$$;

-- retry: as in 0001, without the dropped column.
CREATE OR REPLACE FUNCTION pgsched.retry(job_id bigint) RETURNS pgsched.jobs
LANGUAGE plpgsql AS $$
DECLARE
    job pgsched.jobs;
BEGIN
    SELECT * INTO job FROM pgsched.jobs j WHERE j.id = job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist', job_id USING ERRCODE = 'PGS04';
    END IF;
    IF job.state = 'queued' THEN
        RETURN job;
    ELSIF job.state IN ('running', 'waiting') THEN
        RAISE EXCEPTION 'job % is %; it cannot be retried now', job_id, job.state USING ERRCODE = 'PGS09';
    END IF;
    UPDATE pgsched.jobs j
    SET state = 'queued', run_at = pgsched.now(), max_attempts = greatest(j.max_attempts, j.attempts + 1),
        finished_at = NULL, cancel_requested_at = NULL, worker_id = NULL
    WHERE j.id = job_id RETURNING j.* INTO job;
    PERFORM pg_catalog.pg_notify('pgsched_wakeup', job.queue);
    RETURN job;
END
$$;

-- claim_controlled loses its lease parameter (jobs carry no lease any more);
-- migration 7 defines its new body, claim_controlled(text[], text[], integer, uuid).
DROP FUNCTION pgsched.claim_controlled(text[], text[], integer, uuid, double precision);
