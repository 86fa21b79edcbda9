"""What an attempt ended as: the classification of a task's return or exception, and the
batch parameters that write outcomes (worker/queries.py COMPLETE)."""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import msgspec

from pgsched.backoff import DEFAULT_BACKOFF, Backoff
from pgsched.display import duration, error_summary
from pgsched.jobs import Job
from pgsched.validation import ARGS_MAX_BYTES, check_json_value

log = logging.getLogger("pgsched.worker")


@dataclass
class Outcome:
    """What an attempt ended as, waiting to be flushed."""

    job: Job
    state: str
    outcome: str
    started_at: datetime
    finished_at: datetime
    result: str | None = None
    error: str | None = None
    delay: float | None = None


@dataclass
class Stats:
    """What a worker did (returned by ``run``; ``--burst`` prints it)."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    fenced: int = 0
    released: int = 0
    lost: int = 0  # jobs dropped because the worker's lease was lost (the rescuer has them)
    claims: int = 0  # claim statements run (caps and rate limits show here as waits, not as polling)
    by_outcome: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        """What the worker did, in words: ``120 succeeded, 3 failed, 2 retried, 0 lost in 41.2 s``."""
        done = [f"{self.succeeded} succeeded", f"{self.failed} failed", f"{self.retried} retried"]
        extra = {"cancelled": self.cancelled, "given back": self.released, "fenced": self.fenced}
        done += [f"{n} {what}" for what, n in extra.items() if n]
        done.append(f"{self.lost} lost")
        return f"{', '.join(done)} in {duration(time.monotonic() - self.started)}"

    def count(self, batch: list[Outcome], written: set[int]) -> None:
        """Count a flushed batch; ``written`` holds the ids the fence let through."""
        for outcome in batch:
            if outcome.job.id not in written:
                self.fenced += 1
                continue
            self.by_outcome[outcome.outcome] = self.by_outcome.get(outcome.outcome, 0) + 1
            if outcome.state == "succeeded":
                self.succeeded += 1
            elif outcome.state == "failed":
                self.failed += 1
            elif outcome.state == "cancelled":
                self.cancelled += 1
            else:
                self.retried += 1


# Modules whose frames lead from the worker to the task's code: the runtime and executors, and
# the asyncio and thread-pool machinery a task is awaited or called through.
_PLUMBING = ("pgsched.worker", "asyncio", "concurrent.futures", "threading")


def _plumbing(tb: TracebackType) -> bool:
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return any(module == name or module.startswith(name + ".") for name in _PLUMBING)


def task_traceback(exc: BaseException) -> str:
    """The traceback a failed attempt stores: from the task's own frame down, without the
    worker's frames above it (they are the same for every job and hide the user's line).

    Only the leading frames are dropped: pgsched frames below the task's code (the task called
    ``app.enqueue`` and it raised) stay. An exception raised before the task's code ran (its
    arguments did not fit its signature) keeps no frame: just the error line."""
    tb = exc.__traceback__
    while tb is not None and _plumbing(tb):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def log_finished(outcome: Outcome) -> None:
    """The one line a finished attempt logs (STYLE habit 7): task, job, attempt, outcome, duration,
    what happens next, and for a failure the error's last line. A dead letter is an ERROR."""
    level = logging.ERROR if outcome.state == "failed" else logging.INFO
    if not log.isEnabledFor(level):
        return  # benchmarks run at WARNING: no formatting per job
    job = outcome.job
    took = duration((outcome.finished_at - outcome.started_at).total_seconds())
    line = f"{job.task} job {job.id} attempt {job.attempts}/{job.max_attempts} {outcome.outcome} in {took}"
    if outcome.state == "scheduled" and outcome.delay is not None:
        line += f", {'retry' if outcome.outcome != 'snoozed' else 'again'} in {duration(outcome.delay)}"
    elif outcome.state == "failed":
        line += ", not retried"
    if outcome.state != "succeeded" and outcome.error:
        line += f": {error_summary(outcome.error, 500)}"
    # Logger.handle, not Logger.log, which looks up the caller's frame for every record: that
    # was 30% of this line's cost (20 -> 14 us); the record names this function instead.
    log.handle(log.makeRecord(log.name, level, __file__, _LOG_FINISHED_LINE, line, (), None, "log_finished"))


_LOG_FINISHED_LINE = log_finished.__code__.co_firstlineno


def ended(job: Job, started: datetime, state: str, outcome: str, **extra: Any) -> Outcome:
    return Outcome(job, state, outcome, started, datetime.now(timezone.utc), **extra)


def failure(
    job: Job,
    started: datetime,
    outcome: str,
    error: str,
    backoff: Backoff = DEFAULT_BACKOFF,
    *,
    delay: float | None = None,
    final: bool = False,
) -> Outcome:
    """A failed attempt: retried after ``delay`` (or the backoff) while attempts are left, else failed."""
    if final or job.attempts >= job.max_attempts:
        return ended(job, started, "failed", outcome, error=error)
    if delay is None:
        delay = backoff.delay(job.attempts)
    return ended(job, started, "scheduled", outcome, error=error, delay=delay)


def result_outcome(job: Job, started: datetime, value: Any) -> Outcome:
    """Success, unless the return value cannot be stored (not JSON, or over the cap): then a
    failure that is not retried, since the same code would return the same value again."""
    try:
        check_json_value(value, "result")
        encoded = msgspec.json.encode(value)
    except (ValueError, TypeError) as exc:
        return failure(job, started, "failed", f"the task's return value is not JSON: {exc}", final=True)
    if len(encoded) > ARGS_MAX_BYTES:
        error = f"result is {len(encoded):,} bytes encoded; the limit is {ARGS_MAX_BYTES:,}"
        return failure(job, started, "failed", error, final=True)
    return ended(job, started, "succeeded", "succeeded", result=encoded.decode())


# One row of COMPLETE's json_to_recordset (worker/queries.py): field names are its column names.
class OutcomeRow(msgspec.Struct):
    worker: uuid.UUID
    id: int
    attempt: int
    queue: str
    task: str
    owner: str | None
    state: str
    outcome: str
    result: str | None  # the result's JSON text (cast to jsonb in SQL, so a JSON null stays jsonb 'null')
    error: str | None
    delay: float | None
    started_at: datetime
    finished_at: datetime


_encode_rows = msgspec.json.Encoder().encode


def complete_params(batch: list[Outcome], workers: list[uuid.UUID]) -> dict[str, Any]:
    """COMPLETE (and INSERT_INTERRUPTED) parameters: the batch as one JSON array, in job id order
    (every statement that locks several jobs locks them in id order, so two of them never
    deadlock). One JSON text costs less than half of what thirteen arrays did, in the
    worker and in the server, at the default batch of ten. ``workers``: the incarnation that
    claimed each attempt (its fence)."""
    rows = sorted(zip(batch, workers, strict=True), key=lambda row: row[0].job.id)
    encoded = _encode_rows(
        [
            OutcomeRow(
                w,
                o.job.id,
                o.job.attempts,
                o.job.queue,
                o.job.task,
                o.job.owner,
                o.state,
                o.outcome,
                o.result,
                o.error,
                o.delay,
                o.started_at,
                o.finished_at,
            )
            for o, w in rows
        ]
    )
    return {"outcomes": encoded.decode()}
