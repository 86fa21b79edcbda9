"""Workflows, schedules and queue controls: the ``App`` methods the CLI and the REST API share.

A mixin of ``App`` (``pgsched.client``), which gives it the execution of operations; the
operations themselves live in ``pgsched.workflows``, ``pgsched.schedules`` and
``pgsched.queues``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from . import queries, queues, schedules
from .db import Operation, Query
from .encryption import Payloads
from .jobs import Job
from .queues import QueueSettings
from .validation import TaskDefaults, known_task

R = TypeVar("R")


class Administration:
    """Workflows, schedules and queue controls of an ``App``."""

    payloads: Payloads

    if TYPE_CHECKING:  # provided by App

        def _execute(self, op: Operation[R], connection: Any, atomic: bool = False) -> R: ...

        async def _execute_async(self, op: Operation[R], connection: Any, atomic: bool = False) -> R: ...

        def _op_defaults(self, names: Iterable[str]) -> Operation[dict[str, TaskDefaults]]: ...

        def get(self, job_id: int, *, connection: Any = None) -> Job: ...

    # -- workflows ---------------------------------------------------------------------------

    def _op_scalar(self, sql: str, *params: Any) -> Operation[Any]:
        rows = yield Query(sql, params)
        return rows[0][0]

    def cancel_workflow(self, workflow_id: uuid.UUID, reason: str | None = None) -> int:
        """Cancel every unfinished job of a workflow; returns how many."""
        return int(self._execute(self._op_scalar(queries.CANCEL_WORKFLOW, workflow_id, reason), None))

    async def cancel_workflow_async(self, workflow_id: uuid.UUID, reason: str | None = None) -> int:
        return int(await self._execute_async(self._op_scalar(queries.CANCEL_WORKFLOW, workflow_id, reason), None))

    def retry_workflow(self, workflow_id: uuid.UUID) -> int:
        """Run a workflow's failed and cancelled jobs again (each after its dependencies); returns how many."""
        return int(self._execute(self._op_scalar(queries.RETRY_WORKFLOW, workflow_id), None))

    async def retry_workflow_async(self, workflow_id: uuid.UUID) -> int:
        return int(await self._execute_async(self._op_scalar(queries.RETRY_WORKFLOW, workflow_id), None))

    # -- schedules ---------------------------------------------------------------------------

    def add_schedule(self, name: str, task: str, **fields: Any) -> schedules.Schedule:
        """Create or replace a schedule (``cron=`` + ``timezone=``, or ``every=``); see ``Schedule``.
        Job options not given (queue, priority, max_attempts, timeout) are the task's."""
        return self._execute(self._op_add_schedule(name, task, fields), None)

    async def add_schedule_async(
        self, name: str, task: str, *, connection: Any = None, **fields: Any
    ) -> schedules.Schedule:
        """``add_schedule`` for async code; with ``connection``, in the caller's transaction."""
        return await self._execute_async(self._op_add_schedule(name, task, fields), connection)

    def _op_add_schedule(self, name: str, task: str, fields: dict[str, Any]) -> Operation[schedules.Schedule]:
        defaults = known_task((yield from self._op_defaults([task])), task)
        for field in ("queue", "priority", "max_attempts", "timeout"):
            fields.setdefault(field, getattr(defaults, field))
        schedule = schedules.build(name=name, task=task, source=fields.pop("source", "api"), **fields)
        return (yield from schedules.op_upsert(self.payloads.seal_schedule(schedule, defaults)))

    def list_schedules(self) -> list[schedules.Schedule]:
        return self._execute(schedules.op_list(), None)

    def get_schedule(self, name: str) -> schedules.Schedule:
        return self._execute(schedules.op_get(name), None)

    def pause_schedule(self, name: str) -> schedules.Schedule:
        """A paused schedule produces no jobs."""
        return self._execute(schedules.op_set_paused(name, True), None)

    def resume_schedule(self, name: str) -> schedules.Schedule:
        """Resume; slots missed while paused follow the misfire policy."""
        return self._execute(schedules.op_set_paused(name, False), None)

    def trigger_schedule(self, name: str) -> Job:
        """Run the schedule's job now, outside its timetable (the timetable is not touched)."""
        return self.get(self._execute(schedules.op_trigger(name), None))

    def delete_schedule(self, name: str) -> None:
        self._execute(schedules.op_delete(name), None)

    # -- queue controls ----------------------------------------------------------------------

    def queue_settings(self, name: str) -> QueueSettings:
        """A queue's settings (the defaults when it has no row in ``pgsched.queues``)."""
        return self._execute(queues.op_get(name), None)

    async def queue_settings_async(self, name: str) -> QueueSettings:
        return await self._execute_async(queues.op_get(name), None)

    def list_queue_settings(self) -> list[QueueSettings]:
        """Every queue that has settings (a row in ``pgsched.queues``), by name."""
        return self._execute(queues.op_list(), None)

    def configure_queue(self, name: str, *, create: bool = False, **settings: Any) -> QueueSettings:
        """Change a queue's ``max_running``, ``rate`` (``"100/minute"``), ``max_per_key``, ``fair`` or
        ``encrypt``; ``None`` clears one, settings not given stay. An unknown queue is refused unless
        ``create``."""
        return self.payloads.note(self._execute(queues.op_configure(name, settings, create=create), None))

    async def configure_queue_async(self, name: str, *, create: bool = False, **settings: Any) -> QueueSettings:
        op = queues.op_configure(name, settings, create=create)
        return self.payloads.note(await self._execute_async(op, None))

    def pause_queue(self, name: str, *, create: bool = False) -> QueueSettings:
        """Stop every worker claiming from the queue (within a second); running jobs finish, enqueue works."""
        return self.configure_queue(name, create=create, paused=True)

    async def pause_queue_async(self, name: str, *, create: bool = False) -> QueueSettings:
        return await self.configure_queue_async(name, create=create, paused=True)

    def resume_queue(self, name: str) -> QueueSettings:
        """Let workers claim from the queue again (they are woken at once)."""
        return self.configure_queue(name, paused=False)

    async def resume_queue_async(self, name: str) -> QueueSettings:
        return await self.configure_queue_async(name, paused=False)
