"""What a worker writes: checkpoints, run logs and outcomes, buffered and flushed in batches.

One flush writes, in this order, the checkpoints (a checkpoint precedes its outcome), the run
logs, and up to ``FLUSH_BATCH`` outcomes in one fenced statement (``queries.COMPLETE``). The
first outcome of a batch waits ``FLUSH_SECONDS`` for others, unless it is urgent (a capped job,
whose slot frees only when its outcome is written). What could not be written stays buffered
and is tried again; the leases keep those jobs ours meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from pgsched.jobs import Job

from . import queries
from .outcomes import Outcome, Stats, complete_params
from .runlog import RunLogBuffer

log = logging.getLogger("pgsched.worker")

FLUSH_BATCH = 1000
# How long the first outcome of a batch waits for others before the batch is written.
FLUSH_SECONDS = 0.002


class Writer:
    """The worker's write buffer; ``written(batch)`` is called once a batch of outcomes is stored."""

    def __init__(self, worker: uuid.UUID, stats: Stats, written: Callable[[list[Outcome]], None]) -> None:
        self.worker = worker
        self.stats = stats
        self.written = written
        self.logs = RunLogBuffer()
        self.pending: list[Outcome] = []
        self._progress: dict[tuple[int, int], str] = {}
        self._now = asyncio.Event()
        self._urgent = False

    def add(self, outcome: Outcome, *, urgent: bool = False) -> None:
        self.pending.append(outcome)
        self._urgent = self._urgent or urgent
        self._now.set()

    def add_progress(self, job: Job, encoded: str, loop: asyncio.AbstractEventLoop) -> None:
        # Called from task threads too: hand the write to the event loop.
        self._progress[(job.id, job.attempts)] = encoded
        loop.call_soon_threadsafe(self._now.set)

    def holds_outcome(self, job_id: int) -> bool:
        return any(o.job.id == job_id for o in self.pending)

    async def run(self, pool: Any) -> None:
        while True:
            await self._now.wait()
            self._now.clear()
            if not self._urgent:
                await asyncio.sleep(FLUSH_SECONDS)  # let the batch gather
            self._urgent = False
            await self.flush(pool)

    async def flush(self, pool: Any) -> None:
        progress, self._progress = self._progress, {}
        logs = self.logs.take()
        batch, self.pending = self.pending[:FLUSH_BATCH], self.pending[FLUSH_BATCH:]
        if not (progress or logs or batch):
            return
        try:
            async with pool.connection() as conn:
                for (job_id, attempt), encoded in progress.items():
                    await conn.execute(
                        queries.SET_PROGRESS,
                        {"id": job_id, "attempt": attempt, "progress": encoded, "worker": self.worker},
                    )
                if logs:
                    await conn.execute(queries.INSERT_LOGS, logs)
                if batch:
                    cur = await conn.execute(queries.COMPLETE, complete_params(batch, self.worker))
                    self.stats.count(batch, {row[0] for row in await cur.fetchall()})
        except psycopg.Error as exc:
            log.warning("writing outcomes failed, will retry: %s", exc)
            self.pending[:0] = batch
            for key, value in progress.items():
                self._progress.setdefault(key, value)
            await asyncio.sleep(0.5)
            return
        if self.pending:
            self._now.set()
        self.written(batch)
