"""A worker's secrets (its DSN with a password, the encryption keys) are out of reach of the commands its
shell jobs run: ``cat /proc/$PPID/environ`` finds none of them, under ``pgsched worker``, each child of
``--processes 2`` (and its supervisor), and ``pgsched up``; ``up`` never prints a password.

The test server trusts local connections, so the password in the DSN is a marker that is never checked.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgsched

from .conftest import wait_until
from .processes import PgschedProcess, WorkerProcess

pytestmark = pytest.mark.process

PASSWORD = "pw-marker-4f1c9e"
DATABASE_URL_PASSWORD = "dburl-marker-77a2"
PGPASSWORD = "pgpassword-marker-0b3d"
KEY_BYTES = bytes(range(100, 132))
KEY = base64.b64encode(KEY_BYTES).decode()
MARKERS = (PASSWORD, DATABASE_URL_PASSWORD, PGPASSWORD, KEY)
# Prints the environment and the command line of the process that started the command: its worker.
READ_PARENT = ["sh", "-c", "cat /proc/$PPID/environ | tr '\\0' '\\n'; echo; cat /proc/$PPID/cmdline | tr '\\0' '\\n'"]


def secret_env(env: dict[str, str], dsn: str) -> None:
    """Put secrets with recognisable values in a worker's environment (in place)."""
    env["PGSCHED_DSN"] = make_conninfo(dsn, password=PASSWORD)
    env["PGSCHED_ENCRYPTION_KEYS"] = f"k1:{KEY}"
    env["DATABASE_URL"] = f"postgresql://someone:{DATABASE_URL_PASSWORD}@db.invalid/app"
    env["PGPASSWORD"] = PGPASSWORD


def leaked(text: str) -> list[str]:
    return [marker for marker in MARKERS if marker in text]


def run_reader(app: pgsched.App, conn: psycopg.Connection[Any]) -> str:
    """Enqueue the shell job that reads its worker's /proc files; its output, once it succeeded."""
    job = app.enqueue("shell", {"cmd": READ_PARENT})
    wait_until(lambda: app.get(job.id).state in ("succeeded", "failed"), timeout=30, message="the reader to run")
    done = app.get(job.id)
    assert done.state == "succeeded", done.error
    rows = conn.execute("SELECT message FROM pgsched.run_logs WHERE job_id = %s", (job.id,)).fetchall()
    text = "\n".join(m for (m,) in rows)
    assert "PATH=" in text and "pgsched" in text  # it did read the worker's environment and command line
    return text + str(done.result)


def proc_environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")


@pytest.mark.parametrize("processes", [1, 2])
def test_a_shell_job_finds_no_secret_in_its_workers_environment(
    processes: int,
    app: pgsched.App,
    conn: psycopg.Connection[Any],
    dsn: str,
    cli_env: dict[str, str],
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    secret_env(cli_env, dsn)
    worker = spawn_worker("--allow-shell", "--processes", str(processes))
    try:
        text = run_reader(app, conn)
        assert leaked(text) == []
        # Seen from outside too (the test runs as root, which may read any process's environment).
        for pid in [worker.pid, *worker.children()]:
            assert leaked(proc_environ(pid)) == [], f"process {pid}"
    finally:
        worker.stop()
    assert leaked(worker.stderr()) == []


def test_up_prints_no_password_and_its_shell_jobs_find_no_secret(
    app: pgsched.App, conn: psycopg.Connection[Any], dsn: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    secret_env(cli_env, dsn)
    env = {**cli_env, "PGSCHED_ALLOW_SHELL": "true", "PGSCHED_APP": "tests.apps.sample:app"}
    up = PgschedProcess(["up"], env, tmp_path)
    try:
        wait_until(lambda: "running:" in up.stdout() or up.process.poll() is not None, timeout=30, message="up")
        up.check_alive()
        assert "database:" in up.stdout() and "password=***" in up.stdout()
        text = run_reader(app, conn)
        assert leaked(text) == []
        assert leaked(proc_environ(up.pid)) == []
    finally:
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0, up.stderr()
    assert leaked(up.stdout() + up.stderr()) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="Linux /proc")
def test_blanking_keeps_the_values_for_the_process_itself(tmp_path: Path, cli_env: dict[str, str], dsn: str) -> None:
    # What the worker's own code and libpq see is unchanged: only the copy /proc shows is blanked.
    secret_env(cli_env, dsn)
    script = (
        "import ctypes, os, sys\n"
        "from pgsched.protect import protect_process\n"
        "protect_process()\n"
        "libc = ctypes.CDLL(None); libc.getenv.restype = ctypes.c_char_p\n"
        "shown = open('/proc/self/environ', 'rb').read() + open('/proc/self/cmdline', 'rb').read()\n"
        "print(os.environ['PGPASSWORD'], libc.getenv(b'PGPASSWORD').decode(), os.environ['DATABASE_URL'])\n"
        "print(sys.argv[1:], b'argv' + b'-marker' in shown, b'marker' + b'-' in shown)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, "--dsn", "host=x password=argv-marker", "--encryption-keys=k2:argv-marker"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0] == f"{PGPASSWORD} {PGPASSWORD} postgresql://someone:{DATABASE_URL_PASSWORD}@db.invalid/app"
    assert out[1] == "['--dsn', 'host=x password=argv-marker', '--encryption-keys=k2:argv-marker'] False False"
