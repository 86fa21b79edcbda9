"""How jobs read to people: an error's last line, a duration, a progress bar. Shared by the CLI
and the worker's log lines, so a job reads the same in both."""

from __future__ import annotations

from typing import Any

from .crypto import is_envelope

BAR_WIDTH = 20


def error_summary(error: str | None, width: int | None = None) -> str:
    """The line of an error that names it (a traceback's last line), cut to ``width`` characters.

    An encrypted error stays unread: "(encrypted)"."""
    if not error:
        return ""
    if is_envelope(error):
        return "(encrypted)"
    lines = [line for line in error.splitlines() if line.strip()]
    line = lines[-1].strip() if lines else ""
    if width is not None and len(line) > width:
        line = line[: max(width - 1, 0)] + "…"
    return line


def duration(seconds: float | None) -> str:
    """``0.012 s``, ``41.2 s``: milliseconds matter for short attempts, not for long ones."""
    if seconds is None:
        return ""
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def progress_fraction(progress: Any) -> float | None:
    """How far a job says it is, from 0 to 1, when its checkpoint reports it: ``{"done": n,
    "total": m}`` (``m`` > 0) or ``{"percent": p}``; None for any other checkpoint."""
    if not isinstance(progress, dict):
        return None

    def number(key: str) -> float | None:
        value = progress.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    done, total, percent = number("done"), number("total"), number("percent")
    if done is not None and total is not None and total > 0:
        fraction = done / total
    elif percent is not None:
        fraction = percent / 100
    else:
        return None
    return min(max(fraction, 0.0), 1.0)


def progress_bar(progress: Any, width: int = BAR_WIDTH) -> str:
    """``[#########-----------]  45%`` for a checkpoint that reports how far it is, else ""."""
    fraction = progress_fraction(progress)
    if fraction is None:
        return ""
    filled = int(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction:4.0%}"
