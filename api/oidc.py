"""Signing in through an OpenID Connect provider (any, by its discovery URL), with Authlib.

``GET /oidc/login`` redirects the browser to the provider: authorization code flow with PKCE
(S256), a state and a nonce. The state is kept twice: in a short-lived HttpOnly cookie of this
browser, and (only its SHA-256) in ``pgsched.oidc_logins`` with the nonce and the code verifier,
for any process of the API to find, once. ``GET /oidc/callback`` requires both, exchanges the
code, validates the ID token (signature against the provider's JWKS, issuer, audience, expiry,
nonce), links the user by issuer and subject (created on its first sign-in), sets its role from
the configured claim, and starts the same session as a password sign-in.

A refused callback answers the one 401 of the API, counts toward the address's failed
authentications, and leaves an ``oidc.refused`` audit row saying why (a bad signature, a wrong
audience, an expired token, a missing or replayed state...).
"""

from __future__ import annotations

import logging
import warnings
from typing import Annotated, Any, NoReturn, cast

import httpx
from authlib.integrations.base_client import BaseApp, OAuthError
from authlib.integrations.base_client.async_app import AsyncOAuth2Mixin
from authlib.integrations.base_client.async_openid import AsyncOpenIDMixin
from joserfc.errors import JoseError
from litestar import Request, get
from litestar.datastructures import Cookie
from litestar.params import FromQuery, QueryParameter
from litestar.response import Redirect

from pgsched.accounts import Audit, Role, op_audit
from pgsched.config import Settings
from pgsched.db import run_async
from pgsched.errors import ConfigError
from pgsched.sessions import op_begin_oidc_login, op_oidc_user, op_take_oidc_login, role_from_claim

from .access import PUBLIC, client_of, failed_authentication, refuse_if_limited
from .database import Database
from .errors import ApiError, unauthorized
from .session import start_session

# Authlib 1.9 prefers the httpx2 fork and warns when it falls back to httpx, which pgsched's core
# already depends on and which works the same here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client

log = logging.getLogger("pgsched.api")

STATE_COOKIE = "pgsched_oidc_state"
LOGIN_SECONDS = 600  # how long a sign-in may stay at the provider
CALLBACK_PATH = "/api/v1/oidc"  # the state cookie goes to these routes only


class Refused(Exception):
    """An OIDC callback that does not sign anybody in; the message says why (for the audit)."""


class _Provider(AsyncOAuth2Mixin, AsyncOpenIDMixin, BaseApp):
    """Authlib's client of one provider: discovery, the authorization URL, the code exchange, the
    ID token's validation. The framework integrations keep state in a server-side session; this
    API keeps it in the database instead, so none is needed."""

    client_cls = AsyncOAuth2Client


class Oidc:
    """The provider of the settings, and what to do with its users."""

    def __init__(self, settings: Settings) -> None:
        missing = [name for name in ("oidc_client_id", "oidc_redirect_url") if not getattr(settings, name)]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise ConfigError(f"--oidc-discovery-url is set: {flags} must be set too (docs/api.md, OIDC)")
        self.client_id: str = cast(str, settings.oidc_client_id)
        self.redirect_url: str = cast(str, settings.oidc_redirect_url)
        self.username_claim = settings.oidc_username_claim
        self.role_claim = settings.oidc_role_claim
        self.roles = cast(dict[str, Role], settings.oidc_role_map)
        self.default_role = cast(Role, settings.oidc_default_role)
        self.landing_path = settings.oidc_landing_path
        self.provider = _Provider(
            framework=None,
            client_id=settings.oidc_client_id,
            client_secret=settings.oidc_client_secret,
            server_metadata_url=settings.oidc_discovery_url,
            client_kwargs={"scope": settings.oidc_scopes, "code_challenge_method": "S256", "timeout": 10.0},
        )

    async def verified_claims(self, code: str, nonce: str, code_verifier: str) -> dict[str, Any]:
        """The claims of the ID token that the provider gives for ``code``, validated (Refused)."""
        try:
            token = await self.provider.fetch_access_token(
                redirect_uri=self.redirect_url, code=code, code_verifier=code_verifier
            )
        except (OAuthError, httpx.HTTPError, ValueError) as exc:
            raise Refused(f"the code exchange failed: {exc}") from None
        metadata = await self.provider.load_server_metadata()
        # Audience and issuer stated here: Authlib alone would accept a token for another
        # audience that names this client as its authorized party (azp).
        options = {
            "iss": {"essential": True, "values": [metadata.get("issuer")]},
            "aud": {"essential": True, "values": [self.client_id]},
            "sub": {"essential": True},
            "exp": {"essential": True},
        }
        try:
            claims = await self.provider.parse_id_token(token, nonce=nonce, claims_options=options, leeway=60)
        except JoseError as exc:
            raise Refused(str(exc).rstrip(": ")) from None
        if claims is None:
            raise Refused("the provider's answer has no ID token")
        return dict(claims)


def _oidc(request: Request[Any, Any, Any]) -> Oidc:
    oidc: Oidc | None = request.app.state.oidc
    if oidc is None:
        raise ApiError(404, "OIDC sign-in is not configured on this server (docs/api.md, OIDC)")
    return oidc


@get("/oidc/login", status_code=302, summary="Sign in through the OpenID provider (a redirect to it)", tags=["session"],
     opt=PUBLIC)  # fmt: skip
async def oidc_login(request: Request[Any, Any, Any]) -> Redirect:
    oidc = _oidc(request)
    try:
        started = await oidc.provider.create_authorization_url(oidc.redirect_url)
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        log.warning("the OpenID provider's discovery failed: %s", exc)
        raise ApiError(503, "the OpenID provider cannot be reached") from None
    db: Database = request.app.state.db
    async with db.connection() as conn:
        op = op_begin_oidc_login(started["state"], started["nonce"], started["code_verifier"], LOGIN_SECONDS)
        await run_async(conn, op)
    cookie = Cookie(
        key=STATE_COOKIE,
        value=started["state"],
        path=CALLBACK_PATH,
        max_age=LOGIN_SECONDS,
        httponly=True,
        samesite="lax",  # sent on the provider's redirect back, a top-level navigation
        secure=request.url.scheme == "https",
    )
    return Redirect(started["url"], cookies=[cookie])


@get("/oidc/callback", status_code=302, summary="Where the OpenID provider sends the browser back", tags=["session"],
     opt=PUBLIC)  # fmt: skip
async def oidc_callback(
    request: Request[Any, Any, Any],
    code: FromQuery[str | None] = None,
    oauth_state: Annotated[str | None, QueryParameter(name="state")] = None,  # (state: Litestar's)
    error: FromQuery[str | None] = None,
) -> Redirect:
    oidc = _oidc(request)
    refuse_if_limited(request)
    db: Database = request.app.state.db
    try:
        claims = await _callback_claims(request, oidc, code, oauth_state, error)
        audit = Audit(
            actor=f"oidc:{claims['sub']}"[:200], request_id=request.state.request_id, client_addr=client_of(request)
        )
        role = role_from_claim(claims.get(oidc.role_claim) if oidc.role_claim else None, oidc.roles, oidc.default_role)
        async with db.connection() as conn, conn.transaction():
            op = op_oidc_user(audit, claims["iss"], claims["sub"], claims.get(oidc.username_claim), role)
            user = await run_async(conn, op)
        if user.disabled:
            raise Refused(f"user {user.username!r} is disabled")
    except Refused as exc:
        await _refuse(request, str(exc))
    _, cookie = await start_session(request, user, "oidc", issuer=claims["iss"])
    response = Redirect(oidc.landing_path, cookies=[cookie])
    response.delete_cookie(STATE_COOKIE, path=CALLBACK_PATH)
    return response


async def _callback_claims(
    request: Request[Any, Any, Any], oidc: Oidc, code: str | None, state: str | None, error: str | None
) -> dict[str, Any]:
    if error:
        raise Refused(f"the provider answered {error[:200]!r}")
    if not state:
        raise Refused("no state")
    if state != request.cookies.get(STATE_COOKIE):
        raise Refused("the state is not the one this browser was given")
    db: Database = request.app.state.db
    async with db.connection() as conn:
        login = await run_async(conn, op_take_oidc_login(state))
    if login is None:
        raise Refused("the state is unknown, expired or already used")
    if not code:
        raise Refused("no code")
    nonce, code_verifier = login
    return await oidc.verified_claims(code, nonce, code_verifier)


async def _refuse(request: Request[Any, Any, Any], reason: str) -> NoReturn:
    """Audit the refusal, count it as a failed authentication, answer 401."""
    log.warning("OIDC sign-in refused: %s", reason)
    audit = Audit(actor="anonymous", request_id=request.state.request_id, client_addr=client_of(request))
    db: Database = request.app.state.db
    async with db.connection() as conn:
        await run_async(conn, op_audit(audit, "oidc.refused", "oidc", None, after={"reason": reason[:500]}))
    failed_authentication(request)
    raise unauthorized()
