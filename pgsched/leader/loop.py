"""The loop that runs the leader services (``pgsched scheduler``, and every worker by default).

``Maintenance.run`` runs every service on its jittered interval, survives
database errors, reconnects, and logs only when something happened.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import psycopg

from ..db import configure_adapters
from .materializer import Materializer
from .promoter import Promoter
from .pruner import Pruner
from .rescuer import Rescuer
from .service import Service

# The name it has always logged under, which users' logging configurations select.
log = logging.getLogger("pgsched.maintenance")


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
                    s.lost_leadership()
                if conn is not None:
                    await conn.close()
                conn = None
                continue
            if not result.leader:
                log.debug("%s: another process leads this pass", service.name)
            elif result.changed:
                log.info("%s: %s", service.name, ", ".join(f"{k} {v}" for k, v in result.done.items() if v))
        if conn is not None:
            await conn.close()


def default_services(lease_seconds: float) -> list[Service]:
    """The services every scheduler runs; a pass frozen for a lease loses its lock (``stall_seconds``)."""
    services: list[Service] = [Materializer(), Promoter(), Rescuer(lease_seconds), Pruner()]
    for service in services:
        service.stall_seconds = lease_seconds
    return services
