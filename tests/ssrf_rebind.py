"""Run by tests/test_ssrf.py inside network and mount namespaces of its own (``unshare -n -m``, as
root), with a ``resolv.conf`` of the test's bind-mounted over ``/etc/resolv.conf``: DNS rebinding.

The namespace's loopback also carries 93.184.216.34 (globally routable). A tiny DNS server on
127.0.0.1:53 answers the A query of each name under ``.rebind.test`` with 93.184.216.34 the first
time and 127.0.0.1 every time after (TTL 0), so a client that checks one answer and connects with
another reaches loopback. A "public" server on 93.184.216.34 and a private one on 127.0.0.1 listen
on the same port; the private one counts the requests that reach it. Each case prints one JSON line:
its outcome, the private server's hits and the public server's.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter

import httpx
from pytest_httpserver import HTTPServer
from ssrf_netns import PUBLIC, attempt  # the script beside this one (run as a file, not a module)
from werkzeug import Request, Response


class RebindingDns:
    """A DNS server on 127.0.0.1:53: the first A answer of a name is PUBLIC, the next ones 127.0.0.1."""

    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            query, peer = self.sock.recvfrom(512)
            self.sock.sendto(self.answer(query), peer)

    def answer(self, query: bytes) -> bytes:
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1 : i + 1 + query[i]].decode().lower())
            i += 1 + query[i]
        question_end = i + 5
        name = ".".join(labels)
        qtype = struct.unpack("!H", query[i + 1 : i + 3])[0]
        records = b""
        if qtype == 1 and name.endswith("rebind.test"):
            self.asked[name] += 1
            address = PUBLIC if self.asked[name] == 1 else "127.0.0.1"
            records = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(address)
        header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if records else 0, 0, 0)
        return header + query[12:question_end] + records


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{PUBLIC}/32", "dev", "lo"], check=True)
    dns = RebindingDns()
    public = HTTPServer(host=PUBLIC)
    public.start()
    private = HTTPServer(host="127.0.0.1", port=public.port)  # the same port: only the address differs
    private.start()
    for server, says in ((public, "public"), (private, "private")):
        server.expect_request("/hello").respond_with_data(says)

    def redirect(request: Request) -> Response:
        return Response(status=302, headers={"Location": request.args["to"]})

    public.expect_request("/redirect").respond_with_handler(redirect)
    port = public.port
    cases = {
        # The executor resolves once per hop and connects to the address it checked (the first
        # answer): it reaches the public server, never loopback.
        "plain": f"http://a.rebind.test:{port}/hello",
        "redirect": f"http://{PUBLIC}:{port}/redirect?to=http://b.rebind.test:{port}/hello",
        "redirect to itself": f"http://c.rebind.test:{port}/redirect?to=http://c.rebind.test:{port}/hello",
    }
    try:
        for case, url in cases.items():
            before = len(private.log), len(public.log)
            outcome = attempt(url, allow_private=False)
            hits = len(private.log) - before[0], len(public.log) - before[1]
            print(json.dumps({"case": case, "outcome": outcome, "private": hits[0], "public": hits[1]}), flush=True)
        # The control: a client that resolves again when it connects (httpx on its own, after a
        # check of the first answer) is rebound to loopback by this server: the test can fail.
        before = len(private.log)
        body = httpx.get(f"http://d.rebind.test:{port}/hello", trust_env=False).text if _checks("d.rebind.test") else ""
        print(json.dumps({"case": "control", "outcome": body, "private": len(private.log) - before}), flush=True)
        print(json.dumps({"case": "dns", "asked": dict(dns.asked)}), flush=True)
    finally:
        public.stop()
        private.stop()


def _checks(host: str) -> bool:
    """A check of the name's address on its own, as a client that does not pin would make."""
    return socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)[0][4][0] == PUBLIC


if __name__ == "__main__":
    main()
    sys.exit(0)
