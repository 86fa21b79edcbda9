"""Real ``pgsched scheduler`` and ``pgsched worker`` processes (every worker runs the scheduler unless
``--no-scheduler``): a crashed worker's job rescued and finished elsewhere, leader failover after kill -9,
promotion and retries without a separate scheduler, one leader per pass among workers, and schedules
defined in code firing on their own.

Nothing here moves the clock or promotes by hand: the processes do it all, and each test waits on what
a user would see in the database, with a deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgsched

from .apps import sample, sched_app
from .conftest import wait_until
from .processes import PgschedProcess

pytestmark = pytest.mark.process

SAMPLE = "tests.apps.sample:app"
SCHED_APP = "tests.apps.sched_app:app"
# Short leases so a crash is noticed in seconds; the heartbeat keeps a live worker's jobs.
FAST_WORKER = ("--lease-seconds", "2", "--heartbeat-seconds", "0.5", "--poll-seconds", "0.2")
SHORT_HEARTBEAT = {"PGSCHED_HEARTBEAT_SECONDS": "0.5"}


Process = PgschedProcess


@pytest.fixture
def spawn(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """Start ``pgsched ARGS``; whatever is still running at the end is killed."""
    started: list[Process] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Process:
        directory = tmp_path / f"{args[0]}-{len(started)}"
        directory.mkdir()
        proc = Process(list(args), {**cli_env, **(env or {})}, directory)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait(10)


@pytest.fixture
def client(dsn: str) -> Iterator[pgsched.App]:
    """An App on this test's database that knows the sample and sched_app tasks.

    Named apart from the apps under test: an App that connects syncs *its* schedules defined in code
    (none here), and must not touch theirs.
    """
    application = pgsched.App(dsn, name="tests-client")
    application.tasks.update(sample.app.tasks)
    application.tasks.update(sched_app.app.tasks)
    yield application
    application.close()


def while_alive(predicate: Callable[[], Any], *procs: Process) -> Callable[[], Any]:
    """``predicate``, failing at once (with the process's stderr) if one of ``procs`` has exited."""

    def check() -> Any:
        for proc in procs:
            proc.check_alive()
        return predicate()

    return check


def job_row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM pgsched.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None, f"job {job_id} is gone"
    return row


def runs(conn: psycopg.Connection[Any], job_id: int) -> list[tuple[Any, ...]]:
    """(attempt, outcome, worker_id) of every runs row of the job, oldest first."""
    return conn.execute(
        "SELECT attempt, outcome, worker_id FROM pgsched.runs WHERE job_id = %s ORDER BY id", (job_id,)
    ).fetchall()


def worker_id(conn: psycopg.Connection[Any], proc: Process) -> Any:
    """The workers row id of a worker process, once it has registered."""
    row = conn.execute("SELECT id FROM pgsched.workers WHERE pid = %s", (proc.pid,)).fetchone()
    return row[0] if row else None


def registered(conn: psycopg.Connection[Any], procs: list[Process]) -> dict[Any, Process] | None:
    """Worker id -> process, once every one of ``procs`` has registered."""
    ids = [worker_id(conn, proc) for proc in procs]
    return dict(zip(ids, procs, strict=True)) if all(ids) else None


def in_state(conn: psycopg.Connection[Any], job_id: int, state: str) -> dict[str, Any] | None:
    row = job_row(conn, job_id)
    return row if row["state"] == state else None


def insert_due_scheduled(conn: psycopg.Connection[Any]) -> int:
    """A ``scheduled`` job that is due now, inserted by plain SQL: only a promoter can queue it."""
    return conn.execute(
        "INSERT INTO pgsched.jobs (task, state, run_at) VALUES ('noop', 'scheduled', now()) RETURNING id"
    ).fetchone()[0]


def promoted(conn: psycopg.Connection[Any], job_id: int) -> bool:
    return job_row(conn, job_id)["state"] != "scheduled"


# -- pgsched scheduler --------------------------------------------------------------------------


def test_a_killed_workers_job_is_rescued_and_finished_by_another_worker(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn: Callable[..., Process]
) -> None:
    scheduler = spawn("scheduler", "--lease-seconds", "2", env=SHORT_HEARTBEAT)
    workers = [spawn("worker", "--app", SAMPLE, *FAST_WORKER) for _ in range(2)]
    by_id = wait_until(while_alive(lambda: registered(conn, workers), *workers), timeout=20, message="two workers")
    job = client.enqueue("sleep_async", {"seconds": 3})
    claimed = wait_until(while_alive(lambda: in_state(conn, job.id, "running"), *workers), message="the claim")
    dead = claimed["worker_id"]
    (alive,) = set(by_id) - {dead}
    doomed, survivor = by_id[dead], by_id[alive]

    doomed.kill()  # mid-job: the attempt takes 3 s
    assert job_row(conn, job.id)["state"] == "running"

    wait_until(
        while_alive(lambda: (1, "lease_expired", dead) in runs(conn, job.id), scheduler, survivor),
        timeout=30,
        message="the rescuer to expire the dead worker's lease",
    )
    done = wait_until(
        while_alive(lambda: in_state(conn, job.id, "succeeded"), scheduler, survivor),
        timeout=30,
        message="the second attempt to finish",
    )
    assert (done["attempts"], done["result"], done["error"]) == (2, "slept", None)
    # One attempt lost with the dead worker, one success elsewhere: the job completed exactly once.
    assert runs(conn, job.id) == [(1, "lease_expired", dead), (2, "succeeded", alive)]


def test_promotion_survives_the_leaders_kill_9(conn: psycopg.Connection[Any], spawn: Callable[..., Process]) -> None:
    first = spawn("scheduler")
    second = spawn("scheduler")
    before = insert_due_scheduled(conn)
    wait_until(while_alive(lambda: promoted(conn, before), first, second), timeout=20, message="a scheduler to promote")

    # Whichever of the two led the last passes, the one left leads the next ones.
    first.kill()
    after_first = insert_due_scheduled(conn)
    wait_until(
        while_alive(lambda: promoted(conn, after_first), second),
        timeout=20,
        message="the second scheduler to promote alone",
    )

    second.kill()
    orphan = insert_due_scheduled(conn)  # due while no scheduler runs
    third = spawn("scheduler")
    wait_until(
        while_alive(lambda: promoted(conn, orphan), third), timeout=20, message="a newly started scheduler to promote"
    )
    again = insert_due_scheduled(conn)
    wait_until(while_alive(lambda: promoted(conn, again), third), timeout=20, message="it to keep promoting")
    jobs = [before, after_first, orphan, again]
    states = conn.execute("SELECT id, state FROM pgsched.jobs WHERE id = ANY(%s) ORDER BY id", (jobs,)).fetchall()
    assert states == [(i, "queued") for i in jobs]  # promoted once each; no worker runs them
    assert third.stop() == 0


def test_a_scheduler_with_a_short_lease_starts(conn: psycopg.Connection[Any], spawn: Callable[..., Process]) -> None:
    scheduler = spawn("scheduler", "--lease-seconds", "2")
    job_id = insert_due_scheduled(conn)
    wait_until(while_alive(lambda: promoted(conn, job_id), scheduler), timeout=20, message="the scheduler to promote")


# -- the scheduler in every worker ----------------------------------------------------------------


def test_a_plain_worker_runs_delayed_jobs_and_retries_alone(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn: Callable[..., Process]
) -> None:
    worker = spawn("worker", "--app", SCHED_APP, *FAST_WORKER)
    me = wait_until(while_alive(lambda: worker_id(conn, worker), worker), timeout=20, message="the worker to register")

    delayed = client.enqueue("hello", {"name": "later"}, delay=1)
    assert delayed.state == "scheduled"
    done = wait_until(
        while_alive(lambda: in_state(conn, delayed.id, "succeeded"), worker),
        timeout=20,
        message="the delayed job to be promoted and run",
    )
    assert done["result"] == "hello later"
    assert done["started_at"] >= done["run_at"] >= done["created_at"] + timedelta(seconds=1)  # not claimed early
    assert runs(conn, delayed.id) == [(1, "succeeded", me)]

    failing = client.enqueue("always_fails", {"message": "still broken"})
    dead = wait_until(
        while_alive(lambda: in_state(conn, failing.id, "failed"), worker),
        timeout=20,
        message="the job to be retried, then dead-lettered",
    )
    assert dead["attempts"] == 2 and "still broken" in dead["error"]
    assert runs(conn, failing.id) == [(1, "failed", me), (2, "failed", me)]
    # The retry was due 0.5 s after the first attempt ended, and the second attempt waited for it.
    assert dead["started_at"] >= dead["run_at"] >= dead["created_at"] + timedelta(seconds=0.5)

    retried = client.enqueue("retry_once")
    done = wait_until(
        while_alive(lambda: in_state(conn, retried.id, "succeeded"), worker),
        timeout=20,
        message="the job that raised Retry to run again and succeed",
    )
    assert (done["attempts"], done["result"]) == (2, "succeeded on attempt 2")
    assert [outcome for _, outcome, _ in runs(conn, retried.id)] == ["failed", "succeeded"]  # Retry ends the attempt
    assert worker.stop() == 0


def scheduler_flags(conn: psycopg.Connection[Any]) -> dict[int, bool]:
    """pid -> with_scheduler of the live workers, as monitoring reads them."""
    return dict(conn.execute("SELECT pid, with_scheduler FROM pgsched.worker_status WHERE alive").fetchall())


def test_worker_status_says_which_workers_run_the_scheduler(
    conn: psycopg.Connection[Any], spawn: Callable[..., Process]
) -> None:
    plain = spawn("worker", "--app", SAMPLE, *FAST_WORKER)
    old_flag = spawn("worker", "--with-scheduler", "--app", SAMPLE, *FAST_WORKER)  # still accepted: a no-op
    opted_out = spawn("worker", "--no-scheduler", "--app", SAMPLE, *FAST_WORKER)
    by_env = spawn("worker", "--app", SAMPLE, *FAST_WORKER, env={"PGSCHED_SCHEDULER": "false"})
    procs = [plain, old_flag, opted_out, by_env]
    flags = wait_until(
        while_alive(lambda: len(scheduler_flags(conn)) == 4 and scheduler_flags(conn), *procs),
        timeout=30,
        message="four workers to register",
    )
    assert flags == {plain.pid: True, old_flag.pid: True, opted_out.pid: False, by_env.pid: False}
    for proc in procs:
        assert proc.stop() == 0


def test_workers_lead_maintenance_only_with_the_lock(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn: Callable[..., Process], dsn: str
) -> None:
    from pgsched.leader.service import LEADER_KEY

    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LEADER_KEY,))  # someone else leads every pass
        job = client.enqueue("hello", {"name": "due"}, delay=0.1)
        workers = [spawn("worker", "--app", SCHED_APP, *FAST_WORKER, "--log-level", "debug") for _ in range(2)]
        wait_until(
            while_alive(lambda: all("promoter: another process leads" in w.stderr() for w in workers), *workers),
            timeout=30,
            message="both workers to find the promoter's pass led elsewhere",
        )
        # Both have tried since the job became due, and neither promoted it: they defer to the leader.
        assert job_row(conn, job.id)["state"] == "scheduled"
    # The lock is free: one of them leads the next pass, and the job runs once.
    done = wait_until(
        while_alive(lambda: in_state(conn, job.id, "succeeded"), *workers),
        timeout=20,
        message="a worker to lead, promote and run the job",
    )
    assert done["result"] == "hello due"
    assert [outcome for _, outcome, _ in runs(conn, job.id)] == ["succeeded"]
    for proc in workers:
        assert proc.stop() == 0


def schedule_row(conn: psycopg.Connection[Any], name: str) -> tuple[Any, ...] | None:
    return conn.execute(
        "SELECT id, source, every, enabled, paused FROM pgsched.schedules WHERE name = %s", (name,)
    ).fetchone()


def test_a_schedule_defined_in_code_fires_from_the_worker(
    conn: psycopg.Connection[Any], spawn: Callable[..., Process]
) -> None:
    worker = spawn("worker", "--app", SCHED_APP, *FAST_WORKER)
    schedule_id, *schedule = wait_until(
        while_alive(lambda: schedule_row(conn, "heartbeat-demo"), worker),
        timeout=20,
        message="the worker to write its schedule",
    )
    assert schedule == ["code", timedelta(seconds=1), True, False]

    def succeeded_slots() -> list[Any]:
        rows = conn.execute(
            "SELECT slot FROM pgsched.jobs WHERE schedule_id = %s AND state = 'succeeded' ORDER BY slot",
            (schedule_id,),
        ).fetchall()
        return [slot for (slot,) in rows] if len(rows) >= 2 else []

    first, second, *_ = wait_until(
        while_alive(succeeded_slots, worker), timeout=30, message="two slots of the schedule to succeed"
    )
    assert second > first and (second - first) % timedelta(seconds=1) == timedelta(0)  # on its 1 s timetable
    total, distinct, results = conn.execute(
        "SELECT count(*), count(DISTINCT slot), array_agg(DISTINCT result) FILTER (WHERE state = 'succeeded')"
        " FROM pgsched.jobs WHERE schedule_id = %s",
        (schedule_id,),
    ).fetchone()
    assert total == distinct  # every slot fired once
    assert results == ["beat"]
    assert worker.stop() == 0


def test_a_worker_of_another_app_leaves_the_schedules_of_this_one_alone(
    conn: psycopg.Connection[Any], spawn: Callable[..., Process]
) -> None:
    owner = spawn("worker", "--app", SCHED_APP, *FAST_WORKER)
    wait_until(while_alive(lambda: schedule_row(conn, "heartbeat-demo"), owner), timeout=20, message="the schedule")
    other = spawn("worker", "--app", SAMPLE, *FAST_WORKER)  # another app, with no schedules of its own
    wait_until(while_alive(lambda: worker_id(conn, other), other), timeout=20, message="the other worker to register")
    # It connected, and synced its own (empty) set of schedules, before it registered.
    assert schedule_row(conn, "heartbeat-demo")[3] is True  # enabled
