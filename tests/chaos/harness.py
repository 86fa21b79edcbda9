"""The chaos harness: the history tables, enqueuers that record what was acknowledged, and the
``pgsched worker`` / ``pgsched scheduler`` processes of a scenario.

Only public behaviour is used: the CLI processes, the App API and SQL, so a scenario keeps
meaning the same thing whatever the worker's insides become.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgsched
from pgsched import crypto, embedded

from ..processes import PgschedProcess
from . import app as chaos_app
from .checker import Ack, HistoryEvent, JobRow, Observed, RunRow

APP = "tests.chaos.app:app"


def with_application(dsn: str, name: str) -> str:
    return make_conninfo(dsn, application_name=name)


def socket_path(dsn: str) -> str:
    """The Unix socket of the (embedded) server of ``dsn``."""
    params = conninfo_to_dict(dsn)
    return os.path.join(str(params["host"]), f".s.PGSQL.{params.get('port', 5432)}")


def create_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(chaos_app.SCHEMA)


@dataclass
class Settings:
    """Worker flags of a scenario: short leases so that a quick run sees several rescues."""

    lease: float = 2.0
    heartbeat: float = 0.5
    concurrency: int = 8
    prefetch: int = 0
    grace: float = 5.0
    poll: float = 0.2
    extra: Sequence[str] = ()

    def worker_args(self) -> list[str]:
        return [
            "--app", APP, "--poll-seconds", str(self.poll),
            "--lease-seconds", str(self.lease), "--heartbeat-seconds", str(self.heartbeat),
            "--concurrency", str(self.concurrency), "--prefetch", str(self.prefetch),
            "--grace-seconds", str(self.grace), *self.extra,
        ]  # fmt: skip


def shifted_clock(offset: str) -> dict[str, str]:
    """The environment that makes a process's wall clock (time(), gettimeofday, CLOCK_REALTIME) run
    ``offset`` from the host's, through libfaketime preloaded; its monotonic clock stays true."""
    import libfaketime

    _, env = libfaketime.get_reload_information()
    return {**env, "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1"}


class Cluster:
    """The pgsched processes of one scenario, each with an application_name of its own (``chaos-w1``,
    ``chaos-s1``...) so that a fault can pick its sessions."""

    def __init__(self, dsn: str, directory: Path, env: dict[str, str], settings: Settings) -> None:
        self.dsn = dsn
        self.directory = directory
        self.settings = settings
        # Secrets the processes hold and must never write anywhere (``leaked_secrets``): the password
        # of their DSN (the test servers trust local connections, so an invented one is never even
        # asked for) and an encryption keyring.
        self.password = str(conninfo_to_dict(dsn).get("password") or f"chaos-pw-{secrets.token_hex(12)}")
        self.keys = crypto.generate_key("chaos1")
        self.env = {
            **env,
            chaos_app.HISTORY_DSN: dsn,
            "PGSCHED_LOG_LEVEL": "warning",
            "PGSCHED_ENCRYPTION_KEYS": self.keys,
        }
        self.workers: dict[str, PgschedProcess] = {}
        self.schedulers: dict[str, PgschedProcess] = {}
        self.dsns: dict[str, str] = {}
        self.options: dict[str, Settings] = {}
        self.exits: list[tuple[str, int | None]] = []  # (name, exit status) of every process that ended
        self.skews: dict[str, str] = {}  # process name -> the shift of its wall clock (libfaketime)
        self._starts = itertools.count(1)

    def skew(self, name: str, offset: str) -> None:
        """Shift the wall clock of process ``name`` (at every start) by ``offset``, in libfaketime's
        spelling (``+10m``, ``-600``): its host clock runs ahead or behind the database's."""
        self.skews[name] = offset

    def _spawn(self, name: str, args: list[str], dsn: str) -> PgschedProcess:
        directory = self.directory / f"{name}-{next(self._starts)}"
        directory.mkdir(parents=True)
        env = {**self.env, "PGSCHED_DSN": make_conninfo(dsn, password=self.password), "PGAPPNAME": f"chaos-{name}"}
        if name in self.skews:
            env.update(shifted_clock(self.skews[name]))
        return PgschedProcess(args, env, directory)

    def worker(self, name: str, *, dsn: str | None = None, settings: Settings | None = None) -> PgschedProcess:
        """Start (or restart) worker ``name`` (``w1``...); ``dsn`` to go through a proxy."""
        self.dsns[name] = dsn or self.dsns.get(name) or self.dsn
        self.options[name] = settings or self.options.get(name) or self.settings
        process = self._spawn(name, ["worker", *self.options[name].worker_args()], self.dsns[name])
        self.workers[name] = process
        return process

    def scheduler(self, name: str = "s1") -> PgschedProcess:
        process = self._spawn(name, ["scheduler", "--app", APP, "--lease-seconds", str(self.settings.lease)], self.dsn)
        self.schedulers[name] = process
        return process

    def processes(self) -> dict[str, PgschedProcess]:
        return {**self.workers, **self.schedulers}

    def restart_dead(self) -> list[str]:
        """Start again every worker that exited (what a supervisor would do); their names."""
        restarted = []
        for name, process in list(self.workers.items()):
            code = process.process.poll()
            if code is not None:
                self.exits.append((name, code))
                self.worker(name)
                restarted.append(name)
        return restarted

    def dead(self) -> list[str]:
        return [name for name, process in self.processes().items() if process.process.poll() is not None]

    def kill(self) -> None:
        """kill -9 every process still running (the end of a scenario, whatever happened)."""
        for process in self.processes().values():
            if process.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
                process.process.wait(10)


class Enqueuer:
    """Enqueues ``chaos.step`` jobs through the App API and records every outcome: ``ack`` (the
    commit returned), ``unknown`` (an exception: maybe committed, maybe not), ``rolled_back``."""

    def __init__(self, dsn: str, prefix: str = "k") -> None:
        self.app = chaos_app.make_app(with_application(dsn, "chaos-enqueuer"), name="tests.chaos.enqueuer")
        self.app.open()  # registers the tasks in the catalog before any worker runs
        self.dsn = dsn
        self.prefix = prefix
        self.acks: list[Ack] = []
        self._keys = itertools.count(1)
        self._lock = threading.Lock()

    def _key(self) -> str:
        with self._lock:
            return f"{self.prefix}{next(self._keys)}"

    def _note(self, *acks: Ack) -> None:
        with self._lock:
            self.acks.extend(acks)

    def one(self, ms: int = 0, **options: Any) -> int | None:
        key = self._key()
        try:
            job = self.app.enqueue("chaos.step", {"key": key, "ms": ms}, **options)
        except (psycopg.Error, pgsched.errors.PgschedError, OSError):
            self._note(Ack(key, None, "unknown"))
            return None
        self._note(Ack(key, job.id, "ack"))
        return job.id

    def many(self, count: int, ms: int = 0, task: str = "chaos.step", queue: str | None = None) -> list[int]:
        keys = [self._key() for _ in range(count)]
        try:
            ids = self.app.enqueue_many([{"task": task, "args": {"key": k, "ms": ms}, "queue": queue} for k in keys])
        except (psycopg.Error, pgsched.errors.PgschedError, OSError):
            self._note(*(Ack(k, None, "unknown") for k in keys))
            return []
        self._note(*(Ack(k, i, "ack") for k, i in zip(keys, ids, strict=True)))
        return ids

    def poison(self) -> int:
        key = self._key()
        job = self.app.enqueue("chaos.poison", {"key": key})
        self._note(Ack(key, job.id, "ack"))
        return job.id

    def transaction(self, count: int, *, commit: bool, ms: int = 0) -> None:
        """``count`` enqueues in one transaction of the caller's connection, committed or rolled back."""
        keys = [self._key() for _ in range(count)]
        ids: list[int] = []
        try:
            with psycopg.connect(with_application(self.dsn, "chaos-enqueuer")) as conn:
                for key in keys:
                    ids.append(self.app.enqueue("chaos.step", {"key": key, "ms": ms}, connection=conn).id)
                if commit:
                    conn.commit()
                else:
                    conn.rollback()
        except (psycopg.Error, pgsched.errors.PgschedError, OSError):
            self._note(*(Ack(k, None, "unknown") for k in keys))
            return
        outcome = "ack" if commit else "rolled_back"
        self._note(*(Ack(k, i, outcome) for k, i in zip(keys, ids, strict=True)))

    @contextlib.contextmanager
    def trickle(self, per_second: float, ms: int = 0) -> Iterator[None]:
        """Enqueue one job every 1/per_second seconds on a thread, for the duration of the block."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(1 / per_second):
                self.one(ms)

        thread = threading.Thread(target=run, name="chaos-trickle", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(30)

    def save(self) -> None:
        """Write the recorded outcomes into ``chaos.acks`` (the checker reads them from there)."""
        with psycopg.connect(with_application(self.dsn, "chaos-harness")) as conn:
            with conn.cursor().copy("COPY chaos.acks (key, job_id, outcome) FROM STDIN") as copy:
                for ack in self.acks:
                    copy.write_row(ack)

    def close(self) -> None:
        self.app.close()


def harness_connection(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit connection for the harness's own reads and faults (never a fault's target)."""
    return psycopg.connect(with_application(dsn, "chaos-harness"), autocommit=True)


def load(conn: psycopg.Connection[Any]) -> Observed:
    """Everything the checker reads, from the database."""
    history = [
        HistoryEvent(*row)
        for row in conn.execute(
            "SELECT exec::text, job_id, key, attempt, worker_id::text, pid, event, at FROM chaos.history ORDER BY seq"
        )
    ]
    acks = [Ack(*row) for row in conn.execute("SELECT key, job_id, outcome FROM chaos.acks")]
    jobs = [
        JobRow(*row)
        for row in conn.execute(
            """SELECT id, args->>'key', queue, state, attempts, max_attempts, result->>'exec', finished_at,
                      schedule_id, slot FROM pgsched.jobs"""
        )
    ]
    runs = [
        RunRow(*row)
        for row in conn.execute(
            "SELECT job_id, attempt, queue, worker_id::text, outcome, started_at, finished_at FROM pgsched.runs"
        )
    ]
    return Observed(history, acks, jobs, runs)


def leaked_secrets(cluster: Cluster, conn: psycopg.Connection[Any]) -> list[str]:
    """Where a secret of the cluster (its DSN password, its key material) shows up: the output of
    every process it started, the text pgsched stored (run logs, errors, results) and a pg_dump of
    the database. Run after the faults, so that crash, reconnect and rescue paths have logged."""
    found = {"DSN password": cluster.password, "encryption key": cluster.keys.partition(":")[2]}
    sources = {str(path.relative_to(cluster.directory)): path.read_text(errors="replace")
               for path in sorted(cluster.directory.rglob("*")) if path.is_file()}  # fmt: skip
    for table, column in (("run_logs", "message"), ("runs", "error"), ("jobs", "error"), ("jobs", "result::text")):
        row = conn.execute(f"SELECT string_agg({column}, chr(10)) FROM pgsched.{table}").fetchone()
        sources[f"pgsched.{table}.{column}"] = (row[0] if row else None) or ""
    dump = subprocess.run(
        [str(embedded.bin_dir() / "pg_dump"), "--data-only", "-d", cluster.dsn],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    sources["pg_dump"] = dump.stdout
    return [f"{kind} in {where}" for kind, secret in found.items() for where, text in sources.items() if secret in text]


def unfinished(conn: psycopg.Connection[Any]) -> int:
    """Jobs not yet succeeded, failed or cancelled."""
    row = conn.execute(
        "SELECT count(*) FROM pgsched.jobs WHERE state NOT IN ('succeeded', 'failed', 'cancelled')"
    ).fetchone()
    return int(row[0]) if row else 0


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> bool:
    """Poll until ``predicate()`` is truthy (True) or ``timeout`` seconds pass (False): a scenario
    goes on to check what happened either way."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@dataclass
class Timeline:
    """Wall-clock marks of a scenario's faults, in database time (for recovery times)."""

    faults: list[Any] = field(default_factory=list)
    # Where a fault is followed by a restart: when the restarted process was back (see ``back``).
    restarts: list[Any] = field(default_factory=list)

    def mark(self, conn: psycopg.Connection[Any]) -> None:
        self.faults.append(_now(conn))

    def back(self, conn: psycopg.Connection[Any], pid: int, timeout: float) -> None:
        """Mark when the worker of ``pid`` registered (or ``timeout`` passed): the restart of the
        last fault is done. Recovery is timed from here; the clean rate is the one before the fault."""
        wait_for(lambda: conn.execute("SELECT 1 FROM pgsched.workers WHERE pid = %s", (pid,)).fetchone(), timeout)
        self.restarts.append(_now(conn))


def _now(conn: psycopg.Connection[Any]) -> Any:
    row = conn.execute("SELECT pgsched.now()").fetchone()
    assert row is not None
    return row[0]
