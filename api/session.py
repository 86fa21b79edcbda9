"""Signing in with a password: ``POST /session`` starts a browser session (a cookie),
``DELETE /session`` ends it; passwords are changed by their user (with the current one) or set
by an admin.

The cookie is HttpOnly (scripts cannot read it), SameSite=Lax (not sent on a cross-site form
post), and Secure when the API is served over TLS. Its CSRF token comes in the sign-in's body
and from ``GET /me``; ``access.authenticate`` checks it on every unsafe request made with the
cookie. ``start_session`` is shared with the OIDC sign-in.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, Response, delete, post, put
from litestar.datastructures import Cookie
from litestar.params import FromPath, JSONBody

from pgsched.accounts import Audit, User
from pgsched.config import Settings
from pgsched.db import run_async
from pgsched.passwords import (
    check_password,
    hash_password,
    op_password_hash,
    op_rehash,
    op_set_password,
    op_user_and_hash,
    rehashed,
    verify_password,
)
from pgsched.sessions import op_end_session, op_start_session

from .access import (
    PUBLIC,
    SESSION_COOKIE,
    CurrentUser,
    failed_authentication,
    refuse_if_limited,
    roles,
    session_of,
)
from .account import audit_of
from .database import Database
from .errors import ApiError, unauthorized


class SignIn(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str


class SignedIn(msgspec.Struct):
    """A session just started; its secret is in the cookie, never in a body."""

    username: str
    role: str
    csrf_token: str
    expires_at: datetime


class PasswordChange(msgspec.Struct, forbid_unknown_fields=True):
    current_password: str
    new_password: str


class PasswordSet(msgspec.Struct, forbid_unknown_fields=True):
    password: str


def session_cookie(request: Request[Any, Any, Any], value: str, max_age: int) -> Cookie:
    return Cookie(
        key=SESSION_COOKIE,
        value=value,
        path="/",
        max_age=max_age,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


async def start_session(
    request: Request[Any, Any, Any], user: User, via: str, **details: Any
) -> tuple[SignedIn, Cookie]:
    """Start a session of ``user`` (audited as ``session.start``): what to answer, and its cookie."""
    settings: Settings = request.app.state.settings
    db: Database = request.app.state.db
    lifetime, idle = settings.session_lifetime_seconds, settings.session_idle_seconds
    async with db.acting_for(user) as conn:
        op = op_start_session(audit_of(request, user), user, via, lifetime, idle, details)
        session = await run_async(conn, op)
    cookie = session_cookie(request, session.secret, int(lifetime))
    return SignedIn(user.username, user.role, session.csrf_token, session.expires_at), cookie


@post("/session", status_code=201, summary="Sign in with a user name and password (sets the session cookie)",
      tags=["session"], opt=PUBLIC)  # fmt: skip
async def sign_in(request: Request[Any, Any, Any], data: JSONBody[SignIn]) -> Response[SignedIn]:
    refuse_if_limited(request)
    if request.content_type[0] != "application/json":
        # A form of another site may post text/plain that reads as JSON, but may not say
        # application/json without the browser asking this API first (CORS): no login CSRF.
        raise ApiError(415, "sign in with a JSON body (Content-Type: application/json)")
    db: Database = request.app.state.db
    async with db.connection() as conn:
        user, stored = await run_async(conn, op_user_and_hash(data.username[:200]))
    # Verified even with no such user (against a dummy hash): the answer takes as long either way.
    valid = await asyncio.to_thread(verify_password, stored, data.password)
    if not valid or user is None or user.disabled or stored is None:
        failed_authentication(request)
        raise unauthorized()
    new_hash = await asyncio.to_thread(rehashed, stored, data.password)
    if new_hash:
        async with db.acting_for(user) as conn:
            await run_async(conn, op_rehash(user, stored, new_hash))
    signed_in, cookie = await start_session(request, user, "password")
    return Response(signed_in, status_code=201, cookies=[cookie])


@delete(
    "/session",
    summary="Sign out: end the session of the cookie and clear it",
    tags=["session"],
    response_cookies=[Cookie(key=SESSION_COOKIE, value="", path="/", max_age=0, expires=0, httponly=True)],
)
async def sign_out(request: Request[Any, Any, Any], user: CurrentUser) -> None:
    """With a bearer token there is no session to end (revoke tokens with DELETE /tokens/{id})."""
    session = session_of(request)
    if session is not None:
        db: Database = request.app.state.db
        async with db.acting_for(user) as conn:
            await run_async(conn, op_end_session(audit_of(request, user), user, session[0]))


@put(
    "/me/password",
    status_code=204,
    summary="Change the caller's password (the current one is required)",
    tags=["session"],
)
async def change_password(request: Request[Any, Any, Any], user: CurrentUser, data: JSONBody[PasswordChange]) -> None:
    refuse_if_limited(request)
    check_password(data.new_password, "new_password")
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        stored = await run_async(conn, op_password_hash(user.id))
    if not await asyncio.to_thread(verify_password, stored, data.current_password):
        failed_authentication(request)
        raise ApiError(
            422,
            "is not this user's password (a user without one gets its first from an admin)",
            field="current_password",
        )
    session = session_of(request)
    await _store(request, user, user.id, data.new_password, session[0] if session else None)


@put(
    "/users/{user_id:int}/password",
    status_code=204,
    summary="Set a user's password",
    tags=["users"],
    opt=roles("admin"),
)
async def set_password(
    request: Request[Any, Any, Any], user: CurrentUser, user_id: FromPath[int], data: JSONBody[PasswordSet]
) -> None:
    check_password(data.password)
    if not await _store(request, user, user_id, data.password):
        raise ApiError(404, f"user {user_id} does not exist")


async def _store(
    request: Request[Any, Any, Any], actor: User, user_id: int, password: str, keep_session: int | None = None
) -> bool:
    """Hash and store a password (its user's other sessions end); False: no such user."""
    new_hash = await asyncio.to_thread(hash_password, password)
    db: Database = request.app.state.db
    audit: Audit = audit_of(request, actor)
    async with db.acting_for(actor) as conn:
        return await run_async(conn, op_set_password(audit, user_id, new_hash, keep_session)) is not None
