"""Fault-injection scenarios of the database itself (issue 19): PostgreSQL crashed and restarted,
every session terminated, its connections used up, LISTEN lost, its notification queue full. The
kit is in tests/chaos/scenario.py, the fixtures in tests/chaos/conftest.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest

from ..conftest import HEAVY
from . import faults
from .checker import Ack
from .harness import (
    Enqueuer,
    Settings,
    unfinished,
    wait_for,
)
from .scenario import Scenario, assert_recovered, size, top_up, verdicts

pytestmark = [pytest.mark.chaos, HEAVY]


def test_pause_across_a_postgres_crash(crashable: tuple[Scenario, faults.OwnServer]) -> None:
    """(10) A paused queue stays paused across a PostgreSQL crash and restart (no job of it starts),
    and its jobs all run once it is resumed."""
    s, server = crashable
    s.enqueuer.app.pause_queue("held", create=True)
    settings = Settings(extra=("--queues", "held"))
    for name in ("w1", "w2"):
        s.cluster.worker(name, settings=settings)
    s.cluster.scheduler()
    s.enqueuer.many(200, ms=20, queue="held")
    # The processes are up (connected) before the crash: a start-up that meets a crashing server
    # is not what this scenario tests.
    connected = "SELECT count(DISTINCT application_name) FROM pg_stat_activity WHERE application_name = ANY(%s)"
    names = ["chaos-w1", "chaos-w2", "chaos-s1"]
    assert wait_for(lambda: s.conn.execute(connected, (names,)).fetchone()[0] == 3, timeout=30)
    server.crash()
    server.restart()
    s.reconnect()
    s.timeline.mark(s.conn)
    time.sleep(3 * s.cluster.settings.lease)  # only waiting shows that nothing starts
    started = s.conn.execute("SELECT count(*) FROM chaos.history").fetchone()
    s.enqueuer.close()
    s.enqueuer = _reopened(s.enqueuer, s.dsn)
    s.enqueuer.app.resume_queue("held")
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(30, 120))
    dead = s.cluster.dead()
    report = s.finish()
    assert started == (0,), started
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)


def _reopened(old: Enqueuer, dsn: str) -> Enqueuer:
    """A new enqueuer (its pool's sessions died with the server) that keeps the old one's records."""
    new = Enqueuer(dsn, prefix=f"{old.prefix}r")
    new.acks = old.acks
    return new


def test_backend_kills(scenario: Scenario) -> None:
    """(3) Every pgsched session (workers, scheduler, enqueuer) is terminated every 2 s: every
    process stays up and reconnects on its own, nothing is lost or run twice unexplained, and each
    unknown-outcome enqueue is present at most once."""
    s = scenario
    for name in ("w1", "w2"):
        s.cluster.worker(name)
    s.cluster.scheduler()
    s.enqueuer.many(size(2000, 8000), ms=100)
    rate = s.clean_rate(size(2.0, 5.0))
    with s.enqueuer.trickle(10, ms=100):
        end = time.monotonic() + size(12, 60)
        while time.monotonic() < end:
            time.sleep(2.0)  # the fault's cadence
            top_up(s, rate, 10.0)
            faults.terminate_sessions(s.conn)
            s.timeline.mark(s.conn)
    storm = len(s.timeline.faults)
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(20, 120))
    # Then a kill that surely cuts a write, and no job after it: the last jobs' outcomes wait on a
    # lock on the history, their sessions are terminated, the lock goes. Whatever retries the cut
    # write, no later outcome will.
    last: list[int] = []
    assert wait_for(
        lambda: last.extend(s.enqueuer.many(8, ms=200)) or last, timeout=10
    )  # its pooled session may be a killed one
    with faults.exclusive_lock(s.dsn, "pgsched.runs"):
        assert wait_for(lambda: _ended(s.conn, last) == len(last) and _blocked_writes(s.conn) > 0, timeout=30), (
            "the last outcomes did not wait on the lock"
        )
        faults.terminate_sessions(s.conn, "chaos-w%")
        s.timeline.mark(s.conn)
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(15, 120)) and drained
    dead = s.cluster.dead()
    report = s.finish(clean_rate=rate)
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert_recovered(report, storm, within=10.0)  # the storm's; after the last kill no job was left


def test_postgres_crashes(crashable: tuple[Scenario, faults.OwnServer]) -> None:
    """(2) PostgreSQL is stopped in immediate mode (a crash) and started again, repeatedly, then
    restarted cleanly: every process stays up and reconnects on its own (nothing restarts it),
    nothing is lost or run twice unexplained, and each unknown-outcome enqueue is present at most once."""
    s, server = crashable
    for name in ("w1", "w2"):
        s.cluster.worker(name)
    s.cluster.scheduler()
    for _ in range(size(3, 15)):
        s.enqueuer.many(1000, ms=100)
    rate = s.clean_rate(size(3.0, 10.0))
    with s.enqueuer.trickle(10, ms=100):
        for crash in range(size(2, 6)):
            time.sleep(size(4.0, 10.0))  # work between two crashes
            top_up(s, rate, 20.0)
            if crash < size(2, 5):
                server.crash()
            else:
                server.stop()  # the last one a clean restart
            time.sleep(1.0)  # the outage
            server.restart()
            s.reconnect()
            s.timeline.mark(s.conn)
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(40, 180))
    dead = s.cluster.dead()
    report = s.finish(clean_rate=rate)
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert_recovered(report, len(s.timeline.faults), within=10.0)


def test_pool_exhaustion(crashable: tuple[Scenario, faults.OwnServer]) -> None:
    """(4) Idle connections use up the server's max_connections while the system runs (and its
    sessions must reconnect): work goes on or fails with an error that names the cause, and
    everything recovers when they go: no process dies, nothing is lost."""
    s, server = crashable
    limit = size(50, 330)
    with psycopg.connect(s.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET max_connections = {limit}")  # a number of the test's own
    server.stop()
    server.restart()
    s.reconnect()
    s.enqueuer.close()
    s.enqueuer = _reopened(s.enqueuer, s.dsn)
    for name in ("w1", "w2"):
        s.cluster.worker(name)
    s.cluster.scheduler()
    s.enqueuer.many(size(2000, 10000), ms=50)
    rate = s.clean_rate(size(2.0, 5.0))
    with s.enqueuer.trickle(10, ms=50):
        # Every pgsched session is cut, and the connections they leave are taken at once: they must
        # come back through the two that are left.
        faults.terminate_sessions(s.conn)
        in_use = s.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ).fetchone()
        wanted = limit - (in_use[0] if in_use else 0) - 2
        with faults.idle_connections(s.dsn, wanted, fill=True) as idle:  # sessions reconnect meanwhile
            held = len(idle)
            s.timeline.mark(s.conn)
            squeezed = s.clean_rate(size(4.0, 30.0))
        s.timeline.mark(s.conn)
        time.sleep(2.0)  # the trickle goes on after the connections went
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(30, 180))
    dead = s.cluster.dead()
    report = s.finish(clean_rate=rate)
    print(json.dumps({"held": held, "clean_rate": rate, "rate_while_exhausted": squeezed}))
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)


def test_listen_loss(scenario: Scenario) -> None:
    """(8) The workers' LISTEN sessions are terminated every second while jobs trickle in: every
    enqueue commits and every job runs (through polling, or a listener that came back)."""
    s = scenario
    settings = Settings(poll=1.0)  # long enough for a lost wake-up to show as a delay, not to hide
    for name in ("w1", "w2"):
        s.cluster.worker(name, settings=settings)
    s.cluster.scheduler()
    with s.enqueuer.trickle(20, ms=10):
        end = time.monotonic() + size(10, 60)
        while time.monotonic() < end:
            time.sleep(1.0)  # the fault's cadence
            row = s.conn.execute(
                """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = current_database() AND application_name LIKE 'chaos-w%' AND query LIKE 'LISTEN%'"""
            ).fetchone()
            if row and row[0]:
                s.timeline.mark(s.conn)
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(20, 60))
    dead = s.cluster.dead()
    report = s.finish()
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert s.timeline.faults, "no LISTEN session was found to terminate"
    assert drained and report.ok and report.unknown_enqueues == 0, json.dumps(
        [unfinished(s.conn), verdicts(report, s.conn)], default=str
    )


def test_full_notify_queue(crashable: tuple[Scenario, faults.OwnServer]) -> None:
    """(8) The server's NOTIFY queue is full: every enqueue still commits (the wake-up is skipped)
    and every job still runs, found by polling."""
    s, server = crashable
    with psycopg.connect(s.dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_notify_queue_pages = 64")  # 64 pages of 8 kB
    server.stop()
    server.restart()
    s.reconnect()
    s.enqueuer.close()
    s.enqueuer = _reopened(s.enqueuer, s.dsn)
    for name in ("w1", "w2"):
        s.cluster.worker(name)
    s.cluster.scheduler()
    with faults.full_notify_queue(s.dsn) as usage:
        s.timeline.mark(s.conn)
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):  # a NOTIFY that is not skipped fails
            s.conn.execute("NOTIFY pgsched_wakeup, 'default'")
        for _ in range(size(50, 500)):
            s.enqueuer.one(ms=10)
        s.enqueuer.many(size(200, 2000), ms=10)
        with psycopg.connect(s.dsn) as conn:
            s.enqueuer.app.enqueue("chaos.step", {"key": "in-transaction"}, connection=conn)
            conn.commit()
        s.enqueuer.acks.append(Ack("in-transaction", None, "unknown"))  # committed; its id was not kept
        drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(30, 120))
    report = s.finish()
    assert usage > 0.9, usage
    assert report.unknown_enqueues == 1, "an enqueue failed while the NOTIFY queue was full"
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)


def _ended(conn: psycopg.Connection[Any], ids: list[int]) -> int:
    row = conn.execute("SELECT count(*) FROM chaos.history WHERE event = 'end' AND job_id = ANY(%s)", (ids,)).fetchone()
    return int(row[0]) if row else 0


def _blocked_writes(conn: psycopg.Connection[Any]) -> int:
    """Worker sessions waiting on a lock."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'chaos-w%' AND wait_event_type = 'Lock'"
    ).fetchone()
    return int(row[0]) if row else 0
