"""An app for scheduler-process tests: a schedule defined in code, a task that fails on a short backoff.

The App keeps the default name, as most users' apps do.
"""

from __future__ import annotations

from datetime import timedelta

from pgsched import App, Backoff, Context, Retry

app = App()


@app.task
def hello(name: str = "world") -> str:
    """Returns a greeting (a job that simply succeeds)."""
    return f"hello {name}"


@app.task(max_attempts=2, backoff=Backoff.fixed(0.5, jitter=0))
def always_fails(message: str = "boom") -> None:
    """Fails every attempt: retried once after 0.5 s, then dead-lettered."""
    raise RuntimeError(message)


@app.task
def retry_once(ctx: Context) -> str:
    """Asks for a retry on its first attempt, succeeds on the second."""
    if ctx.attempt == 1:
        raise Retry(after=0.5)
    return f"succeeded on attempt {ctx.attempt}"


@app.periodic(every=timedelta(seconds=1), name="heartbeat-demo", overlap="allow")
def heartbeat_demo() -> str:
    """Runs every second from the schedule the app defines in code."""
    return "beat"
