"""Schedules: validation, and the operations the Python API, the CLI (and later the REST API) share.

A schedule is a timetable (a cron expression in an IANA zone, or a fixed
interval) plus the template of the jobs it produces. ``Materializer``
(``pgsched.leader.materializer``) turns its due slots into jobs; this module only
defines, stores and changes schedules.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import msgspec

from . import cron, queries
from .db import Operation, Query
from .errors import ValidationError
from .validation import (
    MAX_INTEGER,
    PRIORITY_RANGE,
    QUEUE_PATTERN,
    check_int,
    check_name,
    check_seconds,
    encode_json_object,
)

Misfire = Literal["skip", "run_once", "catch_up"]
Overlap = Literal["allow", "skip", "queue_one", "cancel_previous"]
MISFIRE_POLICIES = ("skip", "run_once", "catch_up")
OVERLAP_POLICIES = ("allow", "skip", "queue_one", "cancel_previous")
MAX_JITTER_SECONDS = 86_400


class Schedule(msgspec.Struct, kw_only=True):
    """A schedule as stored in ``pgsched.schedules`` (the columns pgsched reads)."""

    name: str
    task: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    cron: str | None = None
    every: timedelta | None = None
    timezone: str = "UTC"
    queue: str = "default"
    priority: int = 0
    max_attempts: int | None = None
    timeout: float | None = None
    owner: str | None = None
    misfire: Misfire = "run_once"
    catch_up_window: timedelta = timedelta(days=1)
    overlap: Overlap = "skip"
    jitter_seconds: int = 0
    start_at: datetime | None = None
    end_at: datetime | None = None
    paused: bool = False
    enabled: bool = True
    source: str = "sql"
    id: int | None = None
    next_run_at: datetime | None = None
    last_slot: datetime | None = None
    # Why the materializer cannot evaluate it (set once; writing the schedule again clears it).
    invalid_reason: str | None = None


def validate(schedule: Schedule, *, now: datetime | None = None) -> Schedule:
    """Check every field (ValidationError naming it); returns the schedule unchanged."""
    check_name(schedule.name, "name")
    check_name(schedule.task, "task")
    encode_json_object(schedule.args, "args")
    if (schedule.cron is None) == (schedule.every is None):
        raise ValidationError("cron", "give exactly one of cron or every")
    cron.load_zone(schedule.timezone)
    if schedule.cron is not None:
        # Also proves that it fires at all (a never-firing cron is refused by the parser).
        cron.next_fire_times(schedule.cron, schedule.timezone, now or datetime.now(timezone.utc))
    else:
        if not isinstance(schedule.every, timedelta) or not cron.MIN_INTERVAL <= schedule.every <= cron.MAX_INTERVAL:
            raise ValidationError(
                "every", f"must be at least {cron.MIN_INTERVAL.total_seconds():g} s and at most 100 years"
            )
    check_name(schedule.queue, "queue", pattern=QUEUE_PATTERN)
    check_int(schedule.priority, "priority", *PRIORITY_RANGE)
    if schedule.max_attempts is not None:
        check_int(schedule.max_attempts, "max_attempts", 1, MAX_INTEGER)
    if schedule.timeout is not None:
        check_seconds(schedule.timeout, "timeout", allow_zero=False)
    check_name(schedule.owner, "owner", optional=True)
    if schedule.misfire not in MISFIRE_POLICIES:
        raise ValidationError("misfire", f"must be one of {', '.join(MISFIRE_POLICIES)}")
    if schedule.overlap not in OVERLAP_POLICIES:
        raise ValidationError("overlap", f"must be one of {', '.join(OVERLAP_POLICIES)}")
    if not isinstance(schedule.catch_up_window, timedelta) or schedule.catch_up_window <= timedelta(0):
        raise ValidationError("catch_up_window", "must be a positive duration")
    check_int(schedule.jitter_seconds, "jitter_seconds", 0, MAX_JITTER_SECONDS)
    for field in ("start_at", "end_at"):
        value = getattr(schedule, field)
        if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
            raise ValidationError(field, "must be a timezone-aware datetime")
    if schedule.start_at and schedule.end_at and schedule.end_at <= schedule.start_at:
        raise ValidationError("end_at", "must be after start_at")
    return schedule


def build(**fields: Any) -> Schedule:
    """A validated Schedule from keyword fields (``every`` may be seconds); ValidationError otherwise."""
    every = fields.get("every")
    if isinstance(every, (int, float)) and not isinstance(every, bool):
        fields["every"] = timedelta(seconds=every)
    try:
        schedule = Schedule(**fields)
    except TypeError as exc:
        raise ValidationError("schedule", str(exc)) from None
    return validate(schedule)


def for_task(task: Any, *, args: Any = None, **fields: Any) -> Schedule:
    """The schedule of an ``@app.periodic`` task: its jobs take the task's defaults."""
    return build(
        name=task.name,
        task=task.name,
        args=dict(args or {}),
        queue=task.defaults.queue,
        priority=task.defaults.priority,
        max_attempts=task.defaults.max_attempts,
        timeout=task.defaults.timeout,
        source="code",
        **fields,
    )


def from_row(row: tuple[Any, ...]) -> Schedule:
    (id_, name, task, args, cron_, every, tz, queue, priority, max_attempts, timeout, owner, misfire, window,
     overlap, jitter, start_at, end_at, paused, enabled, source, next_run_at, last_slot,
     invalid_reason) = row  # fmt: skip
    return Schedule(
        id=id_, name=name, task=task, args=args, cron=cron_, every=every, timezone=tz, queue=queue,
        priority=priority, max_attempts=max_attempts, timeout=timeout, owner=owner, misfire=misfire,
        catch_up_window=window, overlap=overlap, jitter_seconds=jitter, start_at=start_at, end_at=end_at,
        paused=paused, enabled=enabled, source=source, next_run_at=next_run_at, last_slot=last_slot,
        invalid_reason=invalid_reason,
    )  # fmt: skip


def _params(schedule: Schedule, app_name: str | None) -> dict[str, Any]:
    params = msgspec.structs.asdict(schedule)
    params["args"] = encode_json_object(schedule.args, "args")
    params["options"] = msgspec.json.encode({"app": app_name} if app_name else {}).decode()
    return params


def op_upsert(schedule: Schedule, app_name: str | None = None) -> Operation[Schedule]:
    rows = yield Query(queries.SCHEDULE_UPSERT, _params(schedule, app_name))
    return from_row(rows[0])


def op_sync(schedules: list[Schedule], app_name: str) -> Operation[None]:
    """Make the table match the app's code: add or update its schedules, disable the removed ones."""
    for schedule in schedules:
        yield from op_upsert(schedule, app_name)
    yield Query(queries.SCHEDULES_DISABLE_REMOVED, (app_name, [s.name for s in schedules]))


def op_list() -> Operation[list[Schedule]]:
    return [from_row(r) for r in (yield Query(queries.SCHEDULES_LIST))]


def _one(rows: list[Any], name: str) -> Any:
    if not rows:
        raise ValidationError("name", f"no schedule is named {name!r}")
    return rows[0]


def op_get(name: str) -> Operation[Schedule]:
    return from_row(_one((yield Query(queries.SCHEDULE_GET, (name,))), name))


def op_set_paused(name: str, paused: bool) -> Operation[Schedule]:
    """Pause, or resume: a resumed schedule's missed slots follow its misfire policy."""
    return from_row(_one((yield Query(queries.SCHEDULE_SET_PAUSED, (paused, name))), name))


def op_delete(name: str) -> Operation[None]:
    _one((yield Query(queries.SCHEDULE_DELETE, (name,))), name)


def op_trigger(name: str) -> Operation[int]:
    """Enqueue one run now without touching the timetable; returns the job id."""
    return int(_one((yield Query(queries.SCHEDULE_TRIGGER, (name,))), name)[0])
