"""Encrypted payloads end to end: every write path, the database dump, queue-level encryption,
a worker without the key, and key rotation while a worker runs."""

from __future__ import annotations

import asyncio
import base64
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg.types.json import Jsonb

import pgsched
from pgsched import Context, Settings, embedded, rotation
from pgsched.crypto import Keyring, is_envelope, kid_of

from .conftest import wait_until
from .test_crypto import KEY1, KEY2

pytestmark = pytest.mark.db

SECRET = "s3cret-7f1c2a"


def keyed_app(dsn: str, keys: str | None) -> pgsched.App:
    return pgsched.App(settings=Settings(dsn=dsn, encryption_keys=keys))


def declare(app: pgsched.App) -> pgsched.App:
    """The tasks of these tests (each worker app declares them the same way)."""

    @app.task(encrypt=True)
    def keep(ctx: Context, secret: str) -> dict[str, Any]:
        ctx.log(f"ctx.log {secret}")
        logging.getLogger("user.task").warning("logging %s", secret)
        ctx.set_progress({"halfway": secret})
        return {"kept": secret, "dependencies": list(ctx.dependency_results.values())}

    @app.task(encrypt=True, max_attempts=1)
    def explode(secret: str) -> None:
        raise RuntimeError(f"boom {secret}")

    @app.task(encrypt=True, timeout=0.2, max_attempts=1)
    async def stall(secret: str) -> None:
        await asyncio.sleep(30)

    @app.task
    def plain(value: Any = None) -> Any:
        return value

    @app.task
    async def slow_echo(i: int) -> dict[str, int]:
        await asyncio.sleep(0.05)
        return {"i": i}

    return app


def burst(app: pgsched.App, **options: Any) -> Any:
    return app.run_worker(burst=True, poll_seconds=0.1, **options)


def pg_dump(dsn: str) -> str:
    done = subprocess.run(
        [str(embedded.bin_dir() / "pg_dump"), "--data-only", "-d", dsn],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_a_secret_written_through_every_path_never_reaches_the_database_or_the_logs(
    dsn: str, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    conn.execute("INSERT INTO pgsched.queues (name, encrypt) VALUES ('vault', true)")
    app = declare(keyed_app(dsn, KEY1))
    try:
        single = app.tasks["keep"].enqueue(secret=SECRET)
        assert single.args == {"secret": SECRET}  # the client hands back what it wrote, decrypted
        (bulk,) = app.enqueue_many([{"task": "keep", "args": {"secret": SECRET}}])
        with app.workflow() as wf:
            upstream = wf.add("keep", {"secret": SECRET})
            downstream = wf.add("keep", {"secret": SECRET}, depends_on=[upstream])
        app.add_schedule("nightly-secret", "keep", every=3600, args={"secret": SECRET})
        scheduled = app.trigger_schedule("nightly-secret")
        failing = app.enqueue("explode", {"secret": SECRET})
        stalled = app.enqueue("stall", {"secret": SECRET})
        shell = app.enqueue("shell", {"cmd": ["echo", SECRET]}, queue="vault")  # queue-level encryption
        stats = burst(app, queues="default,vault", allow_shell=True, concurrency=2)
        assert stats.succeeded == 6 and stats.failed == 2

        dump = pg_dump(dsn)
        assert SECRET not in dump and "pgsched_encrypted" in dump and "pgsched:enc:2:k1:" in dump

        done = app.get(downstream.id)  # decrypted for an app holding the key
        assert done.result == {"kept": SECRET, "dependencies": [{"kept": SECRET, "dependencies": []}]}
        assert done.progress == {"halfway": SECRET}
        for job_id in (single.id, bulk, scheduled.id):
            assert app.get(job_id).result["kept"] == SECRET
        assert SECRET in app.get(failing.id).error and "Traceback" in app.get(failing.id).error
        assert app.get(stalled.id).error == "timed out after 0.2 s"
        assert app.get(shell.id).state == "succeeded"
        ring = Keyring.parse(KEY1)
        messages = conn.execute("SELECT job_id, message FROM pgsched.run_logs ORDER BY logged_at").fetchall()
        assert messages and all(m.startswith("pgsched:enc:2:k1:") for _, m in messages)
        opened = [ring.decrypt_text(m, "message", ("keep", "default")) for job_id, m in messages if job_id == single.id]
        assert opened[0] == f"ctx.log {SECRET}" and opened[1].endswith(f"logging {SECRET}")
        assert ring.decrypt_text(dict(messages)[shell.id], "message", ("shell", "vault")) == SECRET
        (run_error,) = conn.execute("SELECT error FROM pgsched.runs WHERE job_id = %s", (failing.id,)).fetchone()
        assert is_envelope(run_error)

        # An app without the key sees only envelopes.
        with keyed_app(dsn, None) as blind:
            sealed = blind.get(single.id)
            assert is_envelope(sealed.args) and is_envelope(sealed.result) and is_envelope(sealed.progress)
    finally:
        app.close()
    pgsched_records = [r.getMessage() for r in caplog.records if r.name.startswith("pgsched")]
    assert pgsched_records and not any(SECRET in m for m in pgsched_records)
    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err


def test_queue_level_encryption_and_the_database_safety_net(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.queues (name, encrypt) VALUES ('vault', true)")
    with declare(keyed_app(dsn, KEY1)) as app:
        assert app.encrypted_queues == {"vault"}
        job = app.enqueue("plain", {"value": SECRET}, queue="vault")
        (stored,) = conn.execute("SELECT args FROM pgsched.jobs WHERE id = %s", (job.id,)).fetchone()
        assert kid_of(stored) == "k1" and job.args == {"value": SECRET}
        assert app.enqueue("plain", {"value": 1}).args == {"value": 1}  # other queues stay in clear
        burst(app, queues="vault")
        assert app.get(job.id).result == SECRET
        (result,) = conn.execute("SELECT result FROM pgsched.jobs WHERE id = %s", (job.id,)).fetchone()
        assert is_envelope(result)
    with pytest.raises(psycopg.errors.CheckViolation, match='queue "vault" stores encrypted payloads'):
        conn.execute("INSERT INTO pgsched.jobs (task, args, queue) VALUES ('plain', '{}', 'vault')")
    with declare(keyed_app(dsn, None)) as keyless:
        with pytest.raises(pgsched.ValidationError, match="queue 'vault' stores encrypted payloads") as info:
            keyless.enqueue("plain", {}, queue="vault")
        assert info.value.field == "args"
        with pytest.raises(pgsched.ValidationError, match="task 'keep' stores encrypted payloads"):
            keyless.enqueue("keep", {"secret": SECRET})
    # An app opened before the queue was set to encrypt: the database refuses, naming the field.
    with declare(keyed_app(dsn, KEY1)) as stale:
        conn.execute("INSERT INTO pgsched.queues (name, encrypt) VALUES ('late', true)")
        with pytest.raises(pgsched.ValidationError) as info:
            stale.enqueue_many([{"task": "plain", "queue": "late"}])
        assert info.value.field == "args" and "late" in info.value.message
    assert conn.execute("SELECT count(*) FROM pgsched.jobs WHERE queue = 'late'").fetchone()[0] == 0


def test_a_worker_without_the_key_leaves_the_job_for_one_that_has_it(dsn: str, conn: psycopg.Connection[Any]) -> None:
    """A staged key rollout: a worker that lacks the job's key neither fails it nor counts an
    attempt; the job waits, and a worker that has the key runs it."""
    with declare(keyed_app(dsn, KEY2)) as client:
        locked = client.enqueue("keep", {"secret": SECRET})
    for keys in (KEY1, None):  # an older key only, and no key at all
        with declare(keyed_app(dsn, keys)) as worker_app:
            ordinary = worker_app.enqueue("plain", {"value": 7})
            stats = burst(worker_app)
            row = worker_app.get(locked.id)
            assert (row.state, row.attempts, row.error) == (
                "scheduled",
                0,
                "encryption key 'k2' is not configured on this worker",
            )
            assert worker_app.get(ordinary.id).result == 7 and stats.succeeded == 1
        conn.execute("UPDATE pgsched.jobs SET state = 'queued', run_at = now() WHERE id = %s", (locked.id,))
    with declare(keyed_app(dsn, KEY2)) as keyed:
        burst(keyed)
        row = keyed.get(locked.id)
        assert (row.state, row.attempts) == ("succeeded", 1)


def test_rotation_re_encrypts_live_jobs_while_a_worker_runs(
    dsn: str, conn: psycopg.Connection[Any], cli_env: dict[str, str]
) -> None:
    conn.execute("INSERT INTO pgsched.queues (name, encrypt) VALUES ('vault', true)")
    with declare(keyed_app(dsn, KEY1)) as old:
        ids = old.enqueue_many([{"task": "slow_echo", "args": {"i": i}, "queue": "vault"} for i in range(40)])
        finished = old.enqueue("plain", {"value": 1}, queue="vault")
    conn.execute("UPDATE pgsched.jobs SET state = 'succeeded', finished_at = now() WHERE id = %s", (finished.id,))
    env = {**cli_env, "PGSCHED_ENCRYPTION_KEYS": f"{KEY2},{KEY1}"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pgsched"), "keys", "rotate", "--batch", "7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "re-encrypted with key 'k2': 40 job(s), 0 schedule(s)"
    kids = conn.execute("SELECT args ->> 'kid', count(*) FROM pgsched.jobs GROUP BY 1 ORDER BY 1").fetchall()
    assert kids == [("k1", 1), ("k2", 40)]  # the finished job keeps its key

    # Now jobs under k1 again, and a rotation racing a worker that holds both keys.
    with declare(keyed_app(dsn, KEY1)) as old:
        more = old.enqueue_many([{"task": "slow_echo", "args": {"i": i}, "queue": "vault"} for i in range(40, 80)])
    both = declare(keyed_app(dsn, f"{KEY2},{KEY1}"))
    worker = threading.Thread(target=burst, args=(both,), kwargs={"queues": "vault", "concurrency": 2})
    worker.start()
    try:
        wait_until(lambda: conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'running'").fetchone()[0])
        rotated = rotation.rotate(conn, Keyring.parse(f"{KEY2},{KEY1}"), batch=5)
        assert rotated.kid == "k2" and rotated.missing == {}
    finally:
        worker.join(timeout=60)
    assert not worker.is_alive()
    for i, job_id in enumerate([*ids, *more]):
        job = both.get(job_id)
        assert (job.state, job.args, job.result) == ("succeeded", {"i": i}, {"i": i})
    both.close()


def test_an_envelope_moved_to_a_job_of_another_task_or_queue_fails_that_job_unopened(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    conn.execute("INSERT INTO pgsched.queues (name, encrypt) VALUES ('vault', true)")
    app = declare(keyed_app(dsn, KEY1))

    @app.task(encrypt=True)
    def reveal(secret: str = "") -> str:
        return secret

    with app:
        victim = app.enqueue("keep", {"secret": SECRET})
        other_task = app.enqueue("reveal", {"secret": "mine"}, max_attempts=3)
        other_queue = app.enqueue("keep", {"secret": "mine"}, queue="vault", max_attempts=3)
        # Someone who may write the table copies the victim's sealed args into the other jobs.
        conn.execute(
            "UPDATE pgsched.jobs SET args = (SELECT args FROM pgsched.jobs WHERE id = %s) WHERE id = ANY(%s)",
            (victim.id, [other_task.id, other_queue.id]),
        )
        burst(app, queues="default,vault")
        assert app.get(victim.id).result["kept"] == SECRET
        for moved in (other_task, other_queue):
            row = app.get(moved.id)
            assert (row.state, row.attempts, row.result) == ("failed", 1, None)  # not retried: it cannot succeed
            assert row.error.startswith("args: the encrypted value cannot be decrypted with key 'k1'")
        assert conn.execute(
            "SELECT count(*) FROM pgsched.run_logs WHERE job_id = %s", (other_queue.id,)
        ).fetchone() == (0,)


def insert_version_1_job(conn: psycopg.Connection[Any]) -> int:
    """A ``keep`` job whose args are sealed as before task and queue were bound (the field only)."""
    key = base64.b64decode(KEY1.split(":", 1)[1])
    nonce = bytes(range(12))
    data = AESGCM(key).encrypt(nonce, f'{{"secret": "{SECRET}"}}'.encode(), b"pgsched:1:args")
    envelope = {
        "pgsched_encrypted": 1,
        "kid": "k1",
        "nonce": base64.b64encode(nonce).decode(),
        "data": base64.b64encode(data).decode(),
    }
    (job_id,) = conn.execute(
        "INSERT INTO pgsched.jobs (task, args) VALUES ('keep', %s) RETURNING id", (Jsonb(envelope),)
    ).fetchone()
    return job_id


def test_a_job_sealed_before_task_and_queue_were_bound_still_runs(dsn: str, conn: psycopg.Connection[Any]) -> None:
    job_id = insert_version_1_job(conn)
    with declare(keyed_app(dsn, KEY1)) as app:
        burst(app)
        assert app.get(job_id).result["kept"] == SECRET
    (result,) = conn.execute("SELECT result FROM pgsched.jobs WHERE id = %s", (job_id,)).fetchone()
    assert result["v"] == 2  # what the worker writes is bound to the job's task and queue


def test_rotation_rewrites_version_1_envelopes_under_the_current_key(dsn: str, conn: psycopg.Connection[Any]) -> None:
    job_id = insert_version_1_job(conn)
    ring = Keyring.parse(KEY1)  # the same key: only the envelope's version is stale
    assert rotation.rotate(conn, ring).jobs == 1
    (args,) = conn.execute("SELECT args FROM pgsched.jobs WHERE id = %s", (job_id,)).fetchone()
    assert (args["v"], args["kid"]) == (2, "k1")
    assert ring.decrypt(args, "args", ("keep", "default")) == {"secret": SECRET}
    assert rotation.rotate(conn, ring).jobs == 0
