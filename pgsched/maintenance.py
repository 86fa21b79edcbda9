"""The maintenance services and the loop that runs them (``pgsched scheduler``).

Leadership, in prose (as River writes it before the code): every pass of
every service is a short transaction that begins with
``pg_try_advisory_xact_lock(LEADER_KEY)``. Whoever gets the lock leads that
pass; the others skip it. The lock is transaction-scoped, so it works behind
a transaction-mode pooler and vanishes the moment a leader's connection
drops: another process leads the next pass. A leader frozen mid-pass (SIGSTOP,
a stalled VM) would keep its connection and so the lock; each pass therefore
sets ``idle_in_transaction_session_timeout`` to one lease for its own
transaction, and the server ends a pass idle that long, releasing the lock for
the others (the thawed process reconnects). Correctness never rests on the
lock: every statement a service runs is idempotent and fenced on the state it
expects (``sql/0002_scheduler.sql``), and schedule slots are unique, so two
leaders at once waste work and never duplicate it.

Each service has one shape: ``run_once(conn, now=None)`` does one pass (in
batches, each its own transaction) and returns a small ``Pass`` of what it
did; tests call it directly with a test clock (``now`` becomes
``pgsched.clock_offset`` for the pass). ``Maintenance.run`` runs every service
on its jittered interval, survives database errors, reconnects, and logs
only when something happened.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from .db import configure_adapters

log = logging.getLogger("pgsched.maintenance")

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
    """A maintenance service: override ``name``, ``interval`` and ``steps``."""

    name = "service"
    interval = 1.0
    use_lock = True
    # How long a pass may sit idle in its transaction (its process frozen) before the server ends
    # it and its lock goes to another scheduler; ``default_services`` sets the lease length.
    stall_seconds = 30.0

    async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
        """One batch of work inside the pass's transaction; what it did (0s when nothing is left)."""
        raise NotImplementedError

    async def run_once(self, conn: psycopg.AsyncConnection[Any], now: datetime | None = None) -> Pass:
        """One pass: batches, each in its own short transaction, until a batch finds nothing to do."""
        result = Pass(self.name)
        for _ in range(1000):  # a pass is bounded: leftovers wait for the next one
            async with conn.transaction():
                if now is not None:
                    await conn.execute("SELECT set_config('pgsched.clock_offset', (%s - now())::text, true)", (now,))
                stall_ms = str(round(self.stall_seconds * 1000))
                row = await (await conn.execute(LEAD, (self.use_lock, LEADER_KEY, stall_ms))).fetchone()
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


# Lead this pass (or, with the lock disabled for tests, always lead), and let the server end this
# transaction if it sits idle longer than the stall timeout (milliseconds; SET LOCAL, pooler-safe).
LEAD = """SELECT NOT %s OR pg_try_advisory_xact_lock(%s), pgsched.now(),
                 set_config('idle_in_transaction_session_timeout', %s, true)"""


async def _scalar(conn: psycopg.AsyncConnection[Any], sql: str, *params: Any) -> int:
    row = await (await conn.execute(sql, params)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


class Promoter(Service):
    """``scheduled`` jobs whose ``run_at`` passed become ``queued``."""

    name = "promoter"
    interval = 0.5

    async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
        return {"promoted": await _scalar(conn, "SELECT pgsched.promote(%s)", BATCH)}


class Rescuer(Service):
    """``running`` jobs whose lease expired go back to ``queued`` (or ``failed``).

    After gaining leadership (or reconnecting) it waits one lease length before
    rescuing anything: after a database restart the workers' heartbeats need
    that long to come back, and their jobs are not lost, only unrefreshed.
    """

    name = "rescuer"
    interval = 2.0

    def __init__(self, lease_seconds: float = 30.0) -> None:
        self.lease_seconds = lease_seconds
        self.leading_since: datetime | None = None

    def lost_leadership(self) -> None:
        self.leading_since = None

    async def run_once(self, conn: psycopg.AsyncConnection[Any], now: datetime | None = None) -> Pass:
        result = await super().run_once(conn, now)
        if not result.leader:
            self.lost_leadership()
        return result

    async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
        if self.leading_since is None:
            self.leading_since = db_now
        if (db_now - self.leading_since).total_seconds() < self.lease_seconds:
            return {"rescued": 0}
        return {"rescued": await _scalar(conn, "SELECT pgsched.rescue(%s)", BATCH)}


class Pruner(Service):
    """Deletes finished jobs past retention, old history partitions and dead workers; creates
    the history partitions of the coming days."""

    name = "pruner"
    interval = 60.0

    async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
        return {
            "jobs": await _scalar(conn, "SELECT pgsched.prune_jobs(%s)", BATCH),
            "history": await _scalar(conn, "SELECT pgsched.prune_history(%s)", BATCH),
            "workers": await _scalar(conn, "SELECT pgsched.prune_workers()"),
            "partitions": await _scalar(conn, "SELECT pgsched.ensure_history_partitions(7)"),
        }


class Maintenance:
    """Runs the services until stopped; one connection, reconnected after errors."""

    def __init__(self, dsn: str, services: list[Service]) -> None:
        self.dsn = dsn
        self.services = services
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # A staggered first run, so processes started together do not all pass at once.
        due = {s.name: loop.time() + random.uniform(0, 0.2) for s in self.services}
        conn: psycopg.AsyncConnection[Any] | None = None
        while not self._stopping.is_set():
            service = min(self.services, key=lambda s: due[s.name])
            delay = due[service.name] - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                    break
                except TimeoutError:
                    pass
            due[service.name] = loop.time() + service.interval * random.uniform(0.8, 1.2)
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                    configure_adapters(conn.adapters)
                result = await service.run_once(conn)
            except psycopg.Error as exc:
                log.warning("%s pass failed (will reconnect and retry): %s", service.name, exc)
                for s in self.services:
                    if isinstance(s, Rescuer):
                        s.lost_leadership()
                if conn is not None:
                    await conn.close()
                conn = None
                continue
            if result.changed:
                log.info("%s: %s", service.name, ", ".join(f"{k} {v}" for k, v in result.done.items() if v))
        if conn is not None:
            await conn.close()


def default_services(lease_seconds: float) -> list[Service]:
    """The services every scheduler runs."""
    from .materializer import Materializer

    services: list[Service] = [Materializer(), Promoter(), Rescuer(lease_seconds), Pruner()]
    for service in services:
        service.stall_seconds = lease_seconds
    return services
