"""Tasks for worker-process tests that the sample app lacks: jobs a test holds in flight and releases at will."""

from __future__ import annotations

import os
import time

from pgsched import App

app = App()


@app.task
def wait_for_file(path: str, timeout: float = 120.0) -> str:
    """Blocks (in a task thread) until ``path`` exists, so a test decides when the job ends."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)
    return "released"
