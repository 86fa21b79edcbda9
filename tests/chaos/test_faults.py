"""The fault toolbox itself: each fault does what the scenarios rely on, against the test's database."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from ..conftest import wait_until
from . import faults
from .harness import Cluster, Settings, harness_connection, leaked_secrets, socket_path, with_application

pytestmark = pytest.mark.db


def test_the_proxy_forwards_holds_while_blackholed_and_delivers_when_healed(dsn: str) -> None:
    proxy = faults.Proxy(socket_path(dsn)).start()
    try:
        params = conninfo_to_dict(dsn)
        via = f"host=127.0.0.1 port={proxy.port} dbname={params['dbname']} user={params.get('user', 'postgres')}"
        with psycopg.connect(via, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            proxy.blackhole()
            answers: list[object] = []
            query = threading.Thread(target=lambda: answers.append(conn.execute("SELECT 2").fetchone()))
            query.start()
            query.join(1.0)  # a half-open connection neither answers nor fails: only waiting shows it
            assert query.is_alive() and answers == []
            proxy.heal()
            query.join(10)
            assert answers == [(2,)]
    finally:
        proxy.close()


def test_terminate_sessions_cuts_the_matching_sessions_and_spares_the_harness(dsn: str) -> None:
    victim = psycopg.connect(with_application(dsn, "chaos-w1"), autocommit=True)
    bystander = psycopg.connect(with_application(dsn, "someone-else"), autocommit=True)
    with harness_connection(dsn) as harness:
        assert faults.terminate_sessions(harness) == 1
        assert harness.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")
    assert bystander.execute("SELECT 1").fetchone() == (1,)
    victim.close()
    bystander.close()


def test_a_held_exclusive_lock_blocks_readers(dsn: str) -> None:
    with faults.exclusive_lock(dsn), psycopg.connect(dsn, autocommit=True) as reader:
        reader.execute("SET lock_timeout = '100ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            reader.execute("SELECT count(*) FROM pgsched.jobs")


def test_idle_in_transaction_and_idle_connections_show_in_pg_stat_activity(dsn: str) -> None:
    query = "SELECT state, count(*) FROM pg_stat_activity WHERE application_name = 'chaos-harness' AND datname = current_database() AND pid <> pg_backend_pid() GROUP BY 1"
    with psycopg.connect(dsn, autocommit=True) as observer:
        with faults.idle_in_transaction(dsn), faults.idle_connections(dsn, 5):
            assert dict(observer.execute(query).fetchall()) == {"idle in transaction": 1, "idle": 5}
        # A closed session's backend leaves pg_stat_activity a moment later.
        wait_until(lambda: observer.execute(query).fetchall() == [], message="the sessions to end")


def test_the_secret_grep_finds_a_password_or_key_in_logs_and_tables(
    dsn: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    cluster = Cluster(dsn, tmp_path, {}, Settings())
    assert leaked_secrets(cluster, conn) == []
    (tmp_path / "w1-1").mkdir()
    (tmp_path / "w1-1" / "stderr").write_text(f"connecting to password={cluster.password}\n")
    job = conn.execute(
        "INSERT INTO pgsched.jobs (task, error) VALUES ('t', %s) RETURNING id", (cluster.keys,)
    ).fetchone()
    assert job is not None
    assert leaked_secrets(cluster, conn) == [
        "DSN password in w1-1/stderr",
        "encryption key in pgsched.jobs.error",
        "encryption key in pg_dump",
    ]
