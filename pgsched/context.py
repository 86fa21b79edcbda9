"""``Context``: what a running task may know and do. A task receives it as its first parameter
when that parameter is annotated ``pgsched.Context``."""

from __future__ import annotations

import threading
from typing import Any, Protocol

from .crypto import Keyring
from .jobs import Job
from .validation import encode_json_object

PROGRESS_MAX_BYTES = 256 * 1024
# An encrypted checkpoint grows by a third (base64) and must still fit the column's limit.
ENCRYPTED_PROGRESS_MAX_BYTES = PROGRESS_MAX_BYTES * 3 // 4 - 1024


class RunSink(Protocol):
    """Where a context sends what the task reports (the worker implements it)."""

    def log(self, run: Context, level: str, message: str) -> None: ...

    def progress(self, job: Job, encoded: str) -> None: ...


class Context:
    """The running job, its attempt, a log into its run, progress checkpoints and cancellation."""

    def __init__(self, job: Job, sink: RunSink, dependency_results: dict[int, Any] | None = None) -> None:
        self.job = job
        self.dependency_results = dependency_results or {}
        self._sink = sink
        self._cancelled = False
        self._stop: threading.Event | None = None  # made by the first wait_cancelled (most jobs never wait)
        self._thread_busy = False  # a sync task's code is running in a worker thread
        # Set by the worker for a job whose payloads are stored encrypted: what this run
        # writes (checkpoints, log lines, result, error) is encrypted with it first.
        self._keyring: Keyring | None = None

    @property
    def attempt(self) -> int:
        """This attempt's number (1 for the first)."""
        return self.job.attempts

    @property
    def progress(self) -> Any:
        """The last checkpoint saved with ``set_progress``, by this attempt or an earlier one."""
        return self.job.progress

    @property
    def encrypted(self) -> bool:
        """True when this job's payloads are stored encrypted (its args arrived decrypted)."""
        return self._keyring is not None

    @property
    def cancelled(self) -> bool:
        """True once the job should stop: cancelled, its lease lost, or the worker shutting down."""
        return self._cancelled

    def wait_cancelled(self, timeout: float) -> bool:
        """Block (in a sync task) until the job should stop or ``timeout`` seconds have passed;
        returns ``cancelled``. The pause of a cooperative loop: ``while not ctx.wait_cancelled(5): ...``."""
        if self._stop is None:
            self._stop = threading.Event()
            if self._cancelled:  # set before the event existed (_cancel sets the flag first)
                self._stop.set()
        return self._stop.wait(timeout)

    def log(self, message: str, level: str = "info") -> None:
        """Write a line into this run's log (``pgsched.run_logs``)."""
        self._sink.log(self, level, str(message))

    def set_progress(self, progress: dict[str, Any]) -> None:
        """Save a checkpoint (a JSON object, at most 256 KiB); a retried attempt reads it from ``ctx.progress``.

        It is written within milliseconds and always before the attempt's outcome.
        """
        if self._keyring is None:
            encoded = encode_json_object(progress, "progress", PROGRESS_MAX_BYTES)
        else:
            plain = encode_json_object(progress, "progress", ENCRYPTED_PROGRESS_MAX_BYTES)
            encoded = self._keyring.encrypt_encoded(plain, "progress", (self.job.task, self.job.queue))
        self.job.progress = progress
        self._sink.progress(self.job, encoded)

    def _cancel(self) -> None:
        self._cancelled = True
        if self._stop is not None:
            self._stop.set()
