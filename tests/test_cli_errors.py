"""Errors and input on the command line (issue 20), as a user meets them: a real ``pgsched``
process, one line on stderr and exit status 1 for each error (the user's own frames when their
app fails to import), and nothing written."""

from __future__ import annotations

import json
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .test_cli import PGSCHED, error_line, no_database_env, pgsched, succeeded

pytestmark = pytest.mark.process


def run_in(
    directory: Path, env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PGSCHED, *args], env=env, cwd=directory, input=stdin, capture_output=True, text=True, timeout=60
    )


def jobs(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT task, args FROM pgsched.jobs ORDER BY id").fetchall()


@pytest.mark.parametrize("dsn", ["not a dsn", "mysql://bob:s3cret@db.example/app"])
def test_a_malformed_dsn_is_one_line(dsn: str) -> None:
    for args in (("jobs", "list", "--dsn", dsn), ("--dsn", dsn, "jobs", "list")):
        result = pgsched(no_database_env(), *args)
        line = error_line(result)
        assert result.returncode == 1
        assert line.startswith("Error: --dsn / PGSCHED_DSN: ") and "not a PostgreSQL connection string" in line
        assert "s3cret" not in result.stderr
    assert "not a PostgreSQL" in error_line(pgsched({**no_database_env(), "DATABASE_URL": dsn}, "migrate"))


def test_dsn_works_before_the_command_too(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('ping')")
    succeeded(pgsched(no_database_env(), "--dsn", dsn, "enqueue", "ping"))
    listed = succeeded(pgsched(no_database_env(), "--dsn", dsn, "jobs", "list", "--json")).stdout
    assert [job["task"] for job in json.loads(listed)] == ["ping"]
    # The command's own flag wins over the one given first.
    assert "not a PostgreSQL" in error_line(pgsched(no_database_env(), "--dsn", dsn, "jobs", "list", "--dsn", "x y"))


def test_a_usage_error_exits_2_as_documented(cli_env: dict[str, str]) -> None:
    result = pgsched(cli_env, "jobs", "list", "--colour", "red")
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == "Error: No such option '--colour'."


def test_settings_say_what_they_accept(cli_env: dict[str, str]) -> None:
    line = error_line(pgsched({**cli_env, "PGSCHED_CONCURRENCY": "ten"}, "worker", "--burst"))
    assert line == "Error: --concurrency / PGSCHED_CONCURRENCY: expected a whole number from 1 to 10000 (got 'ten')"
    line = error_line(pgsched(cli_env, "worker", "--burst", "--queues", "media,"))
    assert "expected queue names separated by commas; one of them is empty" in line and "regex" not in line
    line = error_line(pgsched({**cli_env, "PGSCHED_ALLOW_SHELL": "maybe"}, "worker", "--burst"))
    assert "expected true or false (accepted: 1, true, yes, on / 0, false, no, off) (got 'maybe')" in line
    succeeded(pgsched({**cli_env, "PGSCHED_ALLOW_SHELL": "yes"}, "worker", "--burst"))


@pytest.fixture
def reader_dsn(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[str]:
    """The DSN of a login role that is only in pgsched_reader."""
    name = f"pgs_reader_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE pgsched_reader')
    params = {**conninfo_to_dict(dsn), "user": name}
    params.pop("password", None)
    yield make_conninfo(**params)
    conn.execute(f'DROP OWNED BY "{name}"')
    conn.execute(f'DROP ROLE "{name}"')


def test_a_role_without_the_privilege_gets_one_line_naming_the_role_it_needs(reader_dsn: str) -> None:
    env = {**no_database_env(), "PGSCHED_DSN": reader_dsn}
    line = error_line(pgsched(env, "jobs", "list"))
    assert line == (
        "Error: permission denied for table jobs: this database role needs to be a member of "
        "pgsched_worker or pgsched_admin (see Roles in the README)"
    )
    assert "permission denied for table jobs" in error_line(pgsched(env, "jobs", "show", "1"))
    succeeded(pgsched(env, "queues"))  # what a reader may read


TASKS = """\
    from pgsched import App

    app = App()


    @app.task
    def add(a: int, b: int) -> int:
        return a + b
"""


def test_app_may_be_a_file_path(tmp_path: Path, cli_env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    (tmp_path / "mytasks.py").write_text(textwrap.dedent(TASKS))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    succeeded(run_in(tmp_path, cli_env, "enqueue", "add", "--app", "./mytasks.py:app", "--args", '{"a": 1, "b": 2}'))
    succeeded(run_in(elsewhere, cli_env, "enqueue", "add", "--app", "../mytasks.py", "--args", '{"a": 3, "b": 4}'))
    assert jobs(conn) == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]
    line = error_line(run_in(tmp_path, cli_env, "enqueue", "add", "--app", "./mytasks.py:application"))
    assert line == (
        "Error: --app / PGSCHED_APP: './mytasks.py' has no attribute 'application'; "
        "expected module:attribute (myproject.tasks:app) or a file path (./tasks.py:app)"
    )
    line = error_line(run_in(tmp_path, cli_env, "enqueue", "add", "--app", "mytasks:add"))
    assert line.startswith("Error: --app / PGSCHED_APP: 'mytasks:add' is a Task, not a pgsched.App; expected")
    line = error_line(run_in(tmp_path, cli_env, "enqueue", "add", "--app", "no_such_module:app"))
    assert "no module named 'no_such_module'" in line and "expected module:attribute" in line


@pytest.mark.parametrize(
    ("source", "line_number", "last_line"),
    [
        ("import json\nimport no_such_dependency\n", 2, "ModuleNotFoundError: No module named 'no_such_dependency'"),
        ("from json import no_such_name\n", 1, "ImportError: cannot import name 'no_such_name' from 'json'"),
        ("x = 1\ndef broken(:\n    pass\n", 2, "SyntaxError: invalid syntax"),
        (
            "def check():\n    raise RuntimeError('set API_KEY first')\n\ncheck()\n",
            2,
            "RuntimeError: set API_KEY first",
        ),
    ],
)
def test_an_app_that_fails_to_import_shows_the_users_frames_only(
    tmp_path: Path, cli_env: dict[str, str], source: str, line_number: int, last_line: str
) -> None:
    (tmp_path / "brokentasks.py").write_text(source)
    for spec in ("brokentasks:app", "./brokentasks.py:app"):
        result = run_in(tmp_path, cli_env, "enqueue", "add", "--app", spec)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.rstrip("\n").splitlines()
        assert lines[0] == f"Error: --app / PGSCHED_APP: importing {spec!r} failed:"
        assert f'brokentasks.py", line {line_number}' in result.stderr
        assert lines[-1].startswith(last_line), result.stderr
        assert len(lines) <= 8 and "Traceback" not in result.stderr
        assert "importlib" not in result.stderr and "click" not in result.stderr and "/pgsched/" not in result.stderr


def test_enqueue_checks_args_against_the_catalog(cli_env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    line = error_line(pgsched(cli_env, "enqueue", "add", "--app", "pgsched.demo:app", "--args", '{"a": 1}'))
    assert line == "Error: args.b: required by task 'add', which takes (a, b)"
    # Without the app: from the catalog the demo app wrote.
    line = error_line(pgsched(cli_env, "enqueue", "add", "--args", '{"a": 1, "b": 2, "c": 3}'))
    assert line == "Error: args.c: task 'add' takes no argument 'c' (it takes (a, b))"
    line = error_line(pgsched(cli_env, "enqueue", "ad", "--args", '{"a": 1, "b": 2}'))
    assert line.endswith("did you mean 'add'?")
    assert jobs(conn) == []


def test_enqueue_reads_args_from_a_file_or_stdin(
    tmp_path: Path, cli_env: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('store')")
    big = {"blob": "x" * 600_000}  # more than one command-line argument may hold (128 KiB)
    (tmp_path / "args.json").write_text(json.dumps(big))
    succeeded(run_in(tmp_path, cli_env, "enqueue", "store", "--args", "@args.json"))
    succeeded(run_in(tmp_path, cli_env, "enqueue", "store", "--args", "-", stdin=json.dumps({"from": "stdin"})))
    assert jobs(conn) == [("store", big), ("store", {"from": "stdin"})]
    too_big = json.dumps({"blob": "x" * (1024 * 1024)})
    line = error_line(run_in(tmp_path, cli_env, "enqueue", "store", "--args", "-", stdin=too_big))
    assert line.startswith("Error: args: is ") and "the limit is 1,048,576" in line
    line = error_line(run_in(tmp_path, cli_env, "enqueue", "store", "--args", "@missing.json"))
    assert line == "Error: args: cannot read 'missing.json': No such file or directory"
    assert len(jobs(conn)) == 2


def test_enqueue_to_a_queue_no_worker_serves_warns(cli_env: dict[str, str], conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('ping')")
    result = succeeded(pgsched(cli_env, "enqueue", "ping", "--queue", "nobody"))
    assert result.stderr.splitlines() == [
        "warning: no live worker serves queue 'nobody': its jobs wait until a worker runs with --queues nobody "
        "(pgsched queues counts them as unroutable)"
    ]
