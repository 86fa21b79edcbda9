"""Who is calling, and whether their role may call this route.

One guard on the ``/api/v1`` router authenticates the bearer token, or else the session cookie
of a signed-in browser (401, one body for every cause), and checks the route's ``opt["roles"]``
(403). A cookie is ambient (the browser sends it on a forged request too): with one, an unsafe
method also needs the session's CSRF token in ``X-CSRF-Token`` (403). Routes read the user from
the ``user`` dependency. A client address with too many failed authentications in a minute gets
429 with ``Retry-After`` for every request until the minute has passed (``FailedAuthentications``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, WebSocketException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import SkipValidation

from pgsched.accounts import ROLES, User, op_authenticate
from pgsched.db import run_async
from pgsched.sessions import csrf_matches, op_authenticate_session
from pgsched.validation import EXECUTOR_KINDS

from .database import Database
from .errors import ApiError, unauthorized

EVERY_ROLE = frozenset(ROLES)
WRITERS = frozenset({"admin", "operator", "member"})
SESSION_COOKIE = "pgsched_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# The ``opt`` of a route that answers without a token: signing in (it counts its own failures).
PUBLIC = {"public": True}


def roles(*names: str) -> dict[str, Any]:
    """The ``opt`` of a route open to these roles only."""
    return {"roles": frozenset(names)}


def may_create(user: User, task: str, field: str = "task") -> None:
    """403 unless ``user`` may create jobs of ``task`` (shell and http jobs need may_create_commands)."""
    if task in EXECUTOR_KINDS and not user.may_create_commands:
        raise ApiError(403, f"{user.username!r} may not create {task} jobs", field=field)


class FailedAuthentications:
    """Failed authentications per client address over a sliding window, in this process's memory.

    Over ``limit``, every request from that address is refused (valid tokens too: otherwise a
    guess that succeeds would stand out from the refusals) until its oldest failure leaves the
    window. A process clock is fine here: nothing is shared or persisted."""

    MAX_CLIENTS = 100_000  # addresses remembered at most; the oldest are forgotten first

    def __init__(self, limit: int = 20, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again (None: it may now)."""
        failures = self._failures.get(client)
        if not failures:
            return None
        now = self.clock()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        if len(failures) < self.limit:
            return None
        return max(1, math.ceil(failures[0] + self.window - now))

    def failed(self, client: str) -> None:
        if client not in self._failures and len(self._failures) >= self.MAX_CLIENTS:
            del self._failures[next(iter(self._failures))]
        self._failures.setdefault(client, deque()).append(self.clock())


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard: a valid token or session of an enabled user, whose role the route allows (routes
    marked ``PUBLIC`` answer anyone). A WebSocket is refused with close code 4000 + the HTTP
    status (4401, 4403, 4429) and the message as reason."""
    try:
        await _authenticate(connection, handler)
    except HTTPException as exc:
        if connection.scope["type"] == "websocket":
            raise WebSocketException(detail=exc.detail, code=4000 + exc.status_code) from exc
        raise


async def _authenticate(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    if handler.opt.get("public"):
        return
    refuse_if_limited(connection)
    header = connection.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    user = None
    if scheme.lower() == "bearer" and secret.strip():
        db: Database = connection.app.state.db
        async with db.connection() as conn:
            user = await run_async(conn, op_authenticate(secret.strip()))
    elif not header and (cookie := connection.cookies.get(SESSION_COOKIE)):
        user = await _session_user(connection, cookie)
    if user is None:
        failed_authentication(connection)
        raise unauthorized()
    connection.state.user = user
    allowed = handler.opt.get("roles", EVERY_ROLE)
    if user.role not in allowed:
        raise ApiError(403, f"the {user.role} role may not do this")


def client_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    return connection.client.host if connection.client else "unknown"


def refuse_if_limited(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """429 with Retry-After while the caller's address has too many failed authentications."""
    limiter: FailedAuthentications = connection.app.state.failed_authentications
    wait = limiter.retry_after(client_of(connection))
    if wait is not None:
        raise ApiError(429, "too many failed authentications from this address", headers={"Retry-After": str(wait)})


def failed_authentication(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """Count a failure (a wrong token, cookie or password) toward the caller's limit."""
    connection.app.state.failed_authentications.failed(client_of(connection))


async def _session_user(connection: ASGIConnection[Any, Any, Any, Any], secret: str) -> User | None:
    """The user of a live session (None: whatever the cause); 403 for an unsafe method without
    the session's CSRF token. The session is kept in ``connection.state.session``."""
    db: Database = connection.app.state.db
    async with db.connection() as conn:
        idle = connection.app.state.settings.session_idle_seconds
        found = await run_async(conn, op_authenticate_session(secret, idle))
    if found is None:
        return None
    user, session_id = found
    if connection.scope.get("method") not in SAFE_METHODS and not csrf_matches(
        secret, connection.headers.get(CSRF_HEADER)
    ):
        raise ApiError(
            403,
            f"a request signed in by the session cookie must send its CSRF token in the {CSRF_HEADER} header "
            "(returned at sign-in and by GET /api/v1/me)",
            code="csrf_failed",
        )
    connection.state.session = (session_id, secret)
    return user


def session_of(request: Request[Any, Any, Any]) -> tuple[int, str] | None:
    """The id and secret of the session that authenticated ``request`` (None: a bearer token)."""
    session: tuple[int, str] | None = getattr(request.state, "session", None)
    return session


def current_user(request: Request[Any, Any, Any]) -> User:
    """Dependency: the authenticated user (set by the guard)."""
    user: User = request.state.user
    return user


# How a route asks for the caller: ``user: CurrentUser``.
CurrentUser = NamedDependency[SkipValidation[User]]
