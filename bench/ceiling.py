"""W3: the raw-SQL ceiling of draining, with pgbench.

10 clients (2 threads), ``-n -M prepared``, ~12 s per measurement, on a
``pgsched.jobs`` holding 2,000,000 queued rows (one ``INSERT ... SELECT
generate_series``, then ``VACUUM ANALYZE``). Each pgbench transaction claims a
batch and completes it::

    BEGIN;
    WITH claimed AS (<worker/queries.py CLAIM>) SELECT json_agg(...) ... \\gset c_
    <worker/queries.py COMPLETE, fed that JSON array>;
    COMMIT;

The two statements are the worker's own text (``pgsched.worker.queries``),
with psycopg's ``%(name)s`` / ``%(name)b`` placeholders turned into pgbench variables (bound
as parameters under ``-M prepared``, as psycopg binds them): the worker's
queue and task lists, lease and worker id are ``-D`` variables, the batch a
``\\set``. So: one claim (LATERAL per queue, ``FOR UPDATE SKIP LOCKED``,
``UPDATE ... RETURNING``), one fenced ``UPDATE ... FROM json_to_recordset`` to
``succeeded`` and one ``runs`` insert per batch, one commit (the worker
commits the claim and the completion separately).

Batch sizes: 1, 10, and the batches the W1c rows actually used (their mean
jobs per claim; when W1c did not run in this invocation, the lower bound the
worker's settings give, ``(concurrency + prefetch) // 4``). jobs/s = ``runs`` rows
written per second of the measurement. Before every measurement the finished rows are deleted, ``runs``
emptied, the queue topped up to 2,000,000 and the table vacuumed, so each
starts from the same state.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import uuid

import psycopg

from pgsched import embedded
from pgsched.worker import queries

from . import apps, env, report, worker
from .report import Row, Stats

QUEUED_ROWS = 2_000_000
CLIENTS = 10
THREADS = 2
SECONDS = 12
FIXED_BATCHES = (1, 10)

SEED = """
INSERT INTO pgsched.jobs (task, args)
SELECT 'noop', jsonb_build_object('i', g) FROM generate_series(1, %s) AS g
"""


def _pgbench_sql(sql: str, names: dict[str, str]) -> str:
    return re.sub(r"%\((\w+)\)[sbt]", lambda m: ":" + names.get(m.group(1), m.group(1)), sql.strip())


def script(batch: int) -> str:
    """The pgbench script: claim ``batch`` jobs and complete them, in one transaction."""
    claim = _pgbench_sql(queries.CLAIM, {"queues": "claim_queues", "tasks": "claim_tasks", "limit": "batch"})
    complete = _pgbench_sql(queries.COMPLETE, {"outcomes": "c_outcomes"})
    # What the worker's COMPLETE receives for a batch of succeeded no-op attempts (complete_params).
    fields = {
        "worker": "worker_id",
        "id": "id",
        "attempt": "attempts",
        "queue": "queue",
        "task": "task",
        "owner": "owner",
        "state": "'succeeded'",
        "outcome": "'succeeded'",
        "result": "'null'",
        "error": "NULL",
        "delay": "NULL",
        "started_at": "started_at",
        "finished_at": "clock_timestamp()",
    }
    row = ", ".join(f"'{name}', {expr}" for name, expr in fields.items())
    select = f"coalesce(json_agg(json_build_object({row})), '[]') AS outcomes"
    return (
        f"\\set batch {batch}\n"
        "BEGIN;\n"
        f"WITH claimed AS (\n{claim}\n)\n"
        f"SELECT {select}\n"
        "FROM claimed \\gset c_\n"
        f"{complete};\n"
        "COMMIT;\n"
    )


def reset(conn: psycopg.Connection) -> None:
    """Back to QUEUED_ROWS queued rows, no finished ones, no history, vacuumed."""
    conn.execute("DELETE FROM pgsched.jobs WHERE state <> 'queued'")
    conn.execute("TRUNCATE pgsched.runs")
    (queued,) = conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone()  # type: ignore[misc]
    if queued < QUEUED_ROWS:
        conn.execute(SEED, (QUEUED_ROWS - queued,))
    conn.execute("VACUUM ANALYZE pgsched.jobs")
    conn.execute("VACUUM ANALYZE pgsched.runs")
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")


def pgbench(
    dsn: str,
    batch: int,
    runnable: list[str],
    *,
    clients: int = CLIENTS,
    seconds: int = SECONDS,
    text: str | None = None,
) -> tuple[float, str]:
    """(tps, pgbench's output) of one measurement (``text``: another script, for experiments)."""
    # The claim is made only for a registered worker incarnation with a live lease.
    worker_id = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgsched.workers (id, host, pid, queues, concurrency, lease_expires_at)"
            " VALUES (%s, 'pgbench', 0, '{default}', %s, pgsched.now() + interval '1 day')",
            (worker_id, clients),
        )
    with tempfile.NamedTemporaryFile("w", prefix="pgsb-w3-", suffix=".sql") as f:
        f.write(text if text is not None else script(batch))
        f.flush()
        cmd = [
            str(embedded.bin_dir() / "pgbench"),
            "-n",
            "-M",
            "prepared",
            "-c",
            str(clients),
            "-j",
            str(min(THREADS, clients)),
            "-T",
            str(seconds),
            "-f",
            f.name,
            "-D",
            "claim_queues={default}",
            "-D",
            "claim_tasks={" + ",".join(runnable) + "}",
            "-D",
            f"worker={worker_id}",
            "-D",
            "lease=30",
            dsn,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = done.stdout + done.stderr
    match = re.search(r"^tps = ([0-9.]+)", out, re.MULTILINE)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if done.returncode != 0 or not match or (failed and int(failed.group(1)) > 0):
        raise RuntimeError(f"pgbench failed ({done.returncode}):\n{out[-3000:]}")
    return float(match.group(1)), out


def batches() -> list[tuple[int, str]]:
    chosen: dict[int, str] = {b: "fixed" for b in FIXED_BATCHES}
    for name, prefetch in (("defaults", worker.DEFAULT_PREFETCH), ("tuned", None)):
        measured = worker.measured_batches.get(name)
        if measured is not None:
            label = f"W1c {name}: its measured mean batch"
        else:
            prefetch = prefetch if prefetch is not None else 500
            measured = worker.settings_batch(prefetch)[0]
            label = f"W1c {name} (prefetch {prefetch}) settings' lower bound; W1c not run"
        chosen.setdefault(measured, label)
    return sorted(chosen.items())


def w3(dsn: str, runs: int) -> list[Row]:
    app = apps.build(dsn)
    runnable = sorted({*app.tasks, "http"})  # what Worker.runnable is for this app (no shell)
    chosen = batches()
    figures: dict[int, list[float]] = {b: [] for b, _ in chosen}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SEED, (QUEUED_ROWS,))
        for run in range(runs):
            order = chosen if run % 2 == 0 else list(reversed(chosen))
            for batch, _ in order:
                reset(conn)
                statements = env.statements_enabled and run == runs - 1
                if statements:
                    conn.execute("SELECT pg_stat_statements_reset()")
                (before,) = conn.execute("SELECT count(*) FROM pgsched.runs").fetchone()  # type: ignore[misc]
                tps, _ = pgbench(dsn, batch, runnable)
                (after,) = conn.execute("SELECT count(*) FROM pgsched.runs").fetchone()  # type: ignore[misc]
                if statements:
                    title = f"W3 batch {batch} (last run): pg_stat_statements"
                    report.sections.append((title, env.statements_table(conn, after - before, limit=4)))
                # Jobs completed, counted by their runs rows (not tps x batch: a claim may get fewer).
                jobs = (after - before) / SECONDS
                figures[batch].append(jobs)
                print(
                    f"  W3 run {run + 1} batch {batch}: {tps:,.1f} tps = {jobs:,.0f} jobs/s"
                    f" ({after - before:,} runs rows in {SECONDS} s), load {env.load_average()}",
                    file=sys.stderr,
                    flush=True,
                )
    return [
        Row(
            "W3",
            f"pgbench claim-and-complete, {CLIENTS} clients, batch {batch} ({label})",
            None,
            "jobs/s",
            "(the ceiling)",
            ceiling=Stats(figures[batch]),
            batch=batch,
        )
        for batch, label in chosen
    ]


WORKLOADS = {"W3": w3}
