"""One claimed attempt of a job inside a worker, from its claim until its outcome is written.

An ``Attempt`` is the worker's only record of a job it holds (DESIGN §8 "Worker state"); the
worker keeps them by ``(job id, attempt)`` and nothing else is keyed by job id. Each
transition is one method::

                 start                finish               written
    BUFFERED ────────────▶ RUNNING ────────────▶ FINISHING ────────▶ WRITTEN
       │  │                   │                      ▲
       │  └── finish ─────────┼──────────────────────┘  (cancelled before it started)
       │                      │
       └──── release ─────────┴──▶ RELEASED  (given back: shutdown, pause, interrupted;
                                              or dropped: the lease was lost)

Every attempt that is neither ``WRITTEN`` nor ``RELEASED`` uses capacity, so a worker never
holds more than ``concurrency + prefetch`` jobs however slow its writes are. A transition
that does not apply is refused (``finish`` of a released attempt returns False): the
execution of an attempt whose lease was lost may end long after, and must change nothing.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pgsched.context import Context
from pgsched.jobs import Job

from .outcomes import Outcome


class State(enum.Enum):
    BUFFERED = "buffered"  # claimed, waiting in the local queue for a slot
    RUNNING = "running"  # executing in a slot
    FINISHING = "finishing"  # ended; its outcome waits in the write buffer
    WRITTEN = "written"  # outcome stored (or fenced): no longer ours
    RELEASED = "released"  # given back or dropped without an outcome of ours


LIVE = (State.BUFFERED, State.RUNNING, State.FINISHING)


@dataclass(eq=False)
class Attempt:
    """A job as claimed by one worker incarnation (``lease``), with its attempt number."""

    job: Job
    lease: uuid.UUID
    dependency_results: dict[int, Any] | None = None
    state: State = State.BUFFERED
    # Monotonic time the claim returned: with job.started_at (the database's claim time) it
    # gives the database's clock for this attempt's history without trusting the host clock.
    arrived: float = field(default_factory=time.monotonic)
    ctx: Context | None = None
    slot: asyncio.Task[Any] | None = None
    outcome: Outcome | None = None
    cancel_requested: bool = False  # asked to stop before a slot took it
    interrupted: bool = False  # stopped by the shutdown, to be released (not an outcome)

    @property
    def key(self) -> tuple[int, int]:
        return (self.job.id, self.job.attempts)

    def db_now(self) -> datetime:
        """Now on the database clock (DESIGN §8 "Time"): the claim's time plus what has elapsed since."""
        assert self.job.started_at is not None
        return self.job.started_at + timedelta(seconds=time.monotonic() - self.arrived)

    # -- transitions -----------------------------------------------------------------------------

    def start(self, ctx: Context, slot: asyncio.Task[Any]) -> bool:
        if self.state is not State.BUFFERED:
            return False
        self.state, self.ctx, self.slot = State.RUNNING, ctx, slot
        return True

    def finish(self, outcome: Outcome) -> bool:
        """The attempt ended (or was cancelled before it started): its outcome is to be written."""
        if self.state not in (State.BUFFERED, State.RUNNING):
            return False
        self.state, self.outcome, self.slot = State.FINISHING, outcome, None
        return True

    def written(self) -> None:
        self.state = State.WRITTEN

    def release(self) -> None:
        """Given back to the queue, or dropped because the lease was lost: stop it if it runs."""
        if self.state is State.RUNNING:
            self.stop()
        self.state = State.RELEASED

    # -- what a transition may need ----------------------------------------------------------------

    def stop(self) -> None:
        """Ask the execution to end: ctx.cancelled for the task's code, a cancel of its slot task."""
        if self.ctx is not None:
            self.ctx._cancel()
        if self.slot is not None:
            self.slot.cancel()
