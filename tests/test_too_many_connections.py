"""Scenario 4's wording (issue 19): when PostgreSQL refuses connections because ``max_connections``
is used up, the library, the command and the worker say so plainly, with what to do, and they
recover once the connections go. On a server of the test's own (tests/chaos/faults.py) whose
``max_connections`` the test fills with idle sessions."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import pgsched
from pgsched.errors import TOO_MANY_CONNECTIONS, TooManyConnections

from .chaos import faults
from .conftest import HEAVY, wait_until
from .processes import PgschedProcess

pytestmark = [pytest.mark.process, HEAVY]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_server() -> Iterator[str]:
    """The DSN of a migrated database on a server of its own with max_connections 20."""
    with faults.own_server("small", {"max_connections": "20"}) as (_, dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('noop')")
        yield dsn


def refusal_after_cut_sessions(app: pgsched.App) -> Exception | None:
    """What ``enqueue`` raises once the pool's cut sessions are spent (each call meets one, as any
    call would after a cut, and the pool drops it)."""
    for _ in range(app.pool_size + 1):
        try:
            app.enqueue("noop")
        except psycopg.errors.AdminShutdown:
            continue
        except Exception as exc:
            return exc
        return None
    return None


def enqueue_command(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pgsched", "enqueue", "noop"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_a_full_server_is_named_plainly_by_every_door_and_each_recovers(
    small_server: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    dsn = small_server
    env = {**cli_env, "PGSCHED_DSN": dsn}
    worker: PgschedProcess | None = None
    running = pgsched.App(dsn)
    running.enqueue("noop")  # an app whose pool is open when the server fills up
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            # Its pooled sessions are cut, so that it must connect again into a full server.
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
        with faults.idle_connections(dsn, 50, fill=True) as held:
            assert len(held) >= 15
            # The library: a new app, and the one whose pool lost its sessions (behind its timeout).
            with pytest.raises(TooManyConnections) as refused:
                pgsched.App(dsn).enqueue("noop")
            assert str(refused.value) == TOO_MANY_CONNECTIONS
            assert str(refusal_after_cut_sessions(running)) == TOO_MANY_CONNECTIONS
            # The command: one line, the same words, no traceback.
            done = enqueue_command(env)
            assert done.returncode == 1 and done.stderr == f"Error: {TOO_MANY_CONNECTIONS}\n", done.stderr
            # The worker waits for the database and says why on every attempt.
            args = ["worker", "--app", "tests.apps.sample:app", "--wait-for-db", "120"]
            worker = PgschedProcess(args, {**env, "PYTHONPATH": str(ROOT)}, tmp_path)
            wait_until(lambda: TOO_MANY_CONNECTIONS in worker.stderr(), timeout=60, message="the worker's reason")
            assert "Traceback" not in worker.stderr()
        # The connections went: each one recovers on its own.
        assert pgsched.App(dsn).enqueue("noop").id
        assert running.enqueue("noop").id
        assert enqueue_command(env).returncode == 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            registered = "SELECT 1 FROM pgsched.workers WHERE pid = %s"
            wait_until(lambda: conn.execute(registered, (worker.pid,)).fetchone(), timeout=60, message="registered")
    finally:
        running.close()
        if worker is not None:
            worker.kill()
