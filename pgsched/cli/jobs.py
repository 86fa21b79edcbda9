"""``pgsched enqueue`` and ``pgsched jobs ...``: enqueue a job; list, show, cancel and retry jobs; read their logs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
import msgspec
import psycopg

from .. import queries
from ..client import App
from ..config import Settings
from ..db import job_row
from ..display import duration, error_summary, progress_bar
from ..encryption import readable_text as readable
from ..errors import JobNotFound, ValidationError
from ..jobs import STATES, TERMINAL_STATES, Job
from ..validation import loads_json
from .options import JSON_FLAG, connect, load_app, with_settings
from .output import cell, print_jobs, print_json, print_table, short_id

# Lines of the log `jobs show` prints (the end of it); `jobs logs` prints them all.
SHOW_LOG_LINES = 50
# How often `jobs logs --follow` looks for new lines and the job's end (nothing notifies either).
FOLLOW_POLL_SECONDS = 0.5


@click.command()
@click.argument("task")
@click.option(
    "--args",
    "args_json",
    default="{}",
    show_default=True,
    help="Task arguments as a JSON object; @FILE reads it from a file, - from stdin.",
)
@click.option("--queue", help="Queue (default: the task's).")
@click.option("--priority", type=int, help="-100..100, higher runs first (default: the task's).")
@click.option("--run-at", "run_at", help="Earliest start, ISO 8601 with a UTC offset.")
@click.option("--delay", type=float, help="Start after this many seconds.")
@click.option("--max-attempts", "max_attempts", type=int, help="Attempts before the job fails for good.")
@click.option("--dedupe-key", "dedupe_key", help="At most one live job per key.")
@click.option("--depends-on", "depends_on", multiple=True, type=int, help="Job id to wait for (repeatable).")
@click.option("--owner", help="Owner (tenant) of the job.")
@click.option("--timeout", type=float, help="Seconds an attempt may run (default: the task's).")
@click.option("--concurrency-key", "concurrency_key", help="Jobs sharing a key are capped together.")
@JSON_FLAG
@with_settings("app", "encryption_keys")
def enqueue(settings: Settings, task: str, args_json: str, as_json: bool, run_at: str | None, **options: Any) -> None:
    """Enqueue one job of TASK."""
    args = loads_json(read_argument(args_json, "args"), "args")
    if args is None:  # to the client, None means "no args"; the text null is not an object
        raise ValidationError("args", "must be a JSON object, not null")
    if run_at is not None:
        try:
            options["run_at"] = datetime.fromisoformat(run_at)
        except ValueError:
            raise click.ClickException(f"run_at: {run_at!r} is not an ISO 8601 date and time") from None
    options["depends_on"] = list(options["depends_on"]) or None
    with load_app(settings) as app:
        job = app.enqueue(task, args, **{k: v for k, v in options.items() if v is not None})
    if as_json:
        print_json(job)
    else:
        click.echo(f"enqueued job {job.id} ({job.task}, queue {job.queue}, {job.state})")


def read_argument(value: str, field: str) -> str:
    """``value`` itself, or the text of the file it names as ``@path``, or stdin for ``-`` (a payload
    that does not fit on a command line, up to the 1 MiB limit)."""
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as file:
                return file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValidationError(
                field, f"cannot read {value[1:]!r}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
    return value


@click.group("jobs")
def jobs() -> None:
    """List, show, cancel and retry jobs; read their logs."""


@jobs.command("list")
@click.option("--state", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--queue", help="Only jobs of this queue.")
@click.option("--task", help="Only jobs of this task.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@JSON_FLAG
@with_settings()
def list_jobs(settings: Settings, as_json: bool, **filters: Any) -> None:
    """The newest jobs first."""
    with connect(settings) as conn, conn.cursor(row_factory=job_row) as cur:
        cur.execute(queries.LIST_JOBS, filters)
        print_jobs(cur.fetchall(), as_json)


def _job_command(name: str, help_text: str, call: Callable[..., Job], *extra: Callable[..., Any]) -> None:
    @jobs.command(name, help=help_text)
    @click.argument("job_id", type=int)
    @JSON_FLAG
    @with_settings()
    def command(settings: Settings, job_id: int, as_json: bool, **kwargs: Any) -> None:
        with App(settings=settings) as app:
            job = call(app, job_id, **kwargs)
        if as_json:
            print_json(job)
        else:
            click.echo(f"job {job.id}: {job.state}" + (" (cancel requested)" if job.cancel_requested_at else ""))

    for decorator in extra:
        decorator(command)


_job_command(
    "cancel",
    "Cancel a job (a running one is stopped by its worker).",
    App.cancel,
    click.option("--reason", help="Why; stored as the job's error."),
)
_job_command("retry", "Run a failed, cancelled or scheduled job again now.", App.retry)


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
        value = cell(getattr(job, field))
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


# What pgsched.cli registers on the `pgsched` group.
COMMANDS = [enqueue, jobs]
