"""``/jobs``: create one (through ``App.enqueue``: the library's rules, not a copy), list with
filters and a keyset cursor, show with its runs, cancel, retry. Each change writes an audit row
in its own transaction; another owner's job is 404, as a missing one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from pgsched import queries as library_queries
from pgsched.accounts import User
from pgsched.crypto import is_envelope
from pgsched.jobs import STATES, Job, JobSpec

from . import idempotency, queries
from .access import WRITERS, CurrentUser, may_create, roles
from .account import write_audit
from .database import Database, owner_filter
from .errors import ApiError

MAX_PAGE = 500
MAX_BATCH = 1000


class JobFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a new job is, here or in a workflow. Fields left out take the task's defaults."""

    task: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    run_at: datetime | None = None
    delay: float | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    dedupe_key: str | None = None
    concurrency_key: str | None = None
    run_on_upstream_failure: bool = False


class JobCreate(JobFields, kw_only=True):
    """A job to create. Fields left out take the task's defaults; the owner is the caller."""

    depends_on: list[int] | None = None


class JobBatch(msgspec.Struct, forbid_unknown_fields=True):
    """Jobs to create at once, all or none."""

    jobs: Annotated[list[JobCreate], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class Run(msgspec.Struct):
    attempt: int
    outcome: str | None
    worker_id: Any
    started_at: datetime
    finished_at: datetime | None
    duration_ms: float | None
    error: str | None


class JobDetail(msgspec.Struct):
    job: Job
    runs: list[Run]


class JobPage(msgspec.Struct):
    """One page, newest first; ``next_cursor`` fetches the next (null on the last page)."""

    jobs: list[Job]
    next_cursor: str | None


def summary(job: Job) -> dict[str, Any]:
    """What an audit row keeps of a job: not its args or result, which may hold secrets."""
    return {"id": job.id, "task": job.task, "queue": job.queue, "state": job.state, "owner": job.owner}


def _options(data: JobCreate) -> dict[str, Any]:
    return {k: v for k, v in msgspec.structs.asdict(data).items() if k not in ("task", "args") and v is not None}


@post("/jobs", status_code=201, summary="Create a job", tags=["jobs"], opt=roles(*WRITERS))
async def create_job(request: Request[Any, Any, Any], user: CurrentUser, data: JSONBody[JobCreate]) -> Response[Any]:
    may_create(user, data.task)
    options = _options(data)
    key = idempotency.key_of(request)
    db: Database = request.app.state.db
    async with db.acting_for(user, pipelined=True) as conn:
        if key is not None and (replayed := await idempotency.replay(conn, request, user, key)) is not None:
            return replayed
        job = await db.app.enqueue_async(data.task, data.args, connection=conn, owner=user.username, **options)
        await write_audit(conn, request, user, "job.create", "job", job.id, after=summary(job))
        body = msgspec.to_builtins(job)
        if key is not None:
            await idempotency.remember(conn, request, user, key, 201, body)
    return Response(body, status_code=201)


@post(
    "/jobs/batch",
    status_code=201,
    summary=f"Create up to {MAX_BATCH} jobs at once, all or none",
    tags=["jobs"],
    opt=roles(*WRITERS),
)
async def create_jobs(request: Request[Any, Any, Any], user: CurrentUser, data: JSONBody[JobBatch]) -> Response[Any]:
    for i, item in enumerate(data.jobs):
        may_create(user, item.task, f"jobs[{i}].task")
    specs = [JobSpec(task=item.task, args=item.args, owner=user.username, **_options(item)) for item in data.jobs]
    key = idempotency.key_of(request)
    db: Database = request.app.state.db
    async with db.acting_for(user, pipelined=True) as conn:
        if key is not None and (replayed := await idempotency.replay(conn, request, user, key)) is not None:
            return replayed
        ids = await db.app.enqueue_many_async(specs, connection=conn)
        await write_audit(conn, request, user, "job.create_many", "job", None, after={"ids": ids})
        body = {"ids": ids}
        if key is not None:
            await idempotency.remember(conn, request, user, key, 201, body)
    return Response(body, status_code=201)


@get("/jobs", summary="List jobs, newest first", tags=["jobs"])
async def list_jobs(
    request: Request[Any, Any, Any],
    user: CurrentUser,
    job_state: Annotated[str | None, QueryParameter(name="state", description=f"One of {', '.join(STATES)}")] = None,
    queue: FromQuery[str | None] = None,
    task: FromQuery[str | None] = None,
    owner: Annotated[str | None, QueryParameter(description="Only this owner's jobs (admins and operators)")] = None,
    search: Annotated[str | None, QueryParameter(description="Task names containing this text")] = None,
    created_after: FromQuery[datetime | None] = None,
    created_before: FromQuery[datetime | None] = None,
    finished_after: FromQuery[datetime | None] = None,
    finished_before: FromQuery[datetime | None] = None,
    cursor: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(description=f"Jobs per page, at most {MAX_PAGE} (larger is clamped)")] = 50,
) -> JobPage:
    if job_state is not None and job_state not in STATES:
        raise ApiError(422, f"must be one of {', '.join(STATES)}", field="state")
    instants = {
        "created_after": created_after,
        "created_before": created_before,
        "finished_after": finished_after,
        "finished_before": finished_before,
    }
    for name, value in instants.items():
        if value is not None and value.utcoffset() is None:
            raise ApiError(422, "must be an ISO 8601 date and time with a UTC offset", field=name)
    if owner is not None and owner_filter(user) is not None:
        raise ApiError(403, "only admins and operators filter by owner", field="owner")
    before = None
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 19:
            raise ApiError(422, "not a cursor returned by this endpoint", field="cursor")
        before = int(cursor)
    limit = max(1, min(limit, MAX_PAGE))
    params = {
        "owner": owner_filter(user),
        "state": job_state,
        "queue": queue,
        "task": task,
        "owner_param": owner,
        # LIKE's wildcards in the text are matched as themselves.
        "search": search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") if search else None,
        **instants,
        "before": before,
        "limit": limit + 1,
    }
    db: Database = request.app.state.db
    async with db.acting_for(user, pipelined=True) as conn:
        await conn.execute(queries.WALK_THE_INDEX)
        rows = await (await conn.execute(queries.list_jobs(params), params)).fetchall()
    jobs = [db.app.payloads.readable(Job(*row)) for row in rows[:limit]]
    return JobPage(jobs=jobs, next_cursor=str(jobs[-1].id) if len(rows) > limit else None)


async def _visible(conn: Any, user: User, job_id: FromPath[int]) -> None:
    """404 unless ``user`` may see the job (the owner filter; row-level security hides it too)."""
    owner = owner_filter(user)
    if not await (await conn.execute(queries.VISIBLE_JOB, (job_id, owner, owner))).fetchone():
        raise ApiError(404, f"job {job_id} does not exist")


@get("/jobs/{job_id:int}", summary="A job and its runs", tags=["jobs"])
async def show_job(request: Request[Any, Any, Any], user: CurrentUser, job_id: FromPath[int]) -> JobDetail:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        job = await db.app.get_async(job_id, connection=conn)
        if owner_filter(user) not in (None, job.owner):
            raise ApiError(404, f"job {job_id} does not exist")
        rows = await (await conn.execute(library_queries.JOB_RUNS, (job_id,))).fetchall()
    return JobDetail(job=job, runs=[Run(*row) for row in rows])


async def _change(request: Request[Any, Any, Any], user: CurrentUser, job_id: int, action: str) -> Job:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        await _visible(conn, user, job_id)
        before = await db.app.get_async(job_id, connection=conn)
        if action == "cancel":
            job = await db.app.cancel_async(job_id, connection=conn)
        else:
            job = await db.app.retry_async(job_id, connection=conn)
        await write_audit(conn, request, user, f"job.{action}", "job", job_id, summary(before), summary(job))
    return job


@post(
    "/jobs/{job_id:int}/cancel", status_code=200, summary="Cancel an unfinished job", tags=["jobs"], opt=roles(*WRITERS)
)
async def cancel_job(request: Request[Any, Any, Any], user: CurrentUser, job_id: FromPath[int]) -> Job:
    return await _change(request, user, job_id, "cancel")


@post(
    "/jobs/{job_id:int}/retrigger",
    status_code=201,
    summary="Create a new job with the same definition (task, args, queue, options, owner)",
    tags=["jobs"],
    opt=roles(*WRITERS),
)
async def retrigger_job(request: Request[Any, Any, Any], user: CurrentUser, job_id: FromPath[int]) -> Job:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        await _visible(conn, user, job_id)
        old = await db.app.get_async(job_id, connection=conn)
        may_create(user, old.task)
        if is_envelope(old.args):
            raise ApiError(409, "the job's args are encrypted with a key this API does not have", field="args")
        job = await db.app.enqueue_async(
            old.task,
            old.args,
            connection=conn,
            queue=old.queue,
            priority=old.priority,
            max_attempts=old.max_attempts,
            timeout=old.timeout_seconds,
            dedupe_key=old.dedupe_key,
            owner=old.owner,
            concurrency_key=old.concurrency_key,
        )
        after = {**summary(job), "from": job_id}
        await write_audit(conn, request, user, "job.retrigger", "job", job.id, after=after)
    return job


@post(
    "/jobs/{job_id:int}/retry",
    status_code=200,
    summary="Run a finished or scheduled job again now",
    tags=["jobs"],
    opt=roles(*WRITERS),
)
async def retry_job(request: Request[Any, Any, Any], user: CurrentUser, job_id: FromPath[int]) -> Job:
    return await _change(request, user, job_id, "retry")
