"""Every error of the API is ``{"error": {"code", "message", "field"}}``: the exception handlers.

The library's errors keep their meaning (a ``ValidationError`` is 422 with the same field, a
duplicate dedupe key 409 with the existing job's id); anything unexpected is logged here and
answered with a plain 500: no stack trace and no SQL ever reaches a client.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import psycopg
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException

from pgsched.errors import (
    DuplicateJobError,
    InvalidStateError,
    JobNotFound,
    PermissionDenied,
    PgschedError,
    SchemaError,
    ValidationError,
)

log = logging.getLogger("pgsched.api")

# Job fields a client may read but never set: who owns a job and where it stands are the server's.
SERVER_FIELDS = frozenset(
    {"id", "owner", "state", "attempts", "worker_id", "result", "error", "progress", "created_by", "created_at"}
)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(HTTPException):
    """An error answered as is: its status, code, message and field (and extra members)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.field = field
        self.members = extra


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> Response[Any]:
    return Response(
        {"error": {"code": code, "message": message, "field": field, **extra}}, status_code=status, headers=headers
    )


UNAUTHORIZED_MESSAGE = (
    "a valid bearer token (Authorization: Bearer pgs_...) or a signed-in session is required; "
    "signing in needs a valid user name and password"
)


def unauthorized() -> NotAuthorizedException:
    """The one 401 for every cause (no token, unknown, revoked, expired, disabled user, no such user
    or a wrong password at sign-in, a refused OIDC sign-in)."""
    return NotAuthorizedException(detail=UNAUTHORIZED_MESSAGE)


def _body_error(exc: ValidationException) -> tuple[str, str | None]:
    """The message and field of a request that failed Litestar's decoding (body, query, path)."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", ""))
        located = re.search(r"at `\$\.([\w.\[\]]+)`", message)
        key = item.get("key")
        where = located.group(1) if located else (str(key) if key and key != "data" else None)
        unknown = re.search(r"unknown field `([^`]+)`", message)
        if unknown:
            name = unknown.group(1)
            field = f"{where}.{name}" if where else name  # jobs[1].owner in a batch
            if name in SERVER_FIELDS:
                return f"{name} is set by the server and cannot be given", field
            return f"unknown field {name!r}", field
        field = where  # None for "data", Litestar's name for the whole body, not a field of it
        return message.split(" - at ")[0] or "invalid request", field
    return "the request body is not valid JSON of the expected shape", None


def handle_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.code, exc.message, exc.field, exc.headers, **exc.members)
    if isinstance(exc, ValidationException):
        message, field = _body_error(exc)
        return error_response(422, "invalid", message, field)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else "error"
    return error_response(exc.status_code, _CODES.get(exc.status_code, "error"), message, headers=headers)


def handle_pgsched(request: Request[Any, Any, Any], exc: PgschedError) -> Response[Any]:
    if isinstance(exc, DuplicateJobError):
        return error_response(409, "duplicate", exc.message, exc.field, existing_id=exc.existing_id)
    if isinstance(exc, ValidationError):
        return error_response(422, "invalid", exc.message, exc.field)
    if isinstance(exc, JobNotFound):
        return error_response(404, "not_found", f"job {exc.job_id} does not exist")
    if isinstance(exc, InvalidStateError):
        return error_response(409, "invalid_state", str(exc).splitlines()[0])
    if isinstance(exc, PermissionDenied):
        return error_response(403, "forbidden", str(exc).splitlines()[0])
    if isinstance(exc, SchemaError):
        return error_response(503, "unavailable", "the database schema is not current")
    return handle_internal(request, exc)


def handle_data(request: Request[Any, Any, Any], exc: psycopg.DataError) -> Response[Any]:
    """A value the database cannot take as it is (a NUL character in a text, a number out of its
    type's range): the request's fault, and nothing was changed. The message names no SQL."""
    message = str(exc).splitlines()[0] if str(exc) else "a value cannot be stored"
    return error_response(422, "invalid", message)


def handle_internal(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal error; the server log has the details")
