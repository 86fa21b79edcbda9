"""What operators watch and steer: queues (depths from ``queue_stats``, pause, resume), workers
(``worker_status``), and the task catalog that clients discover what they may enqueue from."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, get, patch, post
from litestar.params import FromPath, JSONBody

from pgsched import queries as library_queries
from pgsched import queues
from pgsched.db import run_async

from .access import CurrentUser, roles
from .account import write_audit
from .database import Database

OPERATORS = ("admin", "operator")


class QueueStats(msgspec.Struct):
    """One row of ``pgsched.queue_stats``."""

    queue: str
    paused: bool
    waiting: int
    scheduled: int
    queued: int
    running: int
    unroutable: int
    oldest_queued_at: datetime | None
    oldest_queued_age_seconds: float | None
    failed_last_hour: int
    succeeded_last_hour: int


class Worker(msgspec.Struct):
    """One row of ``pgsched.worker_status``: a worker incarnation."""

    id: Any
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    running: int
    with_scheduler: bool
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float
    stale: bool


class TaskInfo(msgspec.Struct):
    """A task of the catalog: what may be enqueued, with which parameters and defaults."""

    name: str
    queue: str
    options: dict[str, Any]
    parameters: list[Any]
    description: str | None
    last_seen_at: datetime


class QueueChange(msgspec.Struct, forbid_unknown_fields=True):
    """Queue controls to change (as ``pgsched queues set``); null clears one, those left out stay."""

    max_running: int | msgspec.UnsetType | None = msgspec.UNSET
    rate: str | msgspec.UnsetType | None = msgspec.UNSET
    max_per_key: int | msgspec.UnsetType | None = msgspec.UNSET
    fair: bool | msgspec.UnsetType | None = msgspec.UNSET
    encrypt: bool | msgspec.UnsetType | None = msgspec.UNSET


CATALOG = "SELECT name, queue, options, parameters, description, last_seen_at FROM pgsched.tasks ORDER BY name"


@get("/queues", summary="Queues with their depths (queue_stats)", tags=["queues"], opt=roles(*OPERATORS))
async def list_queues(request: Request[Any, Any, Any], user: CurrentUser) -> list[QueueStats]:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        rows = await (await conn.execute(library_queries.QUEUE_STATS)).fetchall()
    return [QueueStats(*row[: len(QueueStats.__struct_fields__)]) for row in rows]


async def _configure(
    request: Request[Any, Any, Any], user: CurrentUser, name: str, changes: dict[str, Any], action: str
) -> queues.QueueSettings:
    """Change a queue through the library's ``op_configure`` (its checks), audited."""
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        before = await run_async(conn, queues.op_get(name))
        after = await run_async(conn, queues.op_configure(name, changes, create=False))
        db.app.payloads.note(after)
        await write_audit(
            conn, request, user, action, "queue", name, msgspec.to_builtins(before), msgspec.to_builtins(after)
        )
    return after


@post(
    "/queues/{name:str}/pause",
    status_code=200,
    summary="Stop workers claiming from a queue",
    tags=["queues"],
    opt=roles(*OPERATORS),
)
async def pause_queue(request: Request[Any, Any, Any], user: CurrentUser, name: FromPath[str]) -> queues.QueueSettings:
    return await _configure(request, user, name, {"paused": True}, "queue.pause")


@post(
    "/queues/{name:str}/resume",
    status_code=200,
    summary="Let workers claim from a queue again",
    tags=["queues"],
    opt=roles(*OPERATORS),
)
async def resume_queue(request: Request[Any, Any, Any], user: CurrentUser, name: FromPath[str]) -> queues.QueueSettings:
    return await _configure(request, user, name, {"paused": False}, "queue.resume")


@patch("/queues/{name:str}", summary="Change a queue's controls", tags=["queues"], opt=roles(*OPERATORS))
async def configure_queue(
    request: Request[Any, Any, Any], user: CurrentUser, name: FromPath[str], data: JSONBody[QueueChange]
) -> queues.QueueSettings:
    changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET}
    return await _configure(request, user, name, changes, "queue.configure")


@get("/workers", summary="Worker incarnations (worker_status)", tags=["workers"], opt=roles(*OPERATORS))
async def list_workers(request: Request[Any, Any, Any], user: CurrentUser) -> list[Worker]:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        rows = await (await conn.execute(library_queries.WORKERS)).fetchall()
    return [Worker(*row) for row in rows]


@get("/tasks", summary="The task catalog: what may be enqueued", tags=["tasks"])
async def list_tasks(request: Request[Any, Any, Any], user: CurrentUser) -> list[TaskInfo]:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        rows = await (await conn.execute(CATALOG)).fetchall()
    return [TaskInfo(*row) for row in rows]
