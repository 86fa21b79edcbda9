"""Live events (docs/api.md, "Events"): the triggers of sql/0012_events.sql, and GET /api/v1/events
(SSE) and /api/v1/ws (WebSocket) served by uvicorn on loopback, read by real HTTP and WebSocket
clients. Each stream is read in a thread into a list; assertions wait on it with a deadline."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from pgsched import load_settings

from .conftest import wait_until

pytestmark = pytest.mark.db

DEADLINE = 10.0


@pytest.fixture
def api_server(dsn: str, api_dsn: str, tokens: dict[str, str]) -> Iterator[Any]:
    """The API under uvicorn in a thread, on a free loopback port: (base URL, app)."""
    import uvicorn

    from pgsched.api import create_app

    app = create_app(load_settings({"dsn": dsn, "api_dsn": api_dsn}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_until(lambda: uv.started, message="uvicorn started")
    wait_until(lambda: app.state.events.listening.is_set(), message="the events listener")
    yield f"127.0.0.1:{port}", app
    uv.should_exit = True
    thread.join(timeout=10)


class Stream:
    """Events read in a background thread: [(id, event, data)]."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.subscribed = threading.Event()
        self.stop = threading.Event()

    def of(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [d for _, e, d in self.events if e == kind and all(d.get(k) == v for k, v in fields.items())]

    def wait_for(self, kind: str, **fields: Any) -> dict[str, Any]:
        return wait_until(lambda: self.of(kind, **fields), DEADLINE, message=f"{kind} {fields}")[0]


@pytest.fixture
def sse(api_server: Any, tokens: dict[str, str]) -> Iterator[Callable[..., Stream]]:
    """Open an SSE stream as a user, with query parameters and headers."""
    streams: list[Stream] = []

    def open_stream(user: str, params: Any = None, headers: dict[str, str] | None = None) -> Stream:
        stream = Stream()

        def read() -> None:
            with contextlib.suppress(httpx.TransportError):  # the server stops at the end
                read_events()

        def read_events() -> None:
            auth = {"Authorization": f"Bearer {tokens[user]}", **(headers or {})}
            url = f"http://{api_server[0]}/api/v1/events"
            with httpx.stream("GET", url, params=params, headers=auth, timeout=30) as response:
                assert response.status_code == 200, response.read()
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if line == ": subscribed":
                        stream.subscribed.set()
                    elif line.startswith(("id:", "event:", "data:")):
                        name, _, value = line.partition(":")
                        fields[name] = value.strip()
                    elif line == "" and fields:
                        stream.events.append((fields["id"], fields["event"], json.loads(fields["data"])))
                        fields = {}
                    else:
                        assert line == "" or line.startswith(":"), line
                    if stream.stop.is_set():
                        return

        threading.Thread(target=read, daemon=True).start()
        assert stream.subscribed.wait(DEADLINE), "the SSE stream did not start"
        streams.append(stream)
        return stream

    yield open_stream
    for stream in streams:
        stream.stop.set()


def ws_stream(api_server: Any, token: str, query: str = "") -> Stream:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    stream = Stream()
    client = connect(f"ws://{api_server[0]}/api/v1/ws{query}", additional_headers={"Authorization": f"Bearer {token}"})
    stream.subscribed.set()  # accepted: subscribed before the handshake's answer

    def read() -> None:
        with client, contextlib.suppress(ConnectionClosed):  # the server stops at the end
            for text in client:
                message = json.loads(text)
                stream.events.append((message["id"], message["event"], message["data"]))

    threading.Thread(target=read, daemon=True).start()
    return stream


def enqueue(base: str, token: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"http://{base}/api/v1/jobs", json={"task": "noop", **body}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 201, response.text
    return response.json()


def cancel(base: str, token: str, job_id: int) -> None:
    response = httpx.post(f"http://{base}/api/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text


def test_a_job_change_reaches_sse_and_websocket_clients(api_server: Any, sse: Any, tokens: dict[str, str]) -> None:
    by_sse = sse("alice")
    by_ws = ws_stream(api_server, tokens["alice"])
    job = enqueue(api_server[0], tokens["alice"])
    cancel(api_server[0], tokens["alice"], job["id"])
    for stream in (by_sse, by_ws):
        assert stream.wait_for("job", id=job["id"], state="queued")["owner"] == "alice"
        stream.wait_for("job", id=job["id"], state="cancelled")
    # Ids grow, and name this process's incarnation.
    ids = [i for i, e, _ in by_sse.events if e == "job"]
    assert len({i.split("-")[0] for i in ids}) == 1 and ids == sorted(ids, key=lambda i: int(i.split("-")[1]))


def test_another_owners_jobs_never_reach_a_member(api_server: Any, sse: Any, tokens: dict[str, str]) -> None:
    bob, bob_ws, admin = sse("bob"), ws_stream(api_server, tokens["bob"]), sse("root")
    alices = enqueue(api_server[0], tokens["alice"])
    cancel(api_server[0], tokens["alice"], alices["id"])
    admin.wait_for("job", id=alices["id"], state="cancelled")  # an admin sees every owner's
    # Bob's own job after alice's: once he has it, he would have had hers.
    bobs = enqueue(api_server[0], tokens["bob"])
    for stream in (bob, bob_ws):
        stream.wait_for("job", id=bobs["id"])
        assert {d["owner"] for d in stream.of("job")} == {"bob"}


def test_filters_by_job_queue_and_workflow(
    api_server: Any, sse: Any, tokens: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    base, token = api_server[0], tokens["root"]
    first = enqueue(base, token)
    by_job = sse("root", {"job": first["id"]})
    by_queue = sse("root", {"queue": ["reports", "mail"]})
    by_ws_queue = ws_stream(api_server, token, "?queue=reports")
    workflow = httpx.post(
        f"http://{base}/api/v1/workflows",
        json={"jobs": [{"key": "a", "task": "noop"}]},
        headers={"Authorization": f"Bearer {token}"},
    ).json()["workflow_id"]
    by_workflow = sse("root", {"workflow": workflow})
    other = enqueue(base, token)
    in_reports = enqueue(base, token, queue="reports")
    cancel(base, token, first["id"])
    conn.execute("UPDATE pgsched.jobs SET state = 'cancelled' WHERE workflow_id = %s", (workflow,))
    by_job.wait_for("job", id=first["id"], state="cancelled")
    by_queue.wait_for("job", id=in_reports["id"])
    by_ws_queue.wait_for("job", id=in_reports["id"])
    by_workflow.wait_for("job", workflow_id=workflow, state="cancelled")
    assert {d["id"] for d in by_job.of("job")} == {first["id"]}
    assert not by_job.of("job", id=other["id"])
    assert {d["queue"] for d in by_queue.of("job") + by_ws_queue.of("job")} == {"reports"}
    assert {d["workflow_id"] for d in by_workflow.of("job")} == {workflow}


def test_last_event_id_replays_what_a_client_missed(api_server: Any, sse: Any, tokens: dict[str, str]) -> None:
    base, token = api_server[0], tokens["alice"]
    before = sse("alice")
    first = enqueue(base, token)
    before.wait_for("job", id=first["id"])
    last_seen = before.events[-1][0]
    missed = [enqueue(base, token)["id"] for _ in range(3)]
    before.wait_for("job", id=missed[-1])  # the process has them all
    again = sse("alice", headers={"Last-Event-ID": last_seen})
    again.wait_for("job", id=missed[-1])
    assert [d["id"] for d in again.of("job")] == missed
    by_ws = ws_stream(api_server, token, f"?last_event_id={last_seen}")
    by_ws.wait_for("job", id=missed[-1])
    assert [d["id"] for d in by_ws.of("job")] == missed
    # An id of another incarnation (or one too old): resync, then live events.
    stranger = sse("alice", headers={"Last-Event-ID": "0123456789ab-5"})
    stranger.wait_for("resync")
    later = enqueue(base, token)
    stranger.wait_for("job", id=later["id"])
    assert stranger.events[0][1] == "resync" and not stranger.of("job", id=missed[0])


def test_the_listener_reconnects_after_its_connection_is_terminated(
    api_server: Any, sse: Any, tokens: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    hub = api_server[1].state.events
    stream = sse("alice")
    old_pid = hub.backend_pid
    conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
    stream.wait_for("resync")  # events of the gap are lost: the client is told to refetch
    wait_until(lambda: hub.listening.is_set() and hub.backend_pid != old_pid, DEADLINE, message="a new listener")
    job = enqueue(api_server[0], tokens["alice"])
    stream.wait_for("job", id=job["id"])


def test_schedule_and_queue_changes(
    api_server: Any, sse: Any, tokens: dict[str, str], conn: psycopg.Connection[Any]
) -> None:
    base = api_server[0]
    ops, alice, vera = sse("ops"), sse("alice"), sse("vera")
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    body = {"name": "nightly", "task": "noop", "every": 60}
    created = httpx.post(f"http://{base}/api/v1/schedules", json=body, headers=headers)
    assert created.status_code == 201, created.text
    operator = {"Authorization": f"Bearer {tokens['ops']}"}
    paused = httpx.post(f"http://{base}/api/v1/queues/default/pause", headers=operator)
    assert paused.status_code == 200, paused.text
    ops.wait_for("queue", name="default", paused=True)
    alice.wait_for("schedule", name="nightly", owner="alice", action="insert")
    ops.wait_for("schedule", name="nightly")
    # Queues are the operators' only; another member's schedule is not vera's.
    row = conn.execute("INSERT INTO pgsched.jobs (task, owner) VALUES ('noop', 'vera') RETURNING id").fetchone()
    vera_marker = row[0] if row else None
    vera.wait_for("job", id=vera_marker)
    assert not alice.of("queue") and not vera.of("queue") and not vera.of("schedule")


def test_triggers_send_only_state_changes_in_payloads_under_8000_bytes(conn: psycopg.Connection[Any], dsn: str) -> None:
    long_owner = "ö" * 200  # the longest owner a job may have, two bytes a character
    conn.execute(
        "INSERT INTO pgsched.jobs (task, owner) SELECT 'noop', %s FROM generate_series(1, 1000)", (long_owner,)
    )
    conn.execute("INSERT INTO pgsched.jobs (task, owner, queue) VALUES ('noop', 'bob', 'other')")
    register_listener(conn)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgsched_events")
        conn.execute("UPDATE pgsched.jobs SET priority = 5")  # no state changed: nothing sent
        conn.execute("UPDATE pgsched.jobs SET state = state WHERE owner = 'bob'")  # nor here
        conn.execute("UPDATE pgsched.jobs SET state = 'cancelled', finished_at = now()")
        raw = [n.payload for n in listener.notifies(timeout=1)]
    # One statement, two groups (1,000 jobs in chunks of 300, bob's one), every job once.
    assert all(len(p.encode()) < 8000 for p in raw) and len(raw) == 5
    payloads = [json.loads(p) for p in raw]
    ids = sorted(i for p in payloads for i in p["ids"])
    assert ids == list(range(ids[0], ids[0] + 1001))
    assert {(p["kind"], p["state"], p["owner"], p["queue"]) for p in payloads} == {
        ("job", "cancelled", long_owner, "default"),
        ("job", "cancelled", "bob", "other"),
    }


def register_listener(conn: psycopg.Connection[Any], seconds: float = 90) -> None:
    """As an API process's hub does while it listens (api/events.py REGISTER)."""
    conn.execute(
        "INSERT INTO pgsched.event_listeners (id, expires_at)"
        " VALUES (gen_random_uuid(), now() + make_interval(secs => %s))",
        (seconds,),
    )


def test_job_events_are_sent_only_while_a_listener_is_registered(conn: psycopg.Connection[Any], dsn: str) -> None:
    """A NOTIFY costs every committing writer a cluster-wide lock: with no live row in
    pgsched.event_listeners (no API process listening, or only expired ones), nothing is sent."""
    insert = "INSERT INTO pgsched.jobs (task) VALUES ('noop') RETURNING id"
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgsched_events")
        unheard = [conn.execute(insert).fetchone()[0]]  # type: ignore[index]
        register_listener(conn, seconds=-1)  # an API process that stopped renewing
        unheard.append(conn.execute(insert).fetchone()[0])  # type: ignore[index]
        register_listener(conn)
        (heard,) = conn.execute(insert).fetchone()  # type: ignore[misc]
        ids: list[int] = []
        # Notifications arrive in commit order: once the last job's is in, any earlier one would be.
        for notify in listener.notifies(timeout=10):
            ids += json.loads(notify.payload)["ids"]
            if heard in ids:
                break
    assert heard in ids and not set(unheard) & set(ids)


def test_a_slow_subscriber_is_told_to_resync_with_its_backlog_dropped() -> None:
    import asyncio

    from pgsched.accounts import User
    from pgsched.api import events

    async def scenario() -> None:
        hub = events.Hub("unused")
        admin = User(id=1, username="root", role="admin", may_create_commands=False, disabled=False)
        slow, _ = hub.subscribe(events.Filters(admin), None)
        for i in range(events.BACKLOG + 5):
            hub.publish([events.Event(i + 1, "job", {"id": i, "owner": "x", "queue": "q", "workflow_id": None})])
        backlog = [await slow.next(0.1) for _ in range(6)]
        assert backlog[0][0].kind == "resync" and backlog[1][0].data["id"] == events.BACKLOG + 1
        assert slow.batches.qsize() < events.BACKLOG

    asyncio.run(scenario())
