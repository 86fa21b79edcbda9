"""Real ``pgsched worker`` processes: burst, signals and graceful shutdown, crashes (kill -9), fencing of a
zombie worker, and the ``--processes`` supervisor."""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgsched

from .apps import extra, sample
from .conftest import HEAVY, wait_until
from .processes import WorkerProcess
from .test_executors import alive

pytestmark = pytest.mark.process

SAMPLE = "tests.apps.sample:app"
EXTRA = "tests.apps.extra:app"


@pytest.fixture
def client(dsn: str) -> Iterator[pgsched.App]:
    """An App on this test's database that knows the tasks of tests.apps.sample and tests.apps.extra."""
    application = pgsched.App(dsn)
    application.tasks.update(sample.app.tasks)
    application.tasks.update(extra.app.tasks)
    yield application
    application.close()


def job_row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM pgsched.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None, f"job {job_id} is gone"
    return row


def runs(conn: psycopg.Connection[Any], job_id: int) -> list[tuple[int, str, uuid.UUID]]:
    """(attempt, outcome, worker_id) of every runs row of the job, oldest first."""
    return conn.execute(
        "SELECT attempt, outcome, worker_id FROM pgsched.runs WHERE job_id = %s ORDER BY id", (job_id,)
    ).fetchall()


def worker_pids(conn: psycopg.Connection[Any]) -> dict[int, uuid.UUID]:
    return dict(conn.execute("SELECT pid, id FROM pgsched.workers").fetchall())


def lease_of(conn: psycopg.Connection[Any], worker: uuid.UUID) -> Any:
    return conn.execute("SELECT lease_expires_at FROM pgsched.workers WHERE id = %s", (worker,)).fetchone()[0]


def registered(conn: psycopg.Connection[Any], n: int) -> set[int] | None:
    """The pids of the registered workers once there are ``n`` of them."""
    pids = set(worker_pids(conn))
    return pids if len(pids) == n else None


def running(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any] | None:
    row = job_row(conn, job_id)
    return row if row["state"] == "running" else None


# -- one process -------------------------------------------------------------------------------------


def test_burst_drains_the_queues_and_exits_zero(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    echoes = {client.enqueue("echo", {"value": {"n": i}}).id: i for i in range(20)}
    adds = [client.enqueue("add", {"a": i, "b": 1}).id for i in range(5)]
    worker = spawn_worker("--burst", "--concurrency", "4")
    assert worker.wait(30) == 0, worker.stderr()
    assert "done: 25 claimed, 25 succeeded, 0 failed" in worker.stdout()
    for job_id, i in echoes.items():
        row = job_row(conn, job_id)
        assert (row["state"], row["result"], row["attempts"]) == ("succeeded", {"n": i}, 1)
    assert [job_row(conn, job_id)["result"] for job_id in adds] == [1, 2, 3, 4, 5]
    per_job = conn.execute("SELECT job_id, count(*), min(outcome) FROM pgsched.runs GROUP BY job_id").fetchall()
    assert sorted(per_job) == sorted((job_id, 1, "succeeded") for job_id in [*echoes, *adds])
    assert worker_pids(conn) == {}


def test_a_worker_whose_session_is_cut_while_it_starts_waits_and_starts(
    client: pgsched.App, conn: psycopg.Connection[Any], dsn: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A PostgreSQL restart during start-up (here: the session that registers the worker is
    terminated) is waited out like an unreachable database: the worker starts and runs jobs."""
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE pgsched.workers IN ACCESS EXCLUSIVE MODE")  # registering waits
        worker = spawn_worker()
        registering = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND application_name = 'pgsched worker' AND query LIKE '%%INSERT INTO pgsched.workers%%'"
        )
        pid = wait_until(lambda: conn.execute(registering).fetchone(), timeout=30, message="the worker registering")
        conn.execute("SELECT pg_terminate_backend(%s)", pid)
        wait_until(lambda: "starting: " in worker.stderr(), timeout=30, message="the retry's line")
    job = client.enqueue("add", {"a": 1, "b": 2})
    wait_until(lambda: job_row(conn, job.id)["state"] == "succeeded", timeout=30, message="the job run")
    worker.check_alive()


def test_the_worker_logs_one_line_per_finished_job_and_its_stop_in_words(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    ok = client.enqueue("add", {"a": 2, "b": 3})
    retried = client.enqueue("add", {"a": "two", "b": 3})  # TypeError inside the task; attempts left
    dead = client.enqueue("add", {"a": "two", "b": 3}, max_attempts=1)
    worker = spawn_worker("--burst")
    assert worker.wait(30) == 0, worker.stderr()
    lines = worker.stderr().splitlines()

    def line_of(job_id: int) -> str:
        (line,) = [line for line in lines if f" add job {job_id} " in line]
        return line

    assert re.search(rf"INFO pgsched.worker: add job {ok.id} attempt 1/5 succeeded in [0-9.]+ s$", line_of(ok.id))
    error = re.escape('TypeError: can only concatenate str (not "int") to str')
    assert re.search(
        rf"INFO pgsched.worker: add job {retried.id} attempt 1/5 failed in [0-9.]+ s, retry in [0-9.]+ s: {error}$",
        line_of(retried.id),
    )
    assert re.search(
        rf"ERROR pgsched.worker: add job {dead.id} attempt 1/1 failed in [0-9.]+ s, not retried: {error}$",
        line_of(dead.id),
    )
    (stopped,) = [line for line in lines if " stopped: " in line]
    assert re.search(r"stopped: 1 succeeded, 1 failed, 1 retried, 0 lost in [0-9.]+ s$", stopped)
    assert "Stats(" not in worker.stderr()


def test_sigterm_puts_a_running_job_back_and_exits(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job = client.enqueue("sleep_async", {"seconds": 60})
    worker = spawn_worker("--grace-seconds", "0.5")
    wait_until(lambda: running(conn, job.id), message="the job to run")
    worker_id = worker_pids(conn)[worker.pid]
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0, worker.stderr()
    row = job_row(conn, job.id)
    assert (row["state"], row["attempts"], row["worker_id"]) == ("queued", 0, None)
    assert runs(conn, job.id) == [(1, "interrupted", worker_id)]
    assert worker_pids(conn) == {}


def test_sigterm_with_a_sync_job_in_flight_exits_and_leaves_the_job_to_its_lease(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job = client.enqueue("sleep_sync", {"seconds": 60})
    worker = spawn_worker("--grace-seconds", "0.5", "--lease-seconds", "2", "--heartbeat-seconds", "0.5")
    claimed = wait_until(lambda: running(conn, job.id), message="the job to run")
    worker.signal(signal.SIGTERM)
    # A thread cannot be stopped: the process leaves without waiting for it...
    assert worker.wait(15) == 0, worker.stderr()
    # ...and does not put the job back, which could run it twice at once: its incarnation's row
    # stays with the lease it had, and once that lapses (the process is gone by then) the
    # rescuer takes the job back.
    assert worker_pids(conn) == {worker.pid: claimed["worker_id"]}
    row = job_row(conn, job.id)
    assert (row["state"], row["worker_id"], row["attempts"]) == ("running", claimed["worker_id"], 1)
    assert runs(conn, job.id) == []
    wait_until(
        lambda: conn.execute("SELECT pgsched.rescue()").fetchone()[0] == 1,
        timeout=15,
        message="the lease to lapse and the rescuer to take the job",
    )
    assert job_row(conn, job.id)["state"] == "scheduled"  # retried after a short backoff
    assert runs(conn, job.id) == [(1, "lease_expired", claimed["worker_id"])]


def test_two_signals_at_once_are_one_graceful_stop(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # `timeout ... make up`: both timeout and make forward the SIGTERM, so it arrives twice.
    job = client.enqueue("sleep_async", {"seconds": 1})
    worker = spawn_worker("--grace-seconds", "60")
    wait_until(lambda: running(conn, job.id), message="the job to run")
    worker.signal(signal.SIGTERM)
    # Not before the first is handled: two signals pending at once would be delivered as one.
    wait_until(lambda: "stopping: finishing" in worker.stderr(), message="the worker to begin its graceful stop")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.stderr()
    assert "already stopping" in worker.stderr()
    assert "stopping now" not in worker.stderr()
    assert job_row(conn, job.id)["state"] == "succeeded"  # it had its grace period, and finished
    assert worker_pids(conn) == {}


def signal_until(worker: WorkerProcess, sig: int, text: str) -> None:
    """Send ``sig`` again and again, as an impatient user would, until the worker logs ``text``."""

    def sent() -> bool:
        worker.check_alive()
        worker.signal(sig)
        return wait_until_or_none(lambda: text in worker.stderr(), 0.3)

    wait_until(sent, timeout=20, interval=0, message=f"the worker to log {text!r}")


def wait_until_or_none(predicate: Callable[[], Any], timeout: float) -> Any:
    try:
        return wait_until(predicate, timeout=timeout)
    except AssertionError:
        return None


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_deliberate_second_signal_stops_now_and_puts_the_jobs_back(
    second: int, client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job = client.enqueue("sleep_async", {"seconds": 60})
    worker = spawn_worker("--grace-seconds", "300")
    wait_until(lambda: running(conn, job.id), message="the job to run")
    worker_id = worker_pids(conn)[worker.pid]
    worker.signal(signal.SIGTERM)
    wait_until(lambda: "stopping" in worker.stderr(), message="the worker to begin its graceful stop")
    signal_until(worker, second, "stopping now")
    assert worker.wait(15) == 130  # well before the 300 s grace
    assert f"running jobs left: {job.id} (sleep_async)" in worker.stderr()
    row = job_row(conn, job.id)
    assert (row["state"], row["attempts"], row["worker_id"]) == ("queued", 0, None)
    assert runs(conn, job.id) == [(1, "interrupted", worker_id)]
    assert worker_pids(conn) == {}


def test_kill_9_mid_job_loses_nothing(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    job = client.enqueue("wait_for_file", {"path": str(gate)})
    first = spawn_worker("--lease-seconds", "2", "--heartbeat-seconds", "0.5", app=EXTRA)
    claimed = wait_until(lambda: running(conn, job.id), message="the job to run")
    dead_worker = claimed["worker_id"]
    assert worker_pids(conn)[first.pid] == dead_worker
    # While the worker lives, its heartbeat keeps extending its lease.
    first_lease = lease_of(conn, dead_worker)
    wait_until(lambda: lease_of(conn, dead_worker) > first_lease, message="a heartbeat to extend the lease")

    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    row = job_row(conn, job.id)
    assert (row["state"], row["worker_id"], row["attempts"]) == ("running", dead_worker, 1)
    # Nobody extends it any more: the lease runs out, and the job is still there, still running.
    wait_until(
        lambda: conn.execute("SELECT %s < pgsched.now()", (lease_of(conn, dead_worker),)).fetchone()[0],
        timeout=15,
        message="the dead worker's lease to expire",
    )
    row = job_row(conn, job.id)
    assert (row["state"], row["worker_id"]) == ("running", dead_worker)

    # The rescuer (the scheduler's maintenance pass) puts it back, to be retried after a short
    # backoff, and records the lost attempt.
    assert conn.execute("SELECT pgsched.rescue()").fetchone() == (1,)
    row = job_row(conn, job.id)
    assert (row["state"], row["worker_id"], row["attempts"]) == ("scheduled", None, 1)
    wait_until(lambda: conn.execute("SELECT pgsched.promote()").fetchone() == (1,), message="the backoff to pass")
    gate.touch()
    second = spawn_worker("--burst", app=EXTRA)
    assert second.wait(30) == 0, second.stderr()
    row = job_row(conn, job.id)
    assert (row["state"], row["attempts"], row["result"]) == ("succeeded", 2, "released")
    [lost, (attempt, outcome, by)] = runs(conn, job.id)
    assert lost == (1, "lease_expired", dead_worker)
    assert (attempt, outcome) == (2, "succeeded")
    assert by != dead_worker


def test_a_zombie_workers_late_completion_is_fenced(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    job = client.enqueue("wait_for_file", {"path": str(gate)})
    # A long heartbeat interval: the worker does not notice that it lost the job before it finishes it.
    zombie = spawn_worker("--burst", "--lease-seconds", "120", "--heartbeat-seconds", "60", app=EXTRA)
    claimed = wait_until(lambda: running(conn, job.id), message="the job to run")
    zombie_id = claimed["worker_id"]
    # Meanwhile the job was rescued and claimed again by another worker (attempt 2).
    taken = conn.execute(
        """UPDATE pgsched.jobs
           SET worker_id = %s, attempts = attempts + 1, started_at = pgsched.now()
           WHERE id = %s AND worker_id = %s AND state = 'running' RETURNING id""",
        (uuid.uuid4(), job.id, zombie_id),
    ).fetchall()
    assert taken == [(job.id,)]
    before = job_row(conn, job.id)

    gate.touch()  # the zombie's attempt now finishes and tries to complete
    assert zombie.wait(30) == 0, zombie.stderr()
    assert "1 fenced" in zombie.stdout()
    assert job_row(conn, job.id) == before
    assert runs(conn, job.id) == [(1, "fenced", zombie_id)]


# -- the supervisor (--processes N) ----------------------------------------------------------------


@HEAVY
def test_four_processes_drain_ten_thousand_jobs_exactly_once(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    ids = client.enqueue_many({"task": "noop", "args": {"i": i}} for i in range(10_000))
    supervisor = spawn_worker("--processes", "4", "--burst")
    assert supervisor.wait(60) == 0, supervisor.stderr()
    states = dict(conn.execute("SELECT state, count(*) FROM pgsched.jobs GROUP BY state").fetchall())
    assert states == {"succeeded": 10_000}
    assert conn.execute("SELECT count(*), count(DISTINCT job_id) FROM pgsched.runs").fetchone() == (10_000, 10_000)
    assert conn.execute(
        "SELECT count(*) FROM pgsched.runs WHERE outcome <> 'succeeded' OR NOT (job_id = ANY(%s))", (ids,)
    ).fetchone() == (0,)
    assert conn.execute("SELECT count(DISTINCT worker_id) FROM pgsched.runs").fetchone() == (4,)
    assert worker_pids(conn) == {}


def test_supervisor_replaces_a_killed_child_and_stops_on_sigterm(
    conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    supervisor = spawn_worker("--processes", "2", "--heartbeat-seconds", "0.5")
    first = wait_until(lambda: registered(conn, 2), timeout=20, message="two worker processes")
    assert set(first) == set(supervisor.children())
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(
        lambda: set(worker_pids(conn)) - set(first), timeout=20, message="a replacement worker process"
    )
    [newcomer] = replaced
    assert set(supervisor.children()) == (set(first) - {victim}) | {newcomer}

    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(20) == 0, supervisor.stderr()
    assert supervisor.children() == []
    survivors = (set(first) - {victim}) | {newcomer}
    assert not any(alive(pid) for pid in survivors)
    # The live children unregistered; only the killed one's row is left (for the rescuer to expire).
    assert set(worker_pids(conn)) == {victim}


def test_ctrl_c_to_the_process_group_stops_the_children_gracefully(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job = client.enqueue("sleep_async", {"seconds": 60})
    supervisor = spawn_worker("--processes", "2", "--grace-seconds", "0.5")
    wait_until(lambda: registered(conn, 2) and running(conn, job.id), timeout=20, message="the job to run")
    kids = supervisor.children()
    group = os.getpgid(supervisor.pid)
    # A terminal's Ctrl-C goes to the whole foreground process group, in no set order. Fix one order
    # (the children react before the supervisor does) by holding the supervisor while the signal lands.
    os.kill(supervisor.pid, signal.SIGSTOP)
    try:
        os.killpg(group, signal.SIGINT)
        in_group = sum(1 for pid in kids if os.getpgid(pid) == group)
        wait_until(
            lambda: supervisor.stderr().count("stopping: ") >= in_group,
            message="the children that got the Ctrl-C to begin stopping",
        )
    finally:
        os.kill(supervisor.pid, signal.SIGCONT)
    assert supervisor.wait(20) == 0, supervisor.stderr()
    row = job_row(conn, job.id)
    assert (row["state"], row["attempts"]) == ("queued", 0)
    assert [outcome for _, outcome, _ in runs(conn, job.id)] == ["interrupted"]
    assert worker_pids(conn) == {}


def test_a_stop_that_signals_every_process_of_the_group_is_graceful(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # systemd's stop (KillMode=control-group) sends SIGTERM to every process: each child gets it
    # directly and relayed by the supervisor.
    jobs = [client.enqueue("sleep_async", {"seconds": 1}) for _ in range(2)]
    supervisor = spawn_worker("--processes", "2", "--concurrency", "1", "--grace-seconds", "60")
    wait_until(
        lambda: registered(conn, 2) and all(running(conn, job.id) for job in jobs), timeout=20, message="both jobs"
    )
    for pid in [supervisor.pid, *supervisor.children()]:
        os.kill(pid, signal.SIGTERM)
    assert supervisor.wait(30) == 0, supervisor.stderr()
    assert "stopping now" not in supervisor.stderr()
    assert [job_row(conn, job.id)["state"] for job in jobs] == ["succeeded", "succeeded"]
    assert worker_pids(conn) == {}


def test_a_deliberate_second_ctrl_c_to_the_supervisor_puts_the_jobs_back(
    client: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job = client.enqueue("sleep_async", {"seconds": 60})
    supervisor = spawn_worker("--processes", "2", "--grace-seconds", "300")
    wait_until(lambda: registered(conn, 2) and running(conn, job.id), timeout=20, message="the job to run")
    supervisor.signal(signal.SIGINT)
    wait_until(lambda: supervisor.stderr().count("stopping: finishing") == 2, message="both children to begin stopping")
    signal_until(supervisor, signal.SIGINT, "running jobs left")
    assert supervisor.wait(20) == 130, supervisor.stderr()
    assert f"running jobs left: {job.id} (sleep_async)" in supervisor.stderr()
    assert (job_row(conn, job.id)["state"], [outcome for _, outcome, _ in runs(conn, job.id)]) == (
        "queued",
        ["interrupted"],
    )
    assert worker_pids(conn) == {}


def test_sigterm_while_a_child_is_being_restarted_still_stops(
    conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    supervisor = spawn_worker("--processes", "2")
    first = wait_until(lambda: registered(conn, 2), timeout=20, message="two worker processes")
    os.kill(min(first), signal.SIGKILL)  # dies young: the supervisor pauses before restarting it
    wait_until(lambda: "restarting it" in supervisor.stderr(), message="the supervisor to notice")
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(15) == 0
    assert supervisor.children() == []
