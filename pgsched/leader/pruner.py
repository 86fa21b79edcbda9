"""The pruner: deletes what retention no longer keeps, and creates the coming history partitions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from .. import queries
from .service import BATCH, Service, scalar


class Pruner(Service):
    """Deletes finished jobs past retention, old history partitions and dead workers; creates
    the history partitions of the coming days."""

    name = "pruner"
    interval = 60.0

    async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
        return {
            "jobs": await scalar(conn, queries.PRUNE_JOBS, BATCH),
            "history": await scalar(conn, queries.PRUNE_HISTORY, BATCH),
            "workers": await scalar(conn, queries.PRUNE_WORKERS),
            "partitions": await scalar(conn, queries.ENSURE_HISTORY_PARTITIONS),
        }
