"""``/schedules``: list (the caller's, or all for admins and operators) and create (through
``App.add_schedule``: the library's validation and the task's defaults), owned by the caller."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, get, post
from litestar.params import JSONBody

from pgsched import schedules
from pgsched.accounts import op_audit
from pgsched.db import run_async
from pgsched.errors import PermissionDenied
from pgsched.validation import EXECUTOR_KINDS

from .access import WRITERS, CurrentUser, roles
from .account import audit_of
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
    if data.task in EXECUTOR_KINDS and not user.may_create_commands:
        raise ApiError(403, f"{user.username!r} may not create {data.task} jobs", field="task")
    fields = {k: v for k, v in msgspec.structs.asdict(data).items() if k not in ("name", "task") and v is not None}
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        if await (await conn.execute(schedules.GET, (data.name,))).fetchone():
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
        await run_async(
            conn, op_audit(audit_of(request, user), "schedule.create", "schedule", created.id, after=summary(created))
        )
    return created
