"""The worker: claims jobs, runs them, heartbeats their leases, records outcomes.

A job held by this worker moves through::

    claimed ──▶ local queue ──▶ running ──▶ outcome buffered ──▶ flushed (fenced UPDATE + runs row)
       │             │              │
       └─ shutdown ──┴── released ◀─┘ (back to queued, attempt not counted)

Every held job (prefetched, running, or finished but not yet flushed) is in
``held`` and covered by the heartbeat, so no lease lapses while its outcome
waits in the buffer. Capacity (``concurrency + prefetch``) counts only the
unfinished ones, so claiming goes on while outcomes are being written. One
asyncio task per concern: claiming, ``concurrency`` execution slots, the
flusher, the heartbeat and the listener.

Shutdown order (SIGTERM/SIGINT, or ``stop()``): stop claiming; release the
prefetched jobs at once; give running jobs ``grace_seconds``; cancel what is
left and release it (recorded as ``interrupted``); flush every buffered
outcome; remove the ``workers`` row. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from pgsched import __version__
from pgsched.backoff import DEFAULT_BACKOFF
from pgsched.client import App
from pgsched.config import Settings
from pgsched.context import Context
from pgsched.db import configure_async
from pgsched.errors import EncryptionError
from pgsched.jobs import Job
from pgsched.outcomes import Cancel, Retry, Snooze
from pgsched.validation import EXECUTOR_KINDS

from . import queries
from .controls import Controls, claimed_row
from .executors import NotRetryable, creator_may_run_commands, job_timeout, run_http, run_python, run_shell
from .outcomes import Outcome, Stats, complete_params, ended, failure, result_outcome
from .payloads import open_payloads, sealed
from .runlog import TaskLogHandler, current_run
from .writer import Writer

log = logging.getLogger("pgsched.worker")

TRACEBACK_MAX_CHARS = 16_000


class Worker:
    """One worker process's runtime, configured by the worker fields of ``Settings``.

    ``await Worker(app).run()`` (options from the app's settings) or ``Worker(app, settings)``.
    """

    def __init__(self, app: App, settings: Settings | None = None) -> None:
        self.app = app
        self.options = settings or app.settings
        self.options.check_worker()
        self.id = uuid.uuid4()
        self.stats = Stats()
        kinds = [k for k, on in (("shell", self.options.allow_shell), ("http", True)) if on]
        self.runnable = sorted({*app.tasks, *kinds})
        self.capacity = self.options.concurrency + self.options.prefetch
        # Claimed jobs until their outcome is written (the heartbeat covers them all)...
        self.held: dict[int, Job] = {}
        # ...of which these are not finished yet (in the local queue or running): they use capacity.
        self.active = 0
        self.running: dict[int, tuple[asyncio.Task[Any], Context]] = {}
        self.local: asyncio.Queue[Job] = asyncio.Queue()
        self._dependency_results: dict[int, dict[int, Any]] = {}
        self.writer = Writer(self.id, self.stats, self._written)
        self.threads = ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="pgsched-task")
        self._queues = list(self.options.queue_list)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._released_ids: set[int] = set()
        self._lost: set[int] = set()
        self._cancel_before_start: set[int] = set()
        self._busy = False  # the last claim got all it asked for: the queues have more
        self.controls = Controls({t.name for t in app.tasks.values() if t.max_per_key is not None})
        # The worker's own statement parameters: what the heartbeat writes to its row (CONTROLS
        # reads its queues and tasks; a claim adds the queues, tasks and limit of its own).
        self._registration = {
            "worker": self.id,
            "lease": self.options.lease_seconds,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": list(self.options.queue_list),
            "tasks": self.runnable,
            "concurrency": self.options.concurrency,
            "version": __version__,
        }
        self._arrived: dict[int, float] = {}  # job id -> monotonic time its claim returned
        self._pool: Any = None

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> Stats:
        """Run until stopped (or, with ``burst``, until the queues are empty)."""
        from psycopg_pool import AsyncConnectionPool

        self._loop = asyncio.get_running_loop()
        await self.app.open_async()  # schema check and task catalog
        await self.app.register_runner_async()  # this process runs them: their execution options
        self._pool = AsyncConnectionPool(
            self.app.dsn,
            min_size=2,
            max_size=3,
            kwargs={"autocommit": True},
            configure=configure_async,
            open=False,
        )
        await self._pool.open(wait=True)
        handler = TaskLogHandler(self.writer.logs)
        logging.getLogger().addHandler(handler)
        try:
            await self._heartbeat_once()
            log.info(
                "worker %s started: queues %s, concurrency %d",
                self.id,
                ",".join(self._queues),
                self.options.concurrency,
            )
            background = [
                asyncio.create_task(self._listen(), name="listen"),
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                asyncio.create_task(self.writer.run(self._pool), name="flush"),
            ]
            slots = [asyncio.create_task(self._slot(), name=f"slot-{i}") for i in range(self.options.concurrency)]
            await self._claim_loop()
            await self._shutdown(slots)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.writer.flush(self._pool)
            async with self._pool.connection() as conn:
                await conn.execute(queries.UNREGISTER, (self.id,))
        finally:
            logging.getLogger().removeHandler(handler)
            await self._pool.close()
            self.threads.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped: %s", self.id, self.stats)
        return self.stats

    async def _shutdown(self, slots: list[asyncio.Task[Any]]) -> None:
        await self._release_waiting()  # prefetched jobs never started: give them back now
        deadline = time.monotonic() + self.options.grace_seconds
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.running:
            ids = list(self.running)
            self._released_ids.update(ids)
            contexts = {job_id: ctx for job_id, (_, ctx) in self.running.items()}
            for job_id in ids:
                self._stop_running(job_id)
            while self.running:
                await asyncio.sleep(0.01)
            # A sync task whose thread still runs cannot be stopped: putting its job back now
            # could run it twice at once. It keeps its lease (no more heartbeats): the rescuer
            # takes it back after the lease, when this process is long gone.
            stuck = [i for i in ids if contexts[i]._thread_busy]
            if stuck:
                log.warning("jobs %s are still running in threads; they will be rescued after their lease", stuck)
            await self._release([i for i in ids if i not in stuck], interrupted=True)
            for job_id in stuck:
                self._forget(job_id)
        for slot in slots:
            slot.cancel()
        await asyncio.gather(*slots, return_exceptions=True)

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        # While the queues have more than we can take, claim in batches of at least half
        # the capacity rather than one job per freed slot.
        batch = max(1, self.capacity // 2)
        while not self._stopping.is_set():
            free = self.capacity - self.active
            if free > 0 and (free >= batch or not self._busy):
                # Burst mode ends on an empty claim only if nothing was held when it began: an
                # outcome written during the claim (after its snapshot) may have freed a capped
                # slot or released a dependent that this claim could not see.
                held_before = bool(self.held)
                got = await self._claim(free)
                self._busy = got == free
                if self.options.burst and got == 0 and not held_before and not self.held:
                    return
                if self._busy and self.capacity - self.active >= batch:
                    continue
            self._wake.clear()
            poll = self.options.poll_seconds * random.uniform(0.8, 1.2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=poll)

    async def _claim(self, limit: int) -> int:
        got = 0
        self._queues.append(self._queues.pop(0))  # rotate: every queue gets to be first
        for sql, queues, tasks in self.controls.claims(self._queues, self.runnable):
            if got >= limit:
                break
            got += await self._claim_from(sql, queues, tasks, limit - got)
        return got

    async def _claim_from(self, sql: str, queues: list[str], tasks: list[str], limit: int) -> int:
        params = {**self._registration, "queues": queues, "tasks": tasks, "limit": limit}
        self.stats.claims += 1
        try:
            async with self._pool.connection() as conn, conn.cursor(row_factory=claimed_row) as cur:
                await cur.execute(sql, params)
                claimed = await cur.fetchall()
        except psycopg.Error as exc:
            log.warning("claim failed, will retry: %s", exc)
            await asyncio.sleep(min(self.options.poll_seconds, 1.0))
            return 0
        arrived = time.monotonic()
        count = 0
        for job, dependency_results, next_claim_in in claimed:
            if job is None:  # a rate-limited queue is full: claim again when its next start is allowed
                self._loop.call_later(max(next_claim_in, 0.001), self._wake.set)
                continue
            if dependency_results:
                self._dependency_results[job.id] = {int(k): v for k, v in dependency_results.items()}
            self.held[job.id] = job
            self._arrived[job.id] = arrived
            self.local.put_nowait(job)
            count += 1
        self.active += count
        self.stats.claimed += count
        return count

    def _db_now(self, job: Job) -> datetime:
        """Now on the database clock, for this job's history: its claim's time plus what has elapsed
        here since (host clocks are never trusted, DESIGN §8 "Time")."""
        assert job.started_at is not None
        return job.started_at + timedelta(seconds=time.monotonic() - self._arrived.get(job.id, time.monotonic()))

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
        for job in waiting:
            if queues is not None and job.queue not in queues:
                self.local.put_nowait(job)
        back = [job.id for job in waiting if queues is None or job.queue in queues]
        self.active -= len(back)
        await self._release(back, interrupted=False)

    # -- execution ---------------------------------------------------------------------------

    async def _slot(self) -> None:
        while True:
            job = await self.local.get()
            if self._stopping.is_set():
                self.local.put_nowait(job)
                return
            if job.id in self._lost:  # taken away while it waited in the local queue
                self.active -= 1
                continue
            if job.id in self._cancel_before_start:  # cancelled while it waited: never started
                self._cancel_before_start.discard(job.id)
                now = self._db_now(job)
                self.writer.add(Outcome(job, "cancelled", "cancelled", now, now))
                self.active -= 1
                continue
            await self._execute(job)

    async def _execute(self, job: Job) -> None:
        ctx = Context(job, self, self._dependency_results.pop(job.id, None))
        # The attempt started when it was claimed (attempts are counted there, and the rate
        # limit counts claims): history records that instant, on the database clock.
        started = job.started_at or datetime.now(timezone.utc)
        current_run.set(ctx)
        # The job runs in this slot's own task: stopping it means cancelling this task
        # after setting ctx.cancelled (see _outcome), which costs no task per job.
        slot = asyncio.current_task()
        assert slot is not None
        self.running[job.id] = (slot, ctx)
        try:
            outcome = await self._outcome(job, ctx, started)
        finally:
            self.running.pop(job.id, None)
            current_run.set(None)
            self.writer.logs.finish(job, ctx._keyring)
            self.active -= 1
            if self._busy or self.options.burst:
                # More jobs were waiting at the last claim: claim again now that a slot is free.
                # (Otherwise new work announces itself by NOTIFY or the poll; waking here would
                # only send an empty claim after every job.)
                self._wake.set()
        if outcome is not None:
            if ctx._keyring is not None:
                outcome = sealed(outcome, ctx._keyring)
            outcome.finished_at = self._db_now(job)
            # A capped job's slot frees only when its outcome is written: no gathering delay.
            self.writer.add(outcome, urgent=self.controls.limits(job))

    async def _invoke(self, job: Job, ctx: Context) -> Any:
        if job.task in EXECUTOR_KINDS:
            if not await creator_may_run_commands(self._pool, job):
                raise NotRetryable(f"role {job.created_by!r} may not create {job.task} jobs")
            if job.task == "shell":
                logs = self.writer.logs
                return await run_shell(job.args, lambda stream, line: logs.add(job, stream, None, line, ctx._keyring))
            allow_private = self.options.allow_private_http
            return await run_http(job.args, allow_private=allow_private, threads=self.threads, timeout=job_timeout(job))
        task = self.app.tasks.get(job.task)
        if task is None:
            raise NotRetryable(f"task {job.task!r} is not registered in this worker's app")
        return await run_python(task, ctx, self.threads)

    async def _outcome(self, job: Job, ctx: Context, started: datetime) -> Outcome | None:
        """Run the attempt and classify how it ended (None: not ours to record any more)."""
        try:
            ctx._keyring = open_payloads(self.app, job, ctx)
        except EncryptionError as exc:
            # Not retried: another attempt on a worker without the key fails the same way.
            return self._failure(job, started, "failed", str(exc), final=True)
        timeout = job_timeout(job)
        try:
            async with asyncio.timeout(timeout):
                value = await self._invoke(job, ctx)
        except TimeoutError:
            ctx._cancel()  # a sync task's thread runs on: it can see ctx.cancelled and stop
            return self._failure(job, started, "timeout", f"timed out after {timeout:g} s")
        except asyncio.CancelledError:
            if not ctx.cancelled:
                raise  # the slot itself is being stopped, not this job
            slot = asyncio.current_task()
            assert slot is not None
            slot.uncancel()
            if job.id in self._lost or job.id in self._released_ids:
                return None  # lease lost (someone else owns it now) or released at shutdown
            return ended(job, started, "cancelled", "cancelled")  # keeps the reason given to cancel
        except Retry as exc:
            return self._failure(job, started, "failed", exc.reason, delay=exc.after)
        except Snooze as exc:
            return ended(job, started, "scheduled", "snoozed", delay=exc.seconds)
        except Cancel as exc:
            return ended(job, started, "cancelled", "cancelled", error=exc.reason)
        except NotRetryable as exc:
            return self._failure(job, started, "failed", str(exc), final=True)
        except Exception as exc:
            text = "".join(traceback.format_exception(exc))[-TRACEBACK_MAX_CHARS:]
            return self._failure(job, started, "failed", text)
        return result_outcome(job, started, value)

    def _failure(self, job: Job, started: datetime, outcome: str, error: str, **options: Any) -> Outcome:
        task = self.app.tasks.get(job.task)
        return failure(job, started, outcome, error, task.backoff if task else DEFAULT_BACKOFF, **options)

    # -- RunSink (what a Context reports) ------------------------------------------------------

    def log(self, run: Context, level: str, message: str) -> None:
        self.writer.logs.add(run.job, "log", level, message, run._keyring)

    def progress(self, job: Job, encoded: str) -> None:
        self.writer.add_progress(job, encoded, self._loop)

    # -- writing -------------------------------------------------------------------------------

    def _written(self, batch: list[Outcome]) -> None:
        """A batch of outcomes is stored: those jobs are no longer ours."""
        for outcome in batch:
            self._forget(outcome.job.id)
            self._cancel_before_start.discard(outcome.job.id)
            if self.controls.limits(outcome.job):
                self._wake.set()  # a capped slot is free now that the outcome is written
        if self.options.burst:
            self._wake.set()  # the claim loop decides whether everything is done

    async def _release(self, ids: list[int], *, interrupted: bool) -> None:
        if not ids:
            return
        async with self._pool.connection() as conn:
            if interrupted:
                # Record the interrupted attempts before the jobs go back.
                batch = [
                    Outcome(job, "running", "interrupted", job.started_at or self._db_now(job), self._db_now(job))
                    for job in (self.held[i] for i in ids if i in self.held)
                ]
                await conn.execute(queries.INSERT_INTERRUPTED, complete_params(batch, self.id))
            cur = await conn.execute(queries.RELEASE, {"ids": ids, "worker": self.id})
            queues = sorted({row[1] for row in await cur.fetchall()})
            if queues:
                await conn.execute(queries.WAKE, (queues,))
        for job_id in ids:
            self._forget(job_id)
        self.stats.released += len(ids)

    def _forget(self, job_id: int) -> None:
        self.held.pop(job_id, None)
        self._arrived.pop(job_id, None)

    # -- heartbeat and listening ---------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_seconds)
            try:
                await self._heartbeat_once()
            except psycopg.Error as exc:
                log.warning("heartbeat failed, will retry: %s", exc)

    async def _heartbeat_once(self) -> None:
        """Extend the leases, refresh the workers row and re-read the queue controls: one round trip."""
        ids = list(self.held)
        params = {**self._registration, "ids": ids}
        async with self._pool.connection() as conn:
            async with conn.pipeline():
                leases = await conn.execute(queries.HEARTBEAT, params)
                controls = await conn.execute(queries.CONTROLS, params)
            rows = await leases.fetchall()
            control_rows = await controls.fetchall()
        await self._apply_controls(control_rows)
        alive = {job_id for job_id, _ in rows}
        self._cancel_before_start &= set(self.held)  # forget notices about jobs that are not ours
        for job_id, cancel in rows:
            if cancel:
                self._cancel_running(job_id)
        for job_id in ids:
            if job_id not in alive and job_id in self.held:
                self._lose(job_id)

    def _lose(self, job_id: int) -> None:
        """Our lease on this job is gone: stop it locally and never write its outcome."""
        if self.writer.holds_outcome(job_id):
            return  # finished; the flush will find it fenced and count it
        log.warning("lease of job %d lost; stopping it", job_id)
        self._lost.add(job_id)
        self._forget(job_id)
        self._stop_running(job_id)

    def _stop_running(self, job_id: int) -> None:
        """Set the job's ctx.cancelled and cancel its slot task (the slot tells why by the flag)."""
        if job_id in self.running:
            task, ctx = self.running[job_id]
            ctx._cancel()
            task.cancel()

    def _cancel_running(self, job_id: int) -> None:
        if job_id in self.running:
            if not self.running[job_id][1].cancelled:
                self._stop_running(job_id)
        else:
            # Still in the local queue, or not recorded yet (the notice can arrive between the
            # claim's commit and its rows): checked when a slot takes the job.
            self._cancel_before_start.add(job_id)

    async def _listen(self) -> None:
        """LISTEN for wake-ups and cancels; reconnect when the connection drops. Polling covers the gaps."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.app.dsn, autocommit=True) as conn:
                    await conn.execute("LISTEN pgsched_wakeup")
                    await conn.execute("LISTEN pgsched_cancel")
                    await conn.execute("LISTEN pgsched_queue_settings")
                    self._wake.set()  # anything enqueued while we were not listening
                    async for note in conn.notifies():
                        if note.channel == "pgsched_cancel":
                            self._cancel_running(int(note.payload))
                        elif note.payload not in self._queues:
                            continue
                        elif note.channel == "pgsched_queue_settings":
                            await self._read_controls()
                            self._wake.set()  # a cap may have grown: claim under the new settings
                        else:
                            self._wake.set()
            except psycopg.Error as exc:
                log.warning("listener connection lost, reconnecting: %s", exc)
                await asyncio.sleep(random.uniform(0.5, 1.5))
