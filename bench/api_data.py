"""A2 and A3: the REST API's batch endpoint and its job list, against a real ``pgsched api --dev``
process (see ``bench.api``), each with the library or the raw query as its ceiling in the same run.

A2: ``POST /api/v1/jobs/batch`` with 1,000 jobs a request, one client, against
``app.enqueue_many`` of the same 1,000 jobs (issue 21: at least 0.5 x the library).

A3: ``GET /api/v1/jobs`` with 2,000,000 jobs present (seeded in SQL with generate_series: 50
owners, newest ids spread over them), first page and a deep cursor page (30,000 of the owner's
jobs further down), as a member and as an admin; the ceiling is the same page query sent by
psycopg as the API's role (issue 21: p50 under 20 ms). The plans are printed.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import httpx
import psycopg

import pgsched
from pgsched import accounts
from pgsched.db import configure_adapters, run

from . import report
from .api import _serve
from .enqueue import empty_jobs, make_app
from .report import Row, Stats

BATCH = 1_000
BATCHES = 20
SEED_JOBS = 2_000_000
OWNERS = 50
DEEP = 30_000  # how far down the owner's jobs the deep page starts
PAGE_REQUESTS = 50
ACT_AS = "SELECT set_config('pgsched.owner', %s, true), set_config('pgsched.role', %s, true)"


def _batch_body(batch: int) -> dict[str, Any]:
    return {"jobs": [{"task": "noop", "args": {"i": batch * BATCH + i}} for i in range(BATCH)]}


def a2(dsn: str, runs: int) -> list[Row]:
    app = make_app(dsn)
    process, base, token = _serve(dsn)
    api_rates: list[float] = []
    library_rates: list[float] = []
    bodies = [_batch_body(b) for b in range(BATCHES)]
    specs = [[pgsched.JobSpec(task=j["task"], args=j["args"]) for j in body["jobs"]] for body in bodies]
    try:
        with (
            app,
            psycopg.connect(dsn, autocommit=True) as conn,
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
        ):
            http.post("/api/v1/jobs/batch", json=bodies[0]).raise_for_status()  # warm up
            for run_number in range(runs):
                sides = ["api", "library"] if run_number % 2 == 0 else ["library", "api"]
                for side in sides:
                    empty_jobs(conn)
                    start = time.perf_counter()
                    for b in range(BATCHES):
                        if side == "api":
                            response = http.post("/api/v1/jobs/batch", json=bodies[b])
                            assert response.status_code == 201, response.text
                        else:
                            app.enqueue_many(specs[b])
                    rate = BATCH * BATCHES / (time.perf_counter() - start)
                    (api_rates if side == "api" else library_rates).append(rate)
    finally:
        process.terminate()
        process.wait(timeout=30)
    what = f"POST /api/v1/jobs/batch, {BATCHES} requests of {BATCH:,} jobs; ceiling: app.enqueue_many"
    return [Row("A2", what, Stats(api_rates), "jobs/s", ">= 0.5 x ceiling", Stats(library_rates))]


def _seed(conn: psycopg.Connection[Any]) -> None:
    """2,000,000 jobs in one statement: owners round-robin, a tenth finished, a tenth scheduled."""
    conn.execute(
        """
        INSERT INTO pgsched.jobs (task, owner, state, run_at, finished_at)
        SELECT 'noop', 'user' || (g %% %(owners)s),
               CASE WHEN g %% 10 = 0 THEN 'succeeded' WHEN g %% 10 = 1 THEN 'scheduled' ELSE 'queued' END,
               CASE WHEN g %% 10 = 1 THEN now() + interval '1 day' ELSE now() END,
               CASE WHEN g %% 10 = 0 THEN now() END
        FROM generate_series(1, %(jobs)s) g
        """,
        {"owners": OWNERS, "jobs": SEED_JOBS},
    )
    conn.execute("VACUUM ANALYZE pgsched.jobs")


def _member_token(conn: psycopg.Connection[Any], username: str) -> str:
    configure_adapters(conn.adapters)
    audit = accounts.Audit(actor="bench")
    user = run(conn, accounts.op_create_user(audit, username, "member"))
    return run(conn, accounts.op_create_token(audit, user, "bench"))[1]


def _page_p50(base: str, token: str, cursor: int | None) -> float:
    params = {"cursor": str(cursor)} if cursor is not None else {}
    latencies = []
    # A client per case: uvicorn closes a keep-alive connection left idle for 5 s.
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        http.get("/api/v1/jobs", params=params)  # connect, and warm the route's statement
        for _ in range(PAGE_REQUESTS):
            start = time.perf_counter()
            response = http.get("/api/v1/jobs", params=params)
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200 and len(response.json()["jobs"]) == 50, response.text
    return statistics.median(latencies) * 1000


def _query_p50(api: psycopg.Connection[Any], owner: str | None, role: str, cursor: int | None) -> tuple[float, str]:
    """The route's page query from psycopg as the API's role: p50 ms, and its plan."""
    from api import queries

    params = dict.fromkeys(queries.LIST_FILTERS)
    params.update(owner=owner, before=cursor, limit=51)
    sql = queries.list_jobs(params)
    latencies = []
    for _ in range(PAGE_REQUESTS):
        start = time.perf_counter()
        with api.transaction():
            api.execute(ACT_AS, (owner or "root", role))
            api.execute(queries.WALK_THE_INDEX)
            assert len(api.execute(sql, params).fetchall()) == 51
        latencies.append(time.perf_counter() - start)
    with api.transaction():
        api.execute(ACT_AS, (owner or "root", role))
        api.execute(queries.WALK_THE_INDEX)
        plan = "\n".join(row[0] for row in api.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall())
    return statistics.median(latencies) * 1000, plan


def a3(dsn: str, runs: int) -> list[Row]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        print(f"A3: seeding {SEED_JOBS:,} jobs ...", flush=True, file=sys.stderr)
        _seed(conn)
        member_token = _member_token(conn, "user7")
        (deep,) = conn.execute(
            "SELECT id FROM pgsched.jobs WHERE owner = 'user7' ORDER BY id DESC OFFSET %s LIMIT 1", (DEEP,)
        ).fetchone()  # type: ignore[misc]
        (deep_all,) = conn.execute(
            "SELECT id FROM pgsched.jobs ORDER BY id DESC OFFSET %s LIMIT 1", (DEEP * OWNERS,)
        ).fetchone()  # type: ignore[misc]
    process, base, admin_token = _serve(dsn)
    cases = [
        ("member, first page", member_token, "user7", "member", None),
        (f"member, deep page ({DEEP:,} of the owner's jobs down)", member_token, "user7", "member", deep),
        ("admin, first page", admin_token, None, "admin", None),
        (f"admin, deep page ({DEEP * OWNERS:,} jobs down)", admin_token, None, "admin", deep_all),
    ]
    figures: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, *_ in cases}
    plans: dict[str, str] = {}
    try:
        with psycopg.connect(dsn) as api:
            api.execute("SET ROLE pgsched_api")
            api.commit()
            for _ in range(runs):
                for name, token, owner, role, cursor in cases:
                    figures[name][0].append(_page_p50(base, token, cursor))
                    p50, plans[name] = _query_p50(api, owner, role, cursor)
                    figures[name][1].append(p50)
    finally:
        process.terminate()
        process.wait(timeout=30)
    for name, plan in plans.items():
        report.sections.append((f"A3 plan: {name}", f"```\n{plan}\n```"))
    return [
        Row("A3", f"GET /api/v1/jobs p50, {SEED_JOBS:,} jobs, {name}; ceiling: the page query from psycopg",
            Stats(api), "ms", "< 20 ms", Stats(sql), digits=1)
        for name, (api, sql) in figures.items()
    ]  # fmt: skip


WORKLOADS = {"A2": a2, "A3": a3}
