"""W1a and W1b: enqueue no-op jobs, in one bulk call and one call at a time.

Each measured run starts from an empty ``pgsched.jobs`` (TRUNCATE, then a
CHECKPOINT so that the previous run's dirty pages are not written during
this one). pgsched and its raw-SQL ceiling alternate which goes first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import msgspec
import psycopg

import pgsched

from .report import Row, Stats, timed

BULK_JOBS = 20_000
SINGLE_JOBS = 2_000

RAW_COPY = "COPY pgsched.jobs (task, args) FROM STDIN"
RAW_INSERT = "INSERT INTO pgsched.jobs (task, args) VALUES (%s, %s::jsonb)"


def make_app(dsn: str) -> pgsched.App:
    """An app with the no-op task registered, its pool open (schema checked, catalog written)."""
    app = pgsched.App(dsn)

    @app.task
    def noop(i: int) -> None:
        """Does nothing."""

    return app.open()


def empty_jobs(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE pgsched.jobs CASCADE")
    # A PGSCHED_BENCH_DSN role without pg_checkpoint skips it: its runs are a little noisier.
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")


def alternate(
    conn: psycopg.Connection, runs: int, jobs: int, ours: Callable[[], object], raw: Callable[[], object]
) -> tuple[Stats, Stats]:
    """jobs/s of ``ours`` and ``raw``, ``runs`` times each, from an empty table every time."""
    figures: dict[str, list[float]] = {"ours": [], "raw": []}
    for run in range(runs):
        sides = [("ours", ours), ("raw", raw)]
        for side, fn in sides if run % 2 == 0 else reversed(sides):
            empty_jobs(conn)
            figures[side].append(jobs / timed(fn, profile=side == "ours"))
            (count,) = conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone()  # type: ignore[misc]
            assert count == jobs, f"{side} wrote {count} jobs, not {jobs}"
    return Stats(figures["ours"]), Stats(figures["raw"])


def w1a(dsn: str, runs: int) -> list[Row]:
    specs = [pgsched.JobSpec(task="noop", args={"i": i}) for i in range(BULK_JOBS)]
    args = [{"i": i} for i in range(BULK_JOBS)]
    encode = msgspec.json.Encoder().encode
    app = make_app(dsn)
    with app, psycopg.connect(dsn, autocommit=True) as conn:

        def raw() -> None:
            with conn.transaction(), conn.cursor() as cur, cur.copy(RAW_COPY) as copy:
                for a in args:
                    copy.write_row(("noop", encode(a).decode()))

        ours, ceiling = alternate(conn, runs, BULK_JOBS, lambda: app.enqueue_many(specs), raw)
    return [Row("W1a", "bulk enqueue, 20,000 jobs in 1 call", ours, "jobs/s", "> 130,000 jobs/s", ceiling)]


def w1b(dsn: str, runs: int) -> list[Row]:
    encode = msgspec.json.Encoder().encode
    app = make_app(dsn)
    with app, psycopg.connect(dsn, autocommit=True) as conn:

        def ours() -> None:
            for i in range(SINGLE_JOBS):
                app.enqueue("noop", {"i": i})

        def raw() -> None:
            with conn.cursor() as cur:
                for i in range(SINGLE_JOBS):
                    cur.execute(RAW_INSERT, ("noop", encode({"i": i}).decode()))

        ours_stats, ceiling = alternate(conn, runs, SINGLE_JOBS, ours, raw)
    return [Row("W1b", "single enqueue, 2,000 calls", ours_stats, "jobs/s", "> 2,400 jobs/s", ceiling)]


WORKLOADS = {"W1a": w1a, "W1b": w1b}
