"""Demo tasks for `make up` (``pgsched up --app pgsched.demo:app``) and the README."""

from __future__ import annotations

import asyncio

from pgsched import App, Backoff

app = App()


@app.task(queue="default")
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@app.task(queue="reports", max_attempts=3, backoff=Backoff.exponential(base=2, cap=60), timeout=30)
async def send_report(day: str) -> dict[str, str]:
    """Pretend to build and send the report of one day."""
    await asyncio.sleep(0.1)
    return {"day": day, "status": "sent"}
