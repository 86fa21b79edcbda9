"""The task kinds: registered Python functions, shell commands and HTTP calls.

Each executor is a coroutine that returns the job's result or raises. The
runtime wraps it in the job's timeout and cancels it on request; each kind
makes cancellation real (asyncio cancel, process-group kill; an HTTP call runs
on the event loop, so a cancel closes its connection at once).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import ipaddress
import json
import os
import signal
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit, urlunsplit

import httpx

from pgsched.context import Context
from pgsched.jobs import Job
from pgsched.tasks import Task
from pgsched.validation import EXECUTOR_KINDS

from . import queries
from .runlog import MAX_LINE_BYTES

HTTP_BODY_MAX_BYTES = 64 * 1024
HTTP_MAX_REDIRECTS = 5
HTTP_DEFAULT_TIMEOUT = 30.0
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
# The environment a shell task starts from: the worker's own variables (its
# DSN, credentials) are not passed on; the job's `env` is added to this.
SHELL_BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}

SHELL_READ_BYTES = 64 * 1024
# What is kept of one output line: one byte more than the run log stores, so it marks the line truncated.
SHELL_LINE_KEEP_BYTES = MAX_LINE_BYTES + 1
OutputSink = Callable[[str, str], None]  # (stream, line)


def _no_cookies() -> CookieJar:  # a jar that keeps nothing: no cookie travels between the hops
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


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
        # Read in chunks and split lines here: a line may be of any length (StreamReader's own
        # line reading fails past 64 KiB). Only the start of a long line is kept, enough for
        # the run log to store its capped part with the truncation marker.
        line = bytearray()
        while chunk := await stream.read(SHELL_READ_BYTES):
            *complete, rest = chunk.split(b"\n")
            for piece in complete:
                line += piece[: SHELL_LINE_KEEP_BYTES - len(line)]
                output(name, line.decode(errors="replace"))
                line.clear()
            line += rest[: SHELL_LINE_KEEP_BYTES - len(line)]
        if line:
            output(name, line.decode(errors="replace"))

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


async def run_http(args: dict[str, Any], *, allow_private: bool, timeout: float | None) -> dict[str, Any]:
    """Make the request of an ``http`` job on the event loop (no thread), within one total deadline.

    The deadline covers everything (resolution, connection, every redirect, the body): a server that
    sends one byte at a time cannot hold the job past it. With ``timeout`` (the job's), the runtime's
    own timeout ends it; without, the default deadline fails the attempt.
    """
    deadline = timeout if timeout is not None else HTTP_DEFAULT_TIMEOUT
    try:
        async with asyncio.timeout(deadline):
            return await http_request(args, allow_private=allow_private)
    except TimeoutError:
        if timeout is not None:
            raise  # the runtime records it as the job's timeout
        raise TaskFailed(f"no complete response within {deadline:g} s") from None


def _refuse_private(host: str, addresses: list[str]) -> None:
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        # Only globally routable unicast: this also refuses shared address space
        # (100.64.0.0/10, where some clouds put their metadata service) and the like.
        if not ip.is_global or ip.is_multicast:
            raise NotRetryable(
                f"refused: {host} resolves to {address}, a private/loopback/link-local address "
                "(start the worker with --allow-private-http to allow it)"
            )


def check_target(host: str, port: int, *, allow_private: bool) -> str:
    """Resolve ``host`` and return the address to connect to; refuse private, loopback and
    link-local targets (every resolved address is checked) unless allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TaskFailed(f"cannot resolve {host}: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        _refuse_private(host, addresses)
    return addresses[0]


async def resolve_target(host: str, port: int, *, allow_private: bool) -> str:
    """``check_target`` without blocking the event loop (the resolver runs in asyncio's own executor)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TaskFailed(f"cannot resolve {host}: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        _refuse_private(host, addresses)
    return addresses[0]


@functools.lru_cache(maxsize=4)
def _tls_context(_cafile: str | None, _capath: str | None) -> ssl.SSLContext:
    # The system's trust store (as before), built once; keyed by SSL_CERT_FILE/SSL_CERT_DIR,
    # which OpenSSL reads when the context loads its default paths.
    return ssl.create_default_context()


def _host_header(parts: SplitResult) -> str:
    """``host[:port]`` of a URL, without the userinfo that ``netloc`` carries."""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


def _origin(parts: SplitResult) -> tuple[str, str, int]:
    return parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _keeps_credentials(old: SplitResult, new: SplitResult) -> bool:
    """Whether a redirect from ``old`` to ``new`` may carry the credential headers: only to the
    same origin, or from http to https on the same host; never to another host nor down to http."""
    if _origin(old) == _origin(new):
        return True
    upgrade = old.scheme == "http" and new.scheme == "https" and not old.port and not new.port
    return upgrade and old.hostname == new.hostname


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=_host_header(parts))) if "@" in parts.netloc else url


async def http_request(args: dict[str, Any], *, allow_private: bool) -> dict[str, Any]:
    """One HTTP call of an ``http`` job; redirects are followed by hand so each hop is checked.

    Each hop connects to the address it resolved and checked (never resolving again), sends the
    URL's host (not its userinfo) as ``Host`` and verifies TLS against that host. URL userinfo
    becomes an ``Authorization: Basic`` header (unless the job gives its own), a credential like
    the others: dropped on a redirect to another host or from https to http.
    """
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
    tls = _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    # No environment (proxies, .netrc), no redirects nor cookies of its own: every hop goes through
    # the checks here.
    # timeout=None: run_http's one deadline bounds the whole call, every redirect and byte included.
    client = httpx.AsyncClient(  # nosec B113
        verify=tls, trust_env=False, follow_redirects=False, timeout=None, cookies=httpx.Cookies(_no_cookies())
    )
    async with client:
        for _ in range(HTTP_MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise NotRetryable(f"refused: {_without_userinfo(url)} is not an http(s) URL")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await resolve_target(parts.hostname, port, allow_private=allow_private)
            given = {k.lower() for k in headers}
            sent = {**({} if "host" in given else {"Host": _host_header(parts)}), **headers}
            if parts.username is not None and "authorization" not in given:
                pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
                sent["Authorization"] = "Basic " + base64.b64encode(pair).decode()
            literal = f"[{address.replace('%', '%25')}]" if ":" in address else address
            target = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
            request = client.build_request(
                method, target, headers=sent, content=payload, extensions={"sni_hostname": parts.hostname}
            )
            try:
                response = await client.send(request, stream=True)
                try:
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > HTTP_BODY_MAX_BYTES:
                            break
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                raise TaskFailed(f"{method} {_without_userinfo(url)}: {exc or type(exc).__name__}") from None
            location = response.headers.get("Location")
            if response.status_code in (301, 302, 303, 307, 308) and location:
                following = urljoin(url, location)
                if not _keeps_credentials(parts, urlsplit(following)):
                    # Credentials meant for one origin are not handed to another, nor sent in clear.
                    headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
                    if "@" in parts.netloc and urlsplit(following).netloc == parts.netloc:
                        following = _without_userinfo(following)  # https->http on the same host
                url = following
                if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                    method, payload = "GET", None
                continue
            break
        else:
            raise TaskFailed(f"more than {HTTP_MAX_REDIRECTS} redirects")
    status = response.status_code
    ok = status in _as_list(expected) if expected is not None else 200 <= status < 300
    result = {
        "status": status,
        "body": bytes(data[:HTTP_BODY_MAX_BYTES]).decode(errors="replace"),
        "truncated": len(data) > HTTP_BODY_MAX_BYTES,
        "url": _without_userinfo(url),
    }
    if not ok:
        raise TaskFailed(f"unexpected HTTP status {status} from {_without_userinfo(url)}")
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
