"""Start-up against a database that is not there yet: ``--wait-for-db`` retries with backoff, saying what
it waits for, then gives up with one line and exit status 1."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .conftest import Server, wait_until
from .processes import PgschedProcess

pytestmark = pytest.mark.process


@pytest.fixture
def closed_port_dsn() -> str:
    """A DSN whose port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/pgsched"


def error_lines(proc: PgschedProcess) -> list[str]:
    return [line for line in proc.stderr().splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize(
    "command",
    [["worker"], ["worker", "--processes", "2"], ["scheduler"], ["up"]],
    ids=["worker", "worker --processes 2", "scheduler", "up"],
)
def test_an_unreachable_database_is_retried_then_given_up(
    command: list[str], closed_port_dsn: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**cli_env, "PGSCHED_DSN": closed_port_dsn}
    proc = PgschedProcess([*command, "--wait-for-db", "2"], env, tmp_path)
    assert proc.wait(30) == 1
    waits = [line for line in proc.stderr().splitlines() if "waiting for the database" in line]
    assert len(waits) >= 2, proc.stderr()  # one line per attempt, saying what it waits for
    assert "127.0.0.1" in waits[0] and "attempt 1," in waits[0] and "giving up in" in waits[0]
    [error] = error_lines(proc)
    assert error.startswith("Error: cannot reach the database after waiting 2 s (--wait-for-db): "), error
    assert proc.stderr().splitlines()[-1] == error  # the last word, and no traceback


def test_no_wait_fails_at_the_first_attempt(closed_port_dsn: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = PgschedProcess(["worker", "--wait-for-db", "0"], {**cli_env, "PGSCHED_DSN": closed_port_dsn}, tmp_path)
    assert proc.wait(30) == 1
    assert "waiting for the database" not in proc.stderr()
    [error] = error_lines(proc)
    assert error.startswith("Error: cannot reach the database: "), error


@pytest.fixture
def later_database(server: Server, template: str) -> Iterator[tuple[str, Any]]:
    """The DSN of a database that does not exist yet, and a function that creates it (migrated)."""
    name = f"pgsched_later_{uuid.uuid4().hex[:10]}"
    janitor = server.janitor(name, template_dbname=template)
    yield server.dsn(name), janitor.init
    janitor.drop()


def test_a_worker_waits_for_its_database_then_runs(
    later_database: tuple[str, Any], cli_env: dict[str, str], tmp_path: Path
) -> None:
    dsn, create = later_database
    env = {**cli_env, "PGSCHED_DSN": dsn}
    worker = PgschedProcess(["worker", "--app", "tests.apps.sample:app", "--wait-for-db", "60"], env, tmp_path)
    try:
        wait_until(
            lambda: worker.check_alive() or worker.stderr().count("waiting for the database") >= 2,
            timeout=30,
            message="the worker to retry",
        )
        create()  # the database comes up, as a server started after its workers would

        with psycopg.connect(dsn, autocommit=True) as conn:
            wait_until(
                lambda: worker.check_alive() or conn.execute("SELECT count(*) FROM pgsched.workers").fetchone()[0],
                timeout=30,
                message="the worker to start once its database exists",
            )
            job = conn.execute("SELECT id FROM pgsched.enqueue('add', '{\"a\": 2, \"b\": 3}')").fetchone()[0]
            wait_until(
                lambda: conn.execute("SELECT result FROM pgsched.jobs WHERE id = %s", (job,)).fetchone()[0] == 5,
                timeout=30,
                message="the job to run",
            )
        assert worker.stop() == 0
    finally:
        if worker.process.poll() is None:
            worker.kill()
