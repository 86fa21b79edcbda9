"""Running a worker as a program: with the maintenance services when asked, and signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from pgsched.client import App
from pgsched.config import Settings
from pgsched.protect import protect_process

from .outcomes import Stats
from .runtime import Worker

log = logging.getLogger("pgsched.worker")


async def serve(app: App, settings: Settings, *, signals: bool = True, stopped: Any = None) -> Stats:
    """Run a worker (and, with ``with_scheduler``, the maintenance services) until stopped; with
    ``burst``, until the queues are empty. ``signals``: SIGTERM/SIGINT stop it gracefully.
    ``stopped``: an event that, already set, means stop at once (a signal came during start-up)."""
    from pgsched.maintenance import Maintenance, default_services

    if settings.allow_shell:
        # Commands of shell jobs are children of this process (run_worker() in the user's own
        # process too): keep its secrets out of their reach. See pgsched/protect.py.
        protect_process()
    worker = Worker(app, settings)
    services = [Maintenance(app.dsn, default_services(settings.lease_seconds))] if settings.with_scheduler else []
    if signals:
        install_signal_handlers(worker, *services)
    if stopped is not None and stopped.is_set():
        worker.stop()
    running = [asyncio.create_task(s.run()) for s in services]
    try:
        return await worker.run()
    finally:
        for service in services:  # the worker is done (stopped, or --burst found nothing left)
            service.stop()
        await asyncio.gather(*running, return_exceptions=True)


def install_signal_handlers(worker: Worker, *others: Any) -> None:
    """SIGTERM/SIGINT: graceful stop (of the worker and of ``others``, which have ``stop()``);
    a second one: exit at once."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if worker._stopping.is_set():
            os._exit(130)
        log.info("stopping: finishing running jobs (up to %g s)", worker.options.grace_seconds)
        worker.stop()
        for other in others:
            other.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
