"""Capture of what a run writes (``ctx.log``, ``logging`` inside the task, shell output) into
``pgsched.run_logs``, capped per run with a truncation marker, flushed in batches."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pgsched.context import Context
from pgsched.crypto import Keyring
from pgsched.jobs import Job

MAX_LINES_PER_RUN = 1000
MAX_BYTES_PER_RUN = 256 * 1024
MAX_LINE_BYTES = 16 * 1024
MAX_CLOSED_RUNS = 10_000

# One line of a run's log: job id, attempt, logged at (database clock), stream, level, message.
LogRow = tuple[int, int, datetime, str, str | None, str]

# The run whose task is executing in this context (set by the runtime, copied
# into the threads of sync tasks), so log records can be attributed to its job.
current_run: contextvars.ContextVar[Context | None] = contextvars.ContextVar("pgsched_current_run", default=None)


@dataclass
class _Budget:
    lines: int = 0
    bytes: int = 0
    dropped: int = 0


@dataclass
class RunLogBuffer:
    """Lines waiting to be written, and what each run has used of its cap."""

    rows: list[LogRow] = field(default_factory=list)
    budgets: dict[tuple[int, int], _Budget] = field(default_factory=dict)
    # Sync tasks log from their threads while the event loop takes the rows.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Runs that ended recently, oldest first: lines for them are dropped.
    closed: dict[tuple[int, int], None] = field(default_factory=dict)

    def add(
        self,
        job: Job,
        stream: str,
        level: str | None,
        message: str,
        keyring: Keyring | None = None,
        at: datetime | None = None,
    ) -> None:
        """Buffer one line logged ``at`` (the database's clock; the worker derives it from the
        claim's time); with ``keyring`` (an encrypted job's) it is stored encrypted."""
        with self.lock:
            self._add(job, stream, level, message, keyring, at or datetime.now(timezone.utc))

    def _add(
        self, job: Job, stream: str, level: str | None, message: str, keyring: Keyring | None, at: datetime
    ) -> None:
        key = (job.id, job.attempts)
        if key in self.closed:
            return  # the run ended (an abandoned thread may still write): its log is closed
        budget = self.budgets.setdefault(key, _Budget())
        message = message.replace("\x00", "\ufffd")  # text columns cannot hold NUL (shell output can)
        encoded = message.encode()
        if len(encoded) > MAX_LINE_BYTES:
            encoded = encoded[:MAX_LINE_BYTES]
            message = encoded.decode(errors="ignore") + " [line truncated]"
        if budget.lines >= MAX_LINES_PER_RUN or budget.bytes + len(encoded) > MAX_BYTES_PER_RUN:
            budget.dropped += 1
            return
        budget.lines += 1
        budget.bytes += len(encoded)
        if keyring is not None:
            message = keyring.encrypt_text(message, "message", (job.task, job.queue))
        self.rows.append((job.id, job.attempts, at, stream, level, message))

    def open(self, job: Job) -> None:
        """A run starts: a released attempt taken again has the same (job, attempt) key."""
        with self.lock:
            self.closed.pop((job.id, job.attempts), None)

    def finish(self, job: Job, keyring: Keyring | None = None, at: datetime | None = None) -> None:
        """The run ended: write the truncation marker if lines were dropped, and forget its budget."""
        with self.lock:
            budget = self.budgets.pop((job.id, job.attempts), None)
            self.closed[(job.id, job.attempts)] = None
            if len(self.closed) > MAX_CLOSED_RUNS:
                del self.closed[next(iter(self.closed))]
        if budget and budget.dropped:
            marker = (
                f"[pgsched] log truncated: {budget.dropped} more line(s) dropped "
                f"(cap {MAX_LINES_PER_RUN} lines / {MAX_BYTES_PER_RUN} bytes per run)"
            )
            if keyring is not None:  # every line of an encrypted job's log is an envelope
                marker = keyring.encrypt_text(marker, "message", (job.task, job.queue))
            with self.lock:
                self.rows.append((job.id, job.attempts, at or datetime.now(timezone.utc), "system", "warning", marker))

    def take(self) -> list[LogRow]:
        """The pending rows; the buffer is emptied."""
        with self.lock:
            rows, self.rows = self.rows, []
        return rows

    def put_back(self, rows: list[LogRow]) -> None:
        """Rows that could not be written, to be tried again before the newer ones."""
        if rows:
            with self.lock:
                self.rows[:0] = rows


def log_params(rows: Sequence[LogRow]) -> dict[str, list[Any]]:
    """INSERT_LOGS parameters: one array per column."""
    columns = list(zip(*rows, strict=True))
    keys = ("job_ids", "attempts", "at", "streams", "levels", "messages")
    return {k: list(v) for k, v in zip(keys, columns, strict=True)}


class TaskLogHandler(logging.Handler):
    """A root-logger handler that copies records emitted inside a task into its run log."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        run = current_run.get()
        if run is None or record.name.startswith("pgsched."):
            return
        try:
            run._sink.log(run, record.levelname.lower(), self.format(record))
        except Exception:  # a log line must never break the task
            self.handleError(record)
