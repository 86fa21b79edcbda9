"""The shell and http executors, driven by a real worker in this process against a real database and a
real HTTP server on loopback; the SSRF check as a pure function."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

import pgsched
from pgsched.config import replace_settings
from pgsched.worker.executors import HTTP_BODY_MAX_BYTES, NotRetryable, check_target, run_shell
from pgsched.worker.runlog import MAX_LINE_BYTES
from pgsched.worker.runtime import Worker

from .conftest import wait_until

pytestmark = pytest.mark.db

WORKER = {"burst": True, "poll_seconds": 0.2}


def state(conn: psycopg.Connection[Any], job_id: int) -> str:
    return conn.execute("SELECT state FROM pgsched.jobs WHERE id = %s", (job_id,)).fetchone()[0]


def runs(conn: psycopg.Connection[Any], job_id: int) -> list[tuple[int, str, str | None]]:
    """(attempt, outcome, error) of every runs row of the job, oldest first."""
    return conn.execute(
        "SELECT attempt, outcome, error FROM pgsched.runs WHERE job_id = %s ORDER BY id", (job_id,)
    ).fetchall()


def output(conn: psycopg.Connection[Any], job_id: int, stream: str) -> list[str]:
    """The lines a run wrote to one stream, in order."""
    rows = conn.execute(
        "SELECT message FROM pgsched.run_logs WHERE job_id = %s AND stream = %s ORDER BY logged_at, ctid",
        (job_id, stream),
    ).fetchall()
    return [m for (m,) in rows]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def worker_in_thread(app: pgsched.App, **options: Any) -> Iterator[Worker]:
    """A worker (not burst) running in a thread with its own event loop, so that nothing the test does
    blocks the worker; stopped gracefully on exit."""
    worker = Worker(app, replace_settings(app.settings, poll_seconds=0.2, grace_seconds=1.0, **options))
    loop: list[asyncio.AbstractEventLoop] = []
    started = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        loop.append(asyncio.get_running_loop())
        started.set()
        await worker.run()

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=target, name="pgsched-test-worker")
    thread.start()
    started.wait(10)
    try:
        yield worker
    finally:
        if loop:
            loop[0].call_soon_threadsafe(worker.stop)
        thread.join(30)
        assert not thread.is_alive(), "the worker did not stop"
        if failure:
            raise failure[0]


# -- shell -----------------------------------------------------------------------------------------


def test_shell_stdout_and_stderr_lines_land_in_run_logs(app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    job = app.enqueue("shell", {"cmd": ["sh", "-c", "echo out one; echo err one >&2; echo out two"]})
    stats = app.run_worker(allow_shell=True, **WORKER)
    assert stats.succeeded == 1
    done = app.get(job.id)
    assert (done.state, done.result) == ("succeeded", {"exit_code": 0})
    assert output(conn, job.id, "stdout") == ["out one", "out two"]
    assert output(conn, job.id, "stderr") == ["err one"]
    assert runs(conn, job.id) == [(1, "succeeded", None)]


def test_shell_argv_is_not_interpreted_by_a_shell(
    app: pgsched.App, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    marker = tmp_path / "injected"
    argument = f"$HOME; touch {marker}; echo injected `id` $(id) | cat"
    job = app.enqueue("shell", {"cmd": ["echo", argument]})
    app.run_worker(allow_shell=True, **WORKER)
    assert app.get(job.id).state == "succeeded"
    assert output(conn, job.id, "stdout") == [argument]
    assert not marker.exists()


def test_shell_cwd_and_env_are_honoured(app: pgsched.App, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    job = app.enqueue(
        "shell",
        {
            "cmd": ["sh", "-c", 'pwd -P; echo "$GREETING, $WHO"'],
            "cwd": str(tmp_path),
            "env": {"GREETING": "hello", "WHO": 42},
        },
    )
    app.run_worker(allow_shell=True, **WORKER)
    assert app.get(job.id).state == "succeeded"
    assert output(conn, job.id, "stdout") == [os.path.realpath(tmp_path), "hello, 42"]


def test_shell_command_does_not_see_the_workers_environment(
    app: pgsched.App, conn: psycopg.Connection[Any], dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSCHED_DSN", dsn)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    job = app.enqueue("shell", {"cmd": ["env"], "env": {"JOB_VAR": "mine"}})
    app.run_worker(allow_shell=True, **WORKER)
    assert app.get(job.id).state == "succeeded"
    variables = dict(line.split("=", 1) for line in output(conn, job.id, "stdout"))
    assert variables["JOB_VAR"] == "mine"
    assert "PGSCHED_DSN" not in variables
    assert "AWS_SECRET_ACCESS_KEY" not in variables
    assert not any(dsn in line for line in output(conn, job.id, "stdout"))


def test_shell_non_zero_exit_fails_the_attempt_with_its_status(app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    last = app.enqueue("shell", {"cmd": ["sh", "-c", "echo about to fail >&2; exit 3"]}, max_attempts=1)
    retried = app.enqueue("shell", {"cmd": ["false"]}, max_attempts=2)
    stats = app.run_worker(allow_shell=True, **WORKER)
    assert (stats.failed, stats.retried) == (1, 1)
    job = app.get(last.id)
    assert job.state == "failed"
    assert "status 3" in job.error
    [(attempt, outcome, error)] = runs(conn, last.id)
    assert (attempt, outcome) == (1, "failed") and "status 3" in error
    assert output(conn, last.id, "stderr") == ["about to fail"]
    again = app.get(retried.id)
    assert (again.state, again.attempts) == ("scheduled", 1)
    assert "status 1" in again.error


def test_worker_without_allow_shell_does_not_claim_shell_jobs(
    app: pgsched.App, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    job = app.enqueue("shell", {"cmd": ["touch", str(marker)]})
    stats = app.run_worker(**WORKER)  # allow_shell is off by default
    assert stats.claimed == 0
    left = app.get(job.id)
    assert (left.state, left.attempts, left.worker_id) == ("queued", 0, None)
    assert runs(conn, job.id) == []
    assert not marker.exists()


@pytest.fixture
def outsider(conn: psycopg.Connection[Any]) -> Any:
    """A role that exists but is not a member of pgsched_admin (roles are cluster-wide: a unique name, dropped after)."""
    name = f"pgsched_test_outsider_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{name}" NOLOGIN')
    yield name
    conn.execute(f'DROP ROLE "{name}"')


def test_shell_job_of_a_role_not_allowed_fails_without_running(
    app: pgsched.App, conn: psycopg.Connection[Any], tmp_path: Path, outsider: str
) -> None:
    marker = tmp_path / "ran"
    job = app.enqueue("shell", {"cmd": ["touch", str(marker)]}, max_attempts=5)
    conn.execute("UPDATE pgsched.jobs SET created_by = %s WHERE id = %s", (outsider, job.id))
    stats = app.run_worker(allow_shell=True, **WORKER)
    assert stats.failed == 1
    failed = app.get(job.id)
    assert (failed.state, failed.attempts) == ("failed", 1)  # no retry: it would never be allowed
    assert outsider in failed.error
    [(_, outcome, error)] = runs(conn, job.id)
    assert outcome == "failed" and outsider in error
    assert not marker.exists()


def test_shell_job_of_a_dropped_role_fails_without_retry(
    app: pgsched.App, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    job = app.enqueue("shell", {"cmd": ["touch", str(marker)]}, max_attempts=5)
    conn.execute("UPDATE pgsched.jobs SET created_by = 'pgsched_test_role_that_was_dropped' WHERE id = %s", (job.id,))
    app.run_worker(allow_shell=True, **WORKER)
    assert not marker.exists()
    failed = app.get(job.id)
    assert (failed.state, failed.attempts) == ("failed", 1)
    assert "pgsched_test_role_that_was_dropped" in failed.error


def background_child(pidfile: Path) -> list[str]:
    """A command whose shell starts a long-lived child in the background, writes its pid, and waits for it."""
    return ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"]


def read_pid(pidfile: Path) -> int | None:
    text = pidfile.read_text().strip() if pidfile.exists() else ""
    return int(text) if text else None


@pytest.mark.parametrize("where", ["option", "args"])
def test_shell_timeout_kills_the_whole_process_group(
    where: str, app: pgsched.App, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    args = {"cmd": background_child(pidfile)}
    if where == "args":  # DESIGN §3: shell takes its timeout in its args too
        job = app.enqueue("shell", {**args, "timeout": 1}, max_attempts=1)
    else:
        job = app.enqueue("shell", args, timeout=1, max_attempts=1)
    app.run_worker(allow_shell=True, **WORKER)
    child = read_pid(pidfile)
    assert child is not None
    wait_until(lambda: not alive(child), timeout=10, message=f"background child {child} to be killed")
    failed = app.get(job.id)
    assert failed.state == "failed"
    assert "timed out" in failed.error
    assert [outcome for _, outcome, _ in runs(conn, job.id)] == ["timeout"]


def test_shell_cancel_kills_the_whole_process_group(
    app: pgsched.App, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    job = app.enqueue("shell", {"cmd": background_child(pidfile)})
    with worker_in_thread(app, allow_shell=True):
        wait_until(lambda: state(conn, job.id) == "running", message="the job to run")
        child = wait_until(lambda: read_pid(pidfile), message="the child's pid")
        app.cancel(job.id, reason="stop it")
        wait_until(lambda: state(conn, job.id) == "cancelled", message="the job to be cancelled")
    wait_until(lambda: not alive(child), timeout=10, message=f"background child {child} to be killed")
    cancelled = app.get(job.id)
    assert (cancelled.state, cancelled.error) == ("cancelled", "stop it")
    assert [outcome for _, outcome, _ in runs(conn, job.id)] == ["cancelled"]


def test_shell_cancelled_while_its_process_is_being_set_up_still_kills_the_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"

    async def scenario() -> None:
        attempt = asyncio.create_task(run_shell({"cmd": background_child(pidfile)}, lambda stream, line: None))
        for _ in range(3):  # the attempt starts the spawn, which forks the command and then waits
            await asyncio.sleep(0)  # for asyncio to connect its pipes
        # The event loop is busy elsewhere (sync code, other jobs) while the command starts its child...
        wait_until(lambda: read_pid(pidfile), message="the child's pid")
        attempt.cancel()  # ...and then the job's cancel (or timeout, or shutdown) arrives.
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(attempt, 5)

    try:
        asyncio.run(scenario())
        child = read_pid(pidfile)
        assert child is not None
        wait_until(lambda: not alive(child), timeout=5, message=f"background child {child} to be killed")
    finally:
        child = read_pid(pidfile)
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


# -- http ------------------------------------------------------------------------------------------


def test_http_request_arrives_and_its_response_becomes_the_result(app: pgsched.App, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hooks/deploy", method="POST").respond_with_json({"ok": True}, status=201)
    url = httpserver.url_for("/hooks/deploy?env=prod")
    job = app.enqueue(
        "http",
        {"method": "post", "url": url, "headers": {"X-Token": "t0ken"}, "body": {"ref": "main", "n": [1, 2]}},
    )
    app.run_worker(allow_private_http=True, **WORKER)
    done = app.get(job.id)
    assert done.state == "succeeded", done.error
    assert done.result["status"] == 201
    assert json.loads(done.result["body"]) == {"ok": True}
    assert done.result["truncated"] is False
    [(request, _)] = httpserver.log
    assert request.method == "POST"
    assert request.args["env"] == "prod"
    assert request.headers["X-Token"] == "t0ken"
    assert request.headers["Content-Type"] == "application/json"
    assert request.get_json() == {"ref": "main", "n": [1, 2]}


def test_http_text_body_is_sent_as_is(app: pgsched.App, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/text", method="PUT", data="plain words").respond_with_data("stored")
    job = app.enqueue(
        "http",
        {
            "method": "PUT",
            "url": httpserver.url_for("/text"),
            "body": "plain words",
            "headers": {"Content-Type": "text/plain"},
        },
    )
    app.run_worker(allow_private_http=True, **WORKER)
    done = app.get(job.id)
    assert done.state == "succeeded", done.error
    assert (done.result["status"], done.result["body"]) == (200, "stored")


def test_http_response_body_is_bounded(app: pgsched.App, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/big").respond_with_data("x" * (HTTP_BODY_MAX_BYTES + 1000))
    job = app.enqueue("http", {"url": httpserver.url_for("/big")})
    app.run_worker(allow_private_http=True, **WORKER)
    done = app.get(job.id)
    assert done.state == "succeeded", done.error
    assert len(done.result["body"]) == HTTP_BODY_MAX_BYTES
    assert done.result["truncated"] is True


def test_http_unexpected_status_fails_and_expect_status_is_honoured(
    app: pgsched.App, conn: psycopg.Connection[Any], httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/missing").respond_with_data("no such thing", status=404)
    httpserver.expect_request("/accepted").respond_with_data("queued", status=202)
    default = app.enqueue("http", {"url": httpserver.url_for("/missing")}, max_attempts=1)
    expected = app.enqueue("http", {"url": httpserver.url_for("/missing"), "expect_status": 404})
    listed = app.enqueue("http", {"url": httpserver.url_for("/accepted"), "expect_status": [200, 202]})
    not_listed = app.enqueue("http", {"url": httpserver.url_for("/accepted"), "expect_status": 200}, max_attempts=1)
    app.run_worker(allow_private_http=True, **WORKER)

    failed = app.get(default.id)
    assert failed.state == "failed"
    assert "404" in failed.error
    assert [outcome for _, outcome, _ in runs(conn, default.id)] == ["failed"]
    ok = app.get(expected.id)
    assert (ok.state, ok.result["status"], ok.result["body"]) == ("succeeded", 404, "no such thing")
    assert (app.get(listed.id).state, app.get(listed.id).result["status"]) == ("succeeded", 202)
    wrong = app.get(not_listed.id)
    assert wrong.state == "failed" and "202" in wrong.error


def test_http_redirect_is_followed(app: pgsched.App, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/old").respond_with_response(Response(status=302, headers={"Location": "/new?x=1"}))
    httpserver.expect_request("/new").respond_with_data("arrived")
    job = app.enqueue("http", {"url": httpserver.url_for("/old")})
    app.run_worker(allow_private_http=True, **WORKER)
    done = app.get(job.id)
    assert done.state == "succeeded", done.error
    assert (done.result["status"], done.result["body"]) == (200, "arrived")
    assert done.result["url"] == httpserver.url_for("/new?x=1")
    assert [request.path for request, _ in httpserver.log] == ["/old", "/new"]


@pytest.mark.parametrize(
    ("status", "second_method", "second_body"),
    [(303, "GET", b""), (302, "GET", b""), (307, "POST", b'{"n": 1}'), (308, "POST", b'{"n": 1}')],
)
def test_http_redirect_of_a_post_keeps_or_drops_the_body_by_status(
    status: int, second_method: str, second_body: bytes, app: pgsched.App, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/form", method="POST").respond_with_response(
        Response(status=status, headers={"Location": "/done"})
    )
    httpserver.expect_request("/done").respond_with_data("done")
    job = app.enqueue("http", {"method": "POST", "url": httpserver.url_for("/form"), "body": {"n": 1}})
    app.run_worker(allow_private_http=True, **WORKER)
    done = app.get(job.id)
    assert (done.state, done.result["body"]) == ("succeeded", "done"), done.error
    [(first, _), (second, _)] = httpserver.log
    assert (first.method, first.get_data()) == ("POST", b'{"n": 1}')
    assert (second.method, second.get_data()) == (second_method, second_body)


def test_http_redirect_loop_fails(app: pgsched.App, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/loop").respond_with_response(Response(status=302, headers={"Location": "/loop"}))
    job = app.enqueue("http", {"url": httpserver.url_for("/loop")}, max_attempts=1)
    app.run_worker(allow_private_http=True, **WORKER)
    failed = app.get(job.id)
    assert failed.state == "failed"
    assert "redirects" in failed.error
    assert len(httpserver.log) == 6  # the first request and five redirects


def test_http_redirect_to_another_host_does_not_carry_the_credentials(app: pgsched.App, httpserver: HTTPServer) -> None:
    # The same server under two host names: "localhost" redirects to "127.0.0.1", another origin.
    elsewhere = f"http://127.0.0.1:{httpserver.port}/elsewhere"
    httpserver.expect_request("/start").respond_with_response(Response(status=302, headers={"Location": elsewhere}))
    httpserver.expect_request("/elsewhere").respond_with_data("landed")
    job = app.enqueue(
        "http",
        {"url": httpserver.url_for("/start"), "headers": {"Authorization": "Bearer s3cret", "X-Trace": "t1"}},
    )
    app.run_worker(allow_private_http=True, **WORKER)
    assert app.get(job.id).state == "succeeded"
    [(first, _), (second, _)] = httpserver.log
    assert first.headers["Authorization"] == "Bearer s3cret"
    assert second.host == f"127.0.0.1:{httpserver.port}"
    assert "Authorization" not in second.headers
    assert second.headers["X-Trace"] == "t1"


def test_http_redirect_on_the_same_host_keeps_the_credentials(app: pgsched.App, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/start").respond_with_response(Response(status=302, headers={"Location": "/next"}))
    httpserver.expect_request("/next").respond_with_data("landed")
    job = app.enqueue("http", {"url": httpserver.url_for("/start"), "headers": {"Authorization": "Bearer s3cret"}})
    app.run_worker(allow_private_http=True, **WORKER)
    assert app.get(job.id).state == "succeeded"
    assert [request.headers.get("Authorization") for request, _ in httpserver.log] == ["Bearer s3cret"] * 2


def test_http_to_a_private_target_is_refused_unless_allowed(
    app: pgsched.App, conn: psycopg.Connection[Any], httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/internal").respond_with_data("secret")
    job = app.enqueue("http", {"url": httpserver.url_for("/internal")}, max_attempts=5)
    stats = app.run_worker(**WORKER)  # allow_private_http is off by default
    assert stats.failed == 1
    refused = app.get(job.id)
    assert (refused.state, refused.attempts) == ("failed", 1)  # refusals are not retried
    assert "refused" in refused.error
    assert [outcome for _, outcome, _ in runs(conn, job.id)] == ["failed"]
    assert httpserver.log == []


@pytest.mark.parametrize("where", ["option", "args"])
def test_http_timeout_ends_the_attempt(
    where: str, app: pgsched.App, conn: psycopg.Connection[Any], httpserver: HTTPServer
) -> None:
    release = threading.Event()

    def stall(request: Request) -> Response:
        release.wait(20)
        return Response("late")

    httpserver.expect_request("/stall").respond_with_handler(stall)
    args = {"url": httpserver.url_for("/stall")}
    if where == "args":
        job = app.enqueue("http", {**args, "timeout": 0.5}, max_attempts=1)
    else:
        job = app.enqueue("http", args, timeout=0.5, max_attempts=1)
    try:
        app.run_worker(allow_private_http=True, **WORKER)
    finally:
        release.set()
    failed = app.get(job.id)
    assert failed.state == "failed"
    assert "timed out" in failed.error
    assert [outcome for _, outcome, _ in runs(conn, job.id)] == ["timeout"]


# -- the SSRF check (pure) -------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "0.0.0.0",
        "2130706433",  # 127.0.0.1 written as one number
        "::1",
        "fe80::1",
        "fd00:ec2::254",  # cloud metadata over IPv6 (unique local)
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:169.254.169.254",
    ],
)
def test_check_target_refuses_private_loopback_and_link_local(host: str) -> None:
    with pytest.raises(NotRetryable, match="refused"):
        check_target(host, 80, allow_private=False)


@pytest.mark.unit
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.0.0.1", "169.254.169.254", "::1"])
def test_check_target_allows_private_targets_when_the_operator_does(host: str) -> None:
    assert check_target(host, 80, allow_private=True) in {"127.0.0.1", "10.0.0.1", "169.254.169.254", "::1"}


@pytest.mark.unit
@pytest.mark.parametrize("host", ["8.8.8.8", "2001:4860:4860::8888"])
def test_check_target_lets_public_addresses_through(host: str) -> None:
    assert check_target(host, 443, allow_private=False) == host


@pytest.mark.unit
def test_check_target_refuses_non_global_shared_address_space() -> None:
    with pytest.raises(NotRetryable, match="refused"):
        check_target("100.100.100.200", 80, allow_private=False)


# -- a raw loopback HTTP server (dripping bodies, TLS and plain HTTP on one port) -------------------


class RawServer:
    """An HTTP/1.1 server on a loopback socket, written by hand so a test controls every byte: each
    request is recorded as ``(tls, method, path, headers)`` and answered by ``respond(request, conn,
    stopped)``. With ``tls``, a connection that starts with a TLS handshake is served over TLS and
    any other one in clear, on the same port (so a test can redirect https://localhost:P to
    http://localhost:P, the same host and port)."""

    def __init__(self, respond: Any, tls: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.tls = tls
        self.requests: list[tuple[bool, str, str, dict[str, str]]] = []
        self.ended: list[tuple[bool, str, str, dict[str, str]]] = []
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            tls = self.tls is not None and conn.recv(1, socket.MSG_PEEK) == b"\x16"
            if tls:
                assert self.tls is not None
                conn = self.tls.wrap_socket(conn, server_side=True)
                self.connections.append(conn)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            headers = dict(line.split(": ", 1) for line in head[1:])
            request = (tls, method, path, headers)
            self.requests.append(request)
            try:
                self.respond(request, conn, self.stopped)
            finally:
                self.ended.append(request)  # answered, or the client went away
        with contextlib.suppress(OSError):
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()


@contextmanager
def raw_server(respond: Any, tls: ssl.SSLContext | None = None) -> Iterator[RawServer]:
    server = RawServer(respond, tls)
    try:
        yield server
    finally:
        server.stop()


def drip(request: Any, conn: socket.socket, stopped: threading.Event) -> None:
    """Headers promising a large body, then one byte every 0.2 s until the server stops."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
    while not stopped.wait(0.2):
        conn.sendall(b"x")


def test_http_job_of_a_dripping_server_ends_at_its_deadline_and_does_not_starve_sync_tasks(
    app: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    with worker_in_thread(app, concurrency=2, allow_private_http=True), raw_server(drip) as server:
        url = f"http://127.0.0.1:{server.port}/slow"
        # As many dripping requests as the worker has slots: before, each one kept a thread of the
        # sync tasks' pool after its timeout, for as long as the server kept dripping.
        slow = [app.enqueue("http", {"url": url}, timeout=1, max_attempts=1) for _ in range(2)]
        for job in slow:
            wait_until(lambda job=job: state(conn, job.id) == "failed", message=f"http job {job.id} to time out")
            assert [outcome for _, outcome, _ in runs(conn, job.id)] == ["timeout"]
        sums = [app.enqueue("add", {"a": i, "b": 1}) for i in range(4)]
        for job in sums:
            wait_until(lambda job=job: state(conn, job.id) == "succeeded", message=f"sync job {job.id} to run")
        assert [app.get(job.id).result for job in sums] == [1, 2, 3, 4]


def test_http_cancel_closes_the_connection_at_once(app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    with worker_in_thread(app, allow_private_http=True), raw_server(drip) as server:
        job = app.enqueue("http", {"url": f"http://127.0.0.1:{server.port}/slow"})
        wait_until(lambda: server.requests, message="the request to arrive")
        app.cancel(job.id, reason="enough")
        wait_until(lambda: state(conn, job.id) == "cancelled", message="the job to be cancelled")
        # Before, the request went on in its thread, reading the drip for as long as it lasted.
        wait_until(lambda: server.ended, message="the worker to close the connection")
    assert [outcome for _, outcome, _ in runs(conn, job.id)] == ["cancelled"]


def test_http_url_userinfo_is_sent_as_basic_authorization_never_in_host(
    app: pgsched.App, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/private").respond_with_data("welcome")
    url = f"http://al%40ice:p%3Ass@localhost:{httpserver.port}/private"
    job = app.enqueue("http", {"url": url})
    app.run_worker(allow_private_http=True, **WORKER)
    done = app.get(job.id)
    assert done.state == "succeeded", done.error
    [(request, _)] = httpserver.log
    assert request.headers["Host"] == f"localhost:{httpserver.port}"
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"al@ice:p:ss").decode()
    assert "p%3Ass" not in json.dumps(done.result)  # nor in the stored result's url


def self_signed_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for "localhost" and the certificate file that makes clients trust it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


@pytest.mark.parametrize("given_as", ["header", "userinfo"])
def test_http_redirect_from_https_to_http_on_the_same_host_drops_the_credentials(
    given_as: str, app: pgsched.App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls, trusted = self_signed_tls(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted))  # the worker (in this process) trusts the test certificate

    def respond(request: Any, conn: socket.socket, stopped: threading.Event) -> None:
        secure = request[0]
        if secure:  # https://localhost:P/start -> http://localhost:P/landed: same host, same port, in clear
            location = f"http://localhost:{port}/landed"
            conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode())
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlanded")

    with raw_server(respond, tls) as server:
        port = server.port
        if given_as == "header":
            args = {"url": f"https://localhost:{port}/start", "headers": {"Authorization": "Bearer s3cret"}}
        else:
            args = {"url": f"https://user:s3cret@localhost:{port}/start"}
        job = app.enqueue("http", args, max_attempts=1)
        app.run_worker(allow_private_http=True, **WORKER)
        done = app.get(job.id)
        assert (done.state, done.result and done.result["body"]) == ("succeeded", "landed"), done.error
        [(tls_first, _, first_path, first), (tls_second, _, second_path, second)] = server.requests
        assert (tls_first, first_path, tls_second, second_path) == (True, "/start", False, "/landed")
        assert "Authorization" in first
        assert "Authorization" not in second
        assert first["Host"] == second["Host"] == f"localhost:{port}"
        assert "s3cret" not in json.dumps(done.result)


def test_shell_line_longer_than_the_stream_limit_is_stored_truncated_and_the_job_succeeds(
    app: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    job = app.enqueue("shell", {"cmd": [sys.executable, "-c", "print('x' * 300000); print('after')"]})
    app.run_worker(allow_shell=True, **WORKER)
    done = app.get(job.id)
    assert (done.state, done.result) == ("succeeded", {"exit_code": 0}), done.error
    [long, after] = output(conn, job.id, "stdout")
    assert long == "x" * MAX_LINE_BYTES + " [line truncated]"
    assert after == "after"
