"""Queue controls: pause, a global cap, a rate limit, per-key caps and fair sharing.

The settings live in ``pgsched.queues`` (one row per queue that has any; a
queue needs no row to be used). The Python API, the CLI (and later the REST
API) change them through these operations; workers read them in the claim
(``pgsched.claim_controlled``), so a change holds everywhere as soon as it
commits.
"""

from __future__ import annotations

import difflib
import re
import sys
import warnings
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec

from . import queries
from .db import Operation, Query
from .errors import UnservedQueueWarning, ValidationError
from .validation import MAX_INTEGER, QUEUE_PATTERN, check_int, check_name

RATE_UNITS = {"second": timedelta(seconds=1), "minute": timedelta(minutes=1), "hour": timedelta(hours=1)}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+?)s?\s*$")
# Fields of configure_queue; each None clears the setting (fair, encrypt: False).
SETTINGS = ("max_running", "rate", "max_per_key", "fair", "encrypt")


_PGSCHED_DIR = str(Path(__file__).resolve().parent)
# Queues this process has asked about (served or warned about): one question per queue and process.
_checked_queues: set[str] = set()


def op_warn_unserved(queues: Iterable[str]) -> Operation[None]:
    """Warn once per process about each of ``queues`` that no live worker serves: its jobs wait,
    and otherwise only ``queue_stats.unroutable`` would show it."""
    for queue in sorted(set(queues) - _checked_queues):
        _checked_queues.add(queue)
        ((served,),) = yield Query(queries.QUEUE_SERVED, (queue,))
        if not served:
            warnings.warn(
                f"no live worker serves queue {queue!r}: its jobs wait until a worker runs with --queues {queue} "
                "(pgsched queues counts them as unroutable)",
                UnservedQueueWarning,
                stacklevel=_callers_level(),
            )


def _callers_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside pgsched: the user's call."""
    level, frame = 2, sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PGSCHED_DIR):
        level, frame = level + 1, frame.f_back
    return level


class QueueSettings(msgspec.Struct, kw_only=True):
    """A queue's row of ``pgsched.queues`` (the defaults when it has none)."""

    name: str
    paused: bool = False
    max_running: int | None = None
    rate: str | None = None  # "100/minute"
    max_per_key: int | None = None
    fair: bool = False
    encrypt: bool = False


def parse_rate(value: Any, field: str = "rate") -> tuple[int, timedelta]:
    """``"100/minute"`` (also ``/second``, ``/hour``, plural units) as (starts, period)."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or match.group(2) not in RATE_UNITS:
        raise ValidationError(field, f"must look like '100/minute' (per second, minute or hour), not {value!r}")
    starts = int(match.group(1))
    if not 1 <= starts <= MAX_INTEGER:
        raise ValidationError(field, f"must allow at least 1 start per period, not {starts}")
    return starts, RATE_UNITS[match.group(2)]


def format_rate(limit: int | None, period: timedelta | None) -> str | None:
    if limit is None or period is None:
        return None
    unit = next((u for u, p in RATE_UNITS.items() if p == period), None)
    return f"{limit}/{unit}" if unit else f"{limit}/{period.total_seconds():g}s"


def _from_row(row: Any) -> QueueSettings:
    name, paused, max_running, rate_limit, rate_period, max_per_key, fair, encrypt = row
    return QueueSettings(
        name=name,
        paused=paused,
        max_running=max_running,
        rate=format_rate(rate_limit, rate_period),
        max_per_key=max_per_key,
        fair=fair,
        encrypt=encrypt,
    )


def _check_known(name: str, known: list[str]) -> None:
    if name not in known:
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else " (pass create=True / --create to add it)"
        raise ValidationError("name", f"unknown queue {name!r}{hint}")


def op_get(name: str) -> Operation[QueueSettings]:
    check_name(name, "name", pattern=QUEUE_PATTERN)
    rows = yield Query(queries.QUEUE_SETTINGS_ONE, (name,))
    return _from_row(rows[0]) if rows else QueueSettings(name=name)


def op_list() -> Operation[list[QueueSettings]]:
    return [_from_row(r) for r in (yield Query(queries.QUEUE_SETTINGS_ALL))]


def op_configure(name: str, changes: dict[str, Any], *, create: bool) -> Operation[QueueSettings]:
    """Change some settings of a queue (None clears one); the others stay as they are.

    Every value is checked before anything is written. An unknown queue name
    is refused unless ``create``.
    """
    check_name(name, "name", pattern=QUEUE_PATTERN)
    unknown = set(changes) - {"paused", *SETTINGS}
    if unknown:
        raise ValidationError(sorted(unknown)[0], f"is not a queue setting (settings: paused, {', '.join(SETTINGS)})")
    params: dict[str, Any] = {"name": name, "rate_limit": None, "rate_period": None}
    for flag in ("paused", "fair", "encrypt"):
        params[flag] = None
        if flag in changes:
            value = False if flag != "paused" and changes[flag] is None else changes[flag]
            if not isinstance(value, bool):
                raise ValidationError(flag, f"must be true or false, not {value!r}")
            params[flag] = value
    for cap in ("max_running", "max_per_key"):
        value = changes.get(cap)
        params[cap] = None if value is None else check_int(value, cap, 1, MAX_INTEGER)
        params[f"set_{cap}"] = cap in changes
    if changes.get("rate") is not None:
        params["rate_limit"], params["rate_period"] = parse_rate(changes["rate"])
    params["set_rate"] = "rate" in changes
    if not create:
        _check_known(name, [r[0] for r in (yield Query(queries.QUEUES_KNOWN))])
    return _from_row((yield Query(queries.QUEUE_UPSERT, params))[0])
