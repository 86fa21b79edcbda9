"""Passwords of users (dashboard sign-in): Argon2id hashes, the length rule, and the operations
that store them, shared by ``pgsched users set-password`` and the REST API.

Hashing is argon2-cffi's ``PasswordHasher`` with its defaults (RFC 9106's low-memory profile),
imported lazily: it is part of the ``api`` extra, not of a worker host. A hash made with other
parameters (older defaults, or a test's cheap ones) still verifies, and is replaced by a hash of
today's parameters at the next successful sign-in (``rehashed``).

Hashing takes tens of milliseconds of CPU and 64 MiB on purpose: the API runs it in a thread.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from .accounts import USER_BY_ID, USER_COLUMNS, Audit, User, op_audit
from .db import Operation, Query
from .errors import ValidationError
from .extras import require

MIN_LENGTH = 12
MAX_LENGTH = 1024  # bounds the work of one hash: a longer input is refused, never truncated

# users_username_unique. The hash is read beside the user, for sign-in only.
USER_AND_HASH_BY_NAME = f"SELECT {USER_COLUMNS}, password_hash FROM pgsched.users WHERE username = %s"
HASH_BY_ID = "SELECT password_hash FROM pgsched.users WHERE id = %s"
SET_HASH = "UPDATE pgsched.users SET password_hash = %s, updated_at = pgsched.now() WHERE id = %s"
# Only if it is still the hash that was verified: a concurrent password change wins.
REHASH = "UPDATE pgsched.users SET password_hash = %s WHERE id = %s AND password_hash = %s"
# api_sessions_user_idx: a new password ends every other session of the user.
REVOKE_SESSIONS = """
UPDATE pgsched.api_sessions SET revoked_at = pgsched.now()
WHERE user_id = %s AND revoked_at IS NULL AND id IS DISTINCT FROM %s
"""


@functools.cache
def _hasher() -> Any:
    argon2 = require("argon2", "api", "passwords")
    return argon2.PasswordHasher()


def check_password(password: Any, field: str = "password") -> str:
    """The password, or ValidationError naming ``field``."""
    if not isinstance(password, str) or not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise ValidationError(field, f"must be {MIN_LENGTH} to {MAX_LENGTH} characters long")
    return password


def hash_password(password: str) -> str:
    """An Argon2id hash of ``password`` (checked first: ValidationError naming ``password``)."""
    return str(_hasher().hash(check_password(password)))


@functools.cache
def _dummy_hash() -> str:
    return str(_hasher().hash("not the password of anybody"))


def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches the ``stored`` hash. With no hash (no such user, or a user
    without a password) a dummy hash is verified anyway, so that the answer takes as long."""
    argon2 = require("argon2", "api", "passwords")
    if not isinstance(password, str) or len(password) > MAX_LENGTH:
        return False
    try:
        return bool(_hasher().verify(stored or _dummy_hash(), password)) and stored is not None
    except argon2.exceptions.VerificationError:
        return False
    except argon2.exceptions.InvalidHashError:
        return False


def rehashed(stored: str, password: str) -> str | None:
    """A new hash of ``password`` (just verified against ``stored``) when ``stored`` was made with
    other parameters than today's; None when it is current. The length rule is not applied: a
    password set under an older rule still signs in."""
    hasher = _hasher()
    return str(hasher.hash(password)) if hasher.check_needs_rehash(stored) else None


def op_user_and_hash(username: str) -> Operation[tuple[User | None, str | None]]:
    """The user named ``username`` and its password hash (None, None: no such user)."""
    rows = yield Query(USER_AND_HASH_BY_NAME, (username,))
    if not rows:
        return None, None
    return User(*rows[0][:-1]), rows[0][-1]


def op_password_hash(user_id: int) -> Operation[str | None]:
    rows = yield Query(HASH_BY_ID, (user_id,))
    return rows[0][0] if rows else None


def op_set_password(
    audit: Audit, user_id: int, new_hash: str, keep_session: int | None = None
) -> Operation[User | None]:
    """Store ``new_hash`` as the user's password and end its sessions but ``keep_session`` (the
    one of the request that changed it); None when there is no such user. The audit row holds
    no hash."""
    rows = yield Query(USER_BY_ID, (user_id,))
    if not rows:
        return None
    user = User(*rows[0])
    yield Query(SET_HASH, (new_hash, user.id))
    yield Query(REVOKE_SESSIONS, (user.id, keep_session))
    yield from op_audit(audit, "user.password", "user", user.id, after=msgspec.to_builtins(user))
    return user


def op_rehash(user: User, old_hash: str, new_hash: str) -> Operation[None]:
    yield Query(REHASH, (new_hash, user.id, old_hash))
