"""``/schedules``: list (the caller's, or all for admins and operators) and create (through
``App.add_schedule``: the library's validation and the task's defaults), owned by the caller."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, patch, post
from litestar.params import FromPath, JSONBody, QueryParameter

from pgsched import cron, schedules
from pgsched import queries as library_queries
from pgsched.db import run_async
from pgsched.errors import PermissionDenied
from pgsched.jobs import Job

from . import queries
from .access import WRITERS, CurrentUser, may_create, roles
from .account import write_audit
from .database import Database, owner_filter
from .errors import ApiError


class ScheduleCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A schedule to create: ``cron`` (in ``timezone``) or ``every`` (seconds). Job options left
    out take the task's defaults; the owner is the caller."""

    name: str
    task: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    misfire: str = "run_once"
    overlap: str = "skip"
    jitter_seconds: int = 0
    start_at: datetime | None = None
    end_at: datetime | None = None


class ScheduleChange(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields of a schedule to change; those left out stay. Giving ``cron`` drops ``every`` and
    the other way round. Its name, task and owner do not change."""

    args: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    cron: str | msgspec.UnsetType = msgspec.UNSET
    every: float | msgspec.UnsetType = msgspec.UNSET
    timezone: str | msgspec.UnsetType = msgspec.UNSET
    queue: str | msgspec.UnsetType = msgspec.UNSET
    priority: int | msgspec.UnsetType = msgspec.UNSET
    max_attempts: int | msgspec.UnsetType | None = msgspec.UNSET
    timeout: float | msgspec.UnsetType | None = msgspec.UNSET
    misfire: str | msgspec.UnsetType = msgspec.UNSET
    overlap: str | msgspec.UnsetType = msgspec.UNSET
    jitter_seconds: int | msgspec.UnsetType = msgspec.UNSET
    start_at: datetime | msgspec.UnsetType | None = msgspec.UNSET
    end_at: datetime | msgspec.UnsetType | None = msgspec.UNSET


# The fields of a stored schedule that App.add_schedule takes back.
_KEPT = (
    "args",
    "cron",
    "every",
    "timezone",
    "queue",
    "priority",
    "max_attempts",
    "timeout",
    "misfire",
    "overlap",
    "jitter_seconds",
    "start_at",
    "end_at",
    "catch_up_window",
    "owner",
)


class Slot(msgspec.Struct):
    """A fire time: in UTC, in the schedule's zone, and whether the zone's UTC offset changed since
    the slot before (a daylight-saving transition lies between them)."""

    utc: datetime
    local: datetime
    offset_changed: bool


class ScheduleDetail(msgspec.Struct):
    schedule: schedules.Schedule
    next: list[Slot]


PREVIEW_MAX = 100


def slots(times: list[datetime], timezone: str) -> list[Slot]:
    zone = cron.load_zone(timezone)
    local = [t.astimezone(zone) for t in times]
    return [
        Slot(utc=t, local=lt, offset_changed=i > 0 and lt.utcoffset() != local[i - 1].utcoffset())
        for i, (t, lt) in enumerate(zip(times, local, strict=True))
    ]


def next_times(schedule: schedules.Schedule, now: datetime, n: int = 5) -> list[datetime]:
    """The schedule's next ``n`` slots after the database's now (or its next_run_at, when later)."""
    after = max(now, schedule.next_run_at - timedelta(microseconds=1)) if schedule.next_run_at else now
    if schedule.cron is not None:
        return cron.next_fire_times(schedule.cron, schedule.timezone, after, n)
    assert schedule.every is not None
    first = schedule.next_run_at if schedule.next_run_at and schedule.next_run_at > now else now + schedule.every
    return [first + k * schedule.every for k in range(n)]


async def _db_now(conn: Any) -> datetime:
    row = await (await conn.execute(queries.DB_NOW)).fetchone()
    return row[0]


def summary(schedule: schedules.Schedule) -> dict[str, Any]:
    """What an audit row keeps of a schedule (not its args)."""
    return {
        "name": schedule.name,
        "task": schedule.task,
        "cron": schedule.cron,
        "owner": schedule.owner,
        "every": schedule.every.total_seconds() if schedule.every else None,
        "paused": schedule.paused,
    }


@get("/schedules", summary="Schedules, by name", tags=["schedules"])
async def list_schedules(request: Request[Any, Any, Any], user: CurrentUser) -> list[schedules.Schedule]:
    db: Database = request.app.state.db
    owner = owner_filter(user)
    async with db.acting_for(user) as conn:
        found = await run_async(conn, schedules.op_list())
    return [s for s in found if owner is None or s.owner == owner]


@post("/schedules", status_code=201, summary="Create a schedule", tags=["schedules"], opt=roles(*WRITERS))
async def create_schedule(
    request: Request[Any, Any, Any], user: CurrentUser, data: JSONBody[ScheduleCreate]
) -> schedules.Schedule:
    may_create(user, data.task)
    fields = {k: v for k, v in msgspec.structs.asdict(data).items() if k not in ("name", "task") and v is not None}
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        if await (await conn.execute(library_queries.SCHEDULE_GET, (data.name,))).fetchone():
            raise ApiError(409, f"a schedule named {data.name!r} exists", field="name")
        try:
            created = await db.app.add_schedule_async(
                data.name, data.task, connection=conn, owner=user.username, source="api", **fields
            )
        except PermissionDenied as exc:
            # The name is held by a schedule this user may not see (names are unique across owners).
            if "row-level security" not in str(exc):
                raise
            raise ApiError(409, f"a schedule named {data.name!r} exists", field="name") from None
        await write_audit(conn, request, user, "schedule.create", "schedule", created.id, after=summary(created))
    return created


@get("/schedules/preview", summary="The next fire times of a cron expression, without saving it", tags=["schedules"])
async def preview_cron(
    request: Request[Any, Any, Any],
    user: CurrentUser,
    expression: Annotated[str, QueryParameter(name="cron")],
    timezone: str = "UTC",
    n: Annotated[int, QueryParameter(description=f"How many, at most {PREVIEW_MAX}")] = 5,
) -> list[Slot]:
    if not 1 <= n <= PREVIEW_MAX:
        raise ApiError(422, f"must be between 1 and {PREVIEW_MAX}", field="n")
    db: Database = request.app.state.db
    async with db.connection() as conn:
        now = await _db_now(conn)
    return slots(cron.next_fire_times(expression, timezone, now, n), timezone)


async def _visible(conn: Any, user: CurrentUser, name: str) -> schedules.Schedule:
    """The schedule, if ``user`` may see it; 404 as for a missing one otherwise."""
    row = await (await conn.execute(library_queries.SCHEDULE_GET, (name,))).fetchone()
    owner = owner_filter(user)
    if row is None or (owner is not None and schedules.from_row(row).owner != owner):
        raise ApiError(404, f"schedule {name!r} does not exist")
    return schedules.from_row(row)


@get("/schedules/{name:str}", summary="A schedule and its next 5 fire times", tags=["schedules"])
async def show_schedule(request: Request[Any, Any, Any], user: CurrentUser, name: FromPath[str]) -> ScheduleDetail:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        schedule = await _visible(conn, user, name)
        now = await _db_now(conn)
    return ScheduleDetail(schedule=schedule, next=slots(next_times(schedule, now), schedule.timezone))


async def _pause(request: Request[Any, Any, Any], user: CurrentUser, name: str, paused: bool) -> schedules.Schedule:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        before = await _visible(conn, user, name)
        after = await run_async(conn, schedules.op_set_paused(name, paused))
        action = "schedule.pause" if paused else "schedule.resume"
        await write_audit(conn, request, user, action, "schedule", after.id, summary(before), summary(after))
    return after


@post(
    "/schedules/{name:str}/pause", status_code=200, summary="Pause a schedule", tags=["schedules"], opt=roles(*WRITERS)
)
async def pause_schedule(request: Request[Any, Any, Any], user: CurrentUser, name: FromPath[str]) -> schedules.Schedule:
    return await _pause(request, user, name, True)


@post(
    "/schedules/{name:str}/resume",
    status_code=200,
    summary="Resume a schedule (missed slots follow its misfire policy)",
    tags=["schedules"],
    opt=roles(*WRITERS),
)
async def resume_schedule(
    request: Request[Any, Any, Any], user: CurrentUser, name: FromPath[str]
) -> schedules.Schedule:
    return await _pause(request, user, name, False)


@delete(
    "/schedules/{name:str}",
    status_code=204,
    summary="Delete a schedule (its jobs stay)",
    tags=["schedules"],
    opt=roles(*WRITERS),
)
async def delete_schedule(request: Request[Any, Any, Any], user: CurrentUser, name: FromPath[str]) -> None:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        before = await _visible(conn, user, name)
        await run_async(conn, schedules.op_delete(name))
        await write_audit(conn, request, user, "schedule.delete", "schedule", before.id, summary(before))


@post(
    "/schedules/{name:str}/trigger",
    status_code=201,
    summary="Run the schedule's job now (its timetable stays)",
    tags=["schedules"],
    opt=roles(*WRITERS),
)
async def trigger_schedule(request: Request[Any, Any, Any], user: CurrentUser, name: FromPath[str]) -> Job:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        schedule = await _visible(conn, user, name)
        may_create(user, schedule.task)
        job = await db.app.get_async(await run_async(conn, schedules.op_trigger(name)), connection=conn)
        after = {"job": job.id, **summary(schedule)}
        await write_audit(conn, request, user, "schedule.trigger", "schedule", schedule.id, after=after)
    return job


@patch(
    "/schedules/{name:str}",
    summary="Change a schedule's timetable or job options",
    tags=["schedules"],
    opt=roles(*WRITERS),
)
async def update_schedule(
    request: Request[Any, Any, Any], user: CurrentUser, name: FromPath[str], data: JSONBody[ScheduleChange]
) -> schedules.Schedule:
    changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET}
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        before = await _visible(conn, user, name)
        fields = {field: getattr(before, field) for field in _KEPT}
        if "cron" in changes:
            fields["every"] = None
        if "every" in changes:
            fields["cron"] = None
        fields.update(changes)
        after = await db.app.add_schedule_async(name, before.task, connection=conn, source="api", **fields)
        await write_audit(conn, request, user, "schedule.update", "schedule", after.id, summary(before), summary(after))
    return after
