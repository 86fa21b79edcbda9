"""The API's data layer (sql/0014): row-level security on runs and run_logs, checked with SQL
straight from the API's login, and the plans of a member's job list (first and deep page)."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from api import queries

pytestmark = pytest.mark.db

ACT_AS = "SELECT set_config('pgsched.owner', %s, true), set_config('pgsched.role', %s, true)"


def test_runs_and_run_logs_show_only_the_jobs_the_api_user_may_see(
    api_dsn: str, tokens: Any, app: Any, conn: psycopg.Connection[Any]
) -> None:
    jobs = {owner: app.enqueue("noop", owner=owner).id for owner in ("alice", "bob")}
    for owner, job_id in jobs.items():
        conn.execute(
            "INSERT INTO pgsched.runs (job_id, attempt, queue, task, owner, outcome, started_at, finished_at)"
            " VALUES (%s, 1, 'default', 'noop', %s, 'succeeded', now(), now())",
            (job_id, owner),
        )
        conn.execute("INSERT INTO pgsched.run_logs (job_id, attempt, message) VALUES (%s, 1, %s)", (job_id, owner))
    with psycopg.connect(api_dsn) as api:
        # No owner set: nothing.
        assert api.execute("SELECT count(*) FROM pgsched.runs").fetchone() == (0,)
        assert api.execute("SELECT count(*) FROM pgsched.run_logs").fetchone() == (0,)
        api.rollback()
        for role in ("member", "viewer"):
            api.execute(ACT_AS, ("bob", role))
            assert api.execute("SELECT job_id, owner FROM pgsched.runs").fetchall() == [(jobs["bob"], "bob")]
            assert api.execute("SELECT job_id, message FROM pgsched.run_logs").fetchall() == [(jobs["bob"], "bob")]
            # Asked for by id, alice's rows are not there either.
            assert api.execute("SELECT count(*) FROM pgsched.runs WHERE job_id = %s", (jobs["alice"],)).fetchone() == (
                0,
            )
            assert api.execute(
                "SELECT count(*) FROM pgsched.run_logs WHERE job_id = %s", (jobs["alice"],)
            ).fetchone() == (0,)
            api.rollback()
        api.execute(ACT_AS, ("ops", "operator"))
        assert api.execute("SELECT count(*) FROM pgsched.runs").fetchone() == (2,)
        assert api.execute("SELECT count(*) FROM pgsched.run_logs").fetchone() == (2,)
        api.rollback()
        # The history stays the worker's to write.
        api.execute(ACT_AS, ("bob", "member"))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            api.execute("DELETE FROM pgsched.run_logs")


# Enough rows that the planner's choice is a real one (jobs_owner_idx against walking the
# primary key backwards or reading the table), with alice owning one job in a hundred.
SEED_JOBS = 200_000


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


def test_a_members_first_and_deep_pages_are_index_range_scans(api_dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO pgsched.jobs (task, owner) SELECT 'noop', 'user' || (g %% 100) FROM generate_series(1, %s) g",
        (SEED_JOBS,),
    )
    conn.execute("ANALYZE pgsched.jobs")
    (middle,) = conn.execute(
        "SELECT id FROM pgsched.jobs WHERE owner = 'user7' ORDER BY id OFFSET 1000 LIMIT 1"
    ).fetchone()  # type: ignore[misc]
    base = dict.fromkeys(queries.LIST_FILTERS)
    with psycopg.connect(api_dsn) as api:
        api.execute(ACT_AS, ("user7", "member"))
        api.execute(queries.WALK_THE_INDEX)
        for before in (None, middle):
            params = {**base, "owner": "user7", "before": before, "limit": 51}
            # The statement the route sends, with its parameters, as the API's login.
            ((plan,),) = api.execute("EXPLAIN (FORMAT JSON) " + queries.list_jobs(params), params).fetchall()
            nodes = plan_nodes(plan[0]["Plan"])
            text = json.dumps(plan)
            assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], text
            scans = [n for n in nodes if n["Node Type"] in ("Index Scan", "Index Only Scan")]
            assert [(n["Index Name"], n["Scan Direction"]) for n in scans] == [("jobs_owner_idx", "Backward")], text
            ids = [row[0] for row in api.execute(queries.list_jobs(params), params).fetchall()]
            assert len(ids) == 51 and ids == sorted(ids, reverse=True) and ids[0] < (before or ids[0] + 1)
