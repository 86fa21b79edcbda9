"""A2: SSE fan-out. 500 clients hold ``GET /api/v1/events`` open on one real ``pgsched api`` process
(``--dev``); one job changes state (a queued job cancelled in the database); the time from that
statement to the moment each client has the event. Issue 21 asks for the figure, sets no target.

The clients run in this process's event loop, on the same 2 cores as the server and PostgreSQL:
the last client's time includes the client side's own scheduling of 500 readers."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable

import httpx
import psycopg

from .api import _serve
from .report import Row, Stats

CLIENTS = 500
QUEUE = "fanout"
DEADLINE_SECONDS = 60.0


async def _measure(base: str, token: str, dsn: str, runs: int) -> list[list[float]]:
    """Per run, every client's delay in ms (from the UPDATE's start to the event's arrival)."""
    arrivals: list[dict[int, float]] = [{} for _ in range(CLIENTS)]
    subscribed = 0
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS + 10)
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=DEADLINE_SECONDS) as http,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        cursor = await conn.execute(
            "INSERT INTO pgsched.jobs (task, queue) SELECT 'noop', %s FROM generate_series(1, %s) RETURNING id",
            (QUEUE, runs),
        )
        job_ids = [row[0] for row in await cursor.fetchall()]

        async def client(c: int) -> None:
            nonlocal subscribed
            async with http.stream("GET", "/api/v1/events", params={"queue": QUEUE, "max_seconds": 3600}) as r:
                async for line in r.aiter_lines():
                    if line == ": subscribed":
                        subscribed += 1
                    elif line.startswith("data:"):
                        arrivals[c].setdefault(json.loads(line[5:])["id"], time.perf_counter())

        readers = [asyncio.create_task(client(c)) for c in range(CLIENTS)]
        try:
            await _until(lambda: subscribed == CLIENTS, "every client subscribed")
            delays = []
            for job_id in job_ids:
                start = time.perf_counter()
                await conn.execute(
                    "UPDATE pgsched.jobs SET state = 'cancelled', finished_at = now() WHERE id = %s", (job_id,)
                )
                await _until(lambda: all(job_id in a for a in arrivals), f"job {job_id} everywhere")  # noqa: B023
                delays.append([(a[job_id] - start) * 1000 for a in arrivals])
            return delays
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"A2: timed out waiting for {what}")
        await asyncio.sleep(0.001)


def a2(dsn: str, runs: int) -> list[Row]:
    process, base, token = _serve(dsn)
    try:
        delays = asyncio.run(_measure(base, token, dsn, runs))
    finally:
        process.terminate()
        process.wait(timeout=30)
    what = f"SSE fan-out, {CLIENTS} clients on one process, one job change:"
    figures: dict[str, Callable[[list[float]], float]] = {
        "first client has it": min,
        "half the clients have it": statistics.median,
        "last client has it": max,
    }
    return [
        Row("A2", f"{what} {who}", Stats([pick(d) for d in delays]), "ms", "-", digits=1)
        for who, pick in figures.items()
    ]


WORKLOADS = {"A2": a2}
