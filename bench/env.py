"""The benchmark environment: a fresh server per workload, and what the machine is.

Each workload gets a fresh PostgreSQL data directory on disk (not tmpfs:
fsync must be real) from the embedded server, or, when ``PGSCHED_BENCH_DSN``
is set, a fresh database on that server. Either way it is migrated.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


@contextmanager
def fresh_database() -> Iterator[Server]:
    base = os.environ.get("PGSCHED_BENCH_DSN")
    if base:
        name = f"pgsched_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _describe(make_conninfo(base, dbname=name), "PGSCHED_BENCH_DSN, a fresh database per workload")
        finally:
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    parent = Path(tempfile.mkdtemp(prefix="pgsb-", dir=DATA_PARENT))
    data_dir = parent / "data"
    try:
        dsn = embedded.start(data_dir, stop_on_exit=True)
        yield _describe(dsn, f"embedded, a fresh data directory per workload in {DATA_PARENT} (disk)", data_dir)
    finally:
        embedded.stop(data_dir)
        shutil.rmtree(parent, ignore_errors=True)


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
