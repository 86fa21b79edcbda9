"""Running a worker as a program: with the maintenance services (unless turned off), and signals.

Signals. The first SIGTERM or SIGINT starts a graceful stop (running jobs get ``grace_seconds``).
Another one counts as "stop now" only when it is deliberate: one that comes within
``SIGNAL_WINDOW_SECONDS`` of the first is the same stop sent twice (``timeout`` and ``make``
both forward it; a systemd stop signals every process of a ``--processes`` group, which the
supervisor also relays), and so is every signal the supervisor relays (it has its own window).
"Stop now" stops the running jobs at once and puts them back (``queued``, as at the end of a
grace period), says which, and exits with status 130; a process that cannot do that within
``STOP_NOW_SECONDS`` exits anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any

from pgsched.client import App
from pgsched.config import Settings
from pgsched.protect import protect_process

from .outcomes import Stats
from .runtime import Worker

log = logging.getLogger("pgsched.worker")

SIGNAL_WINDOW_SECONDS = 1.0
STOP_NOW_SECONDS = 10.0
STOP_NOW_STATUS = 130
# How the supervisor (worker/supervisor.py) relays a stop to its children, so that they can tell
# it from a signal sent to them directly.
RELAYED_STOP = signal.SIGUSR1
RELAYED_STOP_NOW = signal.SIGUSR2


async def serve(
    app: App, settings: Settings, *, signals: bool = True, stopped: Any = None, supervised: bool = False
) -> Stats:
    """Run a worker (and, unless ``scheduler`` is off, the maintenance services) until stopped; with
    ``burst``, until the queues are empty. ``signals``: SIGTERM/SIGINT stop it (see the module
    docstring); ``supervised``: it also takes the supervisor's relayed signals. ``stopped``: an
    event that, already set, means stop at once (a signal came during start-up)."""
    from pgsched.leader.loop import Maintenance, default_services

    if settings.allow_shell:
        # Commands of shell jobs are children of this process (run_worker() in the user's own
        # process too): keep its secrets out of their reach. See pgsched/protect.py.
        protect_process()
    worker = Worker(app, settings)
    services = [Maintenance(app.dsn, default_services(settings.lease_seconds))] if settings.scheduler else []
    stop = Stop(worker, services)
    if signals:
        stop.install(supervised)
    if stopped is not None and stopped.is_set():
        worker.stop()
    running = [asyncio.create_task(s.run()) for s in services]
    try:
        stats = await worker.run()
    finally:
        for service in services:  # the worker is done (stopped, or --burst found nothing left)
            service.stop()
        await asyncio.gather(*running, return_exceptions=True)
        stop.uninstall()
    if stop.now:
        raise SystemExit(STOP_NOW_STATUS)
    return stats


class Stop:
    """What the stop signals do to a worker and the services beside it."""

    def __init__(self, worker: Worker, others: list[Any]) -> None:
        self.worker = worker
        self.others = others
        self.first: float | None = None  # when the graceful stop began (monotonic)
        self.now = False
        self.previous: dict[int, Any] = {}

    def install(self, supervised: bool) -> None:
        """Handle the stop signals until ``uninstall``.

        Not with the loop's ``add_signal_handler``: the loop puts the default action back when it
        closes, and a second signal arriving then would kill the process (``pgsched up`` while it
        stops its embedded server). The handlers in place before (``up``'s own) come back instead.
        """
        loop = asyncio.get_running_loop()
        actions = {signal.SIGTERM: lambda: self.on_signal(False), signal.SIGINT: lambda: self.on_signal(False)}
        if supervised:
            actions |= {RELAYED_STOP: lambda: self.on_signal(True), RELAYED_STOP_NOW: self.stop_now}
        for sig, action in actions.items():

            def handler(signum: int, frame: Any, action: Any = action) -> None:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(action)

            self.previous[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)

    def on_signal(self, relayed: bool) -> None:
        if self.first is None:
            self.first = time.monotonic()
            log.info("stopping: finishing running jobs (up to %g s)", self.worker.options.grace_seconds)
            self.worker.stop()
            for other in self.others:
                other.stop()
        elif relayed or time.monotonic() - self.first < SIGNAL_WINDOW_SECONDS:
            log.info("already stopping (the same stop, signalled twice); signal again later to stop now")
        else:
            self.stop_now()

    def stop_now(self) -> None:
        if self.now:
            return
        self.now = True
        for other in self.others:
            other.stop()
        leaving = self.worker.stop_now()
        jobs = ", ".join(f"{job.id} ({job.task})" for job in leaving) or "none"
        log.warning("stopping now: running jobs left: %s; putting them back to queued where possible", jobs)
        # Whatever the release waits for (an unreachable database), the process ends soon.
        timer = threading.Timer(STOP_NOW_SECONDS, os._exit, (STOP_NOW_STATUS,))
        timer.daemon = True
        timer.start()
