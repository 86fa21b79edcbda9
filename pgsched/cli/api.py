"""``pgsched api`` (the REST API under uvicorn), and ``pgsched users create|set-password`` and
``pgsched tokens create`` to bootstrap its access from the command line."""

from __future__ import annotations

import importlib
import sys

import click
import psycopg

from .. import accounts, migrations, passwords
from ..config import Settings, replace_settings
from ..db import configure_adapters, resolve_dsn, run
from ..extras import require
from .options import connect, with_settings
from .serve_api import STREAMS_CUT_AFTER_SECONDS, cli_audit, dev_token


@click.group()
def users() -> None:
    """Users of the REST API."""


@users.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Make the user an admin (same as --role admin).")
@click.option("--role", type=click.Choice(accounts.ROLES), default="member", show_default=True, help="The user's role.")
@click.option("--may-create-commands", is_flag=True, help="Allow the user to create shell and http jobs.")
@with_settings()
def create_user(settings: Settings, name: str, admin: bool, role: str, may_create_commands: bool) -> None:
    """Create a user NAME (the owner of the jobs it creates)."""
    with connect(settings) as conn, conn.transaction():
        user = run(
            conn, accounts.op_create_user(cli_audit(conn), name, "admin" if admin else role, may_create_commands)
        )
    click.echo(f"created user {user.username!r} ({user.role}); give it a token: pgsched tokens create {user.username}")


@users.command("set-password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@with_settings()
def set_password(settings: Settings, name: str, password_stdin: bool) -> None:
    """Set the password NAME signs in with (asked twice, or read from stdin); its sessions end."""
    require("argon2", "api", "pgsched users set-password")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    new_hash = passwords.hash_password(password)  # the length rule first: nothing is written otherwise
    with connect(settings) as conn, conn.transaction():
        user = run(conn, accounts.op_user(name))
        run(conn, passwords.op_set_password(cli_audit(conn), user.id, new_hash))
    click.echo(f"password of {user.username!r} set")


@click.group()
def tokens() -> None:
    """API tokens."""


@tokens.command("create")
@click.argument("user")
@click.option("--name", default="cli", show_default=True, help="What the token is for.")
@with_settings()
def create_token(settings: Settings, user: str, name: str) -> None:
    """Create an API token for USER and print it (only this once: only its hash is stored)."""
    with connect(settings) as conn, conn.transaction():
        _, secret = run(conn, accounts.op_create_token(cli_audit(conn), run(conn, accounts.op_user(user)), name))
    click.echo(secret)


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--dev",
    is_flag=True,
    help="Development: start with no admin (creates one and prints a one-time token), and accept a database "
    "login that bypasses row-level security (dropping to pgsched_api).",
)
@click.option(
    "--tls-cert", type=click.Path(exists=True, dir_okay=False), help="Serve HTTPS with this certificate (PEM)."
)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="The certificate's private key (PEM).")
# Every sign-in setting but the OIDC client secret, which a flag would show to `ps`: its variable only.
@with_settings(
    "api_dsn",
    "encryption_keys",
    "session_idle_seconds",
    "session_lifetime_seconds",
    "oidc_discovery_url",
    "oidc_client_id",
    "oidc_redirect_url",
    "oidc_scopes",
    "oidc_username_claim",
    "oidc_role_claim",
    "oidc_roles",
    "oidc_default_role",
    "oidc_landing_path",
)
def api(settings: Settings, host: str, port: int, dev: bool, tls_cert: str | None, tls_key: str | None) -> None:
    """Serve the REST API (/api/v1, docs at /api/v1/docs) with uvicorn."""
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    uvicorn = require("uvicorn", "api", "pgsched api")
    require("litestar", "api", "pgsched api")
    dsn = resolve_dsn(settings, stop_on_exit=True)
    settings = replace_settings(settings, dsn=dsn)
    token = None
    with psycopg.connect(settings.api_dsn or dsn, autocommit=True) as conn:
        configure_adapters(conn.adapters)
        migrations.check(conn)
        has_admin = run(conn, accounts.op_any_admin())
    if dev:
        token = dev_token(dsn)
    elif not has_admin:
        raise click.ClickException(
            "no admin user: create one with `pgsched users create --admin NAME` and give it a token with "
            "`pgsched tokens create NAME`, or start with --dev"
        )
    app = importlib.import_module("pgsched.api").create_app(settings, dev=dev)
    base = f"{'https' if tls_cert else 'http'}://{host}:{port}/api/v1"
    click.echo(f"pgsched api on {base} (docs: {base}/docs)")
    if token:
        click.echo(f"  dev token (shown once): {token}")
    sys.stdout.flush()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        server_header=False,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        timeout_graceful_shutdown=STREAMS_CUT_AFTER_SECONDS,
    )


COMMANDS = [api, users, tokens]
