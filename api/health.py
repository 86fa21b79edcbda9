"""``/healthz`` (the process answers) and ``/readyz`` (the database answers, the schema is current)."""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
from litestar import Request, get

from pgsched.db import run_async
from pgsched.errors import SchemaError

from .database import Database
from .errors import ApiError


class Health(msgspec.Struct):
    status: str


@get("/healthz", summary="The process is up", tags=["health"])
async def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", summary="The database is reachable and its schema current", tags=["health"])
async def readyz(request: Request[Any, Any, Any]) -> Health:
    db: Database = request.app.state.db
    try:
        async with db.connection() as conn:
            db.app._schema_checked = False  # check again on every probe
            await run_async(conn, db.app._op_check_schema())
    except SchemaError as exc:
        raise ApiError(503, f"the database schema is not current: {str(exc).splitlines()[0]}") from None
    except (psycopg.Error, OSError):
        raise ApiError(503, "the database is not reachable") from None
    return Health(status="ready")
