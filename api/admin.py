"""What only admins do: manage users (create, list, change role, disable) and read the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get, patch, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from pgsched.accounts import Role, User, op_create_user, op_list_users, op_update_user
from pgsched.db import run_async

from .access import CurrentUser, roles
from .account import audit_of
from .database import Database
from .errors import ApiError

MAX_PAGE = 500


class UserCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    username: str
    role: Role = "member"
    may_create_commands: bool = False


class UserUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fields to change; those left out stay."""

    role: Role | None = None
    disabled: bool | None = None
    may_create_commands: bool | None = None


class AuditEntry(msgspec.Struct):
    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str | None
    before: Any
    after: Any
    request_id: str | None
    client_addr: str | None


class AuditPage(msgspec.Struct):
    entries: list[AuditEntry]
    next_cursor: str | None


# Newest first by primary key, after a cursor; each filter optional (audit_log_target_idx for a target).
AUDIT = """
SELECT id, at, actor, action, target_type, target_id, before, after, request_id, client_addr
FROM pgsched.audit_log
WHERE (%(actor)s::text IS NULL OR actor = %(actor)s)
  AND (%(action)s::text IS NULL OR action = %(action)s)
  AND (%(target_type)s::text IS NULL OR target_type = %(target_type)s)
  AND (%(target_id)s::text IS NULL OR target_id = %(target_id)s)
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
ORDER BY id DESC
LIMIT %(limit)s
"""


@get("/users", summary="Every user", tags=["users"], opt=roles("admin"))
async def list_users(request: Request[Any, Any, Any], user: CurrentUser) -> list[User]:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        return await run_async(conn, op_list_users())


@post("/users", status_code=201, summary="Create a user", tags=["users"], opt=roles("admin"))
async def create_user(request: Request[Any, Any, Any], user: CurrentUser, data: JSONBody[UserCreate]) -> User:
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        op = op_create_user(audit_of(request, user), data.username, data.role, data.may_create_commands)
        return await run_async(conn, op)


@patch("/users/{user_id:int}", summary="Change a user's role, permission or access", tags=["users"], opt=roles("admin"))
async def update_user(
    request: Request[Any, Any, Any], user: CurrentUser, user_id: FromPath[int], data: JSONBody[UserUpdate]
) -> User:
    changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not None}
    if user_id == user.id and (changes.get("disabled") or changes.get("role", "admin") != "admin"):
        raise ApiError(
            422, "an admin may not disable or demote itself", field="role" if "role" in changes else "disabled"
        )
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        updated = await run_async(conn, op_update_user(audit_of(request, user), user_id, changes))
    if updated is None:
        raise ApiError(404, f"user {user_id} does not exist")
    return updated


@get("/audit", summary="The audit log, newest first", tags=["audit"], opt=roles("admin"))
async def list_audit(
    request: Request[Any, Any, Any],
    user: CurrentUser,
    actor: FromQuery[str | None] = None,
    action: FromQuery[str | None] = None,
    target_type: FromQuery[str | None] = None,
    target_id: FromQuery[str | None] = None,
    cursor: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(description=f"Entries per page, at most {MAX_PAGE}")] = 50,
) -> AuditPage:
    if cursor is not None and (not cursor.isdigit() or len(cursor) > 19):
        raise ApiError(422, "not a cursor returned by this endpoint", field="cursor")
    limit = max(1, min(limit, MAX_PAGE))
    params = {
        "actor": actor,
        "action": action,
        "target_type": target_type,
        "target_id": target_id,
        "before": int(cursor) if cursor else None,
        "limit": limit + 1,
    }
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        rows = await (await conn.execute(AUDIT, params)).fetchall()
    entries = [AuditEntry(*row) for row in rows[:limit]]
    return AuditPage(entries=entries, next_cursor=str(entries[-1].id) if len(rows) > limit else None)
