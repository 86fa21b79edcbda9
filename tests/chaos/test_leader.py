"""Scenario 6 of issue 19, the parts ``test_leader_chaos`` leaves out: the failover time of the
maintenance leader, the same storm with the leader lock disabled, and (scenario 10) a rate limit
across leader failovers.

Leadership in pgsched is per pass (``pgsched.leader``): each pass of each service is a short
transaction that begins with ``pg_try_advisory_xact_lock(LEADER_KEY)``. "The leader" is therefore
the scheduler whose pass holds the lock right now, seen in ``pg_locks``; these tests kill (-9)
exactly that process, mid-pass, and measure how long until another scheduler holds the lock and
until the next schedule slot is fired by someone else.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgsched.leader.service import LEADER_KEY

from ..conftest import HEAVY
from . import faults
from .app import NO_LEADER_LOCK
from .checker import Report, check
from .harness import Settings, load, unfinished, wait_for
from .scenario import FULL, Scenario, size, verdicts

pytestmark = [pytest.mark.chaos, HEAVY, pytest.mark.filterwarnings("ignore::pgsched.UnservedQueueWarning")]

# The sessions holding the leader lock (a bigint advisory key shows as classid = high 32 bits,
# objid = low 32 bits, objsubid 1), with their process's name (chaos-s1...).
HOLDERS = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = %s AND l.objid::bigint = %s AND a.application_name LIKE 'chaos-s%%'
  -- pg_locks is the cluster's: another test's schedulers may share a server (PGSCHED_TEST_DSN).
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
LOCK_ID = (LEADER_KEY >> 32, LEADER_KEY & 0xFFFFFFFF)


def holders(conn: psycopg.Connection[Any]) -> list[str]:
    return [name.removeprefix("chaos-") for (name,) in conn.execute(HOLDERS, LOCK_ID)]


def db_now(conn: psycopg.Connection[Any]) -> datetime:
    return conn.execute("SELECT pgsched.now()").fetchone()[0]  # type: ignore[index]


def catch_leader(conn: psycopg.Connection[Any], timeout: float) -> str | None:
    """Poll ``pg_locks`` until a scheduler holds the leader lock (a pass in flight); its name."""
    seen: list[str] = []
    wait_for(lambda: seen.extend(holders(conn)) or seen, timeout=timeout, interval=0.002)
    return seen[0] if seen else None


def taken_over(conn: psycopg.Connection[Any], victim: str) -> bool:
    """Whether a scheduler other than ``victim`` holds the leader lock now."""
    return any(name != victim for name in holders(conn))


def fired_after(conn: psycopg.Connection[Any], since: datetime) -> datetime | None:
    """When the first schedule job created after ``since`` was created (database time)."""
    query = "SELECT min(created_at) FROM pgsched.jobs WHERE schedule_id IS NOT NULL AND created_at > %s"
    return conn.execute(query, (since,)).fetchone()[0]  # type: ignore[index]


def expected_slots(s: Scenario, name: str, every: float, stopped: datetime) -> tuple[int, list[datetime]]:
    """The schedule's id and every slot from its first to the last that must have fired by ``stopped``."""
    schedule_id = s.enqueuer.app.get_schedule(name).id
    assert schedule_id is not None
    first = s.conn.execute("SELECT min(slot) FROM pgsched.jobs WHERE schedule_id = %s", (schedule_id,)).fetchone()[0]  # type: ignore[index]
    slots = []
    slot = first
    while slot <= stopped - timedelta(seconds=every + 1):  # the last slots may not have fired yet
        slots.append(slot)
        slot += timedelta(seconds=every)
    return schedule_id, slots


def note(summary: dict[str, Any]) -> None:
    """Print a scenario's extra figures, and append them to ``$PGSCHED_CHAOS_REPORT`` as ``finish`` does."""
    line = json.dumps({"full": FULL, **summary}, default=str)
    print(line)
    if os.environ.get("PGSCHED_CHAOS_REPORT"):
        with open(os.environ["PGSCHED_CHAOS_REPORT"], "a") as out:
            out.write(line + "\n")


def figures(values: list[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "median": round(statistics.median(values), 3) if values else None,
        "max": round(max(values), 3) if values else None,
    }


def test_leader_failover(scenario: Scenario) -> None:
    """(6) Two schedulers; again and again the one whose pass holds the leader lock is killed (-9)
    mid-pass and started again: the other leads within a pass interval, the next slot fires, no
    slot fires twice or is missed. Reports the failover times (lock taken over; next slot fired)."""
    s = scenario
    every = 1.0
    s.enqueuer.app.add_schedule("tick", "chaos.step", every=timedelta(seconds=every), args={"key": "tick"})
    s.cluster.worker("w1")
    for name in ("s1", "s2"):
        s.cluster.scheduler(name)
    schedule_jobs = "SELECT count(*) FROM pgsched.jobs WHERE schedule_id IS NOT NULL"
    assert wait_for(lambda: s.conn.execute(schedule_jobs).fetchone()[0] > 0, timeout=30)  # type: ignore[index]
    takeover: list[float] = []  # seconds from the kill until another scheduler holds the lock
    next_slot: list[float] = []  # seconds from the kill until a slot job is created after it
    missed_catches = 0
    for _ in range(size(8, 60)):
        victim = catch_leader(s.conn, timeout=10)
        if victim is None:
            missed_catches += 1
            continue
        faults.kill9(s.cluster.schedulers[victim])
        killed_at = time.monotonic()
        killed_db = db_now(s.conn)
        s.timeline.mark(s.conn)
        if wait_for(lambda: taken_over(s.conn, victim), 10, interval=0.002):  # noqa: B023  (called at once)
            takeover.append(time.monotonic() - killed_at)
        if wait_for(lambda: fired_after(s.conn, killed_db), timeout=10):  # noqa: B023
            next_slot.append((fired_after(s.conn, killed_db) - killed_db).total_seconds())  # type: ignore[operator]
        s.cluster.scheduler(victim)
    stopped = db_now(s.conn)
    s.enqueuer.app.pause_schedule("tick")
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=30)
    schedule_id, slots = expected_slots(s, "tick", every, stopped)
    report = s.finish(expected_slots={schedule_id: slots})
    failover = {"takeover_s": figures(takeover), "next_slot_s": figures(next_slot), "uncaught": missed_catches}
    note({"scenario": "leader_failover", "slots": len(slots), **failover})
    dead = s.cluster.dead()
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok and len(slots) >= 5, json.dumps([len(slots), verdicts(report, s.conn)], default=str)
    assert len(takeover) >= size(5, 40) and len(next_slot) == len(takeover), failover


def test_stopped_leader(scenario: Scenario) -> None:
    """(6) Two schedulers; the one whose pass holds the leader lock is frozen (SIGSTOP) mid-pass, for
    longer than a lease, then thawed: the other must take over and keep firing slots while it is
    frozen (a frozen leader must not stall every schedule, promotion and rescue of the cluster),
    the thawed one must stay up and lead again, and no slot fires twice or is missed. The schedule
    fires every two leases: the default misfire policy (``run_once``) folds slots that are due
    together into the latest, so a takeover one lease late must not make two slots due at once."""
    s = scenario
    every = 2 * s.cluster.settings.lease
    s.enqueuer.app.add_schedule("tick", "chaos.step", every=timedelta(seconds=every), args={"key": "tick"})
    s.cluster.worker("w1")
    for name in ("s1", "s2"):
        s.cluster.scheduler(name)
    schedule_jobs = "SELECT count(*) FROM pgsched.jobs WHERE schedule_id IS NOT NULL"
    assert wait_for(lambda: s.conn.execute(schedule_jobs).fetchone()[0] > 0, timeout=30)  # type: ignore[index]
    frozen_for = 4 * s.cluster.settings.lease
    next_slot: list[float | None] = []  # seconds from the freeze until a slot job is created after it
    # A freeze lands mid-pass only when the signal beats the pass's end: try until enough have
    # landed (a busy machine misses more), with a bound.
    for _ in range(5 * size(2, 10)):
        if len(next_slot) >= size(2, 10):
            break
        victim = catch_leader(s.conn, timeout=10)
        assert victim is not None
        process = s.cluster.schedulers[victim]
        faults.pause(process)
        if victim not in holders(s.conn):  # its pass ended before the signal: not frozen mid-pass
            faults.resume(process)
            continue
        frozen_db = db_now(s.conn)
        s.timeline.mark(s.conn)
        fired = wait_for(lambda: fired_after(s.conn, frozen_db), timeout=frozen_for)  # noqa: B023
        next_slot.append((fired_after(s.conn, frozen_db) - frozen_db).total_seconds() if fired else None)  # type: ignore[operator]
        wait_for(lambda: False, timeout=max(0.0, frozen_for - (db_now(s.conn) - frozen_db).total_seconds()))
        faults.resume(process)
    stopped = db_now(s.conn)
    s.enqueuer.app.pause_schedule("tick")
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=30)
    schedule_id, slots = expected_slots(s, "tick", every, stopped)
    report = s.finish(expected_slots={schedule_id: slots})
    note({"scenario": "stopped_leader", "slots": len(slots), "frozen_s": frozen_for, "next_slot_s": next_slot})
    dead = s.cluster.dead()
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert next_slot and None not in next_slot, next_slot  # slots kept firing while the leader was frozen
    assert drained and report.ok, json.dumps([len(slots), verdicts(report, s.conn)], default=str)


def test_leader_lock_disabled(scenario: Scenario) -> None:
    """(6, variant) Three schedulers that never take the leader lock (a test-only switch in the
    chaos app): every pass of every service runs in all three at once, under the same storm as
    ``test_leader_chaos``. Still no slot fires twice and none is missed: the row lock on the
    schedule (SKIP LOCKED), the compare-and-set of ``next_run_at`` and the unique
    ``(schedule_id, slot)`` index hold without the lock. Then one slot is written a second time by
    hand (the index dropped, as a scheduler without any of the three would): the checker says so."""
    s = scenario
    every = 1.0
    s.cluster.env[NO_LEADER_LOCK] = "1"
    s.enqueuer.app.add_schedule("tick", "chaos.step", every=timedelta(seconds=every), args={"key": "tick"})
    s.cluster.worker("w1")
    for name in ("s1", "s2", "s3"):
        s.cluster.scheduler(name)
    lock_seen = 0
    end = time.monotonic() + size(15, 300)
    while time.monotonic() < end:
        # Between faults, watch for the lock: with the switch on, nobody ever holds it.
        pause_until = time.monotonic() + 2.0
        while time.monotonic() < pause_until:
            lock_seen += len(holders(s.conn))
            time.sleep(0.005)  # the sampling period
        victim = f"s{random.randint(1, 3)}"
        if random.random() < 0.5:
            faults.kill9(s.cluster.schedulers[victim])
            s.cluster.scheduler(victim)
        else:
            faults.terminate_sessions(s.conn, f"chaos-{victim}")
        s.timeline.mark(s.conn)
    stopped = db_now(s.conn)
    s.enqueuer.app.pause_schedule("tick")
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=30)
    schedule_id, slots = expected_slots(s, "tick", every, stopped)
    report = s.finish(expected_slots={schedule_id: slots})
    dead = s.cluster.dead()
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    note({"scenario": "leader_lock_disabled", "slots": len(slots), "lock_holders_seen": lock_seen})
    assert lock_seen == 0  # the switch worked: three leaders at every pass
    assert drained and report.ok and len(slots) >= 5, json.dumps([len(slots), verdicts(report, s.conn)], default=str)

    # What a leader without any guard would do, and that the checker sees it.
    s.conn.execute("DROP INDEX pgsched.jobs_schedule_slot")
    s.conn.execute(
        """INSERT INTO pgsched.jobs (task, args, queue, schedule_id, slot, state, finished_at)
           SELECT task, args, queue, schedule_id, slot, 'succeeded', finished_at FROM pgsched.jobs
           WHERE schedule_id = %s AND slot = %s""",
        (schedule_id, slots[len(slots) // 2]),
    )
    twice: Report = check(load(s.conn), expected_slots={schedule_id: slots})
    assert twice.slots_duplicated and not twice.slots_missing, twice.summary()


def test_rate_limit_across_leader_failovers(scenario: Scenario) -> None:
    """(10) A queue limited to 20 starts a second, fed by delayed jobs that the leader's promoter
    releases in bursts; the schedulers' leader is killed (-9) mid-pass again and again, and a
    worker too (so the leader also rescues; the jobs last half a second, so it holds some): no one-second window holds more than 20 starts (the
    ``runs`` rows), and nothing is lost or run twice unexplained."""
    s = scenario
    limit = 20
    s.enqueuer.app.configure_queue("limited", create=True, rate=f"{limit}/second")
    settings = Settings(extra=("--queues", "limited"))
    for name in ("w1", "w2"):
        s.cluster.worker(name, settings=settings)
    for name in ("s1", "s2"):
        s.cluster.scheduler(name)
    count = size(300, 2400)
    # Delayed in waves, so promotions keep coming due while the leader dies.
    for wave in range(size(6, 24)):
        for _ in range(count // size(6, 24)):
            s.enqueuer.one(ms=500, queue="limited", delay=1 + wave)
    kills = 0
    end = time.monotonic() + size(12, 100)
    while time.monotonic() < end:
        victim = catch_leader(s.conn, timeout=5)
        if victim is not None:
            faults.kill9(s.cluster.schedulers[victim])
            s.timeline.mark(s.conn)
            s.cluster.scheduler(victim)
            kills += 1
        if kills % 4 == 3:
            w = f"w{random.randint(1, 2)}"
            faults.kill9(s.cluster.workers[w])
            s.timeline.mark(s.conn)
            s.cluster.worker(w)
        time.sleep(1.0)  # the fault's cadence
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(60, 240))
    report = s.finish(rates={"limited": (limit, timedelta(seconds=1))})
    busiest = _busiest_second(s.conn, "limited")
    note({"scenario": "rate_limit_failover", "leader_kills": kills, "busiest_second": busiest})
    dead = [n for n in s.cluster.dead() if n.startswith("s")]
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)
    assert kills >= size(5, 40) and busiest == limit, (kills, busiest)  # the limit was reached: it was tested


def _busiest_second(conn: psycopg.Connection[Any], queue: str) -> int:
    """The most starts of ``queue`` in any one-second window beginning at a start (runs rows)."""
    row = conn.execute(
        """SELECT max((SELECT count(*) FROM pgsched.runs r2
                       WHERE r2.queue = r.queue AND r2.started_at >= r.started_at
                         AND r2.started_at < r.started_at + interval '1 second'))
           FROM pgsched.runs r WHERE r.queue = %s""",
        (queue,),
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0
