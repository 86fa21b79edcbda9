"""Tasks for worker-process tests that the sample app lacks: jobs a test holds in flight and releases at will."""

from __future__ import annotations

import os
import time

from pgsched import App, Cancel, Context

app = App()


@app.task
def wait_for_file(ctx: Context, path: str, timeout: float = 120.0) -> str:
    """Blocks (in a task thread) until ``path`` exists, so a test decides when the job ends."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        if ctx.wait_cancelled(0.01):  # the pause between looks; stops when the job is stopped
            raise Cancel("stopped while waiting")
    return "released"
