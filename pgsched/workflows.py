"""Workflows: a graph of jobs inserted in one transaction under one ``workflow_id``.

::

    with app.workflow() as wf:
        a = wf.add("extract", {"day": "2026-11-22"})
        b = wf.add("transform", {}, depends_on=[a])
        c = wf.add("load", {}, depends_on=[b])
    # committed: a.id, b.id, c.id are set; a runs first, c last

Edges may also be declared after the nodes (``wf.add_dependency(b, on=a)``);
a cycle is refused with ``ValidationError(field="depends_on")`` before
anything is written. Nothing is inserted if the block raises.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgspec

from . import queries
from .db import Operation, Query
from .encryption import Payloads
from .errors import DuplicateJobError, ValidationError
from .jobs import Job
from .validation import NewJob, TaskDefaults, check_dependencies, check_options, known_task, new_job


class WorkflowApp(Protocol):
    """What a workflow uses of its ``App`` (``pgsched.client`` imports this module, so not the class)."""

    payloads: Payloads

    def _commit_workflow(self, workflow: Workflow) -> None: ...

    async def _commit_workflow_async(self, workflow: Workflow) -> None: ...


class WorkflowJob:
    """A job of a workflow being built; ``id`` and ``job`` are set once the workflow is committed."""

    def __init__(self, index: int, task: str, args: Any, options: dict[str, Any]) -> None:
        self.index = index
        self.task = task
        self.args = args
        self.options = options
        self.upstream: list[WorkflowJob] = []
        self.external: list[Any] = []  # ids (or Jobs) of jobs that already exist
        self.job: Job | None = None

    @property
    def id(self) -> int | None:
        return self.job.id if self.job is not None else None

    def __repr__(self) -> str:
        return f"<WorkflowJob #{self.index} {self.task} id={self.id}>"


class Workflow:
    """Collects jobs and edges; inserts them all at the end of the ``with`` block."""

    def __init__(self, app: WorkflowApp, connection: Any = None) -> None:
        self.app = app
        self.connection = connection
        self.id = uuid.uuid4()
        self.jobs: list[WorkflowJob] = []

    def add(self, task: str, args: Any = None, *, depends_on: Iterable[Any] = (), **options: Any) -> WorkflowJob:
        """Add a job; ``depends_on`` names jobs of this workflow (their handles) or existing job ids."""
        if "workflow_id" in options:
            raise ValidationError("workflow_id", "is set by the workflow")
        node = WorkflowJob(len(self.jobs), task, args, options)
        self.jobs.append(node)
        for upstream in depends_on:
            self.add_dependency(node, on=upstream)
        return node

    def add_dependency(self, job: WorkflowJob, on: Any) -> None:
        """``job`` waits for ``on`` (a job of this workflow, or the id of an existing job)."""
        if not isinstance(job, WorkflowJob) or job not in self.jobs:
            raise ValidationError("depends_on", "the dependent must be a job added to this workflow")
        if isinstance(on, WorkflowJob):
            if on not in self.jobs:
                raise ValidationError("depends_on", f"{on!r} belongs to another workflow")
            job.upstream.append(on)
        else:
            job.external.append(on)

    def order(self) -> list[WorkflowJob]:
        """The jobs, each after everything it depends on; ValidationError(depends_on) for a cycle."""
        done: list[WorkflowJob] = []
        state: dict[int, str] = {}

        def visit(node: WorkflowJob, path: list[WorkflowJob]) -> None:
            if state.get(node.index) == "done":
                return
            if state.get(node.index) == "visiting":
                loop = [*path[path.index(node) :], node]
                raise ValidationError("depends_on", "cycle: " + " -> ".join(f"#{n.index} {n.task}" for n in loop))
            state[node.index] = "visiting"
            for upstream in node.upstream:
                visit(upstream, [*path, node])
            state[node.index] = "done"
            done.append(node)

        for node in self.jobs:
            visit(node, [])
        return done

    # -- committing -------------------------------------------------------------------

    def __enter__(self) -> Workflow:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.app._commit_workflow(self)

    async def __aenter__(self) -> Workflow:
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            await self.app._commit_workflow_async(self)


def op_commit(
    workflow: Workflow, defaults: dict[str, TaskDefaults], seal: Callable[[NewJob, TaskDefaults], NewJob]
) -> Operation[None]:
    """Insert the workflow's jobs, each after its dependencies, under one workflow_id (``seal``
    encrypts the args of those that store them encrypted)."""
    nodes = workflow.order()
    planned = []
    for node in nodes:
        try:
            check_options(node.options)
            job = seal(
                new_job(node.task, node.args, known_task(defaults, node.task), **node.options), defaults[node.task]
            )
            external = check_dependencies(node.external)
        except ValidationError as exc:
            raise ValidationError(f"jobs[{node.index}].{exc.field}", exc.message) from None
        job.workflow_id = workflow.id
        planned.append((node, job, external))
    for node, job, external in planned:
        job.depends_on = [*(up.job.id for up in node.upstream if up.job), *external]  # inserted before
        try:
            (node.job,) = yield Query(queries.ENQUEUE, msgspec.structs.asdict(job), rows="job")
            node.job = workflow.app.payloads.readable(node.job)
        except DuplicateJobError:
            raise
        except ValidationError as exc:
            raise ValidationError(f"jobs[{node.index}].{exc.field}", exc.message) from exc
