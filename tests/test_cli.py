"""The ``pgsched`` command, run as a real subprocess against this test's database.

What a user sees: the job a command writes (read back with SQL), the tables
and JSON it prints, and for bad input a non-zero exit with one line on stderr
that names the field, with nothing written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsched import crypto, migrations

from .conftest import Server, row_counts, wait_until, worker_incarnation
from .processes import PgschedProcess

pytestmark = pytest.mark.process

PGSCHED = [sys.executable, "-m", "pgsched"]


def pgsched(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``pgsched ARGS`` and return what it did (never raises on a non-zero exit)."""
    return subprocess.run([*PGSCHED, *args], env=env, capture_output=True, text=True, timeout=timeout)


def succeeded(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed on stderr (asserting it failed and printed exactly one)."""
    assert result.returncode != 0, f"expected a failure, got exit 0\nstdout: {result.stdout}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return lines[0]


def no_database_env() -> dict[str, str]:
    """This environment without any pgsched setting or DATABASE_URL."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_") and k != "DATABASE_URL"}


def enqueue_json(env: dict[str, str], task: str, *options: str) -> dict[str, Any]:
    return json.loads(succeeded(pgsched(env, "enqueue", task, *options, "--json")).stdout)


def job_row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM pgsched.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None, f"job {job_id} is not in the database"
    return row


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a printed table, split on spaces (so only cells before one holding a space or empty are exact)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    return lines[0].split(), [line.split() for line in lines[1:]]


SHELL_ARGS = json.dumps({"cmd": ["true"]})


@pytest.fixture
def report_task(conn: psycopg.Connection[Any]) -> str:
    """A task known to the catalog, with default queue ``reports``."""
    conn.execute("INSERT INTO pgsched.tasks (name, queue) VALUES ('send_report', 'reports')")
    return "send_report"


@pytest.fixture
def empty_env(empty_dsn: str) -> dict[str, str]:
    """Environment naming a database that has no pgsched schema."""
    return {**no_database_env(), "PGSCHED_DSN": empty_dsn}


# -- enqueue ---------------------------------------------------------------------------------------


def test_enqueue_writes_the_job_with_every_option(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], report_task: str
) -> None:
    upstream = enqueue_json(cli_env, report_task)
    # No --queue/--priority/--max-attempts: the catalog's and the table's defaults.
    assert (upstream["queue"], upstream["priority"], upstream["max_attempts"]) == ("reports", 0, 5)
    assert job_row(conn, upstream["id"])["state"] == "queued"

    run_at = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0).astimezone(timezone(timedelta(hours=2)))
    job = enqueue_json(
        cli_env,
        report_task,
        "--args",
        '{"day": "2026-11-22", "n": 3}',
        "--queue",
        "urgent",
        "--priority",
        "7",
        "--run-at",
        run_at.isoformat(),
        "--max-attempts",
        "3",
        "--dedupe-key",
        "report-2026-11-22",
        "--depends-on",
        str(upstream["id"]),
        "--owner",
        "alice",
        "--timeout",
        "90",
        "--concurrency-key",
        "tenant-alice",
    )
    row = job_row(conn, job["id"])
    assert row["task"] == "send_report"
    assert row["args"] == {"day": "2026-11-22", "n": 3}
    assert row["queue"] == "urgent"
    assert row["priority"] == 7
    assert row["run_at"] == run_at
    assert row["max_attempts"] == 3
    assert row["dedupe_key"] == "report-2026-11-22"
    assert row["owner"] == "alice"
    assert row["timeout_seconds"] == 90
    assert row["concurrency_key"] == "tenant-alice"
    assert row["state"] == "waiting"  # its dependency has not succeeded yet
    deps = conn.execute("SELECT depends_on FROM pgsched.job_deps WHERE job_id = %s", (job["id"],)).fetchall()
    assert deps == [(upstream["id"],)]
    # The printed JSON is the row as written.
    assert job["state"] == "waiting"
    assert datetime.fromisoformat(job["run_at"]) == run_at


def test_enqueue_delay_and_future_run_at_schedule_the_job(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], report_task: str
) -> None:
    delayed = enqueue_json(cli_env, report_task, "--delay", "3600")
    row = job_row(conn, delayed["id"])
    assert row["state"] == "scheduled"
    assert row["run_at"] - row["created_at"] == timedelta(seconds=3600)

    later = datetime.now(UTC) + timedelta(hours=5)
    scheduled = enqueue_json(cli_env, report_task, "--run-at", later.isoformat())
    row = job_row(conn, scheduled["id"])
    assert (row["state"], row["run_at"]) == ("scheduled", later)


def test_enqueue_prints_the_new_job_for_people(cli_env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    out = succeeded(pgsched(cli_env, "enqueue", "shell", "--args", SHELL_ARGS)).stdout
    (job_id,) = [r[0] for r in conn.execute("SELECT id FROM pgsched.jobs").fetchall()]
    assert out.strip() == f"enqueued job {job_id} (shell, queue default, queued)"
    assert job_row(conn, job_id)["args"] == {"cmd": ["true"]}


def test_enqueue_refuses_a_second_live_job_with_the_same_dedupe_key(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], report_task: str
) -> None:
    first = enqueue_json(cli_env, report_task, "--dedupe-key", "nightly")
    before = row_counts(conn)
    line = error_line(pgsched(cli_env, "enqueue", report_task, "--dedupe-key", "nightly"))
    assert "dedupe_key" in line
    assert str(first["id"]) in line
    assert row_counts(conn) == before


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (["send_report", "--args", "[1]"], "args"),
        (["send_report", "--args", "not json"], "args"),
        (["send_report", "--priority", "500"], "priority"),
        (["no_such_task"], "task"),
        (["send_report", "--run-at", "2026-01-01T00:00"], "run_at"),
        (["send_report", "--run-at", "next tuesday"], "run_at"),
        (["send_report", "--depends-on", "999999"], "depends_on"),
        (["send_report", "--max-attempts", "0"], "max_attempts"),
        (["send_report", "--queue", "no spaces"], "queue"),
        (["send_report", "--delay", "-5"], "delay"),
        (["shell", "--args", '{"cmd": "rm -rf /"}'], "args.cmd"),
        (["send_report", "--run-at", "2026-12-01T10:00+02:00", "--delay", "60"], "delay"),
        (["send_report", "--depends-on", str(2**64)], "depends_on"),
        (["send_report", "--max-attempts", str(2**40)], "max_attempts"),
        (["send_report", "--args", '{"a":' * 2000 + "1" + "}" * 2000], "args"),  # once a RecursionError
        (["send_report", "--args", '{"a":' * 65 + "1" + "}" * 65], "args"),
    ],
    ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else None,
)
def test_bad_enqueue_input_names_the_field_and_writes_nothing(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], report_task: str, options: list[str], field: str
) -> None:
    enqueue_json(cli_env, report_task)  # something already there, to see that it is left alone
    before = row_counts(conn)
    result = pgsched(cli_env, "enqueue", *options)
    line = error_line(result)
    assert line.startswith(f"Error: {field}:"), line
    assert result.stdout == ""
    assert row_counts(conn) == before


# -- jobs --------------------------------------------------------------------------------------------


@pytest.fixture
def some_jobs(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Jobs in two queues and three states, inserted by plain SQL."""
    ids = {}
    for name, queue, run_at in [
        ("a_queued", "alpha", "now()"),
        ("a_scheduled", "alpha", "now() + interval '1 day'"),
        ("b_queued", "beta", "now()"),
        ("b_cancelled", "beta", "now()"),
    ]:
        ids[name] = conn.execute(
            f"INSERT INTO pgsched.jobs (task, queue, run_at, args) VALUES ('shell', %s, {run_at}, %s) RETURNING id",
            (queue, json.dumps({"cmd": ["echo", name]})),
        ).fetchone()[0]
    conn.execute(
        "UPDATE pgsched.jobs SET state = 'cancelled', finished_at = now() WHERE id = %s", (ids["b_cancelled"],)
    )
    return ids


def test_jobs_list_table_newest_first(cli_env: dict[str, str], some_jobs: dict[str, int]) -> None:
    headers, rows = table(succeeded(pgsched(cli_env, "jobs", "list")).stdout)
    assert headers[:4] == ["ID", "QUEUE", "TASK", "STATE"]
    listed = {int(r[0]): (r[1], r[2], r[3]) for r in rows}
    assert [int(r[0]) for r in rows] == sorted(some_jobs.values(), reverse=True)
    assert listed[some_jobs["a_scheduled"]] == ("alpha", "shell", "scheduled")
    assert listed[some_jobs["b_cancelled"]] == ("beta", "shell", "cancelled")


def test_jobs_list_json_and_filters(cli_env: dict[str, str], some_jobs: dict[str, int]) -> None:
    def listed(*filters: str) -> list[int]:
        jobs = json.loads(succeeded(pgsched(cli_env, "jobs", "list", "--json", *filters)).stdout)
        return [job["id"] for job in jobs]

    everything = json.loads(succeeded(pgsched(cli_env, "jobs", "list", "--json")).stdout)
    assert [j["id"] for j in everything] == sorted(some_jobs.values(), reverse=True)
    by_id = {j["id"]: j for j in everything}
    assert by_id[some_jobs["a_queued"]]["args"] == {"cmd": ["echo", "a_queued"]}
    assert by_id[some_jobs["a_queued"]]["queue"] == "alpha"

    assert listed("--state", "scheduled") == [some_jobs["a_scheduled"]]
    assert listed("--queue", "beta") == [some_jobs["b_cancelled"], some_jobs["b_queued"]]
    assert listed("--state", "queued", "--queue", "alpha") == [some_jobs["a_queued"]]
    assert listed("--state", "failed") == []
    assert listed("--limit", "1") == [max(some_jobs.values())]
    assert table(succeeded(pgsched(cli_env, "jobs", "list", "--queue", "gamma")).stdout)[1] == []


def test_jobs_list_refuses_an_unknown_state(cli_env: dict[str, str]) -> None:
    result = pgsched(cli_env, "jobs", "list", "--state", "exploded")
    assert result.returncode != 0
    assert "exploded" in result.stderr


def test_jobs_show_table_and_json(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], some_jobs: dict[str, int]
) -> None:
    job_id = some_jobs["a_scheduled"]
    out = succeeded(pgsched(cli_env, "jobs", "show", str(job_id))).stdout
    # One "field  value" line per column, field names right-aligned.
    fields = dict(line.strip().partition("  ")[::2] for line in out.splitlines())
    assert fields["id"] == str(job_id)
    assert fields["state"] == "scheduled"
    assert fields["queue"] == "alpha"
    assert json.loads(fields["args"]) == {"cmd": ["echo", "a_scheduled"]}

    shown = json.loads(succeeded(pgsched(cli_env, "jobs", "show", str(job_id), "--json")).stdout)
    row = job_row(conn, job_id)
    assert shown["id"] == job_id
    assert (shown["state"], shown["queue"], shown["task"], shown["args"]) == (
        row["state"],
        row["queue"],
        row["task"],
        row["args"],
    )
    assert datetime.fromisoformat(shown["run_at"]) == row["run_at"]


def test_jobs_cancel_with_a_reason(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], some_jobs: dict[str, int]
) -> None:
    job_id = some_jobs["a_queued"]
    out = succeeded(pgsched(cli_env, "jobs", "cancel", str(job_id), "--reason", "not needed any more")).stdout
    assert out.strip() == f"job {job_id}: cancelled"
    row = job_row(conn, job_id)
    assert (row["state"], row["error"]) == ("cancelled", "not needed any more")
    assert row["finished_at"] is not None

    as_json = json.loads(succeeded(pgsched(cli_env, "jobs", "cancel", str(some_jobs["b_queued"]), "--json")).stdout)
    assert (as_json["id"], as_json["state"]) == (some_jobs["b_queued"], "cancelled")
    assert job_row(conn, some_jobs["b_queued"])["state"] == "cancelled"


def test_jobs_cancel_refuses_a_finished_job(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], some_jobs: dict[str, int]
) -> None:
    job_id = some_jobs["b_queued"]
    conn.execute(
        "UPDATE pgsched.jobs SET state = 'succeeded', attempts = 1, finished_at = now() WHERE id = %s", (job_id,)
    )
    line = error_line(pgsched(cli_env, "jobs", "cancel", str(job_id)))
    assert f"job {job_id}" in line and "succeeded" in line
    row = job_row(conn, job_id)
    assert (row["state"], row["error"]) == ("succeeded", None)


def test_jobs_retry_runs_a_finished_job_again(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], some_jobs: dict[str, int]
) -> None:
    job_id = some_jobs["b_cancelled"]
    out = succeeded(pgsched(cli_env, "jobs", "retry", str(job_id))).stdout
    assert out.strip() == f"job {job_id}: queued"
    row = job_row(conn, job_id)
    assert (row["state"], row["finished_at"]) == ("queued", None)

    # A dead-lettered job gets one more attempt.
    failed = some_jobs["a_queued"]
    conn.execute(
        "UPDATE pgsched.jobs SET state = 'failed', attempts = 5, max_attempts = 5, finished_at = now(), error = 'boom' WHERE id = %s",
        (failed,),
    )
    retried = json.loads(succeeded(pgsched(cli_env, "jobs", "retry", str(failed), "--json")).stdout)
    assert retried["state"] == "queued"
    row = job_row(conn, failed)
    assert row["state"] == "queued"
    assert row["max_attempts"] > row["attempts"]


def test_jobs_retry_refuses_a_waiting_job(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], report_task: str
) -> None:
    upstream = enqueue_json(cli_env, report_task)
    waiting = enqueue_json(cli_env, report_task, "--depends-on", str(upstream["id"]))
    line = error_line(pgsched(cli_env, "jobs", "retry", str(waiting["id"])))
    assert f"job {waiting['id']}" in line and "waiting" in line
    assert job_row(conn, waiting["id"])["state"] == "waiting"


@pytest.mark.parametrize("command", ["show", "cancel", "retry"])
def test_jobs_command_on_a_missing_job_fails_with_one_line(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], some_jobs: dict[str, int], command: str
) -> None:
    before = row_counts(conn)
    result = pgsched(cli_env, "jobs", command, "999999")
    assert error_line(result) == "Error: job 999999 does not exist"
    assert result.stdout == ""
    assert row_counts(conn) == before


@pytest.mark.parametrize("command", ["show", "cancel", "retry"])
def test_jobs_command_on_an_id_beyond_bigint_says_the_job_does_not_exist(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], some_jobs: dict[str, int], command: str
) -> None:
    before = row_counts(conn)
    line = error_line(pgsched(cli_env, "jobs", command, str(2**64)))
    assert "migrate" not in line and "function" not in line, line
    assert line == f"Error: job {2**64} does not exist" or line.startswith("Error: job_id:"), line
    assert row_counts(conn) == before


# -- queues ------------------------------------------------------------------------------------------


def test_queues_shows_counts_per_queue(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], some_jobs: dict[str, int]
) -> None:
    # beta also gets a waiting job (it depends on a queued one).
    enqueue_json(cli_env, "shell", "--args", SHELL_ARGS, "--queue", "beta", "--depends-on", str(some_jobs["b_queued"]))
    conn.execute("INSERT INTO pgsched.jobs (task, queue, args) VALUES ('shell', 'alpha', %s)", (SHELL_ARGS,))

    stats = {q["queue"]: q for q in json.loads(succeeded(pgsched(cli_env, "queues", "--json")).stdout)}
    assert set(stats) == {"alpha", "beta"}
    assert {k: stats["alpha"][k] for k in ("waiting", "scheduled", "queued", "running")} == {
        "waiting": 0,
        "scheduled": 1,
        "queued": 2,
        "running": 0,
    }
    assert {k: stats["beta"][k] for k in ("waiting", "scheduled", "queued", "running")} == {
        "waiting": 1,
        "scheduled": 0,
        "queued": 1,
        "running": 0,
    }
    # No worker is running, so no queued job can be routed.
    assert (stats["alpha"]["unroutable"], stats["beta"]["unroutable"]) == (2, 1)

    headers, rows = table(succeeded(pgsched(cli_env, "queues")).stdout)
    assert headers[:6] == ["QUEUE", "PAUSED", "WAITING", "SCHEDULED", "QUEUED", "RUNNING"]
    printed = {r[0]: r[1:6] for r in rows}
    assert printed == {"alpha": ["False", "0", "1", "2", "0"], "beta": ["False", "1", "0", "1", "0"]}


def test_queues_on_an_empty_database_prints_only_the_header(cli_env: dict[str, str]) -> None:
    assert json.loads(succeeded(pgsched(cli_env, "queues", "--json")).stdout) == []
    headers, rows = table(succeeded(pgsched(cli_env, "queues")).stdout)
    assert headers[0] == "QUEUE" and rows == []


# -- which database ----------------------------------------------------------------------------------


def test_db_url_prints_the_configured_dsn(cli_env: dict[str, str], dsn: str) -> None:
    assert succeeded(pgsched(cli_env, "db", "url")).stdout == dsn + "\n"


def test_db_stop_refuses_a_configured_database(cli_env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    line = error_line(pgsched(cli_env, "db", "stop"))
    assert "DSN is configured" in line
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the server is still there


def test_database_url_is_used_when_pgsched_dsn_is_unset(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], dsn: str
) -> None:
    env = {k: v for k, v in cli_env.items() if k != "PGSCHED_DSN"}
    env["DATABASE_URL"] = dsn
    assert succeeded(pgsched(env, "db", "url")).stdout == dsn + "\n"
    job = enqueue_json(env, "shell", "--args", SHELL_ARGS)
    assert job_row(conn, job["id"])["task"] == "shell"


def test_pgsched_dsn_wins_over_database_url(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], dsn: str, server: Server
) -> None:
    env = {**cli_env, "DATABASE_URL": server.dsn("pgsched_not_this_one")}
    assert succeeded(pgsched(env, "db", "url")).stdout == dsn + "\n"
    job = enqueue_json(env, "shell", "--args", SHELL_ARGS)
    assert job_row(conn, job["id"])["task"] == "shell"


def test_an_unmigrated_database_asks_for_pgsched_migrate(empty_env: dict[str, str], empty_dsn: str) -> None:
    for command in (
        ["jobs", "list"],
        ["enqueue", "shell", "--args", SHELL_ARGS],
        ["queues"],
        ["jobs", "show", "1"],
    ):
        line = error_line(pgsched(empty_env, *command))
        assert "pgsched migrate" in line, (command, line)
    with psycopg.connect(empty_dsn) as check:
        assert check.execute("SELECT to_regnamespace('pgsched')").fetchone() == (None,)

    assert succeeded(pgsched(empty_env, "migrate")).stdout == "".join(
        f"applied {m.version:04d}_{m.name}\n" for m in migrations.available()
    )
    job = json.loads(succeeded(pgsched(empty_env, "enqueue", "shell", "--args", SHELL_ARGS, "--json")).stdout)
    listed = json.loads(succeeded(pgsched(empty_env, "jobs", "list", "--json")).stdout)
    assert [j["id"] for j in listed] == [job["id"]]
    assert [q["queue"] for q in json.loads(succeeded(pgsched(empty_env, "queues", "--json")).stdout)] == ["default"]

    again = succeeded(pgsched(empty_env, "migrate")).stdout
    assert "up to date" in again
    with psycopg.connect(empty_dsn) as check:
        assert check.execute("SELECT count(*) FROM pgsched.schema_migrations").fetchone() == (
            len(migrations.available()),
        )


@pytest.mark.parametrize(
    "command",
    [
        ["jobs", "list"],
        ["queues"],
        ["migrate"],
        ["enqueue", "shell", "--args", SHELL_ARGS],
        ["jobs", "show", "1"],
        ["jobs", "cancel", "1"],
        ["jobs", "retry", "1"],
    ],
    ids=" ".join,
)
def test_an_unreachable_database_fails_with_one_line_naming_the_cause(server: Server, command: list[str]) -> None:
    env = {**no_database_env(), "PGSCHED_DSN": server.dsn("pgsched_no_such_database")}
    line = error_line(pgsched(env, *command))
    assert line.startswith("Error: cannot reach the database"), line
    assert "pgsched_no_such_database" in line and "does not exist" in line, line


# -- settings from the environment -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "nearest"),
    [
        ("PGSCHED_DSM", "PGSCHED_DSN"),
        ("PGSCHED_DATADIR", "PGSCHED_DATA_DIR"),
        ("PGSCHED_LOGLEVEL", "PGSCHED_LOG_LEVEL"),
    ],
)
def test_an_unknown_variable_warns_with_the_nearest_name(
    cli_env: dict[str, str], dsn: str, variable: str, nearest: str
) -> None:
    result = succeeded(pgsched({**cli_env, variable: "x"}, "db", "url"))
    assert result.stdout == dsn + "\n"  # the command still does its job
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, result.stderr
    assert variable in warnings[0] and f"did you mean {nearest}?" in warnings[0]


def test_a_bad_setting_value_names_the_option(cli_env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    before = row_counts(conn)
    line = error_line(pgsched({**cli_env, "PGSCHED_LOG_LEVEL": "loud"}, "enqueue", "shell", "--args", SHELL_ARGS))
    assert "PGSCHED_LOG_LEVEL" in line and "--log-level" in line and "'loud'" in line
    line = error_line(pgsched(cli_env, "queues", "--log-level", "loud"))
    assert "--log-level" in line and "'loud'" in line
    assert row_counts(conn) == before


# -- what people read: jobs list/show/logs, workers ----------------------------------------------------

TRACEBACK = """Traceback (most recent call last):
  File "/srv/app/tasks.py", line 12, in charge
    amount = parse(text)
  File "/srv/app/tasks.py", line 5, in parse
    return int(text)
ValueError: invalid literal for int() with base 10: 'twelve'
"""


def test_jobs_list_shows_an_errors_last_line_and_a_progress_bar(
    cli_env: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    failed, halfway, free_form = (
        conn.execute(
            "INSERT INTO pgsched.jobs (task, state, attempts, error, progress, finished_at) "
            "VALUES ('charge', %s, 1, %s, %s, CASE WHEN %s = 'failed' THEN now() END) RETURNING id",
            (state, error, json.dumps(progress) if progress else None, state),
        ).fetchone()[0]
        for state, error, progress in [
            ("failed", TRACEBACK, None),
            ("queued", None, {"done": 3, "total": 4}),
            ("queued", None, {"step": "upload"}),
        ]
    )
    out = succeeded(pgsched(cli_env, "jobs", "list")).stdout
    lines = out.splitlines()
    assert len(lines) == 4, out  # the header and one line per job, whatever their errors hold
    assert lines[0].split() == ["ID", "QUEUE", "TASK", "STATE", "PRIORITY", "ATTEMPTS", "RUN_AT", "PROGRESS", "ERROR"]
    by_id = {int(line.split()[0]): line for line in lines[1:]}
    assert by_id[failed].endswith("ValueError: invalid literal for int() with base 10: 'twelve'")
    assert "Traceback" not in out
    assert "[###############-----]  75%" in by_id[halfway]
    assert "[" not in by_id[free_form]  # a checkpoint that does not say how far: no bar
    # Programs still get the whole error.
    listed = {j["id"]: j for j in json.loads(succeeded(pgsched(cli_env, "jobs", "list", "--json")).stdout)}
    assert listed[failed]["error"] == TRACEBACK


@pytest.fixture
def job_with_history(conn: psycopg.Connection[Any]) -> int:
    """A job retried once: two runs rows (a failure, then a success) and log lines of both attempts."""
    worker = uuid.uuid4()
    job_id = conn.execute(
        """INSERT INTO pgsched.jobs (task, state, attempts, result, progress, finished_at)
           VALUES ('charge', 'succeeded', 2, '{"charged": 12}', '{"done": 1, "total": 4}', now()) RETURNING id"""
    ).fetchone()[0]
    conn.execute(
        """INSERT INTO pgsched.runs (job_id, attempt, queue, task, worker_id, outcome, error, started_at, finished_at)
           VALUES (%(id)s, 1, 'default', 'charge', %(worker)s, 'failed', %(error)s,
                   now() - interval '10 seconds', now() - interval '9.5 seconds'),
                  (%(id)s, 2, 'default', 'charge', %(worker)s, 'succeeded', NULL,
                   now() - interval '2 seconds', now() - interval '1.75 seconds')""",
        {"id": job_id, "worker": worker, "error": TRACEBACK},
    )
    conn.execute(
        """INSERT INTO pgsched.run_logs (job_id, attempt, logged_at, stream, level, message) VALUES
           (%(id)s, 1, now() - interval '9.9 seconds', 'log', 'info', 'parsing twelve'),
           (%(id)s, 2, now() - interval '1.9 seconds', 'log', 'info', 'parsing 12'),
           (%(id)s, 2, now() - interval '1.8 seconds', 'stdout', NULL, 'charged 12')""",
        {"id": job_id},
    )
    return job_id


def test_jobs_show_lists_the_runs_and_the_log(cli_env: dict[str, str], job_with_history: int) -> None:
    out = succeeded(pgsched(cli_env, "jobs", "show", str(job_with_history))).stdout
    fields, _, rest = out.partition("\nruns:\n")
    assert "progress  [#####---------------]  25%" in fields
    runs, _, log = rest.partition("\nlog:\n")
    headers, rows = table(runs)
    assert headers == ["ATTEMPT", "OUTCOME", "WORKER", "STARTED_AT", "DURATION", "ERROR"]
    assert [r[:2] for r in rows] == [["1", "failed"], ["2", "succeeded"]]
    first, second = runs.splitlines()[1:]
    assert "0.500 s" in first and first.endswith("ValueError: invalid literal for int() with base 10: 'twelve'")
    assert "0.250 s" in second
    assert [line.split("  ", 1)[1] for line in log.splitlines()] == [
        "#1  log/info  parsing twelve",
        "#2  log/info  parsing 12",
        "#2  stdout  charged 12",
    ]
    shown = json.loads(succeeded(pgsched(cli_env, "jobs", "show", str(job_with_history), "--json")).stdout)
    assert [(r["attempt"], r["outcome"], r["error"]) for r in shown["runs"]] == [
        (1, "failed", TRACEBACK),
        (2, "succeeded", None),
    ]


def test_jobs_logs_prints_every_attempt_or_one(cli_env: dict[str, str], job_with_history: int) -> None:
    out = succeeded(pgsched(cli_env, "jobs", "logs", str(job_with_history))).stdout
    assert [line.split("  ", 1)[1] for line in out.splitlines()] == [
        "#1  log/info  parsing twelve",
        "#2  log/info  parsing 12",
        "#2  stdout  charged 12",
    ]
    out = succeeded(pgsched(cli_env, "jobs", "logs", str(job_with_history), "--attempt", "2", "--json")).stdout
    assert [(line["attempt"], line["stream"], line["message"]) for line in map(json.loads, out.splitlines())] == [
        (2, "log", "parsing 12"),
        (2, "stdout", "charged 12"),
    ]
    assert error_line(pgsched(cli_env, "jobs", "logs", "999999")) == "Error: job 999999 does not exist"


def test_jobs_logs_follow_prints_lines_as_they_come_until_the_job_ends(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], spawn_worker: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    script = f"echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two >&2"
    job_id = conn.execute(
        "INSERT INTO pgsched.jobs (task, args) VALUES ('shell', %s) RETURNING id",
        (json.dumps({"cmd": ["sh", "-c", script]}),),
    ).fetchone()[0]
    (tmp_path / "follow").mkdir()
    follow = PgschedProcess(["jobs", "logs", str(job_id), "--follow"], cli_env, tmp_path / "follow")
    try:
        spawn_worker("--allow-shell", "--heartbeat-seconds", "0.5")
        wait_until(lambda: "stdout  one" in follow.stdout(), timeout=30, message="the first line to be followed")
        follow.check_alive()  # the job still runs: following goes on
        gate.touch()
        assert follow.wait(30) == 0, follow.stderr()
    finally:
        if follow.process.poll() is None:
            follow.kill()
    assert [line.split("  ", 1)[1] for line in follow.stdout().splitlines()] == ["#1  stdout  one", "#1  stderr  two"]
    assert job_row(conn, job_id)["state"] == "succeeded"


def test_workers_lists_live_and_stale_workers_to_a_reader(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], spawn_worker: Any, dsn: str
) -> None:
    job_id = conn.execute(
        "INSERT INTO pgsched.jobs (task, args) VALUES ('sleep_async', '{\"seconds\": 60}') RETURNING id"
    ).fetchone()[0]
    worker = spawn_worker("--queues", "default,media", "--concurrency", "3")
    wait_until(lambda: job_row(conn, job_id)["state"] == "running", timeout=30, message="the job to run")
    stale = worker_incarnation(conn, "-1 minute")
    reader = f"pgs_reader_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{reader}" LOGIN IN ROLE pgsched_reader')
    try:
        params = {**conninfo_to_dict(dsn), "user": reader}
        params.pop("password", None)
        env = {**cli_env, "PGSCHED_DSN": make_conninfo(**params)}
        headers, rows = table(succeeded(pgsched(env, "workers")).stdout)
        as_json = json.loads(succeeded(pgsched(env, "workers", "--json")).stdout)
    finally:
        conn.execute(f'DROP ROLE "{reader}"')
    assert headers == ["ID", "HOST", "PID", "QUEUES", "CONCURRENCY", "RUNNING", "LAST_HEARTBEAT", "STALE"]
    by_pid = {int(r[2]): r for r in rows}
    assert by_pid[worker.pid][3:6] == ["default,media", "3", "1"]
    assert by_pid[worker.pid][-1] == "ago"  # not stale: the line ends with its heartbeat's age
    assert by_pid[1][0] == str(stale)[:8] and by_pid[1][-1] == "stale"
    assert {(w["pid"], w["stale"], w["running"]) for w in as_json} == {(worker.pid, False, 1), (1, True, 0)}


def test_jobs_show_and_logs_read_an_encrypted_jobs_texts_only_with_its_key(
    cli_env: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    key = crypto.generate_key("k1")
    ring = crypto.Keyring.parse(key)
    scope = ("charge", "default")
    error = ring.encrypt_text(TRACEBACK, "error", scope)
    job_id = conn.execute(
        "INSERT INTO pgsched.jobs (task, state, attempts, error, finished_at) "
        "VALUES ('charge', 'failed', 1, %s, now()) RETURNING id",
        (error,),
    ).fetchone()[0]
    conn.execute(
        """INSERT INTO pgsched.runs (job_id, attempt, queue, task, outcome, error, started_at, finished_at)
           VALUES (%s, 1, 'default', 'charge', 'failed', %s, now(), now())""",
        (job_id, error),
    )
    conn.execute(
        "INSERT INTO pgsched.run_logs (job_id, attempt, message) VALUES (%s, 1, %s)",
        (job_id, ring.encrypt_text("card 4111 declined", "message", scope)),
    )
    listed = succeeded(pgsched(cli_env, "jobs", "list")).stdout.splitlines()[1]
    assert listed.endswith("(encrypted)")
    shown = succeeded(pgsched(cli_env, "jobs", "show", str(job_id))).stdout
    runs, _, log = shown.partition("\nruns:\n")[2].partition("\nlog:\n")
    assert runs.splitlines()[1].endswith("(encrypted)") and log.rstrip().endswith("#1  log  (encrypted)")
    keyed = {**cli_env, "PGSCHED_ENCRYPTION_KEYS": key}
    assert succeeded(pgsched(keyed, "jobs", "logs", str(job_id))).stdout.rstrip().endswith("card 4111 declined")
    shown = succeeded(pgsched(keyed, "jobs", "show", str(job_id))).stdout
    assert "ValueError: invalid literal for int() with base 10: 'twelve'" in shown.partition("\nruns:\n")[2]
