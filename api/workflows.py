"""``/workflows``: create a graph of jobs in one request (``App.workflow``: cycles refused, one
transaction), show its jobs and edges, cancel it, retry its failed jobs. A workflow is visible
through its jobs: another owner's is 404."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, JSONBody

from pgsched.jobs import JOB_COLUMNS, Job

from .access import WRITERS, CurrentUser, may_create, roles
from .account import write_audit
from .database import Database, owner_filter
from .errors import ApiError
from .jobs import JobFields

MAX_JOBS = 1000

# A workflow's jobs the user may see, in id order (jobs_workflow_idx), and the edges among them.
WORKFLOW_JOBS = f"""
SELECT {JOB_COLUMNS} FROM pgsched.jobs
WHERE workflow_id = %s AND (%s::text IS NULL OR owner = %s) ORDER BY id
"""
WORKFLOW_EDGES = "SELECT job_id, depends_on FROM pgsched.job_deps WHERE job_id = ANY(%s) ORDER BY job_id, depends_on"
CANCEL = "SELECT pgsched.cancel_workflow(%s, %s)"
RETRY = "SELECT pgsched.retry_workflow(%s)"


class WorkflowNode(JobFields, kw_only=True):
    """One job of the graph; ``key`` names it for the ``depends_on`` of the others."""

    key: str
    depends_on: list[str] = msgspec.field(default_factory=list)


class WorkflowCreate(msgspec.Struct, forbid_unknown_fields=True):
    jobs: Annotated[list[WorkflowNode], msgspec.Meta(min_length=1, max_length=MAX_JOBS)]


class WorkflowCreated(msgspec.Struct):
    workflow_id: uuid.UUID
    jobs: dict[str, int]


class WorkflowDetail(msgspec.Struct):
    workflow_id: uuid.UUID
    jobs: list[Job]
    edges: list[tuple[int, int]]  # (job, the job it depends on)


class WorkflowChanged(msgspec.Struct):
    workflow_id: uuid.UUID
    jobs: int  # how many were cancelled, or retried


@post("/workflows", status_code=201, summary="Create a graph of jobs at once", tags=["workflows"], opt=roles(*WRITERS))
async def create_workflow(
    request: Request[Any, Any, Any], user: CurrentUser, data: JSONBody[WorkflowCreate]
) -> WorkflowCreated:
    keys: dict[str, int] = {}
    for i, node in enumerate(data.jobs):
        if node.key in keys:
            raise ApiError(422, f"key {node.key!r} is used twice", field=f"jobs[{i}].key")
        keys[node.key] = i
        may_create(user, node.task, f"jobs[{i}].task")
    for i, node in enumerate(data.jobs):
        for key in node.depends_on:
            if key not in keys:
                raise ApiError(422, f"no job of this workflow has key {key!r}", field=f"jobs[{i}].depends_on")
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        async with db.app.workflow(connection=conn) as workflow:
            handles = {}
            for node in data.jobs:
                fields = msgspec.structs.asdict(node)
                options = {
                    k: v for k, v in fields.items() if k not in ("key", "task", "args", "depends_on") and v is not None
                }
                handles[node.key] = workflow.add(node.task, node.args, owner=user.username, **options)
            for node in data.jobs:
                for key in node.depends_on:
                    workflow.add_dependency(handles[node.key], on=handles[key])
        ids = {key: handle.id for key, handle in handles.items()}
        after = {"jobs": ids}
        await write_audit(conn, request, user, "workflow.create", "workflow", workflow.id, after=after)
    return WorkflowCreated(workflow_id=workflow.id, jobs={k: v for k, v in ids.items() if v is not None})


async def _jobs(conn: Any, user: CurrentUser, workflow_id: uuid.UUID) -> list[Job]:
    owner = owner_filter(user)
    rows = await (await conn.execute(WORKFLOW_JOBS, (workflow_id, owner, owner))).fetchall()
    if not rows:
        raise ApiError(404, f"workflow {workflow_id} does not exist")
    return [Job(*row) for row in rows]


@get("/workflows/{workflow_id:uuid}", summary="A workflow's jobs and edges", tags=["workflows"])
async def show_workflow(
    request: Request[Any, Any, Any], user: CurrentUser, workflow_id: FromPath[uuid.UUID]
) -> WorkflowDetail:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        jobs = await _jobs(conn, user, workflow_id)
        edges = await (await conn.execute(WORKFLOW_EDGES, ([j.id for j in jobs],))).fetchall()
    jobs = [db.app.payloads.readable(job) for job in jobs]
    return WorkflowDetail(workflow_id=workflow_id, jobs=jobs, edges=[(a, b) for a, b in edges])


async def _change(request: Request[Any, Any, Any], user: CurrentUser, workflow_id: uuid.UUID, action: str) -> int:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        await _jobs(conn, user, workflow_id)
        if action == "cancel":
            row = await (await conn.execute(CANCEL, (workflow_id, f"workflow cancelled by {user.username}"))).fetchone()
        else:
            row = await (await conn.execute(RETRY, (workflow_id,))).fetchone()
        count = int(row[0]) if row else 0
        await write_audit(conn, request, user, f"workflow.{action}", "workflow", workflow_id, after={"jobs": count})
    return count


@post(
    "/workflows/{workflow_id:uuid}/cancel",
    status_code=200,
    summary="Cancel a workflow's unfinished jobs",
    tags=["workflows"],
    opt=roles(*WRITERS),
)
async def cancel_workflow(
    request: Request[Any, Any, Any], user: CurrentUser, workflow_id: FromPath[uuid.UUID]
) -> WorkflowChanged:
    return WorkflowChanged(workflow_id=workflow_id, jobs=await _change(request, user, workflow_id, "cancel"))


@post(
    "/workflows/{workflow_id:uuid}/retry",
    status_code=200,
    summary="Run a workflow's failed and cancelled jobs again",
    tags=["workflows"],
    opt=roles(*WRITERS),
)
async def retry_workflow(
    request: Request[Any, Any, Any], user: CurrentUser, workflow_id: FromPath[uuid.UUID]
) -> WorkflowChanged:
    return WorkflowChanged(workflow_id=workflow_id, jobs=await _change(request, user, workflow_id, "retry"))
