"""The worker's lease (DESIGN §8 "Liveness"), as a part of ``Worker`` (worker/runtime.py).

The worker runs as an *incarnation*: a fresh id registered in ``pgsched.workers`` with one lease
that covers every job it holds. The heartbeat renews that one row, reads the cancel requests and
queue controls, and gives back jobs the database says it runs but it does not hold; it locks no
job. If the lease cannot be confirmed within its length, the watchdog stops every execution of
that incarnation (the rescuer takes its jobs back) and registers a new incarnation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import PoolTimeout

from pgsched.db import describe
from pgsched.errors import DatabaseUnreachable

from . import queries
from .attempts import State

if TYPE_CHECKING:
    from pgsched.client import App
    from pgsched.config import Settings

    from .attempts import Attempt
    from .outcomes import Stats
    from .writer import Writer

log = logging.getLogger("pgsched.worker")


class LeaseKeeping:
    """Starting, registering, renewing and losing the incarnation's lease; mixed into ``Worker``."""

    # What the worker provides (worker/runtime.py).
    app: App
    lease: uuid.UUID
    options: Settings
    attempts: dict[tuple[int, int], Attempt]
    stats: Stats
    writer: Writer
    _pool: Any
    _registration: dict[str, Any]
    _live: bool
    _lease_until: float
    _reserved: int
    _wake: asyncio.Event
    _stopping: asyncio.Event

    if TYPE_CHECKING:

        def _cancel(self, job_id: int) -> None: ...

        async def _apply_controls(self, rows: list[Any]) -> None: ...

        def _drop(self, attempt: Attempt) -> None: ...

        async def _read_controls(self) -> None: ...

    async def _start(self) -> None:
        """Check the schema, write the task catalog, register this incarnation and read the queue
        controls. The database was reachable a moment ago (the caller waited for it): losing it
        now (a restart) is waited out like an unreachable one at start, up to ``wait_for_db``
        seconds, not a reason to exit. Every step can be run again."""
        deadline = time.monotonic() + self.options.wait_for_db
        pause = 0.5
        while True:
            try:
                await self.app.open_async()  # schema check and task catalog
                await self.app.register_runner_async()  # this process runs them: their execution options
                await self._pool.open(wait=True, timeout=max(1.0, deadline - time.monotonic()))
                await self._register()
                await self._read_controls()  # which of its queues the plain claim must leave alone
                return
            except (psycopg.OperationalError, PoolTimeout, DatabaseUnreachable) as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    raise
                pause = min(pause, left)
                log.warning("starting: %s; trying again in %.1f s", describe(exc), pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def _register(self) -> None:
        """Register the current incarnation; its lease counts from before the statement was sent."""
        sent = time.monotonic()
        async with self._pool.connection() as conn:
            await conn.execute(queries.REGISTER, {**self._registration, "worker": self.lease})
        self._lease_until = sent + self.options.lease_seconds
        self._live = True
        self._wake.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_seconds)
            try:
                # Bounded: a heartbeat that has not come back by the end of the lease is useless.
                async with asyncio.timeout(max(self.options.heartbeat_seconds, self._lease_until - time.monotonic())):
                    await self._heartbeat_once()
            except (psycopg.Error, TimeoutError) as exc:
                log.warning("heartbeat failed, will retry: %s", describe(exc) if str(exc) else "timed out")
            if self.writer.logs.rows:  # a running job's log lines wait for no outcome (jobs logs --follow)
                self.writer.wake()

    async def _heartbeat_once(self) -> None:
        """Renew the lease, read the cancel requests and the queue controls: one round trip."""
        lease = self.lease
        if not self._live:
            return  # the watchdog registers a new incarnation
        ids = [
            a.job.id for a in self.attempts.values() if a.lease == lease and a.state in (State.BUFFERED, State.RUNNING)
        ]
        held = [a.job.id for a in self.attempts.values() if a.lease == lease]
        params = {**self._registration, "worker": lease, "ids": ids, "held": held}
        # Whether any claim could have changed this incarnation's jobs while the heartbeat looked.
        claims_before, quiet = self.stats.claims, self._reserved == 0
        sent = time.monotonic()
        async with self._pool.connection() as conn:
            async with conn.pipeline():
                renewed = await conn.execute(queries.HEARTBEAT, params)
                cancels = await conn.execute(queries.CANCEL_REQUESTS, params)
                controls = await conn.execute(queries.CONTROLS, params)
                unknown = await conn.execute(queries.UNKNOWN_CLAIMS, params)
            confirmed = await renewed.fetchone() is not None
            cancel_ids = [row[0] for row in await cancels.fetchall()]
            control_rows = await controls.fetchall()
            unknown_ids = [row[0] for row in await unknown.fetchall()]
        if lease != self.lease:
            return  # lost while the heartbeat was on its way
        if not confirmed:
            self._lose_lease("the database says it expired")
            return
        self._lease_until = sent + self.options.lease_seconds
        for job_id in cancel_ids:
            self._cancel(job_id)
        await self._apply_controls(control_rows)
        if unknown_ids and quiet and self._reserved == 0 and self.stats.claims == claims_before:
            await self._give_back_unknown(unknown_ids, lease)

    async def _give_back_unknown(self, ids: list[int], lease: uuid.UUID) -> None:
        """Jobs the database says this incarnation runs, which it does not hold: a claim committed
        whose reply never came (its session was cut after the commit). Nobody would ever run
        them, and the rescuer leaves them alone while the lease lives: put them back."""
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(queries.RELEASE, {"ids": ids, "worker": lease})).fetchall()
            queues = sorted({queue for _, queue, state in rows if state == "queued"})
            if queues:
                await conn.execute(queries.WAKE, (queues,))
        if rows:
            log.warning("worker %s gives back %d jobs claimed in a reply it never got: %s", lease, len(rows), ids[:20])

    async def _watch_lease(self) -> None:
        """Give up the incarnation when its lease runs out unconfirmed; register a new one."""
        while True:
            if self._live:
                left = self._lease_until - time.monotonic()
                if left > 0:
                    await asyncio.sleep(left)
                    continue
                self._lose_lease(f"not confirmed for {self.options.lease_seconds:g} s")
            try:
                async with asyncio.timeout(self.options.lease_seconds):
                    self.lease = uuid.uuid4()
                    await self._register()
                log.warning("worker registered again as %s", self.lease)
            except (psycopg.Error, TimeoutError) as exc:
                log.warning("registering the worker failed, will retry: %s", describe(exc) if str(exc) else "timed out")
                await asyncio.sleep(random.uniform(0.5, 1.5))

    def _lose_lease(self, reason: str) -> None:
        """The incarnation's lease is gone: stop and forget every job it holds that has no outcome
        yet (the rescuer takes them back); buffered outcomes are still written, fenced."""
        if not self._live:
            return
        self._live = False
        lost = [
            a for a in self.attempts.values() if a.lease == self.lease and a.state in (State.BUFFERED, State.RUNNING)
        ]
        log.warning("worker %s lost its lease (%s): stopping its %d jobs", self.lease, reason, len(lost))
        for attempt in lost:
            self._drop(attempt)
        self.stats.lost += len(lost)
        self._wake.set()
