"""Database plumbing shared by the sync and async clients.

Client operations are written once, as generators that yield ``Query``
objects and receive their rows (sans-I/O). ``run`` and ``run_async`` are the
only two places that execute them, so no operation is written twice.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
import psycopg
from psycopg import pq
from psycopg.adapt import AdaptersMap
from psycopg.rows import RowFactory, tuple_row
from psycopg.types.json import set_json_loads

from .config import Settings, check_dsn, masked_dsn
from .errors import TOO_MANY_CONNECTIONS, DatabaseUnreachable, TooManyConnections
from .jobs import Job
from .validation import error_from_db

T = TypeVar("T")

log = logging.getLogger("pgsched.db")


@dataclass(frozen=True)
class Query:
    """One statement of an operation. With ``copy`` set, ``sql`` is a COPY ... FROM STDIN fed those chunks."""

    sql: str
    params: Any = None
    rows: Literal["tuple", "job"] = "tuple"
    copy: Iterable[str] | None = None


Operation = Generator[Query, list[Any], T]


def job_row(cursor: Any) -> Callable[[Sequence[Any]], Job]:
    """Row factory for statements selecting ``JOB_COLUMNS``: positional, so psycopg need not
    describe the columns (measurable on the single-enqueue path)."""
    return lambda values: Job(*values)


_ROW_FACTORIES: dict[str, RowFactory[Any]] = {"tuple": tuple_row, "job": job_row}


def _has_rows(cur: Any) -> bool:
    # Cheaper than cur.description, which builds a Column object per column.
    return cur.pgresult is not None and cur.pgresult.status == pq.ExecStatus.TUPLES_OK


def configure_adapters(adapters: AdaptersMap) -> None:
    """Decode json/jsonb with msgspec (faster than the standard library, same values)."""
    set_json_loads(msgspec.json.decode, adapters)


async def configure_async(conn: psycopg.AsyncConnection[Any]) -> None:
    """``configure_adapters`` as an async pool's ``configure`` callback."""
    configure_adapters(conn.adapters)


def _mapped(exc: psycopg.Error) -> BaseException:
    """The pgsched error for ``exc``, thrown into the operation so it can add context (or let it pass)."""
    mapped = error_from_db(exc)
    if mapped is not exc:
        mapped.__cause__ = exc
    return mapped


def run(conn: psycopg.Connection[Any], op: Operation[T]) -> T:
    """Drive ``op`` on a sync connection."""
    try:
        query = next(op)
        while True:
            try:
                with conn.cursor(row_factory=_ROW_FACTORIES[query.rows]) as cur:
                    if query.copy is not None:
                        with cur.copy(query.sql) as copy:
                            for chunk in query.copy:
                                copy.write(chunk)
                        result: list[Any] = []
                    else:
                        cur.execute(query.sql, query.params)
                        result = cur.fetchall() if _has_rows(cur) else []
            except psycopg.Error as exc:
                query = op.throw(_mapped(exc))
                continue
            query = op.send(result)
    except StopIteration as stop:
        return stop.value


async def run_async(conn: psycopg.AsyncConnection[Any], op: Operation[T]) -> T:
    """Drive ``op`` on an async connection."""
    try:
        query = next(op)
        while True:
            try:
                async with conn.cursor(row_factory=_ROW_FACTORIES[query.rows]) as cur:
                    if query.copy is not None:
                        async with cur.copy(query.sql) as copy:
                            for chunk in query.copy:
                                await copy.write(chunk)
                        result: list[Any] = []
                    else:
                        await cur.execute(query.sql, query.params)
                        # In pipeline mode (the API's creating routes) the result is not back yet:
                        # fetch it now (no-op otherwise). psycopg has no public call that does
                        # this for a statement that may return no rows.
                        await cur._fetch_pipeline()
                        result = await cur.fetchall() if _has_rows(cur) else []
            except psycopg.Error as exc:
                query = op.throw(_mapped(exc))
                continue
            query = op.send(result)
    except StopIteration as stop:
        return stop.value


def resolve_dsn(settings: Settings, *, stop_on_exit: bool = False) -> str:
    """The DSN to use: the configured one, else the embedded server's (started if needed)."""
    if settings.dsn:
        check_dsn(settings.dsn)  # Settings(...) built directly was not checked by load_settings
        return settings.dsn
    from . import embedded

    return embedded.start(settings.embedded_data_dir, stop_on_exit=stop_on_exit)


# What PostgreSQL says when max_connections is used up (for ordinary roles, and superusers).
_TOO_MANY = ("too many clients already", "remaining connection slots are reserved")


def too_many_connections(exc: BaseException) -> bool:
    return any(text in str(exc) for text in _TOO_MANY)


def describe(exc: BaseException) -> str:
    """One line for a database error in a log or a message: the plain cause when the server is out
    of connections, else the error's first line."""
    if too_many_connections(exc):
        return TOO_MANY_CONNECTIONS
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def naming_refusals(dsn: str) -> Iterator[None]:
    """Raise TooManyConnections where PostgreSQL refused a connection for want of slots: directly,
    or behind a pool's timeout (which says no more than that it waited; one direct connection then
    asks the server why)."""
    try:
        yield
    except psycopg.OperationalError as exc:
        if too_many_connections(exc):
            raise TooManyConnections() from exc
        if type(exc).__name__ == "PoolTimeout":
            try:
                psycopg.connect(dsn, connect_timeout=2).close()
            except psycopg.OperationalError as probe:
                if too_many_connections(probe):
                    raise TooManyConnections() from exc
        raise


def wait_for_database(dsn: str, seconds: float, stopped: threading.Event | None = None) -> bool:
    """Return once the database at ``dsn`` accepts a connection (True), retrying with backoff for up
    to ``seconds`` (``wait_for_db``) and logging one line per failed attempt; False if ``stopped``
    is set meanwhile. Raises DatabaseUnreachable when the time is up (at once with 0)."""
    deadline = time.monotonic() + seconds
    pause = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            timeout = max(2, min(10, int(deadline - time.monotonic()) + 1))
            psycopg.connect(dsn, connect_timeout=timeout).close()
            return True
        except psycopg.OperationalError as exc:
            reason = describe(exc)
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after waiting {seconds:g} s (--wait-for-db)" if seconds else ""
                if too_many_connections(exc):
                    raise DatabaseUnreachable(f"{reason}; gave up{waited}") from None
                raise DatabaseUnreachable(f"cannot reach the database{waited}: {reason}") from None
            pause = min(pause, left)
            log.warning(
                "waiting for the database %s (attempt %d, next in %.1f s, giving up in %.1f s): %s",
                masked_dsn(dsn),
                attempt,
                pause,
                left,
                reason,
            )
        if stopped is None:
            time.sleep(pause)
        elif stopped.wait(pause):
            return False  # a signal came: the caller stops
        pause = min(pause * 2, 5.0)
