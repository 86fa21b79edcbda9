"""The API's connections: a pool of its database login, and one transaction per change that says
whose request it serves (``pgsched.owner``, ``pgsched.role``), so row-level security applies.

The login must be subject to row-level security (``check_login``). In development (``--dev``) a
login that is not (a superuser, say) is accepted, and each connection does ``SET ROLE
pgsched_api`` so the policies still apply to every query.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from pgsched import App
from pgsched.accounts import User
from pgsched.config import Settings, masked_dsn, replace_settings
from pgsched.db import Operation, configure_adapters, resolve_dsn
from pgsched.errors import ConfigError

from . import queries

SEES_ALL = frozenset({"admin", "operator"})


def check_login(dsn: str, *, dev: bool) -> bool:
    """Whether connections must ``SET ROLE pgsched_api`` (dev only); ConfigError when the login
    may not serve the API."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(queries.LOGIN_CHECK).fetchone()
    if row is None:
        raise ConfigError("the database has no pgsched schema: run pgsched migrate")
    name, sees_all, api_member = row
    if sees_all:
        if dev:
            return True
        raise ConfigError(
            f"the API's database login {name!r} is not subject to row-level security (a superuser, BYPASSRLS, "
            "the owner of pgsched.jobs, or a member of a pgsched group that sees every job): set "
            "--api-dsn / PGSCHED_API_DSN to a login that is a member of pgsched_api only (docs/api.md), "
            "or start with --dev on a development machine"
        )
    if not api_member:
        raise ConfigError(f"the API's database login {name!r} is not a member of pgsched_api (docs/api.md)")
    return False


class Database:
    """The pool, the library ``App`` that runs every job rule, and the per-request transaction."""

    def __init__(self, settings: Settings, *, dev: bool = False, pool_size: int = 10) -> None:
        dsn = settings.api_dsn or resolve_dsn(settings)
        self.dsn = dsn
        self.set_role = check_login(dsn, dev=dev)
        # The library client: validation, defaults, encryption and every job rule. It never opens
        # a pool of its own here: each call joins the request's transaction (connection=...).
        self.app = App(settings=replace_settings(settings, dsn=dsn), name="pgsched.api")
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            open=False,
        )

    def __repr__(self) -> str:
        return f"Database({masked_dsn(self.dsn)!r})"

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        configure_adapters(conn.adapters)
        if self.set_role:
            await conn.execute("SET ROLE pgsched_api")

    async def open(self) -> None:
        await self.pool.open()

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection outside any user's transaction (authentication, health)."""
        async with self.pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def acting_for(self, user: User, *, pipelined: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A transaction serving ``user``: row-level security shows it its jobs (or all, for an admin
        or operator); everything in it, audit rows included, commits or rolls back together.

        ``pipelined`` (the creating routes, the job list) runs it in psycopg's pipeline mode: BEGIN and the
        ``set_config`` go with the first statement whose result is read, and statements written
        with ``write`` go with the COMMIT: a create is two round trips instead of five."""
        async with self.pool.connection() as conn:
            if not pipelined:
                async with conn.transaction():
                    await conn.execute(queries.ACT_FOR, (user.username, user.role))
                    yield conn
                return
            # BEGIN and COMMIT by hand: psycopg's transaction() syncs the pipeline on entry and exit.
            try:
                async with conn.pipeline():
                    await conn.execute("BEGIN")
                    await conn.execute(queries.ACT_FOR, (user.username, user.role))
                    yield conn
                    await conn.execute("COMMIT")
            finally:
                # A failed request leaves its transaction open (or aborted): end it here. A broken
                # connection (UNKNOWN) is the pool's to discard.
                if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                    await conn.rollback()


async def write(conn: psycopg.AsyncConnection[Any], op: Operation[None]) -> None:
    """Run an operation that reads none of its results (an audit row). In pipeline mode its
    statements are only queued: they reach the server with the COMMIT, and an error in them
    fails the commit."""
    for query in op:
        await conn.execute(query.sql, query.params)


def owner_filter(user: User) -> str | None:
    """The owner whose rows ``user`` may see (None: every owner), for the queries' own filter."""
    return None if user.role in SEES_ALL else user.username
