"""The app the benchmark's worker processes load: ``pgsched worker --app bench.apps:app``.

``app`` reads its DSN from ``PGSCHED_DSN`` (the worker command line sets it);
the bench process builds its own copy with ``build(dsn)``, with the same tasks.
"""

from __future__ import annotations

import time

import pgsched


async def noop(i: int = 0) -> None:
    """Does nothing (async: runs on the worker's event loop)."""


def noop_sync(i: int = 0) -> None:
    """Does nothing (sync: runs in the worker's thread pool)."""


async def stamp(i: int = 0) -> dict[str, float]:
    """Returns the wall-clock time of its first line (W2 latency)."""
    return {"t": time.time()}


TASKS = (noop, noop_sync, stamp)


def build(dsn: str | None = None) -> pgsched.App:
    """An App with the benchmark tasks registered (not opened)."""
    app = pgsched.App(dsn)
    for fn in TASKS:
        app.task(fn)
    return app


app = build()
