"""Admins over the API: users (create, list, change role, disable, permission) and the audit log."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from .test_api import error

pytestmark = pytest.mark.db


def test_admins_manage_users_and_changes_apply_to_their_tokens_at_once(
    client: Any, as_user: Any, tokens: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    created = client.post("/api/v1/users", json={"username": "carol", "role": "operator"}, headers=as_user("root"))
    assert created.status_code == 201
    carol = created.json()
    assert (carol["username"], carol["role"], carol["may_create_commands"], carol["disabled"]) == (
        "carol",
        "operator",
        False,
        False,
    )
    assert [u["username"] for u in client.get("/api/v1/users", headers=as_user("root")).json()] == [
        "alice",
        "bob",
        "carol",
        "ops",
        "root",
        "vera",
    ]
    duplicate = client.post("/api/v1/users", json={"username": "carol"}, headers=as_user("root"))
    assert duplicate.status_code == 422 and error(duplicate)["field"] == "username"
    bad_role = client.post("/api/v1/users", json={"username": "dave", "role": "god"}, headers=as_user("root"))
    assert bad_role.status_code == 422 and error(bad_role)["field"] == "role"

    bob = 4
    # bob may create shell jobs once an admin allows it (his database login must allow it too).
    allowed = client.patch(f"/api/v1/users/{bob}", json={"may_create_commands": True}, headers=as_user("root"))
    assert allowed.json()["may_create_commands"] is True and allowed.json()["role"] == "member"
    assert client.get("/api/v1/me", headers=as_user("bob")).json()["may_create_commands"] is True
    promoted = client.patch(f"/api/v1/users/{bob}", json={"role": "operator"}, headers=as_user("root"))
    assert promoted.json()["role"] == "operator"
    assert client.get("/api/v1/queues", headers=as_user("bob")).status_code == 200  # on his next request
    disabled = client.patch(f"/api/v1/users/{bob}", json={"disabled": True}, headers=as_user("root"))
    assert disabled.json()["disabled"] is True
    assert client.get("/api/v1/me", headers=as_user("bob")).status_code == 401

    assert client.patch("/api/v1/users/999", json={"disabled": True}, headers=as_user("root")).status_code == 404
    myself = client.patch("/api/v1/users/1", json={"role": "viewer"}, headers=as_user("root"))
    assert myself.status_code == 422 and error(myself)["field"] == "role"
    assert client.get("/api/v1/me", headers=as_user("root")).json()["role"] == "admin"
    injected = client.patch(f"/api/v1/users/{bob}", json={"username": "root2"}, headers=as_user("root"))
    assert injected.status_code == 422 and error(injected)["field"] == "username"
    # Operators manage no users.
    assert client.post("/api/v1/users", json={"username": "eve"}, headers=as_user("ops")).status_code == 403
    assert client.patch("/api/v1/users/1", json={"disabled": True}, headers=as_user("ops")).status_code == 403
    assert conn.execute(
        "SELECT action, target_id, before ->> 'role', after ->> 'role', after ->> 'disabled' FROM pgsched.audit_log"
        " WHERE actor = 'root' AND target_type = 'user' ORDER BY id"
    ).fetchall() == [
        ("user.create", str(carol["id"]), None, "operator", "false"),
        ("user.update", "4", "member", "member", "false"),
        ("user.update", "4", "member", "operator", "false"),
        ("user.update", "4", "operator", "operator", "true"),
    ]


def test_the_audit_log_with_filters_and_pages(client: Any, as_user: Any) -> None:
    for n in range(3):
        client.post("/api/v1/jobs", json={"task": "noop", "args": {"n": n}}, headers=as_user("alice"))
    client.post("/api/v1/jobs/1/cancel", headers=as_user("bob"))  # not his: 404, nothing audited
    client.post("/api/v1/jobs/1/cancel", headers=as_user("ops"))
    page = client.get("/api/v1/audit", params={"target_type": "job", "limit": 2}, headers=as_user("root")).json()
    assert [(e["actor"], e["action"], e["target_id"]) for e in page["entries"]] == [
        ("ops", "job.cancel", "1"),
        ("alice", "job.create", "3"),
    ]
    assert all(e["request_id"] for e in page["entries"])
    rest = client.get(
        "/api/v1/audit", params={"target_type": "job", "cursor": page["next_cursor"]}, headers=as_user("root")
    ).json()
    assert [e["target_id"] for e in rest["entries"]] == ["2", "1"] and rest["next_cursor"] is None
    mine = client.get("/api/v1/audit", params={"actor": "ops"}, headers=as_user("root")).json()["entries"]
    assert [(e["action"], e["before"]["state"], e["after"]["state"]) for e in mine] == [
        ("job.cancel", "queued", "cancelled")
    ]
    assert client.get("/api/v1/audit", headers=as_user("ops")).status_code == 403
