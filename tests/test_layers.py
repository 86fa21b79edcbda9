"""The import contract in pyproject.toml covers every core module (a new module is not silently exempt)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
# The command line (the pgsched.cli package, every module of it) and the testing kit.
ENTRY_POINTS = {"pgsched.__main__", "pgsched.testing"}


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
    return {m for m in modules - ENTRY_POINTS if m != "pgsched.cli" and not m.startswith("pgsched.cli.")}


def test_every_command_module_is_in_the_cli_contract() -> None:
    """A new module of pgsched/cli/ is a command module (it may not import the group nor another
    command module) or one of the shared parts named in the contract."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c.get("containers") == ["pgsched.cli"])
    named = {m.strip() for layer in contract["layers"] for m in layer.replace(":", "|").split("|")}
    assert named == {p.stem for p in (ROOT / "pgsched" / "cli").glob("*.py") if p.stem != "__init__"}


def test_every_command_module_is_registered() -> None:
    """The commands a module of pgsched/cli/ lists in COMMANDS are commands of `pgsched`."""
    import importlib

    from pgsched.cli import main

    for path in (ROOT / "pgsched" / "cli").glob("*.py"):
        module = importlib.import_module(f"pgsched.cli.{path.stem}")
        for command in getattr(module, "COMMANDS", []):
            assert main.commands.get(command.name) is command, f"{path.stem}: {command.name} is not registered"
