"""Bulk enqueue: ``App.enqueue_many`` writes jobs with one ``COPY``.

Ids are allocated ahead with ``nextval`` in the same statement that reads the
transaction's ``pgsched.now()`` (which is what the ``run_at`` default would
be), so COPY can write explicit ids and ``run_at`` values and the caller gets
the ids back in order. Jobs with dependencies need ``pgsched.enqueue``'s
checks and go through it, in the same transaction.

PostgreSQL refuses COPY into a table with row-level security for a role subject
to it (every pgsched group since migration 11; the table's owner, superusers and
BYPASSRLS roles are not). For those roles the same rows go in by one ``INSERT
... SELECT FROM unnest(...)`` of column arrays instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import msgspec

from . import queries
from .db import Operation, Query
from .errors import DuplicateJobError, ValidationError
from .jobs import JobSpec
from .validation import NewJob, TaskDefaults, known_task, new_job


def specs(jobs: Iterable[JobSpec | Mapping[str, Any]]) -> list[JobSpec]:
    """``enqueue_many``'s items as JobSpecs (a mapping takes the same keys); ValidationError(jobs[i].field)."""
    out = []
    for i, item in enumerate(jobs):
        if isinstance(item, JobSpec):
            out.append(item)
            continue
        try:
            out.append(msgspec.convert(item, JobSpec))
        except msgspec.ValidationError as exc:
            # msgspec says "... - at `$.priority`" or "unknown field `colour`"; keep the field name.
            found = re.search(r"at `\$\.(\w+)", str(exc)) or re.search(r"unknown field `(\w+)`", str(exc))
            field = f"jobs[{i}].{found.group(1)}" if found else f"jobs[{i}]"
            raise ValidationError(field, str(exc).split(" - at ")[0]) from None
    return out


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_NULL = "\\N"


def _copy_text(value: str | None) -> str:
    if value is None:
        return _COPY_NULL
    # Most values need no escape; four C-level scans are cheaper than translating every one.
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


def _run_at(job: NewJob, db_now: datetime) -> datetime:
    if job.run_at is not None:
        return job.run_at
    if job.delay_seconds:
        return db_now + timedelta(seconds=job.delay_seconds)
    return db_now


def insert_params(jobs: list[NewJob], ids: list[int], db_now: datetime) -> list[list[Any]]:
    """Column arrays of queries.BULK_INSERT (the rows of ``copy_data``, for roles that may not COPY)."""
    return [
        ids,
        [job.task for job in jobs],
        [job.args_json for job in jobs],
        [job.queue for job in jobs],
        [job.priority for job in jobs],
        [_run_at(job, db_now) for job in jobs],
        [job.max_attempts for job in jobs],
        [job.timeout for job in jobs],
        [job.dedupe_key for job in jobs],
        [job.owner for job in jobs],
        [job.concurrency_key for job in jobs],
        [job.run_on_upstream_failure for job in jobs],
    ]


def copy_data(jobs: list[NewJob], ids: list[int], db_now: datetime, chunk: int = 2000) -> Iterator[str]:
    """COPY text-format rows for queries.BULK_COPY_COLUMNS, in chunks: the server inserts one
    chunk while the next is formatted."""
    now_text = db_now.isoformat()
    # Task and queue names repeat across a batch: escape each distinct one once.
    names: dict[str, str] = {}
    lines = []
    for job_id, job in zip(ids, jobs, strict=True):
        if job.run_at is not None:
            run_at = job.run_at.isoformat()
        elif job.delay_seconds:
            run_at = (db_now + timedelta(seconds=job.delay_seconds)).isoformat()
        else:
            run_at = now_text
        task = names.get(job.task) or names.setdefault(job.task, _copy_text(job.task))
        queue = names.get(job.queue) or names.setdefault(job.queue, _copy_text(job.queue))
        timeout = _COPY_NULL if job.timeout is None else repr(job.timeout)
        flag = "t" if job.run_on_upstream_failure else "f"
        lines.append(
            f"{job_id}\t{task}\t{_copy_text(job.args_json)}\t{queue}\t{job.priority}\t{run_at}\t"
            f"{job.max_attempts}\t{timeout}\t{_copy_text(job.dedupe_key)}\t{_copy_text(job.owner)}\t"
            f"{_copy_text(job.concurrency_key)}\t{flag}\n"
        )
        if len(lines) == chunk:
            yield "".join(lines)
            lines.clear()
    if lines:
        yield "".join(lines)


def op_enqueue_many(
    specs: list[JobSpec],
    defaults: dict[str, TaskDefaults],
    seal: Callable[[NewJob, TaskDefaults], NewJob],
) -> Operation[list[int]]:
    """Validate every job (``seal`` encrypts the args of those that store them encrypted), then COPY
    those without dependencies and enqueue the others one by one."""
    jobs = []
    for i, spec in enumerate(specs):
        try:
            job = new_job(
                spec.task,
                spec.args,
                known_task(defaults, spec.task),
                queue=spec.queue,
                priority=spec.priority,
                run_at=spec.run_at,
                delay=spec.delay,
                max_attempts=spec.max_attempts,
                timeout=spec.timeout,
                dedupe_key=spec.dedupe_key,
                depends_on=spec.depends_on,
                owner=spec.owner,
                concurrency_key=spec.concurrency_key,
                run_on_upstream_failure=spec.run_on_upstream_failure,
            )
            jobs.append(seal(job, defaults[spec.task]))
        except ValidationError as exc:
            raise ValidationError(f"jobs[{i}].{exc.field}", exc.message) from None
    holders: dict[str, int] = {}  # dedupe key -> the first item with it
    for i, job in enumerate(jobs):
        if job.dedupe_key is not None:
            first = holders.setdefault(job.dedupe_key, i)
            if first != i:
                raise DuplicateJobError(
                    job.dedupe_key, None, field=f"jobs[{i}].dedupe_key", where=f"jobs[{first}] of this batch"
                )
    ids: list[int | None] = [None] * len(jobs)
    # Jobs without dependencies go in by COPY, with ids allocated ahead.
    plain = [i for i, job in enumerate(jobs) if not job.depends_on]
    if plain:
        ((db_now, allocated, row_security),) = yield Query(queries.BULK_PREPARE, (len(plain),))
        for i, job_id in zip(plain, allocated, strict=True):
            ids[i] = job_id
        rows = [jobs[i] for i in plain]
        try:
            if row_security:
                yield Query(queries.BULK_INSERT, insert_params(rows, allocated, db_now))
            else:
                yield Query(queries.BULK_COPY, copy=copy_data(rows, allocated, db_now))
        except DuplicateJobError as exc:
            # COPY says which key is taken, not by which item: name the item that has it.
            if exc.dedupe_key not in holders:
                raise
            raise DuplicateJobError(exc.dedupe_key, None, field=f"jobs[{holders[exc.dedupe_key]}].dedupe_key") from exc
    # Jobs with dependencies need the SQL function's checks, one by one.
    for i, job in enumerate(jobs):
        if job.depends_on:
            try:
                ids[i] = (yield Query(queries.ENQUEUE, msgspec.structs.asdict(job), rows="job"))[0].id
            except DuplicateJobError as exc:
                raise DuplicateJobError(exc.dedupe_key, exc.existing_id, field=f"jobs[{i}].dedupe_key") from exc
            except ValidationError as exc:
                raise ValidationError(f"jobs[{i}].{exc.field}", exc.message) from exc
    return ids  # type: ignore[return-value]
