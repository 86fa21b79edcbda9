"""What a worker writes: checkpoints, run logs and outcomes, buffered and flushed in batches.

DESIGN §8 "Write path", after River's batch completer:

* Bounded. An outcome waits here while its attempt still counts against the worker's
  capacity (``concurrency + prefetch``), so a worker whose writes are slow stops claiming.
* One flush writes, in this order, the checkpoints (a checkpoint precedes its outcome), the
  run logs, and up to ``FLUSH_BATCH`` outcomes per fenced statement (``queries.COMPLETE``).
  The first outcome of a batch waits up to ``FLUSH_SECONDS`` for others, unless it is urgent
  (a capped job, whose slot frees only when its outcome is written), and no longer than until
  no other can come (every job the worker holds has ended: waiting would only delay the next
  claim).
* A failed flush is retried on its own, with backoff, not when the next outcome arrives.
* A statement the database refuses for its data (a result too large for its column, a NUL in
  a log line) is split until the refused rows are alone: such an outcome is replaced by a
  failure that says why, a refused log line or checkpoint is dropped with a warning. One bad
  row never blocks the others.
* ``close()`` makes the flusher write everything left and return: shutdown drains completely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg

from . import queries
from .attempts import Attempt
from .outcomes import Outcome, Stats, complete_params, failure
from .runlog import LogRow, RunLogBuffer, log_params

log = logging.getLogger("pgsched.worker")

FLUSH_BATCH = 500
# How long the first outcome of a batch waits for others before the batch is written.
FLUSH_SECONDS = 0.002
# Pause after a failed flush: doubled each time up to the maximum, with jitter.
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 5.0

T = TypeVar("T")


def refused(exc: psycopg.Error) -> bool:
    """The database refused the data itself (classes 22 data exception, 23 integrity constraint,
    54 program limit): writing it again cannot succeed; anything else may."""
    return exc.sqlstate is not None and exc.sqlstate[:2] in ("22", "23", "54")


class Writer:
    """The worker's write buffer; ``written(attempts)`` is called once their outcomes are stored."""

    def __init__(
        self,
        stats: Stats,
        written: Callable[[list[Attempt]], None],
        more_coming: Callable[[], bool],
    ) -> None:
        self.stats = stats
        self.written = written
        self.more_coming = more_coming
        self.logs = RunLogBuffer()
        self.pending: list[Attempt] = []
        self._progress: dict[tuple[int, int], tuple[Attempt, str]] = {}
        self._wake = asyncio.Event()
        self._urgent = False
        self._closing = False
        self.failures = 0  # consecutive failed flushes

    def add(self, attempt: Attempt, *, urgent: bool = False) -> None:
        self.pending.append(attempt)
        self._urgent = self._urgent or urgent
        self._wake.set()

    def add_progress(self, attempt: Attempt, encoded: str) -> None:
        """Buffer a checkpoint (on the event loop: threads hand it over with call_soon_threadsafe)."""
        self._progress[attempt.key] = (attempt, encoded)
        self._wake.set()

    def wake(self) -> None:
        """Write what is buffered now (log lines of running jobs, say) without waiting for an outcome."""
        self._wake.set()

    def close(self) -> None:
        """Write everything still buffered, then let ``run`` return."""
        self._closing = True
        self._wake.set()

    @property
    def empty(self) -> bool:
        return not (self.pending or self._progress or self.logs.rows)

    async def run(self, pool: Any) -> None:
        """The flusher: the only writer of this buffer, until ``close()`` and an empty buffer."""
        while not (self._closing and self.empty):
            await self._wake.wait()
            self._wake.clear()
            await self._gather()
            self._urgent = False
            if await self.flush(pool):
                self.failures = 0
                if not self.empty:
                    self._wake.set()
            else:
                self.failures += 1
                pause = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (self.failures - 1))
                await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                self._wake.set()

    async def _gather(self) -> None:
        """Let the batch gather: up to FLUSH_SECONDS, while an attempt still runs or waits for a
        slot (checked at every outcome added, so the batch goes as soon as none can come)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_SECONDS
        while not (self._urgent or self._closing) and self.more_coming() and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._wake.wait()
            self._wake.clear()

    async def flush(self, pool: Any) -> bool:
        """Write what is buffered (outcomes up to FLUSH_BATCH); False if it must be tried again."""
        progress, self._progress = self._progress, {}
        logs = self.logs.take()
        batch, self.pending = self.pending[:FLUSH_BATCH], self.pending[FLUSH_BATCH:]
        done: list[Attempt] = []
        try:
            async with pool.connection() as conn:
                if progress:
                    for (attempt, _), error in await self._store(conn, list(progress.values()), _write_progress):
                        log.warning("checkpoint of job %d refused by the database: %s", attempt.job.id, error)
                    progress = {}
                if logs:
                    for row, error in await self._store(conn, logs, _write_logs):
                        log.warning("a log line of job %d refused by the database: %s", row[0], error)
                    logs = []
                if batch:
                    await self._write_outcomes(conn, batch, done)
        except psycopg.Error as exc:
            log.warning("writing outcomes failed, will retry: %s", exc)
            self.pending[:0] = [a for a in batch if a not in done]
            for key, value in progress.items():
                self._progress.setdefault(key, value)
            self.logs.put_back(logs)
            return False
        finally:
            if done:
                self.written(done)
        return True

    async def _write_outcomes(self, conn: Any, batch: list[Attempt], done: list[Attempt]) -> None:
        async def write(conn: Any, attempts: Sequence[Attempt]) -> None:
            outcomes = [a.outcome for a in attempts if a.outcome is not None]
            cur = await conn.execute(queries.COMPLETE, complete_params(outcomes, [a.lease for a in attempts]))
            self.stats.count(outcomes, {row[0] for row in await cur.fetchall()})
            done.extend(attempts)

        for attempt, exc in await self._store(conn, batch, write):
            # Its outcome cannot be stored as it is (a result over the column's limit, say):
            # the attempt fails for good with the reason instead, and if even that is refused,
            # with a reason that holds nothing of the task's.
            outcome = attempt.outcome
            assert outcome is not None
            log.error("outcome of job %d refused by the database: %s", outcome.job.id, exc)
            for reason in (f"the outcome could not be stored: {exc}"[:4000], "the outcome could not be stored"):
                attempt.outcome = _replaced(outcome, reason)
                if not await self._store(conn, [attempt], write):
                    break
            else:
                log.error("job %d is left running: not even a failure could be stored for it", outcome.job.id)
                done.append(attempt)

    async def _store(
        self, conn: Any, items: Sequence[T], write: Callable[[Any, Sequence[T]], Awaitable[None]]
    ) -> list[tuple[T, psycopg.Error]]:
        """Write items in one statement; if the database refuses their data, in halves, until the
        refused items are alone. Returns those with their error; other errors propagate."""
        try:
            await write(conn, items)
            return []
        except psycopg.Error as exc:
            if not refused(exc):
                raise
            if len(items) == 1:
                return [(items[0], exc)]
        middle = len(items) // 2
        return await self._store(conn, items[:middle], write) + await self._store(conn, items[middle:], write)


def _replaced(outcome: Outcome, reason: str) -> Outcome:
    replaced = failure(outcome.job, outcome.started_at, "failed", reason, final=True)
    replaced.finished_at = outcome.finished_at
    return replaced


async def _write_progress(conn: Any, items: Sequence[tuple[Attempt, str]]) -> None:
    for attempt, encoded in items:
        params = {"id": attempt.job.id, "attempt": attempt.job.attempts, "progress": encoded, "worker": attempt.lease}
        await conn.execute(queries.SET_PROGRESS, params)


async def _write_logs(conn: Any, rows: Sequence[LogRow]) -> None:
    await conn.execute(queries.INSERT_LOGS, log_params(rows))
