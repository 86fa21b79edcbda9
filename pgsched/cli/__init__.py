"""The ``pgsched`` command line. Tables for people, ``--json`` for programs.

Every option that is a setting comes from ``config.Settings`` (flag and
``PGSCHED_*`` variable derived from the field). Errors exit non-zero with one
line on stderr.

This module holds the ``pgsched`` group (``main``, the console script) and
registers the commands; each command group lives in its own module and lists
what it adds in ``COMMANDS``:

- ``run``: ``up``, ``worker``, ``scheduler``;
- ``jobs``: ``enqueue``, ``jobs ...``;
- ``workers``: ``workers``;
- ``queues``: ``queues ...``;
- ``schedules``: ``schedules ...``;
- ``db``: ``migrate``, ``db ...``;
- ``keys``: ``keys ...``;
- ``api``: ``api``, ``users create``, ``tokens create``.

Their shared parts: ``options`` (settings flags, ``--json``, loading the app,
connecting), ``output`` (tables and JSON) and ``serve_api`` (the REST API in
development mode, for ``api --dev`` and ``up``). A command module imports those,
never this module nor another command module (import-linter checks it).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import click
import psycopg

from ..db import too_many_connections
from ..errors import TOO_MANY_CONNECTIONS, PermissionDenied, PgschedError
from . import api, db, jobs, keys, queues, run, schedules, workers


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
            if too_many_connections(exc):
                raise click.ClickException(TOO_MANY_CONNECTIONS) from None
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
@click.pass_context
def main(ctx: click.Context) -> None:
    """pgsched: a distributed task scheduler whose whole state lives in PostgreSQL."""
    warnings.showwarning = _show_warning
    # Names this process's sessions in pg_stat_activity ("pgsched worker"), for operators and for
    # `db stop`, which counts them; an application_name in the DSN wins.
    os.environ.setdefault("PGAPPNAME", f"pgsched {ctx.invoked_subcommand}")


for module in (api, db, jobs, keys, queues, run, schedules, workers):
    for command in module.COMMANDS:
        main.add_command(command)
