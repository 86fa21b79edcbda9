"""The rescuer: ``running`` jobs whose worker's lease expired go back to ``queued`` (or ``failed``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from .. import queries
from .service import BATCH, Service, scalar


class Rescuer(Service):
    """``running`` jobs whose lease expired go back to ``queued`` (or ``failed``).

    After it first leads on a connection (and after every reconnection) it waits
    one lease length before rescuing anything: after a database restart the
    workers' heartbeats need that long to come back, and their jobs are not
    lost, only unrefreshed. A pass led by another process does not restart that
    wait: leadership is per pass, and with every worker contending some passes
    always go elsewhere, so a wait restarted by each of them might never end.
    """

    name = "rescuer"
    interval = 2.0

    def __init__(self, lease_seconds: float = 30.0) -> None:
        self.lease_seconds = lease_seconds
        self.leading_since: datetime | None = None

    def lost_leadership(self) -> None:
        """The connection was lost: wait one lease again before the next rescue."""
        self.leading_since = None

    async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
        if self.leading_since is None:
            self.leading_since = db_now
        if (db_now - self.leading_since).total_seconds() < self.lease_seconds:
            return {"rescued": 0}
        return {"rescued": await scalar(conn, queries.RESCUE, BATCH)}
