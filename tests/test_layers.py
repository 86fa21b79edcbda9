"""The import contract in pyproject.toml covers every core module (a new module is not silently exempt)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "pgsched.cli",
    "pgsched.cli_api",
    "pgsched.cli_jobs",
    "pgsched.cli_queues",
    "pgsched.cli_schedules",
    "pgsched.__main__",
    "pgsched.testing",
}


def test_every_core_module_is_in_the_import_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "forbidden")
    modules = {"pgsched"} | {f"pgsched.{p.stem}" for p in (ROOT / "pgsched").glob("*.py") if p.stem != "__init__"}
    assert set(contract["source_modules"]) == modules - ENTRY_POINTS
    assert set(contract["forbidden_modules"]) == {"pgsched.api", "pgsched.worker"}
