"""Fault-injection scenarios (issue 19): real ``pgsched worker``/``scheduler`` processes, real
faults, and the offline checker over what the database holds afterwards.

Each scenario has a quick size (``make test``) and a full size (``PGSCHED_CHAOS=full``, which
``make chaos`` sets). Leases are short (2 s) so that a quick run sees several rescues. A
scenario first lets its faults run their course and waits (with a deadline) for the jobs to
finish, then asserts on the checker's report, whose counts it prints (``-s``) and appends as one
JSON line to ``$PGSCHED_CHAOS_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import threading
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from ..conftest import HEAVY, wait_until
from . import faults
from .checker import Ack, executions
from .harness import (
    Settings,
    harness_connection,
    load,
    socket_path,
    unfinished,
    wait_for,
    with_application,
)
from .scenario import Scenario, assert_recovered, size, top_up, verdicts

pytestmark = [pytest.mark.chaos, HEAVY]


def test_worker_kill_storm(scenario: Scenario) -> None:
    """(1) A random worker is killed (-9) every few seconds and started again, under a backlog and a
    trickle: nothing is lost, nothing runs twice without a lease expiry, nothing runs after it finished."""
    s = scenario
    workers = size(3, 4)
    for i in range(1, workers + 1):
        s.cluster.worker(f"w{i}")
    s.cluster.scheduler()
    for _ in range(size(4, 20)):  # a backlog that outlasts the storm, and a live trickle
        s.enqueuer.many(1000, ms=100)
    rate = s.clean_rate(size(3.0, 10.0))
    with s.enqueuer.trickle(10, ms=100):
        end = time.monotonic() + size(12, 120)
        while time.monotonic() < end:
            time.sleep(size(2.0, 3.0))  # the storm's cadence
            top_up(s, rate, 10.0)
            victim = f"w{random.randint(1, workers)}"
            faults.kill9(s.cluster.workers[victim])
            s.timeline.mark(s.conn)
            s.timeline.back(s.conn, s.cluster.worker(victim).pid, timeout=size(2.0, 3.0))
            s.cluster.restart_dead()
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(40, 180))
    report = s.finish(clean_rate=rate)
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert_recovered(report, len(s.timeline.faults), within=s.cluster.settings.lease)


def test_cap_across_a_kill_storm(scenario: Scenario) -> None:
    """(10) A queue capped at 5 running jobs, three workers of 8 slots, one killed (-9) every 2 s:
    the cap holds at every instant (a killed worker's slots are freed only when its lease expires),
    and nothing is lost or run twice unexplained."""
    s = scenario
    s.enqueuer.app.configure_queue("capped", create=True, max_running=5)
    settings = Settings(extra=("--queues", "capped"))
    for i in (1, 2, 3):
        s.cluster.worker(f"w{i}", settings=settings)
    s.cluster.scheduler()
    s.enqueuer.many(size(400, 4000), ms=100, queue="capped")
    end = time.monotonic() + size(12, 120)
    while time.monotonic() < end:
        time.sleep(2.0)  # the storm's cadence
        victim = f"w{random.randint(1, 3)}"
        faults.kill9(s.cluster.workers[victim])
        s.timeline.mark(s.conn)
        s.cluster.worker(victim)
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(40, 180))
    report = s.finish(caps={"capped": 5})
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert report.peaks["capped"] == 5, report.peaks  # the cap was reached: the storm tested it


def test_leader_chaos(scenario: Scenario) -> None:
    """(6) Three schedulers; every 3 s one of them is killed (-9) and started again, or has its
    sessions terminated, while an interval schedule fires every 2 s and a cron schedule (with a
    seconds field, in a zone with daylight saving) every 3 s: no slot fires twice, none is missed
    under the default misfire policy."""
    s = scenario
    every = {"tick": 2, "crontick": 3}
    s.enqueuer.app.add_schedule("tick", "chaos.step", every=timedelta(seconds=every["tick"]), args={"key": "tick"})
    s.enqueuer.app.add_schedule(
        "crontick", "chaos.step", cron="*/3 * * * * *", timezone="Europe/Paris", args={"key": "crontick"}
    )
    s.cluster.worker("w1")
    for name in ("s1", "s2", "s3"):
        s.cluster.scheduler(name)
    end = time.monotonic() + size(15, 300)
    while time.monotonic() < end:
        time.sleep(3.0)  # the fault's cadence
        victim = f"s{random.randint(1, 3)}"
        if random.random() < 0.5:
            faults.kill9(s.cluster.schedulers[victim])
            s.cluster.scheduler(victim)
        else:
            faults.terminate_sessions(s.conn, f"chaos-{victim}")
        s.timeline.mark(s.conn)
    stopped = s.conn.execute("SELECT pgsched.now()").fetchone()[0]  # type: ignore[index]
    for name in every:
        s.enqueuer.app.pause_schedule(name)
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=30)
    expected: dict[int, list[Any]] = {}
    for name, seconds in every.items():
        schedule_id = s.enqueuer.app.get_schedule(name).id
        assert schedule_id is not None
        first = s.conn.execute("SELECT min(slot) FROM pgsched.jobs WHERE schedule_id = %s", (schedule_id,)).fetchone()[
            0
        ]  # type: ignore[index]
        expected[schedule_id] = []
        slot = first
        while slot <= stopped - timedelta(seconds=seconds + 1):  # the last slots may not have fired yet
            expected[schedule_id].append(slot)
            slot += timedelta(seconds=seconds)
    report = s.finish(expected_slots=expected)
    dead = s.cluster.dead()
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok and min(len(v) for v in expected.values()) >= 3, json.dumps(
        [{k: len(v) for k, v in expected.items()}, verdicts(report, s.conn)], default=str
    )


def test_half_open_worker(scenario: Scenario) -> None:
    """(5) One worker's connections are blackholed (half-open) for three lease lengths, then healed:
    its jobs run again elsewhere (explained by the lease expiry), it stops its own executions once
    its lease can no longer be confirmed, its late writes are fenced, and it resumes afterwards."""
    s = scenario
    proxy = faults.Proxy(socket_path(s.dsn)).start()
    try:
        via_proxy = f"host=127.0.0.1 port={proxy.port} dbname={psycopg.conninfo.conninfo_to_dict(s.dsn)['dbname']} user=postgres"
        isolated = s.cluster.worker("w1", dsn=via_proxy)
        s.cluster.worker("w2")
        s.cluster.scheduler()
        s.enqueuer.many(size(32, 400), ms=8000)  # longer than the partition: they outlive the rescue unless stopped
        assert wait_for(lambda: _started_by(s.conn, isolated.pid) >= 4, timeout=30), "w1 never started a job"
        proxy.blackhole()
        s.timeline.mark(s.conn)
        time.sleep(3 * s.cluster.settings.lease)  # the partition lasts three leases
        proxy.heal()
        s.timeline.mark(s.conn)
        healed = s.timeline.faults[-1]
        drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(30, 240))
        resumed = _started_by(s.conn, isolated.pid, after=healed)
    finally:
        proxy.close()
    dead = s.cluster.dead()
    report = s.finish()
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert report.duplicated_explained, "w1's jobs were not run again elsewhere"
    # Stopped before the rescue: a worker notices the lease it cannot confirm at its next heartbeat tick.
    assert max(report.late_stop, default=0.0) <= s.cluster.settings.heartbeat, report.late_stop
    assert resumed > 0, "w1 did not resume work after the partition healed"


def test_stopped_worker(scenario: Scenario) -> None:
    """(1) One worker is frozen (SIGSTOP) for three lease lengths, then thawed: its jobs run again
    elsewhere (explained), what it writes when it wakes is fenced, it neither loses nor keeps a job
    it took back, and it resumes work."""
    s = scenario
    frozen = s.cluster.worker("w1")
    s.cluster.worker("w2")
    s.cluster.scheduler()
    s.enqueuer.many(size(32, 400), ms=4000)
    assert wait_for(lambda: _started_by(s.conn, frozen.pid) >= 4, timeout=30), "w1 never started a job"
    faults.pause(frozen)
    s.timeline.mark(s.conn)
    time.sleep(3 * s.cluster.settings.lease)  # frozen for three leases
    faults.resume(frozen)
    s.timeline.mark(s.conn)
    thawed = s.timeline.faults[-1]
    s.enqueuer.many(size(16, 100), ms=100)  # work for it after the thaw
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(20, 240))
    resumed = _started_by(s.conn, frozen.pid, after=thawed)
    dead = s.cluster.dead()
    report = s.finish()
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert report.duplicated_explained, "w1's jobs were not run again elsewhere"
    assert resumed > 0, "w1 did not resume work after it was thawed"


def test_row_lock_held_by_an_application(scenario: Scenario) -> None:
    """Issue 18 (R15): an application transaction enqueues a job that depends on a running one, and
    so holds that job's row lock, for three lease lengths. The worker stays healthy: none of its
    jobs is rescued or run twice, and every job finishes once the transaction commits."""
    s = scenario
    s.cluster.worker("w1")
    s.cluster.scheduler()
    s.enqueuer.many(size(16, 200), ms=4 * 1000)
    running = wait_until(
        lambda: s.conn.execute("SELECT min(id) FROM pgsched.jobs WHERE state = 'running'").fetchone()[0],  # type: ignore[index]
        timeout=30,
        message="a running job",
    )
    with psycopg.connect(with_application(s.dsn, "chaos-application")) as app_conn:
        s.enqueuer.app.enqueue("chaos.step", {"key": "dependent"}, depends_on=[running], connection=app_conn)
        s.timeline.mark(s.conn)
        time.sleep(3 * s.cluster.settings.lease)  # the application's transaction stays open
        app_conn.commit()
    s.enqueuer.acks.append(Ack("dependent", None, "unknown"))  # committed, id not kept: present at most once
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(20, 240))
    rescued = s.conn.execute("SELECT count(*) FROM pgsched.runs WHERE outcome = 'lease_expired'").fetchone()
    report = s.finish()
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert rescued == (0,) and not report.duplicated_explained, (rescued, report.duplicated_explained)


def _started_by(conn: psycopg.Connection[Any], pid: int, after: Any = None) -> int:
    row = conn.execute(
        "SELECT count(*) FROM chaos.history WHERE event = 'start' AND pid = %s AND at > coalesce(%s::timestamptz, '-infinity')",
        (pid, after),
    ).fetchone()
    return int(row[0]) if row else 0


def test_poison_jobs(scenario: Scenario) -> None:
    """(9) Jobs that kill their own worker process each end ``failed`` after exactly
    ``max_attempts`` executions, and the other jobs all succeed (dead workers are started again)."""
    s = scenario
    for name in ("w1", "w2"):
        s.cluster.worker(name)
    s.cluster.scheduler()
    poisons = [s.enqueuer.poison() for _ in range(size(3, 10))]
    s.enqueuer.many(size(100, 1000), ms=20)

    def done() -> bool:
        s.cluster.restart_dead()  # a supervisor starts a dead worker again
        return unfinished(s.conn) == 0

    drained = wait_for(done, timeout=size(60, 240))
    report = s.finish()
    rows = s.conn.execute(
        "SELECT id, state, attempts, max_attempts FROM pgsched.jobs WHERE id = ANY(%s) ORDER BY id", (poisons,)
    ).fetchall()
    starts = {job_id: 0 for job_id in poisons}
    for e in executions(load(s.conn).history):
        if e.job_id in starts:
            starts[e.job_id] += 1
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert all(state == "failed" and attempts == most for _, state, attempts, most in rows), rows
    # An attempt can end before its task starts (a sibling poison job killed the process first;
    # rescued together, poison jobs come back together after the same backoff, so one may even
    # never start): never more executions than attempts.
    assert all(0 <= n <= 3 for n in starts.values()), starts
    other = s.conn.execute(
        "SELECT count(*) FROM pgsched.jobs WHERE NOT id = ANY(%s) AND state <> 'succeeded'", (poisons,)
    ).fetchone()
    assert other == (0,)


def test_transactional_enqueue(scenario: Scenario) -> None:
    """(9) Enqueues in the caller's transaction, half of the transactions rolled back: the executed
    set equals the committed set exactly."""
    s = scenario
    s.cluster.worker("w1")
    s.cluster.scheduler()
    for i in range(size(40, 400)):
        s.enqueuer.transaction(5, commit=i % 2 == 0, ms=5)
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(30, 120))
    report = s.finish()
    committed = {a.key for a in s.enqueuer.acks if a.outcome == "ack"}
    executed = {e.key for e in executions(load(s.conn).history)}
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert executed == committed


@pytest.mark.parametrize("concurrency", size([16], [16, 64]))
def test_steady_load(scenario: Scenario, concurrency: int) -> None:
    """Issue 18's workload: a producer keeps about 4,000 jobs queued for one worker. Completions
    keep pace (no window without progress), the jobs the worker holds in the database never exceed
    concurrency + prefetch, a healthy worker's jobs are never rescued, and SIGTERM stops it within
    its grace with nothing left claimed."""
    s = scenario
    settings = Settings(lease=5.0, heartbeat=1.0, concurrency=concurrency, grace=5.0)
    worker = s.cluster.worker("w1", settings=settings)
    s.cluster.scheduler()
    stop = threading.Event()

    def produce() -> None:
        with harness_connection(s.dsn) as conn:
            while not stop.wait(0.05):
                row = conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'queued'").fetchone()
                missing = 4000 - (row[0] if row else 0)
                if missing > 0:
                    s.enqueuer.many(min(missing, 1000))

    producer = threading.Thread(target=produce, name="chaos-producer", daemon=True)
    producer.start()
    held: list[int] = []
    done: list[tuple[float, int]] = []
    try:
        end = time.monotonic() + size(15, 180)
        while time.monotonic() < end:
            running, succeeded = s.conn.execute(
                "SELECT count(*) FILTER (WHERE state = 'running'), count(*) FILTER (WHERE state = 'succeeded') FROM pgsched.jobs"
            ).fetchone()  # type: ignore[misc]
            held.append(running)
            done.append((time.monotonic(), succeeded))
            time.sleep(0.25)  # the sampling period
    finally:
        stop.set()
        producer.join(30)
    worker.signal(15)
    try:
        exit_code: int | None = worker.process.wait(settings.grace + 5)
    except subprocess.TimeoutExpired:
        exit_code = None  # still running past its grace
    left = s.conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'running'").fetchone()
    rescued = s.conn.execute("SELECT count(*) FROM pgsched.runs WHERE outcome = 'lease_expired'").fetchone()
    report = s.finish()
    rates = _window_rates(done, size(3.0, 5.0))
    figures = {
        "concurrency": concurrency,
        "peak_held": max(held),
        "completions_per_s": rates,
        "lease_expired": rescued[0] if rescued else None,
        "exit_code": exit_code,
        "left_running": left[0] if left else None,
        # The backlog is left queued at the end: only the verdicts that a steady run can break.
        **{k: v for k, v in verdicts(report).items() if k != "lost"},
    }
    print(json.dumps(figures))
    broken = {
        "held more than concurrency + prefetch": max(held) > settings.concurrency + settings.prefetch,
        "a healthy worker's job was rescued": rescued != (0,),
        "completions stalled": not (rates and min(rates) >= 0.25 * statistics.median(rates) > 0),
        "SIGTERM left jobs running or failed": exit_code != 0 or left != (0,),
        "ran twice or after finishing": bool(
            report.duplicated_unexplained or report.rerun_after_finish or report.fenced_accepted
        ),
    }
    assert not any(broken.values()), json.dumps({"broken": [k for k, v in broken.items() if v], **figures})


def _window_rates(samples: list[tuple[float, int]], window: float) -> list[float]:
    """Completions per second in consecutive windows (after the first, the warm-up)."""
    rates = []
    start_t, start_n = samples[0]
    for t, n in samples:
        if t - start_t >= window:
            rates.append(round((n - start_n) / (t - start_t), 1))
            start_t, start_n = t, n
    return rates[1:]
