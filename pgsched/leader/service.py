"""The shape every leader service shares.

Each service has one shape: ``run_once(conn, now=None)`` does one pass (in
batches, each its own transaction that starts by taking the leader lock for
that transaction) and returns a small ``Pass`` of what it did; tests call it
directly with a test clock (``now`` becomes ``pgsched.clock_offset`` for the
pass). ``pgsched.leader.loop`` runs the services on their intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from .. import queries

LEADER_KEY = 7451983510446851073  # "maintenance leader"
BATCH = 1000


@dataclass
class Pass:
    """What one pass of a service did."""

    service: str
    leader: bool = False
    done: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(self.done.values())


class Service:
    """A leader service: override ``name``, ``interval`` and ``steps``."""

    name = "service"
    interval = 1.0
    use_lock = True
    # How long a pass may sit idle in its transaction (its process frozen) before the server ends
    # it and its lock goes to another scheduler; ``default_services`` sets the lease length.
    stall_seconds = 30.0

    async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
        """One batch of work inside the pass's transaction; what it did (0s when nothing is left)."""
        raise NotImplementedError

    def lost_leadership(self) -> None:
        """The loop lost its connection (and with it any lead it held); a service that waits after
        it starts leading (the rescuer) starts waiting again."""

    async def run_once(self, conn: psycopg.AsyncConnection[Any], now: datetime | None = None) -> Pass:
        """One pass: batches, each in its own short transaction, until a batch finds nothing to do."""
        result = Pass(self.name)
        for _ in range(1000):  # a pass is bounded: leftovers wait for the next one
            async with conn.transaction():
                if now is not None:
                    await conn.execute(queries.SET_CLOCK, (now,))
                stall_ms = str(round(self.stall_seconds * 1000))
                row = await (await conn.execute(queries.LEAD_PASS, (self.use_lock, LEADER_KEY, stall_ms))).fetchone()
                assert row is not None
                leader, db_now, _ = row
                if not leader:
                    return result
                result.leader = True
                done = await self.steps(conn, db_now)
            for key, value in done.items():
                result.done[key] = result.done.get(key, 0) + value
            if not any(v >= BATCH for v in done.values()):
                break
        return result


async def scalar(conn: psycopg.AsyncConnection[Any], sql: str, *params: Any) -> int:
    """The one integer a statement returns (0 for NULL or no row)."""
    row = await (await conn.execute(sql, params)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0
