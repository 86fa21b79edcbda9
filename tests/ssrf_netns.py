"""Run by tests/test_ssrf.py inside a network namespace of its own (``unshare -n``), as root.

The namespace's loopback also carries 93.184.216.34, a globally routable address, so an ``http`` job
may reach a "public" server there while loopback stays private. The public server redirects to
whatever its query asks; the private server (127.0.0.1) counts the requests that reach it. For
each target, one ``http_request`` follows the redirect with private targets refused; the outcome
(``ok``, ``refused: ...`` or ``failed: ...``) and the private server's hit count are printed as one
JSON line per target.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from urllib.parse import quote

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from pgsched.worker.executors import NotRetryable, TaskFailed, http_request

PUBLIC = "93.184.216.34"


def attempt(url: str, allow_private: bool) -> str:
    """The outcome of one ``http`` job's request: ``ok: STATUS``, ``refused: ...`` or ``failed: ...``."""
    try:
        result = asyncio.run(http_request({"url": url}, allow_private=allow_private))
    except NotRetryable as exc:
        return f"refused: {exc}"
    except TaskFailed as exc:
        return f"failed: {exc}"
    return f"ok: {result['status']}"


def main(targets: list[str], allow_private: bool) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{PUBLIC}/32", "dev", "lo"], check=True)
    private = HTTPServer(host="127.0.0.1")
    private.expect_request("/secret").respond_with_data("secret")
    private.start()
    public = HTTPServer(host=PUBLIC)

    def redirect(request: Request) -> Response:
        return Response(status=302, headers={"Location": request.args["to"]})

    public.expect_request("/redirect").respond_with_handler(redirect)
    public.expect_request("/hello").respond_with_data("hello")
    public.start()
    try:
        for target in targets:
            target = target.replace("{port}", str(private.port))
            url = f"http://{PUBLIC}:{public.port}/redirect?to={quote(target, safe='')}"
            if target == "public":
                url = f"http://{PUBLIC}:{public.port}/hello"
            hits = len(private.log)
            outcome = attempt(url, allow_private)
            print(json.dumps({"target": target, "outcome": outcome, "hits": len(private.log) - hits}), flush=True)
    finally:
        public.stop()
        private.stop()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2] == "allow")
