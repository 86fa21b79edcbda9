"""Queue controls: pause, global caps, rate limits, concurrency keys and fair sharing.

Every limit is checked from the ``runs`` history (the database's own record of
when each attempt started and finished), never from worker logs.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgsched
from pgsched import ValidationError
from pgsched.queues import parse_rate
from pgsched.worker.queries import CLAIM, CLAIM_CONTROLLED
from pgsched.worker.runtime import Worker

from .conftest import HEAVY, job_is, row_counts, start_worker, wait_until, wait_until_async, worker_incarnation
from .processes import WorkerProcess
from .test_claim import assert_range_scans_only, plan_nodes
from .test_cli import error_line, succeeded
from .test_cli import pgsched as run_cli

pytestmark = pytest.mark.db

CONTROLS_APP = "tests.apps.controls:app"


# -- reading the history ---------------------------------------------------------------------------


def run_intervals(conn: psycopg.Connection[Any], queue: str, key: str | None = None) -> list[tuple[datetime, datetime]]:
    sql = "SELECT r.started_at, r.finished_at FROM pgsched.runs r JOIN pgsched.jobs j ON j.id = r.job_id WHERE r.queue = %s"
    params: list[Any] = [queue]
    if key is not None:
        sql += " AND j.concurrency_key = %s"
        params.append(key)
    return conn.execute(sql, params).fetchall()


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (a finish at t closes before a start at t)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(f, -1) for _, f in intervals], key=lambda e: (e[0], e[1]))
    open_now = most = 0
    for _, change in events:
        open_now += change
        most = max(most, open_now)
    return most


def tightest_window(starts: list[datetime], limit: int) -> timedelta:
    """The shortest time spanned by limit + 1 consecutive starts (a rate of limit per P holds iff >= P)."""
    starts = sorted(starts)
    return min((starts[i + limit] - starts[i] for i in range(len(starts) - limit)), default=timedelta.max)


def count(conn: psycopg.Connection[Any], where: str, *params: Any) -> int:
    return conn.execute(f"SELECT count(*) FROM pgsched.jobs WHERE {where}", params).fetchone()[0]


# -- workers ---------------------------------------------------------------------------------------


@pytest.fixture
def controls_app(dsn: str) -> Iterator[pgsched.App]:
    """An App on this test's database with the tasks of tests/apps/controls.py (the worker processes' app)."""
    from tests.apps import controls

    app = pgsched.App(dsn)
    app.tasks.update(controls.app.tasks)
    app.open()
    yield app
    app.close()


async def _stop(worker: Worker, task: asyncio.Task[Any]) -> Any:
    worker.stop()
    return await asyncio.wait_for(task, 20)


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100/minute", (100, timedelta(minutes=1))),
        ("1/second", (1, timedelta(seconds=1))),
        (" 5 / hours ", (5, timedelta(hours=1))),
        ("20/seconds", (20, timedelta(seconds=1))),
    ],
)
def test_rates_are_parsed(text: str, expected: tuple[int, timedelta]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_running": -1}, "max_running"),
        ({"max_running": 0}, "max_running"),
        ({"max_running": "3"}, "max_running"),
        ({"max_per_key": 0}, "max_per_key"),
        ({"rate": "0/minute"}, "rate"),
        ({"rate": "ten/hour"}, "rate"),
        ({"rate": "5/fortnight"}, "rate"),
        ({"rate": 100}, "rate"),
        ({"fair": "yes"}, "fair"),
        ({"paused": 1}, "paused"),
        ({"speed": 1}, "speed"),
    ],
)
def test_bad_settings_are_refused_naming_the_field_and_change_nothing(
    app: pgsched.App, conn: psycopg.Connection[Any], changes: dict[str, Any], field: str
) -> None:
    app.configure_queue("q", create=True, max_running=5, rate="10/second")
    before = conn.execute("SELECT * FROM pgsched.queues").fetchall()
    with pytest.raises(ValidationError) as refused:
        app.configure_queue("q", **changes)
    assert refused.value.field == field
    assert conn.execute("SELECT * FROM pgsched.queues").fetchall() == before


def test_an_unknown_queue_is_refused_unless_created(app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.jobs (task, queue) VALUES ('t', 'reports')")
    with pytest.raises(ValidationError, match="unknown queue 'report'; did you mean 'reports'") as refused:
        app.pause_queue("report")
    assert refused.value.field == "name"
    assert row_counts(conn)["queues"] == 0
    assert app.pause_queue("reports").paused  # known: it has jobs
    assert app.configure_queue("later", create=True, max_running=2).max_running == 2


def test_settings_change_only_what_is_given_and_none_clears(app: pgsched.App) -> None:
    app.configure_queue("q", create=True, max_running=3, rate="100/minute", max_per_key=2, fair=True)
    app.pause_queue("q")
    settings = app.configure_queue("q", rate=None)
    assert (settings.paused, settings.max_running, settings.rate, settings.max_per_key, settings.fair) == (
        True,
        3,
        None,
        2,
        True,
    )
    assert app.resume_queue("q").paused is False
    assert app.queue_settings("q").max_running == 3
    assert app.queue_settings("never-seen") == pgsched.QueueSettings(name="never-seen")
    assert [s.name for s in app.list_queue_settings()] == ["q"]


def test_configuring_encrypt_applies_to_this_apps_next_enqueue(app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    app.open()
    assert app.configure_queue("vault", create=True, encrypt=True).encrypt
    assert app.encrypted_queues == {"vault"}
    with pytest.raises(ValidationError, match="no key is configured") as refused:
        app.enqueue("shell", {"cmd": ["true"]}, queue="vault")
    assert refused.value.field == "args" and row_counts(conn)["jobs"] == 0
    assert not app.configure_queue("vault", encrypt=None).encrypt and app.encrypted_queues == frozenset()


# -- the claim statements --------------------------------------------------------------------------


def _plan(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> list[str]:
    return [r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + sql, params).fetchall()]


def _jobs_nodes(plan: list[str]) -> list[str]:
    """The plan's nodes on pgsched.jobs, each with its attribute lines (Index Cond, Filter, ...)."""
    nodes: list[str] = []
    keep = False
    for line in plan:
        text = line.strip()
        if text.startswith("->") or not nodes or " on " in text:
            keep = " on jobs" in text
            if keep:
                nodes.append(text.removeprefix("->  "))
        elif keep:
            nodes.append(text)
    return nodes


def test_a_queue_without_controls_keeps_the_claim_plan(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO pgsched.jobs (task, state, finished_at) SELECT 't', 'succeeded', now() FROM generate_series(1, 5000)"
    )
    conn.execute("INSERT INTO pgsched.jobs (task, owner) SELECT 't', 'o' || (i % 7) FROM generate_series(1, 200) i")
    conn.execute("INSERT INTO pgsched.queues (name, max_running) VALUES ('other', 3)")
    conn.execute("ANALYZE pgsched.jobs")
    params = {"queues": ["default", "b"], "tasks": ["t"], "limit": 10, "worker": worker_incarnation(conn, "1 minute")}
    # The claim before queue controls existed: the same statement without the anti-join on pgsched.queues.
    guard = next(line for line in CLAIM.splitlines() if "pgsched.queue_is_controlled" in line)
    before = CLAIM.replace(guard + "\n", "")
    for mode in ("auto", "force_generic_plan"):
        conn.execute(f"SET plan_cache_mode = {mode}")
        old, new = _plan(conn, before, params), _plan(conn, CLAIM, params)
        assert _jobs_nodes(new) == _jobs_nodes(old), "\n".join(new)
        assert any("jobs_claim_idx" in node for node in _jobs_nodes(new))
        [(plan,)] = conn.execute("EXPLAIN (FORMAT JSON) " + CLAIM, params).fetchall()
        assert_range_scans_only(plan_nodes(plan[0]["Plan"]))  # no sort of queued rows
        assert any("queues" in line for line in new)  # the anti-join, on the settings table only


def claim(conn: psycopg.Connection[Any], sql: str, queues: list[str], limit: int = 10) -> list[tuple[Any, ...]]:
    params = {"queues": queues, "tasks": ["t"], "limit": limit, "worker": worker_incarnation(conn, "1 minute")}
    return conn.execute(sql, params).fetchall()


def test_no_claim_statement_takes_from_a_paused_queue(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.jobs (task, queue) SELECT 't', 'q' FROM generate_series(1, 5)")
    conn.execute("INSERT INTO pgsched.queues (name, paused) VALUES ('q', true)")
    # A worker that has not heard of the pause yet still runs the plain claim: it finds nothing.
    assert claim(conn, CLAIM, ["q"]) == []
    assert claim(conn, CLAIM_CONTROLLED, ["q"]) == []
    conn.execute("UPDATE pgsched.queues SET paused = false, max_running = 2")
    assert claim(conn, CLAIM, ["q"]) == []  # controlled now: the plain claim leaves it alone
    assert len(claim(conn, CLAIM_CONTROLLED, ["q"])) == 2
    assert claim(conn, CLAIM_CONTROLLED, ["q"]) == []  # two running: the cap is reached
    assert count(conn, "state = 'running'") == 2


def test_a_full_rate_window_says_when_the_next_start_is_allowed(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.jobs (task, queue) SELECT 't', 'q' FROM generate_series(1, 5)")
    conn.execute("INSERT INTO pgsched.queues (name, rate_limit, rate_period) VALUES ('q', 3, '1 hour')")
    rows = claim(conn, CLAIM_CONTROLLED, ["q"])
    jobs, [info] = [r for r in rows if r[0] is not None], [r for r in rows if r[0] is None]
    assert len(jobs) == 3
    assert 3590 < info[-1] <= 3600  # seconds until the first of the three leaves the window
    [(info,)] = [(r[-1],) for r in claim(conn, CLAIM_CONTROLLED, ["q"])]
    assert 3590 < info <= 3600
    # Moving the clock past the window lets three more start.
    conn.execute("SET pgsched.clock_offset = '61 minutes'")
    assert len([r for r in claim(conn, CLAIM_CONTROLLED, ["q"]) if r[0] is not None]) == 2


def test_fair_order_is_priority_then_rank_in_group_then_run_at(conn: psycopg.Connection[Any]) -> None:
    def add(owner: str | None, key: str | None = None, priority: int = 0) -> int:
        return conn.execute(
            "INSERT INTO pgsched.jobs (task, queue, owner, concurrency_key, priority) VALUES ('t', 'q', %s, %s, %s)"
            " RETURNING id",
            (owner, key, priority),
        ).fetchone()[0]

    a1, a2, a3 = add("a"), add("a"), add("a")
    b1 = add("b")
    anon1, anon2 = add(None), add(None)
    k1 = add("a", key="k")
    urgent = add("c", priority=5)
    pick = "SELECT pgsched.pick_jobs('q', ARRAY['t'], 20, %s, NULL, %s)"
    assert conn.execute(pick, (True, None)).fetchone()[0] == [urgent, a1, b1, anon1, k1, a2, anon2, a3]
    unfair = [urgent, a1, a2, a3, b1, anon1, anon2, k1]
    assert conn.execute(pick, (False, None)).fetchone()[0] == unfair  # group by group
    assert conn.execute(pick, (False, 80)).fetchone()[0] == unfair  # from the front of the claim index


def test_the_front_scan_defers_to_the_group_scan_when_caps_bind(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO pgsched.jobs (task, queue, concurrency_key) SELECT 't', 'q', 'big' FROM generate_series(1, 50)"
    )
    small = conn.execute(
        "INSERT INTO pgsched.jobs (task, queue, concurrency_key) VALUES ('t', 'q', 'small') RETURNING id"
    ).fetchone()[0]
    pick = "SELECT pgsched.pick_jobs('q', ARRAY['t'], 3, false, 1, %s)"
    first = conn.execute("SELECT min(id) FROM pgsched.jobs").fetchone()[0]
    assert conn.execute(pick, (12,)).fetchone()[0] is None  # one of the first 12 may run; more are behind
    assert conn.execute(pick, (100,)).fetchone()[0] == [first, small]  # all 51 seen: exact, even if short
    assert conn.execute(pick, (None,)).fetchone()[0] == [first, small]


def test_a_key_at_its_cap_is_passed_over(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO pgsched.jobs (task, queue, concurrency_key) SELECT 't', 'q', 'big' FROM generate_series(1, 50)"
    )
    small = conn.execute(
        "INSERT INTO pgsched.jobs (task, queue, concurrency_key) VALUES ('t', 'q', 'small') RETURNING id"
    ).fetchone()[0]
    conn.execute("INSERT INTO pgsched.queues (name, max_per_key) VALUES ('q', 2)")
    first = [r[0] for r in claim(conn, CLAIM_CONTROLLED, ["q"])]
    assert len(first) == 3 and small in first
    assert claim(conn, CLAIM_CONTROLLED, ["q"]) == []  # big has 2 running, small none left
    conn.execute("UPDATE pgsched.jobs SET state = 'succeeded', finished_at = now() WHERE id = %s", (min(first),))
    assert len(claim(conn, CLAIM_CONTROLLED, ["q"])) == 1


# -- pause and resume with a running worker ----------------------------------------------------------


def listening(conn: psycopg.Connection[Any]) -> bool:
    """The worker's listener has subscribed to every channel (its last statement is the last LISTEN)."""
    return bool(
        conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND query = 'LISTEN pgsched_queue_settings'"
        ).fetchone()
    )


def test_pause_stops_claims_and_resume_wakes_the_worker_at_once(
    controls_app: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    async def scenario() -> None:
        # Polling and heartbeats every two minutes: only the settings notices can make this quick.
        worker, task = await start_worker(controls_app, queues="capped", poll_seconds=120, heartbeat_seconds=20)
        await wait_until_async(lambda: listening(conn), timeout=5, message="the worker listening")
        await controls_app.pause_queue_async("capped")
        await wait_until_async(
            lambda: "capped" in worker.controls.paused, timeout=2, message="the worker heard the pause"
        )
        job = await controls_app.enqueue_async("work")
        await asyncio.sleep(1.0)  # the enqueue's wake-up arrives: the worker must not claim from a paused queue
        assert (await controls_app.get_async(job.id)).state == "queued"
        assert worker.stats.claimed == 0
        await controls_app.resume_queue_async("capped")
        await wait_until_async(
            lambda: job_is(controls_app, job.id, "succeeded"), timeout=3, message="the job ran after resume"
        )
        await _stop(worker, task)

    asyncio.run(scenario())


def test_pause_gives_back_prefetched_jobs(controls_app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    async def scenario() -> None:
        ids = controls_app.enqueue_many({"task": "work", "args": {"ms": 400}} for _ in range(6))
        worker, task = await start_worker(controls_app, queues="capped", concurrency=1, prefetch=5)
        await wait_until_async(lambda: count(conn, "state = 'running'") == 6, timeout=5, message="six claimed")
        await controls_app.pause_queue_async("capped")
        await wait_until_async(lambda: count(conn, "state = 'queued'") == 5, timeout=3, message="five given back")
        await wait_until_async(lambda: count(conn, "state = 'succeeded'") == 1, timeout=3, message="running one done")
        stats = await _stop(worker, task)
        assert stats.released == 5
        assert conn.execute("SELECT count(*) FROM pgsched.runs").fetchone()[0] == 1
        assert count(conn, "state = 'queued' AND attempts = 0 AND id = ANY(%s)", ids) == 5

    asyncio.run(scenario())


@HEAVY
def test_pause_under_load_stops_every_worker_within_a_second(
    controls_app: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    controls_app.enqueue_many({"task": "work", "args": {"ms": random.uniform(2, 6)}} for _ in range(4000))
    supervisor = spawn_worker("--queues", "capped", "--processes", "8", "--concurrency", "4", app=CONTROLS_APP)
    wait_until(lambda: count(conn, "state = 'succeeded'") >= 300, timeout=60, message="the drain under way")
    controls_app.pause_queue("capped")
    paused_at = conn.execute("SELECT pgsched.now()").fetchone()[0]  # after the pause committed
    wait_until(lambda: count(conn, "state = 'running'") == 0, timeout=10, message="running jobs finished")
    conn.execute("SELECT pg_sleep(1.5)")  # long enough for a late claim to show in the history
    late = conn.execute(
        "SELECT count(*) FROM pgsched.runs WHERE queue = 'capped' AND started_at > %s",
        (paused_at + timedelta(seconds=1),),
    ).fetchone()[0]
    assert late == 0
    assert count(conn, "state = 'running'") == 0 and count(conn, "state = 'queued'") > 0
    controls_app.resume_queue("capped")
    wait_until(lambda: count(conn, "state = 'succeeded'") == 4000, timeout=90, message="the rest drained after resume")
    assert supervisor.stop(30) == 0


# -- caps, rates, keys and fairness under real worker processes ------------------------------------------


@HEAVY
def test_a_global_cap_holds_across_eight_worker_processes(
    controls_app: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    controls_app.configure_queue("capped", create=True, max_running=3)
    durations = [random.uniform(1, 20) for _ in range(5000)]
    controls_app.enqueue_many({"task": "work", "args": {"ms": ms}} for ms in durations)
    supervisor = spawn_worker("--queues", "capped", "--processes", "8", app=CONTROLS_APP)
    wait_until(lambda: count(conn, "state = 'succeeded'") == 5000, timeout=240, interval=0.5, message="5,000 jobs")
    assert supervisor.stop(30) == 0
    history = run_intervals(conn, "capped")
    assert len(history) == 5000
    assert max_overlap(history) == 3  # never more than the cap, and the cap was used
    span = (max(f for _, f in history) - min(s for s, _ in history)).total_seconds()
    print(f"cap 3: {5000 / span:.0f} jobs/s; {sum(durations) / 1000 / (3 * span):.2f} of 3 slots' worth of work")


@HEAVY
def test_a_rate_limit_holds_in_every_window_across_processes(
    controls_app: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    controls_app.configure_queue("capped", create=True, rate="20/second")
    controls_app.enqueue_many({"task": "work"} for _ in range(100))
    for _ in range(3):
        spawn_worker("--queues", "capped", app=CONTROLS_APP)
    wait_until(lambda: count(conn, "state = 'succeeded'") == 100, timeout=30, message="100 rate-limited jobs")
    starts = [s for s, _ in run_intervals(conn, "capped")]
    assert len(starts) == 100
    assert tightest_window(starts, 20) >= timedelta(seconds=1)  # no 21 starts within any second


def test_a_rate_limited_worker_waits_for_the_next_start_instead_of_polling(
    controls_app: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    async def scenario() -> None:
        await controls_app.configure_queue_async("capped", create=True, rate="4/second")
        controls_app.enqueue_many({"task": "work"} for _ in range(12))
        worker, task = await start_worker(controls_app, queues="capped", poll_seconds=120)
        await wait_until_async(lambda: count(conn, "state = 'succeeded'") == 12, timeout=10, message="12 jobs")
        stats = await _stop(worker, task)
        starts = [s for s, _ in run_intervals(conn, "capped")]
        assert tightest_window(starts, 4) >= timedelta(seconds=1)
        # Three windows of four: a claim when each opens (plus wake-ups for freed slots), not a poll loop.
        assert 3 <= stats.claims < 30, stats

    asyncio.run(scenario())


@HEAVY
def test_a_busy_concurrency_key_does_not_delay_another_key(
    controls_app: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    controls_app.configure_queue("capped", create=True, max_per_key=2)
    controls_app.enqueue_many({"task": "work", "args": {"ms": 20}, "concurrency_key": "big"} for _ in range(10_000))
    for _ in range(2):
        spawn_worker("--queues", "capped", "--concurrency", "5", app=CONTROLS_APP)
    wait_until(lambda: count(conn, "state = 'succeeded'") >= 10, timeout=30, message="the big key under way")
    small = controls_app.enqueue("work", concurrency_key="small")
    wait_until(lambda: controls_app.get(small.id).state == "succeeded", timeout=10, message="the small key's job")
    job = controls_app.get(small.id)
    assert job.started_at is not None and job.started_at - job.created_at < timedelta(seconds=1)
    assert count(conn, "concurrency_key = 'big' AND state = 'queued'") > 9000  # the backlog is still there
    controls_app.pause_queue("capped")  # stop the drain; then read the history of what ran
    wait_until(lambda: count(conn, "state = 'running'") == 0, timeout=10, message="running jobs finished")
    assert max_overlap(run_intervals(conn, "capped", key="big")) == 2


def test_a_task_max_per_key_caps_each_key_in_any_queue(
    controls_app: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    controls_app.enqueue_many(
        {"task": "per_customer", "args": {"ms": 150}, "concurrency_key": key} for key in ["a"] * 4 + ["b"] * 4
    )
    controls_app.run_worker(queues="default", concurrency=8, burst=True, poll_seconds=0.1)
    assert count(conn, "state = 'succeeded'") == 8
    assert max_overlap(run_intervals(conn, "default", key="a")) == 1
    assert max_overlap(run_intervals(conn, "default", key="b")) == 1
    assert max_overlap(run_intervals(conn, "default")) == 2  # the two keys ran side by side


def test_an_app_that_only_enqueues_a_capped_task_does_not_lift_its_cap(
    controls_app: pgsched.App, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    def catalog_cap() -> Any:
        sql = "SELECT options FROM pgsched.tasks WHERE name = 'per_customer'"
        return conn.execute(sql).fetchone()[0].get("max_per_key")

    async def scenario() -> None:
        worker, task = await start_worker(controls_app, queues="default", concurrency=8, poll_seconds=0.1)
        client = pgsched.App(dsn)

        @client.task(name="per_customer")
        async def per_customer(ms: float = 0) -> None:
            """The same task, registered without max_per_key."""

        try:
            await wait_until_async(lambda: catalog_cap() == 1, message="the worker's registration")
            # Another service enqueues the same task; its code has no cap (or an older version of it).
            await client.open_async()
            assert catalog_cap() == 1  # the workers' cap stands
            await client.enqueue_many_async(
                {"task": "per_customer", "args": {"ms": 100}, "concurrency_key": "a"} for _ in range(6)
            )
            await wait_until_async(lambda: count(conn, "state = 'succeeded'") == 6, message="six jobs")
        finally:
            await client.close_async()
            await _stop(worker, task)

    asyncio.run(scenario())
    assert max_overlap(run_intervals(conn, "default", key="a")) == 1


@HEAVY
def test_a_fair_queue_does_not_starve_an_owner_behind_a_burst(
    controls_app: pgsched.App, conn: psycopg.Connection[Any], spawn_worker: Callable[..., WorkerProcess]
) -> None:
    controls_app.configure_queue("capped", create=True, fair=True)
    controls_app.enqueue_many({"task": "work", "owner": "burst"} for _ in range(100_000))
    for _ in range(2):
        spawn_worker("--queues", "capped", app=CONTROLS_APP)
    wait_until(lambda: count(conn, "state = 'succeeded'") >= 1000, timeout=60, message="the burst draining")
    single = controls_app.enqueue("work", owner="other")
    wait_until(lambda: controls_app.get(single.id).state == "succeeded", timeout=10, message="the other owner's job")
    job = controls_app.get(single.id)
    assert job.started_at is not None and job.started_at - job.created_at < timedelta(seconds=1)
    assert count(conn, "owner = 'burst' AND state = 'queued'") > 10_000  # it did not wait for the burst


# -- the command line ------------------------------------------------------------------------------------


def test_cli_pauses_resumes_and_sets_controls(
    cli_env: dict[str, str], app: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    conn.execute("INSERT INTO pgsched.jobs (task, queue) VALUES ('t', 'reports')")
    assert succeeded(run_cli(cli_env, "queues", "pause", "reports")).stdout.strip() == "queue reports: paused"
    assert app.queue_settings("reports").paused
    out = succeeded(run_cli(cli_env, "queues", "set", "reports", "--max-running", "3", "--rate", "10/minute", "--json"))
    assert '"max_running":3' in out.stdout and '"rate":"10/minute"' in out.stdout
    succeeded(run_cli(cli_env, "queues", "resume", "reports"))
    settings = app.queue_settings("reports")
    assert (settings.paused, settings.max_running, settings.rate) == (False, 3, "10/minute")
    succeeded(run_cli(cli_env, "queues", "set", "reports", "--max-running", "none"))
    assert app.queue_settings("reports").max_running is None
    assert "reports" in succeeded(run_cli(cli_env, "queues")).stdout
    assert "10/minute" in succeeded(run_cli(cli_env, "queues", "show")).stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pause", "nope"], "Error: name: unknown queue 'nope'"),
        (["set", "reports", "--max-running", "-2"], "Error: max_running: "),
        (["set", "reports", "--rate", "ten/hour"], "Error: rate: must look like '100/minute'"),
        (["set", "reports", "--rate", "0/minute"], "Error: rate: must allow at least 1 start"),
    ],
)
def test_cli_refuses_bad_settings_and_changes_nothing(
    cli_env: dict[str, str], app: pgsched.App, conn: psycopg.Connection[Any], args: list[str], message: str
) -> None:
    conn.execute("INSERT INTO pgsched.jobs (task, queue) VALUES ('t', 'reports')")
    assert error_line(run_cli(cli_env, "queues", *args)).startswith(message)
    assert row_counts(conn)["queues"] == 0
