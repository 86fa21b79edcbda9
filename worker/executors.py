"""The task kinds: registered Python functions, shell commands and HTTP calls.

Each executor is a coroutine that returns the job's result or raises. The
runtime wraps it in the job's timeout and cancels it on request; each kind
makes cancellation real (asyncio cancel, process-group kill; an HTTP call in
a thread is abandoned, its socket timeout bounds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any
from urllib.parse import urljoin, urlsplit

from pgsched.context import Context
from pgsched.jobs import Job
from pgsched.tasks import Task
from pgsched.validation import EXECUTOR_KINDS

from . import queries

HTTP_BODY_MAX_BYTES = 64 * 1024
HTTP_MAX_REDIRECTS = 5
HTTP_DEFAULT_TIMEOUT = 30.0
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
# The environment a shell task starts from: the worker's own variables (its
# DSN, credentials) are not passed on; the job's `env` is added to this.
SHELL_BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}

OutputSink = Callable[[str, str], None]  # (stream, line)


class TaskFailed(Exception):
    """A command or request ended badly (non-zero exit, unexpected status, refused target)."""


class NotRetryable(TaskFailed):
    """A failure that retrying cannot fix (refused target, missing permission)."""


async def run_python(task: Task[Any, Any], ctx: Context, threads: Executor) -> Any:
    """Call the task's function with the job's args (and ``ctx`` first when it asks for it)."""
    leading = (ctx,) if task.takes_context else ()
    if task.is_async:
        return await task.fn(*leading, **ctx.job.args)
    # Sync functions run in the thread pool, with this coroutine's context
    # variables, so logging inside them is attributed to the job.
    call = functools.partial(contextvars.copy_context().run, _in_thread, ctx, task.fn, leading, ctx.job.args)
    return await asyncio.get_running_loop().run_in_executor(threads, call)


def _in_thread(ctx: Context, fn: Any, leading: tuple[Any, ...], args: dict[str, Any]) -> Any:
    # While this is true the job's code is still executing in a thread that Python cannot
    # stop: the worker must not hand the job to anyone else (see the worker's shutdown).
    ctx._thread_busy = True
    try:
        return fn(*leading, **args)
    finally:
        ctx._thread_busy = False


async def run_shell(args: dict[str, Any], output: OutputSink) -> dict[str, Any]:
    """Run ``args.cmd`` (an argv list, no shell) in its own process group; stdout/stderr go to the run log."""
    env = {**SHELL_BASE_ENV, **{str(k): str(v) for k, v in (args.get("env") or {}).items()}}
    spawn = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *args["cmd"],
            cwd=args.get("cwd"),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so a kill reaches its children too
        )
    )
    try:
        process = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        # Cancelled (or timed out) while the process was being set up: it may already have
        # children, which asyncio's own clean-up would leave running. Finish the start, then
        # kill the whole group.
        started = await spawn
        _kill_group(started.pid)
        await started.wait()
        raise

    async def pump(stream: asyncio.StreamReader, name: str) -> None:
        async for line in stream:
            output(name, line.decode(errors="replace").rstrip("\n"))

    assert process.stdout is not None and process.stderr is not None
    try:
        await asyncio.gather(pump(process.stdout, "stdout"), pump(process.stderr, "stderr"))
        code = await process.wait()
    except BaseException:
        _kill_group(process.pid)
        await process.wait()
        raise
    if code != 0:
        raise TaskFailed(f"command exited with status {code}")
    return {"exit_code": code}


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_http(
    args: dict[str, Any], *, allow_private: bool, threads: Executor, timeout: float | None
) -> dict[str, Any]:
    """Make the request in a thread (http.client), bounded by the socket timeout."""
    call = functools.partial(http_request, args, allow_private=allow_private, timeout=timeout or HTTP_DEFAULT_TIMEOUT)
    return await asyncio.get_running_loop().run_in_executor(threads, call)


def check_target(host: str, port: int, *, allow_private: bool) -> str:
    """Resolve ``host`` and return the address to connect to; refuse private, loopback and
    link-local targets (every resolved address is checked) unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TaskFailed(f"cannot resolve {host}: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            # Only globally routable unicast: this also refuses shared address space
            # (100.64.0.0/10, where some clouds put their metadata service) and the like.
            if not ip.is_global or ip.is_multicast:
                raise NotRetryable(
                    f"refused: {host} resolves to {address}, a private/loopback/link-local address "
                    "(start the worker with --allow-private-http to allow it)"
                )
    return addresses[0]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address resolved and checked beforehand, verifying the certificate of ``host``."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def http_request(args: dict[str, Any], *, allow_private: bool, timeout: float) -> dict[str, Any]:
    """One HTTP call of an ``http`` job; redirects are followed by hand so each hop is checked."""
    method = str(args.get("method", "GET")).upper()
    url = str(args["url"])
    headers = {str(k): str(v) for k, v in (args.get("headers") or {}).items()}
    body = args.get("body")
    if isinstance(body, (dict, list)):
        payload: bytes | None = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    else:
        payload = None if body is None else str(body).encode()
    expected = args.get("expect_status")
    for _ in range(HTTP_MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise NotRetryable(f"refused: {url} is not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = check_target(parts.hostname, port, allow_private=allow_private)
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = _PinnedHTTPSConnection(parts.hostname, address, port, timeout)
        else:
            connection = http.client.HTTPConnection(address, port, timeout=timeout)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            connection.request(method, path, body=payload, headers={"Host": parts.netloc, **headers})
            response = connection.getresponse()
            data = response.read(HTTP_BODY_MAX_BYTES + 1)
        finally:
            connection.close()
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            target = urljoin(url, response.getheader("Location", ""))
            if urlsplit(target).netloc != parts.netloc:
                # Credentials meant for one host are not handed to the host a redirect names.
                headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
            url = target
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, payload = "GET", None
            continue
        break
    else:
        raise TaskFailed(f"more than {HTTP_MAX_REDIRECTS} redirects")
    ok = response.status in _as_list(expected) if expected is not None else 200 <= response.status < 300
    result = {
        "status": response.status,
        "body": data[:HTTP_BODY_MAX_BYTES].decode(errors="replace"),
        "truncated": len(data) > HTTP_BODY_MAX_BYTES,
        "url": url,
    }
    if not ok:
        raise TaskFailed(f"unexpected HTTP status {response.status} from {url}")
    return result


def _as_list(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def job_timeout(job: Job) -> float | None:
    """The job's timeout; shell and http jobs may also give it in their args (DESIGN §3)."""
    if job.timeout_seconds is None and job.task in EXECUTOR_KINDS:
        return job.args.get("timeout")
    return job.timeout_seconds


async def creator_may_run_commands(pool: Any, job: Job) -> bool:
    """Whether the role that created a shell/http job may create such jobs (re-checked here)."""
    async with pool.connection() as conn:
        row = await (await conn.execute(queries.MAY_RUN_COMMANDS, {"role": job.created_by})).fetchone()
    return bool(row and row[0])
