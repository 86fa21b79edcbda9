"""``/api/v1/workflows``: a graph in one request, shown with its edges, cancelled, retried."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from .conftest import row_counts
from .test_api import error

pytestmark = pytest.mark.db

GRAPH = {
    "jobs": [
        {"key": "extract", "task": "noop", "args": {"day": "d"}},
        {"key": "transform", "task": "noop", "depends_on": ["extract"]},
        {"key": "load", "task": "report", "depends_on": ["transform"], "priority": 9},
    ]
}


def test_workflow_create_show_cancel_retry(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    created = client.post("/api/v1/workflows", json=GRAPH, headers=as_user("alice"))
    assert created.status_code == 201
    workflow_id, ids = created.json()["workflow_id"], created.json()["jobs"]
    assert list(ids) == ["extract", "transform", "load"]
    shown = client.get(f"/api/v1/workflows/{workflow_id}", headers=as_user("alice")).json()
    states = {j["id"]: (j["state"], j["owner"]) for j in shown["jobs"]}
    assert states == {
        ids["extract"]: ("queued", "alice"),
        ids["transform"]: ("waiting", "alice"),
        ids["load"]: ("waiting", "alice"),
    }
    assert sorted(map(tuple, shown["edges"])) == sorted(
        [(ids["transform"], ids["extract"]), (ids["load"], ids["transform"])]
    )
    assert client.get(f"/api/v1/workflows/{workflow_id}", headers=as_user("bob")).status_code == 404
    assert client.post(f"/api/v1/workflows/{workflow_id}/cancel", headers=as_user("bob")).status_code == 404

    cancelled = client.post(f"/api/v1/workflows/{workflow_id}/cancel", headers=as_user("alice")).json()
    assert cancelled["jobs"] >= 1
    assert conn.execute("SELECT DISTINCT state FROM pgsched.jobs").fetchall() == [("cancelled",)]
    retried = client.post(f"/api/v1/workflows/{workflow_id}/retry", headers=as_user("alice")).json()
    assert retried["jobs"] == 3
    assert dict(conn.execute("SELECT id, state FROM pgsched.jobs").fetchall()) == {
        ids["extract"]: "queued",
        ids["transform"]: "waiting",
        ids["load"]: "waiting",
    }
    assert conn.execute(
        "SELECT action FROM pgsched.audit_log WHERE target_type = 'workflow' ORDER BY id"
    ).fetchall() == [("workflow.create",), ("workflow.cancel",), ("workflow.retry",)]


def test_bad_graphs_are_refused_naming_the_job_and_nothing_is_written(
    client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    before = row_counts(conn)
    cycle = {
        "jobs": [{"key": "a", "task": "noop", "depends_on": ["b"]}, {"key": "b", "task": "noop", "depends_on": ["a"]}]
    }
    for body, field in (
        (cycle, "depends_on"),
        ({"jobs": [{"key": "a", "task": "noop"}, {"key": "a", "task": "noop"}]}, "jobs[1].key"),
        ({"jobs": [{"key": "a", "task": "noop", "depends_on": ["z"]}]}, "jobs[0].depends_on"),
        ({"jobs": [{"key": "a", "task": "noop"}, {"key": "b", "task": "nope"}]}, "jobs[1].task"),
        ({"jobs": [{"key": "a", "task": "noop", "owner": "bob"}]}, "jobs[0].owner"),
    ):
        response = client.post("/api/v1/workflows", json=body, headers=as_user("alice"))
        assert response.status_code == 422, (body, response.json())
        assert error(response)["field"] == field, (body, response.json())
    assert row_counts(conn) == before
