"""``pgsched schedules ...``: add, list, pause, resume, trigger, delete and preview schedules."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from ..client import App
from ..config import Settings
from ..errors import ValidationError
from ..validation import loads_json
from .options import JSON_FLAG, load_app, with_settings
from .output import print_json, print_table


@click.group("schedules")
def schedules_group() -> None:
    """Add, list, pause, resume, trigger, delete and preview schedules."""


def _print_schedules(items: list[Any], as_json: bool) -> None:
    if as_json:
        print_json(items)
        return
    headers = ("name", "task", "timetable", "timezone", "next_run_at", "paused", "enabled", "source", "invalid")
    rows = [
        [
            *(s.name, s.task, s.cron or f"every {s.every}", s.timezone, s.next_run_at, s.paused, s.enabled, s.source),
            s.invalid_reason,  # why the scheduler cannot evaluate it (it fires nothing until written again)
        ]
        for s in items
    ]
    print_table(rows, headers)


@schedules_group.command("add")
@click.argument("name")
@click.option("--task", required=True, help="Task of the jobs it produces.")
@click.option("--cron", help="Cron expression (5 fields, 6 with seconds, or @hourly-style alias).")
@click.option("--every", type=float, help="Interval in seconds (instead of --cron).")
@click.option("--timezone", "tz", default="UTC", show_default=True, help="IANA time zone of the cron expression.")
@click.option("--args", "args_json", default="{}", show_default=True, help="Job arguments as a JSON object.")
@click.option("--queue", help="Queue of its jobs (default: the task's).")
@click.option("--priority", type=int, help="Priority of its jobs (default: the task's).")
@click.option("--misfire", type=click.Choice(["skip", "run_once", "catch_up"]), default="run_once", show_default=True)
@click.option(
    "--overlap", type=click.Choice(["allow", "skip", "queue_one", "cancel_previous"]), default="skip", show_default=True
)
@click.option("--jitter", "jitter_seconds", type=int, default=0, show_default=True, help="Random delay, seconds.")
@click.option("--start-at", "start_at", help="No slot before this instant (ISO 8601 with offset).")
@click.option("--end-at", "end_at", help="No slot after this instant (ISO 8601 with offset).")
@JSON_FLAG
@with_settings("app")
def add_schedule(settings: Settings, name: str, args_json: str, tz: str, as_json: bool, **fields: Any) -> None:
    """Create (or replace) the schedule NAME."""
    try:
        fields["args"] = loads_json(args_json, "args")
    except ValidationError as exc:
        raise click.ClickException(str(exc)) from None
    for key in ("start_at", "end_at"):
        if fields[key] is not None:
            try:
                fields[key] = datetime.fromisoformat(fields[key])
            except ValueError:
                raise click.ClickException(f"{key}: {fields[key]!r} is not an ISO 8601 date and time") from None
    with load_app(settings) as app:
        schedule = app.add_schedule(
            name, timezone=tz, source="cli", **{k: v for k, v in fields.items() if v is not None}
        )
    if as_json:
        print_json(schedule)
    else:
        click.echo(f"schedule {schedule.name}: {schedule.cron or f'every {schedule.every}'} ({schedule.timezone})")


@schedules_group.command("list")
@JSON_FLAG
@with_settings()
def list_schedules(settings: Settings, as_json: bool) -> None:
    """Every schedule, by name."""
    with App(settings=settings) as app:
        _print_schedules(app.list_schedules(), as_json)


def _schedule_command(name: str, help_text: str, call: Callable[[App, str], Any], done: str) -> None:
    @schedules_group.command(name, help=help_text)
    @click.argument("schedule")
    @with_settings()
    def command(settings: Settings, schedule: str) -> None:
        with App(settings=settings) as app:
            result = call(app, schedule)
        click.echo(done.format(name=schedule, result=result))


_schedule_command("pause", "Pause a schedule (it produces nothing).", App.pause_schedule, "schedule {name}: paused")
_schedule_command(
    "resume",
    "Resume a schedule (missed slots follow its misfire policy).",
    App.resume_schedule,
    "schedule {name}: resumed",
)
_schedule_command(
    "trigger", "Run a schedule's job now (the timetable is not touched).", App.trigger_schedule,
    "schedule {name}: enqueued job {result.id}",
)  # fmt: skip
_schedule_command("delete", "Delete a schedule (its jobs stay).", App.delete_schedule, "schedule {name}: deleted")


@schedules_group.command("preview")
@click.argument("expression")
@click.option("--timezone", "tz", default="UTC", show_default=True)
@click.option("-n", "count", type=int, default=5, show_default=True, help="How many slots.")
@click.option("--after", help="Start after this instant (ISO 8601 with offset; default now).")
@JSON_FLAG
def preview(expression: str, tz: str, count: int, after: str | None, as_json: bool) -> None:
    """The next slots of a cron EXPRESSION in a time zone, as UTC and local times."""
    from ..cron import load_zone, next_fire_times

    try:
        start = datetime.fromisoformat(after) if after else datetime.now(load_zone("UTC"))
    except ValueError:
        raise click.ClickException(f"after: {after!r} is not an ISO 8601 date and time") from None
    slots = next_fire_times(expression, tz, start, count)
    if as_json:
        print_json(slots)
        return
    zone = load_zone(tz)
    print_table([[s, s.astimezone(zone)] for s in slots], ("utc", tz))


# What pgsched.cli registers on the `pgsched` group.
COMMANDS = [schedules_group]
