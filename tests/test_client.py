"""The Python client: App, tasks, enqueue (single, bulk, transactional), get, cancel, retry; sync and async."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

import pgsched
from pgsched import Backoff, DuplicateJobError, InvalidStateError, JobNotFound, JobSpec, ValidationError

pytestmark = pytest.mark.db


@pytest.fixture
def reports(app: pgsched.App) -> pgsched.App:
    @app.task(queue="reports", priority=3, max_attempts=4, backoff=Backoff.fixed(10), timeout=30)
    def send_report(day: str, fmt: str = "pdf") -> dict[str, str]:
        """Send the report of one day."""
        return {"day": day}

    @app.task
    async def ping() -> None:
        pass

    return app


def test_task_enqueue_uses_the_task_defaults(reports: pgsched.App) -> None:
    job = reports.tasks["send_report"].enqueue(day="2026-11-22")
    assert (job.task, job.queue, job.priority, job.max_attempts, job.timeout_seconds, job.state) == (
        "send_report",
        "reports",
        3,
        4,
        30.0,
        "queued",
    )
    assert job.args == {"day": "2026-11-22"}
    assert reports.tasks["send_report"]("x") == {"day": "x"}  # calling a task runs the function here


def test_task_arguments_are_checked_against_the_signature(reports: pgsched.App) -> None:
    send_report = reports.tasks["send_report"]
    assert send_report.enqueue("2026-11-22", fmt="csv").args == {"day": "2026-11-22", "fmt": "csv"}
    for call in (lambda: send_report.enqueue(), lambda: send_report.enqueue(day="d", colour="red")):
        with pytest.raises(ValidationError) as caught:
            call()
        assert caught.value.field == "args"


def test_with_options_overrides_defaults(reports: pgsched.App) -> None:
    job = reports.tasks["send_report"].with_options(queue="urgent", priority=9, delay=3600).enqueue(day="d")
    assert (job.queue, job.priority, job.state) == ("urgent", 9, "scheduled")
    assert timedelta(minutes=59) < job.run_at - job.created_at <= timedelta(hours=1)


def test_enqueue_every_option(reports: pgsched.App) -> None:
    dep = reports.enqueue("ping")
    run_at = datetime.now(timezone.utc) + timedelta(days=1)
    job = reports.enqueue(
        "send_report",
        {"day": "d"},
        queue="q2",
        priority=-5,
        run_at=run_at,
        max_attempts=2,
        timeout=5,
        dedupe_key="report-d",
        depends_on=[dep],
        owner="team-a",
        concurrency_key="customer-1",
    )
    assert job.state == "waiting"  # its dependency has not succeeded yet
    assert (job.queue, job.priority, job.max_attempts, job.timeout_seconds) == ("q2", -5, 2, 5.0)
    assert (job.dedupe_key, job.owner, job.concurrency_key) == ("report-d", "team-a", "customer-1")
    assert abs(job.run_at - run_at) < timedelta(milliseconds=1)


def test_registering_writes_the_catalog_and_other_apps_can_use_it(reports: pgsched.App, dsn: str) -> None:
    reports.open()
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT queue, options, parameters, description FROM pgsched.tasks WHERE name = 'send_report'"
        ).fetchone()
    queue, options, parameters, description = row
    assert queue == "reports" and options["max_attempts"] == 4
    assert "backoff" not in options  # an execution option: only a worker that runs the task writes it
    assert [p["name"] for p in parameters] == ["day", "fmt"] and parameters[0]["required"] is True
    assert description == "Send the report of one day."
    other = pgsched.App(dsn)  # knows no tasks of its own
    try:
        job = other.enqueue("send_report", {"day": "d"})
        assert (job.queue, job.priority) == ("reports", 3)
        with pytest.raises(ValidationError) as caught:
            other.enqueue("not_registered_anywhere")
        assert caught.value.field == "task"
    finally:
        other.close()


def test_shell_and_http_are_known_kinds(app: pgsched.App) -> None:
    assert app.enqueue("shell", {"cmd": ["echo", "hi"]}).task == "shell"
    assert app.enqueue("http", {"url": "https://example.com/hook", "method": "POST"}).task == "http"


def test_enqueue_joins_the_callers_transaction(reports: pgsched.App, dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        rolled_back = reports.enqueue("ping", connection=conn)
        conn.rollback()
        committed = reports.enqueue("ping", connection=conn)
        ids = reports.enqueue_many([JobSpec(task="ping")] * 3, connection=conn)
        conn.commit()
    with pytest.raises(JobNotFound):
        reports.get(rolled_back.id)
    assert reports.get(committed.id).state == "queued"
    assert [reports.get(i).state for i in ids] == ["queued"] * 3


def test_enqueue_many_copies_20000_jobs_in_one_call(reports: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    specs = [JobSpec(task="send_report", args={"day": str(i)}) for i in range(20_000)]
    ids = reports.enqueue_many(specs)
    assert len(ids) == 20_000 and ids == sorted(ids)
    rows = conn.execute("SELECT id, args->>'day', queue, priority, state FROM pgsched.jobs ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ids
    assert [r[1] for r in rows] == [str(i) for i in range(20_000)]
    assert {(r[2], r[3], r[4]) for r in rows} == {("reports", 3, "queued")}


def test_enqueue_many_mixes_options_and_dependencies(reports: pgsched.App) -> None:
    first = reports.enqueue("ping")
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    ids = reports.enqueue_many(
        [
            {"task": "ping", "priority": 7, "owner": "tab\there\\back\nslash"},
            JobSpec(task="send_report", args={"day": "line\nbreak\\ and \t tab"}, run_at=later),
            JobSpec(task="ping", depends_on=[first.id]),
            JobSpec(task="ping", delay=timedelta(minutes=10)),
        ]
    )
    jobs = [reports.get(i) for i in ids]
    assert (jobs[0].priority, jobs[0].owner, jobs[0].state) == (7, "tab\there\\back\nslash", "queued")
    assert jobs[1].args == {"day": "line\nbreak\\ and \t tab"} and jobs[1].state == "scheduled"
    assert abs(jobs[1].run_at - later) < timedelta(milliseconds=1)
    assert jobs[2].state == "waiting"
    assert jobs[3].state == "scheduled" and timedelta(minutes=9) < jobs[3].run_at - jobs[3].created_at <= timedelta(
        minutes=10
    )


def test_duplicate_dedupe_key_carries_the_existing_job(reports: pgsched.App) -> None:
    first = reports.enqueue("ping", dedupe_key="nightly")
    with pytest.raises(DuplicateJobError) as caught:
        reports.enqueue("ping", dedupe_key="nightly")
    assert caught.value.existing_id == first.id and caught.value.field == "dedupe_key"
    with pytest.raises(DuplicateJobError):
        reports.enqueue_many([JobSpec(task="ping", dedupe_key="k2"), JobSpec(task="ping", dedupe_key="k2")])


def test_get_cancel_retry(reports: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job = reports.enqueue("ping")
    assert reports.get(job.id).id == job.id
    cancelled = reports.cancel(job.id, "changed my mind")
    assert (cancelled.state, cancelled.error) == ("cancelled", "changed my mind") and cancelled.finished
    assert reports.cancel(job.id).state == "cancelled"  # idempotent
    retried = reports.retry(job.id)
    assert (retried.state, retried.finished_at) == ("queued", None)
    conn.execute(
        "UPDATE pgsched.jobs SET state = 'running', attempts = 1, worker_id = gen_random_uuid() WHERE id = %s",
        (job.id,),
    )
    marked = reports.cancel(job.id)
    assert marked.state == "running" and marked.cancel_requested_at is not None
    with pytest.raises(InvalidStateError):
        reports.retry(job.id)
    conn.execute("UPDATE pgsched.jobs SET state = 'succeeded', finished_at = now() WHERE id = %s", (job.id,))
    with pytest.raises(InvalidStateError):
        reports.cancel(job.id)
    for call in (reports.get, reports.cancel, reports.retry):
        with pytest.raises(JobNotFound):
            call(987_654_321)
    with pytest.raises(ValidationError):
        reports.get(0)


def test_async_client(reports: pgsched.App, dsn: str) -> None:
    async def scenario() -> None:
        job = await reports.tasks["send_report"].enqueue_async(day="d")
        assert (await reports.get_async(job.id)).queue == "reports"
        ids = await reports.enqueue_many_async([JobSpec(task="ping"), {"task": "ping", "depends_on": [job.id]}])
        assert [(await reports.get_async(i)).state for i in ids] == ["queued", "waiting"]
        assert (await reports.cancel_async(job.id)).state == "cancelled"
        assert (await reports.retry_async(job.id)).state == "queued"
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            gone = await reports.enqueue_async("ping", connection=conn)
            await conn.rollback()
        with pytest.raises(JobNotFound):
            await reports.get_async(gone.id)
        with pytest.raises(ValidationError):
            await reports.enqueue_async("ping", priority=1000)
        await reports.close_async()

    asyncio.run(scenario())


def test_registering_a_task_twice_or_with_bad_options_is_refused(app: pgsched.App) -> None:
    @app.task
    def once() -> None: ...

    with pytest.raises(ValidationError) as caught:
        app.task(name="once")(lambda: None)
    assert caught.value.field == "name"
    for options, field in (
        ({"name": "shell"}, "name"),
        ({"queue": "bad queue"}, "queue"),
        ({"priority": 200}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"timeout": -1}, "timeout"),
        ({"backoff": 5}, "backoff"),
    ):
        with pytest.raises(ValidationError) as caught:
            app.task(**options)(lambda: None)
        assert caught.value.field == field
