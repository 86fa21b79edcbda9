"""A1: ``POST /api/v1/jobs`` from 50 concurrent keep-alive clients over loopback, against a real
``pgsched api`` process (``--dev``: the server's superuser drops to pgsched_api, so row-level
security applies), and its ceiling in the same run: ``app.enqueue`` from 50 threads. Issue 21's
target: at least 0.6 times the library's figure, p99 under 25 ms."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

import pgsched

from . import report
from .enqueue import empty_jobs, make_app
from .report import Row, Stats

CLIENTS = 50
REQUESTS = 2_000


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(dsn: str) -> tuple[subprocess.Popen[bytes], str, str]:
    port = _port()
    out = Path(tempfile.mkdtemp(prefix="pgsb-api-")) / "api.log"
    env = {**os.environ, "PGSCHED_DSN": dsn, "PGSCHED_LOG_LEVEL": "warning"}
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "pgsched", "api", "--dev", "--port", str(port)], env=env, stdout=sink, stderr=sink
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        found = re.search(r"dev token \(shown once\): (\S+)", out.read_text())
        if found:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    return process, base, found.group(1)
            except httpx.TransportError:
                pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pgsched api did not start: {out.read_text()[-500:]}")
        time.sleep(0.1)


# Requests sent again because the server had closed their keep-alive connection (uvicorn closes
# one idle for 5 s; on a loaded machine a client task can wait that long for its turn).
resent = 0


async def _post(http: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    global resent
    try:
        return await http.post("/api/v1/jobs", json=body)
    except (httpx.ReadError, httpx.RemoteProtocolError):
        resent += 1
        return await http.post("/api/v1/jobs", json=body)


async def _post_all(base: str, token: str, n: int) -> list[float]:
    latencies: list[float] = []
    per_client = n // CLIENTS
    headers = {"Authorization": f"Bearer {token}"}

    async def client(c: int) -> None:
        # A client of its own per simulated client (one keep-alive connection each): 50 tasks
        # sharing one httpx pool measured httpx's pool (about half the rate, p99 in seconds).
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
            for i in range(per_client):
                start = time.perf_counter()
                response = await _post(http, {"task": "noop", "args": {"i": c * per_client + i}})
                latencies.append(time.perf_counter() - start)
                assert response.status_code == 201, response.text

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return latencies


def _library(app: pgsched.App, n: int) -> float:
    per_thread = n // CLIENTS

    def work(t: int) -> None:
        for i in range(per_thread):
            app.enqueue("noop", {"i": t * per_thread + i})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(CLIENTS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return n / (time.perf_counter() - start)


def a1(dsn: str, runs: int) -> list[Row]:
    import psycopg

    app = make_app(dsn)
    process, base, token = _serve(dsn)
    api_rates: list[float] = []
    p50s: list[float] = []
    p99s: list[float] = []
    library_rates: list[float] = []
    try:
        with app, psycopg.connect(dsn, autocommit=True) as conn:
            asyncio.run(_post_all(base, token, CLIENTS * 4))  # warm both sides' pools
            for _ in range(runs):
                empty_jobs(conn)
                start = time.perf_counter()
                latencies = sorted(asyncio.run(_post_all(base, token, REQUESTS)))
                api_rates.append(REQUESTS / (time.perf_counter() - start))
                p50s.append(statistics.median(latencies) * 1000)
                p99s.append(latencies[int(len(latencies) * 0.99) - 1] * 1000)
                empty_jobs(conn)
                library_rates.append(_library(app, REQUESTS))
    finally:
        process.terminate()
        process.wait(timeout=30)
    if resent:
        report.sections.append(("A1", f"{resent} request(s) resent after the server closed an idle connection"))
    return [
        Row("A1", f"POST /api/v1/jobs, {CLIENTS} clients; ceiling: app.enqueue from {CLIENTS} threads",
            Stats(api_rates), "jobs/s", ">= 0.6 x ceiling", Stats(library_rates)),
        Row("A1", "POST /api/v1/jobs latency p50", Stats(p50s), "ms", "-", digits=1),
        Row("A1", "POST /api/v1/jobs latency p99", Stats(p99s), "ms", "< 25 ms", digits=1),
    ]  # fmt: skip


WORKLOADS = {"A1": a1}
