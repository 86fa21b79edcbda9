"""Tasks for the queue-control tests (``--app tests.apps.controls:app``)."""

from __future__ import annotations

import asyncio

from pgsched import App

app = App()


@app.task(queue="capped")
async def work(ms: float = 0) -> None:
    """Takes ``ms`` milliseconds."""
    await asyncio.sleep(ms / 1000)


@app.task(max_per_key=1)
async def per_customer(ms: float = 0) -> None:
    """At most one job per concurrency key runs at once (the task's own max_per_key)."""
    await asyncio.sleep(ms / 1000)
