"""Statements the core executes (the client, the CLI, the leader services, key rotation), each
named, with the index it relies on. The worker's are in ``pgsched.worker.queries``.

Schema lives in ``sql/``; this module only holds the statements. Parameters
are always bound, never formatted in.
"""

from __future__ import annotations

from .jobs import JOB_COLUMNS

# Whether the migration table exists (before reading it).
SCHEMA_PRESENT = "SELECT to_regclass('pgsched.schema_migrations') IS NOT NULL"
APPLIED_MIGRATIONS = "SELECT version, name, checksum FROM pgsched.schema_migrations"
# Applying migrations (pgsched.migrations): one at a time under a transaction-scoped lock; a
# schema pgsched without migration history is someone else's.
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(%s)"
SCHEMA_EXISTS = "SELECT to_regnamespace('pgsched') IS NOT NULL"
RECORD_MIGRATION = "INSERT INTO pgsched.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)"

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

# -- queue controls (pgsched.queues) -----------------------------------------------------------

# The controls of queues (primary key; a handful of rows).
QUEUE_SETTINGS = (
    "SELECT name, paused, max_running, rate_limit, rate_period, max_per_key, fair, encrypt FROM pgsched.queues"
)
QUEUE_SETTINGS_ONE = QUEUE_SETTINGS + " WHERE name = %s"
QUEUE_SETTINGS_ALL = QUEUE_SETTINGS + " ORDER BY name"

# Every queue pgsched has heard of: a row, jobs, a task's default queue, a live worker.
QUEUES_KNOWN = """
SELECT name FROM pgsched.queues
UNION SELECT queue FROM pgsched.queue_stats
UNION SELECT queue FROM pgsched.tasks
UNION SELECT unnest(queues) FROM pgsched.workers
"""

# Setting some controls of a queue; the others keep their value (primary key).
QUEUE_UPSERT = """
INSERT INTO pgsched.queues AS q (name, paused, max_running, rate_limit, rate_period, max_per_key, fair, encrypt)
VALUES (%(name)s, COALESCE(%(paused)s, false), %(max_running)s, %(rate_limit)s, %(rate_period)s,
        %(max_per_key)s, COALESCE(%(fair)s, false), COALESCE(%(encrypt)s, false))
ON CONFLICT (name) DO UPDATE SET
    paused = COALESCE(%(paused)s, q.paused),
    max_running = CASE WHEN %(set_max_running)s THEN excluded.max_running ELSE q.max_running END,
    rate_limit = CASE WHEN %(set_rate)s THEN excluded.rate_limit ELSE q.rate_limit END,
    rate_period = CASE WHEN %(set_rate)s THEN excluded.rate_period ELSE q.rate_period END,
    max_per_key = CASE WHEN %(set_max_per_key)s THEN excluded.max_per_key ELSE q.max_per_key END,
    fair = COALESCE(%(fair)s, q.fair),
    encrypt = COALESCE(%(encrypt)s, q.encrypt),
    updated_at = pgsched.now()
RETURNING name, paused, max_running, rate_limit, rate_period, max_per_key, fair, encrypt
"""


# -- schedules (pgsched.schedules, by primary key or unique name) ---------------------------------

SCHEDULE_COLUMNS = (
    "id, name, task, args, cron, every, timezone, queue, priority, max_attempts, timeout_seconds, owner, "
    "misfire_policy, catch_up_window, overlap_policy, jitter_seconds, start_at, end_at, paused, enabled, source, "
    "next_run_at, last_slot, invalid_reason"
)

# A changed timetable clears next_run_at; the materializer then starts it from now.
SCHEDULE_UPSERT = f"""
INSERT INTO pgsched.schedules AS s (name, task, args, cron, every, timezone, queue, priority, max_attempts,
    timeout_seconds, owner, misfire_policy, catch_up_window, overlap_policy, jitter_seconds, start_at, end_at,
    source, options)
VALUES (%(name)s, %(task)s, %(args)s::jsonb, %(cron)s, %(every)s, %(timezone)s, %(queue)s, %(priority)s,
    %(max_attempts)s, %(timeout)s, %(owner)s, %(misfire)s, %(catch_up_window)s, %(overlap)s, %(jitter_seconds)s,
    %(start_at)s, %(end_at)s, %(source)s, %(options)s::jsonb)
ON CONFLICT (name) DO UPDATE SET
    task = excluded.task, args = excluded.args, cron = excluded.cron, every = excluded.every,
    timezone = excluded.timezone, queue = excluded.queue, priority = excluded.priority,
    max_attempts = excluded.max_attempts, timeout_seconds = excluded.timeout_seconds, owner = excluded.owner,
    misfire_policy = excluded.misfire_policy, catch_up_window = excluded.catch_up_window,
    overlap_policy = excluded.overlap_policy, jitter_seconds = excluded.jitter_seconds,
    start_at = excluded.start_at, end_at = excluded.end_at, source = excluded.source, options = excluded.options,
    enabled = true, updated_at = pgsched.now(), invalid_reason = NULL,
    next_run_at = CASE WHEN (s.cron, s.every, s.timezone, s.start_at) IS DISTINCT FROM
                            (excluded.cron, excluded.every, excluded.timezone, excluded.start_at)
                       THEN NULL ELSE s.next_run_at END
RETURNING {SCHEDULE_COLUMNS}
"""

SCHEDULES_LIST = f"SELECT {SCHEDULE_COLUMNS} FROM pgsched.schedules ORDER BY name"
SCHEDULE_GET = f"SELECT {SCHEDULE_COLUMNS} FROM pgsched.schedules WHERE name = %s"
SCHEDULE_SET_PAUSED = (
    f"UPDATE pgsched.schedules SET paused = %s, updated_at = pgsched.now() WHERE name = %s RETURNING {SCHEDULE_COLUMNS}"
)
SCHEDULE_DELETE = "DELETE FROM pgsched.schedules WHERE name = %s RETURNING id"
# Schedules this app defined in code before and no longer does: disabled, kept.
SCHEDULES_DISABLE_REMOVED = """
UPDATE pgsched.schedules SET enabled = false, updated_at = pgsched.now()
WHERE source = 'code' AND options->>'app' = %s AND NOT (name = ANY(%s)) AND enabled
"""
# A run now, outside the timetable: a job with the schedule's id and no slot.
SCHEDULE_TRIGGER = """
INSERT INTO pgsched.jobs (task, args, queue, priority, max_attempts, timeout_seconds, owner, schedule_id)
SELECT task, args, queue, priority, COALESCE(max_attempts, 5), timeout_seconds, owner, id
FROM pgsched.schedules WHERE name = %s
RETURNING id
"""


# -- key rotation (pgsched keys rotate) ---------------------------------------------------------

# Live jobs with a payload encrypted under another key than %(kid)s, or in a version 1 envelope
# (no task and queue bound), by primary key from %(after)s: a full pass over the table, which a
# command an operator runs now and then can afford.
ROTATE_STALE_JOBS = """
SELECT id, task, queue, args, progress, result, error FROM pgsched.jobs
WHERE id > %(after)s AND state IN ('waiting', 'scheduled', 'queued', 'running')
  AND ((args @> '{"pgsched_encrypted": 1}' AND (args ->> 'kid' <> %(kid)s OR NOT args @> '{"v": 2}'))
    OR (progress @> '{"pgsched_encrypted": 1}' AND (progress ->> 'kid' <> %(kid)s OR NOT progress @> '{"v": 2}'))
    OR (result @> '{"pgsched_encrypted": 1}' AND (result ->> 'kid' <> %(kid)s OR NOT result @> '{"v": 2}'))
    OR (error LIKE 'pgsched:enc:%%' AND (split_part(error, ':', 4) <> %(kid)s OR error NOT LIKE 'pgsched:enc:2:%%')))
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

ROTATE_UPDATE_JOB = """
UPDATE pgsched.jobs SET args = %(args)s, progress = %(progress)s, result = %(result)s, error = %(error)s
WHERE id = %(id)s
"""

ROTATE_STALE_SCHEDULES = """
SELECT id, task, queue, args FROM pgsched.schedules
WHERE id > %(after)s AND args @> '{"pgsched_encrypted": 1}' AND (args ->> 'kid' <> %(kid)s OR NOT args @> '{"v": 2}')
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

ROTATE_UPDATE_SCHEDULE = "UPDATE pgsched.schedules SET args = %(args)s, updated_at = pgsched.now() WHERE id = %(id)s"


# -- leader services (pgsched/leader/; the functions are in sql/0002_scheduler.sql) ----------------

# Lead this pass (or, with the lock disabled for tests, always lead), and let the server end this
# transaction if it sits idle longer than the stall timeout (milliseconds; SET LOCAL, pooler-safe).
LEAD_PASS = """SELECT NOT %s OR pg_try_advisory_xact_lock(%s), pgsched.now(),
                      set_config('idle_in_transaction_session_timeout', %s, true)"""  # nosec B105: a pass
# The test clock of a pass (run_once(now=...)): pgsched.now() reads it, for this transaction only.
SET_CLOCK = "SELECT set_config('pgsched.clock_offset', (%s - now())::text, true)"
PROMOTE = "SELECT pgsched.promote(%s)"
RESCUE = "SELECT pgsched.rescue(%s)"
PRUNE_JOBS = "SELECT pgsched.prune_jobs(%s)"
PRUNE_HISTORY = "SELECT pgsched.prune_history(%s)"
PRUNE_WORKERS = "SELECT pgsched.prune_workers()"
# The history partitions of the coming week.
ENSURE_HISTORY_PARTITIONS = "SELECT pgsched.ensure_history_partitions(7)"

# Due schedules (schedules_due_idx), locked so concurrent schedulers split them.
MATERIALIZE_DUE = """
SELECT id, name, task, args, cron, every, timezone, queue, priority, max_attempts, timeout_seconds, owner,
       misfire_policy, catch_up_window, overlap_policy, jitter_seconds, start_at, end_at, paused, enabled, source,
       next_run_at, last_slot, invalid_reason, created_at
FROM pgsched.schedules
WHERE enabled AND NOT paused AND invalid_reason IS NULL
  AND (next_run_at IS NULL OR (next_run_at <= pgsched.now() AND (end_at IS NULL OR next_run_at <= end_at)))
  -- Schedules of command jobs fire only where this role may create such jobs (the jobs table's
  -- guard would refuse them, and with them the whole batch).
  AND (task NOT IN ('shell', 'http') OR pgsched.may_create_command_jobs(current_user))
  -- A template stored in clear for a queue that now encrypts would be refused by the jobs insert
  -- trigger, and with it the batch: it waits until its app writes it again, encrypted.
  AND (args @> '{"pgsched_encrypted": 1}'
       OR NOT EXISTS (SELECT 1 FROM pgsched.queues q WHERE q.name = pgsched.schedules.queue AND q.encrypt))
ORDER BY next_run_at NULLS FIRST
LIMIT %s
FOR UPDATE SKIP LOCKED
"""

# Live jobs of those schedules, for the overlap policy (jobs_schedule_slot).
MATERIALIZE_LIVE = """
SELECT schedule_id, id, state FROM pgsched.jobs
WHERE schedule_id = ANY(%s) AND state IN ('waiting', 'scheduled', 'queued', 'running')
"""

# The jobs of the slots a pass fires; a slot already fired (by another scheduler) is skipped
# (jobs_schedule_slot, unique).
MATERIALIZE_INSERT_JOBS = """
INSERT INTO pgsched.jobs (task, args, queue, priority, max_attempts, timeout_seconds, owner,
                          schedule_id, slot, run_at)
SELECT s.task, s.args, s.queue, s.priority, COALESCE(s.max_attempts, 5), s.timeout_seconds, s.owner,
       s.id, f.slot, f.run_at
FROM unnest(%s::bigint[], %s::timestamptz[], %s::timestamptz[]) AS f(schedule_id, slot, run_at)
JOIN pgsched.schedules s ON s.id = f.schedule_id
ON CONFLICT (schedule_id, slot) WHERE schedule_id IS NOT NULL DO NOTHING
RETURNING id
"""

# A schedule this pass could not evaluate is marked once and passed over from then on (it no
# longer matches MATERIALIZE_DUE), so it neither warns every pass nor holds a place in every batch. Fenced
# like MATERIALIZE_ADVANCE: a schedule rewritten since this pass read it is left to the next pass.
MATERIALIZE_MARK_INVALID = """
UPDATE pgsched.schedules s SET invalid_reason = v.reason, updated_at = pgsched.now()
FROM unnest(%s::bigint[], %s::timestamptz[], %s::text[]) AS v(id, seen, reason)
WHERE s.id = v.id AND s.next_run_at IS NOT DISTINCT FROM v.seen AND s.invalid_reason IS NULL
"""

# Compare-and-set: only if next_run_at is still what this pass read.
MATERIALIZE_ADVANCE = """
UPDATE pgsched.schedules s
SET next_run_at = v.next_run_at, last_slot = COALESCE(v.last_slot, s.last_slot), updated_at = pgsched.now()
FROM unnest(%s::bigint[], %s::timestamptz[], %s::timestamptz[], %s::timestamptz[])
     AS v(id, seen, next_run_at, last_slot)
WHERE s.id = v.id AND s.next_run_at IS NOT DISTINCT FROM v.seen
"""


# overlap policy cancel_previous: the schedule's live job makes way for the next run.
MATERIALIZE_CANCEL = "SELECT pgsched.cancel(%s, 'replaced by the next run of its schedule')"


# -- the embedded server ---------------------------------------------------------------------------

# Other pgsched processes' sessions, by application_name (pgsched db stop refuses while there are
# any; pg_stat_activity, as the server's superuser). Run without parameters: % is a plain character.
PGSCHED_SESSIONS = """
SELECT application_name, count(*) FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND application_name LIKE 'pgsched%' GROUP BY 1 ORDER BY 1
"""
