"""``pgsched jobs show|logs`` and ``pgsched workers``: what a job did, what it logged, who runs jobs."""

from __future__ import annotations

import sys
import time
from datetime import UTC
from typing import Any

import click
import msgspec
import psycopg

from . import queries
from .cli import JSON_FLAG, _cell, connect, jobs, main, print_json, print_table, with_settings
from .client import App
from .config import Settings
from .display import duration, error_summary, progress_bar
from .errors import JobNotFound
from .jobs import TERMINAL_STATES, Job
from .payloads import readable_text as readable

# Lines of the log `jobs show` prints (the end of it); `jobs logs` prints them all.
SHOW_LOG_LINES = 50
# How often `jobs logs --follow` looks for new lines and the job's end (nothing notifies either).
FOLLOW_POLL_SECONDS = 0.5


def short_id(worker: Any) -> str:
    """The first 8 hex digits of a worker incarnation's id: what `pgsched workers` lists."""
    return str(worker)[:8] if worker else ""


def from_start(job_id: int, attempt: int | None) -> dict[str, Any]:
    """JOB_LOGS parameters that read a job's log (or one attempt's) from its first line."""
    return {"job_id": job_id, "attempt": attempt, "after_attempt": None, "after_at": None, "after_position": None}


def log_line(row: dict[str, Any], message: str | None) -> str:
    """``2026-12-01 09:00:01.042  #1  stdout  message`` (UTC; the level after the stream when there is one)."""
    at = row["logged_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    stream = row["stream"] + (f"/{row['level']}" if row["level"] else "")
    return f"{at}  #{row['attempt']}  {stream}  {message}"


@jobs.command("show")
@click.argument("job_id", type=int)
@JSON_FLAG
@with_settings()
def show(settings: Settings, job_id: int, as_json: bool) -> None:
    """Show one job: every column, its attempts (runs) and the end of its log."""
    app = App(settings=settings)
    with connect(settings) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        job = app.get(job_id, connection=conn)
        runs = cur.execute(queries.JOB_RUNS, (job_id,)).fetchall()
        logs = cur.execute(queries.JOB_LOGS, from_start(job_id, None)).fetchall()
    keyring, scope = app.keyring, (job.task, job.queue)
    for run in runs:
        run["error"] = readable(run["error"], "error", scope, keyring)
    if as_json:
        print_json({**msgspec.structs.asdict(job), "runs": runs})
        return
    for field in Job.__struct_fields__:
        value = _cell(getattr(job, field))
        if field == "progress" and progress_bar(job.progress):
            value = f"{progress_bar(job.progress)}  {value}"
        click.echo(f"{field:>24}  {value}".rstrip())
    click.echo("\nruns:")
    headers = ("attempt", "outcome", "worker", "started_at", "duration", "error")
    print_table(
        [
            [
                r["attempt"],
                r["outcome"],
                short_id(r["worker_id"]),
                r["started_at"],
                duration(_seconds(r)),
                error_summary(r["error"], 80),
            ]
            for r in runs
        ],
        headers,
    )
    cut = len(logs) > SHOW_LOG_LINES
    click.echo(
        f"\nlog: the last {SHOW_LOG_LINES} of {len(logs)} lines (pgsched jobs logs {job_id})" if cut else "\nlog:"
    )
    for row in logs[-SHOW_LOG_LINES:]:
        click.echo(log_line(row, readable(row["message"], "message", scope, keyring)))


def _seconds(run: dict[str, Any]) -> float | None:
    return None if run["duration_ms"] is None else run["duration_ms"] / 1000


@jobs.command("logs")
@click.argument("job_id", type=int)
@click.option("--attempt", type=click.IntRange(1), help="Only this attempt's lines (default: every attempt's).")
@click.option(
    "--follow", "-f", is_flag=True, help="Keep printing new lines until the job is succeeded, failed or cancelled."
)
@JSON_FLAG
@with_settings()
def logs(settings: Settings, job_id: int, attempt: int | None, follow: bool, as_json: bool) -> None:
    """Print a job's log lines (pgsched.run_logs), oldest first; --json prints one object per line."""
    keyring = App(settings=settings).keyring
    params = from_start(job_id, attempt)
    with connect(settings) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        while True:
            # The state first: lines are written before the outcome, so once a read state is
            # final, the read after it has every line.
            job = cur.execute(queries.JOB_STATE, (job_id,)).fetchone()
            if job is None:
                raise JobNotFound(job_id)
            for row in cur.execute(queries.JOB_LOGS, params).fetchall():
                message = readable(row["message"], "message", (job["task"], job["queue"]), keyring)
                if as_json:
                    print_json({k: v for k, v in row.items() if k != "position"} | {"message": message})
                else:
                    click.echo(log_line(row, message))
                params |= {
                    "after_attempt": row["attempt"],
                    "after_at": row["logged_at"],
                    "after_position": row["position"],
                }
            sys.stdout.flush()  # followed through a pipe: show each batch as it comes
            if not follow or job["state"] in TERMINAL_STATES:
                return
            time.sleep(FOLLOW_POLL_SECONDS)


@main.command("workers")
@JSON_FLAG
@with_settings()
def workers(settings: Settings, as_json: bool) -> None:
    """Registered workers (the pgsched.worker_status view). STALE: its lease has passed (the process died
    or stalled; its running jobs are rescued, and the row is pruned ten minutes later)."""
    with connect(settings) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        rows = cur.execute(queries.WORKERS).fetchall()
    if as_json:
        print_json(rows)
        return
    headers = ("id", "host", "pid", "queues", "concurrency", "running", "last_heartbeat", "stale")
    print_table(
        [
            [
                short_id(r["id"]),
                r["host"],
                r["pid"],
                ",".join(r["queues"]),
                r["concurrency"],
                r["running"],
                f"{duration(r['heartbeat_age_seconds'])} ago",
                "stale" if r["stale"] else "",
            ]
            for r in rows
        ],
        headers,
    )
