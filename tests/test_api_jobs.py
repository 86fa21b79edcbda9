"""``/api/v1/jobs`` on the real app and database: creation through the library's rules, mass
assignment refused, ownership (404, never in lists) held by the owner filter and by row-level
security, cursor pagination, cancel and retry, idempotency keys, and an audit row per change."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from .conftest import row_counts, worker_incarnation
from .test_api import error

pytestmark = pytest.mark.db


def create(client: Any, headers: dict[str, str], **body: Any) -> Any:
    return client.post("/api/v1/jobs", json={"task": "noop", **body}, headers=headers)


def audit_rows(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT actor, action, target_id, before ->> 'state', after ->> 'state' FROM pgsched.audit_log"
        " WHERE target_type = 'job' ORDER BY id"
    ).fetchall()


def test_create_a_job_owned_by_the_caller_with_an_audit_row(
    client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    response = create(client, as_user("alice"), args={"day": "2026-11-22"}, queue="reports", priority=5)
    assert response.status_code == 201
    job = response.json()
    assert (job["task"], job["args"], job["queue"], job["priority"], job["owner"], job["state"]) == (
        "noop",
        {"day": "2026-11-22"},
        "reports",
        5,
        "alice",
        "queued",
    )
    row = conn.execute("SELECT owner, queue, priority FROM pgsched.jobs WHERE id = %s", (job["id"],)).fetchone()
    assert row == ("alice", "reports", 5)
    assert audit_rows(conn) == [("alice", "job.create", str(job["id"]), None, "queued")]
    # args are not copied into the audit log (they may hold secrets)
    assert conn.execute("SELECT after ? 'args' FROM pgsched.audit_log").fetchone() == (False,)
    delayed = create(client, as_user("alice"), delay=3600).json()
    assert delayed["state"] == "scheduled"


@pytest.mark.parametrize("field", ["owner", "state", "attempts", "worker_id", "result"])
def test_mass_assignment_is_refused_naming_the_field(
    client: Any, as_user: Any, conn: psycopg.Connection[Any], field: str
) -> None:
    before = row_counts(conn)
    response = create(client, as_user("alice"), **{field: "bob" if field == "owner" else 1})
    assert response.status_code == 422
    assert error(response)["field"] == field
    assert "set by the server" in error(response)["message"]
    assert row_counts(conn) == before


def test_library_validation_becomes_422_with_its_field_and_nothing_is_written(
    client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    before = row_counts(conn)
    cases = [
        ({"task": "nope"}, "task", "noop"),  # unknown task, with the catalog's nearest name
        ({"task": "noop", "priority": 1000}, "priority", "-100"),
        ({"task": "noop", "queue": "bad queue!"}, "queue", None),
        ({"task": "noop", "delay": 5, "run_at": "2030-01-01T00:00:00Z"}, "delay", None),
        ({"task": "noop", "colour": "red"}, "colour", "unknown field"),
        ({"task": "noop", "priority": "high"}, "priority", None),
        ({"task": "noop", "depends_on": [999999]}, "depends_on", None),
    ]
    for body, field, hint in cases:
        response = client.post("/api/v1/jobs", json=body, headers=as_user("alice"))
        assert response.status_code == 422, (body, response.json())
        assert error(response)["field"] == field, (body, response.json())
        if hint:
            assert hint in error(response)["message"]
        assert "Traceback" not in response.text and "SELECT" not in response.text
    assert row_counts(conn) == before


def test_duplicate_dedupe_key_is_409_with_the_existing_job(client: Any, as_user: Any) -> None:
    first = create(client, as_user("alice"), dedupe_key="daily").json()
    response = create(client, as_user("alice"), dedupe_key="daily")
    assert response.status_code == 409
    assert error(response)["field"] == "dedupe_key" and error(response)["existing_id"] == first["id"]
    # Another owner holding the key learns that it is taken, never which job holds it.
    other = create(client, as_user("bob"), dedupe_key="daily")
    assert other.status_code == 409 and error(other)["existing_id"] is None


def test_shell_and_http_jobs_need_the_users_permission(
    client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    for task, args in (("shell", {"cmd": ["id"]}), ("http", {"url": "https://example.org/"})):
        response = client.post("/api/v1/jobs", json={"task": task, "args": args}, headers=as_user("root"))
        assert response.status_code == 403 and error(response)["field"] == "task"
    assert conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone() == (0,)


def test_viewers_read_their_own_and_change_nothing(client: Any, as_user: Any, app: Any) -> None:
    app.enqueue("noop", owner="vera")
    app.enqueue("noop", owner="alice")
    listed = client.get("/api/v1/jobs", headers=as_user("vera")).json()
    assert [j["owner"] for j in listed["jobs"]] == ["vera"]
    assert create(client, as_user("vera")).status_code == 403
    assert client.post("/api/v1/jobs/1/cancel", headers=as_user("vera")).status_code == 403
    assert app.get(1).state == "queued"


def test_another_owners_job_is_404_and_never_listed(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    mine = create(client, as_user("alice")).json()["id"]
    theirs = create(client, as_user("bob")).json()["id"]
    assert [j["id"] for j in client.get("/api/v1/jobs", headers=as_user("alice")).json()["jobs"]] == [mine]
    for method, path in (("get", ""), ("post", "/cancel"), ("post", "/retry")):
        response = getattr(client, method)(f"/api/v1/jobs/{theirs}{path}", headers=as_user("alice"))
        assert response.status_code == 404, (path, response.json())
        missing = getattr(client, method)(f"/api/v1/jobs/99999{path}", headers=as_user("alice"))
        assert missing.status_code == 404
        assert set(error(response)) == set(error(missing))  # the same answer as a job that does not exist
    assert conn.execute("SELECT state FROM pgsched.jobs WHERE id = %s", (theirs,)).fetchone() == ("queued",)
    # Admins and operators see every owner's jobs.
    for name in ("root", "ops"):
        listed = client.get("/api/v1/jobs", headers=as_user(name)).json()["jobs"]
        assert sorted(j["id"] for j in listed) == [mine, theirs]
        assert client.get(f"/api/v1/jobs/{theirs}", headers=as_user(name)).status_code == 200


def test_list_filters_and_cursor_pages(client: Any, as_user: Any, app: Any) -> None:
    ids = [app.enqueue("noop", owner="alice", queue="q1" if i % 2 else "q2").id for i in range(7)]
    app.enqueue("report", owner="alice")
    app.cancel(ids[0])
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"task": "noop", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/api/v1/jobs", params=params, headers=as_user("alice")).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)  # newest first, each once
    by_queue = client.get("/api/v1/jobs", params={"queue": "q1"}, headers=as_user("alice")).json()
    assert {j["queue"] for j in by_queue["jobs"]} == {"q1"} and len(by_queue["jobs"]) == 3
    cancelled = client.get("/api/v1/jobs", params={"state": "cancelled"}, headers=as_user("alice")).json()
    assert [j["id"] for j in cancelled["jobs"]] == [ids[0]]
    clamped = client.get("/api/v1/jobs", params={"limit": 100000}, headers=as_user("alice")).json()
    assert len(clamped["jobs"]) == 8
    bad = client.get("/api/v1/jobs", params={"state": "sleeping"}, headers=as_user("alice"))
    assert bad.status_code == 422 and error(bad)["field"] == "state"
    bad = client.get("/api/v1/jobs", params={"cursor": "abc"}, headers=as_user("alice"))
    assert bad.status_code == 422 and error(bad)["field"] == "cursor"


def test_show_with_runs(client: Any, as_user: Any, app: Any, conn: psycopg.Connection[Any]) -> None:
    job = app.enqueue("noop", owner="alice")
    conn.execute(
        "INSERT INTO pgsched.runs (job_id, attempt, queue, task, owner, outcome, started_at, finished_at, error)"
        " VALUES (%s, 1, 'default', 'noop', 'alice', 'failed', now(), now(), 'boom')",
        (job.id,),
    )
    shown = client.get(f"/api/v1/jobs/{job.id}", headers=as_user("alice")).json()
    assert shown["job"]["id"] == job.id and shown["job"]["owner"] == "alice"
    assert [(r["attempt"], r["outcome"], r["error"]) for r in shown["runs"]] == [(1, "failed", "boom")]


def test_cancel_and_retry_with_audit_rows(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    job_id = create(client, as_user("alice")).json()["id"]
    cancelled = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=as_user("alice"))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=as_user("alice"))
    assert again.json()["state"] == "cancelled"  # idempotent, as the library's cancel
    retried = client.post(f"/api/v1/jobs/{job_id}/retry", headers=as_user("ops"))
    assert retried.status_code == 200 and retried.json()["state"] == "queued"
    assert conn.execute("SELECT state FROM pgsched.jobs WHERE id = %s", (job_id,)).fetchone() == ("queued",)
    worker = worker_incarnation(conn, "1 minute")
    conn.execute(
        "UPDATE pgsched.jobs SET state = 'running', attempts = 1, worker_id = %s, started_at = now() WHERE id = %s",
        (worker, job_id),
    )
    refused = client.post(f"/api/v1/jobs/{job_id}/retry", headers=as_user("alice"))
    assert refused.status_code == 409 and error(refused)["code"] == "invalid_state"
    assert audit_rows(conn) == [
        ("alice", "job.create", str(job_id), None, "queued"),
        ("alice", "job.cancel", str(job_id), "queued", "cancelled"),
        ("alice", "job.cancel", str(job_id), "cancelled", "cancelled"),
        ("ops", "job.retry", str(job_id), "cancelled", "queued"),
    ]


def test_idempotency_key_replays_the_first_response(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    headers = {**as_user("alice"), "Idempotency-Key": "order-17"}
    first = client.post("/api/v1/jobs", json={"task": "noop", "args": {"n": 1}}, headers=headers)
    replay = client.post("/api/v1/jobs", json={"task": "noop", "args": {"n": 1}}, headers=headers)
    assert first.status_code == replay.status_code == 201
    assert replay.json() == first.json() and replay.headers["idempotent-replayed"] == "true"
    assert conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone() == (1,)
    other = client.post("/api/v1/jobs", json={"task": "noop", "args": {"n": 2}}, headers=headers)
    assert other.status_code == 422 and error(other)["field"] == "Idempotency-Key"
    # Keys are per user: bob's "order-17" is his own.
    bobs = client.post(
        "/api/v1/jobs",
        json={"task": "noop", "args": {"n": 1}},
        headers={**as_user("bob"), "Idempotency-Key": "order-17"},
    )
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    # After 24 hours the key may be used again.
    conn.execute("UPDATE pgsched.api_idempotency SET created_at = created_at - interval '25 hours'")
    later = client.post("/api/v1/jobs", json={"task": "noop", "args": {"n": 2}}, headers=headers)
    assert later.status_code == 201 and later.json()["id"] not in (first.json()["id"], bobs.json()["id"])
    assert conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone() == (3,)


def test_row_level_security_holds_without_the_python_owner_filter(
    api_dsn: str, client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    """SQL straight from the API's login: what the policies let through, whatever the code does."""
    alices = create(client, as_user("alice")).json()["id"]
    bobs = create(client, as_user("bob")).json()["id"]
    with psycopg.connect(api_dsn) as api:
        # No owner set: nothing.
        assert api.execute("SELECT count(*) FROM pgsched.jobs").fetchone() == (0,)
        api.rollback()
        api.execute("SELECT set_config('pgsched.owner', 'bob', true), set_config('pgsched.role', 'member', true)")
        assert api.execute("SELECT id FROM pgsched.jobs").fetchall() == [(bobs,)]
        assert api.execute("SELECT count(*) FROM pgsched.jobs WHERE owner = 'alice'").fetchone() == (0,)
        # A job for alice: refused by the policy.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            api.execute("INSERT INTO pgsched.jobs (task, owner) VALUES ('noop', 'alice')")
        api.rollback()
        api.execute("SELECT set_config('pgsched.owner', 'bob', true), set_config('pgsched.role', 'member', true)")
        # Changing alice's job: no row matches, by UPDATE or by the library's cancel.
        assert api.execute("UPDATE pgsched.jobs SET state = 'cancelled' WHERE id = %s", (alices,)).rowcount == 0
        with pytest.raises(psycopg.Error) as refused:
            api.execute("SELECT pgsched.cancel(%s)", (alices,))
        assert refused.value.sqlstate == "PGS04"  # "does not exist", as for a missing job
        api.rollback()
        # A viewer changes nothing, not even its own jobs.
        api.execute("SELECT set_config('pgsched.owner', 'bob', true), set_config('pgsched.role', 'viewer', true)")
        assert api.execute("UPDATE pgsched.jobs SET state = 'cancelled' WHERE id = %s", (bobs,)).rowcount == 0
        api.rollback()
        # The settings are the transaction's: the next one sees nothing again.
        assert api.execute("SELECT count(*) FROM pgsched.jobs").fetchone() == (0,)
        api.rollback()
        # The audit log is append-only for the API.
        for sql in (
            "UPDATE pgsched.audit_log SET actor = 'x'",
            "DELETE FROM pgsched.audit_log",
            "TRUNCATE pgsched.audit_log",
            "INSERT INTO pgsched.jobs (task) VALUES ('noop')",
            "UPDATE pgsched.jobs SET owner = 'bob'",
            "UPDATE pgsched.users SET username = 'bob'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                api.execute(sql)
            api.rollback()
    assert conn.execute("SELECT owner, state FROM pgsched.jobs ORDER BY id").fetchall() == [
        ("alice", "queued"),
        ("bob", "queued"),
    ]


def test_batch_create_all_or_nothing(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    batch = {"jobs": [{"task": "noop", "args": {"n": n}, "priority": n} for n in range(5)]}
    created = client.post("/api/v1/jobs/batch", json=batch, headers=as_user("alice"))
    assert created.status_code == 201
    ids = created.json()["ids"]
    assert conn.execute("SELECT id, owner, priority FROM pgsched.jobs ORDER BY id").fetchall() == [
        (job_id, "alice", n) for n, job_id in enumerate(ids)
    ]
    assert conn.execute(
        "SELECT actor, action, after -> 'ids' FROM pgsched.audit_log WHERE action = 'job.create_many'"
    ).fetchall() == [("alice", "job.create_many", ids)]
    before = row_counts(conn)
    for body, field in (
        ({"jobs": [{"task": "noop"}, {"task": "noop", "priority": 500}]}, "jobs[1].priority"),
        ({"jobs": [{"task": "noop"}, {"task": "nope"}]}, "jobs[1].task"),
        ({"jobs": [{"task": "noop", "owner": "bob"}]}, "jobs[0].owner"),
        ({"jobs": [{"task": "noop", "dedupe_key": "k"}, {"task": "noop", "dedupe_key": "k"}]}, "jobs[1].dedupe_key"),
        ({"jobs": []}, "jobs"),
        ({"jobs": [{"task": "noop"}] * 1001}, "jobs"),
    ):
        response = client.post("/api/v1/jobs/batch", json=body, headers=as_user("alice"))
        assert response.status_code in (409, 422), (field, response.json())
        assert error(response)["field"] == field, (field, response.json())
    shell = client.post(
        "/api/v1/jobs/batch", json={"jobs": [{"task": "noop"}, {"task": "shell"}]}, headers=as_user("alice")
    )
    assert shell.status_code == 403 and error(shell)["field"] == "jobs[1].task"
    assert row_counts(conn) == before


def test_retrigger_makes_a_new_job_of_the_same_definition(
    client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    first = create(client, as_user("alice"), args={"day": "d"}, queue="reports", priority=7, max_attempts=2).json()
    client.post(f"/api/v1/jobs/{first['id']}/cancel", headers=as_user("alice"))
    again = client.post(f"/api/v1/jobs/{first['id']}/retrigger", headers=as_user("ops"))
    assert again.status_code == 201
    job = again.json()
    assert job["id"] != first["id"] and job["state"] == "queued"
    assert (job["task"], job["args"], job["queue"], job["priority"], job["max_attempts"], job["owner"]) == (
        "noop",
        {"day": "d"},
        "reports",
        7,
        2,
        "alice",
    )
    assert client.post(f"/api/v1/jobs/{first['id']}/retrigger", headers=as_user("bob")).status_code == 404
    assert conn.execute(
        "SELECT actor, target_id, after ->> 'from' FROM pgsched.audit_log WHERE action = 'job.retrigger'"
    ).fetchall() == [("ops", str(job["id"]), str(first["id"]))]


def test_list_filters_by_owner_time_and_task_search(
    client: Any, as_user: Any, app: Any, conn: psycopg.Connection[Any]
) -> None:
    old = app.enqueue("noop", owner="alice")
    conn.execute("UPDATE pgsched.jobs SET created_at = created_at - interval '2 days' WHERE id = %s", (old.id,))
    new = app.enqueue("report", owner="alice")
    bobs = app.enqueue("noop", owner="bob")
    app.cancel(new.id)
    theirs = client.get("/api/v1/jobs", params={"owner": "bob"}, headers=as_user("ops")).json()["jobs"]
    assert [j["id"] for j in theirs] == [bobs.id]
    refused = client.get("/api/v1/jobs", params={"owner": "bob"}, headers=as_user("alice"))
    assert refused.status_code == 403 and error(refused)["field"] == "owner"
    since = conn.execute("SELECT now() - interval '1 day'").fetchone()[0].isoformat()
    recent = client.get("/api/v1/jobs", params={"created_after": since}, headers=as_user("alice")).json()["jobs"]
    assert [j["id"] for j in recent] == [new.id]
    older = client.get("/api/v1/jobs", params={"created_before": since}, headers=as_user("alice")).json()["jobs"]
    assert [j["id"] for j in older] == [old.id]
    finished = client.get("/api/v1/jobs", params={"finished_after": since}, headers=as_user("alice")).json()["jobs"]
    assert [j["id"] for j in finished] == [new.id]
    found = client.get("/api/v1/jobs", params={"search": "epo"}, headers=as_user("alice")).json()["jobs"]
    assert [j["task"] for j in found] == ["report"]
    wildcard = client.get("/api/v1/jobs", params={"search": "%"}, headers=as_user("alice")).json()["jobs"]
    assert wildcard == []  # a literal %, not "anything"
    naive = client.get("/api/v1/jobs", params={"created_after": "2026-01-01T00:00:00"}, headers=as_user("alice"))
    assert naive.status_code == 422 and error(naive)["field"] == "created_after"


def test_logs_paged_and_followed(client: Any, as_user: Any, app: Any, conn: psycopg.Connection[Any]) -> None:
    job = app.enqueue("noop", owner="alice")

    def log(*messages: str) -> None:
        for message in messages:
            conn.execute(
                "INSERT INTO pgsched.run_logs (job_id, attempt, stream, message) VALUES (%s, 1, 'stdout', %s)",
                (job.id, message),
            )

    log("one", "two", "three")
    url = f"/api/v1/jobs/{job.id}/logs"
    first = client.get(url, params={"limit": 2}, headers=as_user("alice")).json()
    assert [line["message"] for line in first["lines"]] == ["one", "two"]
    rest = client.get(url, params={"cursor": first["next_cursor"]}, headers=as_user("alice")).json()
    assert [line["message"] for line in rest["lines"]] == ["three"]
    # Following a running job: nothing new yet, the same cursor back; then the new lines only.
    idle = client.get(url, params={"cursor": rest["next_cursor"]}, headers=as_user("alice")).json()
    assert idle == {"lines": [], "next_cursor": rest["next_cursor"]}
    log("four")
    assert [
        line["message"]
        for line in client.get(url, params={"cursor": idle["next_cursor"]}, headers=as_user("alice")).json()["lines"]
    ] == ["four"]
    assert client.get(url, headers=as_user("bob")).status_code == 404
    bad = client.get(url, params={"cursor": "nonsense"}, headers=as_user("alice"))
    assert bad.status_code == 422 and error(bad)["field"] == "cursor"


def test_bulk_cancel_and_retry_by_filter_in_batches(
    client: Any, as_user: Any, app: Any, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgsched.api import bulk

    monkeypatch.setattr(bulk, "BATCH", 3)
    alices = app.enqueue_many([{"task": "noop", "owner": "alice", "queue": "q"} for _ in range(7)])
    other_queue = app.enqueue("noop", owner="alice", queue="elsewhere").id
    bobs = app.enqueue("noop", owner="bob", queue="q").id
    dry = client.post("/api/v1/jobs/cancel", json={"queue": "q", "dry_run": True}, headers=as_user("alice")).json()
    assert dry == {"count": 7, "batches": 0, "dry_run": True}
    assert conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'cancelled'").fetchone() == (0,)
    done = client.post("/api/v1/jobs/cancel", json={"queue": "q"}, headers=as_user("alice")).json()
    assert done == {"count": 7, "batches": 3, "dry_run": False}
    states = dict(conn.execute("SELECT id, state FROM pgsched.jobs").fetchall())
    assert all(states[i] == "cancelled" for i in alices)
    assert states[other_queue] == "queued" and states[bobs] == "queued"  # another queue; another owner
    audited = conn.execute(
        "SELECT jsonb_array_length(after -> 'ids') FROM pgsched.audit_log WHERE action = 'job.cancel_many' ORDER BY id"
    ).fetchall()
    assert audited == [(3,), (3,), (1,)]
    retried = client.post("/api/v1/jobs/retry", json={"queue": "q"}, headers=as_user("ops")).json()
    assert retried["count"] == 7
    assert conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'queued'").fetchone() == (9,)
    refused = client.post("/api/v1/jobs/cancel", json={"owner": "bob"}, headers=as_user("alice"))
    assert refused.status_code == 403 and error(refused)["field"] == "owner"


def test_cancelling_a_job_cancels_its_waiting_dependents(
    client: Any, as_user: Any, app: Any, conn: psycopg.Connection[Any]
) -> None:
    upstream = create(client, as_user("alice")).json()["id"]
    downstream = create(client, as_user("alice"), depends_on=[upstream]).json()
    assert downstream["state"] == "waiting"
    assert client.post(f"/api/v1/jobs/{upstream}/cancel", headers=as_user("alice")).status_code == 200
    assert app.get(downstream["id"]).state == "cancelled"  # the dependency trigger ran as the API's login
    assert client.post(f"/api/v1/jobs/{upstream}/retry", headers=as_user("alice")).status_code == 200
    # depends_on naming another owner's job: as if it did not exist
    bobs = create(client, as_user("bob")).json()["id"]
    refused = create(client, as_user("alice"), depends_on=[bobs])
    assert refused.status_code == 422 and error(refused)["field"] == "depends_on"


def test_command_jobs_need_the_users_permission_and_the_logins(
    client: Any, as_user: Any, api_dsn: str, conn: psycopg.Connection[Any]
) -> None:
    login = psycopg.conninfo.conninfo_to_dict(api_dsn)["user"]
    conn.execute("UPDATE pgsched.users SET may_create_commands = true WHERE username = 'alice'")
    shell = {"task": "shell", "args": {"cmd": ["echo", "hi"]}}
    # The user may, the API's login may not (an operator has not granted pgsched_api_commands).
    refused = client.post("/api/v1/jobs", json=shell, headers=as_user("alice"))
    assert refused.status_code == 403 and "may not create shell jobs" in error(refused)["message"]
    conn.execute(f'GRANT pgsched_api_commands TO "{login}"')
    created = client.post("/api/v1/jobs", json=shell, headers=as_user("alice"))
    assert created.status_code == 201 and created.json()["created_by"] == login
    # The worker asks the same question of the job's creator before it runs the command.
    assert conn.execute("SELECT pgsched.may_create_command_jobs(%s)", (login,)).fetchone() == (True,)
    # A user without the permission still may not.
    assert client.post("/api/v1/jobs", json=shell, headers=as_user("bob")).status_code == 403
    assert conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone() == (1,)
