"""Leader services (pgsched.leader) driven with run_once and the test clock; dependencies; cycles under races."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgsched
from pgsched.leader.promoter import Promoter
from pgsched.leader.pruner import Pruner
from pgsched.leader.rescuer import Rescuer
from pgsched.leader.service import LEADER_KEY

from .conftest import wait_until, worker_incarnation

pytestmark = pytest.mark.db


def db_now(conn: psycopg.Connection[Any]) -> datetime:
    return conn.execute("SELECT now()").fetchone()[0]


def run_once(dsn: str, service: Any, now: datetime | None = None) -> Any:
    async def go() -> Any:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await service.run_once(conn, now)

    return asyncio.run(go())


def states(conn: psycopg.Connection[Any]) -> dict[int, str]:
    return dict(conn.execute("SELECT id, state FROM pgsched.jobs").fetchall())


def test_promoter_queues_due_jobs_and_notifies(dsn: str, conn: psycopg.Connection[Any]) -> None:
    later = conn.execute(
        "INSERT INTO pgsched.jobs (task, queue, run_at) VALUES ('t', 'q', pgsched.now() + interval '1 hour') RETURNING id"
    ).fetchone()[0]
    much_later = conn.execute(
        "INSERT INTO pgsched.jobs (task, run_at) VALUES ('t', pgsched.now() + interval '1 day') RETURNING id"
    ).fetchone()[0]
    assert run_once(dsn, Promoter()).done == {"promoted": 0}
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgsched_wakeup")
        result = run_once(dsn, Promoter(), db_now(conn) + timedelta(hours=2))
        assert [n.payload for n in listener.notifies(timeout=2, stop_after=1)] == ["q"]
    assert result.leader and result.done == {"promoted": 1}
    assert states(conn) == {later: "queued", much_later: "scheduled"}


def test_promoter_pages_through_many(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO pgsched.jobs (task, run_at) SELECT 't', pgsched.now() + interval '1 minute' FROM generate_series(1, 2500)"
    )
    result = run_once(dsn, Promoter(), db_now(conn) + timedelta(minutes=5))
    assert result.done == {"promoted": 2500}


def test_only_the_lock_holder_leads_a_pass(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO pgsched.jobs (task, state, run_at) VALUES ('t', 'scheduled', pgsched.now() - interval '1 second')"
    )
    with psycopg.connect(dsn) as other:  # another scheduler, mid-pass
        other.execute("SELECT pg_advisory_xact_lock(%s)", (LEADER_KEY,))
        result = run_once(dsn, Promoter())
        assert (result.leader, result.done) == (False, {})
    assert run_once(dsn, Promoter()).done == {"promoted": 1}


def test_a_leader_frozen_mid_pass_loses_the_lock_after_its_stall_timeout(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """A pass whose process stops answering (SIGSTOP, a stalled VM) keeps its transaction open, and
    with it the leader lock: the server ends it after ``stall_seconds`` idle, so the others lead."""
    conn.execute(
        "INSERT INTO pgsched.jobs (task, state, run_at) VALUES ('t', 'scheduled', pgsched.now() - interval '1 second')"
    )
    entered, thawed = threading.Event(), threading.Event()

    class Frozen(Promoter):
        stall_seconds = 0.5

        async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
            entered.set()
            thawed.wait(30)  # frozen, its event loop too, as under SIGSTOP
            return {}

    failures: list[BaseException] = []

    def freeze() -> None:
        try:
            run_once(dsn, Frozen())
        except BaseException as exc:  # what the frozen pass met when it thawed
            failures.append(exc)

    thread = threading.Thread(target=freeze, daemon=True)
    thread.start()
    assert entered.wait(10)
    assert run_once(dsn, Promoter()).leader is False  # the frozen pass holds the lock
    assert wait_until(lambda: run_once(dsn, Promoter()).done == {"promoted": 1}, timeout=10)
    thawed.set()
    thread.join(10)
    assert isinstance(failures[0], psycopg.errors.IdleInTransactionSessionTimeout), failures


def test_rescuer_waits_a_lease_after_gaining_leadership(dsn: str, conn: psycopg.Connection[Any]) -> None:
    job = conn.execute(
        """INSERT INTO pgsched.jobs (task, queue, state, attempts, max_attempts, worker_id, started_at)
           VALUES ('t', 'q', 'running', 1, 3, %s, pgsched.now() - interval '2 minutes')
           RETURNING id""",
        (worker_incarnation(conn, "-1 minute"),),
    ).fetchone()[0]
    rescuer = Rescuer(lease_seconds=30)
    t0 = db_now(conn)
    assert run_once(dsn, rescuer, t0).done == {"rescued": 0}  # just became leader: the workers may be reconnecting
    assert run_once(dsn, rescuer, t0 + timedelta(seconds=10)).done == {"rescued": 0}
    assert run_once(dsn, rescuer, t0 + timedelta(seconds=31)).done == {"rescued": 1}
    row = conn.execute(
        "SELECT state, attempts, worker_id, error, run_at FROM pgsched.jobs WHERE id = %s", (job,)
    ).fetchone()
    # Retried after a short backoff (1 s after a first rescue), the rescue counted as an attempt.
    assert row[:3] == ("scheduled", 1, None) and "lease expired" in row[3]
    assert t0 + timedelta(seconds=31) < row[4] < t0 + timedelta(seconds=33)
    assert conn.execute("SELECT attempt, outcome FROM pgsched.runs WHERE job_id = %s", (job,)).fetchall() == [
        (1, "lease_expired")
    ]


def test_a_pass_led_elsewhere_does_not_restart_the_rescuers_wait(dsn: str, conn: psycopg.Connection[Any]) -> None:
    # Every worker contends for each pass: a rescuer that started its wait again whenever another
    # process held the lock at that moment would, with many workers, never rescue anything.
    job = conn.execute(
        "INSERT INTO pgsched.jobs (task, state, attempts, worker_id) VALUES ('t', 'running', 1, %s) RETURNING id",
        (worker_incarnation(conn, "-1 minute"),),
    ).fetchone()[0]
    rescuer = Rescuer(lease_seconds=30)
    t0 = db_now(conn)
    assert run_once(dsn, rescuer, t0).leader
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (LEADER_KEY,))  # another process leads this pass
        assert not run_once(dsn, rescuer, t0 + timedelta(seconds=20)).leader
    assert run_once(dsn, rescuer, t0 + timedelta(seconds=31)).done == {"rescued": 1}
    assert states(conn) == {job: "scheduled"}
    later = conn.execute(
        "INSERT INTO pgsched.jobs (task, state, attempts, worker_id) VALUES ('t', 'running', 1, %s) RETURNING id",
        (worker_incarnation(conn, "-1 minute"),),
    ).fetchone()[0]
    rescuer.lost_leadership()  # a reconnection does restart it
    assert run_once(dsn, rescuer, t0 + timedelta(seconds=40)).done == {"rescued": 0}
    assert run_once(dsn, rescuer, t0 + timedelta(seconds=71)).done == {"rescued": 1}
    assert states(conn)[later] == "scheduled"


def test_rescue_fails_exhausted_jobs_and_ends_cancel_requests(dsn: str, conn: psycopg.Connection[Any]) -> None:
    def running(attempts: int, max_attempts: int, cancel: bool) -> int:
        return conn.execute(
            """INSERT INTO pgsched.jobs (task, state, attempts, max_attempts, worker_id, cancel_requested_at, error)
               VALUES ('t', 'running', %s, %s, %s, CASE WHEN %s THEN pgsched.now() END, CASE WHEN %s THEN 'stop it' END)
               RETURNING id""",
            (attempts, max_attempts, worker_incarnation(conn, "-1 second"), cancel, cancel),
        ).fetchone()[0]

    exhausted, cancel, alive = running(3, 3, False), running(1, 3, True), None
    alive = conn.execute(
        "INSERT INTO pgsched.jobs (task, state, attempts, worker_id) VALUES ('t', 'running', 1, %s) RETURNING id",
        (worker_incarnation(conn, "1 minute"),),
    ).fetchone()[0]
    rescuer = Rescuer(lease_seconds=0)
    assert run_once(dsn, rescuer).done == {"rescued": 2}
    got = conn.execute("SELECT id, state, error FROM pgsched.jobs ORDER BY id").fetchall()
    assert [(s, e) for i, s, e in got if i == exhausted] == [("failed", got[0][2])] and "lease" in got[0][2]
    assert [(s, e) for i, s, e in got if i == cancel] == [("cancelled", "stop it")]
    assert [s for i, s, _ in got if i == alive] == ["running"]


def test_rescue_never_overwrites_a_job_that_just_completed(dsn: str, conn: psycopg.Connection[Any]) -> None:
    job = conn.execute(
        "INSERT INTO pgsched.jobs (task, state, attempts, worker_id) VALUES ('t', 'running', 1, %s) RETURNING id",
        (worker_incarnation(conn, "-1 second"),),
    ).fetchone()[0]
    with psycopg.connect(dsn) as worker:  # the worker's completion holds the row...
        worker.execute(
            "UPDATE pgsched.jobs SET state = 'succeeded', finished_at = now(), worker_id = NULL WHERE id = %s",
            (job,),
        )
        result = run_once(dsn, Rescuer(lease_seconds=0))  # ...so the rescuer skips it (SKIP LOCKED)
        worker.commit()
    assert result.done == {"rescued": 0}
    assert run_once(dsn, Rescuer(lease_seconds=0)).done == {"rescued": 0}  # and after commit, it is not expired-running
    assert states(conn)[job] == "succeeded"


def test_pruner_deletes_by_retention_and_keeps_partitions_ahead(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.queues (name, retention_succeeded) VALUES ('short', '1 hour')")
    rows = conn.execute(
        """INSERT INTO pgsched.jobs (task, queue, state, finished_at) VALUES
           ('t', 'default', 'succeeded', pgsched.now() - interval '8 days'),
           ('t', 'default', 'succeeded', pgsched.now() - interval '6 days'),
           ('t', 'default', 'failed', pgsched.now() - interval '8 days'),
           ('t', 'default', 'failed', pgsched.now() - interval '31 days'),
           ('t', 'short', 'succeeded', pgsched.now() - interval '2 hours'),
           ('t', 'short', 'queued', NULL)
           RETURNING id"""
    ).fetchall()
    ids = [r[0] for r in rows]
    conn.execute(
        "INSERT INTO pgsched.workers (id, host, pid, queues, concurrency, lease_expires_at) VALUES (gen_random_uuid(), 'h', 1, '{default}', 1, pgsched.now() - interval '1 hour')"
    )
    result = run_once(dsn, Pruner())
    assert result.done["jobs"] == 3 and result.done["workers"] == 1
    assert sorted(states(conn)) == [ids[1], ids[2], ids[5]]
    future = db_now(conn) + timedelta(days=60)
    later = run_once(dsn, Pruner(), future)
    assert later.done["partitions"] > 0 and later.done["history"] > 0  # new days created, old days dropped
    today = conn.execute("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')").fetchone()[0]
    assert conn.execute("SELECT to_regclass(%s)", (f"pgsched.runs_{today}",)).fetchone()[0] is None


@pytest.fixture
def chain(app: pgsched.App) -> pgsched.App:
    @app.task
    def step(name: str) -> str:
        return name

    @app.task(max_attempts=1)
    def broken() -> None:
        raise RuntimeError("broken")

    return app


def drain(app: pgsched.App) -> None:
    app.run_worker(burst=True, poll_seconds=0.05)


def test_dependents_run_after_their_dependencies(chain: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    a = chain.enqueue("step", {"name": "a"})
    b = chain.enqueue("step", {"name": "b"})
    c = chain.enqueue("step", {"name": "c"}, depends_on=[a, b])
    d = chain.enqueue("step", {"name": "d"}, depends_on=[c])
    assert [chain.get(j.id).state for j in (c, d)] == ["waiting", "waiting"]
    drain(chain)  # c is released in the transaction that completes b, d in the one that completes c
    order = [r[0] for r in conn.execute("SELECT job_id FROM pgsched.runs ORDER BY started_at, id")]
    assert set(order[:2]) == {a.id, b.id} and order[2:] == [c.id, d.id]
    assert all(chain.get(j.id).state == "succeeded" for j in (a, b, c, d))


def test_a_failed_dependency_cancels_dependents_transitively(chain: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    bad = chain.enqueue("broken")
    child = chain.enqueue("step", {"name": "child"}, depends_on=[bad])
    grandchild = chain.enqueue("step", {"name": "grandchild"}, depends_on=[child])
    cleanup = chain.enqueue("step", {"name": "cleanup"}, depends_on=[bad], run_on_upstream_failure=True)
    drain(chain)
    got = {j.id: chain.get(j.id) for j in (bad, child, grandchild, cleanup)}
    assert got[bad.id].state == "failed"
    assert (got[child.id].state, got[child.id].error) == ("cancelled", f"upstream: dependency {bad.id} failed")
    assert got[grandchild.id].state == "cancelled" and got[grandchild.id].error.startswith("upstream")
    assert got[cleanup.id].state == "succeeded"


def test_cancelling_a_waiting_job_cancels_its_dependents(chain: pgsched.App) -> None:
    root = chain.enqueue("step", {"name": "root"}, delay=3600)
    child = chain.enqueue("step", {"name": "child"}, depends_on=[root])
    chain.cancel(root.id)
    assert chain.get(child.id).state == "cancelled"


def test_an_edge_that_closes_a_cycle_is_refused(chain: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    a = chain.enqueue("step", {"name": "a"}, delay=3600)
    b = chain.enqueue("step", {"name": "b"}, depends_on=[a])
    c = chain.enqueue("step", {"name": "c"}, depends_on=[b])
    for job_id, depends_on in ((a.id, a.id), (a.id, b.id), (a.id, c.id)):
        with pytest.raises(psycopg.errors.CheckViolation) as caught:
            conn.execute("INSERT INTO pgsched.job_deps VALUES (%s, %s)", (job_id, depends_on))
        assert pgsched.validation.error_from_db(caught.value).field == "depends_on"


def test_racing_transactions_never_store_a_cycle(dsn: str, conn: psycopg.Connection[Any]) -> None:
    pairs = conn.execute(
        """WITH made AS (INSERT INTO pgsched.jobs (task, state) SELECT 't', 'waiting' FROM generate_series(1, 2000) RETURNING id)
           SELECT array_agg(id ORDER BY id) FROM made"""
    ).fetchone()[0]
    barrier = threading.Barrier(2)
    failures: list[int] = []

    def close(edges: list[tuple[int, int]]) -> None:
        with psycopg.connect(dsn) as mine:
            for job_id, depends_on in edges:
                barrier.wait()
                try:
                    mine.execute("INSERT INTO pgsched.job_deps VALUES (%s, %s)", (job_id, depends_on))
                    mine.commit()
                except psycopg.errors.CheckViolation:
                    mine.rollback()
                    failures.append(job_id)

    races = list(zip(pairs[0::2], pairs[1::2], strict=True))  # 1,000 pairs: x -> y in one, y -> x in the other
    threads = [
        threading.Thread(target=close, args=([(x, y) for x, y in races],)),
        threading.Thread(target=close, args=([(y, x) for x, y in races],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cycles = conn.execute(
        "SELECT count(*) FROM pgsched.job_deps a JOIN pgsched.job_deps b ON a.job_id = b.depends_on AND a.depends_on = b.job_id"
    ).fetchone()[0]
    stored = conn.execute("SELECT count(*) FROM pgsched.job_deps").fetchone()[0]
    assert cycles == 0 and stored == 1000 and len(failures) == 1000


def test_a_workflow_runs_as_a_graph_and_passes_results(app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    @app.task
    def extract(day: str) -> dict[str, Any]:
        return {"rows": 3, "day": day}

    @app.task
    def load(ctx: pgsched.Context) -> int:
        return sum(r["rows"] for r in ctx.dependency_results.values())

    with app.workflow() as wf:
        a = wf.add("extract", {"day": "mon"})
        b = wf.add("extract", {"day": "tue"})
        c = wf.add("load", depends_on=[a, b])
    assert a.id and b.id and c.id and {j.job.workflow_id for j in (a, b, c)} == {wf.id}
    assert c.job.state == "waiting"
    drain(app)
    assert app.get(c.id).result == 6


def test_a_workflow_refuses_cycles_and_writes_nothing(app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    @app.task
    def step() -> None: ...

    before = conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone()[0]
    for edges in ([(0, 0)], [(0, 1), (1, 0)], [(0, 1), (1, 2), (2, 3), (3, 0)]):
        with pytest.raises(pgsched.ValidationError) as caught, app.workflow() as wf:
            nodes = [wf.add("step") for _ in range(4)]
            for job, on in edges:
                wf.add_dependency(nodes[job], on=nodes[on])
        assert caught.value.field == "depends_on" and "cycle" in caught.value.message
    with pytest.raises(pgsched.ValidationError) as caught, app.workflow() as wf:
        wf.add("step")
        wf.add("nope")
    assert caught.value.field == "jobs[1].task"
    assert conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone()[0] == before


def test_cancel_and_retry_a_workflow(chain: pgsched.App) -> None:
    with chain.workflow() as wf:
        first = wf.add("broken")
        second = wf.add("step", {"name": "second"}, depends_on=[first])
        wf.add("step", {"name": "third"}, depends_on=[second])
    drain(chain)
    assert [chain.get(j.id).state for j in wf.jobs] == ["failed", "cancelled", "cancelled"]
    assert chain.retry_workflow(wf.id) == 3
    assert [chain.get(j.id).state for j in wf.jobs] == ["queued", "waiting", "waiting"]
    assert chain.cancel_workflow(wf.id, "enough") == 3
    assert [chain.get(j.id).state for j in wf.jobs] == ["cancelled"] * 3


def test_async_workflow(app: pgsched.App) -> None:
    @app.task
    def step() -> None: ...

    async def build() -> Any:
        async with app.workflow() as wf:
            a = wf.add("step")
            wf.add("step", depends_on=[a])
        await app.close_async()
        return wf

    wf = asyncio.run(build())
    assert [j.job.state for j in wf.jobs] == ["queued", "waiting"]


@pytest.mark.parametrize("first", ["finish", "retry"])
def test_retry_workflow_and_a_finishing_dependency_leave_no_job_waiting(
    dsn: str, conn: psycopg.Connection[Any], first: str
) -> None:
    """A dependency finishes while the workflow is retried, in either order: the retried job that
    depends on it ends queued, never waiting for a dependency that already succeeded."""
    dependency = conn.execute("SELECT id FROM pgsched.enqueue('t')").fetchone()[0]
    workflow = conn.execute("SELECT gen_random_uuid()").fetchone()[0]
    dependent = conn.execute(
        "SELECT id FROM pgsched.enqueue('t', depends_on => ARRAY[%s]::bigint[], workflow_id => %s)",
        (dependency, workflow),
    ).fetchone()[0]
    conn.execute("SELECT pgsched.cancel(%s)", (dependent,))
    finish = "UPDATE pgsched.jobs SET state = 'succeeded', finished_at = now() WHERE id = %s"
    statements = {"finish": (finish, (dependency,)), "retry": ("SELECT pgsched.retry_workflow(%s)", (workflow,))}
    second = "retry" if first == "finish" else "finish"
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as racer:
        holder.execute(*statements[first])  # its transaction stays open
        racer_pid = racer.info.backend_pid
        thread = threading.Thread(target=lambda: racer.execute(*statements[second]))
        thread.start()
        waiting = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s"
        wait_until(
            lambda: not thread.is_alive() or conn.execute(waiting, (racer_pid,)).fetchone()[0],
            message="the second transaction blocked on the first, or done",
        )
        holder.commit()
        thread.join(10)
        assert not thread.is_alive()
    assert states(conn) == {dependency: "succeeded", dependent: "queued"}
