"""The worker runtime in-process: claims, outcomes, retries, timeouts, cancel, logs, leases, fencing, shutdown."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pgsched
from pgsched import Backoff, Cancel, Context, Retry, Snooze
from pgsched.worker.queries import CLAIM
from pgsched.worker.runtime import Worker

from .conftest import job_is, start_worker, wait_until, wait_until_async, worker_incarnation

pytestmark = pytest.mark.db


@pytest.fixture
def tasks(app: pgsched.App) -> pgsched.App:
    """An app with the tasks these tests use."""

    @app.task
    def noop(i: int = 0) -> None:
        pass

    @app.task
    async def echo(value: Any = None) -> Any:
        return value

    @app.task(max_attempts=2, backoff=Backoff.fixed(120, jitter=0))
    def fail() -> None:
        raise RuntimeError("boom")

    @app.task(max_attempts=5)
    def retry_later() -> None:
        raise Retry(after=45, reason="not yet")

    @app.task
    def snooze() -> None:
        raise Snooze(30)

    @app.task
    def give_up() -> None:
        raise Cancel("nothing to do")

    @app.task(timeout=0.2, max_attempts=1)
    async def slow_async() -> None:
        await asyncio.sleep(30)

    @app.task(timeout=0.2, max_attempts=1)
    def slow_sync(ctx: Context) -> None:
        ctx.wait_cancelled(30)  # the timeout stops it

    @app.task
    async def sleep(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slept"

    @app.task(max_attempts=2, backoff=Backoff.fixed(1, jitter=0))
    def checkpoint(ctx: Context) -> dict[str, Any]:
        import logging

        ctx.log(f"attempt {ctx.attempt} starts from {ctx.progress}")
        logging.getLogger("user.code").warning("logged through logging")
        if ctx.progress is None:
            ctx.set_progress({"done": 5})
            raise RuntimeError("crash after the checkpoint")
        return {"resumed_from": ctx.progress["done"]}

    @app.task
    def chatty(lines: int) -> None:
        import logging

        for i in range(lines):
            logging.getLogger("user.code").warning("line %d", i)

    @app.task
    def huge_result() -> str:
        return "x" * (2 * 1024 * 1024)

    return app


def job_row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM pgsched.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return row


def runs_of(conn: psycopg.Connection[Any], job_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT attempt, outcome, error, duration_ms FROM pgsched.runs WHERE job_id = %s ORDER BY id", (job_id,)
    ).fetchall()


def burst(app: pgsched.App, **options: Any) -> Any:
    return app.run_worker(burst=True, poll_seconds=0.1, **options)


def test_success_stores_the_result_and_one_run(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job = tasks.enqueue("echo", {"value": {"nested": [1, "two"]}})
    stats = burst(tasks)
    row = job_row(conn, job.id)
    assert (row["state"], row["result"], row["attempts"], row["worker_id"]) == (
        "succeeded",
        {"nested": [1, "two"]},
        1,
        None,
    )
    assert row["finished_at"] is not None
    ((attempt, outcome, error, duration),) = runs_of(conn, job.id)
    assert (attempt, outcome, error) == (1, "succeeded", None) and duration >= 0
    assert stats.succeeded == 1
    assert conn.execute("SELECT count(*) FROM pgsched.workers").fetchone()[0] == 0  # unregistered on exit


def test_failure_retries_with_backoff_then_dead_letters(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job = tasks.enqueue("fail")
    burst(tasks)
    row = job_row(conn, job.id)
    assert row["state"] == "scheduled" and "RuntimeError: boom" in row["error"] and "Traceback" in row["error"]
    wait = conn.execute("SELECT run_at - pgsched.now() FROM pgsched.jobs WHERE id = %s", (job.id,)).fetchone()[0]
    assert timedelta(seconds=110) < wait <= timedelta(seconds=120)
    tasks.retry(job.id)  # stands in for the promoter: due now
    burst(tasks)
    row = job_row(conn, job.id)
    assert (row["state"], row["attempts"]) == ("failed", 2) and row["finished_at"] is not None
    assert [r[:2] for r in runs_of(conn, job.id)] == [(1, "failed"), (2, "failed")]


def test_a_stored_traceback_starts_at_the_tasks_own_frame(app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    def parse(text: str) -> int:
        return int(text)  # the user's line, one frame below the task

    @app.task(max_attempts=1)
    def sync_parse(text: str) -> int:
        return parse(text)

    @app.task(max_attempts=1)
    async def async_parse(text: str) -> int:
        return parse(text)

    jobs = [app.enqueue(name, {"text": "twelve"}) for name in ("sync_parse", "async_parse")]
    # Plain SQL: the only door that does not check args against the task's parameters.
    missing_id = conn.execute(
        "INSERT INTO pgsched.jobs (task, args) VALUES ('sync_parse', '{}') RETURNING id"
    ).fetchone()[0]
    burst(app)
    for job, task in zip(jobs, ("sync_parse", "async_parse"), strict=True):
        error = job_row(conn, job.id)["error"]
        frames = [line for line in error.splitlines() if line.startswith('  File "')]
        assert error.startswith("Traceback (most recent call last):\n"), error
        assert [line.rsplit(", in ", 1)[1] for line in frames] == [task, "parse"], error
        assert not any(name in error for name in ("runtime.py", "executors.py", "asyncio", "concurrent")), error
        assert error.endswith("ValueError: invalid literal for int() with base 10: 'twelve'\n")
    # Refused before the task's code ran: the error line alone.
    assert job_row(conn, missing_id)["error"].startswith("TypeError: ")


def test_retry_snooze_and_cancel_raised_by_the_task(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    retry = tasks.enqueue("retry_later")
    snooze = tasks.enqueue("snooze")
    cancel = tasks.enqueue("give_up")
    burst(tasks)
    delay = lambda job_id: conn.execute(  # noqa: E731
        "SELECT run_at - pgsched.now() FROM pgsched.jobs WHERE id = %s", (job_id,)
    ).fetchone()[0]
    r = job_row(conn, retry.id)
    assert (r["state"], r["attempts"], r["error"]) == ("scheduled", 1, "not yet")
    assert timedelta(seconds=40) < delay(retry.id) <= timedelta(seconds=45)
    s = job_row(conn, snooze.id)
    assert (s["state"], s["attempts"]) == ("scheduled", 0)  # a snooze does not count an attempt
    assert timedelta(seconds=25) < delay(snooze.id) <= timedelta(seconds=30)
    c = job_row(conn, cancel.id)
    assert (c["state"], c["error"]) == ("cancelled", "nothing to do")
    assert runs_of(conn, snooze.id)[0][1] == "snoozed" and runs_of(conn, cancel.id)[0][1] == "cancelled"


@pytest.mark.parametrize("task", ["slow_async", "slow_sync"])
def test_timeout_fails_the_attempt(tasks: pgsched.App, conn: psycopg.Connection[Any], task: str) -> None:
    job = tasks.enqueue(task)
    burst(tasks, concurrency=2)
    row = job_row(conn, job.id)
    assert row["state"] == "failed" and "timed out after 0.2 s" in row["error"]
    assert runs_of(conn, job.id)[0][1] == "timeout"


def test_per_job_timeout_overrides_the_task(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job = tasks.enqueue("sleep", {"seconds": 30}, timeout=0.2, max_attempts=1)
    burst(tasks)
    assert runs_of(conn, job.id)[0][1] == "timeout"


def test_context_logs_and_progress_survive_a_retry(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job = tasks.enqueue("checkpoint")
    burst(tasks)
    assert job_row(conn, job.id)["progress"] == {"done": 5}
    tasks.retry(job.id)
    burst(tasks)
    row = job_row(conn, job.id)
    assert (row["state"], row["result"]) == ("succeeded", {"resumed_from": 5})
    logs = conn.execute(
        "SELECT attempt, stream, level, message FROM pgsched.run_logs WHERE job_id = %s ORDER BY logged_at", (job.id,)
    ).fetchall()
    assert logs[0][1:] == ("log", "info", "attempt 1 starts from None")
    assert (2, "log", "info", "attempt 2 starts from {'done': 5}") in logs
    assert any(m.endswith("logged through logging") and lvl == "warning" for _, _, lvl, m in logs)


def test_run_logs_are_capped_with_a_marker(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job = tasks.enqueue("chatty", {"lines": 1500})
    burst(tasks)
    count, last = conn.execute(
        "SELECT count(*), max(message) FILTER (WHERE stream = 'system') FROM pgsched.run_logs WHERE job_id = %s",
        (job.id,),
    ).fetchone()
    assert count == 1001 and "log truncated: 500 more line(s) dropped" in last


def test_an_oversized_result_is_refused_not_truncated(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job = tasks.enqueue("huge_result", max_attempts=1)
    burst(tasks)
    row = job_row(conn, job.id)
    assert row["state"] == "failed" and row["result"] is None and "the limit is 1,048,576" in row["error"]


def test_a_worker_claims_only_what_it_can_run(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    unknown = conn.execute("INSERT INTO pgsched.jobs (task) VALUES ('nobody_knows') RETURNING id").fetchone()[0]
    shell = tasks.enqueue("shell", {"cmd": ["true"]})
    other_queue = tasks.enqueue("noop", queue="elsewhere")
    burst(tasks)
    assert [job_row(conn, i)["state"] for i in (unknown, shell.id, other_queue.id)] == ["queued"] * 3
    stats = conn.execute("SELECT queued, unroutable FROM pgsched.queue_stats WHERE queue = 'default'").fetchone()
    assert stats == (2, 2)  # no live worker knows them


def test_a_held_job_the_app_cannot_run_fails_clearly(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job_id = conn.execute("INSERT INTO pgsched.jobs (task) VALUES ('ghost') RETURNING id").fetchone()[0]
    worker = Worker(tasks, pgsched.config.replace_settings(tasks.settings, burst=True, poll_seconds=0.1))
    worker.runnable.append("ghost")  # as if the catalog and the app disagreed
    asyncio.run(worker.run())
    row = job_row(conn, job_id)
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert "not registered in this worker's app" in row["error"]


def test_claims_never_exceed_free_capacity(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    tasks.enqueue_many([{"task": "sleep", "args": {"seconds": 0.05}} for _ in range(24)])
    burst(tasks, concurrency=3)
    # The most attempts running at any instant, from the history: +1 at each start, -1 at each end.
    most = conn.execute(
        """SELECT max(running) FROM (
               SELECT sum(delta) OVER (ORDER BY at, delta ROWS UNBOUNDED PRECEDING) AS running FROM (
                   SELECT started_at AS at, 1 AS delta FROM pgsched.runs
                   UNION ALL SELECT finished_at, -1 FROM pgsched.runs) AS events) AS x"""
    ).fetchone()[0]
    assert most == 3


def test_a_worker_never_holds_more_than_concurrency_plus_prefetch(
    tasks: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    async def scenario() -> list[int]:
        worker, task = await start_worker(tasks, poll_seconds=0.05, concurrency=2, prefetch=1)
        await tasks.enqueue_many_async([{"task": "sleep", "args": {"seconds": 0.4}} for _ in range(12)])
        seen = []
        for _ in range(30):  # sample while it drains: the jobs the database says it holds (running, or
            # finished with the outcome not written yet: both take capacity)
            seen.append(
                conn.execute(
                    "SELECT count(*) FROM pgsched.jobs WHERE state = 'running' AND worker_id = %s", (worker.lease,)
                ).fetchone()[0]
            )
            await asyncio.sleep(0.05)
        worker.stop()
        await task
        return seen

    seen = asyncio.run(scenario())
    assert max(seen) == 3, seen
    claimed = conn.execute("SELECT count(*) FROM pgsched.runs").fetchone()[0]
    assert claimed >= 6  # it kept claiming as slots freed


def test_several_queues_are_served_without_starving_one(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    tasks.enqueue_many([{"task": "noop", "queue": "big"} for _ in range(300)])
    small = tasks.enqueue("noop", queue="small")
    burst(tasks, queues="big,small", concurrency=1)
    rank = conn.execute(
        "SELECT rank FROM (SELECT job_id, rank() OVER (ORDER BY started_at, id) FROM pgsched.runs) r WHERE job_id = %s",
        (small.id,),
    ).fetchone()[0]
    assert rank <= 10  # it did not wait for the 300 jobs of the other queue


def test_claim_reads_the_partial_index_also_with_a_generic_plan(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO pgsched.jobs (task, state, finished_at) SELECT 't', 'succeeded', now() FROM generate_series(1, 5000)"
    )
    conn.execute("INSERT INTO pgsched.jobs (task) SELECT 't' FROM generate_series(1, 100)")
    conn.execute("ANALYZE pgsched.jobs")
    params = {"queues": ["default", "b"], "tasks": ["t"], "limit": 10, "worker": worker_incarnation(conn, "1 minute")}
    for mode in ("auto", "force_generic_plan"):
        conn.execute(f"SET plan_cache_mode = {mode}")
        with conn.transaction():
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + CLAIM, params, prepare=True).fetchall())
            assert "jobs_claim_idx" in plan and "Sort" not in plan.split("LockRows")[1], plan
            claimed = conn.execute(CLAIM, params).fetchall()
            assert len(claimed) == 10


def test_notify_wakes_an_idle_worker_and_the_listener_reconnects(tasks: pgsched.App, dsn: str) -> None:
    async def scenario() -> None:
        worker, task = await start_worker(
            tasks, poll_seconds=120
        )  # polling would take minutes: only NOTIFY can be this quick
        await asyncio.sleep(0.3)  # let it go idle after its first claim
        job = await tasks.enqueue_async("noop")
        await wait_until_async(lambda: job_is(tasks, job.id, "succeeded"), timeout=5, message="job woken by NOTIFY")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
            )
        await asyncio.sleep(1.6)  # the listener notices, waits its jittered pause and reconnects
        job = await tasks.enqueue_async("noop")
        await wait_until_async(lambda: job_is(tasks, job.id, "succeeded"), timeout=5, message="after reconnect")
        worker.stop()
        await task

    asyncio.run(scenario())


def test_cancel_stops_a_running_job(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    async def scenario() -> None:
        worker, task = await start_worker(tasks, poll_seconds=0.2)
        job = await tasks.enqueue_async("sleep", {"seconds": 60})
        await wait_until_async(lambda: job_is(tasks, job.id, "running"), message="running")
        await tasks.cancel_async(job.id, "operator said stop")
        await wait_until_async(lambda: job_is(tasks, job.id, "cancelled"), timeout=10, message="cancelled")
        worker.stop()
        await task

    asyncio.run(scenario())
    row = job_row(conn, job_id=conn.execute("SELECT max(id) FROM pgsched.jobs").fetchone()[0])
    assert row["error"] == "operator said stop" and runs_of(conn, row["id"])[0][1] == "cancelled"


def test_a_zombie_completion_changes_nothing(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    async def scenario() -> tuple[int, Any]:
        worker, task = await start_worker(tasks, poll_seconds=0.2, heartbeat_seconds=30, lease_seconds=60)
        job = await tasks.enqueue_async("sleep", {"seconds": 0.5})
        await wait_until_async(lambda: job_is(tasks, job.id, "running"), message="running")
        # Behind the worker's back (no heartbeat comes in time): rescued and finished by another.
        conn.execute(
            "UPDATE pgsched.jobs SET state = 'succeeded', worker_id = NULL, result = '\"other\"', finished_at = now() WHERE id = %s",
            (job.id,),
        )
        await wait_until_async(lambda: worker.stats.fenced == 1, timeout=5, message="fenced")
        worker.stop()
        return job.id, await task

    job_id, stats = asyncio.run(scenario())
    assert job_row(conn, job_id)["result"] == "other"
    assert [r[1] for r in runs_of(conn, job_id)] == ["fenced"]
    assert stats.succeeded == 0


def test_shutdown_puts_unfinished_jobs_back_without_counting_them(
    tasks: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    async def scenario() -> list[int]:
        worker, task = await start_worker(tasks, poll_seconds=0.2, concurrency=1, prefetch=2, grace_seconds=0.3)
        jobs = [await tasks.enqueue_async("sleep", {"seconds": 60}) for _ in range(3)]
        await wait_until_async(lambda: worker.held == 3 and worker.running == 1, message="claimed 3, one running")
        worker.stop()
        await task
        return [j.id for j in jobs]

    ids = asyncio.run(scenario())
    rows = [job_row(conn, i) for i in ids]
    assert [(r["state"], r["attempts"], r["worker_id"]) for r in rows] == [("queued", 0, None)] * 3
    outcomes = conn.execute("SELECT outcome, count(*) FROM pgsched.runs GROUP BY 1").fetchall()
    assert outcomes == [("interrupted", 1)]  # the running one; the prefetched ones never started
    assert conn.execute("SELECT count(*) FROM pgsched.workers").fetchone()[0] == 0


def test_heartbeat_extends_leases_and_registers_the_worker(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    async def scenario() -> None:
        worker, task = await start_worker(tasks, poll_seconds=0.2, lease_seconds=1, heartbeat_seconds=0.2)
        job = await tasks.enqueue_async("sleep", {"seconds": 2.5})
        await wait_until_async(lambda: job_is(tasks, job.id, "succeeded"), timeout=10, message="finished")
        row = conn.execute("SELECT alive, queues, concurrency FROM pgsched.worker_status").fetchone()
        assert row == (True, ["default"], 10)
        worker.stop()
        await task

    asyncio.run(scenario())
    # It ran longer than its lease, and was never taken away.
    assert [r[1] for r in conn.execute("SELECT attempt, outcome FROM pgsched.runs").fetchall()] == ["succeeded"]


def test_run_worker_refuses_bad_options(tasks: pgsched.App) -> None:
    with pytest.raises(pgsched.ConfigError, match="concurrency"):
        tasks.run_worker(concurrency=0)
    with pytest.raises(pgsched.ConfigError, match="heartbeat"):
        tasks.run_worker(lease_seconds=1, heartbeat_seconds=5)


def test_wait_until_fails_on_timeout() -> None:
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: False, timeout=0.05)


def test_a_prefetched_job_cancelled_before_it_starts_never_runs(
    tasks: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    async def scenario() -> tuple[int, int]:
        worker, task = await start_worker(tasks, poll_seconds=0.2, concurrency=1, prefetch=1)
        busy = await tasks.enqueue_async("sleep", {"seconds": 1.0})
        waiting = await tasks.enqueue_async("echo", {"value": "should not run"})
        # Both claimed (prefetch 1): one runs, the other waits in the worker.
        await wait_until_async(lambda: job_is(tasks, waiting.id, "running"), message="prefetched")
        await tasks.cancel_async(waiting.id, "not needed")
        await wait_until_async(lambda: job_is(tasks, waiting.id, "cancelled"), timeout=5, message="cancelled")
        await wait_until_async(lambda: job_is(tasks, busy.id, "succeeded"), timeout=5, message="busy done")
        worker.stop()
        await task
        return busy.id, waiting.id

    _, waiting_id = asyncio.run(scenario())
    row = job_row(conn, waiting_id)
    assert (row["result"], row["error"]) == (None, "not needed")
    assert [r[1] for r in runs_of(conn, waiting_id)] == ["cancelled"]


def test_burst_with_the_scheduler_returns(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job = tasks.enqueue("echo", {"value": 1})
    done = threading.Event()
    runner = threading.Thread(target=lambda: (tasks.run_worker(burst=True, poll_seconds=0.1), done.set()))
    runner.start()
    runner.join(timeout=30)
    assert done.is_set(), "run_worker(burst=True) did not return (with the scheduler, which is on by default)"
    assert tasks.get(job.id).state == "succeeded"


def test_a_timed_out_sync_task_sees_cancelled_and_its_late_logs_are_dropped(
    app: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    import logging

    finished = threading.Event()

    @app.task(timeout=0.2, max_attempts=1)
    def stubborn(ctx: Context) -> None:
        assert ctx.wait_cancelled(30)
        logging.getLogger("user.code").warning("too late to be recorded")
        finished.set()

    job = app.enqueue("stubborn")
    app.run_worker(burst=True, poll_seconds=0.1)
    assert finished.wait(5)  # it noticed the timeout through ctx.cancelled
    assert app.get(job.id).state == "failed"
    assert conn.execute("SELECT count(*) FROM pgsched.run_logs WHERE job_id = %s", (job.id,)).fetchone()[0] == 0


def test_wait_cancelled_waits_for_the_stop_or_the_timeout() -> None:
    ctx = Context(None, None)  # type: ignore[arg-type]  # neither is used to wait
    assert ctx.wait_cancelled(0.01) is False  # nobody stopped it: the timeout ends the wait
    threading.Timer(0.05, ctx._cancel).start()
    assert ctx.wait_cancelled(30) is True  # stopped from another thread while waiting
    stopped_first = Context(None, None)  # type: ignore[arg-type]
    stopped_first._cancel()
    assert stopped_first.wait_cancelled(30) is True  # stopped before the first wait


def test_run_worker_takes_python_values(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    @tasks.task(queue="b")
    def on_b() -> str:
        return "ran on b"

    jobs = [tasks.enqueue("echo", {"value": 1}, queue="a"), on_b.enqueue()]
    stats = tasks.run_worker(
        queues=["a", "b"],
        concurrency=4,
        burst=True,
        poll_seconds=timedelta(milliseconds=100),
        grace_seconds=timedelta(seconds=5),
        scheduler=False,
    )
    assert (stats.claimed, stats.succeeded) == (2, 2)
    assert [tasks.get(job.id).result for job in jobs] == [1, "ran on b"]
