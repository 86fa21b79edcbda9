"""The built wheel is a working pgsched: it ships its migrations and its api/worker packages.

Editable installs read ``sql/``, ``api/`` and ``worker/`` from the checkout, so
only a real wheel in a fresh virtual environment shows what users get.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent

# What the build reads from the checkout; everything else (the venv, caches,
# earlier build/ output that setuptools would reuse) stays behind.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "artifacts"
)

PROBE = """
import json, pgsched, pgsched.api, pgsched.worker, pgsched.sql
from pgsched import migrations
print(json.dumps({
    "files": {m.__name__: m.__file__ for m in (pgsched, pgsched.api, pgsched.worker, pgsched.sql)},
    "available": [[m.version, m.name, m.checksum] for m in migrations.available()],
}))
"""


def run(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert result.returncode == 0, (
        f"{args} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result


def test_wheel_installs_and_migrates_from_its_own_files(tmp_path: Path, empty_dsn: str) -> None:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source)
    (wheel,) = dist.glob("pgsched-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel)

    # The fresh venv has pgsched only; its dependencies come from this environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_") and k != "DATABASE_URL"}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    env["PGSCHED_DSN"] = empty_dsn
    elsewhere = tmp_path / "elsewhere"  # not the checkout, so nothing is imported from it by accident
    elsewhere.mkdir()

    probe = json.loads(run(python, "-c", PROBE, env=env, cwd=elsewhere).stdout)
    installed = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    for module, file in probe["files"].items():
        assert Path(file).is_relative_to(installed), f"{module} imported from {file}, not from the wheel"
    # Every migration of the checkout, byte for byte.
    shipped = [
        [int(p.name[:4]), p.stem[5:], hashlib.sha256(p.read_text(encoding="utf-8").encode()).hexdigest()]
        for p in sorted((ROOT / "sql").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    ]
    assert shipped
    assert probe["available"] == shipped

    migrated = run(python, "-m", "pgsched", "migrate", env=env, cwd=elsewhere).stdout
    assert migrated.splitlines() == [f"applied {v:04d}_{name}" for v, name, _ in probe["available"]]
    with psycopg.connect(empty_dsn) as conn:
        rows = conn.execute("SELECT version, name, checksum FROM pgsched.schema_migrations ORDER BY 1").fetchall()
    assert [list(row) for row in rows] == probe["available"]
    # The console script is installed too.
    assert "up to date" in run(venv / "bin" / "pgsched", "migrate", env=env, cwd=elsewhere).stdout
