"""Browser sessions (a cookie) and the users of an OpenID provider: what the REST API's sign-in
stores, as operations (``pgsched.db``) like those of ``accounts``.

A session's secret is 32 random bytes; only its SHA-256 is stored (as for API tokens: nothing to
brute-force). Its CSRF token is derived from the secret (``csrf_token``), so it needs no column
and changes with the session; a page gets it at sign-in or from ``/me``, never from the cookie,
which scripts cannot read.

A session ends at the first of: sign-out or a password change (``revoked_at``), its absolute
expiry (``expires_at``, set at sign-in), ``idle`` seconds without a request (``last_seen_at``,
written at most once a minute), its user being disabled.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime
from typing import Any

import msgspec

from .accounts import ROLES, USER_COLUMNS, Audit, Role, User, check_username, op_audit
from .db import Operation, Query

# Most privileged first: a user whose claim maps to several roles gets the first of them.
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}

INSERT_SESSION = """
INSERT INTO pgsched.api_sessions (user_id, secret_hash, via, expires_at, client_addr)
VALUES (%s, %s, %s, pgsched.now() + make_interval(secs => %s), %s)
RETURNING id, expires_at
"""
# api_sessions_user_idx: ended sessions of the user are deleted when it signs in again.
PRUNE_SESSIONS = """
DELETE FROM pgsched.api_sessions
WHERE user_id = %s AND (revoked_at IS NOT NULL OR expires_at < pgsched.now()
                        OR last_seen_at < pgsched.now() - make_interval(secs => %s))
"""
# api_sessions_hash_unique: one index lookup per request; the UPDATE writes only when the last
# one is a minute old, so a busy page costs no write per request.
AUTHENTICATE_SESSION = """
WITH s AS (
    SELECT s.id AS session_id, u.id, u.username, u.role, u.may_create_commands, u.disabled
    FROM pgsched.api_sessions s JOIN pgsched.users u ON u.id = s.user_id
    WHERE s.secret_hash = %(hash)s AND s.revoked_at IS NULL AND s.expires_at > pgsched.now()
      AND s.last_seen_at > pgsched.now() - make_interval(secs => %(idle)s) AND NOT u.disabled
), touched AS (
    UPDATE pgsched.api_sessions SET last_seen_at = pgsched.now()
    WHERE id = (SELECT session_id FROM s) AND last_seen_at < pgsched.now() - interval '1 minute'
)
SELECT * FROM s
"""
END_SESSION = """
UPDATE pgsched.api_sessions SET revoked_at = COALESCE(revoked_at, pgsched.now())
WHERE id = %s AND user_id = %s
"""
# oidc_logins primary key. Expired ones go when a new one comes.
INSERT_LOGIN = """
INSERT INTO pgsched.oidc_logins (state_hash, nonce, code_verifier, expires_at)
VALUES (%s, %s, %s, pgsched.now() + make_interval(secs => %s))
"""
PRUNE_LOGINS = "DELETE FROM pgsched.oidc_logins WHERE expires_at < pgsched.now()"
TAKE_LOGIN = """
DELETE FROM pgsched.oidc_logins WHERE state_hash = %s AND expires_at > pgsched.now()
RETURNING nonce, code_verifier
"""
# users_oidc_unique.
USER_BY_SUBJECT = f"SELECT {USER_COLUMNS} FROM pgsched.users WHERE oidc_issuer = %s AND oidc_subject = %s FOR UPDATE"
USERNAME_TAKEN = "SELECT EXISTS (SELECT 1 FROM pgsched.users WHERE username = %s)"
INSERT_OIDC_USER = f"""
INSERT INTO pgsched.users (username, role, oidc_issuer, oidc_subject) VALUES (%s, %s, %s, %s)
RETURNING {USER_COLUMNS}
"""
SET_ROLE = f"UPDATE pgsched.users SET role = %s, updated_at = pgsched.now() WHERE id = %s RETURNING {USER_COLUMNS}"


class Session(msgspec.Struct, frozen=True):
    """A session just started: ``secret`` goes into the cookie, ``csrf_token`` to the page."""

    id: int
    secret: str
    csrf_token: str
    expires_at: datetime


def digest(secret: str) -> bytes:
    """What is stored of a session secret or an OIDC state."""
    return hashlib.sha256(secret.encode()).digest()


def csrf_token(secret: str) -> str:
    """The CSRF token of the session whose secret is ``secret`` (not the secret, nor its stored hash)."""
    mac = hmac.new(secret.encode(), b"pgsched csrf", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def csrf_matches(secret: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(csrf_token(secret).encode(), given.encode())


def op_start_session(
    audit: Audit, user: User, via: str, lifetime: float, idle: float, details: dict[str, Any] | None = None
) -> Operation[Session]:
    """A new session of ``user`` for ``lifetime`` seconds; the user's ended sessions are deleted."""
    secret = secrets.token_urlsafe(32)
    yield Query(PRUNE_SESSIONS, (user.id, idle))
    session_id, expires_at = (yield Query(INSERT_SESSION, (user.id, digest(secret), via, lifetime, audit.client_addr)))[
        0
    ]
    yield from op_audit(
        audit, "session.start", "user", user.id, after={"session": session_id, "via": via, **(details or {})}
    )
    return Session(id=session_id, secret=secret, csrf_token=csrf_token(secret), expires_at=expires_at)


def op_authenticate_session(secret: str, idle: float) -> Operation[tuple[User, int] | None]:
    """The enabled user of a live session, and the session's id; None otherwise (whatever the cause)."""
    if len(secret) > 100:
        return None
    rows = yield Query(AUTHENTICATE_SESSION, {"hash": digest(secret), "idle": idle})
    if not rows:
        return None
    session_id, *user = rows[0]
    return User(*user), session_id


def op_end_session(audit: Audit, user: User, session_id: int) -> Operation[None]:
    yield Query(END_SESSION, (session_id, user.id))
    yield from op_audit(audit, "session.end", "user", user.id, after={"session": session_id})


def op_begin_oidc_login(state: str, nonce: str, code_verifier: str, lifetime: float) -> Operation[None]:
    yield Query(PRUNE_LOGINS)
    yield Query(INSERT_LOGIN, (digest(state), nonce, code_verifier, lifetime))


def op_take_oidc_login(state: str) -> Operation[tuple[str, str] | None]:
    """The nonce and code verifier of a sign-in under way, removed so that its state works once."""
    rows = yield Query(TAKE_LOGIN, (digest(state),))
    return (rows[0][0], rows[0][1]) if rows else None


def role_from_claim(value: Any, mapping: dict[str, Role], default: Role) -> Role:
    """The role for a claim's value (a text or a list of texts, such as groups): the most
    privileged role that ``mapping`` gives any of them, else ``default``."""
    values = value if isinstance(value, list) else [value]
    found = [mapping[v] for v in values if isinstance(v, str) and v in mapping]
    return min(found, key=ROLE_RANK.__getitem__) if found else default


def username_for(issuer: str, subject: str, wanted: Any) -> str:
    """A valid user name from the provider's ``wanted`` one (such as preferred_username), or from the
    subject (``op_oidc_user`` adds a suffix when another user has it)."""
    name = wanted if isinstance(wanted, str) else ""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "_.@-") else "-" for c in name).strip("-._@")[:80]
    if not name:
        name = "oidc-" + _account_tag(issuer, subject)
    return check_username(name)


def _account_tag(issuer: str, subject: str) -> str:
    """A short, stable tag of a provider's account, to tell users of the same name apart."""
    return hashlib.sha256(f"{issuer}\0{subject}".encode()).hexdigest()[:10]


def op_oidc_user(audit: Audit, issuer: str, subject: str, wanted_name: Any, role: Role) -> Operation[User]:
    """The user linked to ``issuer`` and ``subject``, created on its first sign-in, with ``role``
    (the provider's claim decides, at every sign-in). Never linked by name: when another user has
    the name, the new one's gets a suffix derived from the subject."""
    rows = yield Query(USER_BY_SUBJECT, (issuer, subject))
    if rows:
        user = User(*rows[0])
        if user.role != role:
            changed = User(*(yield Query(SET_ROLE, (role, user.id)))[0])
            yield from op_audit(
                audit, "user.update", "user", user.id, msgspec.to_builtins(user), msgspec.to_builtins(changed)
            )
            user = changed
        return user
    name = username_for(issuer, subject, wanted_name)
    if (yield Query(USERNAME_TAKEN, (name,)))[0][0]:
        name = f"{name}-{_account_tag(issuer, subject)}"
    user = User(*(yield Query(INSERT_OIDC_USER, (name, role, issuer, subject)))[0])
    yield from op_audit(
        audit, "user.create", "user", user.id, after={**msgspec.to_builtins(user), "oidc_issuer": issuer}
    )
    return user
