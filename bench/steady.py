"""W7 (issue 18): steady load. A producer keeps about 4,000 no-op jobs queued while one
``pgsched worker`` process (concurrency 16, then 64) drains them for ``STEADY_SECONDS``; then
SIGTERM.

It prints what the engine review saw go wrong under plain load: completions that fall behind
the producer, a worker holding far more jobs than ``concurrency + prefetch`` (finished but not
written), rescues of a healthy worker's jobs (lease_expired runs), a pickup p99 of seconds, and a
stop that overruns its grace. Figures only: nothing here passes or fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg

from . import apps
from .report import Row, Stats
from .worker import ROOT, reset, worker_env

STEADY_SECONDS = float(os.environ.get("BENCH_STEADY_SECONDS", "60"))
BACKLOG = 4000
CONCURRENCIES = (16, 64)
GRACE = 10.0


def steady_once(app: object, conn: psycopg.Connection, dsn: str, concurrency: int) -> dict[str, float]:
    reset(conn)
    cmd = [sys.executable, "-m", "pgsched", "worker", "--app", "bench.apps:app", "--concurrency", str(concurrency)]
    cmd += ["--grace-seconds", str(GRACE)]
    proc = subprocess.Popen(cmd, env=worker_env(dsn), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    produced = 0
    held_max = 0
    start = time.monotonic()
    try:
        while time.monotonic() - start < STEADY_SECONDS:
            queued = conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'queued'").fetchone()[0]
            if queued < BACKLOG:
                missing = BACKLOG - queued
                app.enqueue_many([{"task": "noop"} for _ in range(missing)])  # type: ignore[attr-defined]
                produced += missing
            # Held by the worker: running, or finished with the outcome not written yet.
            held = conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'running'").fetchone()[0]
            held_max = max(held_max, held)
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(GRACE + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stop_seconds = time.monotonic() - stop
    finally:
        if proc.poll() is None:
            proc.kill()
    done, rescued = conn.execute(
        "SELECT count(*) FILTER (WHERE outcome = 'succeeded'), count(*) FILTER (WHERE outcome = 'lease_expired')"
        " FROM pgsched.runs"
    ).fetchone()
    left_running = conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'running'").fetchone()[0]
    pickup = [
        r[0]
        for r in conn.execute(
            "SELECT extract(epoch FROM r.started_at - j.created_at) * 1000 FROM pgsched.runs r"
            " JOIN pgsched.jobs j ON j.id = r.job_id ORDER BY 1"
        )
    ]
    p99 = pickup[int(len(pickup) * 0.99)] if pickup else 0.0
    figures = {
        "completed/s": done / elapsed,
        "produced/s": produced / elapsed,
        "held max": held_max,
        "rescued": rescued,
        "left running": left_running,
        "pickup p99 ms": p99,
        "stop s": stop_seconds,
    }
    print(f"  W7 concurrency {concurrency}: {figures}", file=sys.stderr, flush=True)
    return figures


def w7(dsn: str, runs: int) -> list[Row]:
    rows = []
    app = apps.build(dsn).open()
    with app, psycopg.connect(dsn, autocommit=True) as conn:
        for concurrency in CONCURRENCIES:
            results = [steady_once(app, conn, dsn, concurrency) for _ in range(runs)]

            def stats(key: str, results: list[dict[str, float]] = results) -> Stats:
                return Stats([r[key] for r in results])

            what = f"steady load, concurrency {concurrency}, {BACKLOG:,} queued, {STEADY_SECONDS:g} s:"
            rows += [
                Row("W7", f"{what} completed", stats("completed/s"), "jobs/s", "keeps pace with the producer"),
                Row("W7", f"{what} produced", stats("produced/s"), "jobs/s", "–"),
                Row("W7", f"{what} most held at once", stats("held max"), "jobs", f"≤ {concurrency} (concurrency)"),
                Row("W7", f"{what} rescued", stats("rescued"), "jobs", "0"),
                Row("W7", f"{what} left running after the stop", stats("left running"), "jobs", "0"),
                Row("W7", f"{what} pickup p99", stats("pickup p99 ms"), "ms", "–", digits=1),
                Row("W7", f"{what} stop", stats("stop s"), "s", f"< {GRACE:g} s grace", digits=1),
            ]
    return rows


WORKLOADS = {"W7": w7}
