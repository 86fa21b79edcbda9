"""Tasks for worker subprocess tests (``--app tests.apps.sample:app``): each does one recognisable thing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pgsched import App

app = App()


@app.task
def noop(i: int = 0) -> None:
    """Does nothing (throughput and exactly-once tests)."""


@app.task
async def echo(value: Any = None) -> Any:
    """Returns its argument."""
    return value


@app.task
def add(a: int, b: int) -> int:
    return a + b


@app.task
async def sleep_async(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@app.task
def sleep_sync(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"
