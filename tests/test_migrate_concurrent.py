"""Many hosts deploying at once: ``pgsched migrate`` started 8 times together on one fresh database."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from pgsched import migrations

pytestmark = pytest.mark.process

PROCESSES = 8


def test_eight_concurrent_migrates_apply_each_migration_once(empty_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_") and k != "DATABASE_URL"}
    env["PGSCHED_DSN"] = empty_dsn
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pgsched", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    outputs: list[tuple[int, str, str]] = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            outputs.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for returncode, stdout, stderr in outputs:
        assert returncode == 0, f"exit {returncode}\nstdout: {stdout}\nstderr: {stderr}"
    # Each migration was applied by exactly one of them; the others found nothing to do.
    expected = [f"{m.version:04d}_{m.name}" for m in migrations.available()]
    applied_lines = [line.removeprefix("applied ") for _, out, _ in outputs for line in out.splitlines()]
    assert sorted(line for line in applied_lines if not line.startswith("up to date")) == expected

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        rows: list[Any] = conn.execute(
            "SELECT version, name FROM pgsched.schema_migrations ORDER BY version"
        ).fetchall()
        assert rows == [(m.version, m.name) for m in migrations.available()]
        job_id = conn.execute(
            "INSERT INTO pgsched.jobs (task, args) VALUES ('send_report', '{\"day\": \"2026-11-22\"}') RETURNING id"
        ).fetchone()
        assert job_id is not None
        assert conn.execute("SELECT state, queue FROM pgsched.jobs WHERE id = %s", job_id).fetchone() == (
            "queued",
            "default",
        )
        assert migrations.pending(conn) == []
