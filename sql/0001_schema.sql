-- pgsched schema, version 1: every table of DESIGN §3.
--
-- This file is applied once by `pgsched migrate` inside a transaction that
-- holds the migration advisory lock. Never edit it after it has shipped:
-- the runner refuses a database whose applied file's checksum changed. Add
-- a new NNNN_name.sql instead.

CREATE SCHEMA pgsched;
COMMENT ON SCHEMA pgsched IS 'pgsched: a task scheduler whose whole state lives here';

CREATE TABLE pgsched.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL DEFAULT current_user
);
COMMENT ON TABLE pgsched.schema_migrations IS 'One row per applied sql/NNNN_name.sql file; written by pgsched migrate';
COMMENT ON COLUMN pgsched.schema_migrations.checksum IS 'SHA-256 of the file as applied; a later mismatch means the file was edited';

-- ---------------------------------------------------------------------------
-- Group roles. Roles are cluster-wide while this file runs per database, so
-- another database (or a concurrent migrate of one) may have created them
-- already: create each only when missing and tolerate the race.
-- ---------------------------------------------------------------------------
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgsched_enqueuer', 'pgsched_reader', 'pgsched_worker', 'pgsched_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

-- ---------------------------------------------------------------------------
-- Time. Every due / lease / backoff / slot decision calls pgsched.now(), the
-- database clock plus an offset that only tests set:
--   SET pgsched.clock_offset = '10 minutes';
-- A plain SQL function so the planner inlines it and treats it as a stable
-- value in index conditions.
-- ---------------------------------------------------------------------------
CREATE FUNCTION pgsched.now() RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.now()
         + COALESCE(NULLIF(pg_catalog.current_setting('pgsched.clock_offset', true), '')::interval,
                    interval '0')
$$;
COMMENT ON FUNCTION pgsched.now() IS
    'The clock of every pgsched time decision: now() plus the test-only offset in the pgsched.clock_offset setting';

-- ---------------------------------------------------------------------------
-- Catalogs and settings
-- ---------------------------------------------------------------------------
CREATE TABLE pgsched.queues (
    name                text PRIMARY KEY,
    paused              boolean NOT NULL DEFAULT false,
    max_running         integer,
    rate_limit          integer,
    rate_period         interval,
    max_per_key         integer,
    fair                boolean NOT NULL DEFAULT false,
    encrypt             boolean NOT NULL DEFAULT false,
    retention_succeeded interval NOT NULL DEFAULT interval '7 days',
    retention_failed    interval NOT NULL DEFAULT interval '30 days',
    description         text,
    created_at          timestamptz NOT NULL DEFAULT pgsched.now(),
    updated_at          timestamptz NOT NULL DEFAULT pgsched.now(),
    CONSTRAINT queues_name_format CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'),
    CONSTRAINT queues_max_running_positive CHECK (max_running IS NULL OR max_running >= 1),
    CONSTRAINT queues_max_per_key_positive CHECK (max_per_key IS NULL OR max_per_key >= 1),
    CONSTRAINT queues_rate_complete CHECK ((rate_limit IS NULL) = (rate_period IS NULL)),
    CONSTRAINT queues_rate_positive CHECK (rate_limit IS NULL OR (rate_limit >= 1 AND rate_period > interval '0')),
    CONSTRAINT queues_retention_positive CHECK (retention_succeeded > interval '0' AND retention_failed > interval '0')
);
COMMENT ON TABLE pgsched.queues IS 'Per-queue settings. A queue needs no row here to be used; a row only changes its defaults';
COMMENT ON COLUMN pgsched.queues.name IS 'Queue name, as in jobs.queue';
COMMENT ON COLUMN pgsched.queues.paused IS 'When true no worker claims from this queue; enqueue still works';
COMMENT ON COLUMN pgsched.queues.max_running IS 'Global cap on jobs of this queue running at once, across all workers (NULL: no cap)';
COMMENT ON COLUMN pgsched.queues.rate_limit IS 'At most rate_limit job starts per rate_period (NULL: no rate limit)';
COMMENT ON COLUMN pgsched.queues.max_per_key IS 'At most this many running jobs per concurrency_key (NULL: no per-key cap)';
COMMENT ON COLUMN pgsched.queues.fair IS 'When true claims alternate between owners (or concurrency keys) within a priority';
COMMENT ON COLUMN pgsched.queues.encrypt IS 'When true payloads of this queue are stored encrypted';
COMMENT ON COLUMN pgsched.queues.retention_succeeded IS 'How long succeeded jobs and their history are kept before pruning';
COMMENT ON COLUMN pgsched.queues.retention_failed IS 'How long failed and cancelled jobs and their history are kept before pruning';

CREATE TABLE pgsched.tasks (
    name          text PRIMARY KEY,
    queue         text NOT NULL DEFAULT 'default',
    options       jsonb NOT NULL DEFAULT '{}',
    parameters    jsonb NOT NULL DEFAULT '[]',
    description   text,
    app           text,
    first_seen_at timestamptz NOT NULL DEFAULT pgsched.now(),
    last_seen_at  timestamptz NOT NULL DEFAULT pgsched.now(),
    CONSTRAINT tasks_name_length CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT tasks_options_object CHECK (jsonb_typeof(options) = 'object'),
    CONSTRAINT tasks_parameters_array CHECK (jsonb_typeof(parameters) = 'array')
);
COMMENT ON TABLE pgsched.tasks IS 'Catalog of task names registered by apps and workers; clients validate task names against it';
COMMENT ON COLUMN pgsched.tasks.name IS 'Task name, as in jobs.task';
COMMENT ON COLUMN pgsched.tasks.queue IS 'Default queue of jobs of this task';
COMMENT ON COLUMN pgsched.tasks.options IS 'Default job options of this task: priority, max_attempts, timeout, backoff';
COMMENT ON COLUMN pgsched.tasks.parameters IS 'The task function''s parameters: [{"name", "annotation", "required"}]';
COMMENT ON COLUMN pgsched.tasks.app IS 'Import path of the app that last registered the task';
COMMENT ON COLUMN pgsched.tasks.last_seen_at IS 'When an app last registered this task';

CREATE TABLE pgsched.schedules (
    id              bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name            text NOT NULL,
    owner           text,
    task            text NOT NULL,
    args            jsonb NOT NULL DEFAULT '{}',
    queue           text NOT NULL DEFAULT 'default',
    priority        smallint NOT NULL DEFAULT 0,
    max_attempts    integer,
    timeout_seconds double precision,
    options         jsonb NOT NULL DEFAULT '{}',
    cron            text,
    every           interval,
    timezone        text NOT NULL DEFAULT 'UTC',
    next_run_at     timestamptz,
    last_slot       timestamptz,
    paused          boolean NOT NULL DEFAULT false,
    enabled         boolean NOT NULL DEFAULT true,
    misfire_policy  text NOT NULL DEFAULT 'run_once',
    catch_up_window interval NOT NULL DEFAULT interval '1 day',
    overlap_policy  text NOT NULL DEFAULT 'skip',
    jitter_seconds  integer NOT NULL DEFAULT 0,
    start_at        timestamptz,
    end_at          timestamptz,
    source          text NOT NULL DEFAULT 'sql',
    created_at      timestamptz NOT NULL DEFAULT pgsched.now(),
    updated_at      timestamptz NOT NULL DEFAULT pgsched.now(),
    CONSTRAINT schedules_name_unique UNIQUE (name),
    CONSTRAINT schedules_name_length CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT schedules_one_timetable CHECK ((cron IS NULL) <> (every IS NULL)),
    CONSTRAINT schedules_every_minimum CHECK (every IS NULL OR every >= interval '1 second'),
    CONSTRAINT schedules_args_object CHECK (jsonb_typeof(args) = 'object'),
    CONSTRAINT schedules_priority_range CHECK (priority BETWEEN -100 AND 100),
    CONSTRAINT schedules_max_attempts_positive CHECK (max_attempts IS NULL OR max_attempts >= 1),
    CONSTRAINT schedules_misfire_policy_valid CHECK (misfire_policy IN ('skip', 'run_once', 'catch_up')),
    CONSTRAINT schedules_overlap_policy_valid CHECK (overlap_policy IN ('allow', 'skip', 'queue_one', 'cancel_previous')),
    CONSTRAINT schedules_jitter_nonnegative CHECK (jitter_seconds >= 0),
    CONSTRAINT schedules_window_order CHECK (end_at IS NULL OR start_at IS NULL OR end_at > start_at),
    CONSTRAINT schedules_source_valid CHECK (source IN ('code', 'cli', 'api', 'sql'))
);
CREATE INDEX schedules_due_idx ON pgsched.schedules (next_run_at) WHERE enabled AND NOT paused;
COMMENT ON TABLE pgsched.schedules IS 'Cron and interval definitions and the job template each produces';
COMMENT ON COLUMN pgsched.schedules.name IS 'Unique name of the schedule';
COMMENT ON COLUMN pgsched.schedules.task IS 'Task of the jobs the schedule produces (with args, queue, priority, ...)';
COMMENT ON COLUMN pgsched.schedules.cron IS 'Cron expression (5 or 6 fields, or an @alias) evaluated in timezone; exclusive with every';
COMMENT ON COLUMN pgsched.schedules.every IS 'Interval between runs; exclusive with cron';
COMMENT ON COLUMN pgsched.schedules.timezone IS 'IANA time zone in which cron is evaluated';
COMMENT ON COLUMN pgsched.schedules.next_run_at IS 'The next slot to materialize (UTC instant); advanced by compare-and-set';
COMMENT ON COLUMN pgsched.schedules.last_slot IS 'The last slot materialized into a job';
COMMENT ON COLUMN pgsched.schedules.paused IS 'A paused schedule produces no jobs';
COMMENT ON COLUMN pgsched.schedules.enabled IS 'False when the schedule was removed from the code that defined it (kept, not deleted)';
COMMENT ON COLUMN pgsched.schedules.misfire_policy IS 'What to do with missed slots: skip, run_once or catch_up';
COMMENT ON COLUMN pgsched.schedules.catch_up_window IS 'With catch_up, how far back missed slots are still run';
COMMENT ON COLUMN pgsched.schedules.overlap_policy IS 'When the previous run is still active: allow, skip, queue_one or cancel_previous';
COMMENT ON COLUMN pgsched.schedules.options IS 'The rest of the job template (dedupe, owner, run_on_upstream_failure, ...)';
COMMENT ON COLUMN pgsched.schedules.source IS 'Where the schedule was defined: code, cli, api or sql';

-- ---------------------------------------------------------------------------
-- Jobs
-- ---------------------------------------------------------------------------
CREATE TABLE pgsched.jobs (
    id                      bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    queue                   text NOT NULL DEFAULT 'default',
    task                    text NOT NULL,
    args                    jsonb NOT NULL DEFAULT '{}',
    priority                smallint NOT NULL DEFAULT 0,
    state                   text NOT NULL DEFAULT 'queued',
    run_at                  timestamptz NOT NULL DEFAULT pgsched.now(),
    attempts                integer NOT NULL DEFAULT 0,
    max_attempts            integer NOT NULL DEFAULT 5,
    timeout_seconds         double precision,
    lease_expires_at        timestamptz,
    worker_id               uuid,
    dedupe_key              text,
    owner                   text,
    schedule_id             bigint REFERENCES pgsched.schedules (id) ON DELETE SET NULL,
    slot                    timestamptz,
    workflow_id             uuid,
    concurrency_key         text,
    run_on_upstream_failure boolean NOT NULL DEFAULT false,
    result                  jsonb,
    error                   text,
    progress                jsonb,
    cancel_requested_at     timestamptz,
    created_by              text NOT NULL DEFAULT current_user,
    created_at              timestamptz NOT NULL DEFAULT pgsched.now(),
    started_at              timestamptz,
    finished_at             timestamptz,
    CONSTRAINT jobs_state_valid CHECK (state IN ('waiting', 'scheduled', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT jobs_priority_range CHECK (priority BETWEEN -100 AND 100),
    CONSTRAINT jobs_max_attempts_positive CHECK (max_attempts >= 1),
    CONSTRAINT jobs_attempts_nonnegative CHECK (attempts >= 0),
    CONSTRAINT jobs_task_length CHECK (length(task) BETWEEN 1 AND 200),
    CONSTRAINT jobs_queue_format CHECK (queue ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'),
    CONSTRAINT jobs_args_object CHECK (jsonb_typeof(args) = 'object'),
    CONSTRAINT jobs_args_size CHECK (pg_column_size(args) <= 1048576),
    CONSTRAINT jobs_result_size CHECK (result IS NULL OR pg_column_size(result) <= 1048576),
    CONSTRAINT jobs_progress_size CHECK (progress IS NULL OR pg_column_size(progress) <= 262144),
    CONSTRAINT jobs_error_size CHECK (error IS NULL OR octet_length(error) <= 65536),
    CONSTRAINT jobs_dedupe_key_length CHECK (dedupe_key IS NULL OR length(dedupe_key) BETWEEN 1 AND 200),
    CONSTRAINT jobs_owner_length CHECK (owner IS NULL OR length(owner) BETWEEN 1 AND 200),
    CONSTRAINT jobs_concurrency_key_length CHECK (concurrency_key IS NULL OR length(concurrency_key) BETWEEN 1 AND 200),
    CONSTRAINT jobs_timeout_positive CHECK (timeout_seconds IS NULL OR timeout_seconds > 0),
    CONSTRAINT jobs_running_has_lease CHECK (state <> 'running' OR (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL))
) WITH (
    -- Room on each page for HOT updates (heartbeats touch no indexed column),
    -- and vacuum that keeps up with a table whose rows churn.
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 1
);

-- The claim index: only queued rows, in claim order. It stays small however
-- many finished or future jobs the table holds (DESIGN §8, "Claim").
CREATE INDEX jobs_claim_idx ON pgsched.jobs (queue, priority DESC, run_at, id) WHERE state = 'queued';
-- The promoter's index: scheduled rows by due time.
CREATE INDEX jobs_scheduled_idx ON pgsched.jobs (run_at) WHERE state = 'scheduled';
-- Running rows (rescuer, stats). Deliberately not on lease_expires_at, so that
-- a heartbeat changes no indexed column and stays a HOT update.
CREATE INDEX jobs_running_idx ON pgsched.jobs (queue) WHERE state = 'running';
-- Waiting rows, for stats; dependency release goes through job_deps.
CREATE INDEX jobs_waiting_idx ON pgsched.jobs (queue) WHERE state = 'waiting';
-- Finished rows: pruning by queue and age, and "failed in the last hour".
CREATE INDEX jobs_finished_idx ON pgsched.jobs (queue, state, finished_at) WHERE finished_at IS NOT NULL;
-- One live job per dedupe key; a finished job frees its key.
CREATE UNIQUE INDEX jobs_dedupe_key_live ON pgsched.jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('waiting', 'scheduled', 'queued', 'running');
-- A schedule slot fires at most once: the materializer inserts with
-- ON CONFLICT (schedule_id, slot) WHERE schedule_id IS NOT NULL DO NOTHING.
CREATE UNIQUE INDEX jobs_schedule_slot ON pgsched.jobs (schedule_id, slot) WHERE schedule_id IS NOT NULL;
CREATE INDEX jobs_workflow_idx ON pgsched.jobs (workflow_id) WHERE workflow_id IS NOT NULL;

COMMENT ON TABLE pgsched.jobs IS 'One row per execution unit. Enqueue with INSERT (task, args) or pgsched.enqueue(...)';
COMMENT ON COLUMN pgsched.jobs.id IS 'Job id, increasing in enqueue order';
COMMENT ON COLUMN pgsched.jobs.created_at IS 'When the job was enqueued (pgsched.now())';
COMMENT ON COLUMN pgsched.jobs.started_at IS 'When the last attempt started';
COMMENT ON COLUMN pgsched.jobs.finished_at IS 'When the job reached a terminal state';
COMMENT ON COLUMN pgsched.jobs.queue IS 'Queue the job waits in; workers claim from the queues they serve';
COMMENT ON COLUMN pgsched.jobs.task IS 'Registered task name, or an executor kind: shell, http';
COMMENT ON COLUMN pgsched.jobs.args IS 'Arguments of the task: a JSON object of at most 1 MiB';
COMMENT ON COLUMN pgsched.jobs.priority IS 'From -100 to 100; higher runs first';
COMMENT ON COLUMN pgsched.jobs.state IS 'waiting, scheduled, queued, running, succeeded, failed or cancelled (terminal: the last three)';
COMMENT ON COLUMN pgsched.jobs.run_at IS 'Earliest start; a future run_at makes an inserted job scheduled';
COMMENT ON COLUMN pgsched.jobs.attempts IS 'Attempts started so far (a claim counts one)';
COMMENT ON COLUMN pgsched.jobs.max_attempts IS 'After this many failed attempts the job is failed (dead letter)';
COMMENT ON COLUMN pgsched.jobs.timeout_seconds IS 'Per-job timeout; NULL uses the task''s';
COMMENT ON COLUMN pgsched.jobs.lease_expires_at IS 'While running: the claim holds until then unless the worker heartbeats';
COMMENT ON COLUMN pgsched.jobs.worker_id IS 'While running: the worker holding the lease';
COMMENT ON COLUMN pgsched.jobs.dedupe_key IS 'At most one live (non-terminal) job per key';
COMMENT ON COLUMN pgsched.jobs.owner IS 'Tenant the job belongs to; the API shows a member only their own';
COMMENT ON COLUMN pgsched.jobs.schedule_id IS 'Schedule that produced the job, if any';
COMMENT ON COLUMN pgsched.jobs.slot IS 'The schedule slot (UTC instant) the job was produced for; unique per schedule';
COMMENT ON COLUMN pgsched.jobs.workflow_id IS 'Workflow the job was added to, if any';
COMMENT ON COLUMN pgsched.jobs.concurrency_key IS 'Jobs sharing a key are capped together by max_per_key';
COMMENT ON COLUMN pgsched.jobs.run_on_upstream_failure IS 'Run even when a dependency failed or was cancelled';
COMMENT ON COLUMN pgsched.jobs.result IS 'Return value of the last successful attempt (JSON)';
COMMENT ON COLUMN pgsched.jobs.error IS 'Error of the last failed attempt, or why the job was cancelled';
COMMENT ON COLUMN pgsched.jobs.progress IS 'Checkpoint written by the task; kept across attempts';
COMMENT ON COLUMN pgsched.jobs.cancel_requested_at IS 'Set when a running job is asked to stop; its worker ends it cancelled';
COMMENT ON COLUMN pgsched.jobs.created_by IS 'Database role that created the job; shell and http jobs need one allowed to';

CREATE TABLE pgsched.job_deps (
    job_id     bigint NOT NULL REFERENCES pgsched.jobs (id) ON DELETE CASCADE,
    depends_on bigint NOT NULL REFERENCES pgsched.jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, depends_on),
    CONSTRAINT job_deps_not_self CHECK (job_id <> depends_on)
);
CREATE INDEX job_deps_depends_on_idx ON pgsched.job_deps (depends_on);
COMMENT ON TABLE pgsched.job_deps IS 'Edges of the dependency graph: job_id waits for depends_on';
COMMENT ON COLUMN pgsched.job_deps.job_id IS 'The dependent job';
COMMENT ON COLUMN pgsched.job_deps.depends_on IS 'The job it waits for';

-- ---------------------------------------------------------------------------
-- Workers and history
-- ---------------------------------------------------------------------------
CREATE TABLE pgsched.workers (
    id             uuid PRIMARY KEY,
    host           text NOT NULL,
    pid            integer NOT NULL,
    queues         text[] NOT NULL,
    tasks          text[] NOT NULL DEFAULT '{}',
    concurrency    integer NOT NULL,
    with_scheduler boolean NOT NULL DEFAULT false,
    version        text,
    started_at     timestamptz NOT NULL DEFAULT pgsched.now(),
    heartbeat_at   timestamptz NOT NULL DEFAULT pgsched.now(),
    expires_at     timestamptz NOT NULL,
    CONSTRAINT workers_concurrency_positive CHECK (concurrency >= 1)
);
COMMENT ON TABLE pgsched.workers IS 'One row per live worker process, refreshed by its heartbeat';
COMMENT ON COLUMN pgsched.workers.id IS 'Worker id, chosen by the worker at start';
COMMENT ON COLUMN pgsched.workers.host IS 'Host name the worker runs on';
COMMENT ON COLUMN pgsched.workers.pid IS 'Process id of the worker on its host';
COMMENT ON COLUMN pgsched.workers.concurrency IS 'Jobs the worker runs at once';
COMMENT ON COLUMN pgsched.workers.queues IS 'Queues the worker claims from';
COMMENT ON COLUMN pgsched.workers.tasks IS 'Task names (and enabled executor kinds) the worker can run';
COMMENT ON COLUMN pgsched.workers.heartbeat_at IS 'Last heartbeat';
COMMENT ON COLUMN pgsched.workers.expires_at IS 'The worker counts as dead after this instant without a heartbeat';

-- History is append-only and partitioned by day, so pruning it is a
-- partition drop, never a long DELETE. No foreign key to jobs: pruning jobs
-- must stay cheap. A default partition catches rows for days whose partition
-- was not created ahead (the scheduler creates them; see below).
CREATE SEQUENCE pgsched.runs_id_seq AS bigint;
CREATE TABLE pgsched.runs (
    id          bigint NOT NULL DEFAULT nextval('pgsched.runs_id_seq'),
    job_id      bigint NOT NULL,
    attempt     integer NOT NULL,
    queue       text NOT NULL,
    task        text NOT NULL,
    owner       text,
    worker_id   uuid,
    outcome     text NOT NULL,
    error       text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    duration_ms double precision GENERATED ALWAYS AS (extract(epoch FROM finished_at - started_at) * 1000) STORED,
    PRIMARY KEY (id, started_at),
    CONSTRAINT runs_outcome_valid CHECK (outcome IN ('succeeded', 'failed', 'timeout', 'cancelled', 'lease_expired', 'fenced', 'snoozed', 'interrupted')),
    CONSTRAINT runs_error_size CHECK (error IS NULL OR octet_length(error) <= 65536)
) PARTITION BY RANGE (started_at);
ALTER SEQUENCE pgsched.runs_id_seq OWNED BY pgsched.runs.id;
CREATE INDEX runs_job_idx ON pgsched.runs (job_id);
CREATE INDEX runs_queue_started_idx ON pgsched.runs (queue, started_at);
CREATE TABLE pgsched.runs_default PARTITION OF pgsched.runs DEFAULT;
COMMENT ON TABLE pgsched.runs IS 'One row per attempt of a job; append-only, partitioned by day of started_at';
COMMENT ON COLUMN pgsched.runs.job_id IS 'The job of this attempt (no foreign key: jobs are pruned independently)';
COMMENT ON COLUMN pgsched.runs.started_at IS 'When the attempt started';
COMMENT ON COLUMN pgsched.runs.finished_at IS 'When the attempt ended';
COMMENT ON COLUMN pgsched.runs.attempt IS 'The job''s attempts value during this attempt';
COMMENT ON COLUMN pgsched.runs.outcome IS 'succeeded, failed, timeout, cancelled, lease_expired, fenced, snoozed or interrupted';
COMMENT ON COLUMN pgsched.runs.error IS 'Error with traceback, for outcomes other than succeeded';
COMMENT ON COLUMN pgsched.runs.worker_id IS 'Worker that ran the attempt';

CREATE TABLE pgsched.run_logs (
    job_id    bigint NOT NULL,
    attempt   integer NOT NULL,
    logged_at timestamptz NOT NULL DEFAULT pgsched.now(),
    stream    text NOT NULL DEFAULT 'log',
    level     text,
    message   text NOT NULL,
    CONSTRAINT run_logs_stream_valid CHECK (stream IN ('log', 'stdout', 'stderr', 'system')),
    CONSTRAINT run_logs_message_size CHECK (octet_length(message) <= 65536)
) PARTITION BY RANGE (logged_at);
CREATE INDEX run_logs_job_idx ON pgsched.run_logs (job_id, attempt, logged_at);
CREATE TABLE pgsched.run_logs_default PARTITION OF pgsched.run_logs DEFAULT;
COMMENT ON TABLE pgsched.run_logs IS 'Log lines of runs: ctx.log, logging inside tasks, shell stdout/stderr; capped per run';
COMMENT ON COLUMN pgsched.run_logs.job_id IS 'The job whose attempt wrote the line';
COMMENT ON COLUMN pgsched.run_logs.attempt IS 'The attempt that wrote the line';
COMMENT ON COLUMN pgsched.run_logs.message IS 'The line, at most 64 KiB; a run''s lines are capped in total with a truncation marker';
COMMENT ON COLUMN pgsched.run_logs.stream IS 'log (ctx.log and logging), stdout, stderr, or system (pgsched''s own notes such as truncation)';

-- Creates the daily partitions of runs and run_logs from yesterday to
-- days_ahead days ahead (UTC days); returns how many it created. The
-- scheduler calls it every pass; it is SECURITY DEFINER because only the
-- owner of a table may add partitions to it. A day whose rows already sit in
-- the default partition is skipped with a warning instead of failing.
CREATE FUNCTION pgsched.ensure_history_partitions(days_ahead integer DEFAULT 7) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsched AS $$
DECLARE
    day date;
    parent text;
    child text;
    created integer := 0;
BEGIN
    FOR day IN
        SELECT d::date FROM generate_series((pgsched.now() AT TIME ZONE 'UTC')::date - 1,
                                             (pgsched.now() AT TIME ZONE 'UTC')::date + days_ahead,
                                             interval '1 day') AS d
    LOOP
        FOREACH parent IN ARRAY ARRAY['runs', 'run_logs'] LOOP
            child := parent || '_' || to_char(day, 'YYYYMMDD');
            CONTINUE WHEN to_regclass('pgsched.' || child) IS NOT NULL;
            BEGIN
                EXECUTE format('CREATE TABLE pgsched.%I PARTITION OF pgsched.%I FOR VALUES FROM (%L) TO (%L)',
                               child, parent,
                               day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
                created := created + 1;
            EXCEPTION WHEN check_violation THEN
                RAISE WARNING 'pgsched: rows for % already sit in %_default; partition % not created', day, parent, child;
            END;
        END LOOP;
    END LOOP;
    RETURN created;
END
$$;
COMMENT ON FUNCTION pgsched.ensure_history_partitions(integer) IS
    'Creates the daily partitions of runs and run_logs from yesterday to days_ahead days ahead';
SELECT pgsched.ensure_history_partitions(7);

-- ---------------------------------------------------------------------------
-- Users, tokens, audit, outbox
-- ---------------------------------------------------------------------------
CREATE TABLE pgsched.users (
    id            bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    username      text NOT NULL,
    email         text,
    display_name  text,
    password_hash text,
    role          text NOT NULL DEFAULT 'member',
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT pgsched.now(),
    updated_at    timestamptz NOT NULL DEFAULT pgsched.now(),
    last_login_at timestamptz,
    CONSTRAINT users_username_unique UNIQUE (username),
    CONSTRAINT users_username_format CHECK (username ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$'),
    CONSTRAINT users_role_valid CHECK (role IN ('admin', 'operator', 'member', 'viewer'))
);
COMMENT ON TABLE pgsched.users IS 'People and service accounts of the API and dashboard';
COMMENT ON COLUMN pgsched.users.username IS 'Login name; also the owner value of the jobs and schedules the user creates';
COMMENT ON COLUMN pgsched.users.password_hash IS 'Argon2 hash of the password; NULL for token-only accounts';
COMMENT ON COLUMN pgsched.users.role IS 'admin (everything), operator (all jobs, queues, workers), member (own rows), viewer (read own)';

CREATE TABLE pgsched.api_tokens (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES pgsched.users (id) ON DELETE CASCADE,
    name         text NOT NULL,
    token_hash   bytea NOT NULL,
    prefix       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT pgsched.now(),
    last_used_at timestamptz,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    CONSTRAINT api_tokens_hash_unique UNIQUE (token_hash),
    CONSTRAINT api_tokens_hash_sha256 CHECK (octet_length(token_hash) = 32),
    CONSTRAINT api_tokens_name_length CHECK (length(name) BETWEEN 1 AND 200)
);
CREATE INDEX api_tokens_user_idx ON pgsched.api_tokens (user_id);
COMMENT ON TABLE pgsched.api_tokens IS 'Bearer tokens (pgs_ + 32 random bytes); only their SHA-256 is stored';
COMMENT ON COLUMN pgsched.api_tokens.user_id IS 'The user the token acts as';
COMMENT ON COLUMN pgsched.api_tokens.expires_at IS 'The token is refused after this instant (NULL: never)';
COMMENT ON COLUMN pgsched.api_tokens.revoked_at IS 'Set when the token was revoked; it is refused from then on';
COMMENT ON COLUMN pgsched.api_tokens.token_hash IS 'SHA-256 of the token; the token itself is shown once and never stored';
COMMENT ON COLUMN pgsched.api_tokens.prefix IS 'First characters of the token, so people can tell their tokens apart';

CREATE TABLE pgsched.audit_log (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT pgsched.now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text,
    before      jsonb,
    after       jsonb
);
CREATE INDEX audit_log_at_idx ON pgsched.audit_log (at);
CREATE INDEX audit_log_target_idx ON pgsched.audit_log (target_type, target_id);
COMMENT ON TABLE pgsched.audit_log IS 'Every change made through the API or CLI: who, what, when, before and after';
COMMENT ON COLUMN pgsched.audit_log.at IS 'When the change was made';
COMMENT ON COLUMN pgsched.audit_log.before IS 'The object before the change (NULL for a creation)';
COMMENT ON COLUMN pgsched.audit_log.after IS 'The object after the change (NULL for a deletion)';
COMMENT ON COLUMN pgsched.audit_log.actor IS 'User name, or the database role for changes outside the API';
COMMENT ON COLUMN pgsched.audit_log.action IS 'What was done, such as job.cancel or schedule.pause';

CREATE TABLE pgsched.outbox (
    id               bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    channel          text NOT NULL,
    destination      text NOT NULL,
    event            text NOT NULL,
    payload          jsonb NOT NULL,
    job_id           bigint,
    owner            text,
    state            text NOT NULL DEFAULT 'pending',
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 10,
    next_attempt_at  timestamptz NOT NULL DEFAULT pgsched.now(),
    lease_expires_at timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT pgsched.now(),
    delivered_at     timestamptz,
    CONSTRAINT outbox_channel_valid CHECK (channel IN ('webhook', 'email', 'slack')),
    CONSTRAINT outbox_state_valid CHECK (state IN ('pending', 'delivering', 'delivered', 'failed')),
    CONSTRAINT outbox_max_attempts_positive CHECK (max_attempts >= 1)
);
CREATE INDEX outbox_pending_idx ON pgsched.outbox (next_attempt_at) WHERE state = 'pending';
COMMENT ON TABLE pgsched.outbox IS 'Notifications to deliver, written in the transaction of the state change; claimed with SKIP LOCKED';
COMMENT ON COLUMN pgsched.outbox.event IS 'What happened: job.failed, job.dead, job.succeeded, queue.backlog';
COMMENT ON COLUMN pgsched.outbox.payload IS 'The message body to deliver';
COMMENT ON COLUMN pgsched.outbox.next_attempt_at IS 'When the dispatcher may next try to deliver';
COMMENT ON COLUMN pgsched.outbox.channel IS 'webhook, email or slack';
COMMENT ON COLUMN pgsched.outbox.destination IS 'URL or e-mail address';
COMMENT ON COLUMN pgsched.outbox.state IS 'pending, delivering, delivered or failed';

-- ---------------------------------------------------------------------------
-- Triggers on jobs
-- ---------------------------------------------------------------------------

-- A job inserted with a future run_at waits as scheduled, not queued. The
-- WHEN clause keeps the common case (due now) free of any function call.
CREATE FUNCTION pgsched.schedule_future_job() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.state := 'scheduled';
    RETURN NEW;
END
$$;
CREATE TRIGGER jobs_schedule_future BEFORE INSERT ON pgsched.jobs
    FOR EACH ROW WHEN (NEW.state = 'queued' AND NEW.run_at > pgsched.now())
    EXECUTE FUNCTION pgsched.schedule_future_job();

-- Who may create jobs that run commands or reach the network.
CREATE FUNCTION pgsched.may_create_command_jobs(role_name name) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.pg_has_role(role_name, 'pgsched_admin', 'MEMBER')
$$;
COMMENT ON FUNCTION pgsched.may_create_command_jobs(name) IS
    'True for roles allowed to create shell and http jobs: members of pgsched_admin and superusers';

CREATE FUNCTION pgsched.guard_command_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pgsched.may_create_command_jobs(current_user) THEN
        RAISE EXCEPTION 'role "%" may not create % jobs', current_user, NEW.task
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'shell and http jobs need a member of pgsched_admin';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER jobs_guard_commands BEFORE INSERT OR UPDATE OF task ON pgsched.jobs
    FOR EACH ROW WHEN (NEW.task IN ('shell', 'http'))
    EXECUTE FUNCTION pgsched.guard_command_jobs();

-- One NOTIFY per queue per statement, so a 10,000-row insert wakes workers
-- once. Skipped while the notification queue is more than half full:
-- polling is the guarantee, NOTIFY only the shortcut.
CREATE FUNCTION pgsched.notify_inserted_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_catalog.pg_notification_queue_usage() <= 0.5 THEN
        PERFORM pg_catalog.pg_notify('pgsched_wakeup', q.queue)
        FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'queued') AS q;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify_insert AFTER INSERT ON pgsched.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION pgsched.notify_inserted_jobs();

-- ---------------------------------------------------------------------------
-- pgsched.enqueue: the full-option enqueue for any language. Options left
-- NULL take the task's defaults from the catalog, then the table's.
-- SECURITY DEFINER so that pgsched_enqueuer needs no SELECT on jobs to get
-- the row back; for the same reason the shell/http guard here checks the
-- login role (session_user), while the trigger checks current_user.
-- ---------------------------------------------------------------------------
CREATE FUNCTION pgsched.enqueue(
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
        -- FOR SHARE serializes with a concurrent completion of a dependency:
        -- either we see its final state, or its release step sees this job.
        SELECT array_agg(j.state) INTO dep_states
        FROM (SELECT s.state FROM pgsched.jobs s WHERE s.id = ANY (deps) ORDER BY s.id FOR SHARE) AS j;
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
COMMENT ON FUNCTION pgsched.enqueue(text, jsonb, text, integer, timestamptz, integer, text, bigint[], text, interval,
                                    double precision, uuid, text, boolean) IS
    'Enqueues one job with every option and returns its row; NULL options take the task''s catalog defaults';

-- ---------------------------------------------------------------------------
-- pgsched.cancel and pgsched.retry: the one implementation of both, used by
-- the Python client, the CLI and the API. Errors carry their own SQLSTATEs:
--   PGS04  no job has this id
--   PGS09  the job's state does not allow the operation
-- ---------------------------------------------------------------------------

-- A job that is not running is cancelled at once. A running job is only
-- marked (cancel_requested_at) and its worker told on pgsched_cancel: the
-- worker stops the execution and ends the attempt as cancelled, so the
-- attempt's history stays the worker's to write. Cancelling a cancelled job
-- returns it unchanged; a succeeded or failed job cannot be cancelled.
CREATE FUNCTION pgsched.cancel(job_id bigint, reason text DEFAULT NULL) RETURNS pgsched.jobs
LANGUAGE plpgsql AS $$
DECLARE
    job pgsched.jobs;
BEGIN
    SELECT * INTO job FROM pgsched.jobs j WHERE j.id = job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job % does not exist', job_id USING ERRCODE = 'PGS04';
    END IF;
    IF job.state = 'cancelled' OR (job.state = 'running' AND job.cancel_requested_at IS NOT NULL) THEN
        RETURN job;
    ELSIF job.state IN ('succeeded', 'failed') THEN
        RAISE EXCEPTION 'job % already %; only unfinished jobs can be cancelled', job_id, job.state
            USING ERRCODE = 'PGS09';
    ELSIF job.state = 'running' THEN
        UPDATE pgsched.jobs j SET cancel_requested_at = pgsched.now(), error = COALESCE(reason, 'cancelled')
        WHERE j.id = job_id RETURNING j.* INTO job;
        PERFORM pg_catalog.pg_notify('pgsched_cancel', job_id::text);
    ELSE
        UPDATE pgsched.jobs j
        SET state = 'cancelled', finished_at = pgsched.now(), error = COALESCE(reason, 'cancelled')
        WHERE j.id = job_id RETURNING j.* INTO job;
    END IF;
    RETURN job;
END
$$;
COMMENT ON FUNCTION pgsched.cancel(bigint, text) IS
    'Cancels an unfinished job; a running one is asked to stop and its worker ends it cancelled';

-- A failed, cancelled or succeeded job runs again now, with at least one
-- attempt left; a scheduled job (waiting for its retry or its run_at) runs
-- now. A queued job is returned unchanged; running and waiting jobs cannot
-- be retried.
CREATE FUNCTION pgsched.retry(job_id bigint) RETURNS pgsched.jobs
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
        finished_at = NULL, cancel_requested_at = NULL, worker_id = NULL, lease_expires_at = NULL
    WHERE j.id = job_id RETURNING j.* INTO job;
    PERFORM pg_catalog.pg_notify('pgsched_wakeup', job.queue);
    RETURN job;
END
$$;
COMMENT ON FUNCTION pgsched.retry(bigint) IS
    'Runs a failed, cancelled, succeeded or scheduled job again now';

-- ---------------------------------------------------------------------------
-- Monitoring views: the single source for the API, autoscaler, exporter and
-- Grafana. Each count reads one partial index.
-- ---------------------------------------------------------------------------
CREATE VIEW pgsched.worker_status AS
SELECT w.id, w.host, w.pid, w.queues, w.tasks, w.concurrency, w.with_scheduler, w.version,
       w.started_at, w.heartbeat_at, w.expires_at,
       w.expires_at > pgsched.now() AS alive,
       (SELECT count(*) FROM pgsched.jobs j WHERE j.state = 'running' AND j.worker_id = w.id) AS running
FROM pgsched.workers w;
COMMENT ON VIEW pgsched.worker_status IS 'Workers with liveness (alive: heartbeat not expired) and their running job count';

CREATE VIEW pgsched.queue_stats AS
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
                      WHERE w.expires_at > pgsched.now() AND q.queue = ANY (w.queues) AND q.task = ANY (w.tasks))
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
       COALESCE(extract(epoch FROM pgsched.now()
                        - (SELECT oldest_run_at FROM live WHERE live.queue = names.queue AND state = 'queued')), 0)
           ::double precision AS oldest_queued_age_seconds,
       COALESCE((SELECT failed FROM recent WHERE recent.queue = names.queue), 0) AS failed_last_hour,
       COALESCE((SELECT succeeded FROM recent WHERE recent.queue = names.queue), 0) AS succeeded_last_hour
FROM names
LEFT JOIN pgsched.queues settings ON settings.name = names.queue;
COMMENT ON VIEW pgsched.queue_stats IS
    'Per queue: jobs by live state, unroutable queued jobs, age of the oldest queued job, failures and successes in the last hour';

-- ---------------------------------------------------------------------------
-- Privileges. Functions are executable by PUBLIC by default; take that back
-- and grant each group what it needs, nothing more.
-- ---------------------------------------------------------------------------
REVOKE ALL ON SCHEMA pgsched FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgsched FROM PUBLIC;
GRANT USAGE ON SCHEMA pgsched TO pgsched_enqueuer, pgsched_reader, pgsched_worker, pgsched_admin;
-- Column defaults call pgsched.now(); whoever may insert must be able to run it.
GRANT EXECUTE ON FUNCTION pgsched.now() TO pgsched_enqueuer, pgsched_reader, pgsched_worker, pgsched_admin;
GRANT EXECUTE ON FUNCTION pgsched.may_create_command_jobs(name) TO pgsched_enqueuer, pgsched_worker, pgsched_admin;

-- Enqueuer: insert jobs (not their state, result or creator), call enqueue,
-- read back the id it got. Nothing else.
-- id and the sequence: the bulk path (COPY) allocates ids ahead to return them.
GRANT INSERT (id, task, args, queue, priority, run_at, max_attempts, timeout_seconds, dedupe_key, owner,
              workflow_id, concurrency_key, run_on_upstream_failure)
    ON pgsched.jobs TO pgsched_enqueuer;
GRANT SELECT (id) ON pgsched.jobs TO pgsched_enqueuer;
GRANT USAGE ON SEQUENCE pgsched.jobs_id_seq TO pgsched_enqueuer;
-- Clients check the schema version and validate task names first.
GRANT SELECT ON pgsched.schema_migrations, pgsched.tasks TO pgsched_enqueuer, pgsched_reader;
GRANT EXECUTE ON FUNCTION pgsched.enqueue(text, jsonb, text, integer, timestamptz, integer, text, bigint[], text,
                                          interval, double precision, uuid, text, boolean)
    TO pgsched_enqueuer, pgsched_worker, pgsched_admin;

-- Reader: the monitoring views only.
GRANT SELECT ON pgsched.queue_stats, pgsched.worker_status TO pgsched_reader;

-- Worker (and scheduler): the runtime tables, not users, tokens or audit.
GRANT SELECT, INSERT, UPDATE, DELETE ON pgsched.jobs, pgsched.job_deps, pgsched.workers, pgsched.outbox
    TO pgsched_worker;
GRANT SELECT, INSERT, DELETE ON pgsched.runs, pgsched.run_logs TO pgsched_worker;
GRANT SELECT, INSERT, UPDATE ON pgsched.tasks, pgsched.schedules TO pgsched_worker;
GRANT SELECT ON pgsched.queues, pgsched.schema_migrations, pgsched.queue_stats, pgsched.worker_status
    TO pgsched_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgsched TO pgsched_worker;
GRANT EXECUTE ON FUNCTION pgsched.ensure_history_partitions(integer) TO pgsched_worker, pgsched_admin;
GRANT EXECUTE ON FUNCTION pgsched.cancel(bigint, text), pgsched.retry(bigint) TO pgsched_worker, pgsched_admin;

-- Admin: everything in the schema, and the powers of the other groups.
GRANT ALL ON ALL TABLES IN SCHEMA pgsched TO pgsched_admin;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pgsched TO pgsched_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgsched TO pgsched_admin;
DO $$
BEGIN
    GRANT pgsched_enqueuer, pgsched_reader, pgsched_worker TO pgsched_admin;
EXCEPTION WHEN insufficient_privilege OR invalid_grant_operation THEN
    RAISE WARNING 'pgsched: could not make pgsched_admin a member of the other pgsched roles';
END
$$;
