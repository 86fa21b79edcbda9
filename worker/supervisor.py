"""``pgsched worker --processes N``: N worker processes under one supervisor that restarts a dead one.

Children get the supervisor's settings through their ``PGSCHED_*`` variables
(with ``processes=1``), except the secret ones (the DSN, the encryption keys,
``DATABASE_URL``, ``PGPASSWORD``), which go through a pipe on their stdin: a
process's environment can be read by other processes (``/proc/PID/environ``),
and a child's would be readable from its start until it blanks it.

SIGTERM/SIGINT are relayed to every child as ``RELAYED_STOP``, which it takes as a graceful
stop and never as "stop now", even when it got the same stop directly (a systemd stop
signals every process of the group). A second signal counts as "stop now" only after
``SIGNAL_WINDOW_SECONDS`` (worker/serve.py); the children then get ``RELAYED_STOP_NOW``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import msgspec

from pgsched.config import Settings, env_name
from pgsched.protect import SECRET_VARIABLES

from .serve import RELAYED_STOP, RELAYED_STOP_NOW, SIGNAL_WINDOW_SECONDS

log = logging.getLogger("pgsched.supervisor")

# A child that dies sooner than this after its start is restarted after a pause,
# so a crash loop does not spin.
MIN_UPTIME_SECONDS = 5.0


def child_environment(settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of a child, and the secret variables it gets on its stdin instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_") and k not in SECRET_VARIABLES}
    secrets = {k: v for k, v in os.environ.items() if k in SECRET_VARIABLES and not k.startswith("PGSCHED_")}
    for name, value in msgspec.structs.asdict(settings).items():
        if value is not None:
            variable = env_name(name)
            text = str(value).lower() if isinstance(value, bool) else str(value)
            (secrets if variable in SECRET_VARIABLES else env)[variable] = text
    env[env_name("processes")] = "1"
    return env, secrets


def supervise(settings: Settings) -> int:
    """Run and watch the children until stopped; returns the exit status."""
    env, secrets = child_environment(settings)
    command = [sys.executable, "-m", "pgsched", "worker", "--secrets-on-stdin", "--supervised"]
    children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    stopping = False
    first_signal = 0.0
    stopped_now = False

    def start(slot: int) -> None:
        # Its own process group: a Ctrl-C at the terminal reaches the supervisor only, which
        # forwards it once (a child getting it twice would take it as "exit at once").
        process = subprocess.Popen(command, env=env, process_group=0, stdin=subprocess.PIPE)
        assert process.stdin is not None
        with process.stdin:  # a few hundred bytes: the pipe's buffer takes them without blocking
            process.stdin.write(json.dumps(secrets).encode())
        children[slot] = (process, time.monotonic())

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping, first_signal, stopped_now
        if not stopping:
            stopping, first_signal, relay = True, time.monotonic(), RELAYED_STOP
        elif stopped_now or time.monotonic() - first_signal < SIGNAL_WINDOW_SECONDS:
            return  # the same stop signalled twice (or stopping now already)
        else:
            stopped_now, relay = True, RELAYED_STOP_NOW
            log.warning("stopping now: telling the worker processes to put their running jobs back")
        for process, _ in children.values():
            if process.poll() is None:
                process.send_signal(relay)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for slot in range(settings.processes):
        start(slot)
    log.info("supervising %d worker processes", settings.processes)
    status = 0
    while children:
        time.sleep(0.2)
        for slot, (process, started) in list(children.items()):
            code = process.poll()
            if code is None:
                continue
            del children[slot]
            if stopping or settings.burst:
                status = status or (code if code > 0 else 0)
                continue
            log.warning("worker process %d exited with %s; restarting it", process.pid, code)
            if time.monotonic() - started < MIN_UPTIME_SECONDS:
                time.sleep(1.0)
            if not stopping:  # a signal may have come during the pause
                start(slot)
    return status
