"""The import contract in pyproject.toml covers every core module (a new module is not silently exempt)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "pgsched.cli",
    "pgsched.cli_jobs",
    "pgsched.cli_queues",
    "pgsched.cli_schedules",
    "pgsched.__main__",
    "pgsched.testing",
}


def test_every_core_module_is_in_the_import_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "forbidden")
    assert set(contract["source_modules"]) == core_modules()
    assert set(contract["forbidden_modules"]) == {"pgsched.api", "pgsched.worker"}


def core_modules() -> set[str]:
    """Every module and package of pgsched/ (subpackages included) but the entry points."""
    modules = set()
    for path in (ROOT / "pgsched").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules - ENTRY_POINTS
