"""Job records as the client returns them, and job specifications for bulk enqueue."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

JobState = Literal["waiting", "scheduled", "queued", "running", "succeeded", "failed", "cancelled"]
LIVE_STATES: tuple[str, ...] = ("waiting", "scheduled", "queued", "running")
TERMINAL_STATES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
STATES: tuple[str, ...] = LIVE_STATES + TERMINAL_STATES


class Job(msgspec.Struct):
    """One row of ``pgsched.jobs``. See the column comments in ``sql/0001_schema.sql``.

    Fields are in ``JOB_COLUMNS`` order, so a row selected with ``JOB_COLUMNS`` maps
    positionally: ``Job(*row)``."""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    priority: int
    state: JobState
    run_at: datetime
    attempts: int
    max_attempts: int
    timeout_seconds: float | None
    worker_id: uuid.UUID | None
    dedupe_key: str | None
    owner: str | None
    schedule_id: int | None
    slot: datetime | None
    workflow_id: uuid.UUID | None
    concurrency_key: str | None
    run_on_upstream_failure: bool
    result: Any
    error: str | None
    progress: Any
    cancel_requested_at: datetime | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        """True once the job is succeeded, failed or cancelled."""
        return self.state in TERMINAL_STATES


# The columns a query must select, in this order, to build a Job.
JOB_COLUMNS = ", ".join(Job.__struct_fields__)


class JobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A job to enqueue, for ``App.enqueue_many``. Fields left None take the task's defaults."""

    task: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    run_at: datetime | None = None
    delay: timedelta | float | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    dedupe_key: str | None = None
    depends_on: list[int] | None = None
    owner: str | None = None
    concurrency_key: str | None = None
    run_on_upstream_failure: bool = False
