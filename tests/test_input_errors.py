"""Errors and input (issue 20), from the Python API: a bad DSN is a ConfigError, settings say what
they accept, args are checked against the task catalog, unknown names get a suggestion, a queue
nobody serves draws one warning, and a bulk batch names the item whose dedupe key is taken."""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import psycopg
import pytest

import pgsched
from pgsched import ConfigError, DuplicateJobError, JobSpec, UnservedQueueWarning, ValidationError, load_settings

pytestmark = pytest.mark.db


@pytest.mark.parametrize("dsn", ["not a dsn", "mysql://bob:s3cret@db.example/app"])
def test_a_malformed_dsn_is_a_config_error_without_its_password(dsn: str) -> None:
    with pytest.raises(ConfigError) as caught:
        pgsched.App(dsn)
    with pytest.raises(ConfigError):
        pgsched.App(settings=pgsched.Settings(dsn=dsn)).open()
    message = str(caught.value)
    assert message.startswith("--dsn / PGSCHED_DSN: ") and "not a PostgreSQL connection string" in message
    assert "postgresql://user:password@host:5432/dbname" in message and "s3cret" not in message


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PGSCHED_CONCURRENCY", "ten", "--concurrency / PGSCHED_CONCURRENCY: expected a whole number from 1 to 10000"),
        ("PGSCHED_QUEUES", "media,", "--queues / PGSCHED_QUEUES: expected queue names separated by commas; one of"),
        ("PGSCHED_QUEUES", "a,b/c", "'b/c' is not a queue name"),
        ("PGSCHED_ALLOW_SHELL", "maybe", "expected true or false (accepted: 1, true, yes, on / 0, false, no, off)"),
        ("PGSCHED_LEASE_SECONDS", "-1", "--lease-seconds / PGSCHED_LEASE_SECONDS: expected a number greater than 0"),
        ("PGSCHED_LOG_LEVEL", "loud", "expected one of: debug, info, warning, error, critical"),
    ],
)
def test_a_bad_setting_says_what_is_accepted(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={variable: value})
    assert expected in str(caught.value) and f"(got {value!r})" in str(caught.value)
    assert "Expected `" not in str(caught.value) and "regex" not in str(caught.value)


@pytest.mark.parametrize(("word", "value"), [("yes", True), ("On", True), ("no", False), ("0", False)])
def test_boolean_settings_accept_the_usual_words(word: str, value: bool) -> None:
    assert load_settings(environ={"PGSCHED_ALLOW_SHELL": word}).allow_shell is value


@pytest.fixture
def adder(app: pgsched.App) -> pgsched.App:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    def notify(user: str, **fields: Any) -> None: ...

    app.open()  # writes both to the catalog
    return app


def test_args_are_checked_against_the_apps_task(adder: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(ValidationError) as missing:
        adder.enqueue("add", {"a": 1})
    assert missing.value.field == "args.b" and "required by task 'add', which takes (a, b)" in str(missing.value)
    with pytest.raises(ValidationError) as unknown:
        adder.enqueue("add", {"a": 1, "b": 2, "bb": 3})
    assert unknown.value.field == "args.bb" and "did you mean 'b'?" in str(unknown.value)
    adder.enqueue("notify", {"user": "ann", "colour": "red"})  # **fields takes any name
    with pytest.raises(ValidationError, match=r"args\.user"):
        adder.enqueue("notify", {"colour": "red"})
    assert conn.execute("SELECT task FROM pgsched.jobs").fetchall() == [("notify",)]


def test_args_are_checked_against_the_catalog_by_an_app_that_only_enqueues(
    adder: pgsched.App, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    with pgsched.App(dsn) as client:  # knows "add" only from pgsched.tasks
        with pytest.raises(ValidationError) as missing:
            client.enqueue("add", {"a": 1})
        assert missing.value.field == "args.b"
        with pytest.raises(ValidationError) as in_bulk:
            client.enqueue_many([JobSpec(task="add", args={"a": 1, "b": 2}), {"task": "add", "args": {"b": 2}}])
        assert in_bulk.value.field == "jobs[1].args.a"
        with pytest.raises(ValidationError) as in_workflow, client.workflow() as flow:
            flow.add("add", {"a": 1, "b": 2, "c": 3})
        assert in_workflow.value.field.endswith("args.c")
        assert client.enqueue("add", {"a": 1, "b": 2}).state == "queued"
    assert conn.execute("SELECT count(*) FROM pgsched.jobs").fetchone() == (1,)


def test_a_task_registered_by_sql_without_parameters_is_not_checked(app: pgsched.App, conn: Any) -> None:
    conn.execute(
        'INSERT INTO pgsched.tasks (name, parameters) VALUES (\'legacy\', \'[{"name": "x", "required": true}]\')'
    )
    assert app.enqueue("legacy", {"anything": 1}).state == "queued"


def test_an_unknown_task_name_gets_the_nearest_known_one(adder: pgsched.App, dsn: str) -> None:
    with pytest.raises(ValidationError) as typo:
        adder.enqueue("ad", {"a": 1, "b": 2})
    assert typo.value.field == "task" and str(typo.value).endswith("did you mean 'add'?")
    with pgsched.App(dsn) as client, pytest.raises(ValidationError) as in_bulk:
        client.enqueue_many([JobSpec(task="add", args={"a": 1, "b": 2}), JobSpec(task="notfy", args={"user": "u"})])
    assert in_bulk.value.field == "jobs[1].task" and "did you mean 'notify'?" in str(in_bulk.value)


def test_an_enqueue_to_a_queue_no_worker_serves_warns_once(adder: pgsched.App, conn: Any) -> None:
    lonely, served = f"lonely-{uuid.uuid4().hex[:8]}", f"served-{uuid.uuid4().hex[:8]}"
    with pytest.warns(UnservedQueueWarning, match=f"no live worker serves queue '{lonely}'") as warned:
        adder.enqueue("add", {"a": 1, "b": 2}, queue=lonely)
    assert warned[0].filename == __file__  # points at the caller's line, not pgsched's
    conn.execute(
        "INSERT INTO pgsched.workers (id, host, pid, queues, concurrency, lease_expires_at) "
        "VALUES (gen_random_uuid(), 'h', 1, %s, 1, pgsched.now() + interval '1 minute')",
        ([served],),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adder.enqueue("add", {"a": 1, "b": 2}, queue=lonely)  # warned already in this process
        adder.enqueue_many([JobSpec(task="add", args={"a": 1, "b": 2}, queue=served)])  # a live worker serves it


def test_a_dedupe_key_taken_in_a_batch_names_the_item(adder: pgsched.App, conn: Any) -> None:
    add = {"task": "add", "args": {"a": 1, "b": 2}}
    with pytest.raises(DuplicateJobError) as same_batch:
        adder.enqueue_many([{**add, "dedupe_key": "k"}, add, {**add, "dedupe_key": "k"}])
    assert same_batch.value.field == "jobs[2].dedupe_key" and "held by jobs[0] of this batch" in str(same_batch.value)
    held = adder.enqueue("add", {"a": 1, "b": 2}, dedupe_key="taken")
    with pytest.raises(DuplicateJobError) as live:
        adder.enqueue_many([add, {**add, "dedupe_key": "taken"}])
    assert live.value.field == "jobs[1].dedupe_key" and "already held by a live job" in str(live.value)
    assert conn.execute("SELECT array_agg(id) FROM pgsched.jobs").fetchone() == ([held.id],)


def test_an_enqueuer_may_ask_whether_a_queue_is_served_and_nothing_more(dsn: str, conn: Any) -> None:
    name = f"pgs_enqueuer_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE pgsched_enqueuer')
    try:
        with psycopg.connect(dsn, user=name, autocommit=True) as enqueuer:
            assert enqueuer.execute("SELECT pgsched.queue_served('default')").fetchone() == (False,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                enqueuer.execute("SELECT host FROM pgsched.workers")
    finally:
        conn.execute(f'DROP OWNED BY "{name}"')
        conn.execute(f'DROP ROLE "{name}"')
