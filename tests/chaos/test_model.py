"""Scenario 11 of issue 19: a stateful property test of the job state machine (DESIGN §3).

Hypothesis drives the public operations (enqueue with and without a dedupe key, dependencies and
a delay; cancel; retry; pause and resume a queue; trigger a schedule; move the test clock; a burst
of the real ``Worker`` through ``pgsched.testing.Kit.drain``) against real PostgreSQL, and a plain
Python model of the DESIGN §3 states says what each one must do. After every step the database's
jobs (state, attempts, max_attempts) and ``runs`` rows (one per attempt, with its outcome) must be
the model's. A worker crash is modelled too: a worker incarnation of the test's own claims a
queue's jobs through the worker's claim statement and is never heard from again, and the rescuer
takes them back once the clock passes its lease. Each job carries its ``plan``: what the task does at each attempt (succeed, fail,
``Retry``, ``Cancel``); beyond the plan it succeeds.

Time in the model is in days: a retry (the task's backoff, or ``Retry(after=...)``) and a delayed
enqueue are due one day later, and a clock step moves the database clock two days, so real
seconds spent in the test never decide whether something is due.

Quick size: 12 examples of up to 20 steps (well under a minute); ``PGSCHED_CHAOS=full``: 200 of
up to 40.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pgsched
from pgsched import Backoff, Cancel, DuplicateJobError, Retry
from pgsched.errors import InvalidStateError
from pgsched.leader.rescuer import Rescuer
from pgsched.testing import Kit, run_sync
from pgsched.worker.queries import CLAIM

pytestmark = [pytest.mark.db, pytest.mark.filterwarnings("ignore::pgsched.UnservedQueueWarning")]

FULL = os.environ.get("PGSCHED_CHAOS") == "full"
DAY = 86_400
QUEUES = ("a", "b")
KEYS = ("k1", "k2")
OUTCOMES = ("succeed", "fail", "retry", "cancel")
LIVE = ("waiting", "scheduled", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
# What happened across all examples, printed at the end (``-s``): shows each path was exercised.
SEEN: Counter[str] = Counter()
# What the worker writes in runs.outcome for each thing a task does.
RUN_OUTCOME = {"succeed": "succeeded", "fail": "failed", "retry": "failed", "cancel": "cancelled"}


# A worker incarnation whose lease runs an hour: it claims, then is never heard from again.
REGISTER_DOOMED_WORKER = """INSERT INTO pgsched.workers (id, host, pid, queues, concurrency, lease_expires_at)
VALUES (%s, 'doomed', 1, %s, 1000, pgsched.now() + interval '1 hour')"""

# What an enqueue may ask for.
ENQUEUE_OPTIONS = {
    "queue": st.sampled_from(QUEUES),
    "plan": st.lists(st.sampled_from(OUTCOMES), max_size=3),
    "max_attempts": st.integers(1, 3),
    "dedupe_key": st.none() | st.sampled_from(KEYS),
    "delayed": st.booleans(),
}


def build_app(dsn: str) -> pgsched.App:
    app = pgsched.App(dsn)

    @app.task(queue="a", backoff=Backoff.fixed(DAY, jitter=0))
    def step(ctx: pgsched.Context, plan: list[str]) -> str:
        todo = plan[ctx.attempt - 1] if ctx.attempt <= len(plan) else "succeed"
        if todo == "fail":
            raise RuntimeError("planned failure")
        if todo == "retry":
            raise Retry(after=DAY)
        if todo == "cancel":
            raise Cancel("planned cancel")
        return "ok"

    return app


@dataclass
class Job:
    id: int
    queue: str
    plan: list[str]
    max_attempts: int
    deps: list[int]
    dedupe_key: str | None
    upstream_ok: bool  # run_on_upstream_failure
    state: str = "queued"
    attempts: int = 0
    run_at: float = 0.0  # model days
    runs: list[str] = field(default_factory=list)  # runs.outcome, in attempt order


class Model:
    """DESIGN §3 in plain Python."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.paused: set[str] = set()
        self.now = 0.0

    def live_key_holder(self, key: str | None) -> Job | None:
        return next((j for j in self.jobs.values() if key and j.dedupe_key == key and j.state in LIVE), None)

    def initial_state(self, job: Job) -> str:
        states = [self.jobs[d].state for d in job.deps]
        if not job.upstream_ok and any(s in ("failed", "cancelled") for s in states):
            return "cancelled"
        if any(s not in FINISHED or (s != "succeeded" and not job.upstream_ok) for s in states):
            return "waiting"
        return "scheduled" if job.run_at > self.now else "queued"

    def finish(self, job: Job, state: str) -> None:
        job.state = state
        for dependent in sorted(self.jobs.values(), key=lambda j: j.id):
            if dependent.state == "waiting" and job.id in dependent.deps:
                self.release(dependent)

    def release(self, job: Job) -> None:
        states = [self.jobs[d].state for d in job.deps]
        if not job.upstream_ok and any(s in ("failed", "cancelled") for s in states):
            SEEN["cancelled upstream"] += 1
            self.finish(job, "cancelled")
        elif all(s == "succeeded" for s in states) or (job.upstream_ok and all(s in FINISHED for s in states)):
            SEEN["released"] += 1
            job.state = "scheduled" if job.run_at > self.now else "queued"

    def cancel(self, job: Job) -> bool:
        """Whether the cancel is refused (a finished job)."""
        if job.state in ("succeeded", "failed"):
            return True
        if job.state != "cancelled":
            self.finish(job, "cancelled")
        return False

    def retry(self, job: Job) -> bool:
        """Whether the retry is refused (a waiting job; a key another live job holds)."""
        if job.state == "queued":
            return False
        holder = self.live_key_holder(job.dedupe_key)
        if job.state == "waiting" or (holder is not None and holder is not job):
            return True
        job.state, job.run_at = "queued", self.now
        job.max_attempts = max(job.max_attempts, job.attempts + 1)
        return False

    def execute(self, job: Job) -> None:
        job.attempts += 1
        todo = job.plan[job.attempts - 1] if job.attempts <= len(job.plan) else "succeed"
        job.runs.append(RUN_OUTCOME[todo])
        SEEN[f"executed: {todo}"] += 1
        if todo == "succeed":
            self.finish(job, "succeeded")
        elif todo == "cancel":
            self.finish(job, "cancelled")
        elif job.attempts >= job.max_attempts:
            self.finish(job, "failed")
        else:
            job.state, job.run_at = "scheduled", self.now + 1

    def drain(self) -> None:
        SEEN["drain"] += 1
        """A burst of the worker on every queue, then the promoter, until nothing is due."""
        while True:
            while ready := [j for j in self.jobs.values() if j.state == "queued" and j.queue not in self.paused]:
                self.execute(min(ready, key=lambda j: j.id))
            due = [j for j in self.jobs.values() if j.state == "scheduled" and j.run_at <= self.now]
            for job in due:
                SEEN["promoted"] += 1
                job.state = "queued"
            if not due:
                return


class JobMachine(RuleBasedStateMachine):
    kit: Kit  # set by the test before each run

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.kit.reset()
        self.kit.app.add_schedule("nightly", "step", every=DAY, args={"plan": ["fail"]}, max_attempts=2)
        self.model = Model()

    def add(self, job: pgsched.Job, expected: Job) -> int:
        assert job.id not in self.model.jobs
        expected.id = job.id
        self.model.jobs[job.id] = expected
        return job.id

    @rule(target=jobs, **ENQUEUE_OPTIONS)
    def enqueue(self, **options: Any) -> Any:
        return self.enqueue_job(deps=[], upstream_ok=False, **options)

    @rule(
        target=jobs,
        deps=st.lists(jobs, min_size=1, max_size=3, unique=True),
        upstream_ok=st.booleans(),
        **ENQUEUE_OPTIONS,
    )
    def enqueue_after(self, **options: Any) -> Any:
        return self.enqueue_job(**options)

    def enqueue_job(
        self,
        queue: str,
        plan: list[str],
        max_attempts: int,
        dedupe_key: str | None,
        deps: list[int],
        delayed: bool,
        upstream_ok: bool,
    ) -> Any:
        expected = Job(0, queue, plan, max_attempts, sorted(deps), dedupe_key, upstream_ok)
        expected.run_at = self.model.now + (1 if delayed else 0)
        expected.state = self.model.initial_state(expected)
        holder = self.model.live_key_holder(dedupe_key) if expected.state in LIVE else None
        options: dict[str, Any] = {"queue": queue, "max_attempts": max_attempts, "dedupe_key": dedupe_key}
        options.update(depends_on=deps or None, run_on_upstream_failure=upstream_ok, delay=DAY if delayed else None)
        try:
            job = self.kit.app.enqueue("step", {"plan": plan}, **options)
        except DuplicateJobError as exc:
            assert holder is not None and exc.existing_id == holder.id
            SEEN["enqueue refused: dedupe key held"] += 1
            return multiple()  # nothing was written
        assert holder is None, f"dedupe key {dedupe_key} is held by job {holder.id}, yet the enqueue passed"
        SEEN[f"enqueued {expected.state}"] += 1
        return self.add(job, expected)

    @rule(target=jobs)
    def trigger_schedule(self) -> int:
        SEEN["trigger schedule"] += 1
        job = self.kit.app.trigger_schedule("nightly")
        return self.add(job, Job(0, "a", ["fail"], 2, [], None, False, run_at=self.model.now))

    @rule(job_id=jobs)
    def cancel(self, job_id: int) -> None:
        SEEN[f"cancel {self.model.jobs[job_id].state}"] += 1
        refused = self.model.cancel(self.model.jobs[job_id])
        try:
            self.kit.app.cancel(job_id)
        except InvalidStateError:
            assert refused, f"cancel of job {job_id} refused"
            SEEN["cancel refused"] += 1
        else:
            assert not refused, f"cancel of finished job {job_id} accepted"

    @rule(job_id=jobs)
    def retry(self, job_id: int) -> None:
        SEEN[f"retry {self.model.jobs[job_id].state}"] += 1
        refused = self.model.retry(self.model.jobs[job_id])
        try:
            self.kit.app.retry(job_id)
        except (InvalidStateError, DuplicateJobError) as exc:
            assert refused, f"retry of job {job_id} refused"
            SEEN[f"retry refused: {type(exc).__name__}"] += 1
        else:
            assert not refused, f"retry of job {job_id} accepted"

    @rule(queue=st.sampled_from(QUEUES), paused=st.booleans())
    def pause_or_resume(self, queue: str, paused: bool) -> None:
        SEEN["pause" if paused else "resume"] += 1
        if paused:
            self.kit.app.pause_queue(queue, create=True)
            self.model.paused.add(queue)
        else:
            self.kit.app.configure_queue(queue, create=True, paused=False)
            self.model.paused.discard(queue)

    @precondition(lambda self: any(j.state in ("queued", "scheduled") for j in self.model.jobs.values()))
    @rule(advance_clock=st.booleans())
    def drain(self, advance_clock: bool) -> None:
        """A burst of the worker on both queues (paused or not), after moving the clock two days."""
        SEEN["drain" + (" after a clock step" if advance_clock else "")] += 1
        if advance_clock:
            self.kit.clock.advance(days=2)
            self.model.now += 2
        self.kit.drain(list(QUEUES))
        self.model.drain()

    @precondition(lambda self: any(j.state == "queued" for j in self.model.jobs.values()))
    @rule(queue=st.sampled_from(QUEUES), cancel_one=st.booleans())
    def crash_and_rescue(self, queue: str, cancel_one: bool) -> None:
        """A worker claims every queued job of ``queue`` and dies; optionally one of them is cancelled
        while it is held; the clock passes its lease and the rescuer takes them back (an attempt
        counted, a ``lease_expired`` run each); then the clock moves on past the rescue's backoff."""
        with psycopg.connect(self.kit.dsn, autocommit=True) as conn:
            worker = uuid.uuid4()
            conn.execute(REGISTER_DOOMED_WORKER, (worker, [queue]))
            params = {"queues": [queue], "tasks": ["step"], "worker": worker, "limit": 1000}
            claimed = sorted(row[0] for row in conn.execute(CLAIM, params))
        held = [j for j in self.model.jobs.values() if j.state == "queued" and j.queue == queue]
        if queue in self.model.paused:
            held = []
        assert claimed == sorted(j.id for j in held), "the claim took other jobs than the queued ones"
        SEEN["crash" + (" holding jobs" if held else "")] += 1
        for job in held:
            job.state = "running"
            job.attempts += 1
        cancelled = held[0] if cancel_one and held else None
        if cancelled is not None:
            self.kit.app.cancel(cancelled.id)
            SEEN["cancel running"] += 1
        self.kit.clock.advance(days=2)
        self.model.now += 2
        rescued = run_sync(self.rescue(), "rescue")
        assert rescued == len(held)
        for job in sorted(held, key=lambda j: j.id):
            job.runs.append("lease_expired")
            if job is cancelled:
                self.model.finish(job, "cancelled")
            elif job.attempts >= job.max_attempts:
                self.model.finish(job, "failed")
            else:
                job.state, job.run_at = "scheduled", self.model.now + 0.001  # a backoff of seconds
        self.kit.clock.advance(days=2)
        self.model.now += 2

    async def rescue(self) -> int:
        async with await psycopg.AsyncConnection.connect(self.kit.dsn, autocommit=True) as conn:
            return (await Rescuer(lease_seconds=0).run_once(conn)).done["rescued"]

    @invariant()
    def database_matches_the_model(self) -> None:
        with psycopg.connect(self.kit.dsn) as conn:
            jobs = conn.execute("SELECT id, state, attempts, max_attempts FROM pgsched.jobs ORDER BY id").fetchall()
            runs = conn.execute("SELECT job_id, outcome FROM pgsched.runs ORDER BY job_id, attempt, id").fetchall()
        expected = sorted((j.id, j.state, j.attempts, j.max_attempts) for j in self.model.jobs.values())
        assert jobs == expected
        assert runs == [
            (j.id, outcome) for j in sorted(self.model.jobs.values(), key=lambda j: j.id) for outcome in j.runs
        ]


def test_the_database_follows_the_state_machine(dsn: str) -> None:
    kit = Kit(build_app(dsn), dsn)
    JobMachine.kit = kit
    try:
        run_state_machine_as_test(
            JobMachine,
            settings=settings(
                max_examples=300 if FULL else 40,
                stateful_step_count=50 if FULL else 30,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=not FULL,
                database=None,
            ),
        )
    finally:
        kit.close()
        print("model steps seen:", dict(sorted(SEEN.items())))
