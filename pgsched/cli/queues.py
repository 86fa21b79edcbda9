"""``pgsched queues ...``: queue depths, and the queue controls (pause, resume, caps, rate, fairness)."""

from __future__ import annotations

from typing import Any

import click
import psycopg

from .. import queries
from ..client import App
from ..config import Settings
from ..queues import QueueSettings
from .options import JSON_FLAG, connect, with_settings
from .output import print_json, print_table

STATS_COLUMNS = (
    "queue",
    "paused",
    "waiting",
    "scheduled",
    "queued",
    "running",
    "unroutable",
    "oldest_queued_age_seconds",
    "failed_last_hour",
)
SETTINGS_COLUMNS = ("name", "paused", "max_running", "rate", "max_per_key", "fair", "encrypt")


@click.group("queues", invoke_without_command=True)
@JSON_FLAG
@with_settings()
@click.pass_context
def queues_group(ctx: click.Context, settings: Settings, as_json: bool) -> None:
    """Queue depths by state (the pgsched.queue_stats view); subcommands change a queue's controls."""
    if ctx.invoked_subcommand is not None:
        return
    with connect(settings) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        rows = cur.execute(queries.QUEUE_STATS).fetchall()
    if as_json:
        print_json(rows)
        return
    print_table([[row[h] for h in STATS_COLUMNS] for row in rows], [h.replace("_seconds", "_s") for h in STATS_COLUMNS])


def _print_settings(items: list[QueueSettings], as_json: bool) -> None:
    if as_json:
        print_json(items if len(items) != 1 else items[0])
        return
    print_table([[getattr(s, c) for c in SETTINGS_COLUMNS] for s in items], SETTINGS_COLUMNS)


CREATE_FLAG = click.option("--create", is_flag=True, help="Accept a queue pgsched has not seen yet.")


@queues_group.command("pause")
@click.argument("name")
@CREATE_FLAG
@with_settings()
def pause(settings: Settings, name: str, create: bool) -> None:
    """Stop every worker claiming from NAME (within a second); running jobs finish, enqueue still works."""
    with App(settings=settings) as app:
        app.pause_queue(name, create=create)
    click.echo(f"queue {name}: paused")


@queues_group.command("resume")
@click.argument("name")
@with_settings()
def resume(settings: Settings, name: str) -> None:
    """Let workers claim from NAME again (they are woken at once)."""
    with App(settings=settings) as app:
        app.resume_queue(name)
    click.echo(f"queue {name}: resumed")


def _cap(value: str | None) -> Any:
    """A cap option: a number, or ``none`` to clear it (validated by the library)."""
    if value is None or value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        return value  # refused by the library, naming the field


@queues_group.command("set")
@click.argument("name")
@click.option(
    "--max-running",
    metavar="N|none",
    help="Global cap on running jobs of the queue, across all workers ('none' clears).",
)
@click.option(
    "--rate",
    metavar="N/UNIT|none",
    help="At most N starts per second, minute or hour, e.g. 100/minute ('none' clears).",
)
@click.option("--max-per-key", metavar="N|none", help="At most N running jobs per concurrency_key ('none' clears).")
@click.option("--fair/--no-fair", default=None, help="Alternate claims between owners and concurrency keys.")
@click.option(
    "--encrypt/--no-encrypt", default=None, help="Store new jobs' payloads encrypted (PGSCHED_ENCRYPTION_KEYS)."
)
@CREATE_FLAG
@JSON_FLAG
@with_settings()
def set_controls(settings: Settings, name: str, create: bool, as_json: bool, **options: Any) -> None:
    """Change the controls of queue NAME; options not given stay as they are."""
    changes: dict[str, Any] = {}
    for option in ("max_running", "max_per_key"):
        if options[option] is not None:
            changes[option] = _cap(options[option])
    if options["rate"] is not None:
        changes["rate"] = None if options["rate"].lower() == "none" else options["rate"]
    for flag in ("fair", "encrypt"):
        if options[flag] is not None:
            changes[flag] = options[flag]
    if not changes:
        raise click.UsageError("give at least one of --max-running, --rate, --max-per-key, --fair, --encrypt")
    with App(settings=settings) as app:
        _print_settings([app.configure_queue(name, create=create, **changes)], as_json)


@queues_group.command("show")
@click.argument("name", required=False)
@JSON_FLAG
@with_settings()
def show(settings: Settings, name: str | None, as_json: bool) -> None:
    """The controls of queue NAME (of every queue that has any, without NAME)."""
    with App(settings=settings) as app:
        _print_settings([app.queue_settings(name)] if name else app.list_queue_settings(), as_json)


# What pgsched.cli registers on the `pgsched` group.
COMMANDS = [queues_group]
