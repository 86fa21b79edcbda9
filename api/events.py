"""Live events: ``GET /api/v1/events`` (Server-Sent Events) and ``/api/v1/ws`` (WebSocket).

One ``Hub`` per API process holds the only LISTEN connection (channel ``pgsched_events``, fed by
the triggers of sql/0012_events.sql), reconnecting with backoff, and fans each notification out in
memory to the subscribers whose user may see it and whose filters match. Every event gets an id,
``<incarnation>-<sequence>``, and the last ``RING_SIZE`` events stay in a ring so that a client
that reconnects with ``Last-Event-ID`` gets what it missed; when that is no longer possible (an id
too old, from another process, or events lost while the listener was down) the client gets a
``resync`` event: refetch the lists, then carry on. A subscriber that falls ``BACKLOG`` batches
behind is told to resync too, its backlog dropped: a slow client never holds memory or others up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from litestar import Request, WebSocket, get, websocket
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import Stream

from pgsched.accounts import User

from .access import CurrentUser
from .database import SEES_ALL

log = logging.getLogger("pgsched.api.events")

CHANNEL = "pgsched_events"
RING_SIZE = 20_000  # events kept for Last-Event-ID (about a second of a busy worker's completions)
BACKLOG = 1_000  # notifications queued per subscriber before it is told to resync
KEEPALIVE_SECONDS = 15.0  # an SSE comment this often, so that proxies keep idle streams open
LISTENER_CHECK_SECONDS = 30.0  # a quiet listener connection is probed this often
MAX_BACKOFF_SECONDS = 5.0
# While this process listens, its row in pgsched.event_listeners is live: the job trigger sends
# nothing while no row is (a NOTIFY costs every writer a cluster-wide lock at commit: sql/0015).
REGISTER = """
WITH gone AS (DELETE FROM pgsched.event_listeners WHERE expires_at < now() - interval '1 hour')
INSERT INTO pgsched.event_listeners (id, expires_at) VALUES (%(id)s, now() + interval '90 seconds')
ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""
UNREGISTER = "DELETE FROM pgsched.event_listeners WHERE id = %(id)s"
DEFAULT_STREAM_SECONDS = 900  # then the stream ends; clients reconnect with Last-Event-ID


@dataclass(frozen=True)
class Event:
    """One change, as sent to clients: ``kind`` (job, schedule, queue or resync) and its fields."""

    seq: int
    kind: str
    data: dict[str, Any]

    @functools.cached_property
    def data_json(self) -> str:
        """``data`` as JSON, encoded once however many clients get it."""
        return json.dumps(self.data, separators=(",", ":"))

    @property
    def owner(self) -> str | None:
        return self.data.get("owner")

    @property
    def queue(self) -> str | None:
        return self.data.get("name") if self.kind == "queue" else self.data.get("queue")


@dataclass(frozen=True, slots=True)
class Filters:
    """What a subscriber asked for (empty: everything it may see) and who it is."""

    user: User
    queues: frozenset[str] = frozenset()
    jobs: frozenset[int] = frozenset()
    workflows: frozenset[str] = frozenset()

    def wants(self, event: Event) -> bool:
        if event.kind == "resync":
            return True
        if self.user.role not in SEES_ALL and (event.kind == "queue" or event.owner != self.user.username):
            return False
        if self.queues and event.queue not in self.queues:
            return False
        if self.jobs and not (event.kind == "job" and event.data["id"] in self.jobs):
            return False
        return not self.workflows or (event.kind == "job" and event.data["workflow_id"] in self.workflows)


class Subscription:
    """One client's bounded queue of event batches."""

    def __init__(self, hub: Hub, filters: Filters) -> None:
        self.hub = hub
        self.filters = filters
        self.batches: asyncio.Queue[list[Event]] = asyncio.Queue(BACKLOG)

    def offer(self, batch: Iterable[Event]) -> None:
        wanted = [event for event in batch if self.filters.wants(event)]
        if not wanted:
            return
        try:
            self.batches.put_nowait(wanted)
        except asyncio.QueueFull:
            # Too slow: forget what it did not read and tell it to refetch (put cannot fail now).
            while not self.batches.empty():
                self.batches.get_nowait()
            self.batches.put_nowait([self.hub.resync_event()])

    async def next(self, timeout: float) -> list[Event]:
        """The next batch, or [] after ``timeout`` seconds without one."""
        try:
            return await asyncio.wait_for(self.batches.get(), timeout)
        except TimeoutError:
            return []


class Hub:
    """The process's LISTEN connection, its ring of recent events and its subscribers."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.incarnation = uuid.uuid4().hex[:12]
        self.listener_id = uuid.uuid4()  # its row in pgsched.event_listeners
        self.ring: deque[Event] = deque(maxlen=RING_SIZE)
        self.subscribers: set[Subscription] = set()
        self.listening = asyncio.Event()  # set while LISTEN is in place
        self._seq = itertools.count(1)
        self._last = 0
        self._task: asyncio.Task[None] | None = None
        self._backend_pid: int | None = None

    # -- the listener ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="pgsched-events-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        backoff = 0.1
        first = True
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await conn.execute(REGISTER, {"id": self.listener_id})  # the job trigger sends from now on
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._backend_pid = conn.info.backend_pid
                    self.listening.set()
                    if not first:
                        # Changes made while nobody listened are lost: every client refetches.
                        self.publish([Event(next(self._seq), "resync", {})])
                    first, backoff = False, 0.1
                    try:
                        while True:
                            async for notify in conn.notifies(timeout=LISTENER_CHECK_SECONDS):
                                self.publish(self.parse(notify.payload))
                            # Renewed before it expires; a silent peer that vanished fails here.
                            await conn.execute(REGISTER, {"id": self.listener_id})
                    except asyncio.CancelledError:
                        with contextlib.suppress(Exception):  # else it expires on its own
                            async with asyncio.timeout(1):
                                await conn.execute(UNREGISTER, {"id": self.listener_id})
                        raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                log.warning("events listener lost its connection (%s); reconnecting in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    @property
    def backend_pid(self) -> int | None:
        """The listener's server process (tests terminate it)."""
        return self._backend_pid

    def parse(self, payload: str) -> list[Event]:
        """The events of one notification (sql/0012_events.sql): a job payload names up to 300 jobs
        of one state, queue, owner and workflow; a schedule or queue payload is one change."""
        try:
            message = json.loads(payload)
            kind = message.pop("kind")
            if kind == "job":
                ids = message.pop("ids")
                return [Event(next(self._seq), kind, {"id": job_id, **message}) for job_id in ids]
            if kind in ("schedule", "queue"):
                return [Event(next(self._seq), kind, message)]
            raise ValueError(f"unknown kind {kind!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("events: a payload that is not pgsched's was ignored (%s): %.200s", exc, payload)
            return []

    # -- fan-out and resume ---------------------------------------------------------------------

    def resync_event(self) -> Event:
        """A resync for one client (kept nowhere): its id is the last event's, so a reconnect from
        there misses nothing."""
        return Event(self._last, "resync", {})

    def publish(self, batch: list[Event]) -> None:
        """Keep ``batch`` for resuming clients and offer it to every subscriber."""
        if not batch:
            return
        self.ring.extend(batch)
        self._last = batch[-1].seq
        for subscriber in self.subscribers:
            subscriber.offer(batch)

    def event_id(self, event: Event) -> str:
        return f"{self.incarnation}-{event.seq}"

    def subscribe(self, filters: Filters, last_event_id: str | None) -> tuple[Subscription, list[Event]]:
        """A new subscriber, and what it missed since ``last_event_id`` (or a resync)."""
        subscription = Subscription(self, filters)
        self.subscribers.add(subscription)
        if not last_event_id:
            return subscription, []
        return subscription, [e for e in self.since(last_event_id) if filters.wants(e)]

    def since(self, last_event_id: str) -> list[Event]:
        incarnation, _, seq_text = last_event_id.partition("-")
        seq = int(seq_text) if seq_text.isdigit() else -1
        oldest = self.ring[0].seq - 1 if self.ring else self._last
        if incarnation != self.incarnation or not oldest <= seq <= self._last:
            return [self.resync_event()]
        return list(itertools.islice(self.ring, seq - oldest, None))

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscribers.discard(subscription)


# -- the routes ---------------------------------------------------------------------------------


def filters_of(user: User, queue: list[str] | None, job: list[int] | None, workflow: list[uuid.UUID] | None) -> Filters:
    return Filters(user, frozenset(queue or ()), frozenset(job or ()), frozenset(str(w) for w in workflow or ()))


async def batches(subscription: Subscription, missed: list[Event], seconds: float) -> AsyncIterator[list[Event]]:
    """What a client missed, then its batches ([]: a keep-alive is due) until ``seconds`` have passed."""
    if missed:
        yield missed
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        yield await subscription.next(min(KEEPALIVE_SECONDS, left))


# The parameters both routes take.
Queues = Annotated[list[str] | None, QueryParameter(name="queue", description="Only these queues (repeatable)")]
Jobs = Annotated[list[int] | None, QueryParameter(name="job", description="Only these job ids (repeatable)")]
Workflows = Annotated[
    list[uuid.UUID] | None, QueryParameter(name="workflow", description="Only jobs of these workflows (repeatable)")
]
Seconds = Annotated[
    int,
    QueryParameter(
        name="max_seconds",
        ge=0,
        le=3600,
        description="How long the stream stays open (0: only what Last-Event-ID missed); then reconnect",
    ),
]


@get("/events", media_type="text/event-stream", summary="Stream job, schedule and queue changes (SSE)")
async def stream_events(
    request: Request[Any, Any, Any],
    user: CurrentUser,
    queue: Queues = None,
    job: Jobs = None,
    workflow: Workflows = None,
    max_seconds: Seconds = DEFAULT_STREAM_SECONDS,
    last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID", max_length=100)] = None,
) -> Stream:
    """Server-Sent Events: each has an ``id``, an ``event`` (job, schedule, queue or resync) and JSON
    ``data``; a comment every 15 s keeps an idle stream open. See docs/api.md, "Events"."""
    hub: Hub = request.app.state.events
    filters = filters_of(user, queue, job, workflow)

    async def messages() -> AsyncIterator[bytes]:
        # Subscribed here, not in the handler: only a generator that started has a finally to run.
        subscription, missed = hub.subscribe(filters, last_event_id)
        try:
            yield b": subscribed\n\n"
            async for batch in batches(subscription, missed, max_seconds):
                # (Litestar's ServerSentEvent adds an empty data line to a comment: an event to browsers.)
                chunks = [f"id: {hub.event_id(e)}\nevent: {e.kind}\ndata: {e.data_json}\n\n" for e in batch]
                yield "".join(chunks).encode() if chunks else b": keep-alive\n\n"
        finally:
            hub.unsubscribe(subscription)

    # X-Accel-Buffering: nginx would otherwise hold events back until its buffer fills.
    return Stream(messages(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


@websocket("/ws")
async def events_socket(
    socket: WebSocket[Any, Any, Any],
    queue: Queues = None,
    job: Jobs = None,
    workflow: Workflows = None,
    max_seconds: Seconds = DEFAULT_STREAM_SECONDS,
    last_event_id: Annotated[str | None, QueryParameter(name="last_event_id", max_length=100)] = None,
) -> None:
    """The same events as JSON text messages ``{"id", "event", "data"}``. The server reads nothing
    from the client but its going away; the server (uvicorn) pings, so no keep-alive message."""
    hub: Hub = socket.app.state.events
    user: User = socket.state.user  # set by the guard (the user dependency reads a Request)
    # Subscribed before the handshake is answered: a change made once it is, reaches the client.
    subscription, missed = hub.subscribe(filters_of(user, queue, job, workflow), last_event_id)

    async def send_events() -> None:
        async for batch in batches(subscription, missed, max_seconds):
            for event in batch:
                await socket.send_text(
                    f'{{"id":"{hub.event_id(event)}","event":"{event.kind}","data":{event.data_json}}}'
                )
        await socket.close()

    async def until_gone() -> None:
        while (await socket.receive())["type"] != "websocket.disconnect":
            pass

    tasks: list[asyncio.Task[None]] = []
    try:
        await socket.accept()
        tasks = [asyncio.create_task(send_events()), asyncio.create_task(until_gone())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hub.unsubscribe(subscription)
        for task in tasks:
            task.cancel()
        # A client gone mid-send fails the sender: nothing to tell anyone.
        await asyncio.gather(*tasks, return_exceptions=True)
