"""Who is calling, and whether their role may call this route.

One guard on the ``/api/v1`` router authenticates the bearer token (401, one body for every
cause) and checks the route's ``opt["roles"]`` (403). Routes read the user from the ``user``
dependency. A client address with too many failed authentications in a minute gets 429 with
``Retry-After`` for every request until the minute has passed (``FailedAuthentications``).
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
from litestar.handlers.base import BaseRouteHandler
from litestar.params import SkipValidation

from pgsched.accounts import ROLES, User, op_authenticate
from pgsched.db import run_async
from pgsched.validation import EXECUTOR_KINDS

from .database import Database
from .errors import ApiError, unauthorized

EVERY_ROLE = frozenset(ROLES)
WRITERS = frozenset({"admin", "operator", "member"})


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
    """Guard: a valid token of an enabled user, whose role the route allows."""
    limiter: FailedAuthentications = connection.app.state.failed_authentications
    client = connection.client.host if connection.client else "unknown"
    wait = limiter.retry_after(client)
    if wait is not None:
        raise ApiError(429, "too many failed authentications from this address", headers={"Retry-After": str(wait)})
    header = connection.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    user = None
    if scheme.lower() == "bearer" and secret.strip():
        db: Database = connection.app.state.db
        async with db.connection() as conn:
            user = await run_async(conn, op_authenticate(secret.strip()))
    if user is None:
        limiter.failed(client)
        raise unauthorized()
    connection.state.user = user
    allowed = handler.opt.get("roles", EVERY_ROLE)
    if user.role not in allowed:
        raise ApiError(403, f"the {user.role} role may not do this")


def current_user(request: Request[Any, Any, Any]) -> User:
    """Dependency: the authenticated user (set by the guard)."""
    user: User = request.state.user
    return user


# How a route asks for the caller: ``user: CurrentUser``.
CurrentUser = NamedDependency[SkipValidation[User]]
