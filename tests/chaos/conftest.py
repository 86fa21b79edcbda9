"""The chaos scenarios' fixtures (tests/chaos/scenario.py has the kit)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import faults
from .scenario import Scenario, running


@pytest.fixture
def scenario(request: pytest.FixtureRequest, dsn: str, cli_env: dict[str, str], tmp_path: Path) -> Iterator[Scenario]:
    """A scenario on this test's database of the session's server."""
    with running(request.node.name, dsn, cli_env, tmp_path) as s:
        yield s


@pytest.fixture
def crashable(
    request: pytest.FixtureRequest, cli_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[Scenario, faults.OwnServer]]:
    """A scenario on a server of its own (initdb on tmpfs, about a second), which it may crash."""
    with faults.own_server("chaos") as (server, dsn), running(request.node.name, dsn, cli_env, tmp_path) as s:
        yield s, server
