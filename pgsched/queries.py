"""Statements the client executes, each named, with the index it relies on.

Schema lives in ``sql/``; this module only holds the statements. Parameters
are always bound, never formatted in.
"""

from __future__ import annotations

from .jobs import JOB_COLUMNS

# Whether the migration table exists (before reading it).
SCHEMA_PRESENT = "SELECT to_regclass('pgsched.schema_migrations') IS NOT NULL"
APPLIED_MIGRATIONS = "SELECT version, name, checksum FROM pgsched.schema_migrations"

# Single enqueue through the SQL API, so SQL users and Python share one
# implementation (defaults, dependencies, dedupe, guard). Primary key and
# jobs_dedupe_key_live (ON CONFLICT inside the function).
ENQUEUE = f"""
SELECT {JOB_COLUMNS} FROM pgsched.enqueue(
    task => %(task)s, args => %(args_json)s::jsonb, queue => %(queue)s, priority => %(priority)s,
    run_at => %(run_at)s, delay => make_interval(secs => %(delay_seconds)s), max_attempts => %(max_attempts)s,
    dedupe_key => %(dedupe_key)s, depends_on => %(depends_on)s::bigint[], owner => %(owner)s,
    timeout_seconds => %(timeout)s, concurrency_key => %(concurrency_key)s,
    run_on_upstream_failure => %(run_on_upstream_failure)s, workflow_id => %(workflow_id)s)
"""

# Bulk enqueue: the database clock of this transaction (which is also what
# the run_at default would be) and ids allocated ahead, so COPY can write
# explicit ids and run_at values and the caller gets the ids back.
# Whether row-level security applies to this role (then COPY is refused: BULK_INSERT instead).
BULK_PREPARE = """
SELECT pgsched.now(), ARRAY(SELECT nextval('pgsched.jobs_id_seq') FROM generate_series(1, %s)),
       row_security_active('pgsched.jobs')
"""
BULK_COPY_COLUMNS = (
    "id",
    "task",
    "args",
    "queue",
    "priority",
    "run_at",
    "max_attempts",
    "timeout_seconds",
    "dedupe_key",
    "owner",
    "concurrency_key",
    "run_on_upstream_failure",
)
BULK_COPY = f"COPY pgsched.jobs ({', '.join(BULK_COPY_COLUMNS)}) FROM STDIN"
BULK_INSERT = f"""
INSERT INTO pgsched.jobs ({", ".join(BULK_COPY_COLUMNS)})
SELECT * FROM unnest(%s::bigint[], %s::text[], %s::jsonb[], %s::text[], %s::smallint[], %s::timestamptz[],
                     %s::integer[], %s::double precision[], %s::text[], %s::text[], %s::text[], %s::boolean[])
"""

# Primary key.
GET_JOB = f"SELECT {JOB_COLUMNS} FROM pgsched.jobs WHERE id = %s"
CANCEL_JOB = f"SELECT {JOB_COLUMNS} FROM pgsched.cancel(%s, %s)"
CANCEL_WORKFLOW = "SELECT pgsched.cancel_workflow(%s, %s)"
RETRY_WORKFLOW = "SELECT pgsched.retry_workflow(%s)"
RETRY_JOB = f"SELECT {JOB_COLUMNS} FROM pgsched.retry(%s)"

# Listing for people (CLI): newest first, by primary key, optionally one
# state (then jobs_*_idx partial indexes serve live states).
LIST_JOBS = f"""
SELECT {JOB_COLUMNS} FROM pgsched.jobs
WHERE (%(state)s::text IS NULL OR state = %(state)s)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task = %(task)s)
ORDER BY id DESC
LIMIT %(limit)s
"""

# Whether a live worker claims from a queue (a SECURITY DEFINER function: enqueuers may not read
# pgsched.workers). A sequential scan of the workers, a handful of rows.
QUEUE_SERVED = "SELECT pgsched.queue_served(%s)"

QUEUE_STATS = "SELECT * FROM pgsched.queue_stats ORDER BY queue"

# Queues that store encrypted payloads, read when an app connects (a handful of rows).
ENCRYPTED_QUEUES = "SELECT name FROM pgsched.queues WHERE encrypt"

# Task catalog: defaults of names the app does not define itself (primary key).
CATALOG_DEFAULTS = "SELECT name, queue, options, parameters FROM pgsched.tasks WHERE name = ANY(%s)"
# Every task name, for "did you mean" when a name is unknown (the error path only).
CATALOG_NAMES = "SELECT name FROM pgsched.tasks"

# Registering the app's tasks (primary key). The execution options (max_per_key, backoff) are
# written only by an app that runs the task (%(runs)s: a worker at start); another app's
# registration (a client opening, an enqueuer) sends only the enqueue defaults, merged over the
# stored options, so the execution options stay the workers'.
CATALOG_UPSERT = """
INSERT INTO pgsched.tasks AS t (name, queue, options, parameters, description, app, last_seen_at)
SELECT name, queue, options, parameters, description, app, pgsched.now()
FROM unnest(%(names)s::text[], %(queues)s::text[], %(options)s::jsonb[], %(parameters)s::jsonb[],
            %(descriptions)s::text[], %(apps)s::text[])
     AS r(name, queue, options, parameters, description, app)
ON CONFLICT (name) DO UPDATE
SET queue = excluded.queue,
    options = CASE WHEN %(runs)s THEN excluded.options ELSE t.options || excluded.options END,
    parameters = excluded.parameters, description = excluded.description, app = excluded.app,
    last_seen_at = excluded.last_seen_at
"""

# -- what people read (CLI: jobs show, jobs logs, workers) --------------------------------------

# A job's attempts, oldest first (runs_job_idx).
JOB_RUNS = """
SELECT attempt, outcome, worker_id, started_at, finished_at, duration_ms, error
FROM pgsched.runs WHERE job_id = %s ORDER BY started_at, id
"""

# A job's log lines after a position, in the order they were logged (run_logs_job_idx). The
# position is the last line read: its attempt, time and ctid (which orders lines logged at the
# same instant, always in one partition since partitions split by logged_at).
JOB_LOGS = """
SELECT attempt, logged_at, stream, level, message, ctid::text AS position
FROM pgsched.run_logs
WHERE job_id = %(job_id)s
  AND (%(attempt)s::integer IS NULL OR attempt = %(attempt)s)
  AND (%(after_attempt)s::integer IS NULL
       OR (attempt, logged_at, ctid) > (%(after_attempt)s, %(after_at)s, %(after_position)s::tid))
ORDER BY attempt, logged_at, ctid
"""

# Whether (and how) a followed job has finished (primary key).
JOB_STATE = "SELECT state, task, queue FROM pgsched.jobs WHERE id = %s"

# Every registered worker incarnation, stale ones (lease passed) included until the pruner
# removes them (pgsched.worker_status: a handful of rows).
WORKERS = """
SELECT id, host, pid, queues, concurrency, running, with_scheduler, started_at, heartbeat_at,
       extract(epoch FROM pgsched.now() - heartbeat_at)::double precision AS heartbeat_age_seconds, NOT alive AS stale
FROM pgsched.worker_status ORDER BY host, pid, started_at
"""
