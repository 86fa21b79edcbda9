"""Bulk cancel and retry by filter: a dry run counts what a filter selects; the real run acts in
batches of ``BATCH`` jobs, each its own transaction with its audit row, so a large change never
holds many locks or one long transaction."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, post
from litestar.params import JSONBody

from . import queries
from .access import WRITERS, CurrentUser, roles
from .account import write_audit
from .database import Database, owner_filter
from .errors import ApiError

BATCH = 500
# The states each action applies to (cancel: unfinished jobs but running ones, which their
# worker stops; retry: finished ones that did not succeed).
STATES = {"cancel": ["waiting", "scheduled", "queued"], "retry": ["failed", "cancelled"]}


class BulkFilter(msgspec.Struct, forbid_unknown_fields=True):
    """Which jobs: all the caller may see, narrowed by these. ``dry_run`` only counts them."""

    queue: str | None = None
    task: str | None = None
    owner: str | None = None
    dry_run: bool = False


class BulkResult(msgspec.Struct):
    """How many jobs the filter selects (dry run), or how many were changed, in how many batches."""

    count: int
    batches: int
    dry_run: bool


async def _bulk(request: Request[Any, Any, Any], user: CurrentUser, data: BulkFilter, action: str) -> BulkResult:
    if data.owner is not None and owner_filter(user) is not None:
        raise ApiError(403, "only admins and operators filter by owner", field="owner")
    params: dict[str, Any] = {
        "owner": owner_filter(user),
        "states": STATES[action],
        "queue": data.queue,
        "task": data.task,
        "owner_param": data.owner,
        "below": None,
        "batch": BATCH,
    }
    db: Database = request.app.state.db
    if data.dry_run:
        async with db.acting_for(user) as conn:
            row = await (await conn.execute(queries.BULK_COUNT, params)).fetchone()
        return BulkResult(count=row[0] if row else 0, batches=0, dry_run=True)
    done = batches = 0
    while True:
        async with db.acting_for(user) as conn:
            ids = [row[0] for row in await (await conn.execute(queries.BULK_BATCH, params)).fetchall()]
            if not ids:
                break
            if action == "cancel":
                await conn.execute(queries.BULK_CANCEL, (ids, f"cancelled by {user.username} (bulk)"))
            else:
                await conn.execute(queries.BULK_RETRY, (ids,))
            filters = msgspec.to_builtins(data)
            await write_audit(conn, request, user, f"job.{action}_many", "job", None, after={"ids": ids, **filters})
        done += len(ids)
        batches += 1
        params["below"] = min(ids)
    return BulkResult(count=done, batches=batches, dry_run=False)


@post(
    "/jobs/cancel",
    status_code=200,
    summary="Cancel the unfinished jobs a filter selects (dry_run counts them)",
    tags=["jobs"],
    opt=roles(*WRITERS),
)
async def cancel_jobs(request: Request[Any, Any, Any], user: CurrentUser, data: JSONBody[BulkFilter]) -> BulkResult:
    return await _bulk(request, user, data, "cancel")


@post(
    "/jobs/retry",
    status_code=200,
    summary="Retry the failed and cancelled jobs a filter selects (dry_run counts them)",
    tags=["jobs"],
    opt=roles(*WRITERS),
)
async def retry_jobs(request: Request[Any, Any, Any], user: CurrentUser, data: JSONBody[BulkFilter]) -> BulkResult:
    return await _bulk(request, user, data, "retry")
