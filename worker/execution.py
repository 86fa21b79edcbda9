"""How one attempt runs, and how it ended: from a claimed job to an ``Outcome``.

Python tasks run through their app (async on the loop, sync in the worker's threads), ``shell``
and ``http`` jobs through worker/executors.py. Everything a job can do is classified here: a
value, an exception (retried with the task's backoff), ``Retry``, ``Snooze``, ``Cancel``, a
timeout, a cancel request, a payload this worker cannot open. ``None`` means the attempt is no
longer this worker's to record (its lease was lost, or the shutdown interrupted it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from pgsched.backoff import DEFAULT_BACKOFF
from pgsched.client import App
from pgsched.context import Context
from pgsched.errors import EncryptionError
from pgsched.jobs import Job
from pgsched.task_control import Cancel, Retry, Snooze
from pgsched.validation import EXECUTOR_KINDS

from .attempts import Attempt, State
from .executors import NotRetryable, creator_may_run_commands, job_timeout, run_http, run_python, run_shell
from .outcomes import Outcome, ended, failure, result_outcome, task_traceback
from .run_encryption import KEY_WAIT_SECONDS, KeyNotHere, open_payloads
from .runlog import RunLogBuffer
from .threads import TaskThreads

log = logging.getLogger("pgsched.worker")

TRACEBACK_MAX_CHARS = 16_000


class Unreadable:
    """A JSON value the worker could not decode (nested too deep for msgspec, say): the job that
    carries it fails alone with the reason, instead of the whole claim failing after its commit."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def lenient_loads(data: str | bytes) -> Any:
    """The worker connections' JSON decoder: an undecodable value becomes ``Unreadable``."""
    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        return Unreadable(str(exc))


class Execution:
    """Runs attempts for one worker: its app, its threads, its log buffer, its pool (for the
    creator check of ``shell``/``http`` jobs) and whether ``http`` may reach private addresses."""

    def __init__(
        self, app: App, threads: TaskThreads, logs: RunLogBuffer, pool: Callable[[], Any], allow_private_http: bool
    ) -> None:
        self.app = app
        self.threads = threads
        self.logs = logs
        self.pool = pool
        self.allow_private_http = allow_private_http

    async def outcome(self, attempt: Attempt, ctx: Context) -> Outcome | None:
        """Run the attempt and classify how it ended (None: not ours to record any more)."""
        job = attempt.job
        # The attempt started when it was claimed (attempts are counted there, and the rate
        # limit counts claims): history records that instant, on the database clock.
        started = job.started_at
        assert started is not None
        for name in ("args", "progress"):
            if isinstance(getattr(job, name), Unreadable):
                reason = getattr(job, name).reason
                return self._failure(job, started, "failed", f"the job's {name} cannot be read: {reason}", final=True)
        try:
            ctx._keyring = open_payloads(self.app, job, ctx)
        except KeyNotHere as exc:
            # Left for a worker that has the key (the attempt does not count), not failed: during
            # a staged key rollout some workers have a new key before others.
            log.warning("job %d: %s; it waits %g s for a worker that has it", job.id, exc, KEY_WAIT_SECONDS)
            return ended(job, started, "scheduled", "snoozed", delay=KEY_WAIT_SECONDS, error=str(exc))
        except EncryptionError as exc:
            # Not retried: another attempt on a worker without the key fails the same way.
            return self._failure(job, started, "failed", str(exc), final=True)
        timeout = job_timeout(job)
        try:
            async with asyncio.timeout(timeout):
                value = await self._invoke(job, ctx, attempt)
        except TimeoutError:
            ctx._cancel()  # a sync task's thread runs on: it can see ctx.cancelled and stop
            return self._failure(job, started, "timeout", f"timed out after {timeout:g} s")
        except asyncio.CancelledError:
            if not ctx.cancelled:
                raise  # the slot itself is being stopped, not this job
            slot = asyncio.current_task()
            assert slot is not None
            slot.uncancel()
            if attempt.state is not State.RUNNING or attempt.interrupted:
                return None  # lease lost (the rescuer has it) or interrupted by the shutdown
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
            text = task_traceback(exc)[-TRACEBACK_MAX_CHARS:]
            return self._failure(job, started, "failed", text)
        return result_outcome(job, started, value)

    async def _invoke(self, job: Job, ctx: Context, attempt: Attempt) -> Any:
        if job.task in EXECUTOR_KINDS:
            if not await creator_may_run_commands(self.pool(), job):
                raise NotRetryable(f"role {job.created_by!r} may not create {job.task} jobs")
            if job.task == "shell":
                logs = self.logs
                return await run_shell(
                    job.args, lambda stream, line: logs.add(job, stream, None, line, ctx._keyring, attempt.db_now())
                )
            return await run_http(job.args, allow_private=self.allow_private_http, timeout=job_timeout(job))
        task = self.app.tasks.get(job.task)
        if task is None:
            raise NotRetryable(f"task {job.task!r} is not registered in this worker's app")
        return await run_python(task, ctx, self.threads)

    def _failure(self, job: Job, started: Any, outcome: str, error: str, **options: Any) -> Outcome:
        task = self.app.tasks.get(job.task)
        return failure(job, started, outcome, error, task.backoff if task else DEFAULT_BACKOFF, **options)
