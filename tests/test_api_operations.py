"""Queues (queue_stats, pause, resume), workers and the task catalog over the API."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from .conftest import worker_incarnation
from .test_api import error

pytestmark = pytest.mark.db


def test_queues_list_pause_and_resume_with_audit(
    client: Any, as_user: Any, app: Any, conn: psycopg.Connection[Any]
) -> None:
    app.enqueue("noop", owner="alice", queue="reports")
    app.enqueue("noop", owner="bob", queue="reports")
    stats = {q["queue"]: q for q in client.get("/api/v1/queues", headers=as_user("ops")).json()}
    assert stats["reports"]["queued"] == 2 and stats["reports"]["paused"] is False

    paused = client.post("/api/v1/queues/reports/pause", headers=as_user("ops"))
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert conn.execute("SELECT paused FROM pgsched.queues WHERE name = 'reports'").fetchone() == (True,)
    assert client.get("/api/v1/queues", headers=as_user("root")).json()[-1]["paused"] is True
    resumed = client.post("/api/v1/queues/reports/resume", headers=as_user("root"))
    assert resumed.json()["paused"] is False
    assert conn.execute(
        "SELECT actor, action, target_id, before ->> 'paused', after ->> 'paused' FROM pgsched.audit_log"
        " WHERE target_type = 'queue' ORDER BY id"
    ).fetchall() == [
        ("ops", "queue.pause", "reports", "false", "true"),
        ("root", "queue.resume", "reports", "true", "false"),
    ]

    unknown = client.post("/api/v1/queues/reprots/pause", headers=as_user("ops"))
    assert unknown.status_code == 422 and error(unknown)["field"] == "name"
    assert "did you mean 'reports'" in error(unknown)["message"]
    # Members see no queue counts: they would count other owners' jobs.
    assert client.get("/api/v1/queues", headers=as_user("alice")).status_code == 403
    assert client.post("/api/v1/queues/reports/pause", headers=as_user("alice")).status_code == 403
    assert conn.execute("SELECT paused FROM pgsched.queues WHERE name = 'reports'").fetchone() == (False,)


def test_workers_list(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    live = worker_incarnation(conn, "1 minute")
    dead = worker_incarnation(conn, "-1 minute")
    listed = {w["id"]: w for w in client.get("/api/v1/workers", headers=as_user("ops")).json()}
    assert set(listed) == {str(live), str(dead)}
    assert listed[str(live)]["stale"] is False and listed[str(dead)]["stale"] is True
    assert listed[str(live)]["queues"] == ["default"]


def test_task_catalog(client: Any, as_user: Any, app: Any) -> None:
    @app.task(queue="reports", max_attempts=3)
    def send_report(day: str, dry_run: bool = False) -> None:
        """Build and send the report of one day."""

    app.open()  # writes the catalog
    catalog = {t["name"]: t for t in client.get("/api/v1/tasks", headers=as_user("vera")).json()}
    assert set(catalog) == {"noop", "report", "send_report"}
    report = catalog["send_report"]
    assert report["queue"] == "reports" and report["options"]["max_attempts"] == 3
    assert report["description"] == "Build and send the report of one day."
    assert [(p["name"], p["required"]) for p in report["parameters"]] == [("day", True), ("dry_run", False)]


def test_schedules_create_and_list_per_owner(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    created = client.post(
        "/api/v1/schedules",
        json={"name": "nightly", "task": "report", "cron": "30 2 * * *", "timezone": "Europe/Paris"},
        headers=as_user("alice"),
    )
    assert created.status_code == 201
    body = created.json()
    assert (body["owner"], body["cron"], body["timezone"], body["source"]) == (
        "alice",
        "30 2 * * *",
        "Europe/Paris",
        "api",
    )
    assert conn.execute("SELECT owner, source FROM pgsched.schedules WHERE name = 'nightly'").fetchone() == (
        "alice",
        "api",
    )
    every = client.post("/api/v1/schedules", json={"name": "poll", "task": "noop", "every": 30}, headers=as_user("bob"))
    assert every.status_code == 201 and every.json()["every"] == "PT30S"

    assert [s["name"] for s in client.get("/api/v1/schedules", headers=as_user("alice")).json()] == ["nightly"]
    assert [s["name"] for s in client.get("/api/v1/schedules", headers=as_user("bob")).json()] == ["poll"]
    assert [s["name"] for s in client.get("/api/v1/schedules", headers=as_user("ops")).json()] == ["nightly", "poll"]

    # Names are unique across owners: bob cannot take (or replace) alice's schedule.
    taken = client.post(
        "/api/v1/schedules", json={"name": "nightly", "task": "noop", "every": 5}, headers=as_user("bob")
    )
    assert taken.status_code == 409 and error(taken)["field"] == "name"
    mine = client.post(
        "/api/v1/schedules", json={"name": "nightly", "task": "noop", "every": 5}, headers=as_user("alice")
    )
    assert mine.status_code == 409
    assert conn.execute("SELECT owner, task, cron FROM pgsched.schedules WHERE name = 'nightly'").fetchone() == (
        "alice",
        "report",
        "30 2 * * *",
    )
    # The library's validation, field by field; the owner is the server's.
    for body, field in (
        ({"name": "bad", "task": "noop", "cron": "61 * * * *"}, "cron"),
        ({"name": "bad", "task": "noop", "cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"name": "bad", "task": "noop"}, "cron"),
        ({"name": "bad", "task": "nope", "every": 5}, "task"),
        ({"name": "bad", "task": "noop", "every": 5, "owner": "bob"}, "owner"),
    ):
        response = client.post("/api/v1/schedules", json=body, headers=as_user("alice"))
        assert response.status_code == 422 and error(response)["field"] == field, (body, response.json())
    assert (
        client.post(
            "/api/v1/schedules", json={"name": "v", "task": "noop", "every": 5}, headers=as_user("vera")
        ).status_code
        == 403
    )
    assert conn.execute("SELECT count(*) FROM pgsched.schedules").fetchone() == (2,)
    assert conn.execute(
        "SELECT actor, action FROM pgsched.audit_log WHERE target_type = 'schedule' ORDER BY id"
    ).fetchall() == [("alice", "schedule.create"), ("bob", "schedule.create")]


def test_schedule_row_level_security_holds_alone(
    api_dsn: str, client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    client.post("/api/v1/schedules", json={"name": "a", "task": "noop", "every": 60}, headers=as_user("alice"))
    with psycopg.connect(api_dsn) as api:
        api.execute("SELECT set_config('pgsched.owner', 'bob', true), set_config('pgsched.role', 'member', true)")
        assert api.execute("SELECT count(*) FROM pgsched.schedules").fetchone() == (0,)
        assert api.execute("UPDATE pgsched.schedules SET paused = true").rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # a schedule for another owner
            api.execute(
                "INSERT INTO pgsched.schedules (name, task, every, owner) VALUES ('b', 'noop', '1 minute', 'alice')"
            )
    assert conn.execute("SELECT name, owner, paused FROM pgsched.schedules").fetchall() == [("a", "alice", False)]


def test_schedule_show_pause_resume_delete(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    body = {"name": "nightly", "task": "report", "cron": "30 2 * * *", "timezone": "America/New_York"}
    client.post("/api/v1/schedules", json=body, headers=as_user("alice"))
    shown = client.get("/api/v1/schedules/nightly", headers=as_user("alice")).json()
    assert shown["schedule"]["owner"] == "alice" and len(shown["next"]) == 5
    utc = [s["utc"] for s in shown["next"]]
    assert utc == sorted(utc) and all(s["local"].endswith(("-05:00", "-04:00")) for s in shown["next"])
    assert all(s["local"][11:16] == "02:30" for s in shown["next"])
    assert client.get("/api/v1/schedules/nightly", headers=as_user("bob")).status_code == 404

    paused = client.post("/api/v1/schedules/nightly/pause", headers=as_user("alice"))
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert client.post("/api/v1/schedules/nightly/resume", headers=as_user("bob")).status_code == 404
    assert conn.execute("SELECT paused FROM pgsched.schedules WHERE name = 'nightly'").fetchone() == (True,)
    assert client.post("/api/v1/schedules/nightly/resume", headers=as_user("ops")).json()["paused"] is False
    assert client.delete("/api/v1/schedules/nightly", headers=as_user("bob")).status_code == 404
    assert client.delete("/api/v1/schedules/nightly", headers=as_user("vera")).status_code == 403
    assert client.delete("/api/v1/schedules/nightly", headers=as_user("alice")).status_code == 204
    assert conn.execute("SELECT count(*) FROM pgsched.schedules").fetchone() == (0,)
    assert client.get("/api/v1/schedules/nightly", headers=as_user("alice")).status_code == 404
    assert conn.execute(
        "SELECT actor, action FROM pgsched.audit_log WHERE target_type = 'schedule' ORDER BY id"
    ).fetchall() == [
        ("alice", "schedule.create"),
        ("alice", "schedule.pause"),
        ("ops", "schedule.resume"),
        ("alice", "schedule.delete"),
    ]


def test_cron_preview_marks_dst_changes(client: Any, as_user: Any) -> None:
    params = {"cron": "0 12 * * 0", "timezone": "Europe/Paris", "n": 60}
    slots = client.get("/api/v1/schedules/preview", params=params, headers=as_user("vera")).json()
    assert len(slots) == 60 and all(s["local"][11:16] == "12:00" for s in slots)
    # Over 60 weeks Paris changes its offset twice or three times; each change is marked on the first slot after it.
    changes = [i for i, s in enumerate(slots) if s["offset_changed"]]
    assert 2 <= len(changes) <= 3
    for i in changes:
        assert slots[i]["local"][-6:] != slots[i - 1]["local"][-6:]
    bad = client.get("/api/v1/schedules/preview", params={"cron": "61 * * * *"}, headers=as_user("vera"))
    assert bad.status_code == 422 and error(bad)["field"] == "cron"
    bad = client.get(
        "/api/v1/schedules/preview", params={"cron": "* * * * *", "timezone": "Nowhere/City"}, headers=as_user("vera")
    )
    assert bad.status_code == 422 and error(bad)["field"] == "timezone"


def test_queue_controls_through_the_librarys_checks(
    client: Any, as_user: Any, app: Any, conn: psycopg.Connection[Any]
) -> None:
    app.enqueue("noop", queue="reports")
    changed = client.patch(
        "/api/v1/queues/reports", json={"max_running": 2, "rate": "10/minute"}, headers=as_user("ops")
    )
    assert changed.status_code == 200
    assert (changed.json()["max_running"], changed.json()["rate"], changed.json()["fair"]) == (2, "10/minute", False)
    cleared = client.patch("/api/v1/queues/reports", json={"rate": None, "fair": True}, headers=as_user("ops")).json()
    assert (cleared["max_running"], cleared["rate"], cleared["fair"]) == (2, None, True)  # max_running stays
    assert app.queue_settings("reports").fair is True
    for body, field in (({"max_running": 0}, "max_running"), ({"rate": "lots"}, "rate"), ({"paused": True}, "paused")):
        response = client.patch("/api/v1/queues/reports", json=body, headers=as_user("ops"))
        assert response.status_code == 422 and error(response)["field"] == field, response.json()
    assert client.patch("/api/v1/queues/reports", json={"max_running": 1}, headers=as_user("alice")).status_code == 403
    assert app.queue_settings("reports").max_running == 2
    assert conn.execute(
        "SELECT after ->> 'max_running', after ->> 'rate' FROM pgsched.audit_log WHERE action = 'queue.configure' ORDER BY id"
    ).fetchall() == [("2", "10/minute"), ("2", None)]


def test_schedule_update_and_trigger(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    body = {"name": "nightly", "task": "report", "cron": "30 2 * * *", "args": {"day": "today"}, "priority": 3}
    client.post("/api/v1/schedules", json=body, headers=as_user("alice"))
    client.post("/api/v1/schedules/nightly/pause", headers=as_user("alice"))
    changed = client.patch("/api/v1/schedules/nightly", json={"every": 3600, "priority": 5}, headers=as_user("alice"))
    assert changed.status_code == 200, changed.json()
    schedule = changed.json()
    assert (schedule["cron"], schedule["every"], schedule["priority"], schedule["args"]) == (
        None,
        "PT3600S",
        5,
        {"day": "today"},
    )
    assert (schedule["owner"], schedule["task"], schedule["paused"]) == ("alice", "report", True)  # kept
    bad = client.patch("/api/v1/schedules/nightly", json={"cron": "99 * * * *"}, headers=as_user("alice"))
    assert bad.status_code == 422 and error(bad)["field"] == "cron"
    renamed = client.patch("/api/v1/schedules/nightly", json={"owner": "bob"}, headers=as_user("alice"))
    assert renamed.status_code == 422 and error(renamed)["field"] == "owner"
    assert client.patch("/api/v1/schedules/nightly", json={"priority": 1}, headers=as_user("bob")).status_code == 404
    assert conn.execute("SELECT priority, owner FROM pgsched.schedules").fetchone() == (5, "alice")

    triggered = client.post("/api/v1/schedules/nightly/trigger", headers=as_user("alice"))
    assert triggered.status_code == 201
    job = triggered.json()
    assert (job["task"], job["args"], job["owner"], job["priority"]) == ("report", {"day": "today"}, "alice", 5)
    assert conn.execute(
        "SELECT s.name FROM pgsched.jobs j JOIN pgsched.schedules s ON s.id = j.schedule_id"
    ).fetchone() == ("nightly",)
    assert client.post("/api/v1/schedules/nightly/trigger", headers=as_user("bob")).status_code == 404
    assert conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone() == (1,)
    assert conn.execute(
        "SELECT action FROM pgsched.audit_log WHERE target_type = 'schedule' ORDER BY id"
    ).fetchall() == [("schedule.create",), ("schedule.pause",), ("schedule.update",), ("schedule.trigger",)]


def test_a_nul_character_is_a_422_and_changes_nothing(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    """PostgreSQL cannot store a NUL in a text: the schema-driven fuzz run found a 500 for it on
    two routes. It is the request's fault: 422, and nothing is written."""
    before = conn.execute(
        "SELECT (SELECT count(*) FROM pgsched.schedules), (SELECT count(*) FROM pgsched.jobs)"
    ).fetchone()
    created = client.post(
        "/api/v1/schedules", json={"name": "n", "task": "no\x00op", "every": 60}, headers=as_user("alice")
    )
    assert created.status_code == 422 and "NUL" in created.json()["error"]["message"], created.text
    job = client.post("/api/v1/jobs", json={"task": "noop", "args": {"a": "x\x00y"}}, headers=as_user("alice"))
    assert job.status_code == 422, job.text
    assert (
        conn.execute("SELECT (SELECT count(*) FROM pgsched.schedules), (SELECT count(*) FROM pgsched.jobs)").fetchone()
        == before
    )
