"""The commands that run pgsched: ``up`` (everything on this machine), ``worker`` and ``scheduler``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading

import click
import msgspec
import psycopg

from .. import migrations
from ..config import Settings, masked_dsn
from ..db import resolve_dsn, wait_for_database
from ..leader.loop import Maintenance, default_services
from ..protect import protect_process
from .options import configure_logging, load_app, with_settings
from .serve_api import start_dev_api


@click.command()
@click.option(
    "--api-port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port of the REST API on 127.0.0.1 (development mode: a dev admin and its token); 0: no API.",
)
@with_settings(
    "app",
    "queues",
    "concurrency",
    "prefetch",
    "lease_seconds",
    "allow_shell",
    "allow_private_http",
    "encryption_keys",
    "wait_for_db",
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
    if not wait_for_database(dsn, settings.wait_for_db, stop):
        return
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = migrations.migrate(conn)
    app = load_app(msgspec.structs.replace(settings, dsn=dsn))
    if settings.queues == "default":  # not chosen: serve every queue the app's tasks use
        queues = ",".join(dict.fromkeys(["default", *(t.defaults.queue for t in app.tasks.values())]))
        app.settings = msgspec.structs.replace(app.settings, queues=queues)
    app.open()
    api = start_dev_api(msgspec.structs.replace(settings, dsn=dsn), "127.0.0.1", api_port) if api_port else None
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
    serving = ", api" if api is not None and not isinstance(api, str) else ""
    click.echo(f"  running:    database, migrations, worker, scheduler{serving} (Ctrl-C stops)")
    sys.stdout.flush()
    app.settings = msgspec.structs.replace(app.settings, scheduler=True)
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
    "scheduler",
    "wait_for_db",
    "encryption_keys",
)


@click.command()
@with_settings(*WORKER_OPTIONS)
@click.option(
    "--secrets-on-stdin", is_flag=True, hidden=True, is_eager=True, expose_value=False, callback=_secrets_from_stdin
)
# Every worker runs the scheduler now; the old opt-in flag stays accepted so old scripts keep working.
@click.option("--with-scheduler", is_flag=True, hidden=True, expose_value=False)
# A child of the --processes supervisor, which relays stop signals (see worker/serve.py).
@click.option("--supervised", is_flag=True, hidden=True)
def worker(settings: Settings, supervised: bool) -> None:
    """Claim and run jobs (SIGTERM/Ctrl-C: finish running jobs, then stop; again, a second later: stop now)."""
    protect_process()  # before any job (or the user's app) runs: see pgsched/protect.py
    settings.check_worker()
    configure_logging(settings)
    if settings.processes > 1:
        from pgsched.worker.supervisor import supervise

        wait_for_database(resolve_dsn(settings), settings.wait_for_db)  # once, before any child starts

        sys.exit(supervise(settings))
    app = load_app(settings)
    stats = app._run_worker_in_own_loop(settings, supervised=supervised)
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


@click.command()
@with_settings("app", "lease_seconds", "wait_for_db")
def scheduler(settings: Settings) -> None:
    """Run the maintenance services: promote due jobs, rescue expired leases, prune history.

    Any number may run; each pass is led by whoever takes the advisory lock.
    """
    configure_logging(settings)
    app = load_app(settings)
    wait_for_database(app.dsn, settings.wait_for_db)
    app.open()
    maintenance = Maintenance(app.dsn, default_services(settings.lease_seconds))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, maintenance.stop)
        await maintenance.run()

    asyncio.run(run())
    app.close()


# What pgsched.cli registers on the `pgsched` group.
COMMANDS = [up, worker, scheduler]
