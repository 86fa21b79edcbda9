"""Every route of the API × every role × ownership, generated from the app's route table: a new
route without an entry in ACCESS fails here, so none can ship without deciding who may call it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from .api_fixtures import USERS

pytestmark = pytest.mark.db

PUBLIC = "public"  # no token needed
EVERY = frozenset(USERS.values())
WRITERS = frozenset({"admin", "operator", "member"})
OPERATORS = frozenset({"admin", "operator"})
ADMINS = frozenset({"admin"})

# (method, path as routed) -> who may call it: PUBLIC, or the roles allowed.
ACCESS: dict[tuple[str, str], Any] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/api/v1/openapi.json"): PUBLIC,
    ("GET", "/api/v1/docs"): PUBLIC,
    # Litestar's own OpenAPI router, unused (see api/app.py): public, read-only.
    ("GET", "/api/v1/_openapi"): PUBLIC,
    ("GET", "/api/v1/_openapi/openapi.json"): PUBLIC,
    ("GET", "/api/v1/_openapi/{path:str}"): PUBLIC,
    ("GET", "/api/v1/me"): EVERY,
    ("GET", "/api/v1/tokens"): EVERY,
    ("POST", "/api/v1/tokens"): EVERY,
    ("DELETE", "/api/v1/tokens/{token_id:int}"): EVERY,
    ("POST", "/api/v1/jobs"): WRITERS,
    ("GET", "/api/v1/jobs"): EVERY,
    ("GET", "/api/v1/jobs/{job_id:int}"): EVERY,
    ("POST", "/api/v1/jobs/{job_id:int}/cancel"): WRITERS,
    ("POST", "/api/v1/jobs/{job_id:int}/retry"): WRITERS,
    ("POST", "/api/v1/jobs/batch"): WRITERS,
    ("POST", "/api/v1/jobs/{job_id:int}/retrigger"): WRITERS,
    ("GET", "/api/v1/jobs/{job_id:int}/logs"): EVERY,
    ("POST", "/api/v1/jobs/cancel"): WRITERS,
    ("POST", "/api/v1/jobs/retry"): WRITERS,
    ("POST", "/api/v1/workflows"): WRITERS,
    ("GET", "/api/v1/workflows/{workflow_id:uuid}"): EVERY,
    ("POST", "/api/v1/workflows/{workflow_id:uuid}/cancel"): WRITERS,
    ("POST", "/api/v1/workflows/{workflow_id:uuid}/retry"): WRITERS,
    ("GET", "/api/v1/queues"): OPERATORS,
    ("POST", "/api/v1/queues/{name:str}/pause"): OPERATORS,
    ("POST", "/api/v1/queues/{name:str}/resume"): OPERATORS,
    ("PATCH", "/api/v1/queues/{name:str}"): OPERATORS,
    ("GET", "/api/v1/workers"): OPERATORS,
    ("GET", "/api/v1/tasks"): EVERY,
    ("GET", "/api/v1/schedules"): EVERY,
    ("POST", "/api/v1/schedules"): WRITERS,
    ("GET", "/api/v1/schedules/preview"): EVERY,
    ("GET", "/api/v1/schedules/{name:str}"): EVERY,
    ("POST", "/api/v1/schedules/{name:str}/pause"): WRITERS,
    ("POST", "/api/v1/schedules/{name:str}/resume"): WRITERS,
    ("DELETE", "/api/v1/schedules/{name:str}"): WRITERS,
    ("POST", "/api/v1/schedules/{name:str}/trigger"): WRITERS,
    ("PATCH", "/api/v1/schedules/{name:str}"): WRITERS,
    ("GET", "/api/v1/users"): ADMINS,
    ("POST", "/api/v1/users"): ADMINS,
    ("PATCH", "/api/v1/users/{user_id:int}"): ADMINS,
    ("GET", "/api/v1/audit"): ADMINS,
    # Live events: anyone, each seeing what they may see (tests/test_api_events.py).
    ("GET", "/api/v1/events"): EVERY,
    ("WEBSOCKET", "/api/v1/ws"): EVERY,
    # Signing in (tests/test_api_signin.py, tests/test_api_oidc.py).
    ("POST", "/api/v1/session"): PUBLIC,
    ("DELETE", "/api/v1/session"): EVERY,
    ("PUT", "/api/v1/me/password"): EVERY,
    ("PUT", "/api/v1/users/{user_id:int}/password"): ADMINS,
    ("GET", "/api/v1/oidc/login"): PUBLIC,
    ("GET", "/api/v1/oidc/callback"): PUBLIC,
}

BODIES = {
    ("POST", "/api/v1/tokens"): {"name": "matrix"},
    ("POST", "/api/v1/jobs"): {"task": "noop"},
    ("POST", "/api/v1/jobs/batch"): {"jobs": [{"task": "noop"}, {"task": "report"}]},
    ("PATCH", "/api/v1/queues/{name:str}"): {"max_running": 3},
    ("POST", "/api/v1/jobs/cancel"): {"dry_run": True},
    ("POST", "/api/v1/workflows"): {
        "jobs": [{"key": "a", "task": "noop"}, {"key": "b", "task": "noop", "depends_on": ["a"]}]
    },
    ("PATCH", "/api/v1/schedules/{name:str}"): {"every": 120},
    ("POST", "/api/v1/jobs/retry"): {"dry_run": True},
    ("POST", "/api/v1/session"): {"username": "alice", "password": "alice's password"},
    ("PUT", "/api/v1/me/password"): {"current_password": "a wrong one, surely", "new_password": "never stored"},
    ("PUT", "/api/v1/users/{user_id:int}/password"): {"password": "bob's new password"},
}

# Objects in paths belong to alice; who else may reach them: admins and operators, for jobs and
# schedules.
SEES_EVERY_JOB = {"root", "ops"}


def routes(app: Any) -> set[tuple[str, str]]:
    from litestar.routes import WebSocketRoute

    return {
        (method, route.path)
        for route in app.routes
        for method in (["WEBSOCKET"] if isinstance(route, WebSocketRoute) else route.methods)
        if method not in ("OPTIONS", "HEAD")
    }


def open_socket(client: Any, url: str, headers: dict[str, str]) -> int:
    """A WebSocket's outcome as an HTTP status: 200 accepted, else its close code less 4000."""
    from litestar.exceptions import WebSocketDisconnect

    try:
        with client.websocket_connect(url, headers=headers) as socket:
            socket.receive()  # max_seconds=0: the server closes at once
    except WebSocketDisconnect as exc:
        return 200 if exc.code == 1000 else exc.code - 4000
    return 200


def test_every_route_has_an_entry(client: Any) -> None:
    assert routes(client.app) == set(ACCESS)


def expected(key: tuple[str, str], user: str | None) -> str:
    """ok, 401, 403 or 404 for ``user`` (None: no token) calling the route on alice's objects."""
    allowed = ACCESS[key]
    if allowed == PUBLIC:
        return "ok"
    if user is None:
        return "401"
    if USERS[user] not in allowed:
        return "403"
    path = key[1]
    if ("{job_id" in path or "{workflow_id" in path) and user != "alice" and user not in SEES_EVERY_JOB:
        return "404"
    if "/schedules/{name" in path and user != "alice" and user not in SEES_EVERY_JOB:
        return "404"
    if "{token_id" in path and user != "alice":
        return "404"  # tokens are their user's only, whatever the role
    return "ok"


def test_route_role_ownership_matrix(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    client.app.state.failed_authentications.limit = 10**6  # the anonymous calls below are failures too
    alice = conn.execute("SELECT id FROM pgsched.users WHERE username = 'alice'").fetchone()[0]
    assert (
        client.put(
            f"/api/v1/users/{alice}/password", json={"password": "alice's password"}, headers=as_user("root")
        ).status_code
        == 204
    )
    job = client.post("/api/v1/jobs", json={"task": "noop"}, headers=as_user("alice")).json()["id"]
    workflow = client.post("/api/v1/workflows", json={"jobs": [{"key": "a", "task": "noop"}]}, headers=as_user("alice"))
    workflow_id = workflow.json()["workflow_id"]
    outcomes = []
    for key in sorted(ACCESS):
        method, path = key
        for user in [None, *USERS]:
            # A fresh token of alice's for each revocation, so her own token stays valid.
            token = client.post("/api/v1/tokens", json={"name": "target"}, headers=as_user("alice")).json()["id"]
            url = path.replace("{job_id:int}", str(job)).replace("{token_id:int}", str(token))
            # And a fresh schedule of hers, as one route deletes it.
            schedule = f"alices-{len(outcomes)}"
            conn.execute(
                "INSERT INTO pgsched.schedules (name, task, every, owner) VALUES (%s, 'noop', '1 hour', 'alice')",
                (schedule,),
            )
            url = url.replace("{path:str}", "anything").replace("/queues/{name:str}", "/queues/default")
            url = url.replace("/schedules/{name:str}", f"/schedules/{schedule}")
            url = url.replace("{workflow_id:uuid}", workflow_id)
            if path.endswith("/preview"):
                url += "?cron=0+9+*+*+*&timezone=Europe/Paris"
            if path in ("/api/v1/events", "/api/v1/ws"):
                url += "?max_seconds=0"  # the stream ends at once (the test client reads it whole)
            url = url.replace("{user_id:int}", "4")  # bob
            headers = as_user(user) if user else {}
            body = BODIES.get(key)
            if key == ("POST", "/api/v1/schedules"):
                body = {"name": f"matrix-{len(outcomes)}", "task": "noop", "every": 60}
            if key == ("POST", "/api/v1/users"):
                body = {"username": f"matrix-{len(outcomes)}"}
            if key == ("PATCH", "/api/v1/users/{user_id:int}"):
                body = {"may_create_commands": False}
            if method == "WEBSOCKET":
                status = open_socket(client, url, headers)
                outcomes.append((method, path, user, "ok" if status < 400 else str(status), expected(key, user)))
                continue
            response = client.request(method, url, json=body, headers=headers)
            status = response.status_code
            got = "ok" if status < 400 else str(status)
            if key == ("GET", "/api/v1/_openapi/{path:str}") and status == 404:
                got = "ok"  # Litestar's catch-all answers 404 for any path: public, and harmless
            if path.startswith("/api/v1/oidc/") and status == 404:
                got = "ok"  # public; OIDC is not configured here (it is in tests/test_api_oidc.py)
            if key == ("PUT", "/api/v1/me/password") and status == 422:
                got = "ok"  # reached: the current password is wrong (changing it: tests/test_api_signin.py)
            client.cookies.clear()  # a sign-in's cookie would authenticate the next call
            outcomes.append((method, path, user, got, expected(key, user)))
            if got in ("401", "403", "404"):
                assert response.json()["error"]["code"] in ("unauthorized", "forbidden", "not_found")
    wrong = [o for o in outcomes if o[3] != o[4]]
    assert wrong == [], "\n".join(f"{m} {p} as {u}: got {g}, expected {e}" for m, p, u, g, e in wrong)
