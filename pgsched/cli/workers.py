"""``pgsched workers``: the registered workers, and which are stale."""

from __future__ import annotations

import click
import psycopg

from .. import queries
from ..config import Settings
from ..display import duration
from .options import JSON_FLAG, connect, with_settings
from .output import print_json, print_table, short_id


@click.command("workers")
@JSON_FLAG
@with_settings()
def workers(settings: Settings, as_json: bool) -> None:
    """Registered workers (the pgsched.worker_status view). STALE: its lease has passed (the process died
    or stalled; its running jobs are rescued, and the row is pruned ten minutes later)."""
    with connect(settings) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        rows = cur.execute(queries.WORKERS).fetchall()
    if as_json:
        print_json(rows)
        return
    headers = ("id", "host", "pid", "queues", "concurrency", "running", "last_heartbeat", "stale")
    print_table(
        [
            [
                short_id(r["id"]),
                r["host"],
                r["pid"],
                ",".join(r["queues"]),
                r["concurrency"],
                r["running"],
                f"{duration(r['heartbeat_age_seconds'])} ago",
                "stale" if r["stale"] else "",
            ]
            for r in rows
        ],
        headers,
    )


# What pgsched.cli registers on the `pgsched` group.
COMMANDS = [workers]
