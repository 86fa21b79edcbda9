"""The worker: claims jobs, runs them, keeps its lease, records outcomes.

Every job the worker holds is an ``Attempt`` (worker/attempts.py: its state machine), kept by
``(job id, attempt)``; capacity (``concurrency + prefetch``) counts every attempt whose outcome
is not yet written, so slow writes stop claims instead of piling up jobs.

Liveness (DESIGN §8): the worker runs as an *incarnation*, a fresh id registered in
``pgsched.workers`` with one lease that covers every job it holds. The heartbeat renews that one
row and reads the cancel requests of its jobs; it locks no job. If the lease cannot be confirmed
within its length (the database said it expired, or no heartbeat got through in time), the
worker stops every execution of that incarnation, forgets those jobs (the rescuer takes them
back; outcomes already buffered are still written, fenced on the old incarnation) and registers
a new incarnation (worker/lease.py). So the worker never mistakes a job it lost for one it
holds, even when it claims the same job again.

One asyncio task per concern: claiming, ``concurrency`` execution slots, the flusher
(worker/writer.py), the heartbeat, the lease watchdog and the listener.

Shutdown order (SIGTERM/SIGINT, or ``stop()``): stop claiming; release the prefetched jobs at
once; give running jobs ``grace_seconds``; stop what is left and release it (recorded as
``interrupted``); write every buffered outcome (the flusher drains completely, retrying while the
database is unreachable); remove the ``workers`` row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from typing import Any

import psycopg
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from pgsched import __version__
from pgsched.client import App
from pgsched.config import Settings
from pgsched.context import Context
from pgsched.db import configure_adapters, describe
from pgsched.jobs import Job

from . import queries
from .attempts import LIVE, Attempt, State
from .controls import Claim, Controls, claimed_row
from .execution import Execution, lenient_loads
from .lease import LeaseKeeping
from .outcomes import Outcome, Stats, complete_params, log_finished
from .run_encryption import sealed
from .runlog import TaskLogHandler, current_run
from .threads import TaskThreads
from .writer import Writer

log = logging.getLogger("pgsched.worker")


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    configure_adapters(conn.adapters)
    set_json_loads(lenient_loads, conn.adapters)


class _RunSink:
    """Where one attempt's Context sends its log lines and checkpoints (from its thread, too)."""

    def __init__(self, worker: Worker, attempt: Attempt) -> None:
        self.worker = worker
        self.attempt = attempt

    def log(self, run: Context, level: str, message: str) -> None:
        self.worker.writer.logs.add(run.job, "log", level, message, run._keyring, self.attempt.db_now())

    def progress(self, job: Job, encoded: str) -> None:
        self.worker._loop.call_soon_threadsafe(self.worker.writer.add_progress, self.attempt, encoded)


class Worker(LeaseKeeping):
    """One worker process's runtime, configured by the worker fields of ``Settings``.

    ``await Worker(app).run()`` (options from the app's settings) or ``Worker(app, settings)``.
    """

    def __init__(self, app: App, settings: Settings | None = None) -> None:
        self.app = app
        self.options = settings or app.settings
        self.options.check_worker()
        self.lease = uuid.uuid4()  # the current incarnation
        self.stats = Stats()
        kinds = [k for k, on in (("shell", self.options.allow_shell), ("http", True)) if on]
        self.runnable = sorted({*app.tasks, *kinds})
        self.capacity = self.options.concurrency + self.options.prefetch
        self.attempts: dict[tuple[int, int], Attempt] = {}
        self.local: asyncio.Queue[Attempt] = asyncio.Queue()
        self.writer = Writer(self.stats, self._written, self._executing)
        self.threads = TaskThreads(self.options.concurrency)
        self.execution = Execution(
            app, self.threads, self.writer.logs, lambda: self._pool, self.options.allow_private_http
        )
        self._queues = list(self.options.queue_list)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._no_grace = False  # stop_now(): running jobs get no grace period
        self._live = False  # the incarnation's lease is confirmed
        self._lease_until = 0.0  # monotonic time until which it is
        self._busy = False  # the last claim got all it asked for: the queues have more
        self._reserved = 0  # capacity promised to the claim on its way
        self.controls = Controls({t.name for t in app.tasks.values() if t.max_per_key is not None})
        # What REGISTER writes, and what CONTROLS reads (a claim adds its queues, tasks and limit).
        self._registration = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": list(self.options.queue_list),
            "tasks": self.runnable,
            "concurrency": self.options.concurrency,
            "with_scheduler": self.options.scheduler,
            "version": __version__,
            "lease": self.options.lease_seconds,
        }
        self._pool: Any = None

    @property
    def id(self) -> uuid.UUID:
        """The current incarnation (``pgsched.workers.id``, ``jobs.worker_id``)."""
        return self.lease

    @property
    def held(self) -> int:
        """Jobs held: claimed and not yet written or released."""
        return len(self.attempts)

    @property
    def running(self) -> int:
        """Jobs executing now."""
        return len(self._running())

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stopping.set()
        self._wake.set()

    def stop_now(self) -> list[Job]:
        """Stop without the grace period (a deliberate second signal): running jobs are stopped
        and put back at once, as at the end of a grace period. Returns the jobs it leaves."""
        self._no_grace = True
        self.stop()
        return [a.job for a in self._running()]

    async def run(self) -> Stats:
        """Run until stopped (or, with ``burst``, until the queues are empty)."""

        self._loop = asyncio.get_running_loop()
        self._pool = AsyncConnectionPool(
            self.app.dsn,
            min_size=2,
            max_size=4,
            # Keepalives find a connection whose peer vanished (the heartbeat must not hang on it).
            kwargs={"autocommit": True, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2},
            configure=_configure,
            open=False,
        )
        handler = TaskLogHandler()
        logging.getLogger().addHandler(handler)
        try:
            await self._start()
            log.info(
                "worker %s started: queues %s, concurrency %d",
                self.lease,
                ",".join(self._queues),
                self.options.concurrency,
            )
            flusher = asyncio.create_task(self.writer.run(self._pool), name="flush")
            background = [
                asyncio.create_task(self._listen(), name="listen"),
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                asyncio.create_task(self._watch_lease(), name="lease"),
            ]
            for task in [flusher, *background]:
                task.add_done_callback(self._stop_if_failed)
            slots = [asyncio.create_task(self._slot(), name=f"slot-{i}") for i in range(self.options.concurrency)]
            await self._claim_loop()
            await self._shutdown(slots)
            log.info("stopping: writing %d buffered outcomes", len(self.writer.pending))
            self.writer.close()
            await flusher  # every buffered outcome is written (the heartbeat keeps the lease meanwhile)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            async with self._pool.connection() as conn:
                await conn.execute(queries.UNREGISTER, {"worker": self.lease})
        finally:
            logging.getLogger().removeHandler(handler)
            await self._pool.close()
            self.threads.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped: %s", self.lease, self.stats.summary())
        return self.stats

    def _stop_if_failed(self, task: asyncio.Task[Any]) -> None:
        """A background task that dies of a bug must not leave the worker claiming without it:
        stop (its error is raised where the task is awaited, and the process exits with it)."""
        if not task.cancelled() and task.exception() is not None:
            log.critical("worker task %s failed: %r; stopping", task.get_name(), task.exception())
            self.stop()

    async def _shutdown(self, slots: list[asyncio.Task[Any]]) -> None:
        await self._release_waiting()  # prefetched jobs never started: give them back now
        deadline = time.monotonic() + self.options.grace_seconds
        while self._running() and time.monotonic() < deadline and not self._no_grace:
            await asyncio.sleep(0.01)
        running = self._running()
        if running:
            for attempt in running:
                attempt.interrupted = True
                attempt.stop()
            while any(a.slot is not None for a in running):  # until every execution has returned
                await asyncio.sleep(0.01)
            # A sync task whose thread still runs cannot be stopped: putting its job back now
            # could run it twice at once. It keeps its lease (no more heartbeats): the rescuer
            # takes it back after the lease, when this process is long gone.
            stuck = [a for a in running if a.ctx is not None and a.ctx._thread_busy]
            if stuck:
                ids = [a.job.id for a in stuck]
                log.warning("jobs %s are still running in threads; they will be rescued after their lease", ids)
            await self._release([a for a in running if a not in stuck and a.state is State.RUNNING], interrupted=True)
            for attempt in stuck:
                self._drop(attempt)
        for slot in slots:
            slot.cancel()
        await asyncio.gather(*slots, return_exceptions=True)

    def _executing(self) -> bool:
        """Whether an attempt may still end soon (one runs or waits for a slot)."""
        return any(a.state in (State.BUFFERED, State.RUNNING) for a in self.attempts.values())

    def _running(self) -> list[Attempt]:
        return [a for a in self.attempts.values() if a.state is State.RUNNING and a.lease == self.lease]

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        # Capacity frees as outcomes are written (``_written`` wakes this loop while the queues
        # are busy); otherwise it claims on a NOTIFY or its poll.
        batch = self._batch
        while not self._stopping.is_set():
            free = self._free()
            if self._live and free > 0 and (free >= batch or not self._busy):
                # Burst mode ends on an empty claim only if nothing was held when it began: an
                # outcome written during the claim (after its snapshot) may have freed a capped
                # slot or released a dependent that this claim could not see.
                held_before = bool(self.attempts)
                got = await self._claim(free)
                self._busy = got == free
                if self.options.burst and got == 0 and not held_before and not self.attempts:
                    return
                if self._busy and self._free() >= batch:
                    continue
            self._wake.clear()
            poll = self.options.poll_seconds * random.uniform(0.8, 1.2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=poll)

    @property
    def _batch(self) -> int:
        # While the queues have more than we can take, claim in batches of at least a quarter of
        # the capacity rather than one job per freed slot: a quarter lets the next claim run while
        # the rest of the last batch's outcomes are still being written.
        return max(1, self.capacity // 4)

    def _free(self) -> int:
        """Capacity left for a new claim: neither held nor promised to the claim on its way."""
        return self.capacity - len(self.attempts) - self._reserved

    def _claims(self) -> list[Claim]:
        self._queues.append(self._queues.pop(0))  # rotate: every queue gets to be first
        return self.controls.claims(self._queues, self.runnable)

    async def _claim(self, limit: int) -> int:
        got = 0
        self._reserved += limit
        try:
            for sql, queues, tasks in self._claims():
                if got >= limit:
                    break
                got += await self._claim_from(sql, queues, tasks, limit - got)
        finally:
            self._reserved -= limit
        return got

    async def _claim_from(self, sql: str, queues: list[str], tasks: list[str], limit: int) -> int:
        lease = self.lease
        params = {"worker": lease, "queues": queues, "tasks": tasks, "limit": limit}
        self.stats.claims += 1
        try:
            async with self._pool.connection() as conn, conn.cursor(row_factory=claimed_row) as cur:
                await cur.execute(sql, params)
                claimed = await cur.fetchall()
        except psycopg.Error as exc:
            log.warning("claim failed, will retry: %s", describe(exc))
            await asyncio.sleep(min(self.options.poll_seconds, 1.0))
            return 0
        return self._take(claimed, lease)

    def _take(self, claimed: list[Any], lease: uuid.UUID) -> int:
        """Hold the jobs a claim of this incarnation returned, queued for the slots."""
        count = 0
        for job, dependency_results, next_claim_in in claimed:
            if job is None:  # a rate-limited queue is full: claim again when its next start is allowed
                self._loop.call_later(max(next_claim_in, 0.001), self._wake.set)
                continue
            results = {int(k): v for k, v in dependency_results.items()} if dependency_results else None
            attempt = Attempt(job, lease, results)
            self.attempts[attempt.key] = attempt
            if lease != self.lease:  # the lease was lost while the claim ran: the rescuer has these
                self._drop(attempt)
                continue
            self.local.put_nowait(attempt)
            count += 1
        self.stats.claimed += count
        return count

    async def _read_controls(self) -> None:
        """Re-read the queue controls (on a settings notice; every heartbeat reads them too)."""
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(queries.CONTROLS, self._registration)).fetchall()
        await self._apply_controls(rows)

    async def _apply_controls(self, rows: list[Any]) -> None:
        newly_paused, changed = self.controls.update(rows)
        if newly_paused:
            await self._release_waiting(newly_paused)
        if changed:
            self._wake.set()  # resumed, or limits changed: claim with the new view at once

    async def _release_waiting(self, queues: set[str] | None = None) -> None:
        """Give back the claimed-but-not-started jobs of these (just paused) queues, or all."""
        waiting = [self.local.get_nowait() for _ in range(self.local.qsize())]
        back = []
        for attempt in waiting:
            if attempt.state is State.BUFFERED and (queues is None or attempt.job.queue in queues):
                back.append(attempt)
            else:
                self.local.put_nowait(attempt)
        await self._release(back, interrupted=False)

    # -- execution ---------------------------------------------------------------------------

    async def _slot(self) -> None:
        while True:
            attempt = await self.local.get()
            if attempt.state is not State.BUFFERED:
                continue  # dropped while it waited (lease lost)
            if attempt.cancel_requested:  # cancelled while it waited: never started
                now = attempt.db_now()
                self._finish(attempt, Outcome(attempt.job, "cancelled", "cancelled", now, now))
                continue
            await self._execute(attempt)

    async def _execute(self, attempt: Attempt) -> None:
        job = attempt.job
        ctx = Context(job, _RunSink(self, attempt), attempt.dependency_results)
        slot = asyncio.current_task()
        assert slot is not None
        # The job runs in this slot's own task: stopping it means cancelling this task after
        # setting ctx.cancelled (see Execution.outcome), which costs no task per job.
        attempt.start(ctx, slot)
        current_run.set(ctx)
        self.writer.logs.open(job)
        try:
            outcome = await self.execution.outcome(attempt, ctx)
        finally:
            attempt.slot = None  # the execution has returned (a sync task's thread may run on)
            current_run.set(None)
            self.writer.logs.finish(job, ctx._keyring, attempt.db_now())
            if self._busy or self.options.burst:
                # More jobs were waiting at the last claim: claim again now that a slot is free.
                # (Otherwise new work announces itself by NOTIFY or the poll; waking here would
                # only send an empty claim after every job.)
                self._wake.set()
        if outcome is not None:
            if ctx._keyring is not None:
                outcome = sealed(outcome, ctx._keyring)
            self._finish(attempt, outcome)

    def _finish(self, attempt: Attempt, outcome: Outcome) -> None:
        outcome.finished_at = attempt.db_now()
        if attempt.finish(outcome):
            log_finished(outcome)
            # A capped job's slot frees only when its outcome is written: no gathering delay.
            self.writer.add(attempt, urgent=self.controls.limits(attempt.job))

    # -- giving jobs back --------------------------------------------------------------------

    def _written(self, attempts: list[Attempt]) -> None:
        """These outcomes are stored (or fenced): those jobs are no longer ours."""
        for attempt in attempts:
            attempt.written()
            self._forget(attempt)
            if self.controls.limits(attempt.job):
                self._wake.set()  # a capped slot is free now that the outcome is written
        if self._busy or self.options.burst:
            # Capacity counts unwritten outcomes: with more work waiting, claim again now
            # (burst mode: the claim loop decides whether everything is done).
            self._wake.set()

    async def _release(self, attempts: list[Attempt], *, interrupted: bool) -> None:
        """Put jobs of the current incarnation back in the queue without counting the attempt."""
        if not attempts:
            return
        params = {"ids": [a.job.id for a in attempts], "worker": self.lease}
        try:
            async with self._pool.connection() as conn, conn.transaction():
                if interrupted:
                    # Record the interrupted attempts with their jobs' return to the queue.
                    outcomes = [
                        Outcome(a.job, "running", "interrupted", a.job.started_at, a.db_now())  # type: ignore[arg-type]
                        for a in attempts
                    ]
                    leases = [a.lease for a in attempts]
                    await conn.execute(
                        queries.INSERT_INTERRUPTED, {**complete_params(outcomes, leases), "worker": self.lease}
                    )
                cur = await conn.execute(queries.RELEASE, params)
                rows = await cur.fetchall()
                queues = sorted({queue for _, queue, state in rows if state == "queued"})
                if queues:
                    await conn.execute(queries.WAKE, (queues,))
        except psycopg.Error as exc:
            # The database still says they are ours: forgetting them under a live lease would
            # leave them running forever. While stopping, they stay held (the workers row then
            # outlives this process and the rescuer takes them back after the lease); else a
            # prefetched job goes back to the local queue and runs here after all.
            log.warning("giving back %d jobs failed: %s", len(attempts), exc)
            if not self._stopping.is_set():
                for attempt in attempts:
                    if attempt.state is State.BUFFERED:
                        self.local.put_nowait(attempt)
            return
        for attempt in attempts:
            self._drop(attempt)
        self.stats.released += sum(1 for _, _, state in rows if state == "queued")
        self.stats.cancelled += sum(1 for _, _, state in rows if state == "cancelled")

    def _drop(self, attempt: Attempt) -> None:
        """No longer ours without an outcome of ours (released, or its lease lost): stop it if it runs."""
        attempt.release()
        self._forget(attempt)

    def _forget(self, attempt: Attempt) -> None:
        if self.attempts.get(attempt.key) is attempt:
            del self.attempts[attempt.key]

    # -- cancels and listening -----------------------------------------------------------------

    def _cancel(self, job_id: int) -> None:
        """Stop the job (cancel requested): now if it runs, when a slot takes it if it waits."""
        for attempt in list(self.attempts.values()):
            if attempt.job.id != job_id or attempt.state not in LIVE:
                continue
            if attempt.state is State.RUNNING and attempt.ctx is not None and not attempt.ctx.cancelled:
                attempt.stop()
            elif attempt.state is State.BUFFERED:
                attempt.cancel_requested = True

    async def _listen(self) -> None:
        """LISTEN for wake-ups and cancels; reconnect when the connection drops. Polling covers the gaps."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.app.dsn, autocommit=True) as conn:
                    for listen in queries.LISTEN:
                        await conn.execute(listen)
                    # Anything that happened while we were not listening: a pause, new jobs.
                    await self._read_controls()
                    self._wake.set()
                    async for note in conn.notifies():
                        if note.channel == "pgsched_cancel":
                            self._cancel(int(note.payload))
                        elif note.payload not in self._queues:
                            continue
                        elif note.channel == "pgsched_queue_settings":
                            await self._read_controls()
                            self._wake.set()  # a cap may have grown: claim under the new settings
                        else:
                            self._wake.set()
            except psycopg.Error as exc:
                log.warning("listener connection lost, reconnecting: %s", describe(exc))
                await asyncio.sleep(random.uniform(0.5, 1.5))
