"""Scenario 7 of issue 19: clock skew. Workers and schedulers whose host clocks run 10 minutes ahead
and behind (shifted inside each process by libfaketime) must still decide every time by the
database's clock (DESIGN §8 "Time"): no job starts before its ``run_at``, no worker is rescued while
its lease holds in database time, no rescue comes before the lease expired, no schedule slot fires
early, and the history's attempt intervals are the database's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from ..conftest import HEAVY
from . import faults
from .harness import shifted_clock, unfinished, wait_for
from .scenario import Scenario, size, verdicts

pytestmark = [pytest.mark.chaos, HEAVY]

SKEWS = {"w1": "+10m", "w2": "-10m", "s1": "+10m", "s2": "-10m"}


def test_a_shifted_clock_is_shifted() -> None:
    """The tool works: a process started with ``shifted_clock`` reads a wall clock 10 minutes off."""
    read = [sys.executable, "-c", "import time; print(time.time())"]
    for offset, expected in (("+10m", 600), ("-10m", -600)):
        started = time.time()
        shifted = float(subprocess.run(read, env=shifted_clock(offset), capture_output=True, text=True).stdout)
        assert abs(shifted - started - expected) < 30, (offset, shifted - started)


def test_clock_skew(scenario: Scenario) -> None:
    """(7) Two workers and two schedulers, one of each 10 minutes ahead and one behind; an interval
    schedule, delayed jobs, a backlog, and the ahead worker killed (-9) while it runs jobs."""
    s = scenario
    for name, offset in SKEWS.items():
        s.cluster.skew(name, offset)
    every = 2
    s.enqueuer.app.add_schedule("tick", "chaos.step", every=timedelta(seconds=every), args={"key": "tick"})
    for name in ("w1", "w2"):
        s.cluster.worker(name)
    for name in ("s1", "s2"):
        s.cluster.scheduler(name)
    for _ in range(size(40, 200)):
        s.enqueuer.one(ms=50, delay=3)
        s.enqueuer.one(ms=50, delay=6)
    s.enqueuer.many(size(300, 3000), ms=200)

    # The ahead worker's incarnation, once it runs jobs; then it dies.
    holding = """SELECT w.id FROM pgsched.workers w JOIN pgsched.jobs j ON j.worker_id = w.id AND j.state = 'running'
                 WHERE w.pid = %s LIMIT 1"""
    w1 = s.cluster.workers["w1"]
    assert wait_for(lambda: s.conn.execute(holding, (w1.pid,)).fetchone(), timeout=30)
    row = s.conn.execute(holding, (w1.pid,)).fetchone()
    assert row is not None
    dead_incarnation = row[0]
    faults.kill9(w1)
    s.timeline.mark(s.conn)
    expiry = s.conn.execute(
        "SELECT lease_expires_at FROM pgsched.workers WHERE id = %s", (dead_incarnation,)
    ).fetchone()
    assert expiry is not None
    s.cluster.worker("w1")  # started again, still 10 minutes ahead

    # The schedule fires meanwhile, one slot every 2 s (on a loaded machine the schedulers start late).
    fired = "SELECT count(*) FROM pgsched.jobs WHERE schedule_id IS NOT NULL"
    assert wait_for(lambda: s.conn.execute(fired).fetchone()[0] >= size(4, 30), timeout=size(60, 180))  # type: ignore[index]
    s.enqueuer.app.pause_schedule("tick")
    drained = wait_for(lambda: unfinished(s.conn) == 0, timeout=size(60, 300))
    report = s.finish()
    dead = s.cluster.dead()
    assert not dead, {name: s.cluster.processes()[name].stderr()[-2000:] for name in dead}
    assert drained and report.ok, json.dumps([unfinished(s.conn), verdicts(report, s.conn)], default=str)

    # No job started before its run_at (jobs never taken back: a rescue moves run_at).
    early_starts = s.conn.execute(
        """SELECT j.id, j.run_at, h.at FROM chaos.history h JOIN pgsched.jobs j ON j.id = h.job_id
           WHERE h.event = 'start' AND j.attempts = 1 AND h.at < j.run_at LIMIT 5"""
    ).fetchall()
    assert early_starts == []
    delayed = s.conn.execute(
        "SELECT count(*) FROM pgsched.jobs WHERE run_at > created_at + interval '2 seconds'"
    ).fetchone()
    assert delayed is not None and delayed[0] >= size(80, 400)  # the delayed jobs were there to test
    # No slot fired early, and the schedule did fire.
    slots = s.conn.execute(
        """SELECT count(*), count(*) FILTER (WHERE created_at < slot) FROM pgsched.jobs
           WHERE schedule_id IS NOT NULL"""
    ).fetchone()
    assert slots is not None and slots[0] >= 3 and slots[1] == 0, slots
    # Rescues: only of the dead incarnation, never before its lease expired in database time.
    rescues = s.conn.execute(
        "SELECT worker_id, min(finished_at), count(*) FROM pgsched.runs WHERE outcome = 'lease_expired' GROUP BY 1"
    ).fetchall()
    assert [r[0] for r in rescues] == [dead_incarnation], rescues
    assert rescues[0][1] >= expiry[0] and rescues[0][2] >= 1, (rescues, expiry)
    # Every attempt's interval is on the database's clock: none ends before it starts, none lasts
    # ten minutes (the tasks take at most 0.2 s; a rescued attempt ends at its rescue).
    odd = s.conn.execute(
        """SELECT job_id, attempt, outcome, started_at, finished_at FROM pgsched.runs
           WHERE finished_at < started_at OR finished_at > started_at + interval '2 minutes' LIMIT 5"""
    ).fetchall()
    assert odd == []
