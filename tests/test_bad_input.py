"""Bad input through every door (issue 19): one table of bad inputs, tried through the Python client
(``App.enqueue``, ``App.enqueue_many``), the SQL function ``pgsched.enqueue`` and a plain ``INSERT`` (both
as a ``pgsched_enqueuer`` login) and the ``pgsched enqueue`` command (a real process, as that login).

Each door must refuse each input with an error that names the field and leave every table's row count
as it was. A door that cannot express an input (no ``delay`` column for an ``INSERT``, no infinite
``datetime`` in Python) skips it; what the SQL doors accept by design is listed in ``ACCEPTED_BY_SQL``
and shown to be accepted, so the list stays true. docs/reliability.md quotes the table.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgsched
from pgsched import JobSpec, PermissionDenied, ValidationError
from pgsched.validation import error_from_db

from .conftest import row_counts
from .test_security import Login, login  # noqa: F401  (the fixture)

SKIP = None  # the door cannot express this input
# A value PostgreSQL cannot convert to the parameter's or column's type ('soon' as a timestamptz, 2^40
# as an integer) fails before any pgsched code runs: SQLSTATE class 22, a message that names the type
# and the value but not the column. Where a row lists its door in ``typed``, that refusal is expected.
TYPE_ERROR = "<type conversion>"
# Inputs PostgreSQL before 17 cannot even convert (it has no infinite intervals).
BEFORE_PG17 = {"delay infinite"}


class Bad(NamedTuple):
    """One bad input and how each door spells it.

    ``args`` is JSON text (what SQL and the command line take; Python gets it decoded). ``python`` holds enqueue options; ``sql`` SQL expressions by
    parameter name of ``pgsched.enqueue``; ``insert`` SQL expressions by column; ``cli`` flags."""

    name: str
    field: str
    task: str = "noop"
    args: str = "{}"
    python: dict[str, Any] | None = None
    sql: dict[str, str] | None = None
    insert: dict[str, str] | None = None
    cli: list[str] | None = None
    typed: tuple[str, ...] = ()  # doors where PostgreSQL's type conversion refuses it (see TYPE_ERROR)


def deep(levels: int) -> str:
    """JSON text of an object nesting ``levels`` objects and arrays (the object itself is level 1)."""
    inner = "1"
    for level in range(levels - 1):
        inner = f"[{inner}]" if level % 2 else f'{{"a": {inner}}}'
    return f'{{"a": {inner}}}'


def option(name: str, python: Any, sql: str | None, cli: list[str] | None, *, column: str | None = None) -> dict:
    """Fields of ``Bad`` for one option given to every door that can express it."""
    return {
        "python": SKIP if python is SKIP else {name: python},
        "sql": SKIP if sql is None else {column or name: sql},
        "insert": SKIP if sql is None or column == "" else {column or name: sql},
        "cli": cli,
    }


BIG = "x" * (1024 * 1024 + 10)
EVERYWHERE: dict[str, Any] = {"python": {}, "sql": {}, "insert": {}, "cli": []}

BAD: list[Bad] = [
    # args: shape, size, depth, numbers and characters JSON or jsonb cannot hold
    Bad("args is an array", "args", args="[1, 2]", **EVERYWHERE),
    Bad("args is a string", "args", args='"text"', **EVERYWHERE),
    # Python's args=None means no args ({}); JSON null is not an object.
    Bad("args is null", "args", args="null", **{**EVERYWHERE, "python": SKIP}),
    Bad("args nest 65 levels", "args", args=deep(65), **EVERYWHERE),
    Bad("args nest 2,000 levels", "args", args=deep(2000), **EVERYWHERE),
    # The command line cannot carry one argument over 128 KiB (Linux MAX_ARG_STRLEN): exec fails.
    Bad("args over 1 MiB", "args", args=json.dumps({"big": BIG}), **{**EVERYWHERE, "cli": SKIP}),
    Bad("args holds NaN", "args", args='{"n": NaN}', **EVERYWHERE),
    Bad("args holds Infinity", "args", args='{"n": [1, Infinity]}', **EVERYWHERE),
    Bad("args holds -Infinity", "args", args='{"n": -Infinity}', **EVERYWHERE),
    Bad("args text holds NUL", "args", args='{"s": "a\\u0000b"}', **EVERYWHERE),
    Bad("args key holds NUL", "args", args='{"k\\u0000": 1}', **EVERYWHERE),
    Bad("args is not JSON", "args", args="{day: 1}", **{**EVERYWHERE, "python": SKIP}),
    # queues
    Bad("queue is empty", "queue", **option("queue", "", "''", ["--queue", ""])),
    Bad("queue has a space", "queue", **option("queue", "has space", "'has space'", ["--queue", "has space"])),
    Bad("queue of 101 characters", "queue", **option("queue", "q" * 101, f"'{'q' * 101}'", ["--queue", "q" * 101])),
    Bad("queue starts with a dot", "queue", **option("queue", ".q", "'.q'", ["--queue", ".q"])),
    Bad("queue holds a newline", "queue", **option("queue", "a\nb", "E'a\\nb'", ["--queue", "a\nb"])),
    # numbers
    Bad("priority 101", "priority", **option("priority", 101, "101", ["--priority", "101"])),
    Bad("priority -101", "priority", **option("priority", -101, "-101", ["--priority", "-101"])),
    Bad(
        "priority 40,000", "priority", **option("priority", 40_000, "40000", ["--priority", "40000"]), typed=("INSERT",)
    ),
    Bad(
        "priority 2^40",
        "priority",
        **option("priority", 2**40, "'1099511627776'", ["--priority", str(2**40)]),
        typed=("pgsched.enqueue", "INSERT"),
    ),
    Bad("max_attempts 0", "max_attempts", **option("max_attempts", 0, "0", ["--max-attempts", "0"])),
    Bad("max_attempts -1", "max_attempts", **option("max_attempts", -1, "-1", ["--max-attempts", "-1"])),
    Bad("timeout 0", "timeout", **option("timeout", 0, "0", ["--timeout", "0"], column="timeout_seconds")),
    Bad("timeout -5", "timeout", **option("timeout", -5, "-5", ["--timeout", "-5"], column="timeout_seconds")),
    Bad(
        "timeout NaN",
        "timeout",
        **option("timeout", math.nan, "'NaN'::float8", ["--timeout", "nan"], column="timeout_seconds"),
    ),
    Bad(
        "timeout Infinity",
        "timeout",
        **option("timeout", math.inf, "'Infinity'::float8", ["--timeout", "inf"], column="timeout_seconds"),
    ),
    # times
    Bad(
        "run_at in 1970",
        "run_at",
        **option(
            "run_at", datetime(1970, 1, 1, tzinfo=UTC), "'1970-01-01 00:00Z'", ["--run-at", "1970-01-01T00:00:00+00:00"]
        ),
    ),
    Bad(
        "run_at in 9999",
        "run_at",
        **option(
            "run_at", datetime(9999, 1, 1, tzinfo=UTC), "'9999-01-01 00:00Z'", ["--run-at", "9999-01-01T00:00:00+00:00"]
        ),
    ),
    Bad("run_at infinity", "run_at", **option("run_at", SKIP, "'infinity'", ["--run-at", "infinity"])),
    Bad("run_at -infinity", "run_at", **option("run_at", SKIP, "'-infinity'", ["--run-at", "-infinity"])),
    Bad(
        "run_at without a zone",
        "run_at",
        # SQL reads a zoneless timestamptz in the session's zone, as it always does: not bad there.
        **option("run_at", datetime(2030, 1, 1), None, ["--run-at", "2030-01-01T00:00:00"]),
    ),
    Bad(
        "run_at is not a time",
        "run_at",
        **option("run_at", "soon", "'soon'", ["--run-at", "soon"]),
        typed=("pgsched.enqueue", "INSERT"),
    ),
    Bad("delay -1 s", "delay", **option("delay", -1, "'-1 second'", ["--delay", "-1"], column="")),
    Bad("delay infinite", "delay", **option("delay", math.inf, "'infinity'", ["--delay", "inf"], column="")),
    Bad(
        "delay of 200 years",
        "delay",
        **option("delay", timedelta(days=365 * 200), "'200 years'", ["--delay", str(86400 * 365 * 200)], column=""),
    ),
    Bad(
        "run_at and delay",
        "delay",
        python={"run_at": datetime(2030, 1, 1, tzinfo=UTC), "delay": 5},
        sql={"run_at": "'2030-01-01Z'", "delay": "'5 seconds'"},
        cli=["--run-at", "2030-01-01T00:00:00+00:00", "--delay", "5"],
    ),
    # dependencies (an INSERT has no depends_on: job_deps is not the enqueuer's, see test_role_attacks)
    Bad(
        "depends_on a missing job",
        "depends_on",
        **option("depends_on", [999_999_999], "ARRAY[999999999]::bigint[]", ["--depends-on", "999999999"], column=""),
    ),
    Bad(
        "depends_on 101 jobs",
        "depends_on",
        **option(
            "depends_on",
            list(range(1, 102)),
            "ARRAY(SELECT generate_series(1, 101))::bigint[]",
            [f for i in range(1, 102) for f in ("--depends-on", str(i))],
            column="",
        ),
    ),
    # keys and names
    Bad("dedupe_key is empty", "dedupe_key", **option("dedupe_key", "", "''", ["--dedupe-key", ""])),
    Bad(
        "dedupe_key of 201 characters",
        "dedupe_key",
        **option("dedupe_key", "k" * 201, f"'{'k' * 201}'", ["--dedupe-key", "k" * 201]),
    ),
    Bad("owner of 201 characters", "owner", **option("owner", "o" * 201, f"'{'o' * 201}'", ["--owner", "o" * 201])),
    Bad("owner is empty", "owner", **option("owner", "", "''", ["--owner", ""])),
    Bad(
        "concurrency_key of 201 characters",
        "concurrency_key",
        **option("concurrency_key", "c" * 201, f"'{'c' * 201}'", ["--concurrency-key", "c" * 201]),
    ),
    # tasks
    Bad("task is empty", "task", task="", **EVERYWHERE),
    Bad("task of 201 characters", "task", task="t" * 201, **EVERYWHERE),
    Bad("shell job by an enqueuer", "task", task="shell", args='{"cmd": ["id"]}', **EVERYWHERE),
    Bad("http job by an enqueuer", "task", task="http", args='{"url": "http://169.254.169.254/"}', **EVERYWHERE),
    Bad("unknown task", "task", task="no_such_task", **{**EVERYWHERE, "sql": SKIP, "insert": SKIP}),
]

# What plain SQL accepts on purpose (DESIGN §3, README "The tasks catalog"): a job of a task no app
# registered yet waits, counted as unroutable, until a worker that knows it starts.
ACCEPTED_BY_SQL = ["unknown task"]


def python_args(bad: Bad) -> Any:
    # Python's own decoder recurses once per level: the 2,000 levels are built, not decoded.
    return _nested(2000) if bad.name == "args nest 2,000 levels" else json.loads(bad.args)


def _nested(levels: int) -> Any:
    value: Any = 1
    for level in range(levels - 1):
        value = [value] if level % 2 else {"a": value}
    return {"a": value}


def names_field(reported: str, field: str) -> bool:
    """``args.n`` and ``jobs[1].args[0]`` name ``args``."""
    return reported == field or reported.startswith((f"{field}.", f"{field}["))


@pytest.fixture
def enqueuer(login: Login, conn: psycopg.Connection[Any], dsn: str) -> tuple[str, psycopg.Connection[Any]]:  # noqa: F811
    """The DSN of a fresh pgsched_enqueuer login and a connection as it; ``noop`` is in the catalog."""
    conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('noop')")
    name, connection = login("pgsched_enqueuer")
    params = {**conninfo_to_dict(dsn), "user": name}
    params.pop("password", None)
    return make_conninfo(**params), connection


def refusal(call: Any) -> Exception | None:
    """The exception ``call`` raised (None if it returned)."""
    try:
        call()
    except Exception as exc:
        return exc
    return None


def check_door(conn: psycopg.Connection[Any], door: str, attempt: Any, doors: list[Bad]) -> list[str]:
    """Try every input of ``doors`` through ``attempt(bad) -> str | None`` (the field it named,
    or None if it was accepted); the problems found, one line each."""
    problems = []
    for bad in doors:
        before = row_counts(conn)
        named = attempt(bad)
        after = row_counts(conn)
        if named is None:
            problems.append(f"{door}: {bad.name}: accepted")
        elif named == TYPE_ERROR and (
            door in bad.typed or (bad.name in BEFORE_PG17 and conn.info.server_version < 170000)
        ):
            pass
        elif not names_field(named, bad.field):
            problems.append(f"{door}: {bad.name}: refused naming {named!r}, not {bad.field!r}")
        if after != before:
            changed = {t: (before[t], after[t]) for t in before if before[t] != after.get(t)}
            problems.append(f"{door}: {bad.name}: row counts changed {changed}")
    return problems


def field_of(exc: Exception | None, task: str) -> str | None:
    """The field an error names: a ValidationError's, ``task`` for a refused shell/http job, and for
    a database error the field pgsched maps it to (or its message, to show what it says)."""
    if exc is None:
        return None
    if isinstance(exc, psycopg.Error):
        exc = error_from_db(exc)
    if isinstance(exc, ValidationError):
        return exc.field
    if isinstance(exc, PermissionDenied) and f"may not create {task} jobs" in str(exc):
        return "task"
    if isinstance(exc, psycopg.errors.DataError):
        return TYPE_ERROR
    return f"{type(exc).__name__}: {exc}"


@pytest.mark.db
def test_the_python_client_refuses_every_bad_input(conn: psycopg.Connection[Any], enqueuer: Any) -> None:
    dsn, _ = enqueuer
    doors = [b for b in BAD if b.python is not SKIP]
    with pgsched.App(dsn) as app:

        def one(bad: Bad) -> str | None:
            return field_of(refusal(lambda: app.enqueue(bad.task, python_args(bad), **bad.python)), bad.task)

        def bulk(bad: Bad) -> str | None:
            jobs = [JobSpec(task="noop"), {"task": bad.task, "args": python_args(bad), **bad.python}]
            named = field_of(refusal(lambda: app.enqueue_many(jobs)), bad.task)
            return named.removeprefix("jobs[1].") if named else named

        problems = check_door(conn, "App.enqueue", one, doors) + check_door(conn, "App.enqueue_many", bulk, doors)
    assert problems == [], "\n".join(problems)


@pytest.mark.db
def test_the_sql_function_refuses_every_bad_input(conn: psycopg.Connection[Any], enqueuer: Any) -> None:
    _, as_enqueuer = enqueuer

    def attempt(bad: Bad) -> str | None:
        assert bad.sql is not None
        options = "".join(f", {name} => {expression}" for name, expression in bad.sql.items())
        sql = f"SELECT id FROM pgsched.enqueue(%s, %s::jsonb{options})"
        return field_of(refusal(lambda: as_enqueuer.execute(sql, (bad.task, bad.args))), bad.task)

    problems = check_door(conn, "pgsched.enqueue", attempt, [b for b in BAD if b.sql is not SKIP])
    assert problems == [], "\n".join(problems)


@pytest.mark.db
def test_a_plain_insert_refuses_every_bad_input(conn: psycopg.Connection[Any], enqueuer: Any) -> None:
    _, as_enqueuer = enqueuer

    def attempt(bad: Bad) -> str | None:
        assert bad.insert is not None
        columns = "".join(f", {column}" for column in bad.insert)
        values = "".join(f", {expression}" for expression in bad.insert.values())
        sql = f"INSERT INTO pgsched.jobs (task, args{columns}) VALUES (%s, %s::jsonb{values})"
        return field_of(refusal(lambda: as_enqueuer.execute(sql, (bad.task, bad.args))), bad.task)

    problems = check_door(conn, "INSERT", attempt, [b for b in BAD if b.insert is not SKIP])
    assert problems == [], "\n".join(problems)


@pytest.mark.db
def test_what_plain_sql_accepts_by_design_is_accepted(conn: psycopg.Connection[Any], enqueuer: Any) -> None:
    _, as_enqueuer = enqueuer
    for bad in (b for b in BAD if b.name in ACCEPTED_BY_SQL):
        as_enqueuer.execute("SELECT pgsched.enqueue(%s, %s::jsonb)", (bad.task, bad.args))
        as_enqueuer.execute("INSERT INTO pgsched.jobs (task, args) VALUES (%s, %s::jsonb)", (bad.task, bad.args))
    assert conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone() == (2 * len(ACCEPTED_BY_SQL),)


@pytest.mark.process
def test_the_command_refuses_every_bad_input(conn: psycopg.Connection[Any], enqueuer: Any, cli_env: Any) -> None:
    dsn, _ = enqueuer
    env = {**cli_env, "PGSCHED_DSN": dsn}

    def attempt(bad: Bad) -> str | None:
        assert bad.cli is not None
        command = [sys.executable, "-m", "pgsched", "enqueue", bad.task, "--args", bad.args, *bad.cli]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return None
        lines = done.stderr.strip().splitlines()
        if len(lines) != 1 or "Traceback" in done.stderr:
            return f"not one line: {done.stderr!r}"
        line = lines[0].removeprefix("Error: ")
        if f"may not create {bad.task} jobs" in line:
            return "task"
        # Click's own checks (an int option given a float) name the option: --max-attempts.
        flag = line.partition("'--")[2].partition("'")[0]
        return flag.replace("-", "_") if flag else line.partition(":")[0]

    problems = check_door(conn, "pgsched enqueue", attempt, [b for b in BAD if b.cli is not SKIP])
    assert problems == [], "\n".join(problems)


class BadSchedule(NamedTuple):
    """A bad schedule: ``add_schedule`` fields for Python, flags for ``pgsched schedules add``."""

    name: str
    field: str
    python: dict[str, Any]
    cli: list[str] | None


BAD_SCHEDULES: list[BadSchedule] = [
    BadSchedule("cron is not cron", "cron", {"cron": "not a cron"}, ["--cron", "not a cron"]),
    BadSchedule("cron of 4 fields", "cron", {"cron": "* * * *"}, ["--cron", "* * * *"]),
    BadSchedule("cron of 7 fields", "cron", {"cron": "* * * * * * *"}, ["--cron", "* * * * * * *"]),
    BadSchedule("cron minute 61", "cron", {"cron": "61 * * * *"}, ["--cron", "61 * * * *"]),
    BadSchedule("cron that never fires", "cron", {"cron": "0 0 31 2 *"}, ["--cron", "0 0 31 2 *"]),
    BadSchedule("cron is empty", "cron", {"cron": ""}, ["--cron", ""]),
    BadSchedule("cron and every", "cron", {"cron": "* * * * *", "every": 60}, ["--cron", "* * * * *", "--every", "60"]),
    BadSchedule("neither cron nor every", "cron", {}, []),
    BadSchedule("unknown time zone", "timezone", {"cron": "0 9 * * *", "timezone": "Mars/Olympus"}, None),
    BadSchedule("time zone is empty", "timezone", {"cron": "0 9 * * *", "timezone": ""}, None),
    BadSchedule("time zone is a path", "timezone", {"cron": "0 9 * * *", "timezone": "../../../etc/passwd"}, None),
    BadSchedule("time zone is a data file", "timezone", {"cron": "0 9 * * *", "timezone": "leapseconds"}, None),
    BadSchedule("time zone is an offset", "timezone", {"cron": "0 9 * * *", "timezone": "UTC+25"}, None),
    BadSchedule("every 0 s", "every", {"every": 0}, ["--every", "0"]),
    BadSchedule("every -5 s", "every", {"every": -5}, ["--every", "-5"]),
    BadSchedule("every 200 years", "every", {"every": 86400 * 365 * 200}, ["--every", str(86400 * 365 * 200)]),
    BadSchedule(
        "jitter -1", "jitter_seconds", {"every": 60, "jitter_seconds": -1}, ["--every", "60", "--jitter", "-1"]
    ),
    BadSchedule("args is an array", "args", {"every": 60, "args": [1]}, ["--every", "60", "--args", "[1]"]),
    BadSchedule(
        "args hold NaN", "args", {"every": 60, "args": {"n": math.nan}}, ["--every", "60", "--args", '{"n": NaN}']
    ),
    BadSchedule("priority 101", "priority", {"every": 60, "priority": 101}, ["--every", "60", "--priority", "101"]),
    BadSchedule("queue has a space", "queue", {"every": 60, "queue": "a b"}, ["--every", "60", "--queue", "a b"]),
]
# The time zone rows through the command line too: --timezone takes any text.
BAD_SCHEDULES = [
    s._replace(cli=s.cli if s.cli is not None else ["--cron", "0 9 * * *", "--timezone", s.python["timezone"]])
    for s in BAD_SCHEDULES
]


@pytest.mark.db
def test_schedules_refuse_every_bad_input(app: pgsched.App, conn: psycopg.Connection[Any], login: Login) -> None:  # noqa: F811
    conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('noop')")

    def attempt(bad: Any) -> str | None:
        return field_of(refusal(lambda: app.add_schedule("nightly", "noop", **bad.python)), "noop")

    problems = check_door(conn, "App.add_schedule", attempt, BAD_SCHEDULES)  # type: ignore[arg-type]
    assert problems == [], "\n".join(problems)
    # Plain SQL: the enqueuer may not write schedules at all (an admin's INSERT is stored and, if the
    # scheduler cannot evaluate it, marked invalid_reason: README "Schedules by plain SQL").
    _, as_enqueuer = login("pgsched_enqueuer")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_enqueuer.execute("INSERT INTO pgsched.schedules (name, task, cron) VALUES ('x', 'noop', 'not a cron')")
    assert conn.execute("SELECT count(*) FROM pgsched.schedules").fetchone() == (0,)


@pytest.mark.process
def test_schedules_add_refuses_every_bad_input(conn: psycopg.Connection[Any], cli_env: Any) -> None:
    conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('noop')")

    def attempt(bad: Any) -> str | None:
        command = [sys.executable, "-m", "pgsched", "schedules", "add", "nightly", "--task", "noop", *bad.cli]
        done = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return None
        lines = done.stderr.strip().splitlines()
        if len(lines) != 1 or "Traceback" in done.stderr:
            return f"not one line: {done.stderr!r}"
        line = lines[0].removeprefix("Error: ")
        flag = line.partition("'--")[2].partition("'")[0]
        return {"jitter": "jitter_seconds"}.get(flag, flag) if flag else line.partition(":")[0]

    problems = check_door(conn, "pgsched schedules add", attempt, BAD_SCHEDULES)  # type: ignore[arg-type]
    assert problems == [], "\n".join(problems)


# -- races: the same bad input from two sessions at once --------------------------------------------


@pytest.mark.db
def test_concurrent_enqueues_of_one_dedupe_key_through_every_door_make_one_job(
    conn: psycopg.Connection[Any],
    enqueuer: Any,
    login: Login,  # noqa: F811
) -> None:
    dsn, _ = enqueuer
    sessions = [login("pgsched_enqueuer")[1] for _ in range(4)]
    with pgsched.App(dsn) as app:
        app.open()
        doors = [
            lambda: app.enqueue("noop", {}, dedupe_key="once"),
            lambda: app.enqueue_many([{"task": "noop", "dedupe_key": "once"}]),
            lambda: sessions[0].execute("SELECT pgsched.enqueue('noop', dedupe_key => 'once')"),
            lambda: sessions[1].execute("SELECT pgsched.enqueue('noop', dedupe_key => 'once')"),
            lambda: sessions[2].execute("INSERT INTO pgsched.jobs (task, dedupe_key) VALUES ('noop', 'once')"),
            lambda: sessions[3].execute("INSERT INTO pgsched.jobs (task, dedupe_key) VALUES ('noop', 'once')"),
        ]
        start = threading.Barrier(len(doors))
        outcomes: list[Exception | None] = [None] * len(doors)

        def run(i: int) -> None:
            start.wait()
            outcomes[i] = refusal(doors[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(doors))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert sum(o is None for o in outcomes) == 1, outcomes
    assert all(field_of(o, "noop") == "dedupe_key" for o in outcomes if o is not None), outcomes
    assert conn.execute("SELECT count(*) FROM pgsched.jobs WHERE dedupe_key = 'once'").fetchone() == (1,)


@pytest.mark.db
def test_two_sessions_closing_a_cycle_at_once_leave_one_edge(conn: psycopg.Connection[Any], login: Login) -> None:  # noqa: F811
    a, b = (row[0] for row in conn.execute("INSERT INTO pgsched.jobs (task) VALUES ('x'), ('y') RETURNING id"))
    first, second = login("pgsched_worker")[1], login("pgsched_worker")[1]  # workers may write job_deps
    errors: list[Exception | None] = []
    with first.transaction():
        first.execute("INSERT INTO pgsched.job_deps (job_id, depends_on) VALUES (%s, %s)", (a, b))
        # The other edge, from another session, waits for this transaction (the graph lock)...
        racer = threading.Thread(
            target=lambda: errors.append(
                refusal(
                    lambda: second.execute("INSERT INTO pgsched.job_deps (job_id, depends_on) VALUES (%s, %s)", (b, a))
                )
            )
        )
        racer.start()
        racer.join(0.5)
        assert racer.is_alive()  # ...and only then, seeing the first edge, is refused
    racer.join(30)
    assert len(errors) == 1 and field_of(errors[0], "y") == "depends_on", errors
    assert conn.execute("SELECT job_id, depends_on FROM pgsched.job_deps").fetchall() == [(a, b)]
