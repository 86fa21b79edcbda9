"""A4: SSE fan-out. 500 clients hold ``GET /api/v1/events`` open on one real ``pgsched api`` process
(``--dev``); one job changes state (a queued job cancelled in the database); the time from that
statement to the moment each client has the event. Issue 21 asks for the figure, sets no target.

The clients run in this process's event loop, on the same 2 cores as the server and PostgreSQL:
the last client's time includes the client side's own scheduling of 500 readers."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import psycopg

from .api import _serve
from .report import Row, Stats

CLIENTS = 500
QUEUE = "fanout"
DEADLINE_SECONDS = 60.0


async def _measure(base: str, token: str, dsn: str, runs: int) -> list[list[float]]:
    """Per run, every client's delay in ms (from the UPDATE's start to the event's arrival)."""
    host, port = base.removeprefix("http://").split(":")
    request = (
        f"GET /api/v1/events?queue={QUEUE}&max_seconds=3600 HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    subscribed = asyncio.Semaphore(0)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            "INSERT INTO pgsched.jobs (task, queue) SELECT 'noop', %s FROM generate_series(1, %s) RETURNING id",
            (QUEUE, runs),
        )
        job_ids = [row[0] for row in await cursor.fetchall()]
        arrivals: dict[int, list[float]] = {job_id: [] for job_id in job_ids}
        everywhere = {job_id: asyncio.Event() for job_id in job_ids}

        async def client() -> None:
            # A bare HTTP/1.1 reader, lighter than an HTTP client: the figure is the server's.
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            seen = b""
            while b": subscribed" not in seen:
                seen += await reader.read(65536)
            subscribed.release()
            for job_id in job_ids:
                marker = b'"id":%d,' % job_id
                while marker not in seen:
                    seen = seen[-100:] + await reader.read(65536)
                arrivals[job_id].append(time.perf_counter())
                if len(arrivals[job_id]) == CLIENTS:
                    everywhere[job_id].set()
            writer.close()

        readers = [asyncio.create_task(client()) for _ in range(CLIENTS)]
        try:
            async with asyncio.timeout(DEADLINE_SECONDS):
                for _ in range(CLIENTS):
                    await subscribed.acquire()
            delays = []
            for job_id in job_ids:
                start = time.perf_counter()
                await conn.execute(
                    "UPDATE pgsched.jobs SET state = 'cancelled', finished_at = now() WHERE id = %s", (job_id,)
                )
                async with asyncio.timeout(DEADLINE_SECONDS):
                    await everywhere[job_id].wait()
                delays.append([(arrival - start) * 1000 for arrival in arrivals[job_id]])
            return delays
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


def a4(dsn: str, runs: int) -> list[Row]:
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
        Row("A4", f"{what} {who}", Stats([pick(d) for d in delays]), "ms", "-", digits=1)
        for who, pick in figures.items()
    ]


WORKLOADS = {"A4": a4}
