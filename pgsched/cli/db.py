"""``pgsched migrate`` and ``pgsched db ...``: the database pgsched uses."""

from __future__ import annotations

import click
import psycopg

from .. import migrations
from ..config import Settings
from ..db import resolve_dsn
from .options import with_settings


@click.command()
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


@click.group("db")
def db() -> None:
    """The database pgsched uses."""


@db.command()
@with_settings()
def url(settings: Settings) -> None:
    """Print the DSN in use (starting the embedded server if needed), for psql."""
    click.echo(resolve_dsn(settings))


@db.command("stop")
@click.option("--force", is_flag=True, help="Stop it even while other pgsched processes use it.")
@with_settings()
def stop_db(settings: Settings, force: bool) -> None:
    """Stop the embedded server (refused while other pgsched processes use it, unless --force)."""
    from .. import embedded

    if settings.dsn:
        raise click.ClickException("a DSN is configured: pgsched does not stop servers it did not start")
    users = {} if force else embedded.pgsched_sessions(settings.embedded_data_dir)
    if users:
        which = ", ".join(f"{name} ({count})" for name, count in users.items())
        raise click.ClickException(
            f"the embedded server is in use by {sum(users.values())} pgsched session(s): {which}; "
            "stop those processes first, or pass --force"
        )
    stopped = embedded.stop(settings.embedded_data_dir)
    click.echo("stopped" if stopped else "not running")


# What pgsched.cli registers on the `pgsched` group.
COMMANDS = [migrate, db]
