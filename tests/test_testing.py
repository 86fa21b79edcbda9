"""pgsched.testing, the kit users test their tasks with: the Kit on this suite's database, and the
pytest plugin run through pytester on user-style test modules (the docs' example among them)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgsched
from pgsched import Backoff, Cancel, Snooze, ValidationError
from pgsched.testing import Drained, Kit

from .test_readme import DOCS, readme_blocks

pytestmark = pytest.mark.db

EXAMPLE = Path(__file__).resolve().parent / "user_example"


@pytest.fixture
def kit(app: pgsched.App, dsn: str) -> Any:
    """A kit on this test's database, with the tasks these tests use."""

    @app.task(queue="mail", max_attempts=2, backoff=Backoff.fixed(30, jitter=0))
    def flaky(fail: bool = True, extra: dict[str, int] | None = None) -> str:
        if fail:
            raise ConnectionError("down")
        return "sent"

    @app.task
    def outcome(kind: str) -> None:
        if kind == "cancel":
            raise Cancel("not needed")
        if kind == "snooze":
            raise Snooze(600)

    testing_kit = Kit(app, dsn)
    testing_kit.reset()
    yield testing_kit
    testing_kit.close()


def test_drain_runs_the_jobs_and_counts_each_outcome(kit: Kit) -> None:
    for kind in ("ok", "cancel", "snooze"):
        kit.app.enqueue("outcome", {"kind": kind})
    kit.app.enqueue("flaky", {"fail": False})
    kit.app.enqueue("flaky")
    kit.app.enqueue("flaky", max_attempts=1)
    assert kit.drain() == Drained(succeeded=2, failed=1, retried=1, cancelled=1, snoozed=1)
    assert kit.enqueued_jobs() == [kit.app.get(3), kit.app.get(5)]  # the snoozed and the retried ones
    assert kit.drain() == Drained()


def test_retries_are_drained_once_the_clock_passes_their_backoff(kit: Kit) -> None:
    job = kit.app.enqueue("flaky")
    assert kit.drain() == Drained(retried=1)
    kit.clock.advance(seconds=29)
    assert kit.drain() == Drained()  # 1 s to go
    kit.clock.advance(seconds=2)
    assert kit.drain() == Drained(failed=1)
    assert (kit.app.get(job.id).state, kit.app.get(job.id).attempts) == ("failed", 2)


def test_drain_with_until_empty_false_leaves_due_retries_for_later(kit: Kit) -> None:
    kit.app.enqueue("flaky")
    kit.clock.advance(hours=1)
    assert kit.drain(until_empty=False) == Drained(retried=1)
    kit.clock.advance(seconds=31)
    assert kit.drain("mail", until_empty=False) == Drained()  # not promoted: no scheduler pass
    assert kit.drain("mail") == Drained(failed=1)


def test_drain_runs_released_dependents_in_the_same_drain(kit: Kit) -> None:
    first = kit.app.enqueue("outcome", {"kind": "ok"})
    kit.app.enqueue("flaky", {"fail": False}, depends_on=[first])
    assert kit.drain() == Drained(succeeded=2)


def test_the_clock_moves_delays_and_every_new_connection(kit: Kit, dsn: str) -> None:
    job = kit.app.enqueue("outcome", {"kind": "ok"}, delay=timedelta(days=2))
    assert kit.drain() == Drained()
    before = kit.clock.now()
    after = kit.clock.advance(timedelta(days=1), hours=23, minutes=59, seconds=59)
    assert timedelta(days=1, hours=23, minutes=59, seconds=59) <= after - before < timedelta(days=2)
    with psycopg.connect(dsn) as other:  # any connection opened now, not only the kit's
        offset = other.execute("SELECT pgsched.now() - now()").fetchone()[0]
    assert offset == kit.clock.offset
    assert kit.drain() == Drained()
    kit.clock.advance(seconds=1)
    assert kit.drain() == Drained(succeeded=1)
    assert kit.app.get(job.id).state == "succeeded"

    moment = datetime(2031, 5, 4, 12, 0, tzinfo=UTC)
    assert moment <= kit.clock.set(moment) < moment + timedelta(seconds=5)
    kit.clock.reset()
    with psycopg.connect(dsn) as other:
        assert other.execute("SELECT pgsched.now() = now()").fetchone()[0]


def test_the_clock_fires_schedules_with_run_scheduler(kit: Kit) -> None:
    kit.app.add_schedule("nightly", "outcome", args={"kind": "ok"}, cron="0 3 * * *")
    kit.clock.set(datetime(2030, 1, 1, 2, 59, 30, tzinfo=UTC))
    assert kit.run_scheduler()["fired"] == 0  # the schedule starts: its next slot is 03:00
    kit.clock.advance(minutes=1)
    assert kit.run_scheduler()["fired"] == 1
    job = kit.assert_enqueued(task="outcome", state="queued")
    assert job.slot == datetime(2030, 1, 1, 3, 0, tzinfo=UTC)
    assert kit.drain() == Drained(succeeded=1)


def test_assert_and_refute_enqueued_match_given_fields_and_args_as_a_subset(kit: Kit) -> None:
    kit.app.enqueue("flaky", {"fail": True, "extra": {"a": 1, "b": 2}}, priority=5, max_attempts=1)
    job = kit.assert_enqueued(task="flaky", args={"extra": {"a": 1}}, queue="mail", priority=5)
    assert kit.enqueued_jobs(task=kit.app.tasks["flaky"]) == [job]
    kit.refute_enqueued(task="flaky", args={"extra": {"a": 2}})
    kit.refute_enqueued(task="flaky", state="succeeded")

    with pytest.raises(AssertionError) as missing:
        kit.assert_enqueued(task="flaky", priority=9)
    assert str(missing.value) == (
        "expected a job (waiting/scheduled/queued) with task='flaky', priority=9; found 1 job(s) instead:\n"
        "  job 1: task='flaky' queue='mail' priority=5 state='queued' args={'fail': True, 'extra': {'a': 1, 'b': 2}}"
    )
    with pytest.raises(
        AssertionError, match=r"^expected no job \(waiting/scheduled/queued\) with task='flaky'; found 1"
    ):
        kit.refute_enqueued(task="flaky")
    assert kit.drain() == Drained(failed=1)
    with pytest.raises(AssertionError, match="found no enqueued job at all"):
        kit.assert_enqueued(task="outcome")


def test_bad_input_names_the_field(kit: Kit) -> None:
    for call, field in [
        (lambda: kit.assert_enqueued(tsk="flaky"), "tsk"),  # did you mean 'task'?
        (lambda: kit.enqueued_jobs(args=["fail"]), "args"),
        (lambda: kit.refute_enqueued(state="done"), "state"),
        (lambda: kit.clock.advance(minute=5), "minute"),
        (lambda: kit.clock.set(datetime(2030, 1, 1)), "when"),  # naive
    ]:
        with pytest.raises(ValidationError) as error:
            call()
        assert error.value.field == field
    with pytest.raises(ValidationError, match="did you mean 'task'"):
        kit.assert_enqueued(tsk="flaky")


def test_drain_async_runs_in_the_callers_loop_and_drain_refuses_it(kit: Kit) -> None:
    async def scenario() -> Drained:
        await kit.app.enqueue_async("outcome", {"kind": "ok"})
        with pytest.raises(RuntimeError, match="use `await drain_async"):
            kit.drain()
        return await kit.drain_async()

    assert asyncio.run(scenario()) == Drained(succeeded=1)


# -- the plugin, as users run it -------------------------------------------------------------------


def run_example(pytester: pytest.Pytester, dsn: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        str(EXAMPLE), "-c", str(EXAMPLE / "pyproject.toml"), f"--pgsched-dsn={dsn}", "-p", "no:cacheprovider", *args
    )


def test_the_readme_example_passes_through_the_plugin(pytester: pytest.Pytester, dsn: str) -> None:
    result = run_example(pytester, dsn, "-v")
    result.assert_outcomes(passed=6)


def test_the_docs_show_the_example_files_as_they_are() -> None:
    shown = [block.body for block in readme_blocks((DOCS / "testing-your-tasks.md").read_text(encoding="utf-8"))]
    for name in ("pyproject.toml", "example_tasks.py", "test_example_tasks.py"):
        assert (EXAMPLE / name).read_text(encoding="utf-8") in shown, f"docs/testing-your-tasks.md shows another {name}"


def test_failures_list_what_was_found_and_the_plugin_needs_its_settings(
    pytester: pytest.Pytester, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\npgsched_app = tasks:app\npythonpath = .\n")
    pytester.makepyfile(
        tasks="import pgsched\napp = pgsched.App()\n\n@app.task\ndef ping(n: int) -> int:\n    return n\n",
        test_user="""
from tasks import ping

def test_missing(assert_enqueued):
    ping.enqueue(n=1)
    assert_enqueued(task="ping", args={"n": 2})

def test_unrelated():
    assert True
""",
    )
    result = pytester.runpytest_subprocess(f"--pgsched-dsn={dsn}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: expected a job (waiting/scheduled/queued) with task='ping', args ⊇ {'n': 2}; "
            "found 1 job(s) instead:",
            "*job 1: task='ping' queue='default' priority=0 state='queued' args={'n': 1}",
        ]
    )

    for name in ("PGSCHED_TEST_DSN", "PGSCHED_DSN", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    no_database = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    no_database.assert_outcomes(passed=1, errors=1)  # the test without fixtures does not need one
    no_database.stdout.fnmatch_lines(["*pgsched.testing needs a test database: give --pgsched-dsn*"])


def test_the_plugin_refuses_a_database_without_test_in_its_name(pytester: pytest.Pytester, server: Any) -> None:
    pytester.makepyfile("def test_it(pgsched_dsn):\n    pass\n")
    result = pytester.runpytest_subprocess(f"--pgsched-dsn={server.dsn('postgres')}", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*empties the pgsched tables*has no 'test' in its name*"])


def test_under_xdist_each_worker_gets_a_database_of_its_own(
    pytester: pytest.Pytester, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    name = conn.execute("SELECT current_database()").fetchone()[0]
    try:
        run_example(pytester, dsn, "-n", "2").assert_outcomes(passed=6)
        created = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (f"{name}_gw%",))
        assert [row[0] for row in created.fetchall()] == [f"{name}_gw0", f"{name}_gw1"]
    finally:
        for worker in ("gw0", "gw1"):
            conn.execute(
                psycopg.sql.SQL("DROP DATABASE IF EXISTS {}").format(psycopg.sql.Identifier(f"{name}_{worker}"))
            )
