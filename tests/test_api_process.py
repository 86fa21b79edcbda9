"""A real ``pgsched api`` process on loopback, called over HTTP as curl would: bootstrap from the
command line (users create --admin, tokens create), refusal to start without an admin, --dev."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from .conftest import wait_until

pytestmark = pytest.mark.process

PGSCHED = str(Path(sys.executable).parent / "pgsched")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pgsched(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PGSCHED, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def serve(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Start ``pgsched api --port <free> ARGS``; returns (process, base URL, output file)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str, Path]:
        port = free_port()
        out = tmp_path / f"api-{len(started)}.log"
        with out.open("wb") as sink:
            process = subprocess.Popen(
                [PGSCHED, "api", "--port", str(port), *args], env=env or cli_env, stdout=sink, stderr=subprocess.STDOUT
            )
        started.append(process)
        return process, f"http://127.0.0.1:{port}", out

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def up(base: str, process: subprocess.Popen[bytes]) -> bool:
    assert process.poll() is None, "pgsched api exited"
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_bootstrap_from_the_cli_then_serve_over_loopback(
    cli_env: dict[str, str], api_dsn: str, serve: Any, conn: psycopg.Connection[Any]
) -> None:
    env = {**cli_env, "PGSCHED_API_DSN": api_dsn}
    # No admin yet: refused, saying how to make one.
    process, _, out = serve(env=env)
    assert process.wait(timeout=30) != 0
    assert "no admin user" in out.read_text() and "pgsched users create --admin" in out.read_text()

    created = pgsched(cli_env, "users", "create", "--admin", "root")
    assert created.returncode == 0, created.stderr
    token = pgsched(cli_env, "tokens", "create", "root").stdout.strip()
    assert token.startswith("pgs_")
    conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('noop')")

    process, base, out = serve(env=env)
    wait_until(lambda: up(base, process), timeout=30, message="pgsched api answering")
    assert f"pgsched api on {base}/api/v1" in out.read_text()
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=auth, timeout=10) as http:
        assert http.get("/readyz").json() == {"status": "ready"}
        assert http.get("/api/v1/me").json()["role"] == "admin"
        job = http.post("/api/v1/jobs", json={"task": "noop", "args": {"n": 1}})
        assert job.status_code == 201 and job.json()["owner"] == "root"
        shown = http.get(f"/api/v1/jobs/{job.json()['id']}").json()
        assert shown["job"]["args"] == {"n": 1} and shown["runs"] == []
        assert http.get("/api/v1/me", headers={"Authorization": "Bearer pgs_wrong"}).status_code == 401
        assert http.get("/api/v1/openapi.json").json()["openapi"].startswith("3.1")
    assert conn.execute("SELECT owner, created_by FROM pgsched.jobs").fetchone() == (
        "root",
        psycopg.conninfo.conninfo_to_dict(api_dsn)["user"],
    )
    # Audit rows: the CLI's under the database role, the API's under the user.
    actors = conn.execute("SELECT actor, action FROM pgsched.audit_log ORDER BY id").fetchall()
    assert [a for _, a in actors] == ["user.create", "token.create", "job.create"]
    assert actors[0][0].startswith("db:") and actors[2][0] == "root"


def test_dev_mode_starts_without_an_admin_and_prints_a_token(serve: Any, cli_env: dict[str, str]) -> None:
    # The test server's superuser bypasses row-level security: accepted only with --dev.
    process, _, out = serve()
    assert process.wait(timeout=30) != 0
    pgsched(cli_env, "users", "create", "--admin", "root")
    process, _, out = serve()
    assert process.wait(timeout=30) != 0
    assert "not subject to row-level security" in out.read_text()

    process, base, out = serve("--dev")
    wait_until(lambda: up(base, process), timeout=30, message="pgsched api --dev answering")
    line = next(line for line in out.read_text().splitlines() if "dev token" in line)
    token = line.split()[-1]
    me = httpx.get(f"{base}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert me["username"] == "dev" and me["role"] == "admin"


def test_bad_port_is_one_line(cli_env: dict[str, str]) -> None:
    result = pgsched(cli_env, "api", "--port", "70000")
    assert result.returncode == 2 and "70000" in result.stderr


def test_tls(cli_env: dict[str, str], api_dsn: str, serve: Any, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    """--tls-cert and --tls-key serve HTTPS (a self-signed certificate for 127.0.0.1)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    assert pgsched(cli_env, "api", "--tls-cert", str(cert_file)).returncode == 2  # one without the other
    pgsched(cli_env, "users", "create", "--admin", "root")
    env = {**cli_env, "PGSCHED_API_DSN": api_dsn}
    process, base, out = serve("--tls-cert", str(cert_file), "--tls-key", str(key_file), env=env)
    secure = base.replace("http://", "https://")

    def answers() -> bool:
        assert process.poll() is None, out.read_text()
        try:
            return httpx.get(f"{secure}/healthz", verify=str(cert_file), timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answers, timeout=30, message="pgsched api answering over HTTPS")
    assert f"pgsched api on {secure}/api/v1" in out.read_text()


def test_up_serves_the_api_in_development_mode(cli_env: dict[str, str], tmp_path: Path) -> None:
    from .processes import PgschedProcess

    port = free_port()
    up = PgschedProcess(["up", "--api-port", str(port)], cli_env, tmp_path)
    try:
        wait_until(lambda: "running:" in up.stdout() or up.process.poll() is not None, timeout=60, message="up")
        up.check_alive()
        line = next(line for line in up.stdout().splitlines() if line.strip().startswith("api:"))
        assert f"http://127.0.0.1:{port}/api/v1" in line
        token = line.rsplit(" ", 1)[-1].rstrip(")")
        me = httpx.get(f"http://127.0.0.1:{port}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert me.json()["username"] == "dev" and me.json()["role"] == "admin"
        assert "worker, scheduler, api" in up.stdout()
    finally:
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0, up.stderr()
    with pytest.raises(httpx.TransportError):  # stopped with the rest
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)

    # A port in use: up says so and runs without the API.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        (tmp_path / "again").mkdir()
        up = PgschedProcess(["up", "--api-port", str(busy)], cli_env, tmp_path / "again")
        try:
            wait_until(lambda: "running:" in up.stdout() or up.process.poll() is not None, timeout=60, message="up")
            up.check_alive()
            assert "api:        not started" in up.stdout() and "worker, scheduler (Ctrl-C" in up.stdout()
        finally:
            up.signal(signal.SIGTERM)
            assert up.wait(30) == 0, up.stderr()
