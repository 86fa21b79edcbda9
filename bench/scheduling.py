"""W5 (cron: 10,000 schedules due in one minute, two schedulers) and W6 (dependencies vs independent jobs).

W5: 10,000 schedules (``cron '* * * * *'``, task ``noop``) inserted by SQL with
``next_run_at`` set to one coming minute boundary, at least ``LEAD`` seconds
ahead of the database clock; two ``python -m pgsched scheduler`` processes are
started and compete for the maintenance leadership. The figure is the time
from the slot until all 10,000 jobs are visible (committed, ``queued``): the
bench listens on ``pgsched_wakeup`` (the insert trigger notifies at each
commit) and counts on every notification and every 50 ms, reading
``clock_timestamp()`` with the count, so slot and figure are both on the
database clock. Also printed: slot to the first batch's transaction start
(``min(jobs.created_at)``: how long until a pass picked the slot up), the
duplicate slots (``count(*) - count(DISTINCT (schedule_id, slot))``; must be
0) and how the work split between the two schedulers (their own log lines).

W6: 10,000 no-op jobs as 500 chains of 10 and 500 fan-ins (9 independent
jobs, then 1 that depends on all 9), enqueued with ``app.workflow()`` before
timing, against 10,000 independent no-op jobs (``enqueue_many``). Each set is
drained by one ``python -m pgsched worker --app bench.apps:app --burst
--concurrency 10 --poll-seconds 0.05`` (W1c's defaults), timed from just
before the process starts until it exits; then SQL checks that every job
succeeded with its ``runs`` row. The two sets alternate which goes first.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

import pgsched

from . import apps, env
from .report import Row, Stats

ROOT = Path(__file__).resolve().parent.parent

SCHEDULES = 10_000
LEAD = timedelta(seconds=10)  # the schedulers start and connect well before the slot
W5_DEADLINE = 120.0  # seconds after the slot

CHAINS, CHAIN_LENGTH = 500, 10
FAN_INS, FAN_IN_WIDTH = 500, 9  # 9 jobs, then 1 that waits for all of them
GRAPHS_PER_WORKFLOW = 10  # chains and fan-ins per app.workflow() transaction
DEPENDENT_JOBS = CHAINS * CHAIN_LENGTH + FAN_INS * (FAN_IN_WIDTH + 1)
INDEPENDENT_JOBS = 10_000
CONCURRENCY = 10
POLL_SECONDS = 0.05


def process_env(dsn: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_")}
    environ["PGSCHED_DSN"] = dsn
    environ["PYTHONPATH"] = str(ROOT) + os.pathsep + environ.get("PYTHONPATH", "")
    return environ


def pgsched_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgsched", *args]


# -- W5 --------------------------------------------------------------------------------------

# The next minute boundary at least LEAD ahead (database clock).
NEXT_SLOT = """
SELECT date_trunc('minute', pgsched.now() + %s) + interval '1 minute'
"""

INSERT_SCHEDULES = """
INSERT INTO pgsched.schedules (name, task, cron, next_run_at)
SELECT format('w5-%%s', i), 'noop', '* * * * *', %s FROM generate_series(1, %s) AS i
"""

COUNT = """
SELECT count(*), clock_timestamp() FROM pgsched.jobs WHERE schedule_id IS NOT NULL AND state = 'queued'
"""

FIRED = re.compile(r"materializer: fired (\d+)")


@dataclass(frozen=True)
class Cron:
    """One W5 run."""

    all_queued: float  # seconds from the slot until all jobs are visible
    first_batch: float  # seconds from the slot to the first batch's transaction start
    duplicates: int
    fired: tuple[int, ...]  # jobs each scheduler says it fired


def reset_schedules(conn: psycopg.Connection) -> datetime:
    """10,000 schedules due at the next minute boundary (returned), no jobs."""
    conn.execute("TRUNCATE pgsched.jobs, pgsched.runs, pgsched.run_logs, pgsched.schedules CASCADE")
    (slot,) = conn.execute(NEXT_SLOT, (LEAD,)).fetchone()  # type: ignore[misc]
    conn.execute(INSERT_SCHEDULES, (slot, SCHEDULES))
    conn.execute("VACUUM ANALYZE pgsched.schedules")
    conn.execute("VACUUM ANALYZE pgsched.jobs")
    return slot


def wait_all_queued(listener: psycopg.Connection, conn: psycopg.Connection, slot: datetime) -> datetime:
    """The database time at which all SCHEDULES jobs were first seen queued."""
    (until_slot,) = conn.execute("SELECT extract(epoch FROM %s - pgsched.now())", (slot,)).fetchone()  # type: ignore[misc]
    deadline = time.monotonic() + float(until_slot) + W5_DEADLINE
    while True:
        # Woken by the insert trigger's NOTIFY at each commit; the timeout is the fallback poll.
        for _ in listener.notifies(timeout=0.05, stop_after=1):
            pass
        count, seen = conn.execute(COUNT).fetchone()  # type: ignore[misc]
        if count >= SCHEDULES:
            return seen
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count} of {SCHEDULES} schedule jobs queued {W5_DEADLINE:.0f} s after the slot")


def cron_once(dsn: str, conn: psycopg.Connection, listener: psycopg.Connection) -> Cron:
    slot = reset_schedules(conn)
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")
    command = pgsched_command("scheduler", "--log-level", "info")
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(2)]
        procs = [subprocess.Popen(command, env=process_env(dsn), cwd=ROOT, stdout=log, stderr=log) for log in logs]
        try:
            seen = wait_all_queued(listener, conn, slot)
        finally:
            outputs = [
                env.stop_process(proc, log, f"scheduler {i + 1}")
                for i, (proc, log) in enumerate(zip(procs, logs, strict=True))
            ]
    (first, duplicates, total) = conn.execute(  # type: ignore[misc]
        """SELECT min(created_at), count(*) - count(DISTINCT (schedule_id, slot)), count(*)
           FROM pgsched.jobs WHERE schedule_id IS NOT NULL"""
    ).fetchone()
    assert total >= SCHEDULES
    fired = tuple(sum(int(n) for n in FIRED.findall(output)) for output in outputs)
    return Cron((seen - slot).total_seconds(), (first - slot).total_seconds(), int(duplicates), fired)


def w5(dsn: str, runs: int) -> list[Row]:
    results: list[Cron] = []
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgsched_wakeup")
        for run in range(runs):
            result = cron_once(dsn, conn, listener)
            results.append(result)
            print(
                f"  W5 run {run + 1}: all queued {result.all_queued:.3f} s after the slot, first batch at "
                f"{result.first_batch:.3f} s, {result.duplicates} duplicates,"
                f" fired {' / '.join(map(str, result.fired))}, load {env.load_average()}",
                file=sys.stderr,
                flush=True,
            )
    split = "; ".join(" / ".join(f"{n:,}" for n in r.fired) for r in results)
    what = f"{SCHEDULES:,} schedules due in one minute, 2 schedulers"
    return [
        Row("W5", f"{what}: slot → all jobs queued", Stats([r.all_queued for r in results]), "s", "≤ 1 s", digits=2),
        Row("W5", f"{what}: slot → first batch starts", Stats([r.first_batch for r in results]), "s", "–", digits=2),
        Row(
            "W5",
            f"{what}: duplicate slots (jobs fired by scheduler 1 / 2: {split})",
            Stats([float(r.duplicates) for r in results]),
            "slots",
            "0",
        ),
    ]


# -- W6 --------------------------------------------------------------------------------------


def reset_jobs(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE pgsched.jobs, pgsched.job_deps, pgsched.runs, pgsched.run_logs CASCADE")


def enqueue_graphs(app: pgsched.App) -> None:
    """500 chains of 10 and 500 fan-ins of 9 → 1, a few graphs per workflow transaction."""
    graphs = [("chain", g) for g in range(CHAINS)] + [("fan-in", g) for g in range(FAN_INS)]
    i = 0
    for start in range(0, len(graphs), GRAPHS_PER_WORKFLOW):
        with app.workflow() as wf:
            for kind, _ in graphs[start : start + GRAPHS_PER_WORKFLOW]:
                if kind == "chain":
                    previous = None
                    for _ in range(CHAIN_LENGTH):
                        previous = wf.add("noop", {"i": i}, depends_on=[previous] if previous else [])
                        i += 1
                else:
                    roots = [wf.add("noop", {"i": i + k}) for k in range(FAN_IN_WIDTH)]
                    wf.add("noop", {"i": i + FAN_IN_WIDTH}, depends_on=roots)
                    i += FAN_IN_WIDTH + 1
    assert i == DEPENDENT_JOBS


def enqueue_independent(app: pgsched.App) -> None:
    app.enqueue_many([pgsched.JobSpec(task="noop", args={"i": i}) for i in range(INDEPENDENT_JOBS)])


@dataclass(frozen=True)
class Drain:
    """One drain of one set."""

    seconds: float  # worker process start to exit
    active: float  # first claim to last finish (database clock)


def drain_once(app: pgsched.App, conn: psycopg.Connection, dsn: str, fill: str) -> Drain:
    reset_jobs(conn)
    jobs = DEPENDENT_JOBS if fill == "dependent" else INDEPENDENT_JOBS
    (enqueue_graphs if fill == "dependent" else enqueue_independent)(app)
    conn.execute("VACUUM ANALYZE pgsched.jobs")
    conn.execute("VACUUM ANALYZE pgsched.job_deps")
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")
    cmd = pgsched_command(
        "worker",
        "--app",
        "bench.apps:app",
        "--burst",
        "--concurrency",
        str(CONCURRENCY),
        "--poll-seconds",
        str(POLL_SECONDS),
    )
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=process_env(dsn), cwd=ROOT, stdout=log, stderr=log, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"worker exited with {proc.returncode}: {log.read().decode(errors='replace')[-3000:]}")
    (done, active) = conn.execute(  # type: ignore[misc]
        """
        SELECT (SELECT count(*) FROM pgsched.jobs j
                WHERE j.state = 'succeeded'
                  AND EXISTS (SELECT 1 FROM pgsched.runs r
                              WHERE r.job_id = j.id AND r.attempt = j.attempts AND r.outcome = 'succeeded')),
               (SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM pgsched.runs)
        """
    ).fetchone()
    assert done == jobs, f"{fill}: only {done} of {jobs} jobs succeeded with their runs row"
    return Drain(seconds, float(active))


def w6(dsn: str, runs: int) -> list[Row]:
    app = apps.build(dsn).open()
    results: dict[str, list[Drain]] = {"independent": [], "dependent": []}
    with app, psycopg.connect(dsn, autocommit=True) as conn:
        for run in range(runs):
            order = ["independent", "dependent"] if run % 2 == 0 else ["dependent", "independent"]
            for fill in order:
                results[fill].append(drain_once(app, conn, dsn, fill))
            ind, dep = results["independent"][-1], results["dependent"][-1]
            print(
                f"  W6 run {run + 1}: independent {ind.seconds:.2f} s, chains and fan-ins {dep.seconds:.2f} s"
                f" ({dep.seconds / ind.seconds:.2f} x), load {env.load_average()}",
                file=sys.stderr,
                flush=True,
            )
    ind, dep = results["independent"], results["dependent"]
    shape = f"{CHAINS} chains of {CHAIN_LENGTH} + {FAN_INS} fan-ins {FAN_IN_WIDTH} → 1"
    worker = f"1 worker, --concurrency {CONCURRENCY}"
    return [
        Row(
            "W6",
            f"{INDEPENDENT_JOBS:,} independent jobs, {worker}: drain",
            Stats([d.seconds for d in ind]),
            "s",
            "–",
            digits=2,
        ),
        Row("W6", f"{DEPENDENT_JOBS:,} jobs in {shape}: drain", Stats([d.seconds for d in dep]), "s", "–", digits=2),
        Row(
            "W6",
            "time ratio, dependencies ÷ independent (process start → exit)",
            Stats([d.seconds / i.seconds for d, i in zip(dep, ind, strict=True)]),
            "×",
            "≤ 2 ×",
            digits=2,
        ),
        Row(
            "W6",
            "time ratio, dependencies ÷ independent (first claim → last finish)",
            Stats([d.active / i.active for d, i in zip(dep, ind, strict=True)]),
            "×",
            "–",
            digits=2,
        ),
    ]


WORKLOADS = {"W5": w5, "W6": w6}
