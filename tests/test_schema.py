"""The schema and the SQL API, exercised as another application would: plain SQL and psql."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsched import embedded

from .conftest import worker_incarnation

pytestmark = pytest.mark.db

# DESIGN §3 names these columns; each must carry a COMMENT ON.
CONTRACT_COLUMNS = {
    "jobs": "id queue task args priority state run_at attempts max_attempts worker_id "
    "dedupe_key owner schedule_id workflow_id result error progress created_at started_at finished_at",
    "job_deps": "job_id depends_on",
    "tasks": "name queue options parameters last_seen_at",
    "schedules": "name task cron every timezone next_run_at paused misfire_policy overlap_policy",
    "workers": "id host pid queues concurrency heartbeat_at",
    "runs": "job_id attempt started_at finished_at outcome error worker_id",
    "run_logs": "job_id attempt stream message",
    "queues": "name paused max_running rate_limit",
    "users": "username password_hash role",
    "api_tokens": "user_id token_hash prefix expires_at revoked_at",
    "audit_log": "at actor action before after",
    "outbox": "channel destination event payload state next_attempt_at",
}


def psql(dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
    """Run SQL through the psql of the embedded wheel, as a user at a terminal would."""
    return subprocess.run(
        [str(embedded.bin_dir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params or None).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def test_every_table_of_the_design_exists_with_commented_contract_columns(conn: psycopg.Connection[Any]) -> None:
    for table, columns in CONTRACT_COLUMNS.items():
        assert one(conn, "SELECT obj_description(%s::regclass)", f"pgsched.{table}"), table
        for column in columns.split():
            comment = one(
                conn,
                """SELECT col_description(c.oid, a.attnum) FROM pg_class c
                   JOIN pg_attribute a ON a.attrelid = c.oid
                   WHERE c.oid = %s::regclass AND a.attname = %s""",
                f"pgsched.{table}",
                column,
            )
            assert comment, f"pgsched.{table}.{column} has no comment"


def test_named_checks_and_keys(conn: psycopg.Connection[Any]) -> None:
    names = {
        n for (n,) in conn.execute("SELECT conname FROM pg_constraint WHERE connamespace = 'pgsched'::regnamespace")
    }
    for name in (
        "jobs_state_valid",
        "jobs_priority_range",
        "jobs_max_attempts_positive",
        "jobs_args_object",
        "jobs_args_size",
        "schedules_misfire_policy_valid",
        "users_role_valid",
    ):
        assert name in names
    indexes = dict(conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgsched'").fetchall())
    assert "WHERE (state = 'queued'::text)" in indexes["jobs_claim_idx"]
    assert "UNIQUE" in indexes["jobs_dedupe_key_live"]
    assert "UNIQUE" in indexes["jobs_schedule_slot"] and "(schedule_id, slot)" in indexes["jobs_schedule_slot"]


def test_plain_insert_takes_the_defaults(conn: psycopg.Connection[Any]) -> None:
    job_id = one(
        conn, "INSERT INTO pgsched.jobs (task, args) VALUES ('send_report', '{\"day\": \"2026-11-22\"}') RETURNING id"
    )
    row = conn.execute(
        "SELECT queue, priority, state, attempts, max_attempts, created_by, run_at <= pgsched.now() "
        "FROM pgsched.jobs WHERE id = %s",
        (job_id,),
    ).fetchone()
    assert row == ("default", 0, "queued", 0, 5, one(conn, "SELECT current_user"), True)


def test_future_run_at_lands_in_scheduled(conn: psycopg.Connection[Any]) -> None:
    states = conn.execute(
        """INSERT INTO pgsched.jobs (task, run_at)
           VALUES ('a', pgsched.now() + interval '1 hour'), ('b', pgsched.now() - interval '1 hour'), ('c', DEFAULT)
           RETURNING task, state"""
    ).fetchall()
    assert dict(states) == {"a": "scheduled", "b": "queued", "c": "queued"}


def test_test_clock_offset_moves_pgsched_now(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET pgsched.clock_offset = '10 minutes'")
    assert one(conn, "SELECT pgsched.now() - now()") == timedelta(minutes=10)
    conn.execute("RESET pgsched.clock_offset")
    assert one(conn, "SELECT pgsched.now() - now()") == timedelta(0)


def test_enqueue_function_takes_every_option(dsn: str, conn: psycopg.Connection[Any]) -> None:
    dep = one(conn, "INSERT INTO pgsched.jobs (task) VALUES ('extract') RETURNING id")
    out = psql(
        dsn,
        f"""SELECT id, queue, priority, state, max_attempts, dedupe_key, owner, timeout_seconds, concurrency_key
            FROM pgsched.enqueue('load', '{{"day": "2026-11-22"}}', queue => 'etl', priority => 7,
                 run_at => now() + interval '1 day', max_attempts => 9, dedupe_key => 'load-2026-11-22',
                 depends_on => ARRAY[{dep}], owner => 'team-a', timeout_seconds => 30, concurrency_key => 'k');""",
    )
    assert out.returncode == 0, out.stderr
    job_id, *rest = out.stdout.strip().split("|")
    assert rest == ["etl", "7", "waiting", "9", "load-2026-11-22", "team-a", "30", "k"]
    assert one(conn, "SELECT depends_on FROM pgsched.job_deps WHERE job_id = %s", int(job_id)) == dep
    assert one(conn, "SELECT created_by FROM pgsched.jobs WHERE id = %s", int(job_id)) == one(
        conn, "SELECT current_user"
    )


def test_enqueue_function_uses_the_catalog_defaults(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """INSERT INTO pgsched.tasks (name, queue, options)
           VALUES ('send_report', 'reports', '{"priority": 4, "max_attempts": 2, "timeout": 60}')"""
    )
    row = conn.execute(
        "SELECT queue, priority, max_attempts, timeout_seconds FROM pgsched.enqueue('send_report')"
    ).fetchone()
    assert row == ("reports", 4, 2, 60.0)
    row = conn.execute(
        "SELECT queue, priority FROM pgsched.enqueue('send_report', queue => 'other', priority => -3)"
    ).fetchone()
    assert row == ("other", -3)
    assert one(conn, "SELECT state FROM pgsched.enqueue('x', delay => interval '5 minutes')") == "scheduled"


def test_enqueue_function_initial_state_follows_dependencies(conn: psycopg.Connection[Any]) -> None:
    ids = {}
    for state in ("queued", "succeeded", "failed"):
        ids[state] = one(
            conn,
            "INSERT INTO pgsched.jobs (task, state, finished_at) VALUES ('d', %s, CASE WHEN %s <> 'queued' THEN now() END) RETURNING id",
            state,
            state,
        )

    def state_after(deps: list[int], **extra: Any) -> tuple[str, str | None]:
        flag = ", run_on_upstream_failure => true" if extra.get("upstream_ok") else ""
        return conn.execute(
            f"SELECT state, error FROM pgsched.enqueue('x', depends_on => %s{flag})", (deps,)
        ).fetchone()

    assert state_after([ids["queued"]])[0] == "waiting"
    assert state_after([ids["succeeded"]])[0] == "queued"
    state, error = state_after([ids["succeeded"], ids["failed"]])
    assert state == "cancelled" and error.startswith("upstream")
    assert state_after([ids["failed"]], upstream_ok=True)[0] == "queued"
    assert state_after([ids["failed"], ids["queued"]], upstream_ok=True)[0] == "waiting"
    before = one(conn, "SELECT count(*) FROM pgsched.jobs")
    with pytest.raises(psycopg.errors.ForeignKeyViolation) as caught:
        state_after([ids["queued"], 987654321])
    assert caught.value.diag.constraint_name == "job_deps_depends_on_fkey"
    assert one(conn, "SELECT count(*) FROM pgsched.jobs") == before


def test_dedupe_key_is_unique_among_live_jobs_only(conn: psycopg.Connection[Any]) -> None:
    first = one(conn, "SELECT id FROM pgsched.enqueue('t', dedupe_key => 'k')")
    with pytest.raises(psycopg.errors.UniqueViolation) as caught:
        conn.execute("SELECT pgsched.enqueue('t', dedupe_key => 'k')")
    assert f"existing_id={first}" in caught.value.diag.message_detail
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO pgsched.jobs (task, dedupe_key) VALUES ('t', 'k')")
    conn.execute("UPDATE pgsched.jobs SET state = 'succeeded', finished_at = now() WHERE id = %s", (first,))
    assert one(conn, "SELECT state FROM pgsched.enqueue('t', dedupe_key => 'k')") == "queued"


def test_schedule_slot_fires_at_most_once(conn: psycopg.Connection[Any]) -> None:
    schedule = one(conn, "INSERT INTO pgsched.schedules (name, task, cron) VALUES ('s', 't', '* * * * *') RETURNING id")
    insert = """INSERT INTO pgsched.jobs (task, schedule_id, slot) VALUES ('t', %s, '2026-12-01 09:00+00')
                ON CONFLICT (schedule_id, slot) WHERE schedule_id IS NOT NULL DO NOTHING RETURNING id"""
    assert conn.execute(insert, (schedule,)).fetchone() is not None
    assert conn.execute(insert, (schedule,)).fetchone() is None
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO pgsched.jobs (task, schedule_id, slot) VALUES ('t', %s, '2026-12-01 09:00+00')", (schedule,)
        )


def test_claim_uses_the_partial_index(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        """INSERT INTO pgsched.jobs (task, queue, state, finished_at)
           SELECT 't', 'q' || (i % 3), 'succeeded', now() FROM generate_series(1, 20000) AS i"""
    )
    conn.execute("INSERT INTO pgsched.jobs (task, queue) SELECT 't', 'q1' FROM generate_series(1, 50)")
    conn.execute("ANALYZE pgsched.jobs")
    claim = """EXPLAIN (FORMAT TEXT) SELECT id FROM pgsched.jobs WHERE state = 'queued' AND queue = ANY(%s)
               ORDER BY priority DESC, run_at, id LIMIT 10 FOR UPDATE SKIP LOCKED"""
    for mode in ("auto", "force_generic_plan"):
        conn.execute(f"SET plan_cache_mode = {mode}")
        with conn.transaction():
            plan = "\n".join(r[0] for r in conn.execute(claim, (["q1", "q2"],), prepare=True).fetchall())
        assert "jobs_claim_idx" in plan, plan


def test_one_notify_per_queue_per_statement(dsn: str, conn: psycopg.Connection[Any]) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgsched_wakeup")
        conn.execute(
            """INSERT INTO pgsched.jobs (task, queue, run_at)
               SELECT 't', CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END,
                      CASE WHEN i % 5 = 0 THEN pgsched.now() + interval '1 day' ELSE pgsched.now() END
               FROM generate_series(1, 10000) AS i"""
        )
        conn.execute(
            "INSERT INTO pgsched.jobs (task, queue, run_at) VALUES ('t', 'later', pgsched.now() + interval '1 day')"
        )
        conn.execute("INSERT INTO pgsched.jobs (task, queue) VALUES ('t', 'c')")
        payloads = [n.payload for n in listener.notifies(timeout=2, stop_after=10)]
    assert sorted(payloads) == ["a", "b", "c"]


def test_cancel_and_retry_in_sql(dsn: str, conn: psycopg.Connection[Any]) -> None:
    queued = one(conn, "INSERT INTO pgsched.jobs (task) VALUES ('t') RETURNING id")
    running = one(
        conn,
        """INSERT INTO pgsched.jobs (task, state, attempts, worker_id)
           VALUES ('t', 'running', 1, gen_random_uuid()) RETURNING id""",
    )
    done = one(
        conn, "INSERT INTO pgsched.jobs (task, state, finished_at) VALUES ('t', 'succeeded', now()) RETURNING id"
    )
    failed = one(
        conn,
        "INSERT INTO pgsched.jobs (task, state, attempts, max_attempts, finished_at) VALUES ('t', 'failed', 3, 3, now()) RETURNING id",
    )
    assert conn.execute("SELECT state, error FROM pgsched.cancel(%s, 'not needed')", (queued,)).fetchone() == (
        "cancelled",
        "not needed",
    )
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgsched_cancel")
        listener.execute("LISTEN pgsched_wakeup")
        state, requested = conn.execute(
            "SELECT state, cancel_requested_at FROM pgsched.cancel(%s)", (running,)
        ).fetchone()
        assert state == "running" and requested is not None
        assert conn.execute("SELECT state, max_attempts FROM pgsched.retry(%s)", (failed,)).fetchone() == ("queued", 4)
        notes = [(n.channel, n.payload) for n in listener.notifies(timeout=2, stop_after=2)]
    assert notes == [("pgsched_cancel", str(running)), ("pgsched_wakeup", "default")]
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT pgsched.cancel(%s)", (done,))
    assert caught.value.sqlstate == "PGS09"
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT pgsched.retry(%s)", (running,))
    assert caught.value.sqlstate == "PGS09"
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT pgsched.cancel(987654321)")
    assert caught.value.sqlstate == "PGS04"


def test_views_report_queues_and_workers(conn: psycopg.Connection[Any]) -> None:
    worker = uuid.uuid4()
    conn.execute(
        """INSERT INTO pgsched.workers (id, host, pid, queues, tasks, concurrency, lease_expires_at)
           VALUES (%s, 'h1', 42, '{default}', '{known}', 4, pgsched.now() + interval '30 seconds')""",
        (worker,),
    )
    conn.execute(
        """INSERT INTO pgsched.jobs (task, queue, state, run_at, worker_id, finished_at, attempts) VALUES
           ('known', 'default', 'queued', pgsched.now() - interval '90 seconds', NULL, NULL, 0),
           ('unknown', 'default', 'queued', pgsched.now(), NULL, NULL, 0),
           ('known', 'default', 'running', pgsched.now(), %s, NULL, 1),
           ('known', 'default', 'failed', pgsched.now(), NULL, pgsched.now(), 1),
           ('known', 'default', 'scheduled', pgsched.now() + interval '1 day', NULL, NULL, 0),
           ('known', 'other', 'waiting', pgsched.now(), NULL, NULL, 0)""",
        (worker,),
    )
    stats = {
        r[0]: r
        for r in conn.execute(
            "SELECT queue, waiting, scheduled, queued, running, unroutable, oldest_queued_age_seconds, failed_last_hour "
            "FROM pgsched.queue_stats"
        )
    }
    _queue, waiting, scheduled, queued, running, unroutable, age, failed = stats["default"]
    assert (waiting, scheduled, queued, running, unroutable, failed) == (0, 1, 2, 1, 1, 1)
    assert age >= 90
    assert stats["other"][1] == 1
    alive, running_count = conn.execute(
        "SELECT alive, running FROM pgsched.worker_status WHERE id = %s", (worker,)
    ).fetchone()
    assert alive and running_count == 1
    conn.execute("SET pgsched.clock_offset = '1 minute'")
    assert one(conn, "SELECT alive FROM pgsched.worker_status WHERE id = %s", worker) is False


def test_history_is_partitioned_by_day(conn: psycopg.Connection[Any]) -> None:
    partitions = {
        r[0]
        for r in conn.execute(
            "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'pgsched.runs'::regclass"
        )
    }
    today = one(conn, "SELECT to_char(pgsched.now() AT TIME ZONE 'UTC', 'YYYYMMDD')")
    assert f"pgsched.runs_{today}" in partitions and "pgsched.runs_default" in partitions
    conn.execute(
        """INSERT INTO pgsched.runs (job_id, attempt, queue, task, outcome, started_at, finished_at)
           VALUES (1, 1, 'default', 't', 'succeeded', pgsched.now(), pgsched.now() + interval '5 ms')"""
    )
    assert one(conn, f"SELECT count(*) FROM pgsched.runs_{today}") == 1
    conn.execute("SET pgsched.clock_offset = '40 days'")
    assert one(conn, "SELECT pgsched.ensure_history_partitions(7)") > 0
    assert one(conn, "SELECT pgsched.ensure_history_partitions(7)") == 0


# -- roles ----------------------------------------------------------------------------------------


@pytest.fixture
def login_as(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[Any]:
    """Create a LOGIN role in one pgsched group and give a connection as it (dropped afterwards)."""
    created: list[str] = []
    connections: list[psycopg.Connection[Any]] = []

    def connect(group: str) -> psycopg.Connection[Any]:
        name = f"pgs_{group.removeprefix('pgsched_')}_{uuid.uuid4().hex[:8]}"
        conn.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE {group}')
        created.append(name)
        params = {**conninfo_to_dict(dsn), "user": name}
        params.pop("password", None)
        connection = psycopg.connect(make_conninfo(**params), autocommit=True)
        connections.append(connection)
        return connection

    yield connect
    for connection in connections:
        connection.close()
    for name in created:
        conn.execute(f'DROP ROLE "{name}"')


def refused(connection: psycopg.Connection[Any], sql: str) -> bool:
    try:
        connection.execute(sql)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def test_enqueuer_may_enqueue_and_nothing_else(login_as: Any, conn: psycopg.Connection[Any]) -> None:
    enqueuer = login_as("pgsched_enqueuer")
    job_id = one(enqueuer, "INSERT INTO pgsched.jobs (task, args) VALUES ('send_report', '{}') RETURNING id")
    assert one(enqueuer, "SELECT state FROM pgsched.enqueue('send_report', '{\"a\": 1}')") == "queued"
    assert one(conn, "SELECT created_by FROM pgsched.jobs WHERE id = %s", job_id).startswith("pgs_enqueuer_")
    for sql in (
        "SELECT args FROM pgsched.jobs",
        f"UPDATE pgsched.jobs SET priority = 5 WHERE id = {job_id}",
        "DELETE FROM pgsched.jobs",
        "SELECT * FROM pgsched.queue_stats",
        "SELECT * FROM pgsched.users",
        "INSERT INTO pgsched.jobs (task, state) VALUES ('x', 'succeeded')",
        "INSERT INTO pgsched.jobs (task, created_by) VALUES ('x', 'postgres')",
        f"SELECT pgsched.cancel({job_id})",
    ):
        assert refused(enqueuer, sql), sql


def test_enqueuer_cannot_create_shell_or_http_jobs(login_as: Any, conn: psycopg.Connection[Any]) -> None:
    enqueuer = login_as("pgsched_enqueuer")
    before = one(conn, "SELECT count(*) FROM pgsched.jobs")
    assert refused(enqueuer, """INSERT INTO pgsched.jobs (task, args) VALUES ('shell', '{"cmd": ["id"]}')""")
    assert refused(enqueuer, """SELECT pgsched.enqueue('http', '{"url": "http://example.com"}')""")
    assert refused(enqueuer, """SELECT pgsched.enqueue('shell', '{"cmd": ["id"]}')""")
    assert one(conn, "SELECT count(*) FROM pgsched.jobs") == before
    admin = login_as("pgsched_admin")
    assert one(admin, """SELECT state FROM pgsched.enqueue('shell', '{"cmd": ["true"]}')""") == "queued"


def test_reader_reads_the_views_only(login_as: Any) -> None:
    reader = login_as("pgsched_reader")
    reader.execute("SELECT * FROM pgsched.queue_stats").fetchall()
    reader.execute("SELECT * FROM pgsched.worker_status").fetchall()
    for sql in (
        "SELECT * FROM pgsched.jobs",
        "INSERT INTO pgsched.jobs (task) VALUES ('x')",
        "SELECT * FROM pgsched.runs",
    ):
        assert refused(reader, sql), sql


def test_oldest_queued_age_is_null_when_nothing_is_queued(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.queues (name) VALUES ('idle')")
    conn.execute(
        """INSERT INTO pgsched.jobs (task, queue, run_at) VALUES
           ('t', 'later', pgsched.now() + interval '1 hour'), ('t', 'busy', pgsched.now() - interval '30 seconds')"""
    )
    ages = dict(conn.execute("SELECT queue, oldest_queued_age_seconds FROM pgsched.queue_stats").fetchall())
    assert ages["idle"] is None and ages["later"] is None  # an empty queue has no oldest job, not one of age 0
    assert ages["busy"] >= 30


def test_reader_charts_runs_without_seeing_their_payloads(login_as: Any, conn: psycopg.Connection[Any]) -> None:
    job_id = one(
        conn, """INSERT INTO pgsched.jobs (task, args, owner) VALUES ('t', '{"card": "4111"}', 'alice') RETURNING id"""
    )
    conn.execute(
        """INSERT INTO pgsched.runs (job_id, attempt, queue, task, owner, outcome, error, started_at, finished_at)
           VALUES (%s, 1, 'default', 't', 'alice', 'failed', 'ValueError: card 4111 declined',
                   pgsched.now() - interval '2 seconds', pgsched.now())""",
        (job_id,),
    )
    reader = login_as("pgsched_reader")
    with reader.cursor(row_factory=psycopg.rows.dict_row) as cur:
        (run,) = cur.execute(
            "SELECT * FROM pgsched.run_history WHERE started_at > pgsched.now() - interval '1 hour'"
        ).fetchall()
    assert {k: run[k] for k in ("job_id", "attempt", "queue", "task", "outcome")} == {
        "job_id": job_id,
        "attempt": 1,
        "queue": "default",
        "task": "t",
        "outcome": "failed",
    }
    assert run["duration_ms"] == pytest.approx(2000)
    assert "error" not in run and "owner" not in run and "args" not in run
    for sql in ("SELECT error FROM pgsched.runs", "SELECT * FROM pgsched.run_logs", "SELECT args FROM pgsched.jobs"):
        assert refused(reader, sql), sql


def test_worker_runs_jobs_but_cannot_read_accounts(login_as: Any, conn: psycopg.Connection[Any]) -> None:
    worker = login_as("pgsched_worker")
    job_id = one(worker, "INSERT INTO pgsched.jobs (task) VALUES ('t') RETURNING id")
    worker.execute(
        "UPDATE pgsched.jobs SET state = 'running', worker_id = gen_random_uuid() WHERE id = %s",
        (job_id,),
    )
    worker.execute(
        "INSERT INTO pgsched.runs (job_id, attempt, queue, task, outcome, started_at, finished_at) VALUES (%s, 1, 'default', 't', 'succeeded', now(), now())",
        (job_id,),
    )
    assert one(worker, "SELECT pgsched.ensure_history_partitions(1)") >= 0
    for sql in ("SELECT * FROM pgsched.users", "SELECT * FROM pgsched.api_tokens", "SELECT * FROM pgsched.audit_log"):
        assert refused(worker, sql), sql
    assert refused(worker, """INSERT INTO pgsched.jobs (task, args) VALUES ('shell', '{"cmd": ["id"]}')""")


def test_a_worker_role_claims_from_controlled_queues_but_cannot_change_them(
    login_as: Any, conn: psycopg.Connection[Any]
) -> None:
    from pgsched.worker.queries import CLAIM_CONTROLLED

    conn.execute("INSERT INTO pgsched.tasks (name, options) VALUES ('keyed', '{\"max_per_key\": 1}')")
    conn.execute(
        "INSERT INTO pgsched.queues (name, max_running, rate_limit, rate_period, max_per_key, fair)"
        " VALUES ('q', 5, 10, '1 minute', 2, true)"
    )
    conn.execute(
        "INSERT INTO pgsched.jobs (task, queue, owner, concurrency_key)"
        " SELECT 'keyed', 'q', 'o' || (i % 2), 'k' || (i % 3) FROM generate_series(1, 20) i"
    )
    worker = login_as("pgsched_worker")
    params = {"queues": ["q"], "tasks": ["keyed"], "limit": 10, "worker": worker_incarnation(conn, "1 minute")}
    claimed = [row for row in worker.execute(CLAIM_CONTROLLED, params).fetchall() if row[0] is not None]
    assert len(claimed) == 3  # one per key: the task's max_per_key is below the queue's
    assert one(conn, "SELECT count(*) FROM pgsched.queue_starts WHERE queue = 'q'") == 3
    assert refused(worker, "UPDATE pgsched.queues SET paused = true WHERE name = 'q'")
