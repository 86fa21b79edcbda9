"""The worker's lease, attempt states and write path under the adversary (issue 18).

Each test reads its outcome from the database, as a user would: a job left ``running`` that
nobody runs, a second attempt started while the first was alive, an outcome that never got
written. The adversaries: the same worker taking back a job it lost, a blocked history write, an
application transaction holding a row lock, a refused row in a batch, a shutdown with more than
a thousand outcomes buffered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgsched
from pgsched import Context

from .conftest import start_worker, wait_until_async

pytestmark = pytest.mark.db


@pytest.fixture
def tasks(app: pgsched.App) -> pgsched.App:
    @app.task
    def noop(i: int = 0) -> None:
        pass

    @app.task
    async def nap(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slept"

    @app.task
    def stubborn(ctx: Context, seconds: float, done: str) -> str:
        """Attempt 1 ignores every request to stop (a thread cannot be stopped), then leaves a
        file; later ones return at once."""
        if ctx.attempt == 1:
            time.sleep(seconds)
            Path(done).touch()
            return "first"
        return "second"

    @app.task
    def big_list() -> list[int]:
        # About 300 KB of JSON text, under the 1 MiB cap the worker checks, but over 1 MiB as
        # jsonb, which the column's constraint checks.
        return [1] * 150_000

    @app.task
    def echo(a: Any = None) -> Any:
        return a

    return app


def scalar(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    return conn.execute(sql, params).fetchone()[0]


def states(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return dict(conn.execute("SELECT state, count(*) FROM pgsched.jobs GROUP BY state").fetchall())


def runs(conn: psycopg.Connection[Any], job_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT attempt, outcome, worker_id FROM pgsched.runs WHERE job_id = %s ORDER BY id", (job_id,)
    ).fetchall()


def held_in_db(conn: psycopg.Connection[Any], worker: Any) -> int:
    """Jobs the database says this incarnation holds (running, or finished and not yet written)."""
    return scalar(conn, "SELECT count(*) FROM pgsched.jobs WHERE state = 'running' AND worker_id = %s", worker.lease)


def test_the_same_worker_takes_back_a_job_it_lost_and_finishes_it(
    tasks: pgsched.App, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """R2, R14: after losing its lease the worker forgets the job, registers anew, claims it again
    while attempt 1's thread still runs, and attempt 2 ends the job; attempt 1 writes nothing."""

    async def scenario() -> tuple[int, Any, Any]:
        worker, task = await start_worker(
            tasks, poll_seconds=0.1, concurrency=2, lease_seconds=2, heartbeat_seconds=0.2
        )
        done = tmp_path / "attempt-1-returned"
        job = await tasks.enqueue_async("stubborn", {"seconds": 3, "done": str(done)})
        await wait_until_async(lambda: scalar(conn, "SELECT state = 'running' FROM pgsched.jobs WHERE id = %s", job.id))
        first = worker.lease
        # The lease runs out behind the worker's back (a long GC pause, say) and the rescuer acts.
        conn.execute(
            "UPDATE pgsched.workers SET lease_expires_at = pgsched.now() - interval '1 second' WHERE id = %s", (first,)
        )
        assert scalar(conn, "SELECT pgsched.rescue()") == 1
        conn.execute("UPDATE pgsched.jobs SET run_at = pgsched.now() WHERE id = %s", (job.id,))  # skip the backoff
        assert scalar(conn, "SELECT pgsched.promote()") == 1
        await wait_until_async(
            lambda: scalar(conn, "SELECT state FROM pgsched.jobs WHERE id = %s", job.id) == "succeeded",
            timeout=10,
            message="attempt 2 to finish the job",
        )
        # Attempt 1's thread returns after that: it must change nothing.
        await wait_until_async(done.exists, timeout=10, message="attempt 1's thread to return")
        await wait_until_async(lambda: worker.threads.busy == 0, message="its return to reach the worker")
        worker.stop()
        await task
        return job.id, first, worker.lease

    job_id, first, second = asyncio.run(scenario())
    assert first != second
    row = conn.execute("SELECT state, attempts, result FROM pgsched.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("succeeded", 2, "second")
    assert runs(conn, job_id) == [(1, "lease_expired", first), (2, "succeeded", second)]
    assert states(conn) == {"succeeded": 1}
    # The worker's own rows: the first incarnation marked lost by the rescuer, the second gone at stop.
    assert conn.execute("SELECT id FROM pgsched.workers").fetchall() == [(first,)]


def test_a_row_lock_held_by_an_application_does_not_cost_the_lease(
    tasks: pgsched.App, conn: psycopg.Connection[Any], dsn: str
) -> None:
    """R15: a transaction holding a row lock on one running job (an enqueue with depends_on, say)
    for longer than the lease: the worker's lease stays alive, the rescuer takes nothing."""

    async def scenario() -> tuple[int, int]:
        worker, task = await start_worker(tasks, poll_seconds=0.1, lease_seconds=1.5, heartbeat_seconds=0.2)
        locked = await tasks.enqueue_async("nap", {"seconds": 0.3})
        other = await tasks.enqueue_async("nap", {"seconds": 3})
        await wait_until_async(lambda: held_in_db(conn, worker) == 2, message="both running")
        with psycopg.connect(dsn) as app_tx:
            app_tx.execute("SELECT 1 FROM pgsched.jobs WHERE id = %s FOR NO KEY UPDATE", (locked.id,))
            rescued = 0
            for _ in range(20):  # four lease lengths, the rescuer trying all along
                rescued += scalar(conn, "SELECT pgsched.rescue()")
                await asyncio.sleep(0.15)
            app_tx.rollback()
        await wait_until_async(lambda: states(conn) == {"succeeded": 2}, timeout=10, message="both done")
        worker.stop()
        await task
        return rescued, other.id

    rescued, _ = asyncio.run(scenario())
    assert rescued == 0
    assert scalar(conn, "SELECT count(*) FROM pgsched.runs WHERE outcome <> 'succeeded'") == 0


def test_blocked_history_writes_stop_claims_and_lose_nothing(
    tasks: pgsched.App, conn: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """R3, R8, R9: while history writes are blocked (longer than a lease) the worker holds at most
    concurrency + prefetch jobs, keeps its lease, and once unblocked writes every outcome."""
    caplog.set_level(logging.WARNING, logger="pgsched.worker")

    async def scenario() -> list[int]:
        worker, task = await start_worker(
            tasks, poll_seconds=0.1, concurrency=10, prefetch=5, lease_seconds=1.5, heartbeat_seconds=0.2
        )
        seen = []
        with psycopg.connect(dsn) as blocker:
            blocker.execute("LOCK TABLE pgsched.runs IN ACCESS EXCLUSIVE MODE")
            await tasks.enqueue_many_async([{"task": "noop", "args": {"i": i}} for i in range(600)])
            for _ in range(40):  # four seconds: more than two leases
                seen.append(held_in_db(conn, worker))
                # (The rescuer would wait on the lock too: it writes history. The lease it reads:)
                live = "SELECT lease_expires_at > pgsched.now() FROM pgsched.workers WHERE id = %s"
                assert scalar(conn, live, worker.lease)
                await asyncio.sleep(0.1)
            blocker.rollback()
        await wait_until_async(lambda: states(conn) == {"succeeded": 600}, timeout=30, message="all written")
        worker.stop()
        await task
        return seen

    seen = asyncio.run(scenario())
    assert max(seen) == 15, seen  # full, and never more than concurrency + prefetch
    assert scalar(conn, "SELECT count(*) FROM pgsched.runs") == 600
    assert scalar(conn, "SELECT count(DISTINCT job_id) FROM pgsched.runs WHERE outcome = 'succeeded'") == 600
    assert not [r for r in caplog.records if "deadlock" in r.getMessage() or "lost its lease" in r.getMessage()]


def test_a_shutdown_drains_more_than_a_thousand_buffered_outcomes(
    tasks: pgsched.App, conn: psycopg.Connection[Any], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """R8: history writes blocked, 1,500 outcomes buffered, then a graceful stop: every finished
    job is written before the worker returns (none is left running to run again)."""

    caplog.set_level(logging.INFO, logger="pgsched.worker")
    ran: list[int] = []

    @tasks.task
    async def counted(i: int) -> None:
        ran.append(i)

    async def scenario() -> Any:
        worker, task = await start_worker(
            tasks, poll_seconds=0.1, concurrency=20, prefetch=1600, lease_seconds=30, heartbeat_seconds=1
        )
        with psycopg.connect(dsn) as blocker:
            blocker.execute("LOCK TABLE pgsched.runs IN ACCESS EXCLUSIVE MODE")
            await tasks.enqueue_many_async([{"task": "counted", "args": {"i": i}} for i in range(1500)])
            await wait_until_async(lambda: len(ran) == 1500, timeout=30, message="every job run, outcomes waiting")
            worker.stop()
            # The stop has reached the final drain while the writes are still blocked.
            await wait_until_async(
                lambda: any("buffered outcomes" in r.getMessage() for r in caplog.records),
                message="the drain to begin",
            )
            blocker.rollback()
        return await task

    stats = asyncio.run(scenario())
    assert states(conn) == {"succeeded": 1500}
    assert scalar(conn, "SELECT count(*) FROM pgsched.runs WHERE outcome = 'succeeded'") == 1500
    assert stats.succeeded == 1500
    assert conn.execute("SELECT count(*) FROM pgsched.workers").fetchone() == (0,)


def test_a_failed_flush_is_retried_without_another_outcome(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    """R7: the only outcome's first write fails; it is written again on the writer's own backoff,
    not when some other outcome comes along (there is none)."""
    conn.execute(
        """CREATE FUNCTION pg_temp.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'history is read-only for a moment'; END $$"""
    )
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON pgsched.runs FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse()")

    async def scenario() -> int:
        worker, task = await start_worker(tasks, poll_seconds=0.1)
        job = await tasks.enqueue_async("echo", {"a": 1})
        await wait_until_async(lambda: worker.writer.failures >= 1, message="a failed write")
        conn.execute("DROP TRIGGER refuse ON pgsched.runs")
        await wait_until_async(lambda: states(conn) == {"succeeded": 1}, timeout=10, message="written on a retry")
        worker.stop()
        await task
        return job.id

    job_id = asyncio.run(scenario())
    assert [r[:2] for r in runs(conn, job_id)] == [(1, "succeeded")]


def test_a_job_claimed_in_a_reply_the_worker_never_got_is_given_back(
    tasks: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    """A claim can commit and its reply be lost (the session cut just after the commit): the
    database then says the worker runs a job it does not hold. The lease is alive, so the rescuer
    leaves it alone; without the heartbeat's check it would stay ``running`` forever."""

    async def scenario() -> int:
        worker, task = await start_worker(tasks, poll_seconds=0.05, heartbeat_seconds=0.2)
        orphan = scalar(
            conn,
            "INSERT INTO pgsched.jobs (task, args, state, attempts, worker_id, started_at)"
            " VALUES ('echo', '{\"a\": 7}', 'running', 1, %s, pgsched.now()) RETURNING id",
            worker.lease,
        )
        await wait_until_async(lambda: states(conn) == {"succeeded": 1}, timeout=10, message="the orphan run")
        worker.stop()
        await task
        return int(orphan)

    job_id = asyncio.run(scenario())
    assert [r[:2] for r in runs(conn, job_id)] == [(1, "succeeded")]  # the lost claim did not count


def test_an_outcome_the_database_refuses_fails_alone(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    """R6: a result that passes the worker's check but not the column's is split out of its
    batch and fails with the reason; the rest of the batch is written."""
    big = tasks.enqueue("big_list")
    tasks.enqueue_many([{"task": "noop", "args": {"i": i}} for i in range(100)])
    tasks.run_worker(burst=True, poll_seconds=0.1, concurrency=10)
    assert states(conn) == {"succeeded": 100, "failed": 1}
    state, error = conn.execute("SELECT state, error FROM pgsched.jobs WHERE id = %s", (big.id,)).fetchone()
    assert state == "failed" and "could not be stored" in error and "jobs_result_size" in error
    assert [r[:2] for r in runs(conn, big.id)] == [(1, "failed")]  # not retried: it would return the same


def test_args_too_deep_to_decode_fail_their_job_alone(tasks: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    """R1: a row with args nested 2,000 levels (valid for PostgreSQL) fails alone with a clear error;
    the worker survives and runs the others of the same claim. Since migration 10 an INSERT refuses
    such args (tests/test_bad_input.py): the row is one written before, made with the guard off."""
    conn.execute("ALTER TABLE pgsched.jobs DISABLE TRIGGER jobs_refuse_bad_input")
    deep = scalar(
        conn,
        "INSERT INTO pgsched.jobs (task, args) VALUES ('echo', (repeat('{\"a\":', 2000) || '1' || repeat('}', 2000))::jsonb)"
        " RETURNING id",
    )
    conn.execute("ALTER TABLE pgsched.jobs ENABLE TRIGGER jobs_refuse_bad_input")
    tasks.enqueue_many([{"task": "noop", "args": {"i": i}} for i in range(20)])
    tasks.run_worker(burst=True, poll_seconds=0.1)
    assert states(conn) == {"succeeded": 20, "failed": 1}
    error = scalar(conn, "SELECT error FROM pgsched.jobs WHERE id = %s", deep)
    assert "args cannot be read" in error and "recursion" in error


def test_releasing_a_job_whose_cancel_was_requested_cancels_it(
    tasks: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    """R5: a prefetched job whose cancel was requested (the notice missed) is released at
    shutdown: it ends cancelled, and never runs later."""

    async def scenario() -> int:
        worker, task = await start_worker(
            tasks, poll_seconds=0.1, concurrency=1, prefetch=1, heartbeat_seconds=20, lease_seconds=60
        )
        await tasks.enqueue_async("nap", {"seconds": 60})
        waiting = await tasks.enqueue_async("echo", {"a": "charge the card"})
        await wait_until_async(lambda: held_in_db(conn, worker) == 2, message="one running, one prefetched")
        # As pgsched.cancel does for a running job, without the NOTIFY the worker would hear.
        conn.execute("UPDATE pgsched.jobs SET cancel_requested_at = pgsched.now() WHERE id = %s", (waiting.id,))
        worker.stop()
        await task
        return waiting.id

    waiting_id = asyncio.run(scenario())
    row = conn.execute("SELECT state, attempts, result FROM pgsched.jobs WHERE id = %s", (waiting_id,)).fetchone()
    assert row == ("cancelled", 0, None)
    assert (
        scalar(conn, "SELECT count(*) FROM pgsched.runs WHERE job_id = %s AND outcome = 'succeeded'", waiting_id) == 0
    )


def test_a_stuck_sync_thread_does_not_keep_the_process_alive(tmp_path: Any, dsn: str) -> None:
    """R19: run_worker() returns and the interpreter exits although a sync task's thread still runs."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import os, signal, time, pgsched\n"
        f"app = pgsched.App({dsn!r})\n"
        "@app.task\n"
        "def forever() -> None:\n"
        # Stop once the task runs (the worker's signal handlers are in place by then, however
        # slowly the process started), then stay stuck in the thread.
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(600)\n"
        "app.enqueue('forever')\n"
        "app.run_worker(grace_seconds=0.2, poll_seconds=0.1)\n"
        "print('returned', flush=True)\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "returned" in done.stdout
