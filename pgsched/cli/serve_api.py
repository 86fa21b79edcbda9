"""Serving the REST API from the command line: the development admin's token, and the API in a
thread of ``pgsched up`` (``DevApi``). Shared by the ``api`` and ``run`` command modules."""

from __future__ import annotations

import importlib
import threading
import time
from typing import Any

import psycopg

from .. import accounts
from ..accounts import Audit
from ..config import Settings
from ..db import run
from ..errors import ConfigError
from ..extras import require

DEV_ADMIN = "dev"
# At shutdown, uvicorn waits this long for open responses: event streams never end on their own
# (their clients reconnect with Last-Event-ID, and get a resync from the next process).
STREAMS_CUT_AFTER_SECONDS = 3


def cli_audit(conn: psycopg.Connection[Any]) -> Audit:
    """Changes made from the command line are audited under the database role."""
    return Audit(actor=f"db:{conn.info.user}")


def dev_token(dsn: str) -> str:
    """A fresh token of the admin named ``dev`` (created when there is no such user), written through
    the privileged DSN (the API's own login may not create users outside a request)."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        audit = cli_audit(conn)
        try:
            user = run(conn, accounts.op_user(DEV_ADMIN))
        except accounts.ValidationError:
            user = run(conn, accounts.op_create_user(audit, DEV_ADMIN, "admin"))
        _, secret = run(conn, accounts.op_create_token(audit, user, "dev"))
    return secret


class DevApi:
    """The REST API served in a thread of ``pgsched up``, in development mode (``--dev``)."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        uvicorn = require("uvicorn", "api", "the REST API")
        require("litestar", "api", "the REST API")
        assert settings.dsn is not None
        self.token = dev_token(settings.dsn)
        app = importlib.import_module("pgsched.api").create_app(settings, dev=True)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            server_header=False,
            timeout_graceful_shutdown=STREAMS_CUT_AFTER_SECONDS,
        )
        self.server = uvicorn.Server(config)
        self.url = f"http://{host}:{port}/api/v1"
        # uvicorn installs no signal handler outside the main thread: up's own handlers stop it.
        self.thread = threading.Thread(target=self.server.run, name="pgsched-api", daemon=True)

    def start(self, timeout: float = 15.0) -> None:
        """Serve; ConfigError when it cannot (the port is taken, most often)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the REST API did not start on {self.url} (is the port in use? --api-port)")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_dev_api(settings: Settings, host: str, port: int) -> DevApi | str:
    """The API of ``pgsched up``, started; or why it is not (one line for the terminal)."""
    try:
        api = DevApi(settings, host, port)
        api.start()
    except ConfigError as exc:
        return str(exc)
    return api
