"""``pgsched schedules add|list|pause|resume|trigger|delete|preview``, run as real subprocesses.

What a user sees: the schedule a command writes (read back with SQL), the tables and JSON it prints,
and for bad input a non-zero exit with one line on stderr that names the field, with nothing written.
The materializer is not running here: these commands only define and change schedules
(``tests/test_schedules.py`` covers what the materializer does with them).
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from .conftest import row_counts
from .test_cli import error_line, succeeded
from .test_cli import pgsched as run

pytestmark = pytest.mark.process

NAME = "nightly-cleanup"
SHELL_ARGS = '{"cmd":["true"]}'
HEADERS = ["NAME", "TASK", "TIMETABLE", "TIMEZONE", "NEXT_RUN_AT", "PAUSED", "ENABLED", "SOURCE", "INVALID"]
ADD = ("schedules", "add", NAME, "--task", "shell", "--args", SHELL_ARGS, "--cron", "0 3 * * *")


def schedule(conn: psycopg.Connection[Any], name: str = NAME) -> dict[str, Any] | None:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM pgsched.schedules WHERE name = %s", (name,)).fetchone()


def listed(env: dict[str, str]) -> list[dict[str, Any]]:
    return json.loads(succeeded(run(env, "schedules", "list", "--json")).stdout)


@pytest.fixture
def added(cli_env: dict[str, str], conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The schedule ``pgsched schedules add NAME --task shell ... --timezone Europe/Paris`` wrote."""
    result = succeeded(run(cli_env, *ADD, "--timezone", "Europe/Paris"))
    assert result.stdout == f"schedule {NAME}: 0 3 * * * (Europe/Paris)\n"
    row = schedule(conn)
    assert row is not None
    return row


# -- add, list -----------------------------------------------------------------------------------


def test_add_writes_the_schedule(added: dict[str, Any]) -> None:
    assert {k: added[k] for k in ("task", "args", "cron", "every", "timezone", "queue", "priority")} == {
        "task": "shell",
        "args": {"cmd": ["true"]},
        "cron": "0 3 * * *",
        "every": None,
        "timezone": "Europe/Paris",
        "queue": "default",
        "priority": 0,
    }
    assert {k: added[k] for k in ("misfire_policy", "overlap_policy", "paused", "enabled", "source")} == {
        "misfire_policy": "run_once",
        "overlap_policy": "skip",
        "paused": False,
        "enabled": True,
        "source": "cli",
    }
    assert added["next_run_at"] is None  # the materializer starts it


def test_list_prints_a_table_for_people(cli_env: dict[str, str], added: dict[str, Any]) -> None:
    succeeded(
        run(cli_env, "schedules", "add", "every-minute", "--task", "shell", "--args", SHELL_ARGS, "--every", "60")
    )
    lines = succeeded(run(cli_env, "schedules", "list")).stdout.splitlines()
    assert lines[0].split() == HEADERS
    assert len(lines) == 3
    # By name. Cells may hold spaces (the timetable) or be empty: read them at the header's columns.
    starts = [lines[0].index(header) for header in lines[0].split()]

    def cells(line: str) -> list[str]:
        return [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]

    assert cells(lines[1]) == ["every-minute", "shell", "every 0:01:00", "UTC", "", "False", "True", "cli", ""]
    assert cells(lines[2]) == [NAME, "shell", "0 3 * * *", "Europe/Paris", "", "False", "True", "cli", ""]


def test_list_json_for_programs(cli_env: dict[str, str], added: dict[str, Any]) -> None:
    [item] = listed(cli_env)
    assert item["id"] == added["id"]
    assert {k: item[k] for k in ("name", "task", "args", "cron", "every", "timezone", "paused", "enabled")} == {
        "name": NAME,
        "task": "shell",
        "args": {"cmd": ["true"]},
        "cron": "0 3 * * *",
        "every": None,
        "timezone": "Europe/Paris",
        "paused": False,
        "enabled": True,
    }
    assert (item["source"], item["misfire"], item["overlap"], item["next_run_at"]) == ("cli", "run_once", "skip", None)


def test_list_with_no_schedules(cli_env: dict[str, str]) -> None:
    assert listed(cli_env) == []
    assert succeeded(run(cli_env, "schedules", "list")).stdout.split() == HEADERS


def test_add_again_replaces_the_schedule(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], added: dict[str, Any]
) -> None:
    conn.execute("UPDATE pgsched.schedules SET next_run_at = now() + interval '1 hour'")  # as if materialized
    succeeded(run(cli_env, *ADD[:-1], "30 4 * * *", "--timezone", "Europe/Paris", "--overlap", "allow"))
    row = schedule(conn)
    assert row is not None
    assert (row["id"], row["cron"], row["overlap_policy"]) == (added["id"], "30 4 * * *", "allow")
    assert row["next_run_at"] is None  # a new timetable starts again from now
    assert conn.execute("SELECT count(*) FROM pgsched.schedules").fetchone() == (1,)


# -- pause, resume, trigger, delete ----------------------------------------------------------------


def test_pause_and_resume(cli_env: dict[str, str], conn: psycopg.Connection[Any], added: dict[str, Any]) -> None:
    assert succeeded(run(cli_env, "schedules", "pause", NAME)).stdout == f"schedule {NAME}: paused\n"
    assert schedule(conn)["paused"] is True  # type: ignore[index]
    assert [s["paused"] for s in listed(cli_env)] == [True]
    assert succeeded(run(cli_env, "schedules", "resume", NAME)).stdout == f"schedule {NAME}: resumed\n"
    assert schedule(conn)["paused"] is False  # type: ignore[index]
    assert [s["paused"] for s in listed(cli_env)] == [False]


def test_trigger_enqueues_one_run_outside_the_timetable(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], added: dict[str, Any]
) -> None:
    stdout = succeeded(run(cli_env, "schedules", "trigger", NAME)).stdout
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        [job] = cur.execute("SELECT * FROM pgsched.jobs").fetchall()
    assert stdout == f"schedule {NAME}: enqueued job {job['id']}\n"
    assert (job["schedule_id"], job["slot"], job["task"], job["args"], job["state"]) == (
        added["id"],
        None,
        "shell",
        {"cmd": ["true"]},
        "queued",
    )
    after = schedule(conn)
    assert after is not None
    assert (after["next_run_at"], after["last_slot"]) == (added["next_run_at"], added["last_slot"])
    succeeded(run(cli_env, "schedules", "trigger", NAME))  # slot NULL: a second manual run is another job
    assert conn.execute("SELECT count(*) FROM pgsched.jobs WHERE schedule_id = %s", (added["id"],)).fetchone() == (2,)


def test_delete_removes_the_schedule_and_keeps_its_jobs(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], added: dict[str, Any]
) -> None:
    succeeded(run(cli_env, "schedules", "trigger", NAME))
    assert succeeded(run(cli_env, "schedules", "delete", NAME)).stdout == f"schedule {NAME}: deleted\n"
    assert schedule(conn) is None
    assert listed(cli_env) == []
    assert conn.execute("SELECT task, schedule_id FROM pgsched.jobs").fetchall() == [("shell", None)]


# -- preview ---------------------------------------------------------------------------------------


def test_preview_prints_slots_in_utc_and_local_time_across_dst(cli_env: dict[str, str]) -> None:
    args = ("schedules", "preview", "30 2 * * *", "--timezone", "America/New_York", "-n", "3")
    result = succeeded(run(cli_env, *args, "--after", "2026-03-06T00:00:00+00:00"))
    assert result.stdout.splitlines() == [
        "UTC                        AMERICA/NEW_YORK",
        "2026-03-06 07:30:00+00:00  2026-03-06 02:30:00-05:00",
        "2026-03-07 07:30:00+00:00  2026-03-07 02:30:00-05:00",
        # 02:30 does not exist on 2026-03-08 (clocks jump from 02:00 to 03:00): it fires at 03:00 EDT.
        "2026-03-08 07:00:00+00:00  2026-03-08 03:00:00-04:00",
    ]
    result = succeeded(run(cli_env, *args, "--after", "2026-03-06T00:00:00+00:00", "--json"))
    assert json.loads(result.stdout) == ["2026-03-06T07:30:00Z", "2026-03-07T07:30:00Z", "2026-03-08T07:00:00Z"]


# -- bad input -------------------------------------------------------------------------------------

BAD_TIMETABLES = [
    (["--cron", "61 * * * *"], "cron"),
    (["--cron", "* * *"], "cron"),
    (["--cron", "*/0 * * * *"], "cron"),
    (["--cron", "0 0 30 2 *"], "cron"),
    (["--cron", "0 3 * * *", "--timezone", "Mars/Olympus"], "timezone"),
]


def _ids(value: Any) -> str | None:
    return " ".join(value) if isinstance(value, list) else None


@pytest.mark.parametrize(
    ("options", "field"),
    [
        *BAD_TIMETABLES,
        (["--every", "0.5"], "every"),
        (["--every", "0"], "every"),
        (["--cron", "0 3 * * *", "--every", "60"], "cron"),
        ([], "cron"),  # neither
        (["--cron", "0 3 * * *", "--args", "[1]"], "args"),
        (["--cron", "0 3 * * *", "--args", "not json"], "args"),
        (["--cron", "0 3 * * *", "--priority", "500"], "priority"),
        (["--cron", "0 3 * * *", "--queue", "no spaces"], "queue"),
        (["--cron", "0 3 * * *", "--jitter", "-1"], "jitter_seconds"),
        (["--cron", "0 3 * * *", "--start-at", "tomorrow"], "start_at"),
        (
            ["--cron", "0 3 * * *", "--start-at", "2026-12-02T00:00+00:00", "--end-at", "2026-12-01T00:00+00:00"],
            "end_at",
        ),
    ],
    ids=_ids,
)
def test_bad_schedules_name_the_field_and_write_nothing(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], added: dict[str, Any], options: list[str], field: str
) -> None:
    before = row_counts(conn)
    result = run(cli_env, "schedules", "add", "bad", "--task", "shell", "--args", SHELL_ARGS, *options)
    line = error_line(result)
    assert line.startswith(f"Error: {field}:"), line
    assert result.stdout == ""
    assert row_counts(conn) == before
    assert schedule(conn) == added  # the existing one untouched


def test_an_unknown_task_is_refused(cli_env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    before = row_counts(conn)
    line = error_line(run(cli_env, "schedules", "add", "bad", "--task", "no_such_task", "--cron", "0 3 * * *"))
    assert line.startswith("Error: task:"), line
    assert row_counts(conn) == before


@pytest.mark.parametrize(("options", "field"), BAD_TIMETABLES, ids=_ids)
def test_preview_names_the_bad_field(cli_env: dict[str, str], options: list[str], field: str) -> None:
    expression = options[1]
    result = run(cli_env, "schedules", "preview", expression, *options[2:])
    assert error_line(result).startswith(f"Error: {field}:")
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (["-n", "0"], "n"),
        (["-n", "100000"], "n"),
        (["--after", "2026-03-06T00:00:00"], "after"),  # naive: ambiguous
        (["--after", "yesterday"], "after"),
    ],
    ids=_ids,
)
def test_preview_refuses_bad_options(cli_env: dict[str, str], options: list[str], field: str) -> None:
    result = run(cli_env, "schedules", "preview", "0 3 * * *", *options)
    assert error_line(result).startswith(f"Error: {field}:")


@pytest.mark.parametrize("command", ["pause", "resume", "trigger", "delete"])
def test_an_unknown_schedule_name_fails_with_one_line(
    cli_env: dict[str, str], conn: psycopg.Connection[Any], added: dict[str, Any], command: str
) -> None:
    before = row_counts(conn)
    line = error_line(run(cli_env, "schedules", command, "no-such-schedule"))
    assert line == "Error: name: no schedule is named 'no-such-schedule'"
    assert row_counts(conn) == before
    assert schedule(conn) == added
