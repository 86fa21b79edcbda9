"""``App``: the task registry and the client (enqueue, get, cancel, retry), sync and async.

Every operation is one generator in this module (see ``db.Operation``); the
sync method and its ``_async`` twin only choose the connection and the driver.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar, Unpack, overload

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from . import bulk, crypto, db, migrations, queries, queues, schedules, workflows
from .admin import Administration
from .config import Settings, load_settings, replace_settings
from .crypto import Keyring
from .db import Operation, Query, configure_adapters, configure_async, resolve_dsn, run, run_async, wait_for_database
from .encryption import Payloads
from .errors import ConfigError, JobNotFound, PermissionDenied, ValidationError
from .jobs import Job, JobSpec
from .tasks import Task, TaskOptions, make_task
from .validation import (
    EXECUTOR_KINDS,
    MAX_BIGINT,
    TaskDefaults,
    UnknownTask,
    check_int,
    check_options,
    known_task,
    new_job,
)
from .workflows import Workflow

log = logging.getLogger("pgsched")

P = ParamSpec("P")
R = TypeVar("R")


class App(Administration):
    """A pgsched application: your tasks, and a client to the database that runs them.

    ``App()`` reads ``PGSCHED_DSN`` / ``DATABASE_URL`` (or uses the embedded
    server); ``App(dsn=...)`` names a database. Connections are opened on first
    use (or by ``open()``); at that point the app checks that the schema is
    migrated and writes its tasks to the ``pgsched.tasks`` catalog.
    """

    def __init__(
        self, dsn: str | None = None, *, settings: Settings | None = None, pool_size: int = 10, name: str | None = None
    ) -> None:
        self.settings = settings or load_settings({"dsn": dsn})
        self.pool_size = check_int(pool_size, "pool_size", 1)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.periodics: dict[str, schedules.Schedule] = {}
        # Which code owns the schedules this app defines: another app's are never disabled by
        # this one's start-up. By default, the module that creates the App.
        self.name = name or sys._getframe(1).f_globals.get("__name__", "__main__")
        self._catalog: dict[str, TaskDefaults] = {}
        self.payloads = Payloads(lambda: self.keyring)
        self._dsn: str | None = None
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._async_pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._schema_checked = False
        self._lock = threading.Lock()
        self._async_lock: asyncio.Lock | None = None

    # -- tasks -----------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, **options: Unpack[TaskOptions]) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(  # type: ignore[misc]
        self, fn: Callable[P, R] | None = None, /, **options: Unpack[TaskOptions]
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a sync or async function as a task (``@app.task`` or ``@app.task(...)``).

        Options: ``name`` (default: the function's), ``queue``, ``priority``, ``max_attempts``,
        ``backoff``, ``timeout`` (seconds or timedelta); ``max_per_key``: at most this many of its
        jobs sharing a ``concurrency_key`` run at once in a queue (across all workers), overriding
        the queue's; ``encrypt=True`` stores its jobs' args, result, progress, error and run logs
        encrypted with the keys of ``PGSCHED_ENCRYPTION_KEYS`` (see ``pgsched.crypto``)."""

        def register(func: Callable[P, R]) -> Task[P, R]:
            task = make_task(self, func, **options)
            if task.name in self.tasks:
                raise ValidationError("name", f"a task named {task.name!r} is already registered")
            self.tasks[task.name] = task
            return task

        return register(fn) if fn is not None else register

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        timezone: str = "UTC",
        name: str | None = None,
        args: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a task and a schedule that runs it (``cron`` in ``timezone``, or ``every``).

        Schedules defined in code are written to ``pgsched.schedules`` when the app connects;
        those this app no longer defines are disabled, not deleted. Other options: ``misfire``,
        ``catch_up_window``, ``overlap``, ``jitter_seconds``, ``start_at``, ``end_at``, and the
        task options of ``@app.task`` (``queue``, ``priority``, ``max_attempts``, ``timeout``, ...).
        """
        task_options = {k: options.pop(k) for k in TaskOptions.__annotations__ if k in options}

        def register(func: Callable[P, R]) -> Task[P, R]:
            task = self.task(**{"name": name, **task_options})(func)
            schedule = schedules.for_task(task, cron=cron, every=every, timezone=timezone, args=args, **options)
            self.periodics[schedule.name] = schedule
            return task

        return register

    @property
    def keyring(self) -> Keyring | None:
        """The keys of ``PGSCHED_ENCRYPTION_KEYS`` (None when unset)."""
        keys = self.settings.encryption_keys
        return crypto.load_keyring(keys) if keys else None

    @property
    def encrypted_queues(self) -> frozenset[str]:
        """Queues whose ``pgsched.queues`` row says encrypt, as read when the app connected."""
        return self.payloads.encrypted_queues

    # -- connections -----------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The DSN in use (starting the embedded server if none is configured)."""
        if self._dsn is None:
            self._dsn = resolve_dsn(self.settings)
        return self._dsn

    def _pool_kwargs(self) -> dict[str, Any]:
        # Autocommit: a one-statement operation is one round trip; operations
        # that must be atomic open a transaction explicitly.
        return {
            "conninfo": self.dsn,
            "min_size": 1,
            "max_size": self.pool_size,
            "kwargs": {"autocommit": True},
            "configure": lambda conn: configure_adapters(conn.adapters),
            "open": False,
        }

    def open(self) -> App:
        """Open the sync pool now: check the schema and register the tasks in the catalog."""
        with self._lock:
            if self._pool is None:
                # One direct connection first: an unreachable database fails at once with its
                # real error, where a pool would retry in the background until its timeout.
                with db.naming_refusals(self.dsn), psycopg.connect(self.dsn, autocommit=True) as conn:
                    configure_adapters(conn.adapters)
                    run(conn, self._op_ready())
                pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(**self._pool_kwargs())
                pool.open()
                self._pool = pool
        return self

    async def open_async(self) -> App:
        """Open the async pool now: check the schema and register the tasks in the catalog."""
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            if self._async_pool is None:
                with db.naming_refusals(self.dsn):
                    async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                        configure_adapters(conn.adapters)
                        await run_async(conn, self._op_ready())
                kwargs = self._pool_kwargs()
                kwargs["configure"] = configure_async
                pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(**kwargs)
                await pool.open()
                self._async_pool = pool
        return self

    def close(self) -> None:
        """Close the sync pool (the async one needs ``close_async``)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def reconnect(self, dsn: str | None = None) -> None:
        """Close the sync pool, so that the next call connects afresh (to ``dsn``, when given) and
        checks the schema and registers the tasks again. New connections pick up database-level
        settings, such as the test clock of ``pgsched.testing``. The async pool belongs to the
        event loop that opened it, so it must be closed first (``close_async``): ConfigError."""
        if self._async_pool is not None:
            raise ConfigError("the app's async pool is open: close it first (await app.close_async())")
        self.close()
        if dsn is not None:
            self.settings = replace_settings(self.settings, dsn=dsn)
            self._dsn = None
            self._catalog.clear()  # the defaults read from another database's catalog
        self._schema_checked = False

    async def close_async(self) -> None:
        """Close both pools."""
        await self.close_async_pool()
        self.close()

    async def close_async_pool(self) -> None:
        """Close the async pool only (before the event loop that opened it ends)."""
        if self._async_pool is not None:
            await self._async_pool.close()
            self._async_pool = None

    def __enter__(self) -> App:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> App:
        return await self.open_async()

    async def __aexit__(self, *exc: object) -> None:
        await self.close_async()

    def _execute(self, op: Operation[R], connection: psycopg.Connection[Any] | None, atomic: bool = False) -> R:
        if connection is not None:
            if not self._schema_checked:
                run(connection, self._op_check_schema())
            # Join the caller's transaction; open one only if the caller has none to join.
            with connection.transaction() if atomic and connection.autocommit else nullcontext():
                return run(connection, op)
        if self._pool is None:
            self.open()
        assert self._pool is not None
        with db.naming_refusals(self.dsn), self._pool.connection() as conn:
            with conn.transaction() if atomic else nullcontext():
                return run(conn, op)

    async def _execute_async(
        self, op: Operation[R], connection: psycopg.AsyncConnection[Any] | None, atomic: bool = False
    ) -> R:
        if connection is not None:
            if not self._schema_checked:
                await run_async(connection, self._op_check_schema())
            transaction: AbstractAsyncContextManager[Any] = (
                connection.transaction() if atomic and connection.autocommit else nullcontext()
            )
            async with transaction:
                return await run_async(connection, op)
        if self._async_pool is None:
            await self.open_async()
        assert self._async_pool is not None
        with db.naming_refusals(self.dsn):
            async with self._async_pool.connection() as conn, conn.transaction() if atomic else nullcontext():
                return await run_async(conn, op)

    # -- operations ------------------------------------------------------------------------

    def _op_check_schema(self) -> Operation[None]:
        present = yield Query(queries.SCHEMA_PRESENT)
        applied = (yield Query(queries.APPLIED_MIGRATIONS)) if present[0][0] else []
        migrations.check_applied({version: (name, checksum) for version, name, checksum in applied})
        self.payloads.encrypted_queues = frozenset(name for (name,) in (yield Query(queries.ENCRYPTED_QUEUES)))
        self._schema_checked = True

    def _op_ready(self) -> Operation[None]:
        yield from self._op_check_schema()
        if self.tasks:
            tasks = list(self.tasks.values())
            try:
                yield from self._op_register(tasks)
            except PermissionDenied:
                # A role that may only enqueue (pgsched_enqueuer) cannot write the catalog;
                # the app still knows its own tasks, and workers register them.
                log.info("this database role may not write pgsched.tasks; tasks were not registered")
                return
            periodics = [self.payloads.seal_schedule(s, self.tasks[s.task].defaults) for s in self.periodics.values()]
            yield from schedules.op_sync(periodics, self.name)

    async def register_runner_async(self) -> None:
        """Record in the task catalog that this process runs the app's tasks (a worker calls it at
        start): their execution options (``max_per_key``, ``backoff``) replace the catalog's. Opening
        an app writes only its tasks' parameters and enqueue defaults, so an app that merely enqueues
        a task cannot lift the cap of the workers that run it."""
        if self.tasks:
            await self._execute_async(self._op_register(list(self.tasks.values()), runs=True), None)

    def _op_register(self, tasks: list[Task[Any, Any]], runs: bool = False) -> Operation[None]:
        """Write the app's tasks to the catalog (one statement); execution options only if it ``runs`` them."""
        yield Query(
            queries.CATALOG_UPSERT,
            {
                "runs": runs,
                "names": [t.name for t in tasks],
                "queues": [t.defaults.queue for t in tasks],
                "options": [msgspec.json.encode(t.catalog_options(runs=runs)).decode() for t in tasks],
                "parameters": [msgspec.json.encode(t.parameters()).decode() for t in tasks],
                "descriptions": [(t.__doc__ or "").strip().split("\n")[0] or None for t in tasks],
                "apps": [getattr(t.fn, "__module__", None) for t in tasks],
            },
        )

    def _op_defaults(self, names: Iterable[str]) -> Operation[dict[str, TaskDefaults]]:
        """Defaults of each task name that the app, the executor kinds or the catalog knows."""
        found: dict[str, TaskDefaults] = {}
        missing = []
        for name in set(names):
            if name in self.tasks:
                found[name] = self.tasks[name].defaults
            elif name in EXECUTOR_KINDS:
                found[name] = TaskDefaults()
            elif name in self._catalog:
                found[name] = self._catalog[name]
            else:
                missing.append(name)
        if missing:
            for name, queue, options, parameters in (yield Query(queries.CATALOG_DEFAULTS, (missing,))):
                self._catalog[name] = found[name] = TaskDefaults.from_catalog(queue, options, parameters)
            unknown = [name for name in missing if name not in found]
            if unknown:
                catalog = [name for (name,) in (yield Query(queries.CATALOG_NAMES))]
                known = list(dict.fromkeys([*self.tasks, *EXECUTOR_KINDS, *catalog]))
                for name in unknown:
                    found[name] = UnknownTask(near=tuple(difflib.get_close_matches(name, known, n=2)))
        return found

    def _op_enqueue(self, task: str, args: Any, options: dict[str, Any]) -> Operation[Job]:
        if not isinstance(task, str) or not task:
            raise ValidationError("task", "must be a non-empty task name")
        defaults = yield from self._op_defaults([task])
        job = self.payloads.seal(new_job(task, args, known_task(defaults, task), **options), defaults[task])
        rows = yield Query(queries.ENQUEUE, msgspec.structs.asdict(job), rows="job")
        yield from queues.op_warn_unserved([job.queue])
        return self.payloads.readable(rows[0])

    def _op_enqueue_many(self, specs: list[JobSpec]) -> Operation[list[int]]:
        for i, spec in enumerate(specs):
            if not spec.task:
                raise ValidationError(f"jobs[{i}].task", "must be a non-empty task name")
        defaults = yield from self._op_defaults(spec.task for spec in specs)
        ids = yield from bulk.op_enqueue_many(specs, defaults, self.payloads.seal)
        yield from queues.op_warn_unserved(spec.queue or defaults[spec.task].queue for spec in specs)
        return ids

    def _op_workflow(self, workflow: Workflow) -> Operation[None]:
        defaults = yield from self._op_defaults(node.task for node in workflow.jobs)
        yield from workflows.op_commit(workflow, defaults, self.payloads.seal)

    def _op_job(self, sql: str, *params: Any) -> Operation[Job]:
        check_int(params[0], "job_id", 1, MAX_BIGINT)
        rows = yield Query(sql, params, rows="job")
        if not rows:
            raise JobNotFound(params[0])
        return self.payloads.readable(rows[0])

    # -- running a worker in this process --------------------------------------------------

    def run_worker(self, **options: Any) -> Any:
        """Run a worker for this app in this process until it is stopped (or, with ``burst=True``,
        until the queues are empty); options are the worker settings as Python values
        (``queues=["a", "b"]``, ``concurrency=4``, ``grace_seconds=timedelta(seconds=30)``,
        ``scheduler=False``, ...). In the main thread, SIGTERM and Ctrl-C
        stop it gracefully (as ``pgsched worker``). Returns the worker's stats."""
        signals = threading.current_thread() is threading.main_thread()
        return self._run_worker_in_own_loop(replace_settings(self.settings, **options), signals=signals)

    async def run_worker_async(self, **options: Any) -> Any:
        """``run_worker`` inside a running event loop (signal handling is the caller's)."""
        return await self._serve(replace_settings(self.settings, **options), signals=False)

    def _run_worker_in_own_loop(
        self, settings: Settings, *, signals: bool = True, stopped: Any = None, supervised: bool = False
    ) -> Any:
        """Run the worker in an event loop of its own (``run_worker``, ``pgsched worker``, ``up``).
        The loop ends here, so the app's async pool, which the worker and its tasks opened in it,
        is closed inside it first: the loop's teardown cancels a pool's tasks, and one caught
        connecting can hang it. A database that cannot be reached yet is waited for, up to
        ``wait_for_db`` seconds."""
        if not wait_for_database(self.dsn, settings.wait_for_db, stopped):
            return None  # stopped while waiting

        async def serve_then_close() -> Any:
            try:
                return await self._serve(settings, signals=signals, stopped=stopped, supervised=supervised)
            finally:
                await self.close_async_pool()

        return asyncio.run(serve_then_close())

    async def _serve(self, settings: Settings, *, signals: bool, stopped: Any = None, supervised: bool = False) -> Any:
        # Imported by name at call time: the worker depends on the core, never the other way
        # round (import-linter checks static imports), and an app that only enqueues never loads it.
        worker = importlib.import_module("pgsched.worker.serve")
        return await worker.serve(self, settings, signals=signals, stopped=stopped, supervised=supervised)

    # -- public client API -----------------------------------------------------------------

    def enqueue(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        connection: psycopg.Connection[Any] | None = None,
        **options: Any,
    ) -> Job:
        """Enqueue one job and return it.

        Options: ``queue``, ``priority`` (-100..100, higher first), ``run_at``
        (aware datetime) or ``delay`` (seconds or timedelta), ``max_attempts``,
        ``timeout``, ``dedupe_key``, ``depends_on`` (job ids), ``owner``,
        ``concurrency_key``, ``run_on_upstream_failure``. With ``connection``,
        the job is inserted in the caller's transaction: if it rolls back, the
        job never existed.
        """
        check_options(options)
        return self._execute(self._op_enqueue(task, args, options), connection)

    async def enqueue_async(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        connection: psycopg.AsyncConnection[Any] | None = None,
        **options: Any,
    ) -> Job:
        """``enqueue`` for async code."""
        check_options(options)
        return await self._execute_async(self._op_enqueue(task, args, options), connection)

    def enqueue_many(
        self, jobs: Iterable[JobSpec | Mapping[str, Any]], *, connection: psycopg.Connection[Any] | None = None
    ) -> list[int]:
        """Enqueue many jobs in one transaction (COPY) and return their ids, in order.

        Each item is a ``JobSpec`` or a mapping with the same keys. Either all
        are enqueued or, on the first bad one, none.
        """
        return self._execute(self._op_enqueue_many(bulk.specs(jobs)), connection, atomic=True)

    async def enqueue_many_async(
        self,
        jobs: Iterable[JobSpec | Mapping[str, Any]],
        *,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[int]:
        """``enqueue_many`` for async code."""
        return await self._execute_async(self._op_enqueue_many(bulk.specs(jobs)), connection, atomic=True)

    def workflow(self, *, connection: Any = None) -> Workflow:
        """A workflow to fill in a ``with`` (or ``async with``) block; committed in one transaction
        at its end (in the caller's, with ``connection``). See ``pgsched.workflows``."""
        return Workflow(self, connection)

    def _commit_workflow(self, workflow: Workflow) -> None:
        self._execute(self._op_workflow(workflow), workflow.connection, atomic=True)

    async def _commit_workflow_async(self, workflow: Workflow) -> None:
        await self._execute_async(self._op_workflow(workflow), workflow.connection, atomic=True)

    def get(self, job_id: int, *, connection: psycopg.Connection[Any] | None = None) -> Job:
        """The job with this id; raises JobNotFound."""
        return self._execute(self._op_job(queries.GET_JOB, job_id), connection)

    async def get_async(self, job_id: int, *, connection: psycopg.AsyncConnection[Any] | None = None) -> Job:
        return await self._execute_async(self._op_job(queries.GET_JOB, job_id), connection)

    def cancel(
        self, job_id: int, reason: str | None = None, *, connection: psycopg.Connection[Any] | None = None
    ) -> Job:
        """Cancel an unfinished job. A running job is asked to stop; its worker ends it ``cancelled``."""
        return self._execute(self._op_job(queries.CANCEL_JOB, job_id, reason), connection)

    async def cancel_async(
        self, job_id: int, reason: str | None = None, *, connection: psycopg.AsyncConnection[Any] | None = None
    ) -> Job:
        return await self._execute_async(self._op_job(queries.CANCEL_JOB, job_id, reason), connection)

    def retry(self, job_id: int, *, connection: psycopg.Connection[Any] | None = None) -> Job:
        """Run a failed, cancelled, succeeded or scheduled job again now."""
        return self._execute(self._op_job(queries.RETRY_JOB, job_id), connection)

    async def retry_async(self, job_id: int, *, connection: psycopg.AsyncConnection[Any] | None = None) -> Job:
        return await self._execute_async(self._op_job(queries.RETRY_JOB, job_id), connection)
