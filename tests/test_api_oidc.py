"""Signing in through OpenID Connect (docs/api.md, "OIDC") against real providers on loopback:
``oidc-provider-mock`` (a real provider, Authlib's own server code) for the flow, and a tiny
provider of this file's (discovery, JWKS and a token endpoint that signs what a case asks) for
ID tokens that no honest provider issues: a bad signature, a wrong audience or issuer, a wrong
nonce. Our side is the real app on the real database; nothing of Authlib is mocked."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import psycopg
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from pgsched import load_settings

pytestmark = pytest.mark.db

CLIENT_ID = "pgsched"
CALLBACK = "http://testserver.local/api/v1/oidc/callback"
LANDING = "/dashboard"


@contextmanager
def api_client(dsn: str, api_dsn: str, discovery_url: str) -> Iterator[Any]:
    """The API's test client, configured for the provider of ``discovery_url``."""
    from litestar.testing import TestClient

    from pgsched.api import create_app

    settings = load_settings(
        {
            "dsn": dsn,
            "api_dsn": api_dsn,
            "oidc_discovery_url": discovery_url,
            "oidc_client_id": CLIENT_ID,
            "oidc_client_secret": "client-secret",
            "oidc_redirect_url": CALLBACK,
            "oidc_role_claim": "groups",
            "oidc_roles": "sched-admins:admin,sched-ops:operator,sched-users:member",
            "oidc_landing_path": LANDING,
        }
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def mock_provider() -> Iterator[Callable[..., str]]:
    """Start oidc-provider-mock on loopback; returns its base URL (``start(**options)``)."""
    from oidc_provider_mock import run_server_in_thread

    with ExitStack() as stack:

        def start(**options: Any) -> str:
            server = stack.enter_context(run_server_in_thread(**options))
            return f"http://localhost:{server.server_port}"

        yield start


def discovery(base: str) -> str:
    return f"{base}/.well-known/openid-configuration"


def set_claims(base: str, sub: str, **claims: Any) -> None:
    """What the provider will say of ``sub`` (oidc-provider-mock's PUT /users/{sub})."""
    assert httpx.put(f"{base}/users/{sub}", json=claims).status_code == 204


def start_login(client: Any) -> str:
    """``GET /oidc/login``: the provider's authorization URL it redirects to."""
    login = client.get("/api/v1/oidc/login", follow_redirects=False)
    assert login.status_code == 302, login.text
    return str(login.headers["location"])


def at_provider(authorize_url: str, sub: str) -> str:
    """The user signs in at oidc-provider-mock as ``sub``: the callback URL it sends the browser to."""
    answer = httpx.post(authorize_url, data={"sub": sub}, follow_redirects=False)
    assert answer.status_code == 302, answer.text
    return str(answer.headers["location"])


def refusals(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("SELECT after->>'reason' FROM pgsched.audit_log WHERE action = 'oidc.refused' ORDER BY id")
    return [reason for (reason,) in rows.fetchall()]


def test_first_sign_in_creates_the_user_and_the_claim_sets_its_role(
    dsn: str, api_dsn: str, tokens: dict[str, str], mock_provider: Any, conn: psycopg.Connection[Any]
) -> None:
    base = mock_provider()
    set_claims(base, "sub-carol", preferred_username="carol", groups=["staff", "sched-ops"])
    with api_client(dsn, api_dsn, discovery(base)) as client:
        authorize = start_login(client)
        query = parse_qs(urlsplit(authorize).query)
        assert query["client_id"] == [CLIENT_ID] and query["redirect_uri"] == [CALLBACK]
        assert query["code_challenge_method"] == ["S256"] and query["nonce"] and query["state"]
        assert set(query["scope"][0].split()) == {"openid", "profile", "email"}
        signed_in = client.get(at_provider(authorize, "sub-carol"), follow_redirects=False)
        assert signed_in.status_code == 302 and signed_in.headers["location"] == LANDING, signed_in.text
        assert "HttpOnly" in signed_in.headers.get_list("set-cookie")[0]
        me = client.get("/api/v1/me").json()
        assert (me["username"], me["role"]) == ("carol", "operator") and me["csrf_token"]
        # Writes need the CSRF token, as after a password sign-in.
        assert client.post("/api/v1/jobs", json={"task": "noop"}).status_code == 403
        created = client.post("/api/v1/jobs", json={"task": "noop"}, headers={"X-CSRF-Token": me["csrf_token"]})
        assert created.status_code == 201 and created.json()["owner"] == "carol"
        row = conn.execute(
            "SELECT id, oidc_issuer, oidc_subject, password_hash FROM pgsched.users WHERE username = 'carol'"
        )
        carol, issuer, subject, password_hash = row.fetchone()
        assert (issuer, subject, password_hash) == (base, "sub-carol", None)

        # The provider moved her to another group: the next sign-in follows, same user.
        set_claims(base, "sub-carol", preferred_username="carol", groups=["sched-admins"])
        client.cookies.clear()
        client.get(at_provider(start_login(client), "sub-carol"), follow_redirects=False)
        again = client.get("/api/v1/me").json()
        assert (again["id"], again["username"], again["role"]) == (me["id"], "carol", "admin")
        # No group that maps: the default role (viewer).
        set_claims(base, "sub-dave", preferred_username="dave")
        client.cookies.clear()
        client.get(at_provider(start_login(client), "sub-dave"), follow_redirects=False)
        assert client.get("/api/v1/me").json()["role"] == "viewer"
    audit = conn.execute(
        "SELECT action, target_id, after->>'via' FROM pgsched.audit_log WHERE target_id = %s ORDER BY id", (str(carol),)
    ).fetchall()
    assert audit == [
        ("user.create", str(carol), None),
        ("session.start", str(carol), "oidc"),
        ("user.update", str(carol), None),
        ("session.start", str(carol), "oidc"),
    ]
    assert refusals(conn) == []


def test_a_user_is_linked_by_issuer_and_subject_never_by_name(
    dsn: str, api_dsn: str, tokens: dict[str, str], mock_provider: Any, conn: psycopg.Connection[Any]
) -> None:
    base = mock_provider()
    # Someone at the provider calls themself alice, like the local admin-made user alice.
    set_claims(base, "sub-mallory", preferred_username="alice", groups=["sched-users"])
    with api_client(dsn, api_dsn, discovery(base)) as client:
        alices_job = client.post(
            "/api/v1/jobs", json={"task": "noop"}, headers={"Authorization": f"Bearer {tokens['alice']}"}
        )
        client.get(at_provider(start_login(client), "sub-mallory"), follow_redirects=False)
        me = client.get("/api/v1/me").json()
        assert me["username"].startswith("alice-") and me["username"] != "alice"
        assert client.get(f"/api/v1/jobs/{alices_job.json()['id']}").status_code == 404


def test_an_expired_id_token_is_refused(
    dsn: str, api_dsn: str, tokens: dict[str, str], mock_provider: Any, conn: psycopg.Connection[Any]
) -> None:
    # The provider issues ID tokens that expired ten minutes before they were issued.
    base = mock_provider(access_token_max_age=timedelta(minutes=-10))
    with api_client(dsn, api_dsn, discovery(base)) as client:
        reference = client.get("/api/v1/me").json()  # the API's one 401
        refused = client.get(at_provider(start_login(client), "sub-erin"), follow_redirects=False)
        assert refused.status_code == 401 and refused.json() == reference
        assert client.get("/api/v1/me").status_code == 401
    assert [reason.split(":")[0] for reason in refusals(conn)] == ["expired_token"]
    assert conn.execute("SELECT count(*) FROM pgsched.users WHERE oidc_subject IS NOT NULL").fetchone()[0] == 0


def test_a_missing_foreign_or_replayed_state_is_refused(
    dsn: str, api_dsn: str, tokens: dict[str, str], mock_provider: Any, conn: psycopg.Connection[Any]
) -> None:
    base = mock_provider()
    with api_client(dsn, api_dsn, discovery(base)) as client:
        callback = at_provider(start_login(client), "sub-frank")
        code = parse_qs(urlsplit(callback).query)["code"][0]
        no_state = client.get(f"/api/v1/oidc/callback?{urlencode({'code': code})}", follow_redirects=False)
        assert no_state.status_code == 401
        # Another browser (without this one's state cookie) cannot finish this sign-in.
        state_cookie = client.cookies.get("pgsched_oidc_state")
        client.cookies.clear()
        assert client.get(callback, follow_redirects=False).status_code == 401
        client.cookies.set("pgsched_oidc_state", state_cookie, domain="testserver.local", path="/api/v1/oidc")
        assert client.get(callback, follow_redirects=False).status_code == 302  # this browser can, once
        session = client.cookies.get("pgsched_session")
        client.cookies.set("pgsched_oidc_state", state_cookie, domain="testserver.local", path="/api/v1/oidc")
        replayed = client.get(callback, follow_redirects=False)
        assert replayed.status_code == 401
        assert client.cookies.get("pgsched_session") == session  # no new session
        denied = client.get("/api/v1/oidc/callback?error=access_denied", follow_redirects=False)
        assert denied.status_code == 401
        # Refusals are failed authentications: enough of them and the address waits.
        client.app.state.failed_authentications.limit = 4  # the four refusals above
        limited = client.get("/api/v1/oidc/callback?error=access_denied", follow_redirects=False)
        assert limited.status_code == 429 and limited.headers["retry-after"]
    assert refusals(conn) == [
        "no state",
        "the state is not the one this browser was given",
        "the state is unknown, expired or already used",
        "the provider answered 'access_denied'",
    ]
    assert conn.execute("SELECT count(*) FROM pgsched.api_sessions").fetchone()[0] == 1


class TokenProvider:
    """A provider of our own on loopback (pytest-httpserver): discovery, JWKS with one key, and a
    token endpoint that answers with an ID token of the claims and key a case chooses."""

    def __init__(self, httpserver: Any) -> None:
        self.base = httpserver.url_for("/").rstrip("/")
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        self.signing_key = self.key
        self.claims: dict[str, Any] = {}
        self.token_requests: list[dict[str, list[str]]] = []
        httpserver.expect_request("/.well-known/openid-configuration").respond_with_json(
            {
                "issuer": self.base,
                "authorization_endpoint": f"{self.base}/authorize",
                "token_endpoint": f"{self.base}/token",
                "jwks_uri": f"{self.base}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )
        httpserver.expect_request("/jwks").respond_with_json({"keys": [self.key.as_dict(private=False)]})
        httpserver.expect_request("/token", method="POST").respond_with_handler(self.token)

    def token(self, request: Any) -> Any:
        from werkzeug import Response

        self.token_requests.append(parse_qs(request.get_data(as_text=True)))
        id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, self.claims, self.signing_key)
        body = {"access_token": "at-1", "token_type": "Bearer", "expires_in": 300, "id_token": id_token}
        return Response(json.dumps(body), content_type="application/json")

    def good_claims(self, nonce: str) -> dict[str, Any]:
        now = int(time.time())
        return {"iss": self.base, "aud": CLIENT_ID, "sub": "sub-gina", "iat": now, "exp": now + 300, "nonce": nonce}


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("good", None),
        ("bad signature", "bad_signature"),
        ("wrong audience", "invalid_claim: Invalid claim: 'aud'"),
        ("wrong issuer", "invalid_claim: Invalid claim: 'iss'"),
        ("expired", "expired_token: The token is expired"),
        ("wrong nonce", "invalid_claim: Invalid claim: 'nonce'"),
    ],
)
def test_id_tokens_that_fail_validation_are_refused(
    dsn: str,
    api_dsn: str,
    tokens: dict[str, str],
    httpserver: Any,
    conn: psycopg.Connection[Any],
    case: str,
    reason: str | None,
) -> None:
    provider = TokenProvider(httpserver)
    with api_client(dsn, api_dsn, f"{provider.base}/.well-known/openid-configuration") as client:
        query = parse_qs(urlsplit(start_login(client)).query)
        claims = provider.good_claims(query["nonce"][0])
        if case == "bad signature":  # another key, under the provider's key id
            provider.signing_key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        elif case == "wrong audience":  # for another client, naming this one as authorized party
            claims.update(aud="another-client", azp=CLIENT_ID)
        elif case == "wrong issuer":
            claims.update(iss="http://localhost:1")
        elif case == "expired":
            claims.update(iat=claims["iat"] - 900, exp=claims["iat"] - 600)
        elif case == "wrong nonce":
            claims.update(nonce="not-the-nonce")
        provider.claims = claims
        state = query["state"][0]
        answer = client.get(
            f"/api/v1/oidc/callback?{urlencode({'code': 'c-1', 'state': state})}", follow_redirects=False
        )
        assert answer.status_code == (302 if reason is None else 401), answer.text
        assert client.get("/api/v1/me").status_code == (200 if reason is None else 401)
    # PKCE: the code came with the verifier of the challenge sent to the provider.
    (sent,) = provider.token_requests
    verifier = sent["code_verifier"][0]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    assert challenge == query["code_challenge"][0] and sent["code"] == ["c-1"]
    assert refusals(conn) == ([] if reason is None else [reason])


def test_oidc_routes_answer_404_when_not_configured(client: Any) -> None:
    for path in ("/api/v1/oidc/login", "/api/v1/oidc/callback?code=x&state=y"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 404 and "not configured" in response.json()["error"]["message"]


def test_oidc_settings_are_checked_at_start_and_the_secret_never_shown(dsn: str, api_dsn: str) -> None:
    from pgsched import ConfigError
    from pgsched.api import create_app

    settings = load_settings({"dsn": dsn, "api_dsn": api_dsn, "oidc_discovery_url": "https://idp.example.com/x"})
    with pytest.raises(ConfigError, match="--oidc-client-id, --oidc-redirect-url must be set too"):
        create_app(settings)
    with pytest.raises(ConfigError, match=r"--oidc-roles / PGSCHED_OIDC_ROLES: .* \(got 'admins:root'\)"):
        load_settings(environ={"PGSCHED_OIDC_ROLES": "admins:admin,admins:root"})
    with pytest.raises(ConfigError, match="--oidc-landing-path"):
        load_settings(environ={"PGSCHED_OIDC_LANDING_PATH": "//evil.example.com/"})
    hidden = load_settings(environ={"PGSCHED_OIDC_CLIENT_SECRET": "hunter2-client"})
    assert hidden.oidc_client_secret == "hunter2-client" and "hunter2" not in repr(hidden)
