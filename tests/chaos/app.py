"""The chaos suite's tasks (``--app tests.chaos.app:app``): every execution appends to ``chaos.history``.

Each execution writes a ``start`` event before it does anything and an ``end`` event when it is
done (``cancelled`` when the worker stopped it), from inside the task, on a connection of its own
(``PGSCHED_CHAOS_HISTORY_DSN``, straight to PostgreSQL: a proxy or a fault aimed at the worker's
sessions never touches it), each event committed on its own, in database time. The result names
the execution, so the checker can tell which execution's outcome the database accepted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgsched import App, Context
from pgsched.leader.service import Service

HISTORY_DSN = "PGSCHED_CHAOS_HISTORY_DSN"
# Test-only: a scheduler started with this set leads every pass of every service without taking the
# leader lock (scenario 6's variant "leader lock disabled"); pgsched itself has no such switch.
NO_LEADER_LOCK = "PGSCHED_CHAOS_NO_LEADER_LOCK"
HISTORY_APPLICATION = "chaos-history"

# The harness creates these in the test database (not in sql/: they belong to the test, not to pgsched).
SCHEMA = """
CREATE SCHEMA IF NOT EXISTS chaos;
CREATE TABLE IF NOT EXISTS chaos.history (
    seq       bigserial PRIMARY KEY,
    exec      uuid NOT NULL,
    job_id    bigint NOT NULL,
    key       text,
    attempt   integer NOT NULL,
    worker_id uuid,
    pid       integer NOT NULL,
    event     text NOT NULL CHECK (event IN ('start', 'end', 'cancelled')),
    at        timestamptz NOT NULL DEFAULT pgsched.now()
);
CREATE TABLE IF NOT EXISTS chaos.acks (
    key     text PRIMARY KEY,
    job_id  bigint,
    outcome text NOT NULL CHECK (outcome IN ('ack', 'unknown', 'rolled_back'))
);
"""

RECORD = """INSERT INTO chaos.history (exec, job_id, key, attempt, worker_id, pid, event)
VALUES (%s, %s, %s, %s, %s, %s, %s)"""

# How long an event write keeps retrying through a fault before the execution gives up (raises).
RECORD_DEADLINE = 60.0

_pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
_pool_lock: asyncio.Lock | None = None


async def _history_pool() -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    global _pool, _pool_lock
    if _pool_lock is None:
        _pool_lock = asyncio.Lock()
    async with _pool_lock:
        if _pool is None:
            conninfo = psycopg.conninfo.make_conninfo(os.environ[HISTORY_DSN], application_name=HISTORY_APPLICATION)
            pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
                conninfo,
                min_size=1,
                max_size=8,
                kwargs={"autocommit": True},
                open=False,
                check=AsyncConnectionPool.check_connection,
            )
            await pool.open()
            _pool = pool
    return _pool


async def record(ctx: Context, execution: uuid.UUID, event: str) -> None:
    """Append one event of this execution to the history (committed before it returns)."""
    job = ctx.job
    params = (execution, job.id, job.args.get("key"), ctx.attempt, job.worker_id, os.getpid(), event)
    deadline = time.monotonic() + RECORD_DEADLINE
    while True:
        try:
            pool = await _history_pool()
            async with pool.connection() as conn:
                await conn.execute(RECORD, params)
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def step(ctx: Context, key: str, ms: int = 0) -> dict[str, str]:
    """Record its start, work ``ms`` milliseconds, record its end; the result names the execution."""
    execution = uuid.uuid4()
    await record(ctx, execution, "start")
    try:
        if ms:
            await asyncio.sleep(ms / 1000)
    except asyncio.CancelledError:
        # Stopped by its worker (lease lost, cancel, shutdown): when matters to the checker.
        await asyncio.shield(record(ctx, execution, "cancelled"))
        raise
    await record(ctx, execution, "end")
    return {"exec": str(execution)}


async def poison(ctx: Context, key: str) -> None:
    """Record its start, then kill its own worker process (kill -9)."""
    await record(ctx, uuid.uuid4(), "start")
    os.kill(os.getpid(), signal.SIGKILL)


def make_app(dsn: str | None = None, name: str = __name__) -> App:
    """An App with the chaos tasks: the workers' (``app`` below) and the test process's enqueuers'."""
    application = App(dsn, name=name)
    application.task(name="chaos.step", max_attempts=20)(step)
    application.task(name="chaos.poison", max_attempts=3)(poison)
    return application


app = make_app()

if os.environ.get(NO_LEADER_LOCK) == "1":
    Service.use_lock = False
