"""``/me`` and the caller's own API tokens: create (the secret is shown once), list, revoke."""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
from litestar import Request, delete, get, post
from litestar.params import FromPath, JSONBody

from pgsched.accounts import Audit, Token, User, op_audit, op_create_token, op_list_tokens, op_revoke_token
from pgsched.db import run_async
from pgsched.sessions import csrf_token

from .access import CurrentUser, session_of
from .database import Database, write
from .errors import ApiError


class Me(msgspec.Struct, omit_defaults=True):
    """The caller; ``csrf_token`` only for a request signed in with the session cookie."""

    id: int
    username: str
    role: str
    may_create_commands: bool
    csrf_token: str | None = None


class TokenCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class NewToken(msgspec.Struct):
    """A token just created: ``token`` is its secret, shown this once and never again."""

    token: str
    id: int
    name: str
    prefix: str


def audit_of(request: Request[Any, Any, Any], user: CurrentUser) -> Audit:
    """Who makes a change, and from where, for its audit row."""
    client = request.client.host if request.client else None
    return Audit(actor=user.username, request_id=request.state.request_id, client_addr=client)


async def write_audit(
    conn: psycopg.AsyncConnection[Any],
    request: Request[Any, Any, Any],
    user: User,
    action: str,
    target_type: str,
    target_id: Any,
    before: Any = None,
    after: Any = None,
) -> None:
    """The audit row of a change, in the request's transaction (with its COMMIT when pipelined)."""
    await write(conn, op_audit(audit_of(request, user), action, target_type, target_id, before, after))


@get("/me", summary="The caller", tags=["users"])
async def me(request: Request[Any, Any, Any], user: CurrentUser) -> Me:
    session = session_of(request)
    return Me(
        id=user.id,
        username=user.username,
        role=user.role,
        may_create_commands=user.may_create_commands,
        csrf_token=csrf_token(session[1]) if session else None,
    )


@get("/tokens", summary="The caller's tokens (never their secrets)", tags=["tokens"])
async def list_tokens(request: Request[Any, Any, Any], user: CurrentUser) -> list[Token]:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        return await run_async(conn, op_list_tokens(user))


@post("/tokens", summary="Create a token for the caller; its secret is in this response only", tags=["tokens"])
async def create_token(request: Request[Any, Any, Any], user: CurrentUser, data: JSONBody[TokenCreate]) -> NewToken:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        token, secret = await run_async(conn, op_create_token(audit_of(request, user), user, data.name))
    return NewToken(token=secret, id=token.id, name=token.name, prefix=token.prefix)


@delete("/tokens/{token_id:int}", status_code=200, summary="Revoke one of the caller's tokens", tags=["tokens"])
async def revoke_token(request: Request[Any, Any, Any], user: CurrentUser, token_id: FromPath[int]) -> Token:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        token = await run_async(conn, op_revoke_token(audit_of(request, user), user, token_id))
    if token is None:
        raise ApiError(404, f"token {token_id} does not exist")
    return token
