"""``pgsched keys ...``: the keys of encrypted payloads; generating one, rotating to it."""

from __future__ import annotations

import click

from .. import crypto, rotation
from ..config import Settings
from .options import JSON_FLAG, connect, with_settings
from .output import print_json


@click.group("keys")
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


# What pgsched.cli registers on the `pgsched` group.
COMMANDS = [keys]
