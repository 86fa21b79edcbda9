"""SSRF (issue 19): an ``http`` job never reaches a loopback, private, link-local or metadata address,
however the URL spells it, directly or through a redirect, unless the worker runs with
``--allow-private-http`` (README, "shell and http jobs").

The worker resolves the host, refuses it if any address is not globally routable unicast, and
connects to the address it checked. These tests call the worker's request function against real
servers: pytest-httpserver on loopback, which must record no hit while refusing and the hit when
allowed (so each spelling really is loopback); and, for redirects, a "public" server on a global
address inside a network namespace of the test's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from pgsched.worker.executors import NotRetryable, TaskFailed, http_request

ROOT = Path(__file__).resolve().parent.parent

# Spellings of a loopback (or any-address) target; {port} is the loopback server's.
LOOPBACK_SPELLINGS = [
    "http://127.0.0.1:{port}/secret",
    "http://127.1:{port}/secret",  # a.d: the last part fills three bytes
    "http://127.0.1:{port}/secret",
    "http://0x7f000001:{port}/secret",  # hexadecimal, one number
    "http://0x7f.1:{port}/secret",
    "http://0x7F.0x0.0x0.0x1:{port}/secret",
    "http://2130706433:{port}/secret",  # decimal, one number
    "http://017700000001:{port}/secret",  # octal, one number
    "http://0177.0.0.1:{port}/secret",  # octal parts
    "http://0177.1:{port}/secret",
    "http://localhost:{port}/secret",
    "http://localhost.:{port}/secret",  # the fully qualified name
    "http://LOCALHOST:{port}/secret",
    "http://0.0.0.0:{port}/secret",  # connecting to "any" reaches this host
    "http://0:{port}/secret",
    "http://[::ffff:127.0.0.1]:{port}/secret",  # IPv4-mapped IPv6
    "http://user:pass@127.0.0.1:{port}/secret",
    "http://127.0.0.1.:{port}/secret",
]
# Names with a trailing dot go to DNS (glibc's hosts file does not strip it): where no resolver
# answers, they fail to resolve, which reaches nothing either.
UNRESOLVED_HERE = "failed: cannot resolve"
# Targets refused without a server behind them (the refusal comes before any connection).
OTHER_TARGETS = [
    "http://[::1]:{port}/secret",
    "http://[0:0:0:0:0:0:0:1]:{port}/secret",
    "http://[::]:{port}/secret",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[::ffff:169.254.169.254]/",
    "http://[fd00:ec2::254]/",  # AWS metadata over IPv6
    "http://100.100.100.200/",  # Alibaba metadata (shared address space)
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.0.1/",
    "http://[fe80::1]/",
    "http://224.0.0.1/",  # multicast
    "http://255.255.255.255/",
    "http://192.0.2.1/",  # documentation range: not global
]


def request(url: str, *, allow_private: bool) -> str:
    try:
        result = asyncio.run(http_request({"url": url, "timeout": 5}, allow_private=allow_private))
    except NotRetryable as exc:
        return f"refused: {exc}"
    except TaskFailed as exc:
        return f"failed: {exc}"
    return f"ok: {result['status']}"


@pytest.mark.process
def test_every_spelling_of_loopback_is_refused_and_reaches_it_only_when_allowed(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/secret").respond_with_data("secret")
    leaked = []
    for spelling in LOOPBACK_SPELLINGS:
        url = spelling.format(port=httpserver.port)
        outcome = request(url, allow_private=False)
        if not outcome.startswith(("refused: ", UNRESOLVED_HERE)) or httpserver.log:
            leaked.append(f"{url}: {outcome}, {len(httpserver.log)} hits")
        httpserver.clear_log()
    assert leaked == [], "\n".join(leaked)
    # With the operator's setting each one reaches the server: they were loopback, not typos.
    reached = 0
    for spelling in LOOPBACK_SPELLINGS:
        outcome = request(spelling.format(port=httpserver.port), allow_private=True)
        assert outcome == "ok: 200" or outcome.startswith(UNRESOLVED_HERE), (spelling, outcome)
        reached += outcome == "ok: 200"
    assert len(httpserver.log) == reached >= len(LOOPBACK_SPELLINGS) - 2


@pytest.mark.unit
@pytest.mark.parametrize("target", OTHER_TARGETS)
def test_private_link_local_and_metadata_targets_are_refused_before_connecting(target: str) -> None:
    assert request(target.format(port=9), allow_private=False).startswith("refused: ")


@pytest.mark.unit
@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://127.0.0.1/", "dict://127.0.0.1:11211/"]
)
def test_other_schemes_are_refused(url: str) -> None:
    assert request(url, allow_private=False).startswith("refused: ")


def in_own_network_namespace() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


REDIRECT_TARGETS = [
    "http://127.0.0.1:{port}/secret",
    "http://127.1:{port}/secret",
    "http://2130706433:{port}/secret",
    "http://0x7f.1:{port}/secret",
    "http://localhost.:{port}/secret",
    "http://0.0.0.0:{port}/secret",
    "http://[::ffff:127.0.0.1]:{port}/secret",
    "http://[::1]:{port}/secret",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:{port}/",
]


def run_in_namespace(targets: list[str], allow: bool) -> list[dict[str, object]]:
    script = str(ROOT / "tests" / "ssrf_netns.py")
    done = subprocess.run(
        ["unshare", "-n", sys.executable, script, json.dumps(targets), "allow" if allow else "deny"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.process
@pytest.mark.skipif(not in_own_network_namespace(), reason="needs root, unshare and ip for a network namespace")
def test_a_redirect_from_a_public_server_to_a_private_target_is_refused() -> None:
    refused = run_in_namespace(["public", *REDIRECT_TARGETS], allow=False)
    assert refused[0] == {"target": "public", "outcome": "ok: 200", "hits": 0}  # the public hop itself is fine
    wrong = [r for r in refused[1:] if not str(r["outcome"]).startswith(("refused: ", UNRESOLVED_HERE)) or r["hits"]]
    assert wrong == []
    # The control: allowed, the same redirect reaches the private server.
    allowed = run_in_namespace(["http://127.0.0.1:{port}/secret", "http://2130706433:{port}/secret"], allow=True)
    assert [(r["outcome"], r["hits"]) for r in allowed] == [("ok: 200", 1), ("ok: 200", 1)]


@pytest.mark.process
@pytest.mark.skipif(not in_own_network_namespace(), reason="needs root, unshare and ip for a network namespace")
def test_a_dns_answer_that_changes_between_check_and_connect_never_reaches_loopback(tmp_path: Path) -> None:
    # Network and mount namespaces of the test's own: the resolv.conf that names the rebinding DNS
    # server is bind-mounted over /etc/resolv.conf for this process only (as `ip netns exec` does).
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    script = ROOT / "tests" / "ssrf_rebind.py"
    mount_then_run = 'mount --bind "$1" /etc/resolv.conf && exec "$2" "$3"'
    done = subprocess.run(
        ["unshare", "-n", "-m", "sh", "-c", mount_then_run, "sh", str(resolv), sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    cases = {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}
    # Checked and connected to the first answer, the public address: loopback never hit.
    assert cases["plain"] == {"case": "plain", "outcome": "ok: 200", "private": 0, "public": 1}
    assert cases["redirect"] == {"case": "redirect", "outcome": "ok: 200", "private": 0, "public": 2}
    # A second hop to the same name resolves again, and its (now loopback) answer is checked.
    second = cases["redirect to itself"]
    assert str(second["outcome"]).startswith("refused: ") and "c.rebind.test resolves to 127.0.0.1" in second["outcome"]
    assert second["private"] == 0
    # The resolver did rebind: a client that resolves again to connect reaches loopback.
    assert cases["control"] == {"case": "control", "outcome": "private", "private": 1}
