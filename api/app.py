"""``create_app(settings)``: the Litestar application of ``pgsched api``.

Routes live under ``/api/v1`` behind one authenticating guard (``access.authenticate``); the
health probes at the root answer without a token. OpenAPI 3.1 is served at
``/api/v1/openapi.json`` and its interactive page at ``/api/v1/docs``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import psycopg
from litestar import Litestar, MediaType, Request, Router, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from pgsched.config import Settings
from pgsched.errors import PgschedError

from . import account, admin, body, bulk, events, health, jobs, logs, oidc, operations, schedules, session, workflows
from .access import FailedAuthentications, authenticate, current_user
from .database import Database
from .errors import handle_data, handle_http, handle_internal, handle_pgsched

# Bodies larger than this are refused (413) while being read, before any database work.
MAX_BODY_BYTES = 256 * 1024
PREFIX = "/api/v1"

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
# JSON needs no script, style or frame; the docs page loads Swagger UI's script and style.
_CSP_JSON = b"default-src 'none'; frame-ancestors 'none'"
_CSP_DOCS = b"default-src 'self' https://cdn.jsdelivr.net; img-src 'self' data:; frame-ancestors 'none'"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def security_headers(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: a request id (the client's X-Request-ID if sane, else a fresh one), echoed
    back, and the security headers on every response, errors included."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        csp = _CSP_DOCS if scope["path"].startswith(f"{PREFIX}/docs") else _CSP_JSON

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [*_SECURITY_HEADERS, (b"content-security-policy", csp)]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        await app(scope, receive, send_with_headers)

    return middleware


_SWAGGER = SwaggerRenderPlugin(path="/docs")


# The document and its page are served here, not by Litestar's OpenAPI router, whose catch-all
# route would answer unknown paths under /api/v1 with an HTML page instead of the error body.
@get(f"{PREFIX}/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_document(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return request.app.openapi_schema.to_schema()


@get(f"{PREFIX}/docs", include_in_schema=False, media_type=MediaType.HTML, sync_to_thread=False)
def openapi_page(request: Request[Any, Any, Any]) -> bytes:
    return _SWAGGER.render(request, request.app.openapi_schema.to_schema())


def create_app(settings: Settings, *, dev: bool = False) -> Litestar:
    """The REST API on the database of ``settings`` (its ``api_dsn``, else ``dsn``).

    ConfigError at once when that login may not serve the API (see ``database.check_login``);
    ``dev`` accepts a login that bypasses row-level security and drops to pgsched_api instead."""
    db = Database(settings, dev=dev)
    hub = events.Hub(db.dsn)

    async def open_pool(app: Litestar) -> None:
        await db.open()
        await hub.start()

    async def close_pool(app: Litestar) -> None:
        await hub.stop()
        await db.close()

    api = Router(
        path=PREFIX,
        guards=[authenticate],
        before_request=body.decode_body,
        dependencies={"user": Provide(current_user, sync_to_thread=False)},
        route_handlers=[
            account.me,
            account.list_tokens,
            account.create_token,
            account.revoke_token,
            jobs.create_job,
            jobs.create_jobs,
            jobs.retrigger_job,
            jobs.list_jobs,
            jobs.show_job,
            jobs.cancel_job,
            jobs.retry_job,
            logs.job_logs,
            bulk.cancel_jobs,
            bulk.retry_jobs,
            workflows.create_workflow,
            workflows.show_workflow,
            workflows.cancel_workflow,
            workflows.retry_workflow,
            operations.list_queues,
            operations.pause_queue,
            operations.resume_queue,
            operations.configure_queue,
            operations.list_workers,
            operations.list_tasks,
            schedules.list_schedules,
            schedules.create_schedule,
            schedules.preview_cron,
            schedules.show_schedule,
            schedules.pause_schedule,
            schedules.resume_schedule,
            schedules.delete_schedule,
            schedules.trigger_schedule,
            schedules.update_schedule,
            admin.list_users,
            admin.create_user,
            admin.update_user,
            admin.list_audit,
            events.stream_events,
            events.events_socket,
            session.sign_in,
            session.sign_out,
            session.change_password,
            session.set_password,
            oidc.oidc_login,
            oidc.oidc_callback,
        ],
    )
    return Litestar(
        route_handlers=[health.healthz, health.readyz, openapi_document, openapi_page, api],
        state=State(
            {
                "db": db,
                "events": hub,
                "failed_authentications": FailedAuthentications(),
                "settings": settings,
                "oidc": oidc.Oidc(settings) if settings.oidc_discovery_url else None,
            }
        ),
        on_startup=[open_pool],
        on_shutdown=[close_pool],
        middleware=[security_headers],
        request_max_body_size=MAX_BODY_BYTES,
        exception_handlers={
            HTTPException: handle_http,
            PgschedError: handle_pgsched,
            psycopg.DataError: handle_data,
            Exception: handle_internal,
        },
        openapi_config=OpenAPIConfig(
            title="pgsched",
            version="1",
            path=f"{PREFIX}/_openapi",  # unused: see openapi_document
            render_plugins=[JsonRenderPlugin()],
        ),
        debug=False,
    )
