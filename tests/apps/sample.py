"""Tasks for worker tests: each does one recognisable thing."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pgsched import App, Backoff, Cancel, Context, Retry, Snooze

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


@app.task(max_attempts=3, backoff=Backoff.fixed(60, jitter=0))
def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


@app.task(max_attempts=5)
def retry_later(after: float) -> None:
    raise Retry(after=after, reason="not yet")


@app.task
def snooze(seconds: float) -> None:
    raise Snooze(seconds)


@app.task
def give_up(reason: str) -> None:
    raise Cancel(reason)


@app.task
async def sleep_async(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@app.task
def sleep_sync(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@app.task(timeout=0.2)
async def too_slow() -> None:
    await asyncio.sleep(30)


@app.task(max_attempts=2, backoff=Backoff.fixed(1, jitter=0))
def checkpoint(ctx: Context) -> dict[str, Any]:
    """First attempt saves progress and fails; the second resumes from it."""
    ctx.log(f"attempt {ctx.attempt} starts from {ctx.progress}")
    logging.getLogger("tests.sample").warning("logged through logging")
    if ctx.progress is None:
        ctx.set_progress({"done": 5})
        raise RuntimeError("crash after the checkpoint")
    return {"resumed_from": ctx.progress["done"]}


@app.task
def chatty(lines: int) -> None:
    for i in range(lines):
        logging.getLogger("tests.sample").info("line %d", i)


@app.task
def huge_result() -> str:
    return "x" * (2 * 1024 * 1024)


@app.task
def not_json() -> object:
    return object()
