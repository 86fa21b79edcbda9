"""The REST API on the real app (Litestar's test client) and a real database: health, OpenAPI,
errors, security headers, authentication and tokens."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgsched import ConfigError, load_settings

from .conftest import row_counts

pytestmark = pytest.mark.db

ERROR_KEYS = {"code", "message", "field"}


def error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) >= ERROR_KEYS, body
    return body["error"]


def test_health_and_readiness(client: Any, conn: psycopg.Connection[Any]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    # A migration the code does not know about: the schema is not current.
    conn.execute("INSERT INTO pgsched.schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert error(response)["code"] == "unavailable" and "schema" in error(response)["message"]


def test_openapi_document_and_docs_page(client: Any) -> None:
    document = client.get("/api/v1/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/me", "/api/v1/tokens"} <= set(document["paths"])
    page = client.get("/api/v1/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()


def test_security_headers_and_request_id_on_success_and_error(client: Any, as_user: Any) -> None:
    for response in (client.get("/api/v1/me", headers=as_user("alice")), client.get("/api/v1/me")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
        assert len(response.headers["x-request-id"]) >= 16
    given = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"


def test_one_401_for_every_authentication_failure(
    client: Any, tokens: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    conn.execute("UPDATE pgsched.users SET disabled = true WHERE username = 'bob'")
    bodies = []
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer pgs_not-a-token"},
        {"Authorization": "Bearer " + "x" * 5000},
        {"Authorization": f"Bearer {tokens['bob']}"},  # a disabled user's token
    ):
        response = client.get("/api/v1/me", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        bodies.append(response.json())
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["error"]["code"] == "unauthorized"


def test_me(client: Any, as_user: Any) -> None:
    assert client.get("/api/v1/me", headers=as_user("vera")).json() == {
        "id": 5,
        "username": "vera",
        "role": "viewer",
        "may_create_commands": False,
    }


def test_tokens_create_list_revoke_own(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    created = client.post("/api/v1/tokens", json={"name": "laptop"}, headers=as_user("alice"))
    assert created.status_code == 201
    secret = created.json()["token"]
    assert secret.startswith("pgs_") and len(secret) >= 46
    assert created.json()["prefix"] == secret[:12]
    # The secret is stored nowhere: not in any column of any table (only its SHA-256 is).
    dump = "".join(str(row) for row in conn.execute("SELECT to_jsonb(t) FROM pgsched.api_tokens t").fetchall())
    assert secret not in dump and secret[12:] not in dump
    assert (
        conn.execute(
            "SELECT count(*) FROM pgsched.audit_log WHERE position(%s IN after::text) > 0", (secret[12:],)
        ).fetchone()[0]
        == 0
    )
    new = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/v1/me", headers=new).json()["username"] == "alice"

    listed = client.get("/api/v1/tokens", headers=as_user("alice")).json()
    assert [t["name"] for t in listed] == ["test", "laptop"]
    assert all("token" not in t and "token_hash" not in t for t in listed)
    assert [t["name"] for t in client.get("/api/v1/tokens", headers=as_user("bob")).json()] == ["test"]

    token_id = created.json()["id"]
    # Another user's token: as if it did not exist, and it stays valid.
    assert client.delete(f"/api/v1/tokens/{token_id}", headers=as_user("bob")).status_code == 404
    assert client.get("/api/v1/me", headers=new).status_code == 200
    revoked = client.delete(f"/api/v1/tokens/{token_id}", headers=as_user("alice"))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/api/v1/me", headers=new).status_code == 401  # on the very next request
    actions = conn.execute(
        "SELECT actor, action, target_id, request_id IS NOT NULL, client_addr IS NOT NULL FROM pgsched.audit_log"
        " WHERE actor = 'alice' ORDER BY id"
    ).fetchall()
    assert actions == [
        ("alice", "token.create", str(token_id), True, True),
        ("alice", "token.revoke", str(token_id), True, True),
    ]


def test_unknown_route_and_method_get_the_error_body(client: Any, as_user: Any) -> None:
    response = client.get("/api/v1/nothing-here", headers=as_user("root"))
    assert response.status_code == 404 and error(response)["code"] == "not_found"
    response = client.put("/api/v1/me", headers=as_user("root"))
    assert response.status_code == 405 and error(response)["code"] == "method_not_allowed"


def test_body_over_the_cap_is_413_before_the_database(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    before = row_counts(conn)
    big = {"task": "noop", "args": {"blob": "x" * 300_000}}
    response = client.post("/api/v1/jobs", json=big, headers=as_user("alice"))
    assert response.status_code == 413 and error(response)["code"] == "too_large"
    assert row_counts(conn) == before


def test_the_api_refuses_a_login_that_bypasses_row_level_security(dsn: str) -> None:
    from pgsched.api import create_app

    with pytest.raises(ConfigError, match="not subject to row-level security"):
        create_app(load_settings({"dsn": dsn}))  # the test server's superuser
    create_app(load_settings({"dsn": dsn}), dev=True)  # accepted in development (SET ROLE pgsched_api)


def test_the_api_refuses_a_login_outside_pgsched_api(dsn: str, conn: psycopg.Connection[Any]) -> None:
    from pgsched.api import create_app

    from .api_fixtures import login_dsn

    conn.execute("CREATE ROLE pgs_api_outsider LOGIN")
    try:
        with pytest.raises(ConfigError, match="not a member of pgsched_api"):
            create_app(load_settings({"dsn": dsn, "api_dsn": login_dsn(dsn, "pgs_api_outsider")}))
    finally:
        conn.execute("DROP ROLE pgs_api_outsider")


def test_repeated_failures_from_one_client_are_rate_limited(client: Any, tokens: dict[str, str]) -> None:
    limiter = client.app.state.failed_authentications
    now = [1000.0]
    limiter.clock = lambda: now[0]  # the window passes when the test says so
    good = {"Authorization": f"Bearer {tokens['alice']}"}
    for _ in range(limiter.limit):
        assert client.get("/api/v1/me", headers={"Authorization": "Bearer pgs_guess"}).status_code == 401
    limited = client.get("/api/v1/me", headers={"Authorization": "Bearer pgs_guess"})
    assert limited.status_code == 429 and error(limited)["code"] == "too_many_requests"
    assert limited.headers["retry-after"] == "60"
    # Every request of that client, a valid token's too: a right guess must not stand out.
    assert client.get("/api/v1/me", headers=good).status_code == 429
    assert client.get("/healthz").status_code == 200  # the probes stay open
    now[0] += 30
    assert client.get("/api/v1/me", headers=good).headers["retry-after"] == "30"
    now[0] += 30
    assert client.get("/api/v1/me", headers=good).status_code == 200


def test_cors_is_off(client: Any, as_user: Any) -> None:
    """No cross-origin access unless configured: browsers on other sites cannot call the API."""
    origin = {"Origin": "https://evil.example"}
    preflight = client.options("/api/v1/jobs", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    response = client.get("/api/v1/me", headers={**as_user("alice"), **origin})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
