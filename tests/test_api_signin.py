"""Signing in with a password (docs/api.md, "Signing in"): the session cookie, its CSRF token,
sign-out, password changes, the rate limit, the audit, and ``pgsched users set-password``; on
the real app (Litestar's test client) and a real database."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import pytest
from argon2 import PasswordHasher

pytestmark = pytest.mark.db

PASSWORD = "correct horse battery"
SESSION = "pgsched_session"


def user_id(conn: psycopg.Connection[Any], name: str) -> int:
    return conn.execute("SELECT id FROM pgsched.users WHERE username = %s", (name,)).fetchone()[0]


def stored_hash(conn: psycopg.Connection[Any], name: str) -> str | None:
    return conn.execute("SELECT password_hash FROM pgsched.users WHERE username = %s", (name,)).fetchone()[0]


@pytest.fixture
def alice_password(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> str:
    """alice's password, set by an admin through the API."""
    response = client.put(
        f"/api/v1/users/{user_id(conn, 'alice')}/password", json={"password": PASSWORD}, headers=as_user("root")
    )
    assert response.status_code == 204, response.text
    return PASSWORD


def me_with(client: Any, secret: str) -> int:
    """The status of GET /me with the session cookie ``secret`` (the client's own cookies kept)."""
    kept = dict(client.cookies)
    client.cookies.clear()
    client.cookies.set(SESSION, secret, domain="testserver.local")
    try:
        return int(client.get("/api/v1/me").status_code)
    finally:
        client.cookies.clear()
        for name, value in kept.items():
            client.cookies.set(name, value, domain="testserver.local")


def sign_in(client: Any, name: str = "alice", password: str = PASSWORD) -> Any:
    return client.post("/api/v1/session", json={"username": name, "password": password})


def test_sign_in_sets_a_session_cookie_that_authenticates(
    client: Any, alice_password: str, conn: psycopg.Connection[Any]
) -> None:
    response = sign_in(client)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["username"] == "alice" and body["role"] == "member" and body["csrf_token"]
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION}=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Path=/" in cookie and "Secure" not in cookie  # plain HTTP here; Secure over TLS
    secret = response.cookies[SESSION]
    assert secret not in response.text  # never in the body: scripts cannot read it
    # Only its SHA-256 is stored, and the hash of the password, never the password.
    dump = str(conn.execute("SELECT to_jsonb(s) FROM pgsched.api_sessions s").fetchall())
    assert secret not in dump
    assert stored_hash(conn, "alice").startswith("$argon2id$") and PASSWORD not in str(
        conn.execute("SELECT to_jsonb(a) FROM pgsched.audit_log a").fetchall()
    )
    me = client.get("/api/v1/me")  # the cookie alone
    assert me.status_code == 200
    assert me.json()["username"] == "alice" and me.json()["csrf_token"] == body["csrf_token"]


def test_a_sign_in_is_json_only_so_another_site_cannot_post_one(client: Any, alice_password: str) -> None:
    # What an HTML form of another site can send: text/plain that happens to read as JSON.
    body = '{"username": "alice", "password": "correct horse battery"}'
    forged = client.post("/api/v1/session", content=body, headers={"Content-Type": "text/plain"})
    assert forged.status_code == 415 and SESSION not in forged.cookies
    assert client.get("/api/v1/me").status_code == 401


def test_the_same_401_for_every_failed_sign_in(client: Any, alice_password: str, conn: psycopg.Connection[Any]) -> None:
    reference = client.get("/api/v1/me")  # no credentials at all
    conn.execute("UPDATE pgsched.users SET disabled = true WHERE username = 'bob'")
    conn.execute("UPDATE pgsched.users SET password_hash = %s WHERE username = 'bob'", (stored_hash(conn, "alice"),))
    for name, password in (
        ("alice", "wrong password, long enough"),  # a wrong password
        ("nobody", PASSWORD),  # no such user
        ("vera", PASSWORD),  # a user without a password
        ("bob", PASSWORD),  # a disabled user, with the right password
        ("alice", "x" * 5000),  # longer than any password
    ):
        response = sign_in(client, name, password)
        assert response.status_code == 401, (name, response.text)
        assert response.json() == reference.json()
        assert SESSION not in response.cookies
    assert conn.execute("SELECT count(*) FROM pgsched.api_sessions").fetchone()[0] == 0


def test_unsafe_requests_with_the_cookie_need_the_csrf_token(
    client: Any, as_user: Any, alice_password: str, conn: psycopg.Connection[Any]
) -> None:
    csrf = sign_in(client).json()["csrf_token"]
    for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": csrf[:-1]}):
        refused = client.post("/api/v1/jobs", json={"task": "noop"}, headers=headers)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "csrf_failed" and "X-CSRF-Token" in refused.json()["error"]["message"]
    assert conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone()[0] == 0  # nothing done
    assert client.get("/api/v1/jobs").status_code == 200  # safe methods need none
    created = client.post("/api/v1/jobs", json={"task": "noop"}, headers={"X-CSRF-Token": csrf})
    assert created.status_code == 201 and created.json()["owner"] == "alice"
    # A bearer token needs no CSRF token, and wins over the cookie: this is bob's job.
    by_token = client.post("/api/v1/jobs", json={"task": "noop"}, headers=as_user("bob"))
    assert by_token.status_code == 201 and by_token.json()["owner"] == "bob"
    # Another session's CSRF token is not this one's.
    client.cookies.clear()
    other = sign_in(client).json()["csrf_token"]
    assert other != csrf
    assert client.post("/api/v1/jobs", json={"task": "noop"}, headers={"X-CSRF-Token": csrf}).status_code == 403


def test_sign_out_and_disabling_end_the_session_on_the_next_request(
    client: Any, as_user: Any, alice_password: str, conn: psycopg.Connection[Any]
) -> None:
    csrf = sign_in(client).json()["csrf_token"]
    secret = client.cookies[SESSION]
    assert me_with(client, secret) == 200
    assert client.delete("/api/v1/session").status_code == 403  # sign-out is a change too
    out = client.delete("/api/v1/session", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 204
    assert 'pgsched_session=""' in out.headers["set-cookie"] or "Max-Age=0" in out.headers["set-cookie"]
    client.cookies.clear()
    assert me_with(client, secret) == 401  # revoked
    # Disabled by an admin: the next request with its session is refused.
    sign_in(client)
    assert client.get("/api/v1/me").status_code == 200
    changed = client.patch(f"/api/v1/users/{user_id(conn, 'alice')}", json={"disabled": True}, headers=as_user("root"))
    assert changed.status_code == 200
    assert client.get("/api/v1/me").status_code == 401


def test_a_session_ends_when_idle_or_past_its_lifetime(
    client: Any, alice_password: str, conn: psycopg.Connection[Any]
) -> None:
    sign_in(client)
    assert client.get("/api/v1/me").status_code == 200
    # 12 hours without a request (the default idle limit).
    conn.execute("UPDATE pgsched.api_sessions SET last_seen_at = now() - interval '12 hours 1 minute'")
    assert client.get("/api/v1/me").status_code == 401
    client.cookies.clear()
    sign_in(client)
    conn.execute("UPDATE pgsched.api_sessions SET expires_at = now() - interval '1 second' WHERE revoked_at IS NULL")
    assert client.get("/api/v1/me").status_code == 401
    # A request keeps a session alive: last_seen_at moves (at most once a minute).
    client.cookies.clear()
    sign_in(client)
    conn.execute("UPDATE pgsched.api_sessions SET last_seen_at = now() - interval '11 hours'")
    assert client.get("/api/v1/me").status_code == 200
    seen = conn.execute("SELECT max(last_seen_at) > now() - interval '1 minute' FROM pgsched.api_sessions").fetchone()
    assert seen == (True,)


def test_repeated_failures_are_rate_limited(client: Any, alice_password: str) -> None:
    client.app.state.failed_authentications.limit = 3
    for _ in range(3):
        assert sign_in(client, password="not the password at all").status_code == 401
    limited = sign_in(client)  # the right password, too late
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert SESSION not in limited.cookies


def test_a_user_changes_its_own_password_with_the_current_one(
    client: Any, as_user: Any, alice_password: str, conn: psycopg.Connection[Any]
) -> None:
    other_secret = sign_in(client).cookies[SESSION]  # signed in elsewhere too
    client.cookies.clear()
    sign_in(client)
    assert me_with(client, other_secret) == 200
    csrf = client.get("/api/v1/me").json()["csrf_token"]
    before = stored_hash(conn, "alice")
    change = "/api/v1/me/password"
    headers = {"X-CSRF-Token": csrf}
    wrong = client.put(
        change, json={"current_password": "a wrong one, long", "new_password": "n" * 20}, headers=headers
    )
    assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "current_password"
    short = client.put(change, json={"current_password": PASSWORD, "new_password": "short"}, headers=headers)
    assert short.status_code == 422 and short.json()["error"]["field"] == "new_password"
    assert stored_hash(conn, "alice") == before  # nothing changed
    done = client.put(change, json={"current_password": PASSWORD, "new_password": "a new passphrase"}, headers=headers)
    assert done.status_code == 204, done.text
    assert client.get("/api/v1/me").status_code == 200  # this session goes on
    assert me_with(client, other_secret) == 401  # the others end
    client.cookies.clear()
    assert sign_in(client).status_code == 401
    assert sign_in(client, password="a new passphrase").status_code == 201
    # A user with no password gets its first from an admin, not by itself.
    vera = client.put(change, json={"current_password": "", "new_password": "n" * 20}, headers=as_user("vera"))
    assert vera.status_code == 422 and stored_hash(conn, "vera") is None


def test_only_an_admin_sets_a_password_and_the_length_rule_names_the_field(
    client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    url = f"/api/v1/users/{user_id(conn, 'bob')}/password"
    assert client.put(url, json={"password": PASSWORD}, headers=as_user("ops")).status_code == 403
    short = client.put(url, json={"password": "eleven char"}, headers=as_user("root"))
    assert short.status_code == 422 and short.json()["error"]["field"] == "password"
    assert stored_hash(conn, "bob") is None
    assert (
        client.put("/api/v1/users/999/password", json={"password": PASSWORD}, headers=as_user("root")).status_code
        == 404
    )
    assert client.put(url, json={"password": "twelve chars"}, headers=as_user("root")).status_code == 204
    assert sign_in(client, "bob", "twelve chars").status_code == 201


def test_an_old_hash_is_replaced_at_sign_in(client: Any, conn: psycopg.Connection[Any]) -> None:
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
    conn.execute("UPDATE pgsched.users SET password_hash = %s WHERE username = 'alice'", (cheap,))
    assert sign_in(client).status_code == 201
    rehashed = stored_hash(conn, "alice")
    assert rehashed != cheap and not PasswordHasher().check_needs_rehash(rehashed)
    assert PasswordHasher().verify(rehashed, PASSWORD)


def test_sign_in_sign_out_and_password_changes_are_audited(
    client: Any, as_user: Any, alice_password: str, conn: psycopg.Connection[Any]
) -> None:
    csrf = sign_in(client).json()["csrf_token"]
    client.delete("/api/v1/session", headers={"X-CSRF-Token": csrf})
    rows = conn.execute(
        "SELECT actor, action, target_id, after, request_id IS NOT NULL, client_addr IS NOT NULL"
        " FROM pgsched.audit_log WHERE action LIKE 'session.%%' OR action = 'user.password' ORDER BY id"
    ).fetchall()
    alice = str(user_id(conn, "alice"))
    session = conn.execute("SELECT id FROM pgsched.api_sessions").fetchone()[0]
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in rows] == [
        ("root", "user.password", alice, True, True),
        ("alice", "session.start", alice, True, True),
        ("alice", "session.end", alice, True, True),
    ]
    assert rows[1][3] == {"session": session, "via": "password"} and rows[2][3] == {"session": session}
    assert "argon2" not in str(rows)


def test_cli_sets_a_password(client: Any, dsn: str, conn: psycopg.Connection[Any]) -> None:
    env = {"PGSCHED_DSN": dsn, "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "pgsched", "users", "set-password"]

    def cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], input=stdin, env=env, capture_output=True, text=True, timeout=60)

    short = cli("alice", "--password-stdin", stdin="too short\n")
    assert short.returncode == 1 and short.stderr.strip().splitlines() == [
        "Error: password: must be 12 to 1024 characters long"
    ]
    assert stored_hash(conn, "alice") is None
    unknown = cli("nobody", "--password-stdin", stdin=PASSWORD + "\n")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
    done = cli("alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert done.returncode == 0 and "alice" in done.stdout, done.stderr
    typed = cli("bob", stdin=f"{PASSWORD}2\n{PASSWORD}2\n")  # asked twice
    assert typed.returncode == 0, typed.stderr
    assert sign_in(client).status_code == 201 and sign_in(client, "bob", PASSWORD + "2").status_code == 201
    actors = conn.execute("SELECT actor FROM pgsched.audit_log WHERE action = 'user.password'").fetchall()
    assert len(actors) == 2 and all(actor.startswith("db:") for (actor,) in actors)


def test_the_cookie_is_secure_over_tls(client: Any, alice_password: str) -> None:
    client.base_url = "https://testserver.local"  # as uvicorn reports a request with --tls-cert
    response = sign_in(client)
    assert response.status_code == 201 and "Secure" in response.headers["set-cookie"]
    assert client.get("/api/v1/me").json()["username"] == "alice"
