"""The claim statements' plans and locks: index range scans whatever else is queued, no row locked
that is not claimed, and no capped task taken by the plain claim."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgsched.worker.queries import CLAIM, CLAIM_CONTROLLED

from .conftest import worker_incarnation

pytestmark = pytest.mark.db


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a JSON plan, InitPlans and CTEs included."""
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(plan_nodes(child))
    return found


def _analyze(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) of one run of sql, rolled back."""
    with conn.transaction(force_rollback=True):
        [(result,)] = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params).fetchall()
    return plan_nodes(result[0]["Plan"])


def assert_range_scans_only(nodes: list[dict[str, Any]]) -> None:
    scans = [(n["Node Type"], n.get("Index Name")) for n in nodes if n.get("Relation Name") == "jobs"]
    scans = [s for s in scans if s[0] != "ModifyTable"]
    assert scans and all(kind in ("Index Scan", "Index Only Scan") for kind, _ in scans), scans
    # No Sort reads jobs directly: the only sorts merge the first rows of each slice.
    for sort in (n for n in nodes if n["Node Type"] == "Sort"):
        assert all(child.get("Relation Name") != "jobs" for child in sort.get("Plans", [])), sort


@pytest.fixture
def crowded(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """300,000 queued jobs of a task no test worker runs, ahead of 30 jobs of task t, in two queues."""
    conn.execute(
        "INSERT INTO pgsched.jobs (task, queue, run_at) "
        "SELECT 'other', 'q' || (i % 2), now() - interval '1 day' FROM generate_series(1, 300000) AS i"
    )
    conn.execute("INSERT INTO pgsched.jobs (task, queue) SELECT 't', 'q' || (i % 2) FROM generate_series(1, 30) AS i")
    conn.execute("VACUUM ANALYZE pgsched.jobs")
    return conn


@pytest.mark.parametrize("mode", ["auto", "force_generic_plan"])
def test_a_claim_with_a_selective_task_filter_is_an_index_range_scan(
    crowded: psycopg.Connection[Any], mode: str
) -> None:
    crowded.execute(f"SET plan_cache_mode = {mode}")
    params = {
        "queues": ["q0", "q1"],
        "tasks": ["t", "http"],
        "limit": 10,
        "worker": worker_incarnation(crowded, "1 minute"),
    }
    nodes = _analyze(crowded, CLAIM, params)
    assert_range_scans_only(nodes)
    assert nodes[0]["Actual Rows"] == 10
    # It read a few pages, not the 300,000 rows of the other task (thousands of pages).
    assert nodes[0]["Shared Hit Blocks"] + nodes[0]["Shared Read Blocks"] < 200, nodes[0]


@pytest.mark.parametrize("settings", ["max_running = 50", "max_per_key = 2", "fair = true"])
def test_a_controlled_claim_reads_only_the_slices_of_its_tasks(crowded: psycopg.Connection[Any], settings: str) -> None:
    # Each kind of controlled queue: plain order under a cap, a keyed queue's lookahead, a fair queue.
    crowded.execute("INSERT INTO pgsched.queues (name) VALUES ('q0')")
    crowded.execute(f"UPDATE pgsched.queues SET {settings} WHERE name = 'q0'")
    params = {"queues": ["q0"], "tasks": ["t", "http"], "limit": 10, "worker": worker_incarnation(crowded, "1 minute")}
    with crowded.transaction(force_rollback=True):
        claimed = crowded.execute(CLAIM_CONTROLLED, params).fetchall()
        assert len(claimed) == 10 and {row[2] for row in claimed} == {"t"}  # (id, queue, task, ...)
    # The buffers count the statements inside the function too, and their triggers' (the job
    # events' read of pgsched.event_listeners: PostgreSQL 15 came to 300-303 with it). The rows of
    # the other task are thousands of pages.
    nodes = _analyze(crowded, CLAIM_CONTROLLED, params)
    assert nodes[0]["Shared Hit Blocks"] + nodes[0]["Shared Read Blocks"] < 400, nodes[0]


def test_a_plain_claim_never_locks_rows_of_a_controlled_queue(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.jobs (task, queue) SELECT 't', 'c' || (i % 2) FROM generate_series(1, 40) AS i")
    conn.execute("INSERT INTO pgsched.jobs (task, queue) SELECT 't', 'plain' FROM generate_series(1, 40)")
    conn.execute("INSERT INTO pgsched.queues (name, max_running) VALUES ('c0', 3), ('c1', 1)")
    lock_controlled = "SELECT id FROM pgsched.jobs WHERE queue IN ('c0', 'c1') FOR UPDATE NOWAIT"
    with psycopg.connect(dsn, autocommit=True) as other:
        for queues in (["c0"], ["c0", "c1", "plain"], ["plain", "c1"]):
            params = {"queues": queues, "tasks": ["t"], "limit": 10, "worker": worker_incarnation(conn, "1 minute")}
            with conn.transaction(force_rollback=True):
                # Whatever join order the planner picks: this one keeps the order as written, the
                # one where a filter on the settings table would come after the locking scan.
                conn.execute("SET LOCAL join_collapse_limit = 1")
                conn.execute("SET LOCAL from_collapse_limit = 1")
                claimed = conn.execute(CLAIM, params).fetchall()
                assert {row[1] for row in claimed} <= {"plain"}
                # While the claim's transaction is open, another one can lock every controlled row.
                with other.transaction(force_rollback=True):
                    assert len(other.execute(lock_controlled).fetchall()) == 40, queues


def test_the_plain_claim_leaves_a_task_capped_since_to_the_controlled_claim(conn: psycopg.Connection[Any]) -> None:
    """A worker whose view of the caps is stale (it refreshes at heartbeat) still routes the task to
    the plain claim; the claim reads the catalog and leaves it, so the cap cannot be exceeded."""
    conn.execute("INSERT INTO pgsched.jobs (task, concurrency_key) SELECT 'capped', 'k' FROM generate_series(1, 5)")
    conn.execute("INSERT INTO pgsched.jobs (task) VALUES ('free')")
    params = {
        "queues": ["default"],
        "tasks": ["capped", "free"],
        "limit": 10,
        "worker": worker_incarnation(conn, "1 minute"),
    }
    conn.execute("INSERT INTO pgsched.tasks (name, options) VALUES ('capped', '{\"max_per_key\": 1}'), ('free', '{}')")
    assert [row[2] for row in conn.execute(CLAIM, params).fetchall()] == ["free"]
    # The controlled claim takes one job of the key, and no more while it runs.
    assert [row[2] for row in conn.execute(CLAIM_CONTROLLED, {**params, "tasks": ["capped"]})] == ["capped"]
    assert conn.execute(CLAIM_CONTROLLED, {**params, "tasks": ["capped"]}).fetchall() == []
    assert conn.execute(CLAIM, params).fetchall() == []
    assert conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'running'").fetchone()[0] == 2


def test_a_rate_limited_claim_does_not_count_its_window(conn: psycopg.Connection[Any]) -> None:
    """At 200,000 starts per hour the window holds 100,000 rows: a claim reads a counter, not them."""
    conn.execute("INSERT INTO pgsched.jobs (task, queue) SELECT 't', 'r' FROM generate_series(1, 100)")
    conn.execute("INSERT INTO pgsched.queues (name, rate_limit, rate_period) VALUES ('r', 200000, '1 hour')")
    conn.execute(
        "INSERT INTO pgsched.queue_starts SELECT 'r', now() - interval '30 minutes' + i * interval '1 ms'"
        " FROM generate_series(1, 100000) AS i"
    )
    conn.execute("VACUUM ANALYZE pgsched.queue_starts")
    params = {"queues": ["r"], "tasks": ["t"], "limit": 10, "worker": worker_incarnation(conn, "1 hour")}
    assert len(conn.execute(CLAIM_CONTROLLED, params).fetchall()) == 10  # the first claim counts once
    nodes = _analyze(conn, CLAIM_CONTROLLED, params)
    # About 190 for claiming 10 jobs (their rows and index entries); counting the window adds 550.
    assert nodes[0]["Shared Hit Blocks"] + nodes[0]["Shared Read Blocks"] < 400, nodes[0]
    # The count stays exact: slid-out starts leave it, claimed ones join it.
    conn.execute("SET pgsched.clock_offset = '32 minutes'")  # the 100,000 old starts slide out
    assert len(conn.execute(CLAIM_CONTROLLED, params).fetchall()) == 10
    window = conn.execute("SELECT count(*) FROM pgsched.queue_starts WHERE queue = 'r'").fetchone()[0]
    assert window == 20 and conn.execute("SELECT starts FROM pgsched.queue_windows").fetchone()[0] == 20
