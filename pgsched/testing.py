"""Testing your tasks: a pytest plugin (and the ``Kit`` behind it) for your own test database.

Installed with pgsched and loaded by pytest through an entry point; it does
nothing until a test asks for one of its fixtures. Tests run against a real
PostgreSQL (no fake that drifts from the SQL), through the same claim and
completion statements as ``pgsched worker``.

Options (pytest command line, ini file, environment):

- the test database: ``--pgsched-dsn``, else ini ``pgsched_dsn``, else
  ``PGSCHED_TEST_DSN``, else what ``pgsched.load_settings`` reads
  (``PGSCHED_DSN``, then ``DATABASE_URL``). Its name must contain ``test``:
  the kit empties its pgsched tables before every test. It is migrated once
  per session; under pytest-xdist each worker gets its own database,
  ``<name>_<worker id>``, created on first use.
- the app: ini ``pgsched_app = "package.module:app"``, or override the
  ``pgsched_user_app`` fixture.

Fixtures: ``pgsched_dsn`` (session), ``pgsched_user_app``, ``pgsched_kit``,
``pgsched_app``, ``pgsched_clock``, ``drain``, ``drain_async``,
``run_scheduler``, ``run_scheduler_async``, ``enqueued_jobs``,
``assert_enqueued``, ``refute_enqueued``. See ``Kit`` for what each does.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import inspect
import os
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgsched import migrations
from pgsched.app_import import import_app
from pgsched.client import App
from pgsched.config import load_settings, replace_settings
from pgsched.db import configure_adapters
from pgsched.errors import ConfigError, ValidationError
from pgsched.jobs import JOB_COLUMNS, STATES, Job
from pgsched.leader.materializer import Materializer
from pgsched.leader.promoter import Promoter
from pgsched.tasks import Task
from pgsched.worker.outcomes import Stats
from pgsched.worker.runtime import Worker

T = TypeVar("T")

# The states of a job that has not started: what "enqueued" means to the assertions.
ENQUEUED_STATES = ("waiting", "scheduled", "queued")
# A drain that keeps finding due jobs after this many rounds has a job that never settles.
MAX_DRAIN_ROUNDS = 100
CLOCK_UNITS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds")

# Every table of the schema but the migrations record (partitions go with their parent).
PGSCHED_TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgsched' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND c.relname <> 'schema_migrations'
ORDER BY 1
"""

# The jobs of some states, oldest first (a test's few rows: a sequential scan is right).
JOBS_IN_STATES = f"SELECT {JOB_COLUMNS} FROM pgsched.jobs WHERE state = ANY(%s) ORDER BY id"

# The queues a drain serves when it is given none (jobs_claim_idx covers queued rows).
QUEUED_QUEUES = "SELECT DISTINCT queue FROM pgsched.jobs WHERE state = 'queued' ORDER BY 1"


@dataclass
class Drained:
    """What a drain ran, by how each attempt ended (like Oban's ``drain_queue``)."""

    succeeded: int = 0
    failed: int = 0  # failed with no attempts left (the dead letter)
    retried: int = 0  # failed (or timed out) with attempts left: scheduled for a retry
    cancelled: int = 0
    snoozed: int = 0

    def add(self, stats: Stats) -> None:
        snoozed = stats.by_outcome.get("snoozed", 0)
        self.succeeded += stats.succeeded
        self.failed += stats.failed
        self.retried += stats.retried - snoozed  # the worker counts snoozes among its retries
        self.cancelled += stats.cancelled
        self.snoozed += snoozed


def connect(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit connection that decodes jsonb as the client does."""
    conn = psycopg.connect(dsn, autocommit=True)
    configure_adapters(conn.adapters)
    return conn


def run_sync(coroutine: Coroutine[Any, Any, T], twin: str) -> T:
    """Run ``coroutine`` in a loop of its own; inside a running loop, say to await ``twin`` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    coroutine.close()
    raise RuntimeError(f"an event loop is running in this thread: in an async test, use `await {twin}(...)`")


class Clock:
    """The test clock: moves ``pgsched.now()`` (due times, backoff, leases, schedule slots).

    It sets ``pgsched.clock_offset`` on the test database (``ALTER DATABASE ... SET``, so the
    database's owner or a superuser must run the tests), which every *new* connection reads:
    the app reconnects at each move, and each drain and scheduler pass connects afresh. The
    offset is fixed, not the time: the clock keeps running at real speed from where it was put.
    Every test starts at offset zero.
    """

    def __init__(self, kit: Kit) -> None:
        self._kit = kit
        self.offset = timedelta(0)

    def now(self) -> datetime:
        """``pgsched.now()``, as every connection to the test database sees it."""
        with connect(self._kit.dsn) as conn:
            row = conn.execute("SELECT pgsched.now()").fetchone()
        assert row is not None
        return row[0]

    def advance(self, delta: timedelta | None = None, **units: float) -> datetime:
        """Move the clock forward (``advance(minutes=5)``, or a ``timedelta``); returns the new now."""
        unknown = sorted(set(units) - set(CLOCK_UNITS))
        if unknown:
            raise ValidationError(unknown[0], f"not a unit of time; use {', '.join(CLOCK_UNITS)}")
        self._move(self.offset + (delta or timedelta(0)) + timedelta(**units))
        return self.now()

    def set(self, when: datetime) -> datetime:
        """Put the clock at ``when`` (an aware datetime); returns the new now."""
        if not isinstance(when, datetime) or when.tzinfo is None:
            raise ValidationError("when", f"must be an aware datetime, got {when!r}")
        with connect(self._kit.dsn) as conn:
            row = conn.execute("SELECT %s::timestamptz - now()", (when,)).fetchone()
        assert row is not None
        self._move(row[0])
        return self.now()

    def reset(self) -> None:
        """Back to the real time."""
        self._move(None)

    def _move(self, offset: timedelta | None) -> None:
        self.set_offset(offset)
        try:
            self._kit.app.reconnect()
        except ConfigError:
            raise ConfigError(
                "the clock moved while the app's async pool is open, whose connections keep the old "
                "time: `await app.close_async()` first (each drain_async closes it too)"
            ) from None

    def set_offset(self, offset: timedelta | None) -> None:
        """Write the offset (None: none) for the connections opened from now on."""
        with connect(self._kit.dsn) as conn:
            database = sql.Identifier(self._kit.database)
            if offset is None:
                conn.execute(sql.SQL("ALTER DATABASE {} RESET pgsched.clock_offset").format(database))
            else:
                value = sql.Literal(f"{offset.total_seconds()} seconds")
                conn.execute(sql.SQL("ALTER DATABASE {} SET pgsched.clock_offset = {}").format(database, value))
        self.offset = offset or timedelta(0)


class Kit:
    """The testing kit for one test: ``app`` on the test database ``dsn``, emptied by ``reset``.

    The fixtures of this plugin are its attributes and methods; outside pytest, build one with
    ``Kit(app, dsn)`` and call ``reset()`` before each test.
    """

    def __init__(self, app: App, dsn: str) -> None:
        self.app = app
        self.dsn = dsn
        app.reconnect(dsn)
        with connect(dsn) as conn:
            row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        self.database: str = row[0]
        self.clock = Clock(self)

    def reset(self) -> None:
        """Empty every pgsched table but the migrations record (ids start again at 1), put the
        clock back to the real time, and open the app (which writes its tasks and schedules)."""
        with connect(self.dsn) as conn:
            tables = [sql.Identifier("pgsched", name) for (name,) in conn.execute(PGSCHED_TABLES).fetchall()]
            conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.SQL(", ").join(tables)))
        self.clock.reset()
        self.app.open()  # registers its tasks and schedules again, as when the app starts

    def close(self) -> None:
        """Put the clock back and close the app's sync pool."""
        self.clock.set_offset(None)
        self.app.close()

    # -- running jobs ------------------------------------------------------------------------------

    def drain(
        self, queues: str | Iterable[str] | None = None, *, until_empty: bool = True, concurrency: int = 1
    ) -> Drained:
        """Run the due jobs of ``queues`` (default: every queue with queued jobs) here and now,
        with the real ``Worker`` in burst mode; returns what ran, by outcome.

        With ``until_empty`` it then promotes the ``scheduled`` jobs that are due on the test
        clock (retries whose backoff has passed, snoozes, delayed jobs) and runs again, until
        nothing is due. It never moves the clock: a retry due in 2 s waits for
        ``pgsched_clock.advance(seconds=2)`` and the next drain. Dependents released by a
        finished job run in the same drain. ``concurrency`` 1 runs the jobs one at a time, in
        claim order (priority, then run_at, then id), so a test is deterministic.
        """
        return run_sync(self.drain_async(queues, until_empty=until_empty, concurrency=concurrency), "drain_async")

    async def drain_async(
        self, queues: str | Iterable[str] | None = None, *, until_empty: bool = True, concurrency: int = 1
    ) -> Drained:
        """``drain`` inside a running event loop (an async test). It closes the app's pools at
        the end (the app reconnects on its next call), so none is left behind in the test's loop."""
        drained = Drained()
        given = [queues] if isinstance(queues, str) else list(queues or [])
        try:
            for _ in range(MAX_DRAIN_ROUNDS):
                # By default the app's queues (where its tasks enqueue, during the drain too) and
                # every queue that holds queued jobs now.
                names = given or sorted(self.app_queues() | set(await self._queued_queues()))
                if names:
                    settings = replace_settings(
                        self.app.settings,
                        queues=",".join(names),
                        concurrency=concurrency,
                        burst=True,
                        poll_seconds=0.05,
                        scheduler=False,
                    )
                    drained.add(await Worker(self.app, settings).run())
                if not until_empty:
                    return drained
                promoted = (await self._promote()).get("promoted")
                if not promoted and (given or set(await self._queued_queues()) <= set(names)):
                    return drained
        finally:
            await self.app.close_async()
        raise AssertionError(
            f"drain gave up after {MAX_DRAIN_ROUNDS} rounds: jobs keep coming due "
            "(a task that snoozes or retries with no delay?)"
        )

    def run_scheduler(self) -> dict[str, int]:
        """One pass of the scheduler's materializer (schedules fire their due slots) and promoter
        (due ``scheduled`` jobs become ``queued``), on the test clock; returns their counts. A new
        schedule's first pass only sets its next slot: pass once, move the clock, pass again."""
        return run_sync(self.run_scheduler_async(), "run_scheduler_async")

    async def run_scheduler_async(self) -> dict[str, int]:
        """``run_scheduler`` inside a running event loop."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            configure_adapters(conn.adapters)
            fired = await Materializer().run_once(conn)
        return {**fired.done, **await self._promote()}

    async def _promote(self) -> dict[str, int]:
        # A fresh connection: it reads the clock offset the test set on the database.
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            return (await Promoter().run_once(conn)).done

    def app_queues(self) -> set[str]:
        """``default`` and the queues of the app's tasks."""
        return {"default", *(task.defaults.queue for task in self.app.tasks.values())}

    async def _queued_queues(self) -> list[str]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            return [name for (name,) in await (await conn.execute(QUEUED_QUEUES)).fetchall()]

    # -- assertions ------------------------------------------------------------------------------

    def enqueued_jobs(self, **fields: Any) -> list[Job]:
        """The jobs that match ``fields`` (any ``Job`` field; ``task`` may be a ``Task``, ``args``
        matches as a subset), oldest first. Only jobs not started yet (``waiting``,
        ``scheduled``, ``queued``) unless ``state`` is given."""
        wanted = _criteria(fields)
        return [job for job in self._jobs(wanted) if _matches(job, wanted)]

    def assert_enqueued(self, **fields: Any) -> Job:
        """Assert that a job matching ``fields`` (as in ``enqueued_jobs``) is enqueued; returns the
        first. The failure lists the jobs that were found instead."""
        wanted = _criteria(fields)
        found = self._jobs(wanted)
        matching = [job for job in found if _matches(job, wanted)]
        if not matching:
            raise AssertionError(f"expected a job {_describe(wanted)}; {_listing(found, wanted, 'instead')}")
        return matching[0]

    def refute_enqueued(self, **fields: Any) -> None:
        """Assert that no job matching ``fields`` (as in ``enqueued_jobs``) is enqueued."""
        wanted = _criteria(fields)
        matching = [job for job in self._jobs(wanted) if _matches(job, wanted)]
        if matching:
            raise AssertionError(f"expected no job {_describe(wanted)}; {_listing(matching, wanted, 'that match')}")

    def _jobs(self, wanted: Mapping[str, Any]) -> list[Job]:
        states = [wanted["state"]] if "state" in wanted else list(ENQUEUED_STATES)
        with connect(self.dsn) as conn, conn.cursor(row_factory=lambda _: lambda values: Job(*values)) as cur:
            return cur.execute(JOBS_IN_STATES, (states,)).fetchall()


def _criteria(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` checked (ValidationError naming the field), with a ``Task`` given as its name."""
    wanted = dict(fields)
    for name in wanted:
        if name not in Job.__struct_fields__:
            near = difflib.get_close_matches(name, Job.__struct_fields__, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValidationError(name, f"not a field of a job{hint}")
    if isinstance(wanted.get("task"), Task):
        wanted["task"] = wanted["task"].name
    if "args" in wanted and not isinstance(wanted["args"], Mapping):
        raise ValidationError("args", f"must be a mapping (matched as a subset), got {wanted['args']!r}")
    if "state" in wanted and wanted["state"] not in STATES:
        raise ValidationError("state", f"must be one of {', '.join(STATES)}, got {wanted['state']!r}")
    return wanted


def _matches(job: Job, wanted: Mapping[str, Any]) -> bool:
    return all(
        _contains(job.args, value) if name == "args" else getattr(job, name) == value for name, value in wanted.items()
    )


def _contains(actual: Any, expected: Any) -> bool:
    """``expected`` is a subset of ``actual``: every key it gives, with a matching value (recursively
    for mappings; other values must be equal)."""
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and _contains(actual[key], value) for key, value in expected.items()
        )
    return bool(actual == expected)


def _describe(wanted: Mapping[str, Any]) -> str:
    where = [f"args ⊇ {value!r}" if name == "args" else f"{name}={value!r}" for name, value in wanted.items()]
    states = wanted.get("state") or "/".join(ENQUEUED_STATES)
    return f"({states}) with {', '.join(where)}" if where else f"({states})"


def _listing(jobs: list[Job], wanted: Mapping[str, Any], which: str) -> str:
    if not jobs:
        return "found no such job" if "state" in wanted else "found no enqueued job at all"
    shown = ["task", "queue", "priority", "state", "args"] + [n for n in wanted if n not in ("task", "args")]
    lines = [f"  job {job.id}: " + " ".join(f"{n}={getattr(job, n)!r}" for n in dict.fromkeys(shown)) for job in jobs]
    return f"found {len(jobs)} job(s) {which}:\n" + "\n".join(lines)


# -- the pytest plugin ---------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("pgsched").addoption(
        "--pgsched-dsn", help="the test database of pgsched.testing (its pgsched tables are emptied before each test)"
    )
    parser.addini("pgsched_dsn", "the test database of pgsched.testing (else PGSCHED_TEST_DSN, PGSCHED_DSN, ...)")
    parser.addini("pgsched_app", "the App under test, as package.module:app")


def resolve_test_database(config: pytest.Config) -> str:
    """The DSN of the test database, migrated (see the module docstring for where it comes from)."""
    named = config.getoption("pgsched_dsn") or config.getini("pgsched_dsn") or os.environ.get("PGSCHED_TEST_DSN")
    dsn = load_settings({"dsn": named or None}).dsn
    if not dsn:
        raise pytest.UsageError(
            "pgsched.testing needs a test database: give --pgsched-dsn, ini pgsched_dsn or PGSCHED_TEST_DSN"
        )
    with connect(dsn) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        name = row[0]
        # It empties tables before every test: refuse what looks like a real database.
        if "test" not in name.lower():
            raise pytest.UsageError(
                f"pgsched.testing empties the pgsched tables of its database before every test, and {name!r} "
                "has no 'test' in its name: point --pgsched-dsn (or pgsched_dsn, PGSCHED_TEST_DSN) at a test database"
            )
        workerinput = getattr(config, "workerinput", None)
        if workerinput is not None:  # pytest-xdist: one database per worker, or they empty each other's
            name = f"{name}_{workerinput['workerid']}"
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            dsn = make_conninfo(dsn, dbname=name)
    with connect(dsn) as conn:
        migrations.migrate(conn)
    return dsn


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[None]:
    """An async test that uses the kit closes the app's async pool before its event loop ends:
    an open pool's tasks, cancelled when the loop closes, can hang it (a worker caught connecting)."""
    kit = pyfuncitem.funcargs.get("pgsched_kit")
    test = pyfuncitem.obj
    if isinstance(kit, Kit) and inspect.iscoroutinefunction(test):

        @functools.wraps(test)
        async def closing_the_pool(*args: Any, **kwargs: Any) -> Any:
            try:
                return await test(*args, **kwargs)
            finally:
                await kit.app.close_async()

        pyfuncitem.obj = closing_the_pool
    try:
        yield
    finally:
        pyfuncitem.obj = test


@pytest.fixture(scope="session")
def pgsched_dsn(pytestconfig: pytest.Config) -> str:
    """The DSN of the test database, migrated once per session."""
    return resolve_test_database(pytestconfig)


@pytest.fixture
def pgsched_user_app(pytestconfig: pytest.Config) -> App:
    """The App under test, from ini ``pgsched_app``; override this fixture to build it otherwise."""
    spec = pytestconfig.getini("pgsched_app")
    if not spec:
        raise pytest.UsageError(
            "pgsched.testing needs your App: set the ini option pgsched_app = 'package.module:app', "
            "or override the pgsched_user_app fixture"
        )
    return import_app(spec, "ini option pgsched_app")


@pytest.fixture
def pgsched_kit(pgsched_user_app: App, pgsched_dsn: str) -> Iterator[Kit]:
    """The kit of this test: the app on the emptied test database, at the real time."""
    kit = Kit(pgsched_user_app, pgsched_dsn)
    kit.reset()
    yield kit
    kit.close()


def _kit_fixture(name: str, attribute: str, doc: str) -> Any:
    """A fixture that gives one attribute of the test's ``pgsched_kit``."""

    def fixture(pgsched_kit: Kit) -> Any:
        return getattr(pgsched_kit, attribute)

    fixture.__doc__ = doc
    return pytest.fixture(name=name)(fixture)


pgsched_app = _kit_fixture("pgsched_app", "app", "Your App, on the emptied test database, opened.")
pgsched_clock = _kit_fixture(
    "pgsched_clock", "clock", "The test clock (``advance``, ``set``, ``now``, ``reset``); real time after the test."
)
drain = _kit_fixture("drain", "drain", "``drain(queues=None, until_empty=True, concurrency=1)``: see ``Kit.drain``.")
drain_async = _kit_fixture("drain_async", "drain_async", "``await drain_async(...)``: ``drain`` in an async test.")
run_scheduler = _kit_fixture(
    "run_scheduler", "run_scheduler", "``run_scheduler()``: one materializer and promoter pass on the test clock."
)
run_scheduler_async = _kit_fixture(
    "run_scheduler_async", "run_scheduler_async", "``await run_scheduler_async()``: in an async test."
)
enqueued_jobs = _kit_fixture(
    "enqueued_jobs", "enqueued_jobs", "``enqueued_jobs(**fields)``: see ``Kit.enqueued_jobs``."
)
assert_enqueued = _kit_fixture(
    "assert_enqueued", "assert_enqueued", "``assert_enqueued(**fields)``: see ``Kit.assert_enqueued``."
)
refute_enqueued = _kit_fixture(
    "refute_enqueued", "refute_enqueued", "``refute_enqueued(**fields)``: see ``Kit.refute_enqueued``."
)
