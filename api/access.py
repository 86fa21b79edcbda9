"""Who is calling, and whether their role may call this route.

One guard on the ``/api/v1`` router authenticates the bearer token (401, one body for every
cause) and checks the route's ``opt["roles"]`` (403). Routes read the user from the ``user``
dependency.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler
from litestar.params import SkipValidation

from pgsched.accounts import ROLES, User, op_authenticate
from pgsched.db import run_async

from .database import Database
from .errors import ApiError, unauthorized

EVERY_ROLE = frozenset(ROLES)
WRITERS = frozenset({"admin", "operator", "member"})


def roles(*names: str) -> dict[str, Any]:
    """The ``opt`` of a route open to these roles only."""
    return {"roles": frozenset(names)}


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard: a valid token of an enabled user, whose role the route allows."""
    header = connection.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise unauthorized()
    db: Database = connection.app.state.db
    async with db.connection() as conn:
        user = await run_async(conn, op_authenticate(secret.strip()))
    if user is None:
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
