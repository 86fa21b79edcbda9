"""Attacks through the REST API by each of its roles (issue 19), beside what the route matrix
(tests/test_api_matrix.py: who may call what, and 404 for another owner's object) and
tests/test_api_jobs.py (mass assignment on POST /jobs, the shell/http permission on POST /jobs, a
viewer's writes, idempotency keys of one user) already prove. Here each refused attack must also
leave every table's row count, and the attacked objects, as they were:

- every write to alice's job, workflow and schedule by bob (a member), vera (a viewer) and no one;
- an operator managing users; a member reading the audit log or creating users;
- server fields given in a batch, a workflow, a schedule and a schedule change;
- shell and http jobs, without the permission, through the batch, workflows and schedules;
- SQL-shaped values in every list filter, forged and tampered cursors;
- another user's Idempotency-Key, with the same body and with another (neither may reveal it).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import psycopg
import pytest

from .conftest import row_counts
from .test_api import error

pytestmark = pytest.mark.db

INJECTIONS = ["' OR '1'='1", "x'; DROP TABLE pgsched.jobs; --", "%", "_", "\\", "alice' --", "1) OR (1=1"]


@pytest.fixture
def alices(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """alice's job, workflow and schedule (and one job of bob's, so that a leak would show)."""
    job = client.post("/api/v1/jobs", json={"task": "noop", "args": {"card": "4111"}}, headers=as_user("alice"))
    workflow = client.post("/api/v1/workflows", json={"jobs": [{"key": "a", "task": "noop"}]}, headers=as_user("alice"))
    schedule = {"name": "alices", "task": "noop", "every": 3600}
    assert client.post("/api/v1/schedules", json=schedule, headers=as_user("alice")).status_code == 201
    bobs = client.post("/api/v1/jobs", json={"task": "noop"}, headers=as_user("bob")).json()["id"]
    return {"job": job.json()["id"], "workflow": workflow.json()["workflow_id"], "schedule": "alices", "bobs": bobs}


def state(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """Row counts and every job's and schedule's changeable fields (not the audit log's count: a
    refusal is not audited, and the test checks that too)."""
    jobs = conn.execute("SELECT id, state, owner, args, priority, queue FROM pgsched.jobs ORDER BY id").fetchall()
    schedules = conn.execute("SELECT name, owner, paused, every, args FROM pgsched.schedules ORDER BY name").fetchall()
    users = conn.execute(
        "SELECT username, role, disabled, may_create_commands FROM pgsched.users ORDER BY 1"
    ).fetchall()
    return row_counts(conn), jobs, schedules, users


def attempt_all(client: Any, headers: dict[str, str], attacks: list[tuple[str, str, Any]]) -> list[tuple[str, int]]:
    return [(f"{m} {url}", client.request(m, url, json=body, headers=headers).status_code) for m, url, body in attacks]


def test_writes_to_another_owners_objects_are_404_and_change_nothing(
    client: Any, as_user: Any, conn: psycopg.Connection[Any], alices: dict[str, Any]
) -> None:
    client.app.state.failed_authentications.limit = 10**6  # the anonymous calls are failures too
    job, workflow, schedule = alices["job"], alices["workflow"], alices["schedule"]
    attacks = [
        ("GET", f"/api/v1/jobs/{job}", None),
        ("GET", f"/api/v1/jobs/{job}/logs", None),
        ("POST", f"/api/v1/jobs/{job}/cancel", None),
        ("POST", f"/api/v1/jobs/{job}/retry", None),
        ("POST", f"/api/v1/jobs/{job}/retrigger", None),
        ("GET", f"/api/v1/workflows/{workflow}", None),
        ("POST", f"/api/v1/workflows/{workflow}/cancel", None),
        ("POST", f"/api/v1/workflows/{workflow}/retry", None),
        ("GET", f"/api/v1/schedules/{schedule}", None),
        ("PATCH", f"/api/v1/schedules/{schedule}", {"every": 1}),
        ("POST", f"/api/v1/schedules/{schedule}/pause", None),
        ("POST", f"/api/v1/schedules/{schedule}/trigger", None),
        ("DELETE", f"/api/v1/schedules/{schedule}", None),
    ]
    before = state(conn)
    expected = {"bob": 404, "vera": 403, None: 401}
    wrong = []
    for user, status in expected.items():
        headers = as_user(user) if user else {}
        for call, got in attempt_all(client, headers, attacks):
            # A viewer may read (404 for what is not hers); she may not write at all (403).
            want = 404 if user == "vera" and call.startswith("GET") else status
            if got != want:
                wrong.append(f"{call} as {user}: {got}, expected {want}")
    assert wrong == [], "\n".join(wrong)
    assert state(conn) == before
    # Bulk actions by filter reach only the caller's own jobs: bob's cancel-all leaves alice's.
    cancelled = client.post("/api/v1/jobs/cancel", json={}, headers=as_user("bob")).json()
    assert cancelled["count"] == 1
    assert conn.execute("SELECT state FROM pgsched.jobs WHERE id = %s", (job,)).fetchone() == ("queued",)
    refused = client.post("/api/v1/jobs/cancel", json={"owner": "alice"}, headers=as_user("bob"))
    assert refused.status_code == 403 and error(refused)["field"] == "owner"


def test_role_escalations_are_403_and_change_nothing(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    before = state(conn)
    bob = conn.execute("SELECT id FROM pgsched.users WHERE username = 'bob'").fetchone()[0]  # type: ignore[index]
    user_admin = [
        ("POST", "/api/v1/users", {"username": "mallory", "role": "admin"}),
        ("PATCH", f"/api/v1/users/{bob}", {"role": "admin"}),
        ("PATCH", f"/api/v1/users/{bob}", {"may_create_commands": True}),
        ("PATCH", f"/api/v1/users/{bob}", {"disabled": True}),
        ("GET", "/api/v1/users", None),
        ("GET", "/api/v1/audit", None),
    ]
    operations = [
        ("POST", "/api/v1/queues/default/pause", None),
        ("PATCH", "/api/v1/queues/default", {"max_running": 1}),
    ]
    for user, attacks in (("ops", user_admin), ("alice", user_admin + operations), ("vera", user_admin + operations)):
        results = attempt_all(client, as_user(user), attacks)
        assert all(status == 403 for _, status in results), (user, results)
    # A member cannot raise herself through her own token either.
    me = client.post("/api/v1/tokens", json={"name": "x", "role": "admin"}, headers=as_user("alice"))
    assert me.status_code == 422 and error(me)["field"] == "role"
    assert state(conn) == before


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/jobs/batch", {"jobs": [{"task": "noop", "state": "succeeded"}]}, "jobs[0].state"),
        ("/api/v1/jobs/batch", {"jobs": [{"task": "noop"}, {"task": "noop", "attempts": 9}]}, "jobs[1].attempts"),
        ("/api/v1/workflows", {"jobs": [{"key": "a", "task": "noop", "worker_id": "x"}]}, "jobs[0].worker_id"),
        ("/api/v1/workflows", {"jobs": [{"key": "a", "task": "noop", "result": {}}]}, "jobs[0].result"),
        ("/api/v1/schedules", {"name": "s", "task": "noop", "every": 60, "owner": "bob"}, "owner"),
        ("/api/v1/schedules", {"name": "s", "task": "noop", "every": 60, "created_by": "x"}, "created_by"),
        ("PATCH /api/v1/schedules/alices", {"owner": "bob"}, "owner"),
        ("PATCH /api/v1/schedules/alices", {"task": "shell"}, "task"),
    ],
)
def test_mass_assignment_everywhere_is_refused_naming_the_field(
    client: Any, as_user: Any, conn: psycopg.Connection[Any], alices: dict[str, Any], path: str, body: Any, field: str
) -> None:
    before = state(conn)
    method, _, url = path.rpartition(" ")
    response = client.request(method or "POST", url, json=body, headers=as_user("alice"))
    assert response.status_code == 422 and error(response)["field"] == field, response.json()
    assert state(conn) == before


def test_shell_and_http_without_the_permission_through_every_door(
    client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    before = state(conn)
    for task, args in (("shell", {"cmd": ["id"]}), ("http", {"url": "https://example.org/"})):
        for path, body, field in (
            ("/api/v1/jobs", {"task": task, "args": args}, "task"),
            ("/api/v1/jobs/batch", {"jobs": [{"task": "noop"}, {"task": task, "args": args}]}, "jobs[1].task"),
            ("/api/v1/workflows", {"jobs": [{"key": "a", "task": task, "args": args}]}, "jobs[0].task"),
            ("/api/v1/schedules", {"name": "s", "task": task, "args": args, "every": 60}, "task"),
        ):
            response = client.post(path, json=body, headers=as_user("alice"))
            assert response.status_code == 403 and error(response)["field"] == field, (path, response.json())
    assert state(conn) == before


def test_sql_shaped_filters_and_forged_cursors_reveal_and_change_nothing(
    client: Any, as_user: Any, conn: psycopg.Connection[Any], alices: dict[str, Any]
) -> None:
    before = state(conn)
    mine = client.get("/api/v1/jobs", headers=as_user("bob")).json()["jobs"]
    assert [j["id"] for j in mine] == [alices["bobs"]]
    for value in INJECTIONS:
        for name in ("queue", "task", "search", "state", "owner", "cursor", "created_after"):
            response = client.get("/api/v1/jobs", params={name: value}, headers=as_user("bob"))
            if response.status_code == 200:
                seen = {j["id"] for j in response.json()["jobs"]}
                assert seen <= {alices["bobs"]}, (name, value, seen)
            else:
                assert response.status_code in (403, 422) and error(response)["field"] == name, (name, value)
        for path in ("/api/v1/schedules", "/api/v1/audit"):
            response = client.get(path, params={"cursor": value, "actor": value}, headers=as_user("root"))
            assert response.status_code in (200, 422), (path, value, response.json())
    # A cursor naming another owner's job (a forged one): still only the caller's jobs below it.
    forged = client.get("/api/v1/jobs", params={"cursor": str(alices["bobs"] + 1)}, headers=as_user("bob"))
    assert [j["id"] for j in forged.json()["jobs"]] == [alices["bobs"]]
    for tampered in ("-1", "1e3", " 1", "99999999999999999999", "0x10"):
        response = client.get("/api/v1/jobs", params={"cursor": tampered}, headers=as_user("bob"))
        assert response.status_code == 422 and error(response)["field"] == "cursor", tampered
    # The logs cursor is opaque (base64 of JSON): a tampered one is refused, not run.
    for tampered in (
        "bm90IGpzb24",
        base64.urlsafe_b64encode(json.dumps(["1; DROP", "x", "y"]).encode()).decode(),
        "%%%",
    ):
        response = client.get(
            f"/api/v1/jobs/{alices['bobs']}/logs", params={"cursor": tampered}, headers=as_user("bob")
        )
        assert response.status_code == 422 and error(response)["field"] == "cursor", (tampered, response.json())
    assert state(conn) == before


def test_another_users_idempotency_key_neither_replays_nor_reveals(
    client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    key = {"Idempotency-Key": "shared-key"}
    body = {"task": "noop", "args": {"card": "4111"}}
    first = client.post("/api/v1/jobs", json=body, headers={**as_user("alice"), **key})
    assert first.status_code == 201
    # Each user's first use of the key alice used: with her body, and with another.
    for user, sent in (("bob", body), ("ops", {"task": "noop", "args": {"n": 2}})):
        response = client.post("/api/v1/jobs", json=sent, headers={**as_user(user), **key})
        # Neither alice's response (her job and its args) nor a hint that the key is taken.
        assert response.status_code == 201, (user, response.json())
        assert response.json()["id"] != first.json()["id"] and response.json()["owner"] == user
        assert "idempotent-replayed" not in response.headers
    # The batch keeps keys per user too.
    batch = {"jobs": [{"task": "noop"}]}
    alices_batch = client.post("/api/v1/jobs/batch", json=batch, headers={**as_user("alice"), "Idempotency-Key": "b"})
    bobs_batch = client.post("/api/v1/jobs/batch", json=batch, headers={**as_user("bob"), "Idempotency-Key": "b"})
    assert bobs_batch.status_code == 201 and bobs_batch.json()["ids"] != alices_batch.json()["ids"]
    owners = conn.execute("SELECT owner, count(*) FROM pgsched.jobs GROUP BY 1 ORDER BY 1").fetchall()
    assert owners == [("alice", 2), ("bob", 2), ("ops", 1)]
