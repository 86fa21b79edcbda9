"""``Idempotency-Key`` on POSTs that create: a repeat with the same key and body gets the first
response and creates nothing; the same key with another body is refused (422). Keys live 24 h.

The first response is stored in the transaction that created the object, so a request that fails
stores nothing and may be sent again; two requests with one key at once are serialized by a
transaction-scoped advisory lock, so the second sees the first's stored response.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import psycopg
from litestar import Request, Response

from pgsched.accounts import User

from . import queries
from .errors import ApiError

HEADER = "Idempotency-Key"


def key_of(request: Request[Any, Any, Any]) -> str | None:
    key = request.headers.get(HEADER.lower())
    if key is not None and not 1 <= len(key) <= 200:
        raise ApiError(422, "must be 1 to 200 characters", field=HEADER)
    return key


async def fingerprint(request: Request[Any, Any, Any]) -> bytes:
    return hashlib.sha256(f"{request.method} {request.url.path}\n".encode() + await request.body()).digest()


async def replay(
    conn: psycopg.AsyncConnection[Any], request: Request[Any, Any, Any], user: User, key: str
) -> Response[Any] | None:
    """The stored first response of this key (None: the key is new), in the request's transaction."""
    await conn.execute(queries.IDEMPOTENCY_LOCK, (str(user.id), key))
    await conn.execute(queries.IDEMPOTENCY_EXPIRE, (user.id, key))
    row = await (await conn.execute(queries.IDEMPOTENCY_GET, (user.id, key))).fetchone()
    if row is None:
        return None
    request_hash, status, body = row
    if bytes(request_hash) != await fingerprint(request):
        raise ApiError(422, "this Idempotency-Key was used with another request body", field=HEADER)
    return Response(body, status_code=status, headers={"Idempotent-Replayed": "true"})


async def remember(
    conn: psycopg.AsyncConnection[Any], request: Request[Any, Any, Any], user: User, key: str, status: int, body: Any
) -> None:
    encoded = msgspec.json.encode(body).decode()
    await conn.execute(queries.IDEMPOTENCY_PUT, (user.id, key, await fingerprint(request), status, encoded))
