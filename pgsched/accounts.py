"""Users, API tokens and the audit log: what ``pgsched users|tokens`` and the REST API share.

Operations are generators of ``Query`` (``pgsched.db``), driven by a sync connection in the CLI
and an async one in the API, so each rule is written once.

Tokens are ``pgs_`` followed by 32 random bytes (URL-safe base64). Only their SHA-256 is stored:
with 256 bits of randomness a fast hash is as safe as a slow one (nobody can guess the input to
brute-force it), and it lets the API find a token with one index lookup on every request, where
a salted Argon2 hash would need a scan and ~50 ms of CPU per request. The first characters
(``prefix``) are kept in clear so that people can tell their tokens apart.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime
from typing import Any, Literal

import msgspec

from .config import ROLE_NAMES
from .db import Operation, Query
from .errors import ValidationError

Role = Literal["admin", "operator", "member", "viewer"]
ROLES: tuple[str, ...] = ROLE_NAMES
TOKEN_PREFIX = "pgs_"  # nosec B105: the public start of every token, not a secret
# pgs_ and 43 characters of base64: the prefix shows pgs_ and the first 8 of them.
DISPLAY_PREFIX_LENGTH = 12
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")


class User(msgspec.Struct, frozen=True):
    """A user of the API; ``username`` is the owner of the jobs it creates."""

    id: int
    username: str
    role: Role
    may_create_commands: bool
    disabled: bool


class Token(msgspec.Struct):
    """An API token as listed: never its secret."""

    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


USER_COLUMNS = "id, username, role, may_create_commands, disabled"
TOKEN_COLUMNS = "id, name, prefix, created_at, last_used_at, expires_at, revoked_at"  # nosec B105: column names

# Primary key / users_username_unique.
INSERT_USER = f"""
INSERT INTO pgsched.users (username, role, may_create_commands) VALUES (%s, %s, %s)
RETURNING {USER_COLUMNS}
"""
USER_BY_NAME = f"SELECT {USER_COLUMNS} FROM pgsched.users WHERE username = %s"
USER_BY_ID = f"SELECT {USER_COLUMNS} FROM pgsched.users WHERE id = %s FOR UPDATE"
LIST_USERS = f"SELECT {USER_COLUMNS} FROM pgsched.users ORDER BY username"
UPDATE_USER = f"""
UPDATE pgsched.users SET role = %s, disabled = %s, may_create_commands = %s, updated_at = pgsched.now()
WHERE id = %s
RETURNING {USER_COLUMNS}
"""
ANY_ADMIN = "SELECT EXISTS (SELECT 1 FROM pgsched.users WHERE role = 'admin' AND NOT disabled)"
# api_tokens_hash_unique: one index lookup per authenticated request.
AUTHENTICATE = """
SELECT u.id, u.username, u.role, u.may_create_commands, u.disabled
FROM pgsched.api_tokens t JOIN pgsched.users u ON u.id = t.user_id
WHERE t.token_hash = %s AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > pgsched.now())
  AND NOT u.disabled
"""
INSERT_TOKEN = f"""
INSERT INTO pgsched.api_tokens (user_id, name, token_hash, prefix) VALUES (%s, %s, %s, %s)
RETURNING {TOKEN_COLUMNS}
"""
# api_tokens_user_idx.
LIST_TOKENS = f"SELECT {TOKEN_COLUMNS} FROM pgsched.api_tokens WHERE user_id = %s ORDER BY id"
REVOKE_TOKEN = f"""
UPDATE pgsched.api_tokens SET revoked_at = COALESCE(revoked_at, pgsched.now())
WHERE id = %s AND user_id = %s
RETURNING {TOKEN_COLUMNS}
"""
INSERT_AUDIT = """
INSERT INTO pgsched.audit_log (actor, action, target_type, target_id, before, after, request_id, client_addr)
VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s)
"""


class Audit(msgspec.Struct, frozen=True):
    """Who makes a change, from where: written into every audit row."""

    actor: str
    request_id: str | None = None
    client_addr: str | None = None


def new_token() -> str:
    """A fresh secret token (shown once, never stored)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    """What is stored of a token (see the module docstring for why SHA-256)."""
    return hashlib.sha256(token.encode()).digest()


def check_username(username: Any) -> str:
    if not isinstance(username, str) or not _USERNAME.match(username):
        raise ValidationError("username", "must be 1 to 100 letters, digits or _.@- (starting with a letter or digit)")
    return username


def check_role(role: Any) -> Role:
    if role not in ROLES:
        raise ValidationError("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def check_token_name(name: Any) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        raise ValidationError("name", "must be a text of 1 to 200 characters")
    return name


def op_audit(
    audit: Audit, action: str, target_type: str, target_id: Any, before: Any = None, after: Any = None
) -> Operation[None]:
    """Append one audit row (in the caller's transaction)."""

    def encoded(value: Any) -> str | None:
        return None if value is None else msgspec.json.encode(value).decode()

    yield Query(
        INSERT_AUDIT,
        (
            audit.actor,
            action,
            target_type,
            None if target_id is None else str(target_id),
            encoded(before),
            encoded(after),
            audit.request_id,
            audit.client_addr,
        ),
    )


def _user(row: Any) -> User:
    return User(*row)


def op_create_user(audit: Audit, username: str, role: str, may_create_commands: bool = False) -> Operation[User]:
    """Create a user (ValidationError naming ``username`` when it exists)."""
    check_username(username)
    check_role(role)
    if (yield Query(USER_BY_NAME, (username,))):
        raise ValidationError("username", f"a user named {username!r} exists")
    user = _user((yield Query(INSERT_USER, (username, role, may_create_commands)))[0])
    yield from op_audit(audit, "user.create", "user", user.id, after=msgspec.to_builtins(user))
    return user


def op_list_users() -> Operation[list[User]]:
    return [_user(row) for row in (yield Query(LIST_USERS))]


def op_update_user(audit: Audit, user_id: int, changes: dict[str, Any]) -> Operation[User | None]:
    """Change a user's ``role``, ``disabled`` or ``may_create_commands`` (None: no such user).
    Its tokens follow at once: they act as the user as it now is."""
    rows = yield Query(USER_BY_ID, (user_id,))
    if not rows:
        return None
    before = _user(rows[0])
    role = check_role(changes.get("role", before.role))
    after = msgspec.structs.replace(
        before,
        role=role,
        disabled=bool(changes.get("disabled", before.disabled)),
        may_create_commands=bool(changes.get("may_create_commands", before.may_create_commands)),
    )
    user = _user((yield Query(UPDATE_USER, (after.role, after.disabled, after.may_create_commands, user_id)))[0])
    yield from op_audit(audit, "user.update", "user", user.id, msgspec.to_builtins(before), msgspec.to_builtins(user))
    return user


def op_user(username: str) -> Operation[User]:
    rows = yield Query(USER_BY_NAME, (username,))
    if not rows:
        raise ValidationError("user", f"no user is named {username!r}")
    return _user(rows[0])


def op_any_admin() -> Operation[bool]:
    return bool((yield Query(ANY_ADMIN))[0][0])


def op_create_token(audit: Audit, user: User, name: str) -> Operation[tuple[Token, str]]:
    """A new token for ``user``: its record and its secret (to show once)."""
    check_token_name(name)
    secret = new_token()
    rows = yield Query(INSERT_TOKEN, (user.id, name, token_hash(secret), secret[:DISPLAY_PREFIX_LENGTH]))
    token = Token(*rows[0])
    yield from op_audit(audit, "token.create", "token", token.id, after=msgspec.to_builtins(token))
    return token, secret


def op_authenticate(secret: str) -> Operation[User | None]:
    """The enabled user of a valid, unrevoked, unexpired token; None otherwise (whatever the cause)."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 100:
        return None
    rows = yield Query(AUTHENTICATE, (token_hash(secret),))
    return _user(rows[0]) if rows else None


def op_list_tokens(user: User) -> Operation[list[Token]]:
    return [Token(*row) for row in (yield Query(LIST_TOKENS, (user.id,)))]


def op_revoke_token(audit: Audit, user: User, token_id: int) -> Operation[Token | None]:
    """Revoke one of ``user``'s tokens (None when it has no such token)."""
    rows = yield Query(REVOKE_TOKEN, (token_id, user.id))
    if not rows:
        return None
    token = Token(*rows[0])
    yield from op_audit(audit, "token.revoke", "token", token.id, after=msgspec.to_builtins(token))
    return token
