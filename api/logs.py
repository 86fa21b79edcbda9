"""``/jobs/{id}/logs``: a job's run logs, paged in the order they were logged. A client follows a
running job by asking again with the last ``next_cursor`` (new lines come after it)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get
from litestar.params import FromPath, FromQuery, QueryParameter

from pgsched import queries as library_queries
from pgsched.encryption import readable_text

from . import queries
from .access import CurrentUser
from .database import Database, owner_filter
from .errors import ApiError

MAX_PAGE = 1000
# The library's statement, one page at a time (run_logs_job_idx).
JOB_LOGS_PAGE = library_queries.JOB_LOGS + "LIMIT %(limit)s"


class LogLine(msgspec.Struct):
    attempt: int
    logged_at: datetime
    stream: str
    level: str | None
    message: str | None


class LogPage(msgspec.Struct):
    """Lines in order; ``next_cursor`` reads those after the last one (the same cursor again when
    there were none, to poll a running job)."""

    lines: list[LogLine]
    next_cursor: str | None


def _cursor(attempt: int, at: datetime, position: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([attempt, at.isoformat(), position]).encode()).decode()


def _after(cursor: str | None) -> tuple[int | None, datetime | None, str | None]:
    if cursor is None:
        return None, None, None
    try:
        attempt, at, position = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return int(attempt), datetime.fromisoformat(at), str(position)
    except (ValueError, TypeError, binascii.Error):
        raise ApiError(422, "not a cursor returned by this endpoint", field="cursor") from None


@get("/jobs/{job_id:int}/logs", summary="A job's run logs, in order, paged", tags=["jobs"])
async def job_logs(
    request: Request[Any, Any, Any],
    user: CurrentUser,
    job_id: FromPath[int],
    attempt: FromQuery[int | None] = None,
    cursor: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(description=f"Lines per page, at most {MAX_PAGE}")] = 200,
) -> LogPage:
    after_attempt, after_at, after_position = _after(cursor)
    owner = owner_filter(user)
    db: Database = request.app.state.db
    async with db.acting_for(user) as conn:
        job = await (await conn.execute(queries.JOB_SEEN, (job_id, owner, owner))).fetchone()
        if job is None:
            raise ApiError(404, f"job {job_id} does not exist")
        params = {
            "job_id": job_id,
            "attempt": attempt,
            "after_attempt": after_attempt,
            "after_at": after_at,
            "after_position": after_position,
            "limit": max(1, min(limit, MAX_PAGE)),
        }
        rows = await (await conn.execute(JOB_LOGS_PAGE, params)).fetchall()
    keyring, scope = db.app.keyring, (job[0], job[1])
    lines = [
        LogLine(attempt=a, logged_at=at, stream=stream, level=level,
                message=readable_text(message, "message", scope, keyring))
        for a, at, stream, level, message, _ in rows
    ]  # fmt: skip
    last = _cursor(rows[-1][0], rows[-1][1], rows[-1][5]) if rows else cursor
    return LogPage(lines=lines, next_cursor=last)
