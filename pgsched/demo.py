"""Demo tasks and schedules for `make up` (``pgsched up --app pgsched.demo:app``) and the README."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from pgsched import App, Backoff

app = App(name="pgsched.demo")
log = logging.getLogger(__name__)


@app.task(queue="default")
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@app.task(queue="reports", max_attempts=3, backoff=Backoff.exponential(base=2, cap=60), timeout=30)
async def send_report(day: str) -> dict[str, str]:
    """Pretend to build and send the report of one day."""
    await asyncio.sleep(0.1)
    return {"day": day, "status": "sent"}


@app.periodic(every=timedelta(minutes=1), name="demo-heartbeat")
def heartbeat() -> str:
    """Runs every minute, so a fresh `make up` shows a schedule at work."""
    log.info("demo heartbeat")
    return "alive"


@app.periodic(cron="0 9 * * *", timezone="Europe/Paris", name="demo-daily-report")
def daily_report() -> None:
    """Every day at 09:00 in Paris (whatever the server's zone)."""
    send_report.enqueue(day="today")
