"""Bad input: a ValidationError naming the field, raised before anything is written."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgsched
from pgsched import DuplicateJobError, JobSpec, ValidationError
from pgsched.validation import MAX_JSON_DEPTH, TaskDefaults, error_from_db, loads_json, new_job

from .conftest import row_counts

NOW = datetime.now(timezone.utc)


def nested(levels: int, leaf: Any = 1, in_list: bool = False) -> Any:
    """An args object nesting ``levels`` objects (or objects then lists) deep; the args object is level 1."""
    value = leaf
    for _ in range(levels - 1):
        value = [value] if in_list else {"a": value}
    return {"a": value}


# (task, args, options, field) for every kind of bad input the client refuses.
BAD_INPUTS: list[tuple[str, Any, dict[str, Any], str]] = [
    ("nope", {}, {}, "task"),
    ("", {}, {}, "task"),
    ("noop", [1, 2], {}, "args"),
    ("noop", "text", {}, "args"),
    ("noop", {"big": "x" * (1024 * 1024)}, {}, "args"),
    ("noop", {"n": math.nan}, {}, "args.n"),
    ("noop", {"n": [1.0, math.inf]}, {}, "args.n[1]"),
    ("noop", {"s": "a\x00b"}, {}, "args.s"),
    ("noop", {"k\x00": 1}, {}, "args"),
    ("noop", {"when": NOW}, {}, "args.when"),
    ("noop", {1: "int key"}, {}, "args"),
    ("noop", nested(MAX_JSON_DEPTH + 1), {}, "args"),
    ("noop", nested(2000, in_list=True), {}, "args"),  # valid for PostgreSQL: once a RecursionError
    ("noop", {}, {"priority": 101}, "priority"),
    ("noop", {}, {"priority": -101}, "priority"),
    ("noop", {}, {"priority": "high"}, "priority"),
    ("noop", {}, {"max_attempts": 0}, "max_attempts"),
    ("noop", {}, {"run_at": datetime(2026, 12, 1, 9, 0)}, "run_at"),
    ("noop", {}, {"run_at": datetime(1970, 1, 1, tzinfo=timezone.utc)}, "run_at"),
    ("noop", {}, {"run_at": datetime(9999, 1, 1, tzinfo=timezone.utc)}, "run_at"),
    ("noop", {}, {"run_at": "tomorrow"}, "run_at"),
    ("noop", {}, {"run_at": NOW, "delay": 5}, "delay"),
    ("noop", {}, {"delay": -1}, "delay"),
    ("noop", {}, {"delay": math.inf}, "delay"),
    ("noop", {}, {"queue": ""}, "queue"),
    ("noop", {}, {"queue": "q" * 101}, "queue"),
    ("noop", {}, {"queue": "has space"}, "queue"),
    ("noop", {}, {"dedupe_key": ""}, "dedupe_key"),
    ("noop", {}, {"dedupe_key": "k" * 201}, "dedupe_key"),
    ("noop", {}, {"owner": "o" * 201}, "owner"),
    ("noop", {}, {"timeout": 0}, "timeout"),
    ("noop", {}, {"depends_on": [999_999_999]}, "depends_on"),
    ("noop", {}, {"depends_on": ["x"]}, "depends_on"),
    ("noop", {}, {"depends_on": 5}, "depends_on"),
    ("noop", {}, {"depends_on": list(range(1, 102))}, "depends_on"),
    ("noop", {}, {"colour": "red"}, "colour"),
    ("shell", {"cmd": "rm -rf /"}, {}, "args.cmd"),
    ("shell", {"cmd": []}, {}, "args.cmd"),
    ("http", {"url": "ftp://example.com"}, {}, "args.url"),
    ("http", {"url": "https://example.com", "method": "BREW"}, {}, "args.method"),
]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("task", "args", "options", "field"),
    # Unknown tasks, missing dependencies and unknown options need the App (and the database).
    [
        b
        for b in BAD_INPUTS
        if b[0] not in ("nope", "") and b[3] != "colour" and b[2].get("depends_on") != [999_999_999]
    ],
)
def test_new_job_names_the_field(task: str, args: Any, options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        new_job(task, args, TaskDefaults(), **options)
    assert caught.value.field == field


@pytest.mark.unit
def test_good_input_is_normalised() -> None:
    job = new_job("noop", {"b": [1, 2.5, None, True], "a": {"x": "é"}}, TaskDefaults(queue="q", priority=3))
    assert job.queue == "q" and job.priority == 3 and job.max_attempts == 5
    assert job.args_json == '{"b":[1,2.5,null,true],"a":{"x":"é"}}'
    assert new_job("noop", {}, TaskDefaults(), delay=timedelta(minutes=2)).delay_seconds == 120
    assert new_job("noop", {}, TaskDefaults(), depends_on=[3, 3, 2]).depends_on == [3, 2]


@pytest.mark.unit
def test_json_nesting_is_checked_without_recursion_up_to_a_documented_depth() -> None:
    assert new_job("noop", nested(MAX_JSON_DEPTH), TaskDefaults()).args_json.count("{") == MAX_JSON_DEPTH
    assert new_job("noop", nested(MAX_JSON_DEPTH, in_list=True), TaskDefaults()).args_json.count("[") == 63
    for too_deep in (nested(MAX_JSON_DEPTH + 1), nested(100_000, in_list=True)):
        with pytest.raises(ValidationError, match="more than 64 levels deep") as caught:
            new_job("noop", too_deep, TaskDefaults())
        assert caught.value.field == "args"
    # Text from the command line: refused before a parser recurses into it; brackets in strings do not count.
    assert loads_json('{"s": "' + "[" * 1000 + '"}', "args") == {"s": "[" * 1000}
    for text in ("[" * 65 + "]" * 65, '{"a":' * 5000 + "1" + "}" * 5000, "{"):
        with pytest.raises(ValidationError) as caught:
            loads_json(text, "args")
        assert caught.value.field == "args"


@pytest.fixture
def noop_app(app: pgsched.App) -> pgsched.App:
    @app.task
    def noop() -> None:
        pass

    return app


@pytest.mark.db
def test_every_bad_input_changes_nothing(noop_app: pgsched.App, conn: psycopg.Connection[Any]) -> None:
    noop_app.enqueue("noop", {}, dedupe_key="taken")
    before = row_counts(conn)
    for task, args, options, field in BAD_INPUTS:
        with pytest.raises(ValidationError) as caught:
            noop_app.enqueue(task, args, **options)
        assert caught.value.field == field, (task, args, options)
        with pytest.raises(ValidationError) as caught:
            noop_app.enqueue_many([JobSpec(task="noop"), {"task": task, "args": args, **options}])
        assert caught.value.field.startswith("jobs[1]"), (task, args, options)
    with pytest.raises(DuplicateJobError):
        noop_app.enqueue("noop", {}, dedupe_key="taken")
    with pytest.raises(DuplicateJobError):
        noop_app.enqueue_many([JobSpec(task="noop"), JobSpec(task="noop", dedupe_key="taken")])
    assert row_counts(conn) == before


@pytest.mark.db
def test_database_constraints_map_to_the_same_fields(conn: psycopg.Connection[Any]) -> None:
    statements = {
        "priority": "INSERT INTO pgsched.jobs (task, priority) VALUES ('t', 500)",
        "max_attempts": "INSERT INTO pgsched.jobs (task, max_attempts) VALUES ('t', 0)",
        "args": "INSERT INTO pgsched.jobs (task, args) VALUES ('t', '[1]')",
        "queue": "INSERT INTO pgsched.jobs (task, queue) VALUES ('t', '')",
        "state": "INSERT INTO pgsched.jobs (task, state) VALUES ('t', 'lost')",
        "depends_on": "INSERT INTO pgsched.job_deps VALUES (1, 1)",
    }
    for field, sql in statements.items():
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(sql)
        mapped = error_from_db(caught.value)
        assert isinstance(mapped, ValidationError), sql
        assert mapped.field == field


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@pytest.mark.db
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.dictionaries(st.text(max_size=8).filter(lambda k: "\x00" not in k), json_values, max_size=5))
def test_any_json_object_round_trips(noop_app: pgsched.App, args: dict[str, Any]) -> None:
    job = noop_app.enqueue("noop", args)
    assert same_json(noop_app.get(job.id).args, args)


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: jsonb keeps numbers as decimals, so 7.8e+16 may come back as the int 78000000000000000."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return a == b
