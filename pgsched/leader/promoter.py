"""The promoter: ``scheduled`` jobs whose ``run_at`` passed become ``queued``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from .. import queries
from .service import BATCH, Service, scalar


class Promoter(Service):
    """``scheduled`` jobs whose ``run_at`` passed become ``queued``."""

    name = "promoter"
    interval = 0.5

    async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
        return {"promoted": await scalar(conn, queries.PROMOTE, BATCH)}
