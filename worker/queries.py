"""Statements the worker executes, each with the index it relies on."""

from __future__ import annotations

from pgsched.jobs import JOB_COLUMNS

_J_COLUMNS = ", ".join(f"j.{c}" for c in JOB_COLUMNS.split(", "))
# A dependency's result for ctx.dependency_results; a sealed one carries its job's task and queue,
# taken from the row, which its envelope binds (pgsched/crypto.py).
_DEPENDENCY_RESULT = (
    """CASE WHEN d.result @> '{"pgsched_encrypted": 1}' """
    "THEN d.result || jsonb_build_object('task', d.task, 'queue', d.queue) ELSE d.result END"
)

# Claim up to %(limit)s queued jobs of plain queues (no controls set), one
# queue after the other in the order given (the worker rotates it on every
# claim, so no queue starves), of the worker's tasks. In three steps, each an
# index range scan (jobs_claim_idx is (queue, task, priority DESC, run_at, id)):
#
# 1. plain, runnable: the queues that are not controlled (none for an incarnation
#    whose lease is gone) and the tasks without a
#    max_per_key, filtered first (MATERIALIZED), so the jobs scans never see a
#    controlled queue's rows nor lock them, and a task capped since the worker
#    last read the catalog is left to claim_controlled (a stale view of the caps
#    cannot exceed them; the few rows of pgsched.queues and pgsched.tasks);
# 2. quota: the first %(limit)s jobs in claim order, merged from the first
#    %(limit)s of each (queue, task) slice without locking them, counted per
#    slice. Jobs of tasks the worker cannot run cost nothing however many;
# 3. picked: each slice's quota taken in its order with SKIP LOCKED, so a slice
#    whose first rows another worker is claiming gives its next ones, and no
#    row is locked that is not claimed.
#
# Why not DESIGN's single `queue = ANY(...) AND task = ANY(...)` scan: no index
# returns the rows of several queues and tasks in (priority, run_at, id) order,
# so the planner sorted every queued row of those queues on every claim (a
# sequential scan of 300,000 rows of another task: 154 ms). MATERIALIZED keeps
# the planner from inlining a step, and from running LIMIT ... SKIP LOCKED more
# than once (which can claim more rows than asked); picked's LIMIT bounds its
# row estimate so the UPDATE joins by primary key.
CLAIM = f"""
WITH plain AS MATERIALIZED (
    SELECT q.name, q.position FROM unnest(%(queues)s::text[]) WITH ORDINALITY AS q(name, position)
    -- Only for a live incarnation (one primary-key probe, evaluated once): the claims of one
    -- whose lease the rescuer took would only be rescued again.
    WHERE EXISTS (SELECT 1 FROM pgsched.workers w WHERE w.id = %(worker)s AND w.lease_expires_at > pgsched.now())
      AND NOT EXISTS (SELECT 1 FROM pgsched.queues s WHERE s.name = q.name AND pgsched.queue_is_controlled(s))
), runnable AS MATERIALIZED (
    SELECT DISTINCT t.name FROM unnest(%(tasks)s::text[]) AS t(name)
    WHERE NOT EXISTS (SELECT 1 FROM pgsched.tasks c WHERE c.name = t.name AND c.options ? 'max_per_key')
), quota AS MATERIALIZED (
    SELECT first.queue, first.task, count(*) AS n
    FROM (
        SELECT q.name AS queue, t.name AS task
        FROM plain q CROSS JOIN runnable t
        CROSS JOIN LATERAL (
            SELECT priority, run_at, id FROM pgsched.jobs
            WHERE state = 'queued' AND queue = q.name AND task = t.name
            ORDER BY priority DESC, run_at, id
            LIMIT %(limit)s
        ) AS c
        ORDER BY q.position, c.priority DESC, c.run_at, c.id
        LIMIT %(limit)s
    ) AS first
    GROUP BY first.queue, first.task
), picked AS MATERIALIZED (
    SELECT p.id
    FROM quota CROSS JOIN LATERAL (
        SELECT id FROM pgsched.jobs
        WHERE state = 'queued' AND queue = quota.queue AND task = quota.task
        ORDER BY priority DESC, run_at, id
        LIMIT quota.n
        FOR UPDATE SKIP LOCKED
    ) AS p
    LIMIT %(limit)s
)
UPDATE pgsched.jobs j
SET state = 'running', attempts = j.attempts + 1, worker_id = %(worker)s, started_at = pgsched.now()
FROM picked
WHERE j.id = picked.id
RETURNING {_J_COLUMNS},
    -- The results of its dependencies, for ctx.dependency_results (job_deps primary key;
    -- one index probe for a job without any).
    (SELECT jsonb_object_agg(e.depends_on::text, {_DEPENDENCY_RESULT})
     FROM pgsched.job_deps e JOIN pgsched.jobs d ON d.id = e.depends_on
     WHERE e.job_id = j.id) AS dependency_results
"""

# Claim from controlled queues (and jobs of tasks with max_per_key in any
# queue): sql/0003_queue_controls.sql. A row without a job says when the next
# start of a rate-limited queue is allowed.
CLAIM_CONTROLLED = f"""
SELECT {", ".join(f"(c.job).{col}" for col in JOB_COLUMNS.split(", "))},
    (SELECT jsonb_object_agg(e.depends_on::text, {_DEPENDENCY_RESULT})
     FROM pgsched.job_deps e JOIN pgsched.jobs d ON d.id = e.depends_on
     WHERE e.job_id = (c.job).id) AS dependency_results,
    c.next_claim_in
FROM pgsched.claim_controlled(%(queues)s, %(tasks)s, %(limit)s, %(worker)s) AS c
"""

# Which of the worker's queues are controlled or paused, and which of its tasks
# have a max_per_key (read at start, on pgsched_queue_settings, and every heartbeat).
CONTROLS = """
SELECT 'queue', q.name, q.paused, pgsched.queue_is_controlled(q)
FROM pgsched.queues q WHERE q.name = ANY(%(queues)s)
UNION ALL
SELECT 'task', t.name, false, true
FROM pgsched.tasks t WHERE t.name = ANY(%(tasks)s) AND t.options ? 'max_per_key'
"""

# Complete a batch of attempts in one round trip. Every row is fenced on
# (id, attempt, worker incarnation, state = 'running'): a job whose lease was
# lost and that was rescued or finished elsewhere is not touched, and its
# attempt is recorded as 'fenced'. Primary key lookups, in id order (see
# complete_params). The batch arrives as one JSON array (OUTCOME_ROWS).
OUTCOME_ROWS = """
json_to_recordset(%(outcomes)s::json) AS d(
    worker uuid, id bigint, attempt integer, queue text, task text, owner text, state text, outcome text,
    result text, error text, delay double precision, started_at timestamptz, finished_at timestamptz)
"""

COMPLETE = f"""
WITH done AS (
    SELECT d.worker, d.id, d.attempt, d.queue, d.task, d.owner, d.state, d.outcome, d.result::jsonb AS result,
           d.error, d.delay, d.started_at, d.finished_at
    FROM {OUTCOME_ROWS}
), updated AS (
    UPDATE pgsched.jobs j
    SET state = d.state,
        result = CASE WHEN d.state = 'succeeded' THEN d.result ELSE j.result END,
        -- A cancel keeps the reason pgsched.cancel stored.
        error = CASE WHEN d.outcome = 'cancelled' AND d.error IS NULL THEN j.error ELSE d.error END,
        -- A snoozed attempt does not count.
        attempts = CASE WHEN d.outcome = 'snoozed' THEN j.attempts - 1 ELSE j.attempts END,
        run_at = CASE WHEN d.delay IS NOT NULL THEN pgsched.now() + make_interval(secs => d.delay) ELSE j.run_at END,
        finished_at = CASE WHEN d.state IN ('succeeded', 'failed', 'cancelled') THEN pgsched.now() END,
        worker_id = NULL, cancel_requested_at = NULL
    FROM done d
    WHERE j.id = d.id AND j.attempts = d.attempt AND j.worker_id = d.worker AND j.state = 'running'
    RETURNING j.id
), history AS (
    INSERT INTO pgsched.runs (job_id, attempt, queue, task, owner, worker_id, outcome, error, started_at, finished_at)
    SELECT d.id, d.attempt, d.queue, d.task, d.owner, d.worker,
           CASE WHEN u.id IS NULL THEN 'fenced' ELSE d.outcome END, d.error, d.started_at, d.finished_at
    FROM done d LEFT JOIN updated u ON u.id = d.id
)
SELECT id FROM updated
"""

# A new worker incarnation (at start, and after a lost lease) and its lease.
REGISTER = """
INSERT INTO pgsched.workers (id, host, pid, queues, tasks, concurrency, with_scheduler, version, lease_expires_at)
VALUES (%(worker)s, %(host)s, %(pid)s, %(queues)s, %(tasks)s, %(concurrency)s, %(with_scheduler)s, %(version)s,
        pgsched.now() + make_interval(secs => %(lease)s))
"""

# Renew the incarnation's lease: one row, whatever the worker holds, and no
# row lock on any job (DESIGN §8 "Liveness"). A lease that expired is never
# renewed (no row returned): the rescuer may have taken its jobs, so the
# worker drops them and registers a new incarnation.
HEARTBEAT = """
UPDATE pgsched.workers
SET heartbeat_at = pgsched.now(), lease_expires_at = pgsched.now() + make_interval(secs => %(lease)s)
WHERE id = %(worker)s AND lease_expires_at > pgsched.now()
RETURNING id
"""

# Which of the jobs this incarnation holds were asked to stop (pgsched.cancel),
# for a cancel whose NOTIFY was missed. A plain read by primary key: it waits
# on no row lock.
CANCEL_REQUESTS = """
SELECT id FROM pgsched.jobs
WHERE id = ANY(%(ids)s::bigint[]) AND worker_id = %(worker)s AND state = 'running' AND cancel_requested_at IS NOT NULL
"""

# Jobs running under this incarnation that the worker does not hold: claimed by
# a claim whose commit succeeded but whose reply was lost (the session cut just
# after the commit). The heartbeat reads them when no claim is on its way, and
# gives them back (RELEASE). The running rows by jobs_running_idx.
UNKNOWN_CLAIMS = """
SELECT id FROM pgsched.jobs
WHERE state = 'running' AND worker_id = %(worker)s AND NOT (id = ANY(%(held)s::bigint[]))
"""

# Save a task's checkpoint (fenced like a completion).
SET_PROGRESS = """
UPDATE pgsched.jobs SET progress = %(progress)s::jsonb
WHERE id = %(id)s AND attempts = %(attempt)s AND worker_id = %(worker)s AND state = 'running'
"""

# Put jobs this worker holds back in the queue without counting the attempt
# (shutdown: prefetched jobs never started, running jobs interrupted; a
# paused queue's prefetched jobs). A job whose cancel was requested meanwhile
# ends cancelled instead: nobody else would act on the request.
RELEASE = """
UPDATE pgsched.jobs
SET state = CASE WHEN cancel_requested_at IS NULL THEN 'queued' ELSE 'cancelled' END,
    finished_at = CASE WHEN cancel_requested_at IS NULL THEN NULL ELSE pgsched.now() END,
    attempts = attempts - 1, worker_id = NULL, started_at = NULL
WHERE id = ANY(%(ids)s::bigint[]) AND worker_id = %(worker)s AND state = 'running'
RETURNING id, queue, state
"""

# The runs rows of attempts interrupted by a shutdown (written just before RELEASE).
INSERT_INTERRUPTED = f"""
INSERT INTO pgsched.runs (job_id, attempt, queue, task, owner, worker_id, outcome, started_at, finished_at)
SELECT d.id, d.attempt, d.queue, d.task, d.owner, %(worker)s, 'interrupted', d.started_at, d.finished_at
FROM {OUTCOME_ROWS}
"""

# A stopped incarnation's row goes, unless a job still names it (a sync task's
# thread that could not be stopped): then the row stays, its lease runs out,
# and the rescuer takes the job back once this process no longer runs it.
UNREGISTER = """
DELETE FROM pgsched.workers w
WHERE w.id = %(worker)s AND NOT EXISTS (SELECT 1 FROM pgsched.jobs j WHERE j.state = 'running' AND j.worker_id = w.id)
"""

WAKE = "SELECT pg_notify('pgsched_wakeup', q) FROM unnest(%s::text[]) AS q"

INSERT_LOGS = """
INSERT INTO pgsched.run_logs (job_id, attempt, logged_at, stream, level, message)
SELECT * FROM unnest(%(job_ids)s::bigint[], %(attempts)s::integer[], %(at)s::timestamptz[], %(streams)s::text[],
                     %(levels)s::text[], %(messages)s::text[])
"""

# Who created a shell/http job, re-checked by the worker before running it.
# (A role dropped since it created the job may not: pg_has_role would raise for it.)
MAY_RUN_COMMANDS = """
SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(role)s)
            THEN pgsched.may_create_command_jobs(%(role)s) ELSE false END
"""

# The channels a worker listens on: new jobs (per queue, from the jobs insert trigger), cancels of
# running jobs, and changed queue controls.
LISTEN = ("LISTEN pgsched_wakeup", "LISTEN pgsched_cancel", "LISTEN pgsched_queue_settings")
