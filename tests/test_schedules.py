"""Schedules and the materializer, driven with run_once and the test clock (no test waits for time)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

import pgsched
from pgsched import ValidationError, next_fire_times
from pgsched.leader.materializer import Materializer

from .conftest import row_counts
from .test_cli import pgsched as run_cli
from .test_cli import succeeded

pytestmark = pytest.mark.db
UTC = timezone.utc


@pytest.fixture
def sched(app: pgsched.App) -> pgsched.App:
    @app.task
    def tick(n: int = 0) -> None: ...

    return app


def materialize(dsn: str, now: datetime, service: Materializer | None = None) -> dict[str, int]:
    async def go() -> dict[str, int]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return (await (service or Materializer()).run_once(conn, now)).done

    return asyncio.run(go())


def slots(conn: psycopg.Connection[Any], name: str) -> list[datetime]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT j.slot FROM pgsched.jobs j JOIN pgsched.schedules s ON s.id = j.schedule_id WHERE s.name = %s ORDER BY j.slot",
            (name,),
        )
    ]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_a_slot_fires_once_and_the_timetable_advances(
    sched: pgsched.App, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    sched.add_schedule("hourly", "tick", cron="0 * * * *")
    t0 = at("2026-12-01T09:59:30+00:00")
    assert materialize(dsn, t0)["fired"] == 0  # starts: next_run_at = 10:00
    assert sched.get_schedule("hourly").next_run_at == at("2026-12-01T10:00:00+00:00")
    assert materialize(dsn, t0 + timedelta(seconds=40))["fired"] == 1
    assert materialize(dsn, t0 + timedelta(seconds=50))["fired"] == 0
    assert slots(conn, "hourly") == [at("2026-12-01T10:00:00+00:00")]
    schedule = sched.get_schedule("hourly")
    assert schedule.next_run_at == at("2026-12-01T11:00:00+00:00") and schedule.last_slot == at(
        "2026-12-01T10:00:00+00:00"
    )
    job = conn.execute("SELECT task, state, run_at FROM pgsched.jobs").fetchone()
    assert job == ("tick", "queued", at("2026-12-01T10:00:00+00:00"))


def test_dst_gap_and_repeated_hour_fire_once(sched: pgsched.App, dsn: str, conn: psycopg.Connection[Any]) -> None:
    # overlap=allow: nothing runs the jobs here, and the default (skip) would wait for them.
    sched.add_schedule("gap", "tick", cron="30 2 * * *", timezone="America/New_York", overlap="allow")
    sched.add_schedule("twice", "tick", cron="30 1 * * *", timezone="America/New_York", overlap="allow")
    now = at("2026-03-07T12:00:00+00:00")
    materialize(dsn, now)
    while now < at("2026-03-09T12:00:00+00:00"):  # a pass every 10 simulated minutes
        now += timedelta(minutes=10)
        materialize(dsn, now)
    assert at("2026-03-08T07:00:00+00:00") in slots(conn, "gap")  # 02:30 does not exist: 03:00 EDT
    assert Counter(s.date() for s in slots(conn, "gap"))[datetime(2026, 3, 8).date()] == 1
    conn.execute("UPDATE pgsched.schedules SET next_run_at = NULL")
    now = at("2026-10-31T12:00:00+00:00")
    materialize(dsn, now)
    while now < at("2026-11-02T12:00:00+00:00"):
        now += timedelta(minutes=10)
        materialize(dsn, now)
    november = [s for s in slots(conn, "twice") if s.month == 11]
    assert november == [at("2026-11-01T05:30:00+00:00"), at("2026-11-02T06:30:00+00:00")]  # not 06:30 on the 1st
    assert next_fire_times("30 1 * * *", "America/New_York", at("2026-10-31T12:00:00+00:00"), 2) == november


@pytest.mark.parametrize(
    ("misfire", "expected"),
    [("skip", 1), ("run_once", 1), ("catch_up", 5)],
)
def test_misfire_policies(
    sched: pgsched.App, dsn: str, conn: psycopg.Connection[Any], misfire: str, expected: int
) -> None:
    sched.add_schedule("m", "tick", cron="* * * * *", misfire=misfire, catch_up_window=timedelta(minutes=5))
    t0 = at("2026-12-01T10:00:30+00:00")
    materialize(dsn, t0)  # next: 10:01
    got = materialize(dsn, t0 + timedelta(minutes=10))  # the scheduler was down from 10:00:30 to 10:10:30
    assert got["fired"] == expected
    fired = slots(conn, "m")
    if misfire == "catch_up":
        assert fired == [at(f"2026-12-01T10:{m:02d}:00+00:00") for m in range(6, 11)]  # within 5 min of 10:10:30
    else:
        assert fired == [at("2026-12-01T10:10:00+00:00")]  # on time (skip) / the one catch-up run (run_once)
    assert sched.get_schedule("m").next_run_at == at("2026-12-01T10:11:00+00:00")


def test_skip_drops_every_missed_slot(sched: pgsched.App, dsn: str, conn: psycopg.Connection[Any]) -> None:
    sched.add_schedule("s", "tick", cron="0 * * * *", misfire="skip")
    t0 = at("2026-12-01T09:30:00+00:00")
    materialize(dsn, t0)
    assert materialize(dsn, t0 + timedelta(hours=3, minutes=10))["fired"] == 0  # 10:00, 11:00, 12:00 all missed
    assert sched.get_schedule("s").next_run_at == at("2026-12-01T13:00:00+00:00")


@pytest.mark.parametrize(
    ("overlap", "previous", "fired", "previous_after"),
    [
        ("allow", "running", 1, "running"),
        ("skip", "running", 0, "running"),
        ("queue_one", "running", 1, "running"),
        ("queue_one", "queued", 0, "queued"),
        ("cancel_previous", "queued", 1, "cancelled"),
    ],
)
def test_overlap_policies(
    sched: pgsched.App,
    dsn: str,
    conn: psycopg.Connection[Any],
    overlap: str,
    previous: str,
    fired: int,
    previous_after: str,
) -> None:
    sched.add_schedule("o", "tick", cron="* * * * *", overlap=overlap)
    t0 = at("2026-12-01T10:00:30+00:00")
    materialize(dsn, t0)
    assert materialize(dsn, t0 + timedelta(seconds=31))["fired"] == 1  # 10:01
    conn.execute(
        "UPDATE pgsched.jobs SET state = %s, worker_id = CASE WHEN %s = 'running' THEN gen_random_uuid() END",
        (previous, previous),
    )
    assert materialize(dsn, t0 + timedelta(seconds=91))["fired"] == fired  # 10:02, while 10:01 is still live
    first = conn.execute("SELECT state FROM pgsched.jobs ORDER BY slot LIMIT 1").fetchone()[0]
    assert first == previous_after


def test_pause_and_resume(sched: pgsched.App, dsn: str, conn: psycopg.Connection[Any]) -> None:
    sched.add_schedule("p", "tick", cron="* * * * *", misfire="skip")
    t0 = at("2026-12-01T10:00:30+00:00")
    materialize(dsn, t0)
    sched.pause_schedule("p")
    assert materialize(dsn, t0 + timedelta(minutes=5))["fired"] == 0
    sched.resume_schedule("p")
    assert materialize(dsn, t0 + timedelta(minutes=5, seconds=5))["fired"] == 1  # only the on-time 10:05, no replay
    assert slots(conn, "p") == [at("2026-12-01T10:05:00+00:00")]


def test_trigger_runs_now_without_touching_the_timetable(sched: pgsched.App, dsn: str) -> None:
    sched.add_schedule("t", "tick", cron="0 3 * * *", args={"n": 7})
    materialize(dsn, at("2026-12-01T10:00:00+00:00"))
    before = sched.get_schedule("t").next_run_at
    job = sched.trigger_schedule("t")
    assert (job.task, job.args, job.state, job.slot) == ("tick", {"n": 7}, "queued", None)
    assert sched.get_schedule("t").next_run_at == before
    assert sched.trigger_schedule("t").id != job.id  # each trigger is its own run


def test_jitter_delays_the_run_not_the_slot(sched: pgsched.App, dsn: str, conn: psycopg.Connection[Any]) -> None:
    sched.add_schedule("j", "tick", cron="* * * * *", jitter_seconds=30)
    t0 = at("2026-12-01T10:00:30+00:00")
    materialize(dsn, t0)
    materialize(dsn, t0 + timedelta(seconds=31))
    slot, run_at, state = conn.execute("SELECT slot, run_at, state FROM pgsched.jobs").fetchone()
    assert state == "scheduled"  # jittered into the future
    assert slot == at("2026-12-01T10:01:00+00:00")
    assert t0 + timedelta(seconds=31) <= run_at <= t0 + timedelta(seconds=61)


def test_start_and_end_dates(sched: pgsched.App, dsn: str, conn: psycopg.Connection[Any]) -> None:
    sched.add_schedule(
        "window",
        "tick",
        every=3600,
        overlap="allow",
        start_at=at("2026-12-01T12:00:00+00:00"),
        end_at=at("2026-12-01T14:30:00+00:00"),
    )
    now = at("2026-12-01T10:00:00+00:00")
    materialize(dsn, now)
    while now < at("2026-12-01T18:00:00+00:00"):
        now += timedelta(minutes=15)
        materialize(dsn, now)
    assert slots(conn, "window") == [at(f"2026-12-01T{h}:00:00+00:00") for h in (12, 13, 14)]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * *"}, "cron"),
        ({"cron": "*/0 * * * *"}, "cron"),
        ({"cron": "0 0 30 2 *"}, "cron"),
        ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"every": 0.5}, "every"),
        ({"cron": "0 * * * *", "every": 60}, "cron"),
        ({"cron": "0 * * * *", "misfire": "sometimes"}, "misfire"),
        ({"cron": "0 * * * *", "overlap": "maybe"}, "overlap"),
        ({"cron": "0 * * * *", "jitter_seconds": -1}, "jitter_seconds"),
        (
            {
                "cron": "0 * * * *",
                "start_at": at("2026-12-02T00:00:00+00:00"),
                "end_at": at("2026-12-01T00:00:00+00:00"),
            },
            "end_at",
        ),
    ],
)
def test_bad_schedules_are_refused_and_write_nothing(
    sched: pgsched.App, conn: psycopg.Connection[Any], fields: dict[str, Any], field: str
) -> None:
    sched.open()  # registering the app's tasks is not the bad input's doing
    before = row_counts(conn)
    with pytest.raises(ValidationError) as caught:
        sched.add_schedule("bad", "tick", **fields)
    assert caught.value.field == field
    with pytest.raises(ValidationError) as unknown:
        sched.add_schedule("bad", "no_such_task", cron="0 * * * *")
    assert unknown.value.field == "task"
    assert row_counts(conn) == before


def test_schedules_defined_in_code_are_synced(dsn: str, conn: psycopg.Connection[Any]) -> None:
    def app_with(*names: str, cron: str = "0 9 * * *") -> pgsched.App:
        app = pgsched.App(dsn, name="reports-app")
        for name in names:
            app.periodic(cron=cron, timezone="Europe/Paris", name=name)(lambda: None)
        return app

    for app in (app_with("daily-a", "daily-b"), app_with("daily-a", cron="0 10 * * *")):
        app.open()
        app.close()
    rows = conn.execute("SELECT name, cron, enabled FROM pgsched.schedules ORDER BY name").fetchall()
    assert rows == [("daily-a", "0 10 * * *", True), ("daily-b", "0 9 * * *", False)]  # updated; removed: disabled


def test_interval_schedules_defined_in_code(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = pgsched.App(dsn)

    @app.periodic(every=timedelta(seconds=30), name="poll-feed", overlap="allow")
    def poll_feed() -> None: ...

    app.open()
    now = conn.execute("SELECT now()").fetchone()[0]
    materialize(dsn, now)
    for step in range(1, 7):
        materialize(dsn, now + timedelta(seconds=10 * step))
    assert len(slots(conn, "poll-feed")) == 2  # 60 s of 30-second slots
    app.close()


def test_three_schedulers_without_the_lock_never_duplicate_or_miss(
    sched: pgsched.App, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    sched.add_schedule("every-10s", "tick", every=10, overlap="allow")
    sched.add_schedule("every-minute", "tick", cron="* * * * *", overlap="allow")
    sched.add_schedule("quarter", "tick", cron="*/15 * * * * *", overlap="allow")  # seconds field
    start = conn.execute("SELECT now()").fetchone()[0]
    services = [Materializer() for _ in range(3)]
    for service in services:
        service.use_lock = False  # three leaders at once: only the unique slot key and CAS protect

    async def simulate() -> None:
        conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in services]
        now = start
        for _ in range(5 * 60 // 3):  # five simulated minutes, a pass every 3 s on every scheduler
            await asyncio.gather(*(s.run_once(c, now) for s, c in zip(services, conns, strict=True)))
            now += timedelta(seconds=3)
        for c in conns:
            await c.close()

    asyncio.run(simulate())
    end = start + timedelta(seconds=3 * (5 * 60 // 3 - 1))
    for name in ("every-10s", "every-minute", "quarter"):
        got = slots(conn, name)
        assert len(got) == len(set(got)), f"{name}: duplicate slots"
        schedule = sched.get_schedule(name)
        first = got[0]
        expected = [first]
        while True:
            following = (
                next_fire_times(schedule.cron, "UTC", expected[-1], 1)[0]
                if schedule.cron
                else expected[-1] + schedule.every
            )
            if following > end:
                break
            expected.append(following)
        assert got == expected, f"{name}: missing slots"
        assert len(got) >= 4


def test_a_schedule_inserted_by_plain_sql_fires(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO pgsched.schedules (name, task, cron, timezone, args) VALUES ('sql-made', 'tick', '*/5 * * * *', 'Asia/Kolkata', '{\"n\": 1}')"
    )
    t0 = at("2026-12-01T10:01:00+00:00")
    materialize(dsn, t0)  # 10:05 UTC is 15:35 in Kolkata: */5 matches there too
    assert materialize(dsn, t0 + timedelta(minutes=4, seconds=1))["fired"] == 1
    assert slots(conn, "sql-made") == [at("2026-12-01T10:05:00+00:00")]
    assert conn.execute("SELECT args FROM pgsched.jobs").fetchone()[0] == {"n": 1}


def test_a_broken_sql_schedule_is_skipped_not_fatal(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.schedules (name, task, cron) VALUES ('broken', 'tick', 'not a cron')")
    conn.execute("INSERT INTO pgsched.schedules (name, task, every) VALUES ('fine', 'tick', '1 minute')")
    now = conn.execute("SELECT now()").fetchone()[0]
    materialize(dsn, now)
    assert materialize(dsn, now + timedelta(minutes=1, seconds=1))["fired"] == 1  # the good one still fires


@pytest.mark.parametrize(("misfire", "expected"), [("catch_up", 999), ("run_once", 1), ("skip", 1)])
def test_far_behind_the_policies_see_the_latest_slots(misfire: str, expected: int) -> None:
    from pgsched.leader.materializer import plan
    from pgsched.schedules import build

    now = at("2026-12-01T12:00:00+00:00")
    schedule = build(name="s", task="t", every=1, misfire=misfire, catch_up_window=timedelta(minutes=30))
    schedule.next_run_at = now - timedelta(hours=1)  # 3,600 one-second slots behind
    fire, following, _ = plan(schedule, now, now - timedelta(days=1), [])
    # catch_up: its 30-minute window holds 1,800 slots, more than one pass fires: the most recent ones.
    assert len(fire) == expected and fire[-1] == now and following == now + timedelta(seconds=1)


def test_add_schedule_takes_the_tasks_defaults(app: pgsched.App) -> None:
    @app.task(queue="reports", priority=4, max_attempts=2, timeout=30)
    def report() -> None: ...

    schedule = app.add_schedule("r", "report", cron="0 6 * * *")
    assert (schedule.queue, schedule.priority, schedule.max_attempts, schedule.timeout) == ("reports", 4, 2, 30.0)
    assert app.add_schedule("r", "report", cron="0 6 * * *", queue="other").queue == "other"


def test_only_command_roles_may_schedule_shell_jobs(dsn: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("CREATE ROLE pgs_sched_worker_test LOGIN IN ROLE pgsched_worker")
    try:
        with psycopg.connect(dsn, user="pgs_sched_worker_test", autocommit=True) as worker:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                worker.execute(
                    "INSERT INTO pgsched.schedules (name, task, cron, args) VALUES ('x', 'shell', '* * * * *', '{\"cmd\": [\"id\"]}')"
                )
            worker.execute("INSERT INTO pgsched.schedules (name, task, cron) VALUES ('fine', 'tick', '* * * * *')")
    finally:
        conn.execute("DROP OWNED BY pgs_sched_worker_test")
        conn.execute("DROP ROLE pgs_sched_worker_test")


def test_a_schedule_that_cannot_be_evaluated_is_marked_once_and_the_others_stay_on_time(
    sched: pgsched.App, dsn: str, conn: psycopg.Connection[Any], cli_env: dict[str, str], caplog: Any
) -> None:
    sched.add_schedule("hourly", "tick", cron="0 * * * *", overlap="allow")
    t0 = at("2026-12-01T09:59:30+00:00")
    materialize(dsn, t0)  # hourly starts: next_run_at = 10:00
    # Rows pgsched cannot read, written by plain SQL (a zone removed from the system looks the same).
    conn.execute(
        "INSERT INTO pgsched.schedules (name, task, cron, timezone) "
        "SELECT 'bad-cron-' || i, 'tick', 'every day at noon', 'UTC' FROM generate_series(1, 10) AS i"
    )
    conn.execute(
        "INSERT INTO pgsched.schedules (name, task, cron, timezone) VALUES ('bad-zone', 'tick', '0 * * * *', 'Mars/Olympus')"
    )
    with caplog.at_level(logging.WARNING, logger="pgsched.materializer"):
        passes = [materialize(dsn, t0 + timedelta(seconds=s)) for s in (40, 50, 3640)]
    assert [p["invalid"] for p in passes] == [11, 0, 0], passes
    warned = Counter(r.args[0] for r in caplog.records if r.name == "pgsched.materializer")  # type: ignore[index]
    assert len(warned) == 11 and set(warned.values()) == {1}  # once each, not every pass
    assert slots(conn, "hourly") == [at("2026-12-01T10:00:00+00:00"), at("2026-12-01T11:00:00+00:00")], passes
    # Visible where people look.
    listed = {s["name"]: s for s in json.loads(succeeded(run_cli(cli_env, "schedules", "list", "--json")).stdout)}
    assert "Mars/Olympus" in listed["bad-zone"]["invalid_reason"] and "timezone" in listed["bad-zone"]["invalid_reason"]
    assert listed["bad-cron-1"]["invalid_reason"].startswith("cron:") and listed["hourly"]["invalid_reason"] is None
    table = succeeded(run_cli(cli_env, "schedules", "list")).stdout
    assert "unknown time zone 'Mars/Olympus'" in table
    # Writing it again (fixed) clears the mark, and it runs from the next pass on.
    sched.add_schedule("bad-zone", "tick", cron="0 * * * *", timezone="Europe/Paris")
    assert sched.get_schedule("bad-zone").invalid_reason is None
    materialize(dsn, t0 + timedelta(seconds=3650))
    assert sched.get_schedule("bad-zone").next_run_at == at("2026-12-01T12:00:00+00:00")
