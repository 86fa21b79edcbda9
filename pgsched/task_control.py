"""Exceptions a task raises to choose its outcome instead of failing."""

from __future__ import annotations

from datetime import timedelta

from .validation import check_seconds


class TaskControl(Exception):
    """Base of the exceptions below; the worker never records them as failures."""


class Retry(TaskControl):
    """Fail this attempt and retry ``after`` seconds from now (counts an attempt; obeys max_attempts)."""

    def __init__(self, after: float | timedelta = 0, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.after = check_seconds(after, "after", allow_zero=True)
        self.reason = reason


class Snooze(TaskControl):
    """Run this job again ``seconds`` from now without counting an attempt."""

    def __init__(self, seconds: float | timedelta) -> None:
        super().__init__(f"snoozed for {seconds} s")
        self.seconds = check_seconds(seconds, "seconds", allow_zero=True)


class Cancel(TaskControl):
    """End the job as cancelled (no retry)."""

    def __init__(self, reason: str = "cancelled by the task") -> None:
        super().__init__(reason)
        self.reason = reason
